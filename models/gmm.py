"""The known-answer model family (``model.family: gmm``): a flow model of a world whose optimum is known in closed form.

Each prompt ``c`` of a world (:data:`WORLDS`) has its own reference ``p_ref(x|c)``, an isotropic Gaussian mixture in
``R^d`` (d = 2 by default, up to 16), and its own reward with a closed-form tilt (linear, quadratic or flat; see
:mod:`models.gmm_world`), so ``Z(c)`` differs per prompt and within-prompt centering matters. The "images" are the
``d``-vectors themselves (``decode`` is the identity): the world's rewards (``engine.known_answer.rewards``) read them.

- Network: a small MLP ``v(x, sigma, c)`` (sin/cos features of sigma, a one-hot prompt; the null prompt is all
  zeros, learned with 10% prompt dropout so CFG works) pretrained by flow matching on EXACT samples of ``p_ref``:
  seeded, ~10 s on a 2-core CPU, cached under ``$RLFLOW_CACHE`` (default ``~/.cache/rlflow``) by a hash of the
  settings. Its distance to ``p_ref`` is the model's own floor the comparison reports.
- ``teacher: exact`` makes the ``pretrained`` adapter (the anchor of CRD/NFT, DIDR's teacher) return the EXACT
  velocity ``E[eps - x0 | x_sigma]`` of the prompt's mixture (the null prompt: the equal-weight mixture of all the
  world's prompts), a teacher with no fitting error; ``network`` (default) uses the frozen pretrained MLP.

Settings are ``model.size`` (:class:`GMMSettings`); ``model.path``/``resolution`` are unused (the latent is ``[d]``).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import nn

from models.base import Cond, FlowModel, as_sigma_batch
from models.gmm_world import Mixture
from models.samplers import flow_match_sigmas

MAX_DIM = 16
POOL = 100_000  # exact samples per prompt the pretraining draws its batches from


# ------------------------------------------------------------------------------------------------------ the worlds
@dataclass(frozen=True)
class PromptWorld:
    """One prompt of a world: its reference mixture and its reward ``kind`` with parameters:
    ``linear`` (``R = a . x``), ``quadratic`` (``R = -c |x - m|^2``) or ``flat`` (``R = 0``)."""

    prompt: str
    mixture: Mixture
    kind: str
    a: tuple = ()
    c: float = 0.0
    m: tuple = ()

    def reward(self, x: torch.Tensor) -> torch.Tensor:
        """``R(x)`` for ``x [N, d]`` (differentiable; in ``x``'s dtype)."""
        if self.kind == "linear":
            return x @ torch.as_tensor(self.a, dtype=x.dtype, device=x.device)
        if self.kind == "quadratic":
            return -self.c * (x - torch.as_tensor(self.m, dtype=x.dtype, device=x.device)).square().sum(-1)
        return x.sum(-1) * 0.0

    def target(self, beta: float) -> Mixture:
        """The exact ``p* = p_ref exp(R / beta) / Z`` (reward units)."""
        if self.kind == "linear":
            return self.mixture.tilt_linear(self.a, beta)
        if self.kind == "quadratic":
            return self.mixture.tilt_quadratic(self.c, self.m, beta)
        return self.mixture

    def expected_reward(self, mix: Mixture) -> float:
        """``E_mix[R]`` in closed form."""
        if self.kind == "linear":
            return mix.expected_linear(self.a)
        if self.kind == "quadratic":
            return mix.expected_quadratic(self.c, self.m)
        return 0.0


def _components(dim: int, k: int, gen: torch.Generator, radius: float = 1.5) -> torch.Tensor:
    """``k`` means on a circle (d = 2: evenly spaced) or random on a sphere of ``radius`` (d > 2), seeded."""
    if dim == 2:
        ang = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k) + 0.3
        return radius * torch.stack([ang.cos(), ang.sin()], 1)
    mu = torch.randn(k, dim, generator=gen, dtype=torch.float64)
    return radius * mu / mu.norm(dim=1, keepdim=True)


def _direction(dim: int, gen: torch.Generator) -> torch.Tensor:
    if dim == 2:
        return torch.tensor([0.8, 0.6], dtype=torch.float64)
    a = torch.randn(dim, generator=gen, dtype=torch.float64)
    return a / a.norm()


def build_world(name: str, dim: int = 2) -> list[PromptWorld]:
    """The named world in ``dim`` dimensions (deterministic):

    - ``one``: one prompt, a 3-component mixture (weights 0.5/0.3/0.2), linear reward of unit slope;
    - ``several``: three prompts with their own mixtures: ``tilt`` (linear, slope 1), ``bowl`` (quadratic towards a
      point between two components) and ``flat`` (no reward: its ``p*`` is ``p_ref``; a method must leave it alone);
    - ``steep``: one prompt, linear reward of slope 3 (a strong tilt, for reward hacking).
    """
    if not 1 <= dim <= MAX_DIM:
        raise ValueError(f"known-answer world dimension must be in [1, {MAX_DIM}], got {dim}")
    gen = torch.Generator().manual_seed(1234 + dim)
    a = _direction(dim, gen) if dim > 1 else torch.ones(1, dtype=torch.float64)

    def mix(k, weights, std, shift=0.0):
        mu = _components(dim, k, gen) if dim > 1 else torch.linspace(-1.5, 1.5, k, dtype=torch.float64)[:, None]
        return Mixture.of(weights, mu + shift, std)

    if name == "one":
        return [PromptWorld("tilt", mix(3, [0.5, 0.3, 0.2], 0.35), "linear", a=tuple(a.tolist()))]
    if name == "steep":
        return [PromptWorld("tilt", mix(3, [0.5, 0.3, 0.2], 0.35), "linear", a=tuple((3 * a).tolist()))]
    if name == "several":
        tilt = mix(3, [0.5, 0.3, 0.2], 0.35)
        bowl = mix(2, [0.7, 0.3], 0.3)
        flat = mix(4, [0.25, 0.25, 0.25, 0.25], 0.3)
        m = tuple((0.5 * (bowl.means[0] + bowl.means[1])).tolist())
        return [PromptWorld("tilt", tilt, "linear", a=tuple(a.tolist())),
                PromptWorld("bowl", bowl, "quadratic", c=0.5, m=m),
                PromptWorld("flat", flat, "flat")]
    raise ValueError(f"unknown known-answer world {name!r}; worlds: {', '.join(WORLDS)}")


WORLDS = ("one", "several", "steep")


def unconditional(world: Sequence[PromptWorld]) -> Mixture:
    """The null prompt's reference: the equal-weight mixture of every prompt's mixture."""
    P = len(world)
    return Mixture.of(torch.cat([w.mixture.weights / P for w in world]), torch.cat([w.mixture.means for w in world]),
                      torch.cat([w.mixture.stds for w in world]))


# ------------------------------------------------------------------------------------------------------ the model
@dataclass
class GMMSettings:
    """``model.size`` of the gmm family."""

    world: str = "several"
    dim: int = 2
    hidden: int = 128
    layers: int = 3
    time_features: int = 16
    pretrain_steps: int = 2000
    pretrain_batch: int = 1024
    pretrain_lr: float = 2e-3
    prompt_dropout: float = 0.1
    teacher: str = "network"  # network | exact: what the "pretrained" adapter returns

    @classmethod
    def from_dict(cls, d: dict) -> "GMMSettings":
        from engine.errors import ConfigError
        from engine.options import build_dataclass
        s = build_dataclass(cls, d, "model.size")  # unknown keys and wrong types: one sentence naming the key
        if s.teacher not in ("network", "exact"):
            raise ConfigError(f"config key 'model.size.teacher' must be network or exact, got {s.teacher!r}")
        if s.world not in WORLDS:
            raise ConfigError(f"config key 'model.size.world' must be one of {', '.join(WORLDS)}, got {s.world!r}")
        if not 1 <= s.dim <= MAX_DIM:
            raise ConfigError(f"config key 'model.size.dim' must be in [1, {MAX_DIM}], got {s.dim}")
        return s


class VelocityMLP(nn.Module):
    """``v(x, sigma, c)``: ``[x, sin/cos(sigma), one-hot c] -> hidden (SiLU) x layers -> d``; layers named
    ``fc_in``, ``fc_1``.., ``fc_out`` (LoRA targets)."""

    def __init__(self, dim: int, prompts: int, hidden: int, layers: int, time_features: int) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(100.0), time_features // 2)),
                             persistent=False)
        self.fc_in = nn.Linear(dim + time_features + prompts, hidden)
        self.hidden = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers - 1))
        self.fc_out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        ang = sigma[:, None].to(x.dtype) * self.freqs.to(x.dtype)[None]
        h = nn.functional.silu(self.fc_in(torch.cat([x, ang.sin(), ang.cos(), onehot.to(x.dtype)], dim=1)))
        for layer in self.hidden:
            h = nn.functional.silu(layer(h))
        return self.fc_out(h)


class GMMFlow(FlowModel):
    """The known-answer world's flow model behind the ``FlowModel`` protocol (see the module docstring)."""

    adapted_attr = "transformer"

    def __init__(self, settings: GMMSettings, network: VelocityMLP) -> None:
        super().__init__()
        self.settings = settings
        self.world = build_world(settings.world, settings.dim)
        self.prompt_index = {w.prompt: i for i, w in enumerate(self.world)}
        self.uncond = unconditional(self.world)
        self.transformer = network

    @classmethod
    def load(cls, model_cfg, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> "GMMFlow":
        return cls.pretrained(GMMSettings.from_dict(dict(model_cfg.size)), seed=seed).to(dtype)

    @classmethod
    def pretrained(cls, settings: GMMSettings | None = None, *, seed: int = 0, cache: bool = True) -> "GMMFlow":
        """The MLP pretrained by flow matching on exact samples (from the cache when it holds these settings)."""
        settings = settings or GMMSettings()
        world = build_world(settings.world, settings.dim)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = VelocityMLP(settings.dim, len(world), settings.hidden, settings.layers, settings.time_features)
        key = hashlib.sha256(json.dumps({**asdict(settings), "teacher": None, "seed": seed},
                                        sort_keys=True).encode()).hexdigest()[:16]
        path = os.path.join(os.environ.get("RLFLOW_CACHE", os.path.expanduser("~/.cache/rlflow")), "gmm",
                            f"{key}.pt")
        if cache and os.path.isfile(path):
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        else:
            pretrain(net, world, settings, seed=seed)
            if cache:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}.{os.getpid()}.tmp"
                torch.save(net.state_dict(), tmp)
                os.replace(tmp, path)  # atomic: concurrent ranks never read half a file
        return cls(settings, net.eval())

    # ------------------------------------------------------------------------------------------------ text side
    def encode(self, prompts: Sequence[str], ids=None) -> Cond:
        if isinstance(prompts, str):
            raise ValueError("encode expects a list of prompts, got a single string")
        unknown = sorted({p for p in prompts if p not in self.prompt_index and p != ""})
        if unknown:
            raise ValueError(f"prompts {unknown[:3]} are not in the known-answer world {self.settings.world!r} "
                             f"(its prompts: {', '.join(self.prompt_index)})")
        idx = torch.tensor([self.prompt_index.get(p, -1) for p in prompts], dtype=torch.long)
        return self._cond(idx)

    def _cond(self, idx: torch.Tensor) -> Cond:
        dev = self.transformer.fc_in.weight.device
        idx = idx.to(dev)
        onehot = torch.zeros(idx.shape[0], len(self.world), device=dev)
        real = idx >= 0
        onehot[real.nonzero().squeeze(1), idx[real]] = 1.0
        return Cond(embeds=onehot[:, None], pooled=onehot, extra={"prompt_index": idx})

    def null_cond(self, n: int) -> Cond:
        return self._cond(torch.full((n,), -1, dtype=torch.long))

    # ------------------------------------------------------------------------------------------------ the network
    def velocity(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Cond, *, adapter: str = "policy"
                 ) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.settings.dim:
            raise ValueError(f"x must be [B, {self.settings.dim}], got {tuple(x.shape)}")
        if len(cond) != x.shape[0]:
            raise ValueError(f"cond has {len(cond)} rows for a batch of {x.shape[0]} latents")
        sig = as_sigma_batch(sigma, x.shape[0], x)
        if adapter == "pretrained" and self.settings.teacher == "exact":
            return self.exact_velocity(x, sig, cond.extra["prompt_index"]).to(x.dtype)
        dtype = self.transformer.fc_in.weight.dtype
        with self.adapters.use(adapter) as net:
            return net(x.to(dtype), sig, cond.pooled)

    def exact_velocity(self, x: torch.Tensor, sigma: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        """``E[eps - x0 | x_sigma = x, c]`` of each row's prompt mixture (index -1: the unconditional one), fp64."""
        out = torch.empty(x.shape, dtype=torch.float64, device=x.device)
        for i, mix in enumerate([w.mixture for w in self.world] + [self.uncond]):
            rows = (prompt_index == (i if i < len(self.world) else -1)).nonzero().squeeze(1)
            if rows.numel():
                out[rows] = mix.velocity(x[rows].double().cpu(), sigma[rows].double().cpu()).to(x.device)
        return out

    def sigmas(self, num_steps: int) -> torch.Tensor:
        return flow_match_sigmas(num_steps, 1.0, device=self.transformer.fc_in.weight.device)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return x0.float()  # the "image" is the point itself: the world's rewards read it

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        return (self.settings.dim,)


def pretrain(net: VelocityMLP, world: Sequence[PromptWorld], settings: GMMSettings, *, seed: int = 0) -> list[float]:
    """Flow matching on exact samples: ``min E |v(x_sigma, sigma, c) - (eps - x0)|^2``, sigma ~ U(0, 1), prompts
    uniform, ``prompt_dropout`` of the rows unconditional (one-hot zeroed); AdamW with cosine decay. Returns the
    loss curve (every 100 steps)."""
    gen = torch.Generator().manual_seed(seed + 7)
    P, B = len(world), settings.pretrain_batch
    # a pool of exact samples per prompt, drawn once (drawing per step would dominate the cost)
    pool = torch.stack([w.mixture.sample(POOL, gen).float() for w in world])  # [P, POOL, d]
    opt = torch.optim.AdamW(net.parameters(), lr=settings.pretrain_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, settings.pretrain_steps)
    curve = []
    for step in range(settings.pretrain_steps):
        idx = torch.randint(0, P, (B,), generator=gen)
        x0 = pool[idx, torch.randint(0, POOL, (B,), generator=gen)]
        eps = torch.randn(B, settings.dim, generator=gen)
        sigma = torch.rand(B, generator=gen)
        onehot = nn.functional.one_hot(idx, P).float()
        onehot[torch.rand(B, generator=gen) < settings.prompt_dropout] = 0.0
        x_t = (1 - sigma[:, None]) * x0 + sigma[:, None] * eps
        loss = (net(x_t, sigma, onehot) - (eps - x0)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            curve.append(float(loss.detach()))
    return curve
