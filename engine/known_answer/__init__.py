"""Known-answer worlds: every method measured against its closed-form optimum.

The ``gmm`` model family (``models/gmm.py``) gives each prompt an isotropic Gaussian mixture ``p_ref`` and a reward
with a closed-form tilt, so the KL-regularised optimum ``p* = p_ref exp(R / beta) / Z`` is known exactly.

- :mod:`engine.known_answer.rewards`: the world's rewards (``rewards: [{name: gmm, kwargs: {world, dim}}]``);
- :mod:`engine.known_answer.metrics`: E[R] vs the exact ``E_{p*}[R]``, overshoot, component occupancy, sliced W2 to
  exact ``p*`` samples and the floors;
- ``python -m engine.known_answer.compare``: every method on one world at equal reward-call budgets.
"""
