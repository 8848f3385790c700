"""A user's own model family, reward and method, named by ``module:callable`` in a YAML recipe, train with no engine
file edited (the registries of engine.registry: ``models.FAMILIES``, ``engine.rewards.REWARDS``,
``engine.methods.METHODS``).

The plug-in package is written to a temporary directory at test time, so nothing in the repository knows it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: a flow model of the spec's convention on 3x8x8 "images": a per-pixel MLP of (x, sigma, prompt embedding)
TOY_MODELS = '''
import hashlib

import torch
from torch import nn

from models.base import Cond, FlowModel, as_sigma_batch
from models.samplers import flow_match_sigmas

BUILT = []  # every ToyFlow the engine built (the test reads it)


class ToyNet(nn.Module):
    def __init__(self, width: int = 16, text_dim: int = 8) -> None:
        super().__init__()
        self.proj_in = nn.Linear(3 + 1 + text_dim, width)
        self.proj_out = nn.Linear(width, 3)

    def forward(self, x, sigma, text):
        b, c, h, w = x.shape
        feats = torch.cat([x.permute(0, 2, 3, 1),
                           sigma.view(b, 1, 1, 1).expand(b, h, w, 1).to(x.dtype),
                           text.view(b, 1, 1, -1).expand(b, h, w, text.shape[-1]).to(x.dtype)], dim=-1)
        return self.proj_out(torch.tanh(self.proj_in(feats))).permute(0, 3, 1, 2)


class ToyFlow(FlowModel):
    adapted_attr = "transformer"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.transformer = ToyNet()
        BUILT.append(self)

    @classmethod
    def load(cls, model_cfg, *, dtype=torch.float32, seed=0):
        return cls(seed).to(dtype)

    def encode(self, prompts, ids=None):
        # a fixed embedding per prompt text (a hash): no text encoder to train or cache
        rows = [torch.tensor(list(hashlib.sha256(p.encode()).digest()[:8]), dtype=torch.float32) / 255 for p in prompts]
        embeds = torch.stack(rows).unsqueeze(1)
        return Cond(embeds=embeds, pooled=embeds[:, 0])

    def null_cond(self, n):
        return self.encode([""] * n)

    def velocity(self, x, sigma, cond, *, adapter="policy"):
        sig = as_sigma_batch(sigma, x.shape[0], x)
        with self.adapters.use(adapter) as net:
            return net(x, sig, cond.pooled)

    def sigmas(self, num_steps):
        return flow_match_sigmas(num_steps, 1.0)

    def decode(self, x0):
        return ((x0 + 1) / 2).clamp(0, 1)

    def latent_shape(self, height, width):
        return (3, height, width)
'''

#: a reward factory: kwargs from the recipe, returns an object with the engine's Reward protocol
TOY_REWARDS = '''
import torch


class Redness:
    differentiable = True

    def __init__(self, scale: float = 1.0) -> None:
        self.name, self.scale = "redness", scale

    def score(self, images, prompts, metadata):
        return {"redness": self.scale * (images[:, 0] - images[:, 1:].mean(1)).flatten(1).mean(1).float()}

    def score_differentiable(self, images, prompts, metadata):
        return self.scale * (images[:, 0] - images[:, 1:].mean(1)).flatten(1).mean(1)
'''

#: a method of the user's own: NFT with one more option (its YAML section is the class's ``name``)
TOY_METHODS = '''
from dataclasses import dataclass

from engine.methods.nft import NFT, NFTConfig
from engine.options import opt

UPDATES = []  # the option value seen by every update (the test reads it)


@dataclass
class TaggedNFTConfig(NFTConfig):
    tag: str = opt("none", "a word recorded at every update")


class TaggedNFT(NFT):
    name = "tagged_nft"
    Config = TaggedNFTConfig

    def update(self, ctx, rollout, adv):
        UPDATES.append(self.opt.tag)
        return super().update(ctx, rollout, adv)
'''


def write_plugin(tmp_path, family="toyplug.models:ToyFlow", reward="toyplug.rewards:Redness"):
    pkg = tmp_path / "toyplug"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(TOY_MODELS)
    (pkg / "rewards.py").write_text(TOY_REWARDS)
    (pkg / "methods.py").write_text(TOY_METHODS)
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        method: crd
        output_dir: {tmp_path / 'run'}
        model:
          family: {family}
          finetune: lora
          lora_rank: 4
          lora_targets: [proj_in, proj_out]
          resolution: 8
        data:
          train_prompts: {os.path.join(ROOT, 'data/testbed/train.jsonl')}
          test_prompts: ''
          prompts_per_epoch: 2
          group_size: 4
        rollout: {{num_steps: 4, batch_size: 8}}
        train: {{epochs: 1, micro_batch_size: 4, num_timesteps: 2, gradient_steps_per_epoch: 2, lr: 1.0e-2}}
        rewards:
          - {{name: {reward}, key: redness, weight: 1.0, kwargs: {{scale: 2.0}}}}
        log: {{tensorboard: false, progress: false, grid_every: 0}}
        eval: {{num_prompts: 0}}
        checkpoint: {{every: 0, at_end: false}}
        """))
    return recipe


def test_a_toy_family_and_reward_from_module_paths_train_one_epoch(tmp_path, monkeypatch):
    recipe = write_plugin(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    from engine.config import load_config
    from engine.loop import train

    cfg = load_config(str(recipe), [])
    assert cfg.model.family == "toyplug.models:ToyFlow" and cfg.rewards[0].name == "toyplug.rewards:Redness"
    import toyplug.models
    metrics = train(cfg)
    (model,) = toyplug.models.BUILT
    lora = [p.detach() for n, p in model.transformer.named_parameters() if "lora_B.policy" in n]
    assert len(lora) == 2 and all(p.abs().sum() > 0 for p in lora), "the policy LoRA (B = 0 at init) never moved"
    assert metrics["epoch"] == 0 and "reward/redness/mean" in metrics, sorted(metrics)


def test_a_toy_method_from_a_module_path_trains_with_its_own_yaml_section(tmp_path, monkeypatch):
    recipe = write_plugin(tmp_path)
    recipe.write_text(recipe.read_text().replace("method: crd", "method: toyplug.methods:TaggedNFT")
                      + "tagged_nft: {tag: hello, beta: 0.5}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "toyplug" or m.startswith("toyplug.")]:
        monkeypatch.delitem(sys.modules, name)  # an earlier test imported the package from its own tmp_path
    from engine.config import ConfigError, load_config
    from engine.loop import train

    cfg = load_config(str(recipe), [])
    assert type(cfg.algo).__name__ == "TaggedNFTConfig" and cfg.algo.tag == "hello" and cfg.algo.beta == 0.5
    import toyplug.methods
    metrics = train(cfg)
    assert toyplug.methods.UPDATES == ["hello"] and metrics["epoch"] == 0, (toyplug.methods.UPDATES, metrics)
    with pytest.raises(ConfigError, match="unknown config key .tagged_nft.no_such_option."):
        load_config(str(recipe), ["tagged_nft.no_such_option=1"])
    with pytest.raises(ConfigError, match="has no attribute 'Missing'"):
        load_config(str(recipe), [], method="toyplug.methods:Missing")


@pytest.mark.parametrize("field,value,needle", [
    ("family", "toyplug.models:NoSuchFlow", "has no attribute 'NoSuchFlow'"),
    ("reward", "nosuchpkg.rewards:score", "module 'nosuchpkg.rewards' cannot be imported"),
])
def test_a_bad_module_path_is_one_sentence_and_exit_2(tmp_path, field, value, needle):
    recipe = write_plugin(tmp_path, **{field: value})
    env = {k: v for k, v in os.environ.items()  # a fresh process: no rendezvous left by an in-process run
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), ROOT])
    out = subprocess.run([sys.executable, os.path.join(ROOT, "engine", "train.py"), "--config", str(recipe)],
                         capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert needle in out.stderr and out.stderr.strip().count("\n") == 0, out.stderr[-2000:]


def test_after_training_hook_runs_once_after_the_last_epoch(tmp_path, monkeypatch):
    """``eval.after_training: module:callable`` is called as fn(cfg) by train.py after training (the testbed
    recipes name engine.testbed.eval:before_after there); a missing callable is refused before training."""
    recipe = write_plugin(tmp_path)
    (tmp_path / "toyplug" / "hooks.py").write_text(
        "import os\n\n\ndef after(cfg):\n"
        "    open(os.path.join(cfg.run_dir, 'after.txt'), 'a').write(cfg.method + '\\n')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "toyplug" or m.startswith("toyplug.")]:
        monkeypatch.delitem(sys.modules, name)  # an earlier test imported the package from its own tmp_path
    from engine.train import main

    assert main(["--config", str(recipe), "checkpoint.at_end=true", "eval.after_training=toyplug.hooks:after"]) == 0
    assert (tmp_path / "run" / "after.txt").read_text() == "crd\n"
    assert (tmp_path / "run" / "checkpoints").is_dir()
    assert main(["--config", str(recipe), "eval.after_training=toyplug.hooks:missing"]) == 2
