"""Known-answer metrics: a model's samples per prompt measured against the exact optimum ``p* = p_ref exp(R/beta)/Z``.

Per prompt of the world, at fixed noise (the same for every model and every call):

- ``reward``: the Monte Carlo ``E[R]`` of the model's samples (``reward_se`` its standard error) against the exact
  ``E_{p*}[R]`` (``exact_reward``, closed form) and ``E_{p_ref}[R]`` (``ref_reward``); ``overshoot = reward -
  exact_reward`` (> 0: past the KL-regularised optimum, i.e. reward hacking relative to the target);
- ``sw2``: sliced W2 between the samples and as many exact ``p*`` samples; ``noise_floor``: the SW2 between two exact
  ``p*`` sample sets of that count (one pair: a noisy statistic; :func:`model_floor` averages several);
- ``occupancy``: the fraction of the samples nearest each of ``p*``'s component means, against the same for exact
  ``p*`` samples (``exact_occupancy``; ``weights`` are ``p*``'s weights); ``occupancy_error`` = the total variation
  distance between the two occupancies;
- :func:`model_floor`: the SW2 of the PRETRAINED network's samples to exact ``p_ref`` samples: the network's own
  fitting error, below which no fine-tuned model can be expected to come.

The samplers are plain callables ``(noise [n, d], prompts) -> x0 [n, d]``: :func:`ode_sampler` (a deterministic
Euler ODE with the model's own sigmas) and :func:`method_sampler` (a run's ``method.eval_sample``: CRD/NFT the rollout
ODE, FDFO its own step count, DIDR the one-step generator).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from models.gmm import PromptWorld
from models.gmm_world import Mixture, occupancy, sliced_wasserstein

Sampler = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]


def fixed_noise(n: int, dim: int, seed: int = 0, prompt_index: int = 0) -> torch.Tensor:
    """``[n, dim]`` standard normal noise, fixed by (seed, prompt index)."""
    g = torch.Generator().manual_seed(1_000_003 * seed + 7919 * prompt_index + 17)
    return torch.randn(n, dim, generator=g, dtype=torch.float32)


def exact_samples(mix: Mixture, n: int, seed: int = 0, salt: int = 0) -> torch.Tensor:
    return mix.sample(n, torch.Generator().manual_seed(90_001 * seed + 31 * salt + 5))


@torch.no_grad()
def ode_sampler(flow, *, adapter: str = "policy", steps: int = 10, cfg_scale: float = 1.0) -> Sampler:
    """Deterministic Euler ODE of ``flow`` (a FlowModel or the engine's proxy) with its own ``sigmas(steps)``."""
    from models.samplers import sample_ode

    def sample(noise: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        cond = flow.encode(list(prompts))
        sig = flow.sigmas(steps).to(torch.float32)
        with torch.no_grad():
            return sample_ode(flow, noise, cond, sig, adapter=adapter, cfg_scale=cfg_scale).float()
    return sample


def method_sampler(ctx, adapter: str = "policy") -> Sampler:
    """The run's own evaluation sampler ``ctx.method.eval_sample`` (the one-step generator for DIDR)."""
    def sample(noise: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        dev = ctx.dist.device
        cond = ctx.model.encode(list(prompts)).to(dev)
        with torch.no_grad():
            return ctx.method.eval_sample(ctx, noise.to(dev), cond, adapter).float().cpu()
    return sample


def _tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return float(0.5 * (p - q).abs().sum())


@torch.no_grad()
def prompt_metrics(x: torch.Tensor, pw: PromptWorld, beta: float, *, seed: int = 0, salt: int = 0,
                   projections: int = 256) -> dict:
    """The metrics of one prompt's samples ``x [n, d]`` against ``p*`` at temperature ``beta`` (reward units)."""
    x = x.detach().to(torch.float64).cpu()
    n = x.shape[0]
    target = pw.target(beta)
    r = pw.reward(x)
    finite = torch.isfinite(x).all(1)
    ex = exact_samples(target, n, seed, 2 * salt)
    ex2 = exact_samples(target, n, seed, 2 * salt + 1)
    occ = occupancy(x[finite], target.means) if bool(finite.any()) else torch.full_like(target.weights, float("nan"))
    occ_exact = occupancy(ex, target.means)
    reward = float(r[finite].mean()) if bool(finite.any()) else float("nan")
    exact = pw.expected_reward(target)
    return {
        "reward": reward,
        "reward_se": float(r[finite].std() / math.sqrt(max(1, int(finite.sum())))) if int(finite.sum()) > 1 else 0.0,
        "exact_reward": exact,
        "ref_reward": pw.expected_reward(pw.mixture),
        "overshoot": reward - exact,
        "sw2": sliced_wasserstein(x, ex, projections=projections, seed=seed) if bool(finite.all()) else float("nan"),
        "noise_floor": sliced_wasserstein(ex2, ex, projections=projections, seed=seed),
        "occupancy": occ.tolist(),
        "exact_occupancy": occ_exact.tolist(),
        "weights": target.weights.tolist(),
        "occupancy_error": _tv(occ, occ_exact),
        "finite_fraction": float(finite.double().mean()),
        "n": n,
    }


@torch.no_grad()
def evaluate(sample: Sampler, world: Sequence[PromptWorld], beta: float, *, n: int = 1024, seed: int = 0,
             projections: int = 256) -> dict:
    """``{prompt: prompt_metrics}`` plus ``"mean"`` (the prompt means of the scalar metrics) for ``sample`` at fixed
    noise (``n`` samples per prompt) against ``p*`` at ``beta``."""
    out = {}
    for i, pw in enumerate(world):
        x = sample(fixed_noise(n, pw.mixture.dim, seed, i), [pw.prompt] * n)
        out[pw.prompt] = prompt_metrics(x, pw, beta, seed=seed, salt=i, projections=projections)
    out["mean"] = mean_of(out)
    return out


def mean_of(per_prompt: dict) -> dict:
    keys = ("reward", "exact_reward", "overshoot", "sw2", "noise_floor", "occupancy_error")
    rows = [v for k, v in per_prompt.items() if k != "mean"]
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}


@torch.no_grad()
def model_floor(flow, world: Sequence[PromptWorld] | None = None, *, adapter: str = "pretrained", steps: int = 10,
                n: int = 1024, seed: int = 0, projections: int = 256, noise_pairs: int = 8) -> dict:
    """Per prompt, the SW2 of ``flow``'s ``adapter`` ODE samples (the pretrained NETWORK: set
    ``model.size.teacher: network``, the default, for its own fit) to exact ``p_ref`` samples, and the noise floor
    at that count: the mean SW2 of ``noise_pairs`` pairs of exact sample sets (one pair is a noisy statistic: at
    n = 4096 it ranges over 0.02-0.11 between seeds); ``"mean"`` over prompts."""
    world = world if world is not None else flow.world
    if getattr(flow, "adapters", None) is None:  # a bare FlowModel (GMMFlow.pretrained()): its frozen network only
        flow.attach_adapters(("policy",), mode="full")
    sample = ode_sampler(flow, adapter=adapter, steps=steps)
    out = {}
    for i, pw in enumerate(world):
        x = sample(fixed_noise(n, pw.mixture.dim, seed, i), [pw.prompt] * n).double()
        ex = exact_samples(pw.mixture, n, seed, 2 * i)
        noise = [sliced_wasserstein(exact_samples(pw.mixture, n, seed + 1 + j, 2 * i),
                                    exact_samples(pw.mixture, n, seed + 1 + j, 2 * i + 1),
                                    projections=projections, seed=seed) for j in range(noise_pairs)]
        out[pw.prompt] = {"floor": sliced_wasserstein(x, ex, projections=projections, seed=seed),
                          "noise_floor": sum(noise) / len(noise),
                          "reward": float(pw.reward(x).mean()), "ref_reward": pw.expected_reward(pw.mixture)}
    rows = list(out.values())
    out["mean"] = {k: sum(r[k] for r in rows) / len(rows) for k in ("floor", "noise_floor")}
    return out
