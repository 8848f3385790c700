"""Flow-GRPO through the engine (``--method grpo``) on a tiny random testbed model: end to end with CFG and the KL, the
on-policy ratio exactly 1, resume bit for bit, 2-process ZeRO-2 equal to 1 process, the Fast window sampler, and
the recipes' batch arithmetic."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch

from tests.test_engine_helpers import ROOT, distributed_worker, run_config, step_losses, tiny_overrides

pytestmark = pytest.mark.slow

CONFIG = "configs/testbed_grpo.yaml"


def grpo_overrides(run_dir: str, **extra) -> list[str]:
    """The testbed GRPO recipe shrunk to seconds: 2 prompts x 4 samples, a 3-step SDE sampler (2 trained steps),
    2 optimizer steps per epoch, a large clip range so the second step's ratios move visibly."""
    base = {"data.group_size": 4, "data.prompts_per_epoch": 2, "train.micro_batch_size": 2,
            "train.gradient_steps_per_epoch": 2, "rollout.num_steps": 3, "train.num_timesteps": 0,
            "train.lr": 1e-3, "grpo.cfg_scale": 2.0, "grpo.clip_range": 0.2}
    base.update(extra)
    return tiny_overrides(run_dir, **base)


def records(run_dir, kind="step"):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def test_grpo_end_to_end_ratio_exactly_one_and_resume_bit_for_bit(tmp_path):
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    common = {"train.epochs": 2, "checkpoint.every": 1, "checkpoint.keep": 5}
    last = run_config(grpo_overrides(full, **common), config=CONFIG)
    steps = records(full)
    assert len(steps) == 4
    for first in (steps[0], steps[2]):  # each epoch's first optimizer step runs before any update of that epoch
        assert first["ratio_first_dev/max"] == 0.0 and first["ratio/min"] == 1.0 == first["ratio/max"]
        assert first["clipfrac/mean"] == 0.0
    assert steps[0]["kl_loss/max"] == 0.0  # the policy starts as the pretrained model (LoRA B = 0): KL exactly 0
    # after an update the ratios and the KL move (so the checks above can fail)
    assert steps[1]["ratio/max"] - steps[1]["ratio/min"] > 0 and steps[1]["kl_loss/max"] > 0
    assert all(s["grad_norm"] > 0 and s["loss/mean"] == s["loss/mean"] for s in steps)
    epoch = records(full, "epoch")[0]
    assert 0.0 <= epoch["zero_std_fraction"] <= 1.0 and "approx_kl/mean" in epoch and "policy_loss/mean" in epoch
    assert last["reward/mean"] == last["reward/mean"]
    # stopped after epoch 1 and resumed: the same per-step numbers, exactly
    run_config(grpo_overrides(split, **{**common, "train.epochs": 1}), config=CONFIG)
    run_config(grpo_overrides(split, **{**common, "checkpoint.resume": "auto"}), config=CONFIG)
    for key in ("loss/mean", "ratio/mean", "kl_loss/mean", "grad_norm"):
        assert step_losses(full, key) == step_losses(split, key), key


def test_two_process_zero2_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    extra = {"train.epochs": 1, "deepspeed.zero_stage": 2, "grpo.kl_beta": 0.0}
    two = [grpo_overrides(str(tmp_path / "two"), **extra)]
    mp.start_processes(distributed_worker, args=(2, port, two, None, CONFIG), nprocs=2, join=True,
                       start_method="spawn")
    one = str(tmp_path / "one")
    run_config(grpo_overrides(one, **extra), config=CONFIG)
    a, b = records(one), records(str(tmp_path / "two"))
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        for key in ("loss/mean", "ratio/mean", "ratio/max", "ratio/min", "policy_loss/mean", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-7), key
    ea, eb = records(one, "epoch"), records(str(tmp_path / "two"), "epoch")
    assert [e["reward/mean"] for e in ea] == pytest.approx([e["reward/mean"] for e in eb], rel=1e-5)


def test_grpo_fast_nocfg_cps_runs_on_policy(tmp_path):
    run = str(tmp_path / "fast")
    run_config(grpo_overrides(run, **{"train.epochs": 1, "rollout.num_steps": 4, "grpo.window_size": 2,
                                      "grpo.window_range": "[0, 3]", "grpo.sde_type": "cps",
                                      "grpo.noise_level": 0.8, "grpo.kl_beta": 0.0, "grpo.cfg_scale": 1.0}),
               config=CONFIG)
    steps = records(run)
    assert len(steps) == 2 and steps[0]["ratio_first_dev/max"] == 0.0 and "kl_loss/mean" not in steps[0]
    assert steps[1]["ratio/max"] - steps[1]["ratio/min"] > 0


# ---------------------------------------------------------------------------- the sampler, outside the engine
class LinearFlow:
    """A stand-in velocity field with CFG (``v = c x + sigma``), enough to check the sampler's bookkeeping."""

    def __init__(self, c=0.3, c_null=0.1):
        self.c, self.c_null, self.calls = c, c_null, 0

    def velocity(self, x, sigma, cond, *, adapter="policy"):
        self.calls += 1
        return self.c * x + sigma.reshape(-1, *([1] * (x.ndim - 1)))

    def velocity_cfg_pair(self, x, sigma, cond, *, adapter="policy"):
        self.calls += 1
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return self.c * x + s, self.c_null * x + s


@pytest.mark.parametrize("window", [0, 2])
def test_sde_rollout_stores_the_trained_steps_and_is_euler_outside_the_window(window):
    from types import SimpleNamespace

    from engine.methods.grpo import sde_rollout
    from engine.methods.grpo.rollout import velocity_for
    from kernels import reference
    from models.base import Cond

    n, shape, steps = 5, (2, 3), 6
    g = torch.Generator().manual_seed(0)
    x_init, xi = torch.randn(n, *shape, generator=g), torch.randn(steps, n, *shape, generator=g)
    sigmas = torch.linspace(1, 0, steps + 1)
    cfg = SimpleNamespace(noise_level=0.7, sde_type="sde", cfg_scale=2.0, window_size=window)
    start = torch.tensor([0, 1, 2, 1, 0]) if window else torch.zeros(n, dtype=torch.long)
    K = window or 4
    model, cond = LinearFlow(), Cond(embeds=torch.zeros(n, 1, 1))
    traj = sde_rollout(model, cond, x_init, xi, sigmas, cfg, start=start, num_train=K, chunk=2, kernel_backend="torch")
    assert model.calls == steps * 3  # one batched cond/null forward per step and chunk (3 chunks: 2 + 2 + 1)
    # replay every row on its own, step by step
    table = reference.grpo_coefficients(sigmas[:-1], sigmas[1:], noise_level=0.7, sigma_max=sigmas[1])
    for r in range(n):
        x = x_init[r:r + 1]
        for i in range(steps):
            sde = not window or start[r] <= i < start[r] + window
            v = velocity_for(model, x, sigmas[i].expand(1), cond.index(slice(r, r + 1)), 2.0, "policy")
            coef = table[i:i + 1] if sde else reference.grpo_ode_coefficients(sigmas[i:i + 1], sigmas[i + 1:i + 2])
            x_next = reference.grpo_step(x, v, coef, xi[i, r:r + 1])
            if not sde:
                assert torch.equal(x_next, x + (sigmas[i + 1] - sigmas[i]) * v)  # plain Euler outside the window
            k = i - int(start[r])
            if 0 <= k < K:
                assert torch.equal(traj.latents[k, r], x[0]) and torch.equal(traj.coef[k, r], coef[0])
                assert traj.sigma[k, r] == sigmas[i]
                assert torch.equal(traj.log_probs[k, r:r + 1], reference.grpo_logprob(v, x, x_next, coef))
                if k == K - 1:
                    assert torch.equal(traj.latents[K, r], x_next[0])
            x = x_next
        assert torch.equal(traj.x_final[r], x[0])


@pytest.mark.parametrize("recipe", ["configs/testbed_grpo.yaml", "configs/sd35m_geneval_grpo.yaml",
                                    "configs/sd35m_ocr_grpo.yaml", "configs/sd35m_geneval_grpo_fast.yaml",
                                    "configs/flux_dev_grpo.yaml"])
def test_grpo_recipes_load_and_fit_the_batch_arithmetic(recipe):
    from engine.batch import derive_batch
    from engine.config import load_config
    from engine.methods.grpo import GRPOConfig

    cfg = load_config(os.path.join(ROOT, recipe))
    o = cfg.algo
    assert cfg.method == "grpo" and isinstance(o, GRPOConfig) and cfg.rollout.num_steps == 10
    if "fast" in recipe:  # the official geneval_sd3_fast_nocfg preset
        assert (o.window_size, o.window(10), o.sde_type, o.noise_level, o.clip_range, o.kl_beta, o.cfg_scale) == \
            (3, (0, 5), "cps", 0.8, 1e-5, 0.0, 1.0)
    else:
        assert (o.window_size, o.sde_type, o.noise_level, o.clip_range) == (0, "sde", 0.7, 1e-4)
        assert o.train_steps(cfg) == 9
    if "sd35m" in recipe:  # 48 prompts x 24 images, two optimizer steps per epoch, as the official 32-GPU layout
        assert (cfg.data.prompts_per_epoch, cfg.data.group_size, cfg.train.gradient_steps_per_epoch) == (48, 24, 2)
        assert o.cfg_scale == (1.0 if "fast" in recipe else 4.5) and cfg.train.lr == 3e-4
    for world in (1, 8, 32) if "testbed" not in recipe else (1, 2):
        derive_batch(world, cfg.data.prompts_per_epoch, cfg.data.group_size, cfg.train.micro_batch_size,
                     cfg.train.gradient_steps_per_epoch, 1, exact_groups=False)


def test_grpo_config_errors(tmp_path):
    from engine.config import ConfigError
    with pytest.raises(ConfigError, match="grpo.sde_type"):
        run_config(grpo_overrides(str(tmp_path / "t"), **{"grpo.sde_type": "ode"}), config=CONFIG)
    with pytest.raises(ConfigError, match="grpo.window_range"):
        run_config(grpo_overrides(str(tmp_path / "w"), **{"grpo.window_size": 3, "grpo.window_range": "[0, 2]"}),
                   config=CONFIG)


class CountingFlow(LinearFlow):
    """Counts the transformer rows evaluated per adapter (a CFG pair is two rows per sample: one batched forward)."""

    def __init__(self):
        super().__init__()
        self.c = torch.nn.Parameter(torch.tensor(0.3))
        self.rows = {}

    def _count(self, adapter, rows):
        self.rows[adapter] = self.rows.get(adapter, 0) + rows

    def velocity(self, x, sigma, cond, *, adapter="policy"):
        self._count(adapter, x.shape[0])
        return super().velocity(x, sigma, cond, adapter=adapter)

    def velocity_cfg_pair(self, x, sigma, cond, *, adapter="policy"):
        self._count(adapter, 2 * x.shape[0])
        return super().velocity_cfg_pair(x, sigma, cond, adapter=adapter)


class CountingStepper:
    def __init__(self):
        self.backwards = 0

    def backward(self, loss, *, last):
        loss.backward()
        self.backwards += 1

    def metrics(self):
        return {}


# (cfg_scale, kl_beta, window) -> transformer rows per sample per epoch with N = 10 steps: (rollout, policy forward
# + backward, reference forward); the README's cost table
PASSES = {(4.5, 0.04, 0): (20, 18, 18), (1.0, 0.04, 0): (10, 9, 9), (4.5, 0.0, 0): (20, 18, 0),
          (1.0, 0.0, 3): (10, 3, 0)}


@pytest.mark.parametrize("cfg_scale,kl_beta,window", list(PASSES))
def test_transformer_passes_per_sample_per_epoch(cfg_scale, kl_beta, window):
    """Counted from the code (rollout + update on a counting model): with CFG every pass is two rows; the KL adds one
    reference pass per trained step; Fast trains only its window."""
    from types import SimpleNamespace

    from engine.methods.grpo import GRPOConfig, grpo_update, sde_rollout
    from models.base import Cond

    n, steps = 8, 10
    cfg = GRPOConfig(cfg_scale=cfg_scale, kl_beta=kl_beta, window_size=window, sde_type="cps" if window else "sde",
                     clip_range=0.1)
    K = window or 9
    g = torch.Generator().manual_seed(0)
    x_init, xi = torch.randn(n, 3, generator=g), torch.randn(steps, n, 3, generator=g)
    start = torch.randint(0, 5 - window + 1, (n,), generator=g) if window else torch.zeros(n, dtype=torch.long)
    model, cond = CountingFlow(), Cond(embeds=torch.zeros(n, 1, 1))
    traj = sde_rollout(model, cond, x_init, xi, torch.linspace(1, 0, steps + 1), cfg, start=start, num_train=K,
                       chunk=4, kernel_backend="torch")
    rollout_rows = dict(model.rows)
    model.rows.clear()
    layout = SimpleNamespace(micro_batch_size=2, micro_batches_per_step=2, gradient_steps=2)
    stepper = CountingStepper()
    out = grpo_update(model, traj, cond, torch.randn(n), torch.ones(n, dtype=torch.bool), stepper, cfg, layout,
                      kernel_backend="torch")
    rollout, policy, ref = PASSES[(cfg_scale, kl_beta, window)]
    assert rollout_rows == {"policy": rollout * n}
    assert model.rows == ({"policy": policy * n, "pretrained": ref * n} if ref else {"policy": policy * n})
    assert stepper.backwards == (n // 2) * K and len(out) == 2 and model.c.grad is not None
