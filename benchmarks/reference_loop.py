"""Reference-loop baseline: CRD (methods.md section 2) written the way public reference trainers structure a step.

This is the yardstick the engine's speed is measured against (``benchmarks/test_bench_epoch.py``), so it must do
the SAME math with the SAME random draws and give the same losses and weights (``benchmarks/test_reference_loop.py``
checks it against the engine's CRD epoch to fp32 tolerance). Only the structure differs, deliberately, as in the
DiffusionNFT-style trainers CRD's public code descends from:

- rollout per sampling batch, re-encoding that batch's prompts every time (no prompt-embedding cache);
- rewards scored per sampling batch; advantages from a per-prompt Python loop over numpy arrays (a "stat tracker");
- ``theta_old`` velocities recomputed at every micro-step (adapter switched to ``old``), not once per epoch;
- the CFG anchor as two separate forwards (conditional, then unconditional), not one batch;
- the loss in plain, unfused torch ops (``kernels.reference`` math inlined), group centering by a loop over groups;
- ``.item()`` logging after every micro-step;
- a plain ``torch.optim.AdamW`` + ``clip_grad_norm_`` step (no DeepSpeed), ``loss / accumulation`` backward.

What is shared with the engine on purpose, because "same seeds" has to mean the same numbers: the prompt sampler
(``engine.data.GroupSampler``), the per-sample seeded draws (``engine.rollout.sample_noise`` / ``sample_subsets``:
initial noise, training timesteps, training noise), the model (``models``), the reward set and the config.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

STREAM_INIT_NOISE, STREAM_TIMESTEPS, STREAM_TRAIN_NOISE = 0, 1, 2  # same streams as engine/rollout.py


@dataclass
class ReferenceTrainer:
    """Everything the reference loop holds: the model with its adapters, the optimizer, data, rewards, counters."""

    cfg: Any
    model: Any
    optimizer: torch.optim.Optimizer
    params: list
    prompts: Any
    sampler: Any
    rewards: Any
    step: int = 0
    log: list = field(default_factory=list)        # one dict per micro-step (host floats, as reference code logs)
    seconds: dict = field(default_factory=lambda: defaultdict(float))


def build_reference(cfg) -> ReferenceTrainer:
    """A reference trainer for a CRD ``engine.config.Config`` (one process), initialised exactly like the engine:
    the same seed before building the model, so the LoRA initialisation is identical."""
    from engine.data import GroupSampler, load_prompts
    from engine.context import build_model
    from engine.rewards import build_rewards
    from engine.config import to_dict

    if cfg.method != "crd":
        raise ValueError(f"the reference loop implements CRD only, got method {cfg.method!r}")
    if cfg.algo.centering != "group":
        raise ValueError("the reference loop implements exact group centering (crd.centering: group) only")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, ("policy", "old", "sampler")).to(_device())
    with torch.no_grad():
        model.null_cond(1)
    params = [p for p in model.parameters() if p.requires_grad]
    t = cfg.train
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.adam_eps, weight_decay=t.weight_decay)
    prompts = load_prompts(cfg.data.train_prompts, kind=cfg.data.kind or None)
    sampler = GroupSampler(len(prompts), cfg.data.prompts_per_epoch, cfg.data.group_size, 1, 0, cfg.seed,
                           strata=prompts.tag_ids() if cfg.data.balance_tags else None)
    rewards = build_rewards([{**to_dict(r), "key": r.key or None} for r in cfg.rewards])
    return ReferenceTrainer(cfg=cfg, model=model, optimizer=optimizer, params=params, prompts=prompts,
                            sampler=sampler, rewards=rewards)


def _device() -> torch.device:
    """The engine's device rule (engine.distributed.init_distributed): CUDA unless DS_ACCELERATOR=cpu."""
    import os
    use_cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "") != "cpu"
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")


def _encode_uncached(model, prompts):
    """Reference trainers run the text encoder for every sampling batch: drop any cached embeddings first."""
    cache = getattr(model, "prompt_cache", None)
    if cache is not None:
        cache.clear()
    return model.encode(prompts)


def _num_train_timesteps(cfg) -> tuple[int, int]:
    pool = max(1, int(cfg.rollout.num_steps * cfg.train.timestep_fraction))
    return pool, (cfg.train.num_timesteps or pool)


def _lam(schedule: str, step: int) -> float:
    """EMA decay of a ``"start_step-start_value-slope-end_value"`` schedule at optimizer step ``step``."""
    import re
    start_step, start, slope, end = re.split(r"(?<![eE])-", schedule)
    start_step, start, slope, end = int(start_step), float(start), float(slope), float(end)
    return start if step < start_step else min(start + (step - start_step) * slope, end)


def reference_crd_epoch(tr: ReferenceTrainer, epoch: int) -> dict:
    """One CRD epoch in the reference structure; returns ``{"step_losses": [...], "rewards": tensor, ...}``."""
    from engine.rollout import sample_noise, sample_subsets

    cfg, model, o = tr.cfg, tr.model, tr.cfg.algo
    P, G = cfg.data.prompts_per_epoch, cfg.data.group_size
    N = P * G
    m = cfg.train.micro_batch_size
    S = cfg.train.gradient_steps_per_epoch
    pool, K = _num_train_timesteps(cfg)
    if N % (S * m) or m % G:
        raise ValueError(f"reference loop: {N} samples must split into {S} steps of micro-batches of {m} holding "
                         f"whole groups of {G}")
    accumulation = (N // (S * m)) * K
    shape = model.latent_shape(cfg.model.resolution, cfg.model.resolution)
    dev = next(model.parameters()).device

    # ---------------------------------------------------------------------------- sampling (per sampling batch)
    t0 = time.perf_counter()
    batch = tr.sampler.epoch(epoch)
    global_idx = torch.arange(N)
    prompt_idx = batch.all_prompt_idx[global_idx]
    group_ids = batch.all_group_ids[global_idx]
    all_prompts, all_meta = tr.prompts.select(prompt_idx.tolist())
    init_noise = sample_noise(global_idx, shape, seed=cfg.seed, epoch=epoch, stream=STREAM_INIT_NOISE, device=dev)
    sigmas = model.sigmas(cfg.rollout.num_steps).to(dev, torch.float32)
    samples = []
    bs = cfg.rollout.batch_size
    with torch.no_grad():
        for start in range(0, N, bs):
            sl = slice(start, start + bs)
            prompts = all_prompts[sl]
            cond = _encode_uncached(model, prompts).to(dev)
            x = init_noise[sl].float()
            b = x.shape[0]
            for i in range(cfg.rollout.num_steps):  # Euler ODE with the sampler snapshot, no CFG
                v = model.velocity(x, sigmas[i].expand(b), cond, adapter="sampler").float()
                x = x + (sigmas[i + 1] - sigmas[i]) * v
            samples.append({"cond": cond, "x0": x, "prompts": prompts, "metadata": all_meta[sl]})
    tr.seconds["rollout"] += time.perf_counter() - t0

    # ------------------------------------------------------------------ rewards per batch, then the stat tracker
    t0 = time.perf_counter()
    raw = []
    for s in samples:
        scores = tr.rewards.score(model.decode(s["x0"]), s["prompts"], s["metadata"])
        raw.append(scores["reward"].float().cpu())
    tr.seconds["reward"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    rewards = torch.cat(raw)
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("reference loop: a reward is NaN (the reference loop has no bad-reward policy)")
    r_np = rewards.double().numpy().astype(np.float32)
    g_np = group_ids.numpy()
    std = max(float(np.float32(np.sqrt(np.mean(np.square(r_np - r_np.mean()))))), 1e-6) if o.global_std else None
    adv = np.zeros_like(r_np)
    for g in np.unique(g_np):  # per-prompt Python loop, as reference stat trackers do
        members = np.nonzero(g_np == g)[0]
        rg = r_np[members]
        if rg.max() == rg.min():
            continue  # all-equal group: advantage exactly 0
        centered = rg - rg.mean()
        s_g = std if o.global_std else max(float(np.sqrt(np.mean(np.square(centered)))), 1e-6)
        adv[members] = centered / s_g
    adv = np.clip(adv, -o.adv_clip, o.adv_clip)
    r01 = np.clip(0.5 + adv / (2 * o.adv_clip), 0.0, 1.0).astype(np.float32)
    rc = np.zeros_like(r01)
    for g in np.unique(g_np):
        members = np.nonzero(g_np == g)[0]
        rc[members] = r01[members] - r01[members].mean()
    lo, hi = o.reward_range
    scaled = np.nan_to_num(np.clip((r_np - lo) / (hi - lo), 0.0, 1.0), nan=0.5)
    rho = scaled if (o.adaptive_kl and o.rho == "reward") else r01
    if o.adaptive_kl and o.rho == "batch_reward":
        rho = np.full_like(scaled, scaled.mean())
    if not o.adaptive_kl:
        rho = np.ones_like(r01)
    r01_t, rho_t = torch.from_numpy(r01).to(dev), torch.from_numpy(rho.astype(np.float32)).to(dev)
    group_ids = group_ids.to(dev)
    tr.seconds["advantages"] += time.perf_counter() - t0

    # ------------------------------------------------------------------------------------------------ training
    t0 = time.perf_counter()
    x0_all = torch.cat([s["x0"] for s in samples])
    cond_all = type(samples[0]["cond"]).cat([s["cond"] for s in samples])
    choice = sample_subsets(global_idx, pool, K, seed=cfg.seed, epoch=epoch, stream=STREAM_TIMESTEPS).to(dev)
    train_sigma = sigmas[choice]                                                     # [N, K]
    train_eps = sample_noise(global_idx, (K, *shape), seed=cfg.seed, epoch=epoch, stream=STREAM_TRAIN_NOISE,
                             device=dev, dtype=x0_all.dtype)                                     # [N, K, ...]
    step_losses = []
    micro = 0
    for s in range(S):
        losses_this_step = []
        for j in range(N // (S * m)):
            sl = slice((s * (N // (S * m)) + j) * m, (s * (N // (S * m)) + j + 1) * m)
            cond = cond_all.index(sl)
            x0 = x0_all[sl]
            for k in range(K):
                sigma, eps = train_sigma[sl, k], train_eps[sl, k]
                sig = sigma.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
                x_t = (1 - sig) * x0 + sig * eps
                u = eps - x0
                with torch.no_grad():  # theta_old again at every micro-step
                    v_old = model.velocity(x_t, sigma, cond, adapter="old")
                v = model.velocity(x_t, sigma, cond, adapter="policy")
                with torch.no_grad():  # CFG anchor: two separate forwards
                    v_pre_cond = model.velocity(x_t, sigma, cond, adapter="pretrained")
                    v_pre_uncond = model.velocity(x_t, sigma, model.null_cond(x0.shape[0]), adapter="pretrained")
                # unfused loss, plain torch ops
                v32 = v.reshape(v.shape[0], -1).float()
                u32 = u.reshape(u.shape[0], -1).float()
                vo32 = v_old.reshape(v_old.shape[0], -1).float()
                vpc = v_pre_cond.reshape(v.shape[0], -1).float()
                vpu = v_pre_uncond.reshape(v.shape[0], -1).float()
                v_cfg = vpu + o.cfg_scale * (vpc - vpu)
                w_th = (v32 - u32).abs().mean(1).clamp_min(1e-5).detach()
                w_old = (vo32 - u32).abs().mean(1).clamp_min(1e-5)
                log_ratio = (vo32 - u32).square().mean(1) / w_old - (v32 - u32).square().mean(1) / w_th
                kl = (v32 - v_cfg).square().mean(1)
                gids = group_ids[sl]
                r_mb, rho_mb = r01_t[sl], rho_t[sl]
                lc = torch.zeros_like(log_ratio)
                rc_mb = torch.zeros_like(r_mb)
                for g in torch.unique(gids).tolist():  # group centering, one group at a time
                    idx = torch.nonzero(gids == g).squeeze(1)
                    lc = lc.index_put((idx,), log_ratio[idx] - log_ratio[idx].detach().mean())
                    rc_mb[idx] = r_mb[idx] - r_mb[idx].mean()
                e = o.beta * lc - rc_mb
                loss_crd = (o.adv_clip / o.beta) * e.square().mean()
                kl_coef = o.kl_min + (o.kl_beta - o.kl_min) * rho_mb
                loss = loss_crd + (kl_coef * kl).mean()
                (loss / accumulation).backward()
                micro += 1
                rec = {"loss": loss.item(), "log_ratio": log_ratio.mean().item(), "kl": kl.mean().item()}
                tr.log.append(rec)  # host sync every micro-step, as reference trainers log
                losses_this_step.append(rec["loss"])
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(tr.params, cfg.train.grad_clip)
        tr.optimizer.step()
        tr.optimizer.zero_grad(set_to_none=True)
        tr.step += 1
        step_losses.append(float(np.mean(losses_this_step)))
    tr.seconds["train"] += time.perf_counter() - t0

    # ------------------------------------------------------------------------------------------- EMA snapshots
    with torch.no_grad():
        policy = model.adapters.params("policy")
        for name, schedule in (("old", o.old_schedule), ("sampler", o.sampler_schedule)):
            lam = _lam(schedule, tr.step)
            for key, p in model.adapters.params(name).items():
                p.mul_(lam).add_(policy[key], alpha=1.0 - lam)
    return {"step_losses": step_losses, "rewards": rewards, "r01": r01_t, "micro_steps": micro}
