"""``train.compile``: every family's network under ``torch.compile`` (inductor, really compiled to C++ on CPU) gives
the eager velocity and LoRA gradients within fp32 reordering tolerance, and a training run compiles its graphs in
the first epoch only (adapter switches and grad modes are cached graphs, not per-epoch recompiles).

Tolerance: fp32, ``rtol=1e-4`` and ``atol = 1e-5 * max|eager|`` for velocities, ``1e-4 * max|eager|`` for LoRA
gradients (inductor fuses and reorders reductions, so the last bits differ, more so after a backward through every
layer: 2e-5 of the max measured on the tiny Flux); a real difference, a wrong adapter or a missed LoRA branch, is
orders of magnitude larger.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from engine.rollout import compile_networks
from models.lora import LoraSettings

pytestmark = pytest.mark.slow

PROMPTS = ["a red circle", "two blue squares left of a star"]


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def close(got, want, scale: float = 1e-5):
    torch.testing.assert_close(got, want, rtol=1e-4, atol=scale * max(want.abs().max().item(), 1e-6))


def _lora(model, targets=None):
    lora = LoraSettings(rank=4, **({"target_modules": targets} if targets else {}))
    model.attach_adapters(("policy", "old"), mode="lora", lora=lora)
    with torch.no_grad():  # LoRA B starts at zero: give the policy a non-trivial adapter (old stays the identity)
        gen = torch.Generator().manual_seed(1)
        for k, p in model.adapters.params("policy").items():
            if "lora_B" in k:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def check_compiled_equals_eager(model, x, sigma, cond):
    """Policy forward + backward (LoRA gradients) and an ``old`` no-grad forward, eager then compiled."""
    params = model.adapters.params("policy")
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))

    def policy_step():
        for p in params.values():
            p.grad = None
        v = model.velocity(x, sigma, cond, adapter="policy")
        (v.float() * weight).sum().backward()
        return v.detach(), {k: p.grad.clone() for k, p in params.items()}

    def old_forward():
        with torch.no_grad():
            return model.velocity(x, sigma, cond, adapter="old")

    v_eager, g_eager = policy_step()
    old_eager = old_forward()
    assert (v_eager - old_eager).abs().max() > 1e-3  # the two adapters differ: a wrong switch would show
    before = graphs()
    compile_networks(model)
    v_c, g_c = policy_step()
    old_c = old_forward()
    compiled = graphs() - before
    assert compiled >= 2  # really compiled: one graph per (adapter, grad mode), nothing fell back to eager
    close(v_c, v_eager)
    close(old_c, old_eager)
    for k in g_eager:
        close(g_c[k], g_eager[k], 1e-4)
    policy_step(), old_forward()  # switching back and forth hits the cached graphs
    assert graphs() - before == compiled


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    import torch._dynamo
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_sd3_compiled_equals_eager(tmp_path):
    from models import tiny
    from models.sd3 import SD3Model

    model = _lora(SD3Model.from_pretrained(tiny.save_tiny_sd3(tmp_path / "sd3"), max_sequence_length=16))
    x = torch.randn(2, *model.latent_shape(16, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = model.encode(PROMPTS)
    check_compiled_equals_eager(model, x, torch.tensor([0.7, 0.3]), cond)


def test_flux_compiled_equals_eager(tmp_path):
    from models import tiny
    from models.flux import FluxModel

    path = tiny.save_tiny_flux(tmp_path / "flux", "dev")
    model = _lora(FluxModel.from_pretrained(path, max_sequence_length=16, resolution=(16, 16)))
    x = torch.randn(2, *model.latent_shape(16, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = model.encode(PROMPTS)
    check_compiled_equals_eager(model, x, torch.tensor([0.7, 0.3]), cond)


def test_onestep_unet_is_refused(tmp_path):
    """The UNet family is refused with one sentence: inductor (torch 2.13, CPU) gave wrong LoRA gradients on the tiny
    diffusers UNet (forward within 2e-7 of eager, but 32 of 64 gradients off: the mid block's zero, the first down
    block's at cosine 0.7-0.99), while dynamo's own graphs (``backend="aot_eager"``) were exact; compiling it would
    train on wrong gradients."""
    from engine.errors import ConfigError
    from models import tiny
    from models.onestep import UNetOneStep

    model = _lora(UNetOneStep.from_pretrained(tiny.save_tiny_unet(tmp_path / "unet", "epsilon", False),
                                              resolution=(16, 16)))
    with pytest.raises(ConfigError, match="train.compile.*UNet"):
        compile_networks(model)
    assert not any(getattr(m, "_compiled_call_impl", None) for m in model.modules())  # nothing half-compiled


def test_gmm_compiled_equals_eager():
    from models.gmm import GMMFlow, GMMSettings, VelocityMLP, build_world

    s = GMMSettings(world="several", hidden=32, layers=2)
    torch.manual_seed(0)
    net = VelocityMLP(s.dim, len(build_world(s.world, s.dim)), s.hidden, s.layers, s.time_features)
    model = _lora(GMMFlow(s, net), targets=("fc_in", "fc_out"))
    cond = model.encode([model.world[0].prompt, model.world[1].prompt, model.world[0].prompt])
    x = torch.randn(3, s.dim, generator=torch.Generator().manual_seed(0))
    check_compiled_equals_eager(model, x, torch.tensor([0.9, 0.5, 0.1]), cond)


def test_testbed_crd_run_compiles_in_the_first_epoch_only_and_trains_like_eager(tmp_path):
    """Two CRD epochs of the tiny testbed through the real loop (DeepSpeed engine, LoRA policy/old/sampler adapters),
    ``train.compile`` on and off: losses and final weights agree; epoch 2 compiles nothing new."""
    from engine.loop import run_epoch
    from tests.test_engine_helpers import ROOT, register_test_rewards, tiny_overrides
    from engine.config import load_config
    from engine.context import build

    register_test_rewards()
    out = {}
    for on in (False, True):
        # one batch size everywhere (rollout chunk = micro-batch = 4): no dynamic-shape recompile either
        cfg = load_config(os.path.join(ROOT, "configs/testbed_crd.yaml"),
                          tiny_overrides(str(tmp_path / str(on)), **{"train.compile": on, "rollout.batch_size": 4,
                                                                     "train.kernel_backend": "torch"}))
        ctx, _ = build(cfg)
        per_epoch, losses = [], []
        try:
            for e in range(2):
                before = graphs()
                _, _, steps = run_epoch(ctx, e)
                per_epoch.append(graphs() - before)
                losses += [s["loss/mean"] for s in steps]
        finally:
            ctx.logger.close()
        w = {f"{a}.{k}": p.detach().clone() for a in ("policy", "old", "sampler")
             for k, p in ctx.model.adapters.params(a).items()}
        out[on] = per_epoch, losses, w
    (eager_graphs, eager_losses, eager_w), (graphs_on, losses_on, w_on) = out[False], out[True]
    assert eager_graphs == [0, 0]
    assert graphs_on[0] >= 3 and graphs_on[1] == 0, graphs_on  # sampler rollout, policy step, snapshot forwards
    torch.testing.assert_close(torch.tensor(losses_on), torch.tensor(eager_losses), rtol=1e-3, atol=1e-6)
    for k in eager_w:  # Adam steps of lr 3e-4: compiled and eager weights agree far below one step's size
        torch.testing.assert_close(w_on[k], eager_w[k], rtol=0, atol=3e-5)
