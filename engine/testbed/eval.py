"""Held-out evaluation of a testbed model: per-family strict GenEval accuracy, the unseen metrics, PNGs.

Usage::

    python -m engine.testbed.eval --checkpoint PATH [--prompts data/testbed/test.jsonl] [--method-config X.yaml]
                                  [--samples-per-prompt 2] [--samples-per-family 64] [--cfg-scale 1.0]
                                  [--out DIR] [--metrics runs/testbed_crd/metrics.jsonl]

``PATH`` is either a base model directory (``checkpoints/testbed/base``: evaluated with the rollout ODE, no LoRA;
``--cfg-scale W`` samples it with classifier-free guidance W, e.g. the guided model CRD anchors its KL to, or the
sampler of DIDR's regression targets) or an engine run checkpoint (``runs/testbed_crd/checkpoints/step-00000080``:
the run's ``config.yaml`` next to ``checkpoints/`` says which method and weights; the method's own ``eval_sample``
draws the samples, e.g. DIDR's one-step generator). It prints a table (strict accuracy per family + overall, mean
partial-credit reward, Frechet distance in classifier features, in-group diversity, off-palette and artifact
fractions), writes a sample grid PNG and, when the run has a ``metrics.jsonl``, a reward-curve PNG.

Comparisons are paired: sample ``j`` of prompt ``i`` starts from the same noise for every model (seeded by
``(seed, i, j)``), so differences between models are not noise draws.

``deepspeed engine/train.py`` calls :func:`before_after` at the end of a testbed run (the testbed recipes set
``eval.after_training: engine.testbed.eval:before_after``): the pretrained weights and
the trained ones on the same held-out prompts and noise, one table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Sequence

import torch

from engine.streams import TESTBED_EVAL_EPOCH, Stream
from engine.testbed.plots import reward_curve, save_grid

#: the repository root (this file is engine/testbed/eval.py)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: evaluation samples per prompt family at least (see :func:`samples_per_prompt_index`): the std of the overall
#: (family-mean) strict accuracy is then about 0.025 at the testbed base's accuracies
DEFAULT_SAMPLES_PER_FAMILY = 64
#: the reward-curve PNG's title: what its two lines are (eval/reward needs the run's eval.every > 0)
CURVE_TITLE = "reward/mean: training rollouts (train prompts); eval/reward: held-out prompts, fixed noise"
METRIC_COLUMNS = (("fidelity_fd", "FD"), ("in_group_diversity", "diversity"),
                  ("off_palette_fraction", "off-palette"), ("artifact_fraction", "artifacts"))


# ------------------------------------------------------------------------------------------------ loading
def _config_for(checkpoint: str, method_config: str | None, overrides: Sequence[str]):
    """The Config that rebuilds the model of ``checkpoint`` (a run checkpoint or a base model directory)."""
    import yaml

    from engine.config import load_config

    is_run_ckpt = os.path.isfile(os.path.join(checkpoint, "state.json"))
    if not is_run_ckpt and not os.path.isfile(os.path.join(checkpoint, "testbed.json")):
        raise ValueError(f"--checkpoint {checkpoint!r} is neither an engine run checkpoint (no state.json) nor a "
                         "testbed base model directory (no testbed.json)")
    path = method_config
    if path is None and is_run_ckpt:
        run_yaml = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint))), "config.yaml")
        if os.path.isfile(run_yaml):
            path = run_yaml
    if path is None:
        path = os.path.join(ROOT, "configs", "testbed_crd.yaml")
    with open(path) as f:
        tree = yaml.safe_load(f) or {}
    tree.pop("algo", None)  # a run's config.yaml carries the method's section under its name
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as tmp:
        yaml.safe_dump(tree, tmp)
    try:
        extra = [f"checkpoint.resume={os.path.abspath(checkpoint)}"] if is_run_ckpt else [f"model.path={checkpoint}"]
        return load_config(tmp.name, list(overrides) + extra), is_run_ckpt
    finally:
        os.unlink(tmp.name)


def load_context(checkpoint: str, method_config: str | None = None, overrides: Sequence[str] = ()):
    """(engine Context with the checkpoint's weights loaded, adapter to evaluate or None for the base model)."""
    from engine.context import build

    cfg, is_run_ckpt = _config_for(checkpoint, method_config, overrides)
    cfg.output_dir = tempfile.mkdtemp(prefix="rlflow-eval-")  # build() opens a logger there; nothing is kept
    cfg.log.tensorboard = False
    cfg.log.wandb = False
    ctx, _ = build(cfg)
    return ctx, (cfg.eval.adapter if is_run_ckpt else None)


# --------------------------------------------------------------------------------------------- evaluation
def samples_per_prompt_index(prompt_set, samples_per_prompt: int = 2, samples_per_family: int = 0) -> torch.Tensor:
    """Prompt index of every evaluation sample, grouped by prompt: each prompt gets ``samples_per_prompt`` samples,
    or, when ``samples_per_family`` > 0, at least ``ceil(samples_per_family / prompts of its family)`` so every
    family's strict accuracy rests on about as many samples (the testbed's held-out split has 70 colour-binding
    prompts and 2-6 of each other family: equal samples per prompt would leave the small families' means, which
    weigh as much in the overall score, to a handful of samples)."""
    from collections import Counter

    tags = [(m or {}).get("tag", "") for m in prompt_set.metadata]
    per_tag = Counter(tags)
    counts = [max(samples_per_prompt, -(-samples_per_family // per_tag[t]) if samples_per_family > 0 else 0)
              for t in tags]
    return torch.arange(len(tags)).repeat_interleave(torch.tensor(counts))


@torch.no_grad()
def generate(ctx, prompt_set, adapter: str | None, *, samples_per_prompt: int = 2, samples_per_family: int = 0,
             seed: int = 0, batch_size: int = 64, cfg_scale: float = 1.0
             ) -> tuple[torch.Tensor, list[dict], torch.Tensor]:
    """Images [n, 3, H, W] in [0, 1] of every prompt of ``prompt_set`` (counts from
    :func:`samples_per_prompt_index`; paired noise: sample ``j`` of the list starts from the same noise for every
    model), their metadata and group ids (prompt indices). ``adapter=None``: the pretrained model with the rollout
    ODE (the base model; with classifier-free guidance ``cfg_scale`` when it is not 1); otherwise the method's
    ``eval_sample`` with that adapter."""
    from engine.rollout import sample_noise
    from models.samplers import sample_ode

    if cfg_scale != 1.0 and adapter is not None:
        raise ValueError(f"cfg_scale applies to the pretrained model only (adapter None), got adapter {adapter!r}: "
                         f"a trained checkpoint is evaluated the way its method samples")

    prompt_idx = samples_per_prompt_index(prompt_set, samples_per_prompt, samples_per_family)
    total = prompt_idx.numel()
    prompts, metadata = prompt_set.select(prompt_idx.tolist())
    res = ctx.cfg.model.resolution
    shape = ctx.model.latent_shape(res, res)
    noise = sample_noise(torch.arange(total), shape, seed=seed, epoch=TESTBED_EVAL_EPOCH, stream=Stream.INIT_NOISE,
                         device=ctx.dist.device)
    cond = ctx.model.encode(prompts).to(ctx.dist.device)
    outs = []
    for s in range(0, total, batch_size):
        sl = slice(s, s + batch_size)
        if adapter is None:  # the rollout ODE (``Method.eval_sample``'s default), guided when cfg_scale != 1
            x0 = sample_ode(ctx.model, noise[sl], cond.index(sl), ctx.sigmas(), adapter="pretrained",
                            cfg_scale=cfg_scale)
        else:
            x0 = ctx.method.eval_sample(ctx, noise[sl], cond.index(sl), adapter)
        outs.append(ctx.model.decode(x0).float().cpu())
    return torch.cat(outs), metadata, prompt_idx


def score(images: torch.Tensor, metadata: list[dict], group_ids: torch.Tensor, *, classifier=None) -> dict:
    """{"accuracy": {family: strict accuracy, ..., "overall"}, "reward": mean partial credit, unseen metrics...}."""
    from engine.rewards import build_rewards
    from engine.testbed.classifier import load_classifier
    from engine.testbed.metrics import per_family_mean, unseen_metrics

    rewards = build_rewards([{"name": "testbed_geneval", "weight": 1.0, "backend": "local", "kwargs": {}}])
    s = rewards.score(images, [m["prompt"] for m in metadata], metadata)
    classifier = classifier or load_classifier()
    out = {"accuracy": per_family_mean(s["testbed_geneval/strict"], metadata),
           "reward": float(s["testbed_geneval"].mean()), "num_images": int(images.shape[0])}
    out.update(unseen_metrics(images, metadata, group_ids, classifier=classifier))
    return out


def evaluate(ctx, prompt_set, adapter: str | None, *, samples_per_prompt: int = 2, samples_per_family: int = 0,
             seed: int = 0, grid_path: str | None = None, cfg_scale: float = 1.0) -> dict:
    """:func:`generate` + :func:`score` (+ a sample grid PNG); adds ``seconds`` (sampling + scoring)."""
    t0 = time.time()
    images, metadata, gids = generate(ctx, prompt_set, adapter, samples_per_prompt=samples_per_prompt,
                                      samples_per_family=samples_per_family, seed=seed, cfg_scale=cfg_scale)
    out = score(images, metadata, gids)
    out["seconds"] = time.time() - t0
    if grid_path:  # two samples of each of the first 32 prompts
        first_two = torch.cat([torch.nonzero(gids == i).flatten()[:2] for i in range(min(32, len(prompt_set)))])
        out["grid"] = save_grid(images[first_two], grid_path, nrow=8)
    return out


# ---------------------------------------------------------------------------------------------- reporting
def format_table(results: dict[str, dict]) -> str:
    """Markdown table: one row per model, strict accuracy per family + overall, partial reward, unseen metrics."""
    from engine.testbed import world

    fams = [f for f in world.FAMILIES if any(f in r["accuracy"] for r in results.values())]
    head = ["model"] + fams + ["overall", "reward"] + [name for _, name in METRIC_COLUMNS]
    extra = [c for c in ("wall_s",) if any(c in r for r in results.values())]
    head += extra
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        acc = r["accuracy"]
        cells = [name] + [f"{acc[f]:.3f}" if f in acc else "-" for f in fams] + [f"{acc['overall']:.3f}",
                                                                                 f"{r['reward']:.3f}"]
        cells += [f"{r[key]:.4g}" if key in r else "-" for key, _ in METRIC_COLUMNS]
        cells += [f"{r[c]:.0f}" if c in r else "-" for c in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{os.cpu_count()} CPU cores, load {load:.1f}, torch {torch.__version__}"


# ------------------------------------------------------------------------------------------ before / after
def before_after(cfg, checkpoint: str | None = None, *, samples_per_prompt: int = 2,
                 samples_per_family: int = DEFAULT_SAMPLES_PER_FAMILY, out_dir: str | None = None,
                 print_table: bool = True) -> dict[str, dict]:
    """The base model and the trained checkpoint (default: the run's latest) on the run's held-out prompts with
    the same noise; prints the table, writes grids, the reward curve and ``before_after.json`` under
    ``<run>/eval/``. Returns ``{"base": ..., "<method>": ...}``."""
    from engine.checkpoint import Checkpointer
    from engine.data import load_prompts

    if not cfg.data.test_prompts:
        print("before/after: no held-out prompts (data.test_prompts is ''); skipped")
        return {}
    run_dir = cfg.run_dir
    out_dir = out_dir or os.path.join(run_dir, "eval")
    if checkpoint is None:
        checkpoint = Checkpointer(os.path.join(run_dir, "checkpoints"), dist=None).latest()
        if checkpoint is None:
            raise ValueError(f"no checkpoint under {run_dir}/checkpoints to evaluate (checkpoint.at_end=false?)")
    prompt_set = load_prompts(cfg.data.test_prompts)
    ctx, adapter = load_context(checkpoint)
    main = ctx.dist.is_main  # every rank samples (same numbers); rank 0 writes and prints
    results = {  # the same noise for both models
        name: evaluate(ctx, prompt_set, which, samples_per_prompt=samples_per_prompt,
                       samples_per_family=samples_per_family, seed=cfg.seed,
                       grid_path=os.path.join(out_dir, f"grid_{name}.png") if main else None)
        for name, which in (("base", None), (cfg.method, adapter))
    }
    if not main:
        return results
    metrics = os.path.join(run_dir, "metrics.jsonl")
    curve = reward_curve(metrics, os.path.join(out_dir, "reward_curve.png"), smooth=3, title=CURVE_TITLE) \
        if os.path.isfile(metrics) else None
    with open(os.path.join(out_dir, "before_after.json"), "w") as f:
        json.dump({"checkpoint": checkpoint, "prompts": cfg.data.test_prompts, "machine": _machine(),
                   "results": results}, f, indent=1)
    if print_table:
        n = results["base"]["num_images"]
        print(f"\nheld-out strict accuracy, {cfg.data.test_prompts} ({len(prompt_set.prompts)} prompts, {n} samples: "
              f">= {samples_per_prompt} per prompt, >= {samples_per_family} per family; paired noise); "
              f"base = pretrained, rollout ODE "
              f"{cfg.rollout.num_steps} steps; {cfg.method} = {checkpoint}")
        print(format_table(results))
        print(f"grids: {out_dir}/grid_*.png" + (f"; reward curve: {curve}" if curve else ""))
    return results


# ---------------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.testbed.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="base model dir or engine run checkpoint dir")
    p.add_argument("--prompts", default="data/testbed/test.jsonl", help="held-out GenEval-format prompts")
    p.add_argument("--method-config", default=None,
                   help="recipe YAML the checkpoint was trained with (default: the run's config.yaml)")
    p.add_argument("--samples-per-prompt", type=int, default=2, help="samples per prompt (at least)")
    p.add_argument("--samples-per-family", type=int, default=DEFAULT_SAMPLES_PER_FAMILY,
                   help="samples per prompt family at least (0 = samples-per-prompt for every prompt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg-scale", type=float, default=1.0,
                   help="base model only: sample with classifier-free guidance of this scale (1 = none: the "
                        "rollout ODE)")
    p.add_argument("--out", default=None, help="where PNGs go (default: <checkpoint>/../../eval or runs/eval)")
    p.add_argument("--metrics", default=None, help="metrics.jsonl for the reward curve (default: the run's)")
    args = p.parse_args(argv)
    if args.samples_per_prompt < 2:
        p.error("--samples-per-prompt must be >= 2 (in-group diversity needs two samples per prompt)")
    from engine.data import load_prompts

    if not os.path.isfile(args.prompts):
        p.error(f"--prompts {args.prompts!r} does not exist")
    if args.cfg_scale <= 0:
        p.error(f"--cfg-scale must be > 0, got {args.cfg_scale}")
    ctx, adapter = load_context(args.checkpoint, args.method_config)
    if adapter is not None and args.cfg_scale != 1.0:
        p.error("--cfg-scale applies to a base model directory only (a trained checkpoint is sampled the way its "
                "method samples)")
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(args.checkpoint))) if adapter else None
    out = args.out or (os.path.join(run_dir, "eval") if run_dir else os.path.join("runs", "eval"))
    if adapter is not None:
        name = ctx.cfg.method
    else:
        name = "base" if args.cfg_scale == 1.0 else f"base_cfg{args.cfg_scale:g}"
    prompt_set = load_prompts(args.prompts)
    res = evaluate(ctx, prompt_set, adapter, samples_per_prompt=args.samples_per_prompt,
                   samples_per_family=args.samples_per_family, seed=args.seed,
                   grid_path=os.path.join(out, f"grid_{name}.png"), cfg_scale=args.cfg_scale)
    print(f"{args.checkpoint}: {len(prompt_set.prompts)} prompts, {res['num_images']} samples (>= "
          f"{args.samples_per_prompt} per prompt, >= {args.samples_per_family} per family), {res['seconds']:.0f} s; "
          f"{_machine()}")
    print(format_table({name: res}))
    print(f"sample grid: {res['grid']}")
    metrics = args.metrics or (os.path.join(run_dir, "metrics.jsonl") if run_dir else None)
    if metrics and os.path.isfile(metrics):
        curve = reward_curve(metrics, os.path.join(out, "reward_curve.png"), smooth=3, title=CURVE_TITLE)
        print(f"reward curve: {curve}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
