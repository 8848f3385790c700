"""The testbed world (spec/testbed.md): a small compositional world of flat shapes where every method can be run,
measured and compared on a CPU.

- ``world``: vocabulary, procedural renderer, GenEval-style prompt families and the disjoint train/test split;
- ``detector``: ``RuleDetector`` (colour segmentation + connected components + shape tests) and the
  ``testbed_geneval`` reward built on it (the GenEval rules of ``engine.rewards.geneval_rules``);
- ``classifier``: a small CNN attribute classifier: the differentiable ``testbed_classifier`` reward and the feature
  space of the fidelity metric;
- ``metrics``: unseen metrics (fidelity, in-group diversity, off-palette fraction).

The testbed's tools, each a ``python -m`` entry point run from the repository root:

- ``pretrain``: seeded flow-matching pretraining of the base model (``python -m engine.testbed.pretrain``);
- ``eval``: held-out evaluation tables, sample grids and the before/after table that ``engine/train.py`` prints at
  the end of a default testbed run (``python -m engine.testbed.eval``; pictures in ``plots``);
- ``compare``: every method at equal reward-call budgets, one table (``python -m engine.testbed.compare``).
"""
