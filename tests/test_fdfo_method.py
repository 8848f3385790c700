"""FDFO (spec/methods.md section 4) on a toy flow model: on-policy ratio, update direction vs the true gradient,
the global item shuffle and its W-rank split, KL. The engine method's own ``advantages``/``update`` run through a
light context (tests/light_context.py); the 2-process gloo run through the whole engine is in test_fdfo_engine.py."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import kernels
from engine.errors import ConfigError
from engine.methods.fdfo import (FDFOConfig, FDFOMethod, FDFOTargets, contiguous_rank_rows, item_schedule,
                                 paired_rollout)
from engine.stepper import TorchStepper
from models.base import Cond, FlowModel
from models.lora import Adapters
from models.samplers import churn_coefficients, linear_sigmas
from tests.light_context import light_context, run_config

SHAPE = (2, 2, 2)


class ToyNet(nn.Module):
    """Per-element affine velocity ``v = a * x + b + sigma * c + e * cond``: exactly batch-invariant (elementwise)."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Parameter(-0.2 + 0.1 * torch.randn(SHAPE, generator=g))
        self.b = nn.Parameter(0.1 * torch.randn(SHAPE, generator=g))
        self.c = nn.Parameter(0.1 * torch.randn(SHAPE, generator=g))
        self.e = nn.Parameter(0.1 * torch.randn(SHAPE, generator=g))

    def forward(self, x, sigma, cond_scalar):
        s = sigma.to(x.dtype).view(-1, 1, 1, 1)
        return self.a * x + self.b + s * self.c + self.e * cond_scalar.view(-1, 1, 1, 1)


class ToyFlow(FlowModel):
    """A FlowModel over ToyNet with full-copy adapters (``policy`` trainable, ``pretrained`` frozen)."""

    def __init__(self, seed=0):
        super().__init__()
        self.net = ToyNet(seed)
        self.adapters = Adapters(self.net, ("policy",), mode="full")

    def velocity(self, x, sigma, cond, *, adapter="policy"):
        with self.adapters.use(adapter) as net:
            return net(x.float(), torch.as_tensor(sigma).expand(x.shape[0]), cond.embeds[:, 0, 0])

    def null_cond(self, n):
        return Cond(torch.zeros(n, 1, 1))

    def sigmas(self, num_steps):
        return linear_sigmas(num_steps)

    def decode(self, x0):
        return x0

    def policy_params(self):
        return list(self.adapters.params("policy").values())


def _setup(pairs=8, steps=6, seed=0, **cfg_kw):
    model = ToyFlow(seed)
    cfg = FDFOConfig(num_steps=steps, **cfg_kw)
    cond = Cond(torch.linspace(-1, 1, pairs).view(pairs, 1, 1))
    x_init = torch.randn(pairs, *SHAPE, generator=torch.Generator().manual_seed(seed + 1))
    return model, cfg, cond, x_init


def _method_and_context(cfg, model, stepper, *, rows, gradient_steps, epoch, **kw):
    """FDFOMethod over ``rows`` branches (micro-batches of one pair) in a light context."""
    method = FDFOMethod(run_config("fdfo", cfg))
    ctx = light_context(method, model, stepper, prompts_per_epoch=rows // 2, group_size=2, micro_batch_size=2,
                        gradient_steps=gradient_steps, epoch=epoch, **kw)
    return method, ctx


def _train(model, cfg, data, rewards, stepper, *, epoch, gradient_steps=4, **kw):
    """One epoch of the engine method on pair rollouts ``data``: advantages (raw rewards -> finite-difference
    pairs) then its optimizer steps -> the reduced metrics of each step."""
    method, ctx = _method_and_context(cfg, model, stepper, rows=data.num_rows, gradient_steps=gradient_steps,
                                      epoch=epoch, **kw)
    ro = SimpleNamespace(epoch=epoch, x0=data.x_final, extras={"pairs": data})
    return method.update(ctx, ro, method.advantages(ctx, ro, {"reward": rewards}))


def _linear_reward(x):
    w = torch.linspace(-1.0, 2.0, x[0].numel()).view(SHAPE)
    return (w * x).flatten(1).sum(1)


@pytest.mark.parametrize("cfg_scale,storage", [(1.0, "fp32"), (3.0, "fp32")])
def test_ratio_exactly_one_on_first_micro_step_of_each_epoch(cfg_scale, storage):
    model, cfg, cond, x_init = _setup(cfg_scale=cfg_scale, storage_dtype=storage)
    cfg.micro_batch_items = 8
    opt = TorchStepper(model.policy_params(), lr=3e-2)
    for epoch in range(2):
        ro = paired_rollout(model, cond, x_init, cfg, torch.Generator().manual_seed(10 + epoch))
        steps = _train(model, cfg, ro, _linear_reward(ro.x_final), opt, epoch=epoch, gradient_steps=4)
        assert len(steps) == 4
        assert steps[0]["ratio_first_dev/max"] == 0.0, steps[0]["ratio_first_dev/max"]
        assert steps[0]["ratio/min"] == 1.0 == steps[0]["ratio/max"]  # the whole first step is on-policy too
        # after the first optimizer step the ratio moves (so the checks above can fail)
        assert steps[1]["ratio/max"] - steps[1]["ratio/min"] > 1e-6


def test_bf16_storage_keeps_ratio_close_to_one():
    model, cfg, cond, x_init = _setup(storage_dtype="bf16")
    cfg.micro_batch_items = 96
    ro = paired_rollout(model, cond, x_init, cfg, torch.Generator().manual_seed(0))
    assert ro.states.dtype == torch.bfloat16 and ro.velocities.dtype == torch.bfloat16
    assert ro.x_final.dtype == torch.float32
    m = _train(model, cfg, ro, _linear_reward(ro.x_final), TorchStepper(model.policy_params(), lr=1e-9), epoch=0,
               gradient_steps=1)
    assert 0 < m[0]["ratio_first_dev/max"] < 0.05  # the fp32 model sees bf16-rounded states: close, not exact


def _differentiable_churned_rollout(model, x_init, cond, sigmas, gamma, gen):
    """The churned-Euler sampler of methods.md section 4 written with autograd kept (for the true gradient)."""
    coef = churn_coefficients(sigmas, gamma)
    g0 = float(coef["gamma"][0])
    x = x_init / (1 + g0) + ((1 + g0) ** 2 - 1) ** 0.5 / (1 + g0) * torch.randn(x_init.shape, generator=gen)
    n = sigmas.numel() - 1
    for i in range(n):
        v = model.velocity(x, sigmas[i].expand(x.shape[0]), cond)
        x = x + coef["dt"][i] * v
        if i < n - 1:
            x = coef["a"][i] * x + coef["c"][i] * torch.randn(x.shape, generator=gen)
    return x


@pytest.mark.parametrize("gamma", [0.0025, 0.05])
def test_update_direction_aligns_with_true_gradient_of_linear_reward(gamma):
    """Reward R = <w, x_T>: the FDFO gradient at the first (on-policy) step points along the pathwise gradient
    of E[R] (computed by autograd through the same churned sampler over many trajectories)."""
    pairs, steps = 32, 4
    model, cfg, _, _ = _setup(steps=steps, gamma=gamma)
    cond = Cond(torch.zeros(pairs, 1, 1))
    x_init = torch.randn(pairs, *SHAPE, generator=torch.Generator().manual_seed(3))
    params = model.policy_params()

    sigmas = model.sigmas(steps)
    z = torch.randn(4096, *SHAPE, generator=torch.Generator().manual_seed(4))
    x_true = _differentiable_churned_rollout(model, z, Cond(torch.zeros(4096, 1, 1)), sigmas, gamma,
                                             torch.Generator().manual_seed(5))
    true_grad = torch.autograd.grad(_linear_reward(x_true).mean(), params)
    true_grad = torch.cat([g.flatten() for g in true_grad])

    class Recorder:
        def backward(self, loss, last):  # the engine.stepper protocol: last=True ends the step
            loss.backward()
            if last:
                self.grad = torch.cat([p.grad.flatten().clone() for p in params])
                for p in params:
                    p.grad = None

        def metrics(self):
            return {}

    rec = Recorder()
    cfg.micro_batch_items = 256
    ro = paired_rollout(model, cond, x_init, cfg, torch.Generator().manual_seed(6))
    _train(model, cfg, ro, _linear_reward(ro.x_final), rec, epoch=0, gradient_steps=1)
    ascent = -rec.grad
    cos = torch.nn.functional.cosine_similarity(ascent, true_grad, dim=0)
    assert cos > 0.5, float(cos)


def test_item_schedule_is_a_global_shuffle_split_across_ranks():
    kw = dict(num_steps=5, gradient_steps=4, micro_batch_size=4, seed=3, epoch=2)
    one = item_schedule(rank_rows=contiguous_rank_rows(12, 1), rank=0, **kw)
    two = [item_schedule(rank_rows=contiguous_rank_rows(6, 2), rank=r, **kw) for r in range(2)]
    assert one.step_items == two[0].step_items == two[1].step_items and sum(one.step_items) == 60
    for s in range(4):
        glob = set(one.micro[s][one.micro[s] >= 0].tolist())
        parts = [set((t.micro[s][t.micro[s] >= 0] + r * 30).tolist()) for r, t in enumerate(two)]
        assert parts[0] | parts[1] == glob and not parts[0] & parts[1]
        assert two[0].micro[s].shape == two[1].micro[s].shape  # same micro-batch count on every rank
    every = torch.cat([m[m >= 0] for m in one.micro])
    assert sorted(every.tolist()) == list(range(60))  # each item exactly once per epoch
    other_epoch = item_schedule(rank_rows=contiguous_rank_rows(12, 1), rank=0, **kw | {"epoch": 3})
    assert not torch.equal(torch.cat(other_epoch.micro), torch.cat(one.micro))


def test_kl_term_pulls_toward_pretrained():
    model, cfg, cond, x_init = _setup(kl_lambda=5.0)
    with torch.no_grad():
        for p in model.policy_params():
            p.add_(0.3)
    opt = TorchStepper(model.policy_params(), lr=1e-2)
    ro = paired_rollout(model, cond, x_init, cfg, torch.Generator().manual_seed(0))
    rewards = torch.zeros(ro.num_rows)  # dR = 0: only the KL moves the policy
    m1 = _train(model, cfg, ro, rewards, opt, epoch=0, gradient_steps=2)
    m2 = _train(model, cfg, ro, rewards, opt, epoch=1, gradient_steps=2)
    assert m1[0]["kl/mean"] > 0 and m2[-1]["kl/mean"] < m1[0]["kl/mean"]


def test_bad_input():
    with pytest.raises(ConfigError, match="fdfo.storage_dtype"):
        FDFOConfig(storage_dtype="fp16").validate()
    with pytest.raises(ConfigError, match="fdfo.gamma_schedule"):
        FDFOConfig(num_steps=3, gamma_schedule=[0.1, 0.1]).validate()
    model, cfg, cond, x_init = _setup()
    ro = paired_rollout(model, cond, x_init, cfg, None)
    with pytest.raises(ValueError, match="one per branch"):
        _train(model, cfg, ro, torch.zeros(3), TorchStepper(model.policy_params(), lr=1e-3), epoch=0)


def test_gamma_schedule_reaches_the_sampler():
    model, cfg, cond, x_init = _setup(steps=3, gamma_schedule=[0.0, 0.0, 0.0])
    a = paired_rollout(model, cond, x_init, cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.x_final[0::2], a.x_final[1::2], rtol=0, atol=0)  # no churn: branches identical
    cfg2 = FDFOConfig(num_steps=3, gamma_schedule=[0.1, 0.1, 0.1])
    b = paired_rollout(model, cond, x_init, cfg2, torch.Generator().manual_seed(0))
    assert (b.x_final[0::2] - b.x_final[1::2]).abs().max() > 1e-3


def test_rank_split_of_one_step_sums_to_the_one_rank_gradient():
    """Emulated 2 ranks (no processes): each rank's gradient over its own rows (the batch layout's, interleaved
    micro-batches), averaged (what the all-reduce does), equals the 1-rank gradient of every optimizer step."""
    model, cfg, cond, x_init = _setup(pairs=6, steps=4, gamma=0.05)
    cfg.micro_batch_items = 5
    ro = paired_rollout(model, cond, x_init, cfg, torch.Generator().manual_seed(1))
    rewards = _linear_reward(ro.x_final)
    params = model.policy_params()

    class Recorder:
        def __init__(self):
            self.grads = []

        def backward(self, loss, last):  # the engine.stepper protocol: last=True ends the step
            loss.backward()
            if last:
                self.grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                             for p in params]))
                for p in params:
                    p.grad = None

        def metrics(self):
            return {}

    dR, dxh = kernels.fdfo_pairs(ro.x_final, rewards)

    def grads(world, rank):
        rec = Recorder()
        method, ctx = _method_and_context(cfg, model, rec, rows=12, gradient_steps=3, epoch=0, world_size=world,
                                          rank=rank, seed=4)
        rows = ctx.layout.rank_indices(rank)
        part = type(ro)(ro.states[:, rows], ro.velocities[:, rows], ro.x_final[rows], ro.sigmas, ro.cond.index(rows))
        method.update(ctx, SimpleNamespace(epoch=0, x0=part.x_final, extras={"pairs": part}),
                      FDFOTargets(dR[rows], dxh[rows], {}))
        return torch.stack(rec.grads)

    one = grads(1, 0)
    two = (grads(2, 0) + grads(2, 1)) / 2
    assert one.abs().max() > 0
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("gamma,epochs,margin", [(0.0025, 15, 0.25), (0.05, 9, 0.5)])
def test_fdfo_raises_a_linear_reward_over_epochs(gamma, epochs, margin):
    """A real learning run on the toy (fixed seeds): held-out reward of fresh pair rollouts (fixed noise) rises.
    Observed rises: about 0.40 (gamma 0.0025, 15 epochs) and 1.0 (gamma 0.05, 9 epochs)."""
    model, cfg, _, _ = _setup(pairs=16, steps=6, gamma=gamma)
    cfg.micro_batch_items = 48
    opt = TorchStepper(model.policy_params(), lr=3e-3, weight_decay=0.0)
    ev_x = torch.randn(256, *SHAPE, generator=torch.Generator().manual_seed(99))
    ev_c = Cond(torch.zeros(256, 1, 1))

    def held_out_reward():
        ro = paired_rollout(model, ev_c, ev_x, cfg, torch.Generator().manual_seed(5))
        return float(_linear_reward(ro.x_final).mean())

    start = held_out_reward()
    for e in range(epochs):
        x = torch.randn(16, *SHAPE, generator=torch.Generator().manual_seed(e))
        c = Cond(torch.randn(16, 1, 1, generator=torch.Generator().manual_seed(1000 + e)))
        ro = paired_rollout(model, c, x, cfg, torch.Generator().manual_seed(100 + e))
        # the reference kernels: fast on CPU
        _train(model, cfg, ro, _linear_reward(ro.x_final), opt, epoch=e, gradient_steps=4, kernel_backend="torch")
    assert held_out_reward() - start > margin


def test_rollout_in_sampler_chunks_equals_one_call():
    """``batch_pairs`` splits the prompts into sampler calls; with per-sample churn noise the result is the same."""
    model, cfg, cond, x_init = _setup(pairs=5, steps=3, gamma=0.05)
    xi = torch.randn(3, 10, *SHAPE, generator=torch.Generator().manual_seed(2))
    whole = paired_rollout(model, cond, x_init, cfg, xi=xi)
    parts = paired_rollout(model, cond, x_init, cfg, xi=xi, batch_pairs=2)
    for name in ("states", "velocities", "x_final"):
        torch.testing.assert_close(getattr(parts, name), getattr(whole, name), rtol=0, atol=0)
    assert torch.equal(parts.cond.embeds, whole.cond.embeds) and whole.states.shape[:2] == (3, 10)
