"""DIDR on a tiny SD-Turbo-style (eps-prediction UNet) and an SDXL-Turbo-style (v-prediction, micro-conditioning)
one-step generator: teacher = the UNet with LoRA off, fake score = a LoRA adapter initialised from it, a
differentiable reward through the VAE decoder; both networks train with their own optimizers."""
from __future__ import annotations

import pytest
import torch

from engine.distributed import Dist
from engine.methods.didr import DIDR, DIDRConfig, adapter_params
from engine.stepper import TorchStepper
from models.lora import LoraSettings

pytestmark = pytest.mark.slow

LOCAL = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")


class RedReward:
    """Differentiable: mean red minus mean blue of the decoded image."""

    name = "red"
    differentiable = True

    def score(self, images, prompts, metadata):
        return {"red": self.score_differentiable(images, prompts, metadata).detach()}

    def score_differentiable(self, images, prompts, metadata):
        return (images[:, 0] - images[:, 2]).flatten(1).mean(1)


@pytest.mark.parametrize("prediction_type,sdxl,mode", [("epsilon", False, "diffused"),
                                                       ("v_prediction", True, "terminal")])
def test_didr_trains_a_turbo_style_unet_generator(tmp_path, prediction_type, sdxl, mode):
    from models.onestep import UNetOneStep
    from models.tiny import save_tiny_unet

    torch.manual_seed(0)
    model = UNetOneStep.from_pretrained(save_tiny_unet(tmp_path / "unet", prediction_type, sdxl))
    assert model.decode_differentiable(torch.zeros(1, 4, 8, 8, requires_grad=True)).requires_grad
    model.attach_adapters(("policy", "fake"), mode="lora", lora=LoraSettings(rank=4))
    method = DIDR(DIDRConfig(reward_mode=mode, cfg_scale=2.0, beta=0.5), model, RedReward())
    gen_params, fake_params = adapter_params(model, "policy"), adapter_params(model, "fake")
    gen_opt, ta_opt = TorchStepper(gen_params, lr=1e-2), TorchStepper(fake_params, lr=1e-2)
    prompts = ["a red circle", "two blue squares", "a cat", ""]
    cond = model.encode(prompts)
    shape = model.latent_shape(*model.resolution)
    z = torch.randn(4, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x0_before = model.generate(z, cond)
        torch.testing.assert_close(model.velocity(x0_before, torch.full((4,), 0.5), cond, adapter="fake"),
                                   model.velocity(x0_before, torch.full((4,), 0.5), cond, adapter="pretrained"))
    before = [p.detach().clone() for p in gen_params + fake_params]
    g = torch.Generator().manual_seed(2)
    stats, norms = method.train_step(z, cond, prompts, [{}] * 4, generator_opt=gen_opt, ta_opt=ta_opt,
                                     generator=g, micro_batch_size=2)
    metrics = stats.reduce(LOCAL)
    assert float(norms["grad_norm"]) > 0 and float(norms["ta_grad_norm"]) > 0
    assert all(v == v for v in metrics.values())
    changed = [not torch.equal(a, b) for a, b in zip(before, gen_params + fake_params)]
    assert any(changed[:len(gen_params)]) and any(changed[len(gen_params):])
    with torch.no_grad():
        assert not torch.equal(model.generate(z, cond), x0_before)          # the generator moved
        assert torch.equal(model.generate(z, cond, adapter="pretrained"), x0_before)  # the teacher did not
