"""Side-by-side comparison on the testbed: base vs CRD vs NFT vs FDFO vs DIDR vs GRPO at equal reward-call budgets.

One command (from the repository root)::

    python -m engine.testbed.compare [--methods crd,nft,fdfo,didr,grpo,grpo_fast] [--reward-calls N] [--samples-per-prompt 2]
                                     [--samples-per-family 64]
                                     [--out docs/results/testbed_comparison.md] [--runs runs/compare] [--jobs 1]
                                     [--reuse-existing] [--base checkpoints/testbed/base] [--base-cfg 4.5]

For each method it trains ``configs/testbed_<method>.yaml`` (``engine/train.py``, one process) for
``reward_calls // (prompts_per_epoch * group_size)`` epochs (default budget: the CRD recipe's), so every method
scores the same number of generated images with its reward (CRD/NFT/FDFO/GRPO: rollout samples scored by the GenEval
rules; DIDR: generator samples scored by the differentiable classifier reward), all from a frozen copy of the base
checkpoint taken at the start; each training's progress is printed from its ``metrics.jsonl``. Then the base model
(rollout ODE, no LoRA), the base sampled with classifier-free guidance ``--base-cfg`` (default: the CRD recipe's
KL-anchor scale, the guided model CRD distills; 0 = no such row) and every trained checkpoint (the method's own
sampler: DIDR one step, GRPO the ODE with its CFG 4.5) are evaluated on the held-out prompts with the same noise per
(prompt, sample) (``engine.testbed.eval``), and one markdown table (strict accuracy per family + overall,
partial-credit reward, unseen metrics, training wall time, reward calls) is written with the machine, the load and
the date. ``--skip-training``
evaluates existing runs under ``--runs`` (``<runs>/testbed_<method>``; the table then says so, and their wall time
comes from the run's files).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Sequence

from engine.data.jsonl import read_jsonl

#: the repository root (this file is engine/testbed/compare.py)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
METHODS = ("crd", "nft", "fdfo", "didr", "grpo", "grpo_fast")


def epochs_for(method: str, reward_calls: int) -> tuple[int, int]:
    """(epochs, reward calls per epoch) of ``configs/testbed_<method>.yaml`` for a budget of ``reward_calls``."""
    from engine.config import load_config

    cfg = load_config(os.path.join(ROOT, "configs", f"testbed_{method}.yaml"))
    per_epoch = cfg.data.prompts_per_epoch * cfg.data.group_size
    if reward_calls < per_epoch:
        raise ValueError(f"--reward-calls {reward_calls} is below one epoch of {method} ({per_epoch} calls)")
    return reward_calls // per_epoch, per_epoch


def train_command(method: str, epochs: int, base: str, run_dir: str) -> list[str]:
    """``engine/train.py`` (one process) for one method of the comparison (``method`` names the recipe
    ``configs/testbed_<method>.yaml``, whose ``method`` key is the training method: ``grpo_fast`` trains grpo)."""
    return [sys.executable, os.path.join(ROOT, "engine", "train.py"),
            "--config", os.path.join(ROOT, "configs", f"testbed_{method}.yaml"), f"train.epochs={epochs}",
            f"model.path={base}", f"output_dir={run_dir}", "checkpoint.every=0", "checkpoint.at_end=true",
            "eval.num_prompts=0", "log.tensorboard=false", "log.progress=false"]


def train_methods(jobs: dict[str, tuple[int, str]], base: str, parallel: int = 1) -> dict[str, float]:
    """Train ``{method: (epochs, run_dir)}`` as subprocesses, ``parallel`` at a time; returns each one's wall time
    (s) and writes it to ``<run_dir>/wall_time.json``."""
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "HF_HUB_OFFLINE": "1"}
    pending, running, walls = list(jobs.items()), {}, {}
    shown, last_print = {}, {}  # per method: the last epoch count printed and when
    while pending or running:
        while pending and len(running) < max(1, parallel):
            m, (epochs, run_dir) = pending.pop(0)
            if os.path.isdir(run_dir):
                shutil.rmtree(run_dir)
            os.makedirs(run_dir)
            log = open(os.path.join(run_dir, "train.log"), "w")
            print(f"[compare] {m}: {epochs} epochs -> {run_dir} (log: train.log)", flush=True)
            running[m] = (subprocess.Popen(train_command(m, epochs, base, run_dir), cwd=ROOT, env=env, stdout=log,
                                           stderr=subprocess.STDOUT), time.time(), log, run_dir)
        time.sleep(2)
        for m, (proc, t0, log, run_dir) in list(running.items()):
            if proc.poll() is None:
                done = _epochs_logged(run_dir)  # the runs train with log.progress=false: say how far they are
                if done > shown.get(m, 0) and (done == jobs[m][0] or time.time() - last_print.get(m, t0) >= 30):
                    print(f"[compare] {m}: epoch {done}/{jobs[m][0]}, {time.time() - t0:.0f} s", flush=True)
                    shown[m], last_print[m] = done, time.time()
                continue
            log.close()
            del running[m]
            if proc.returncode != 0:
                raise SystemExit(f"[compare] training {m} failed (exit {proc.returncode}); see {run_dir}/train.log")
            walls[m] = time.time() - t0
            with open(os.path.join(run_dir, "wall_time.json"), "w") as f:
                json.dump({"wall_s": walls[m], "epochs": jobs[m][0], "parallel": parallel}, f)
            print(f"[compare] {m}: trained in {walls[m]:.0f} s", flush=True)
    return walls


def _epochs_logged(run_dir: str) -> int:
    """Epoch records in ``<run_dir>/metrics.jsonl`` so far (0 before the first; a line being written is skipped)."""
    count = 0
    try:
        for _, rec in read_jsonl(os.path.join(run_dir, "metrics.jsonl")):
            count += rec.get("kind") == "epoch"
    except ValueError:  # only the last line can be half-written: every record before it is counted
        pass
    except OSError:
        return 0
    return count


def run_wall_time(run_dir: str) -> float | None:
    """Training wall time of an existing run: ``wall_time.json`` when this script trained it, else the time from
    the run's ``config.yaml`` (written at the start) to its last checkpoint's ``state.json`` (file timestamps)."""
    from engine.checkpoint import Checkpointer

    rec = os.path.join(run_dir, "wall_time.json")
    if os.path.isfile(rec):
        with open(rec) as f:
            return float(json.load(f)["wall_s"])
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), dist=None).latest()
    start = os.path.join(run_dir, "config.yaml")
    if ckpt is None or not os.path.isfile(start):
        return None
    return os.path.getmtime(os.path.join(ckpt, "state.json")) - os.path.getmtime(start)


def run_budget(run_dir: str) -> dict:
    """Epochs and reward calls of a run's latest checkpoint (its ``state.json`` and ``config.yaml``) + base path."""
    import yaml

    from engine.checkpoint import Checkpointer

    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), dist=None).latest()
    if ckpt is None:
        raise SystemExit(f"[compare] no checkpoint under {run_dir}/checkpoints")
    with open(os.path.join(ckpt, "state.json")) as f:
        epochs = int(json.load(f)["epoch"])
    with open(os.path.join(run_dir, "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    per_epoch = int(cfg["data"]["prompts_per_epoch"]) * int(cfg["data"]["group_size"])
    return {"epochs": epochs, "reward_calls": epochs * per_epoch, "base": cfg["model"]["path"]}


def _finished(run_dir: str, epochs: int) -> bool:
    """True when ``run_dir`` has a complete checkpoint after exactly ``epochs`` epochs."""
    try:
        return run_budget(run_dir)["epochs"] == epochs
    except (SystemExit, OSError, KeyError):
        return False


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    from engine.testbed.eval import DEFAULT_SAMPLES_PER_FAMILY

    p = argparse.ArgumentParser(prog="python -m engine.testbed.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (base is always included)")
    p.add_argument("--reward-calls", type=int, default=0,
                   help="reward calls (scored images) per method (0 = the CRD recipe's: epochs x P x G)")
    p.add_argument("--prompts", default="data/testbed/test.jsonl", help="held-out prompts")
    p.add_argument("--samples-per-prompt", type=int, default=2, help="held-out samples per prompt (at least)")
    p.add_argument("--samples-per-family", type=int, default=DEFAULT_SAMPLES_PER_FAMILY,
                   help="held-out samples per prompt family (at least; 0 = samples-per-prompt for every prompt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default="runs/compare", help="run directories (git-ignored)")
    p.add_argument("--out", default="docs/results/testbed_comparison.md")
    p.add_argument("--skip-training", action="store_true",
                   help="evaluate the runs already under --runs (<runs>/testbed_<method>, e.g. --runs runs for the "
                        "default runs of `engine/train.py --method M`) instead of training them")
    p.add_argument("--reuse-existing", action="store_true",
                   help="reuse a finished run <runs>/testbed_<method> that already has the budget's epochs")
    p.add_argument("--train-only", action="store_true", help="train (or reuse) the runs, evaluate nothing")
    p.add_argument("--jobs", type=int, default=1, help="trainings run at once (wall times then share the CPU)")
    p.add_argument("--base", default=os.path.join(ROOT, "checkpoints", "testbed", "base"),
                   help="base checkpoint every method starts from (copied under --runs first)")
    p.add_argument("--base-cfg", type=float, default=None,
                   help="a row for the base sampled with this CFG scale (default: configs/testbed_crd.yaml's "
                        "crd.cfg_scale, the guided model CRD anchors to; 0 = no such row)")
    args = p.parse_args(argv)
    if args.base_cfg is not None and args.base_cfg < 0:
        p.error(f"--base-cfg must be >= 0, got {args.base_cfg}")
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"--methods: unknown {bad[0]!r}; expected a subset of {','.join(METHODS)}")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from engine.checkpoint import Checkpointer
    from engine.data import load_prompts
    from engine.testbed.eval import _machine, evaluate, format_table, load_context
    from engine.testbed.plots import reward_curve

    runs = os.path.abspath(args.runs)
    base = os.path.join(runs, "base")  # frozen copy: every method starts from (and is compared with) the same base
    started = datetime.datetime.now(datetime.timezone.utc)
    from engine.config import load_config
    crd = load_config(os.path.join(ROOT, "configs", "testbed_crd.yaml"))
    if not args.reward_calls:
        args.reward_calls = crd.train.epochs * crd.data.prompts_per_epoch * crd.data.group_size
    if args.base_cfg is None:
        args.base_cfg = crd.algo.cfg_scale
    cfg_row = f"base_cfg{args.base_cfg:g}" if args.base_cfg not in (0, 1) else None  # 1 would repeat the base row
    targets = {m: epochs_for(m, args.reward_calls)[0] for m in methods}
    reused = [m for m in methods if args.skip_training or (args.reuse_existing and _finished(
        os.path.join(runs, f"testbed_{m}"), targets[m]))]
    todo = {m: (targets[m], os.path.join(runs, f"testbed_{m}")) for m in methods if m not in reused}
    if todo:
        if not os.path.isdir(base):
            shutil.copytree(args.base, base)
        train_methods(todo, base, args.jobs)
    if args.train_only:
        return 0
    info = {m: {**run_budget(os.path.join(runs, f"testbed_{m}")), "wall_s": run_wall_time(
        os.path.join(runs, f"testbed_{m}")), "run": os.path.join(runs, f"testbed_{m}")} for m in methods}

    prompt_set = load_prompts(args.prompts)
    results: dict[str, dict] = {}
    grids = os.path.join(os.path.dirname(os.path.abspath(args.out)), "testbed_grids")
    for i, m in enumerate(methods):
        ckpt = Checkpointer(os.path.join(info[m]["run"], "checkpoints"), dist=None).latest()
        if ckpt is None:
            raise SystemExit(f"[compare] no checkpoint of {m} under {info[m]['run']}/checkpoints")
        ctx, adapter = load_context(ckpt)
        if i == 0:  # the base model, with the same noise as every method
            results["base"] = evaluate(ctx, prompt_set, None, samples_per_prompt=args.samples_per_prompt,
                                       samples_per_family=args.samples_per_family, seed=args.seed,
                                       grid_path=os.path.join(grids, "base.png"))
            if cfg_row:
                results[cfg_row] = evaluate(ctx, prompt_set, None, samples_per_prompt=args.samples_per_prompt,
                                            samples_per_family=args.samples_per_family, seed=args.seed,
                                            grid_path=os.path.join(grids, f"{cfg_row}.png"), cfg_scale=args.base_cfg)
        r = evaluate(ctx, prompt_set, adapter, samples_per_prompt=args.samples_per_prompt,
                     samples_per_family=args.samples_per_family, seed=args.seed,
                     grid_path=os.path.join(grids, f"{m}.png"))
        if info[m]["wall_s"] is not None:
            r["wall_s"] = info[m]["wall_s"]
        results[m] = r
        reward_curve(os.path.join(info[m]["run"], "metrics.jsonl"), os.path.join(grids, f"{m}_reward_curve.png"))
        print(f"[compare] {m}: overall strict accuracy {r['accuracy']['overall']:.3f}", flush=True)

    table = format_table(results)
    budget = ", ".join(f"{m} {info[m]['epochs']} epochs = {info[m]['reward_calls']} reward calls" for m in methods)
    bases = sorted({info[m]["base"] for m in methods})
    parts = []
    if todo:
        parts.append(f"trained by this command ({args.jobs} at a time): {', '.join(todo)}")
    if reused:
        parts.append("existing runs reused: " + ", ".join(f"`{os.path.relpath(info[m]['run'], ROOT)}`"
                                                           for m in reused))
    how = "; ".join(parts)
    text = "\n".join([
        "# Testbed comparison: base vs post-training methods at equal reward-call budgets",
        "",
        f"Command: `python -m engine.testbed.compare {' '.join(sys.argv[1:] if argv is None else argv)}`",
        "",
        f"- Date (UTC): {started:%Y-%m-%d %H:%M}; commit {_git_rev()}",
        f"- Machine: {platform.machine()}, {_machine()} (load average at the end; the machine is shared, so wall "
        "times depend on the load)",
        f"- Budget: {budget} ({how}; base checkpoint: {', '.join(f'`{b}`' for b in bases)})",
        f"- Held-out prompts: `{args.prompts}` ({len(prompt_set.prompts)} prompts, "
        f"{results['base']['num_images']} samples: >= {args.samples_per_prompt} per prompt, >= "
        f"{args.samples_per_family} per family; the same noise for every model)",
        "- Accuracy: GenEval strict correctness per family (RuleDetector); overall = mean over families. reward: "
        "mean partial-credit GenEval reward. Unseen metrics (never optimised): FD = Frechet distance to rendered "
        "scenes in classifier features (lower is better), diversity = mean pairwise RMS pixel distance within a "
        "prompt's samples, off-palette and artifact pixel fractions (lower is better). wall_s = training time.",
        "- base = the pretrained model sampled with the rollout ODE"
        + (f"; {cfg_row} = the same with classifier-free guidance {args.base_cfg:g} (no training: "
           "the guided model CRD's KL anchor pulls toward; CRD and NFT sample without guidance)" if cfg_row else "")
        + "; DIDR = its one-step generator; FDFO = its own sampler steps; GRPO = the rollout ODE with its training "
        "CFG (grpo.cfg_scale, as the official evaluation).",
        "",
        table,
        "",
        f"Sample grids and reward curves: `{os.path.relpath(grids, ROOT)}/`.",
        "",
    ])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
