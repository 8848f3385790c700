"""The committed testbed base model: loads, is small, and is clearly imperfect on the held-out prompts."""
import json
import os

import pytest
import torch

from engine.data import load_prompts
from engine.testbed.pretrain import PretrainConfig, make_batch
from engine.testbed import world
from models.testbed import TestbedModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(REPO, "checkpoints", "testbed", "base")
# The committed checkpoint (stage 3) on every test prompt x 2 samples, noise seed 0, 10-step Euler, no CFG (measured
# 2026-11-22, see checkpoints/testbed/base/README.md): GenEval partial credit 0.405, strict 0.199 per sample (stage 2:
# 0.324 / 0.131). The band allows for float differences across thread counts / CPUs flipping a few borderline
# samples. Per-sample strict accuracy is below the family mean (0.334) because 70 of the 88 held-out prompts are
# two-colour bindings, the hardest family; the band states what is committed.
BASE_PARTIAL = 0.405
PARTIAL_BAND = 0.06
BASE_STRICT_MAX = 0.25


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(path) for f in files)


@pytest.fixture(scope="module")
def base():
    return TestbedModel.from_pretrained(BASE)


def test_base_checkpoint_loads_small_and_frozen_text(base):
    assert _dir_bytes(BASE) < 20 * 2 ** 20  # ~19 MB: fp16 weights (9.3M parameters), loaded as fp32
    assert next(base.transformer.parameters()).dtype == torch.float32
    assert not base.config.train_text_encoder  # RL caches prompt embeddings
    info = json.loads(open(os.path.join(BASE, "pretrain.json")).read())
    assert info["step"] > 0 and "config" in info
    assert set(world.vocabulary_words()) <= set(base.tokenizer.get_vocab())


def test_base_geneval_scores_are_in_their_stated_band(base):
    from engine.testbed.detector import build_testbed_geneval_reward
    from engine.testbed.pretrain import generate

    test = load_prompts(os.path.join(REPO, "data", "testbed", "test.jsonl")).metadata
    metas = [m for m in test for _ in range(2)]
    images = generate(base, [m["prompt"] for m in metas], seed=0)
    scores = build_testbed_geneval_reward().score(images, [m["prompt"] for m in metas], metas)
    partial, strict = float(scores["testbed_geneval"].mean()), float(scores["testbed_geneval_strict"].mean())
    assert abs(partial - BASE_PARTIAL) <= PARTIAL_BAND, (partial, strict)
    assert strict <= BASE_STRICT_MAX, (partial, strict)  # clearly imperfect: room for RL
    # far better than the untrained network (which scores 0 on both)
    assert partial >= 0.2


def test_pretraining_batches_are_a_pure_function_of_seed_and_step():
    cfg = PretrainConfig(batch_size=8)
    prompts = world.FamilyBalancedPrompts(load_prompts(os.path.join(REPO, cfg.train_prompts)).metadata)
    a, b, c = make_batch(prompts, 5, cfg), make_batch(prompts, 5, cfg), make_batch(prompts, 6, cfg)
    assert all(torch.equal(x, y) for x, y in zip(a[::2], b[::2])) and a[1] == b[1]
    assert not torch.equal(a[0], c[0])
    test_prompts = {m["prompt"] for m in load_prompts(os.path.join(REPO, cfg.eval_prompts)).metadata}
    shared = {m["prompt"] for m in world.build_splits()[0] if m["tag"] == "single_object"}
    assert not (set(a[1]) - {""}) & (test_prompts - shared)  # pretraining never sees a held-out prompt


def test_pretraining_resumes_bit_for_bit(tmp_path):
    from safetensors.torch import load_file

    from engine.testbed.pretrain import pretrain

    tiny = dict(patch_size=8, num_layers=1, num_attention_heads=2, attention_head_dim=8, text_width=16,
                text_layers=1, text_heads=2, text_intermediate=32, max_length=12)
    common = dict(steps=4, batch_size=4, warmup_steps=2, eval_every=0, save_every=2, log_every=2, model=tiny,
                  train_prompts=os.path.join(REPO, "data/testbed/train.jsonl"),
                  eval_prompts=os.path.join(REPO, "data/testbed/test.jsonl"))
    pretrain(PretrainConfig(out=str(tmp_path / "a"), state_dir=str(tmp_path / "sa"), **common))
    pretrain(PretrainConfig(out=str(tmp_path / "b"), state_dir=str(tmp_path / "sb"), stop_after=2, **common))
    assert json.loads((tmp_path / "b" / "pretrain.json").read_text())["step"] == 2
    pretrain(PretrainConfig(out=str(tmp_path / "b"), state_dir=str(tmp_path / "sb"), **common))  # resumes at 2
    for sub in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(str(tmp_path / "a" / sub)), load_file(str(tmp_path / "b" / sub))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loaded = TestbedModel.from_pretrained(tmp_path / "b")
    assert not loaded.config.train_text_encoder
