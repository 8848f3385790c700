"""Every method on a known-answer world, at equal reward-call budgets, against its closed-form optimum.

One command (from the repository root)::

    python -m engine.known_answer.compare --out runs/known_answer [--world several] [--epochs N]
        [--methods crd_exact,crd,nft,fdfo,didr,di++,grpo,grpo_fast] [--eval-every K] [--samples N]
        [--pretrain-steps S]

Each method trains in this process from the recipe ``configs/known_answer/<recipe>.yaml`` (contexts built by
:func:`engine.context.build`, one :func:`engine.loop.run_epoch` per epoch) on the same world, for the same
``--epochs`` and the same 48 scored samples per epoch (CRD/NFT/DIDR/GRPO: P = 3 prompt lines x G = 16; FDFO: 24 lines x
one pair), so every method makes the same number of reward calls. Every ``--eval-every`` epochs (and before the first
and after the last) the policy's samples of every prompt at fixed noise (the method's own evaluation sampler: the
rollout ODE, FDFO's own steps, DIDR's one-step generator) are kept; at the end they are measured
(:mod:`engine.known_answer.metrics`) against the exact ``p* = p_ref exp(R / beta) / Z`` at the method's target
temperature:

- ``crd_exact``: CRD in the theory's exact case: theta_old frozen at the pretrained weights
  (``crd.old_schedule: 0-1.0-0-1.0``), no KL (``crd.kl_beta: 0``), the raw reward (``crd.reward_scale: raw``): in
  theory its fixed point is exactly ``p_pretrained exp(R / crd.beta)`` (the author's adaptive-weight log-ratio
  estimator is not the ELBO, so in practice it is not: see ``crd_elbo``); target beta = ``crd.beta``;
- ``crd``: CRD at its defaults (normalised reward, moving theta_old, KL to the CFG-guided anchor): target beta = the
  logged ``crd/beta_eff = 2 A_max beta std(R)`` averaged over the last quarter of the epochs;
- ``nft``, ``fdfo``, ``grpo``, ``grpo_fast``: no fixed point of that form (GRPO: the reward enters as per-epoch
  standardised advantages, so no fixed temperature, and its KL is the per-step mean-matching surrogate): measured
  against the ``crd`` target (else ``crd_exact``'s) for reference; ``grpo``: the GenEval preset's method settings
  without CFG (``configs/known_answer/grpo.yaml``), ``grpo_fast``: the same with the official Fast preset's window,
  cps sampler, noise, clip and no KL;
- ``didr``: the one-step generator with the exact teacher (``model.size.teacher: exact``) and the exact reward
  gradient through the Diffused Reward Proxy: target beta = ``didr.beta``; ``di++``: the same with DI++'s terminal
  reward (``didr.reward_mode: terminal``);
- ``crd_elbo`` (not in the default list): ``crd_exact`` with the ELBO log-ratio (``crd.log_ratio: elbo``) instead of
  the author's adaptive-weight estimator.

Floors: the pretrained network's own SW2 to exact ``p_ref`` samples (its ODE at ``rollout.num_steps``), the exact
velocity's (the ODE discretisation alone), and pairs of exact sample sets (the noise floor at ``--samples``).
With ``grpo`` in the run, a third table gives the reward calls each method's E[R] needs to first reach GRPO's final
E[R] on each rewarded prompt (the FDFO and NFT papers' claim). Writes ``<out>/results.json``, ``<out>/results.md``
(the tables) and ``<out>/curves.png`` (PIL).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from dataclasses import fields
from typing import Sequence

import torch

#: the repository root (this file is engine/known_answer/compare.py)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
METHODS = ("crd_exact", "crd", "nft", "fdfo", "didr", "di++", "grpo", "grpo_fast")
#: also available (not in the default list): crd_exact with the ELBO log-ratio estimator (crd.log_ratio: elbo)
EXTRA_METHODS = ("crd_elbo",)
#: method -> (recipe under configs/known_answer, extra overrides)
RECIPES = {
    "crd_exact": ("crd", ["crd.old_schedule=0-1.0-0-1.0", "crd.kl_beta=0", "crd.reward_scale=raw"]),
    "crd_elbo": ("crd", ["crd.old_schedule=0-1.0-0-1.0", "crd.kl_beta=0", "crd.reward_scale=raw",
                         "crd.log_ratio=elbo"]),
    "crd": ("crd", []),
    "nft": ("nft", []),
    "fdfo": ("fdfo", []),
    "didr": ("didr", []),
    "di++": ("didr", ["didr.reward_mode=terminal"]),
    "grpo": ("grpo", []),
    # the official Flow-GRPO-Fast preset (configs/sd35m_geneval_grpo_fast.yaml): an SDE window of 3 steps in 0-4,
    # ODE elsewhere, only the window trained, cps, noise 0.8, clip 1e-5, no KL (and no CFG, as every row here)
    "grpo_fast": ("grpo", ["grpo.window_size=3", "grpo.window_range=[0,5]", "grpo.sde_type=cps",
                           "grpo.noise_level=0.8", "grpo.clip_range=1.0e-5", "grpo.kl_beta=0"]),
}
COLORS = {"crd_exact": (200, 30, 30), "crd_elbo": (120, 0, 0), "crd": (240, 140, 20), "nft": (30, 120, 220), "fdfo": (40, 160, 60),
          "didr": (140, 60, 200), "di++": (120, 120, 120), "grpo": (0, 170, 170), "grpo_fast": (220, 60, 160),
          "pretrained": (0, 0, 0)}


def has_raw_reward_scale() -> bool:
    from engine.methods.crd import CRDConfig
    return "reward_scale" in {f.name for f in fields(CRDConfig)}


def method_config(method: str, *, world: str, epochs: int, run_dir: str, pretrain_steps: int | None, seed: int,
                  extra: Sequence[str] = ()):
    """The run config of ``method`` on ``world`` (its recipe + the comparison's overrides)."""
    from engine.config import load_config

    recipe, overrides = RECIPES[method]
    overrides = [o for o in overrides if has_raw_reward_scale() or not o.startswith("crd.reward_scale")]
    prompts = os.path.join(ROOT, "data", "known_answer", f"{world}.jsonl")
    over = [f"train.epochs={epochs}", f"output_dir={run_dir}", f"seed={seed}", f"model.size.world={world}",
            f"data.train_prompts={prompts}", f"data.test_prompts={prompts}", "eval.num_prompts=0",
            "log.progress=false", "log.tensorboard=false", "log.grid_every=0", "checkpoint.every=0",
            "checkpoint.at_end=false",
            f"rewards=[{{name: gmm, weight: 1.0, kwargs: {{world: {world}, dim: 2}}}}]", *overrides, *extra]
    if pretrain_steps:
        over.append(f"model.size.pretrain_steps={pretrain_steps}")
    return load_config(os.path.join(ROOT, "configs", "known_answer", f"{recipe}.yaml"), over)


def run_method(method: str, cfg, *, eval_every: int, samples: int, seed: int, log=print) -> dict:
    """Train ``cfg`` in process; keep the policy's samples per prompt at the eval epochs. Returns the record."""
    from engine.context import build
    from engine.known_answer.metrics import fixed_noise, method_sampler
    from engine.loop import run_epoch

    t0 = time.time()
    ctx, _ = build(cfg)
    world = ctx.model.flow.world
    sample = method_sampler(ctx, cfg.eval.adapter)

    def snapshot() -> dict:
        return {pw.prompt: sample(fixed_noise(samples, pw.mixture.dim, seed, i), [pw.prompt] * samples).double()
                for i, pw in enumerate(world)}

    points, history, eval_s = [(0, snapshot())], [], 0.0
    try:
        for epoch in range(cfg.train.epochs):
            last, _, _ = run_epoch(ctx, epoch)
            ctx.logger.log(ctx.global_step, last, kind="epoch")
            history.append({k: float(v) for k, v in last.items() if isinstance(v, (int, float))})
            if (epoch + 1) % eval_every == 0 or epoch + 1 == cfg.train.epochs:
                te = time.time()
                points.append((epoch + 1, snapshot()))
                eval_s += time.time() - te
                log(f"[known_answer] {method}: epoch {epoch + 1}/{cfg.train.epochs}, reward/mean "
                    f"{last.get('reward/mean', float('nan')):.4f}, {time.time() - t0:.0f} s")
    finally:
        ctx.logger.close()
    wall = time.time() - t0
    return {"points": points, "history": history, "wall_s": wall, "eval_s": eval_s, "world": world,
            "algo": {f.name: getattr(cfg.algo, f.name) for f in fields(cfg.algo)}}


def target_beta(method: str, rec: dict, raw_mode: bool, tail: float = 0.25) -> tuple[float, str]:
    """The temperature of ``method``'s own target (None for methods without one) and how it was obtained."""
    algo = rec["algo"]
    if method in ("didr", "di++"):
        return float(algo["beta"]), "didr.beta (raw reward units)"
    if method in ("crd_exact", "crd_elbo") and raw_mode and algo.get("reward_scale", "raw") == "raw":
        return float(algo["beta"]), "crd.beta (reward_scale raw)"
    if method in ("crd", "crd_exact", "crd_elbo"):
        vals = [h["crd/beta_eff"] for h in rec["history"] if "crd/beta_eff" in h and math.isfinite(h["crd/beta_eff"])]
        k = max(1, int(len(vals) * tail))
        return (sum(vals[-k:]) / k if vals else float("nan")), f"mean logged crd/beta_eff of the last {k} epochs"
    return float("nan"), ""


def measure(results: dict, *, seed: int, projections: int = 256) -> None:
    """Fill each method's ``curve`` (metrics at every kept epoch against its target) and ``final``."""
    from engine.known_answer.metrics import mean_of, prompt_metrics

    for m, rec in results.items():
        beta = rec["beta"]
        curve = []
        for epoch, xs in rec["points"]:
            per = {pw.prompt: prompt_metrics(xs[pw.prompt], pw, beta, seed=seed, salt=i, projections=projections)
                   for i, pw in enumerate(rec["world"])}
            per["mean"] = mean_of(per)
            curve.append({"epoch": epoch, **per})
        rec["curve"] = curve
        rec["final"] = curve[-1]
        rec["network_target"] = network_target(m, rec, beta)


def network_target(method: str, rec: dict, beta: float) -> dict:
    """``E[R]`` of the pretrained NETWORK's own samples tilted by ``exp(R / beta)`` (self-normalised importance
    weights over the epoch-0 samples; for DIDR/DI++ epoch 0 is the raw one-step generator, so none): the optimum a
    method can reach from this network, beside the exact ``E_p*[R]`` of ``p_ref`` (their gap is the network's own
    floor in reward units). Returns ``{prompt: value}``, with the effective sample size fraction as ``ess``."""
    if method in ("didr", "di++") or not math.isfinite(beta):
        return {}
    out = {}
    for pw in rec["world"]:
        x = rec["points"][0][1][pw.prompt].to(torch.float64)
        r = pw.reward(x)
        w = torch.softmax(r / beta, 0)
        out[pw.prompt] = {"reward": float(w @ r), "ess": float(1 / w.square().sum() / w.numel())}
    return out


def floors(world_name: str, pretrain_steps: int | None, *, steps: int, samples: int, seed: int) -> dict:
    """SW2 floors per prompt: the pretrained network's ODE and the exact velocity's ODE to exact p_ref samples."""
    from engine.known_answer.metrics import model_floor
    from models.gmm import GMMFlow, GMMSettings

    kw = {"world": world_name, "dim": 2, **({"pretrain_steps": pretrain_steps} if pretrain_steps else {})}
    net = model_floor(GMMFlow.pretrained(GMMSettings(**kw)), steps=steps, n=samples, seed=seed)
    exact = model_floor(GMMFlow.pretrained(GMMSettings(**kw, teacher="exact")), steps=steps, n=samples, seed=seed,
                        noise_pairs=1)
    return {"network": net, "exact_velocity": exact, "steps": steps, "samples": samples}


# ------------------------------------------------------------------------------------------------------ output
def _fmt(x: float, nd: int = 3) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:+.{nd}f}" if nd < 0 else f"{x:.{nd}f}"


def tables(results: dict, fl: dict, prompts: Sequence[str]) -> str:
    head1 = ["method", "target beta"] + [f"{p}: E[R] / exact / network's" for p in prompts] + \
        ["mean overshoot", "wall s"]
    rows1 = []
    for m, rec in results.items():
        f = rec["final"]
        rows1.append([m, f"{rec['beta']:.3g}" + (" (reference)" if "reference" in rec["beta_source"] else "")]
                     + [f"{f[p]['reward']:.3f} / {f[p]['exact_reward']:.3f} / "
                        + (f"{rec['network_target'][p]['reward']:.3f}" if p in rec.get("network_target", {}) else "-")
                        for p in prompts]
                     + [f"{f['mean']['overshoot']:+.3f}", f"{rec['wall_s']:.0f}"])
    head2 = ["method"] + [f"{p}: SW2 to p*" for p in prompts] + ["mean SW2", "occupancy TV (mean)"] + \
        [f"{p}: occupancy (p* samples)" for p in prompts]
    rows2 = []
    for m, rec in results.items():
        f = rec["final"]
        rows2.append([m] + [_fmt(f[p]["sw2"]) for p in prompts] + [_fmt(f["mean"]["sw2"]),
                     _fmt(f["mean"]["occupancy_error"])]
                     + [" ".join(f"{o:.2f}" for o in f[p]["occupancy"]) + " ("
                        + " ".join(f"{o:.2f}" for o in f[p]["exact_occupancy"]) + ")" for p in prompts])
    net, ex = fl["network"], fl["exact_velocity"]
    rows2.append(["floor: pretrained net vs p_ref"] + [_fmt(net[p]["floor"]) for p in prompts]
                 + [_fmt(net["mean"]["floor"]), "", *[""] * len(prompts)])
    rows2.append([f"floor: exact velocity, {fl['steps']}-step ODE"] + [_fmt(ex[p]["floor"]) for p in prompts]
                 + [_fmt(ex["mean"]["floor"]), "", *[""] * len(prompts)])
    rows2.append(["noise floor: two exact p_ref sample sets (8 pairs)"] + [_fmt(net[p]["noise_floor"]) for p in prompts]
                 + [_fmt(net["mean"]["noise_floor"]), "", *[""] * len(prompts)])

    def md(head, rows):
        return "\n".join(["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
                         + ["| " + " | ".join(r) + " |" for r in rows])
    return md(head1, rows1) + "\n\n" + md(head2, rows2)


def calls_to_reach(curve: Sequence[dict], prompt: str, level: float, calls_per_epoch: int) -> float | None:
    """Reward calls after which ``curve``'s E[R] on ``prompt`` first reaches ``level`` (linear between the kept
    epochs, so the resolution is ``--eval-every`` epochs); None if it never does."""
    prev = None
    for c in curve:
        e, r = c["epoch"], c[prompt]["reward"]
        if math.isfinite(r) and r >= level:
            if prev is None or prev[1] >= r:
                return float(e * calls_per_epoch)
            e0, r0 = prev
            return float((e0 + (level - r0) / (r - r0) * (e - e0)) * calls_per_epoch)
        prev = (e, r) if math.isfinite(r) else prev
    return None


def reach_table(results: dict, prompts: Sequence[str], ref: str = "grpo") -> str:
    """Markdown: per method and rewarded prompt, the reward calls its E[R] needs to reach ``ref``'s final E[R]
    (the papers' claim: FDFO and NFT reach GRPO's reward in fewer calls). Works on in-memory records and on a
    ``results.json``'s ``methods`` (both hold ``curve`` and ``reward_calls``)."""
    if ref not in results:
        return ""
    epochs = results[ref]["curve"][-1]["epoch"]
    rewarded = [p for p in prompts if any(abs(c[p]["reward"]) > 0 for c in results[ref]["curve"])]
    head = ["method"] + [f"{p}: calls to reach {ref}'s final E[R] {results[ref]['final'][p]['reward']:.3f}"
                         for p in rewarded]
    rows = []
    for m, rec in results.items():
        per_epoch = rec["reward_calls"] // max(1, rec["curve"][-1]["epoch"])
        row = [m]
        for p in rewarded:
            c = calls_to_reach(rec["curve"], p, results[ref]["final"][p]["reward"], per_epoch)
            row.append("never (final %.3f)" % rec["final"][p]["reward"] if c is None else f"{c:.0f}")
        rows.append(row)
    return "\n".join([f"Reward calls to reach `{ref}`'s final E[R] (after {epochs} epochs; linear between the kept "
                      "epochs):", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def robust_range(ys: Sequence[float], k: float = 4.0) -> tuple[float, float]:
    """The y-range of a panel: the data's, but not beyond ``k`` interquartile ranges past the quartiles, so one
    run-away method (grpo_fast's tilt E[R] of 30+) does not flatten every other curve into one line."""
    q = sorted(ys)
    q1, q3 = q[len(q) // 4], q[(3 * len(q)) // 4]
    iqr = max(q3 - q1, 1e-3 * max(1.0, abs(q3)))
    return max(q[0], q1 - k * iqr), min(q[-1], q3 + k * iqr)


def plot(results: dict, fl: dict, prompts: Sequence[str], path: str) -> str:
    """PNG (PIL): per rewarded prompt E[R] against epoch (each method's exact E_{p*}[R] dashed), per flat prompt
    (no reward: p* = p_ref) and averaged over the prompts the SW2 to p* with the floors."""
    from PIL import Image, ImageDraw

    W, H, pad = 420, 300, 46
    kinds = {pw.prompt: pw.kind for pw in next(iter(results.values()))["world"]}
    panels = [(f"{p}: E[R] (dashed: exact E_p*[R])", p, "reward") if kinds[p] != "flat" else
              (f"{p} (no reward, p* = p_ref): SW2 to p*", p, "sw2") for p in prompts] + \
        [("mean SW2 to p* (grey: net floor, dotted: noise floor)", "mean", "sw2")]
    cols = min(2, len(panels))
    rows = -(-len(panels) // cols)
    img = Image.new("RGB", (cols * W, rows * H + 24), "white")
    d = ImageDraw.Draw(img)
    x = 8
    for m in results:  # legend
        d.line([(x, 12), (x + 18, 12)], fill=COLORS.get(m, (0, 0, 0)), width=3)
        d.text((x + 22, 6), m, fill=(0, 0, 0))
        x += 30 + 7 * len(m)
    for k, (title, p, key) in enumerate(panels):
        ox, oy = (k % cols) * W, 24 + (k // cols) * H
        series = {m: [(c["epoch"], c[p][key]) for c in rec["curve"] if math.isfinite(c[p][key])]
                  for m, rec in results.items()}
        hlines = []
        if key == "reward":
            hlines = [(rec["final"][p]["exact_reward"], COLORS.get(m, (0, 0, 0)), "dash") for m, rec in results.items()]
        else:
            hlines = [(fl["network"][p]["floor"], (150, 150, 150), "solid"),
                      (fl["network"][p]["noise_floor"], (150, 150, 150), "dot")]
        ys = [y for s in series.values() for _, y in s] + [h[0] for h in hlines if math.isfinite(h[0])]
        xs = [e for s in series.values() for e, _ in s] or [0, 1]
        if not ys:
            continue
        y0, y1 = robust_range(ys)
        if y1 - y0 < 1e-9:
            y0, y1 = y0 - 0.5, y1 + 0.5
        y0, y1 = y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0)
        clipped = any(not y0 <= y <= y1 for q in series.values() for _, y in q)
        x0, x1 = min(xs), max(max(xs), min(xs) + 1)

        def to(e, y):
            return (ox + pad + (e - x0) / (x1 - x0) * (W - pad - 12), oy + 20 + (y1 - y) / (y1 - y0) * (H - 60))
        d.rectangle([to(x0, y1), to(x1, y0)], outline=(0, 0, 0))
        d.text((ox + pad, oy + 4), title + (" (clipped)" if clipped else ""), fill=(0, 0, 0))
        for v in (y0, (y0 + y1) / 2, y1):
            d.text((ox + 2, to(x0, v)[1] - 5), f"{v:.2f}", fill=(0, 0, 0))
        d.text((ox + pad, oy + H - 36), f"{x0:g}", fill=(0, 0, 0))
        d.text((ox + W - 60, oy + H - 36), f"epoch {x1:g}", fill=(0, 0, 0))
        for y, col, style in hlines:
            if not math.isfinite(y):
                continue
            a, b = to(x0, y), to(x1, y)
            step = {"solid": 0, "dash": 8, "dot": 3}[style]
            if not step:
                d.line([a, b], fill=col, width=1)
            else:
                xx = a[0]
                while xx < b[0]:
                    d.line([(xx, a[1]), (min(xx + step, b[0]), a[1])], fill=col, width=1)
                    xx += 2 * step
        for m, s in series.items():
            pts = [to(e, min(max(y, y0), y1)) for e, y in s]
            if len(pts) > 1:
                d.line(pts, fill=COLORS.get(m, (0, 0, 0)), width=2)
            for q in pts:
                d.ellipse([q[0] - 2, q[1] - 2, q[0] + 2, q[1] + 2], fill=COLORS.get(m, (0, 0, 0)))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path


def _json_ready(results: dict, fl: dict, meta: dict) -> dict:
    out = {"meta": meta, "floors": fl, "methods": {}}
    for m, rec in results.items():
        out["methods"][m] = {k: rec[k] for k in ("beta", "beta_source", "wall_s", "eval_s", "curve", "final",
                                                  "network_target")}
        out["methods"][m]["algo"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in rec["algo"].items()}
        out["methods"][m]["reward_calls"] = rec["reward_calls"]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.known_answer.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/known_answer", help="output folder (results.json, results.md, curves.png)")
    p.add_argument("--world", default="several", help="known-answer world: one | several | steep")
    p.add_argument("--epochs", type=int, default=100, help="epochs of every method (48 reward calls each)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated subset of " + ",".join(METHODS + EXTRA_METHODS))
    p.add_argument("--eval-every", type=int, default=10, help="keep the policy's samples every this many epochs")
    p.add_argument("--samples", type=int, default=1024, help="samples per prompt of every measurement")
    p.add_argument("--pretrain-steps", type=int, default=0, help="model.size.pretrain_steps (0 = the family's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the tiny MLP runs fastest on one)")
    p.add_argument("--set", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="an extra override for one method, e.g. --set crd:crd.beta=0.1 (repeatable)")
    args = p.parse_args(argv)
    from models.gmm import WORLDS
    if args.world not in WORLDS:
        p.error(f"--world must be one of {', '.join(WORLDS)}, got {args.world!r}")
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS + EXTRA_METHODS]
    if bad or not methods:
        p.error(f"--methods: unknown {bad[0] if bad else '(none)'!r}; expected a subset of "
                f"{','.join(METHODS + EXTRA_METHODS)}")
    if args.epochs < 1 or args.eval_every < 1 or args.samples < 2:
        p.error("--epochs and --eval-every must be >= 1 and --samples >= 2")
    extra: dict[str, list[str]] = {m: [] for m in methods}
    for s in args.set:
        m, _, kv = s.partition(":")
        if m not in extra or "=" not in kv:
            p.error(f"--set {s!r}: expected METHOD:KEY=VALUE with METHOD among {','.join(methods)}")
        extra[m].append(kv)
    for k, v in (("DS_ACCELERATOR", "cpu"), ("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(k, v)
    torch.set_num_threads(max(1, args.threads))
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    raw = has_raw_reward_scale()
    started, t_all = datetime.datetime.now(datetime.timezone.utc), time.time()
    results: dict[str, dict] = {}
    for m in methods:
        cfg = method_config(m, world=args.world, epochs=args.epochs, run_dir=os.path.join(out, "runs", m),
                            pretrain_steps=args.pretrain_steps or None, seed=args.seed, extra=extra[m])
        print(f"[known_answer] {m}: {args.epochs} epochs x {cfg.data.prompts_per_epoch * cfg.data.group_size} "
              f"reward calls", flush=True)
        rec = run_method(m, cfg, eval_every=args.eval_every, samples=args.samples, seed=args.seed)
        rec["reward_calls"] = args.epochs * cfg.data.prompts_per_epoch * cfg.data.group_size
        rec["beta"], rec["beta_source"] = target_beta(m, rec, raw)
        rec["rollout_steps"] = cfg.rollout.num_steps
        results[m] = rec
    ref = next((m for m in ("crd", "crd_exact") if m in results), None)
    for m, rec in results.items():  # methods without a fixed point of the form: the CRD target, for reference
        if not math.isfinite(rec["beta"]):
            rec["beta"] = results[ref]["beta"] if ref else float(load_beta_default())
            rec["beta_source"] = f"{ref}'s target (reference only)" if ref else "crd.beta default (reference only)"
    measure(results, seed=args.seed)
    fl = floors(args.world, args.pretrain_steps or None, steps=next(iter(results.values()))["rollout_steps"],
                samples=args.samples, seed=args.seed)
    prompts = [pw.prompt for pw in next(iter(results.values()))["world"]]
    wall = time.time() - t_all
    meta = {"command": "python -m engine.known_answer.compare " + " ".join(sys.argv[1:] if argv is None else argv),
            "date_utc": f"{started:%Y-%m-%d %H:%M}", "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "world": args.world, "epochs": args.epochs, "samples": args.samples, "wall_s": wall,
            "crd_reward_scale_raw": raw, "prompts": prompts}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(_json_ready(results, fl, meta), f, indent=1)
    png = plot(results, fl, prompts, os.path.join(out, "curves.png"))
    notes = [f"- {m}: target beta {rec['beta']:.4g} from {rec['beta_source']}; {rec['reward_calls']} reward calls"
             for m, rec in results.items()]
    if any(m in results for m in ("didr", "di++")):
        notes.append("- didr / di++ epoch 0 is the raw one-step generator x0 = z - v(z, 1) (the teacher's mean), before "
                     "the warm-start regression onto teacher ODE samples that opens their first epoch")
    if not raw and "crd_exact" in results:
        notes.append("- crd.reward_scale does not exist yet: crd_exact ran with the normalised reward (TODO: rerun "
                     "with crd.reward_scale=raw)")
    text = "\n".join([
        f"# Known-answer world `{args.world}`: every method against its closed-form optimum", "",
        f"Command: `{meta['command']}`; {meta['date_utc']} UTC; {meta['machine']}; total wall {wall:.0f} s", "",
        f"{args.epochs} epochs per method; {args.samples} samples per prompt at fixed noise (the method's own "
        "evaluation sampler: the rollout ODE, FDFO's steps, DIDR's one-step generator). E[R] of the policy's samples "
        "vs the exact E_p*[R] of p* = p_ref exp(R / beta) / Z at the method's target beta; overshoot = E[R] - "
        "E_p*[R]; network's = E[R] of the pretrained network's own samples tilted by exp(R / beta) (self-normalised "
        "importance weights: the optimum reachable from this network; its gap to the exact value is the network's "
        "floor in reward units); SW2 = sliced W2 to as many exact p* samples; occupancy = fraction nearest each of p*'s component "
        "means (in parentheses: exact p* samples), TV = total variation between the two.", "",
        *notes, "", tables(results, fl, prompts), "", reach_table(results, prompts), "",
        f"Curves: `{os.path.relpath(png, ROOT)}`.", ""])
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


def load_beta_default() -> float:
    from engine.methods.crd import CRDConfig
    return CRDConfig().beta


if __name__ == "__main__":
    sys.exit(main())
