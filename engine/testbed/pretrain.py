"""Seeded flow-matching pretraining of the testbed base model on rendered scenes of the TRAIN prompt families.

Every step draws a fresh batch: a family uniformly at random per sample, a train-split prompt of that family, a
random scene satisfying it (rendered), noise and a sigma (uniform by default); the loss is the flow-matching MSE
``|v(x_sigma, c, sigma) - (eps - x0)|^2`` (spec/methods.md convention). The text encoder is trained too; 10% of the
prompts are dropped to "" so the model has an unconditional branch for CFG. Batches depend only on (seed, step),
so a resumed run replays exactly the batches an uninterrupted one would have seen.

The checkpoint written to ``--out`` is the EMA of the weights (``TestbedModel.save_pretrained`` layout, text encoder
frozen on load); the resumable training state (weights, EMA, optimizer, step) lives in ``--state-dir``; both are
written atomically. Every ``--eval-every`` steps the EMA model samples the held-out test prompts with a 10-step Euler
ODE, no CFG, and the rule detector scores them with GenEval's strict rules (per-family accuracy printed, snapshot kept
under ``<state-dir>/evals/step_N``).

    python -m engine.testbed.pretrain --out checkpoints/testbed/base    # the committed base: 8000 steps x 64, ~60 min
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Sequence

import numpy as np
import torch

from engine.data import load_prompts
from engine.rewards.geneval_rules import score_detections
from engine.testbed import world
from engine.testbed.detector import RuleDetector
from engine.testbed.world import FamilyBalancedPrompts
from models.samplers import sample_ode
from models.testbed import TestbedConfig, TestbedModel

#: the testbed base model's architecture: patch 4 (64 image tokens), width 256 (9.0M transformer parameters): a
#: batch-64 step is ~0.4 s on 2 idle CPU cores with bf16 autocast. Measured 2026-11-22 at equal wall time (8.5 min,
#: 1 thread): width 256 reached loss 0.147 vs 0.167 for width 128; patch 2 was 2.5x slower per step than either.
BASE_MODEL = dict(patch_size=4, num_layers=4, num_attention_heads=4, attention_head_dim=64, text_width=128,
                  text_layers=2, text_heads=4, text_intermediate=256, max_length=12)


@dataclass
class PretrainConfig:
    """Options of ``python -m engine.testbed.pretrain`` (every one has a working default)."""

    out: str = "checkpoints/testbed/base"
    state_dir: str = ""  # default: runs/pretrain/<basename of out>
    steps: int = 8000  # length of the LR schedule
    stop_after: int = 0  # stop (and write --out) after this many steps; 0 = run all --steps
    seed: int = 0
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1
    #: "logit_normal" (SD3's default; rarely samples sigma > 0.9) or "uniform" (trains the high-noise steps where the
    #: prompt decides colours and layout as often as the rest)
    sigma_sampling: str = "uniform"
    #: initialise from a TestbedModel directory (a second stage) instead of random weights
    init_from: str = ""
    train_prompts: str = "data/testbed/train.jsonl"
    eval_prompts: str = "data/testbed/test.jsonl"
    eval_every: int = 1000
    eval_samples_per_prompt: int = 2
    eval_steps: int = 10
    save_every: int = 500
    log_every: int = 100
    threads: int = 2
    #: bf16 autocast of the forward (weights, optimizer and loss stay fp32): ~1.8x faster on CPUs with AVX512-BF16
    #: for the 256-wide model, harmless elsewhere; "none" runs everything in fp32
    autocast: str = "bf16"
    #: dtype of the weights written to --out (the resumable state in --state-dir stays fp32): fp16 halves the
    #: committed checkpoint and loads back as fp32 (``TestbedModel.from_pretrained``)
    save_dtype: str = "fp16"
    resume: bool = True
    model: dict = field(default_factory=lambda: dict(BASE_MODEL))


# ------------------------------------------------------------------------------------------------------ data
def make_batch(prompts: FamilyBalancedPrompts, step: int, cfg: PretrainConfig
               ) -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Tensor]:
    """The batch of ``step`` (a pure function of (seed, step)): images x0 in [0, 1], prompts (some dropped to ""),
    noise and sigmas."""
    rng = np.random.default_rng([cfg.seed, step])
    metas = prompts.draw(rng, cfg.batch_size)
    images, _ = world.render_metadata(metas, seed=int(rng.integers(2 ** 62)))
    drop = rng.random(cfg.batch_size) < cfg.cfg_dropout
    texts = ["" if d else m["prompt"] for m, d in zip(metas, drop)]
    gen = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
    eps = torch.randn(images.shape, generator=gen)
    if cfg.sigma_sampling == "uniform":
        sigma = torch.rand(cfg.batch_size, generator=gen)
    else:
        sigma = torch.sigmoid(torch.randn(cfg.batch_size, generator=gen))  # logit-normal(0, 1), SD3's default
    return images, texts, eps, sigma


# ------------------------------------------------------------------------------------------------------ eval
@torch.no_grad()
def generate(model: TestbedModel, prompts: Sequence[str], *, seed: int, steps: int = 10, adapter: str = "policy",
             batch_size: int = 128) -> torch.Tensor:
    """Images [N, 3, 32, 32] in [0, 1] from the deterministic Euler ODE, no CFG, noise seeded by ``seed``."""
    size = model.config.sample_size
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(prompts), model.config.channels, size, size, generator=gen)
    sigmas = model.sigmas(steps)
    out = []
    for i in range(0, len(prompts), batch_size):
        cond = model.encode(list(prompts[i:i + batch_size]))
        x0 = sample_ode(model, noise[i:i + batch_size], cond, sigmas, adapter=adapter)
        out.append(model.decode(x0))
    return torch.cat(out) if out else noise[:0]


def strict_accuracy(model: TestbedModel, metadata: Sequence[dict], *, seed: int = 0, samples_per_prompt: int = 2,
                    steps: int = 10, detector: RuleDetector | None = None) -> dict[str, float]:
    """GenEval strict accuracy of ``model`` on ``metadata`` (10-step Euler, no CFG, rule detector):
    ``{family: accuracy, ..., "overall": mean over families, "per_prompt": mean over all samples}``."""
    metas = [m for m in metadata for _ in range(samples_per_prompt)]
    images = generate(model, [m["prompt"] for m in metas], seed=seed, steps=steps)
    dets = (detector or RuleDetector()).detect(images)
    scores = np.asarray([score_detections(d, m, strict=True) for d, m in zip(dets, metas)])
    tags = np.asarray([m["tag"] for m in metas])
    out = {fam: float(scores[tags == fam].mean()) for fam in world.FAMILIES if (tags == fam).any()}
    out["overall"] = float(np.mean([out[f] for f in world.FAMILIES if f in out]))
    out["per_prompt"] = float(scores.mean())
    return out


# ---------------------------------------------------------------------------------------------- checkpoints
def _atomic_dir_write(final: str, write) -> None:
    """``write(tmp_dir)`` then swap it into place (the previous ``final`` stays valid until the rename)."""
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{final.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    for root, _, files in os.walk(tmp):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    old = f"{final.rstrip('/')}.old-{os.getpid()}"
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def save_model(model: TestbedModel, path: str, extra: dict | None = None, dtype: str = "fp32") -> None:
    """Atomically save ``model`` as a ``TestbedModel`` directory (text encoder marked frozen for RL) with weights in
    ``dtype``, keeping any files in ``path`` that are not the model's (e.g. README.md)."""
    if SAVE_DTYPES[dtype] != torch.float32:
        model = copy.deepcopy(model).to(SAVE_DTYPES[dtype])

    def write(tmp):
        was = model.config.train_text_encoder
        model.config.train_text_encoder = False
        try:
            model.save_pretrained(tmp)
        finally:
            model.config.train_text_encoder = was
        if extra is not None:
            with open(os.path.join(tmp, "pretrain.json"), "w") as f:
                json.dump(extra, f, indent=2, sort_keys=True)
        if os.path.isdir(path):
            for name in os.listdir(path):
                if not os.path.exists(os.path.join(tmp, name)):
                    src = os.path.join(path, name)
                    (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(tmp, name))
    _atomic_dir_write(path, write)


def _save_state(state_dir: str, step: int, model, ema, opt) -> None:
    os.makedirs(state_dir, exist_ok=True)
    path = os.path.join(state_dir, "state.pt")
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save({"step": step, "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict()}, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------ train
def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def build_model(cfg: PretrainConfig) -> TestbedModel:
    """A fresh model from ``cfg.model`` (seeded), or the weights of ``cfg.init_from``; text encoder trainable."""
    if cfg.init_from:
        model = TestbedModel.from_pretrained(cfg.init_from)
        model.set_text_encoder_trainable(True)
        return model
    model_cfg = TestbedConfig.from_dict({**cfg.model, "train_text_encoder": True})
    return TestbedModel.from_config(model_cfg, world.vocabulary_words(), seed=cfg.seed)


def pretrain(cfg: PretrainConfig) -> dict:
    """Run (or resume) pretraining; returns the last evaluation's accuracies."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    state_dir = cfg.state_dir or os.path.join("runs", "pretrain", os.path.basename(os.path.normpath(cfg.out)))
    prompts = FamilyBalancedPrompts(load_prompts(cfg.train_prompts, kind="geneval").metadata)
    eval_meta = load_prompts(cfg.eval_prompts, kind="geneval").metadata
    model = build_model(cfg).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    start = 0
    state_file = os.path.join(state_dir, "state.pt")
    if cfg.resume and os.path.isfile(state_file):
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        print(f"resumed from {state_file} at step {start}", flush=True)
    ema_params = [p for p in ema.parameters()]
    model_params = [p for p in model.parameters()]
    history_file = os.path.join(state_dir, "history.jsonl")
    os.makedirs(state_dir, exist_ok=True)
    run_info = {"config": asdict(cfg), "command": " ".join(["python -m engine.testbed.pretrain", *sys.argv[1:]])}
    t0, last = time.time(), {}
    loss_acc, n_acc = 0.0, 0
    end = min(cfg.steps, cfg.stop_after) if cfg.stop_after > 0 else cfg.steps
    for step in range(start, end):
        images, texts, eps, sigma = make_batch(prompts, step, cfg)
        x0 = TestbedModel.encode_images(images)
        s = sigma[:, None, None, None]
        x_t = (1 - s) * x0 + s * eps
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.autocast == "bf16"):
            v = model.velocity(x_t, sigma, model.encode(texts))
        loss = (v.float() - (eps - x0)).pow(2).mean()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, model_params, 1 - decay)
        loss_acc += float(loss.detach())  # once per optimizer step (pretraining has no micro-steps)
        n_acc += 1
        done = step + 1
        if done % cfg.log_every == 0 or done == end:
            rate = (done - start) / (time.time() - t0)
            print(f"step {done}/{end} loss {loss_acc / n_acc:.4f} lr {lr_at(step, cfg):.2e} "
                  f"{rate:.2f} it/s eta {(end - done) / rate / 60:.1f} min", flush=True)
            with open(history_file, "a") as f:
                f.write(json.dumps({"step": done, "loss": loss_acc / n_acc, "wall_s": time.time() - t0}) + "\n")
            loss_acc, n_acc = 0.0, 0
        if done % cfg.save_every == 0 or done == end:
            _save_state(state_dir, done, model, ema, opt)
            save_model(ema, cfg.out, {**run_info, "step": done}, dtype=cfg.save_dtype)
        if cfg.eval_every and (done % cfg.eval_every == 0 or done == end):
            te = time.time()
            last = strict_accuracy(ema, eval_meta, seed=cfg.seed, samples_per_prompt=cfg.eval_samples_per_prompt,
                                   steps=cfg.eval_steps)
            print(f"eval step {done}: " + " ".join(f"{k} {v:.3f}" for k, v in last.items()) +
                  f" ({time.time() - te:.0f}s)", flush=True)
            with open(history_file, "a") as f:
                f.write(json.dumps({"step": done, "eval": last}) + "\n")
            save_model(ema, os.path.join(state_dir, "evals", f"step_{done}"), {**run_info, "step": done,
                                                                             "eval": last})
    return last


def parse_args(argv: Sequence[str] | None = None) -> PretrainConfig:
    """CLI -> PretrainConfig (``--model key=value`` overrides the architecture, e.g. ``--model num_layers=6``)."""
    parser = argparse.ArgumentParser(prog="python -m engine.testbed.pretrain",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = PretrainConfig()
    for f in fields(PretrainConfig):
        if f.name == "model":
            continue
        val = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(val, bool):
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=val)
        else:
            parser.add_argument(flag, type=type(val), default=val)
    parser.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE",
                        help=f"architecture overrides of {BASE_MODEL}")
    args = parser.parse_args(argv)
    model = dict(BASE_MODEL)
    for item in args.model:
        if "=" not in item:
            raise ValueError(f"--model expects KEY=VALUE items, got {item!r}")
        key, val = item.split("=", 1)
        if key not in {f.name for f in fields(TestbedConfig)}:
            raise ValueError(f"--model: unknown TestbedConfig key {key!r}")
        model[key] = json.loads(val) if val.replace(".", "", 1).lstrip("-").isdigit() else val
    kw = {f.name: getattr(args, f.name) for f in fields(PretrainConfig) if f.name != "model"}
    cfg = PretrainConfig(**kw, model=model)
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ValueError("--steps and --batch-size must be >= 1")
    if cfg.save_dtype not in SAVE_DTYPES:
        raise ValueError(f"--save-dtype must be one of {sorted(SAVE_DTYPES)}, got {cfg.save_dtype!r}")
    if cfg.autocast not in ("bf16", "none"):
        raise ValueError(f"--autocast must be 'bf16' or 'none', got {cfg.autocast!r}")
    if cfg.sigma_sampling not in ("logit_normal", "uniform"):
        raise ValueError(f"--sigma-sampling must be 'logit_normal' or 'uniform', got {cfg.sigma_sampling!r}")
    return cfg


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_args(argv)
    t0 = time.time()
    result = pretrain(cfg)
    print(f"done in {(time.time() - t0) / 60:.1f} min; last eval: {json.dumps(result)}", flush=True)


if __name__ == "__main__":
    main()
