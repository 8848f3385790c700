"""The in-process VLM judge (``vlm_yesno`` and FDFO's presets) on a tiny random Qwen2-VL built from config with a
local BPE tokenizer (no downloads, no torchvision): the torch patches equal the image processor's, the score is the
hand-computed ``100 * sigmoid(logit_Yes - logit_No)`` of a direct forward, batching equals one by one, a tokenizer
that splits "Yes" is refused, reward gradients for DIDR, the judge served over HTTP, and an FDFO epoch on tiny SD3
with FDFO's "combined" reward (PickScore + 0.1 x VLM alignment)."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from engine.errors import ConfigError
from engine.rewards import RemoteReward, build_reward, build_rewards
from engine.rewards.vlm import QWEN_TEMPLATE, VLM_ALIGNMENT_EVAL_QUESTION, VLM_QUESTIONS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
PROMPTS = ["a red dog", "two blue squares above a circle", "an elephant", "a cat", "a photo of a red dog"]
SIZE = 56  # 4 x 4 patches of 14 -> 4 LLM tokens per image (merge 2)


def save_tiny_qwen2_vl(path, *, yes_single_token: bool = True, seed: int = 0, with_model: bool = True) -> str:
    """A random 2-layer Qwen2VLForConditionalGeneration + a character BPE tokenizer with Qwen's special tokens
    (merges make "Yes" and "No" single tokens; without the "Y"+"es" merge "Yes" is two) + the PIL image processor."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    os.makedirs(path, exist_ok=True)
    vocab = {t: i for i, t in enumerate(SPECIAL)}
    for ch in ["\n"] + [chr(i) for i in range(32, 127)]:
        vocab.setdefault(ch, len(vocab))
    merges = [("e", "s"), ("N", "o")] + ([("Y", "es")] if yes_single_token else [])
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=merges)),
                                  pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                  additional_special_tokens=SPECIAL[1:])
    tok.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=112 * 112).save_pretrained(path)
    if with_model:
        ids = {t: vocab[t] for t in SPECIAL}
        cfg = Qwen2VLConfig(
            text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, bos_token_id=None,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "mrope_section": [2, 3, 3]},  # sums to head_dim / 2 = 8
                             eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
            vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
        torch.manual_seed(seed)
        Qwen2VLForConditionalGeneration(cfg).save_pretrained(path)
    return str(path)


LLAVA_TEMPLATE = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
                  "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
                  "{% if add_generation_prompt %} ASSISTANT:{% endif %}")


def save_tiny_llava(path) -> str:
    """A random LlavaForConditionalGeneration (CLIP vision tower, Llama text model) with a LlavaProcessor whose CLIP
    image processor is not Qwen2-VL-style: the judge must take the (numpy) processor path."""
    from tokenizers import Tokenizer, models
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vocab = {t: i for i, t in enumerate(["<pad>", "<image>", "<s>", "</s>"])}
    for ch in ["\n"] + [chr(i) for i in range(32, 127)]:
        vocab.setdefault(ch, len(vocab))
    merges = [("e", "s"), ("N", "o"), ("Y", "es")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=merges)),
                                  pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  additional_special_tokens=["<image>"])
    LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 28},
                                                         crop_size={"height": 28, "width": 28}),
                   tokenizer=tok, patch_size=14, vision_feature_select_strategy="default", image_token="<image>",
                   num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE).save_pretrained(path)
    cfg = LlavaConfig(vision_config=dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14),
                      text_config=dict(model_type="llama", vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                       pad_token_id=0),
                      image_token_index=vocab["<image>"], vision_feature_layer=-1,
                      vision_feature_select_strategy="default")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return save_tiny_qwen2_vl(tmp_path_factory.mktemp("vlm") / "qwen2vl")


@pytest.fixture(scope="module")
def judge(vlm_dir):
    return build_reward({"name": "vlm_alignment", "kwargs": {"path": vlm_dir, "dtype": "float32",
                                                             "image_size": SIZE}})


def images(n=5, h=64, w=48, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_presets_are_the_official_questions():
    # NVlabs/finite-difference-flow-optimization@740e22f: fdfo/config.py:73 (trained), eval/calculate_metrics.py:28-30
    assert VLM_QUESTIONS == {
        "vlm_alignment": 'Does this image match the caption "{prompt}"? Answer Yes or No.',
        "vlm_quality": "Is this image of professional quality? Answer with Yes or No.",
        "vlm_photo": "Does this image look photorealistic? Answer with Yes or No.",
    }
    assert VLM_ALIGNMENT_EVAL_QUESTION == 'Does this image match the caption "{prompt}"? Answer with Yes or No.'
    # fdfo/rewards.py:89
    assert QWEN_TEMPLATE == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                             "<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n"
                             "<|im_start|>assistant\n")


def test_torch_patches_equal_the_image_processor(judge):
    """The differentiable patchify is the processor's own arithmetic (fdfo/rewards.py:93-95: no rescale/resize)."""
    from transformers import AutoImageProcessor

    x = images(3, SIZE, SIZE)
    ours, grid = judge.pixel_patches(x)
    ref = AutoImageProcessor.from_pretrained(judge.model.name_or_path)(
        images=list(x), do_rescale=False, do_resize=False, return_tensors="pt")
    assert torch.equal(grid, ref["image_grid_thw"])
    torch.testing.assert_close(ours, ref["pixel_values"], rtol=0, atol=1e-6)


def test_score_is_the_hand_computed_yes_no_logit_difference(judge, vlm_dir):
    """Batched, left-padded reward scores == one direct forward per image, unpadded, with the official formula
    ``100 * sigmoid(logits[-1, vocab["Yes"]] - logits[-1, vocab["No"]])`` (fdfo/rewards.py:98-100)."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    tok, ip = AutoTokenizer.from_pretrained(vlm_dir), AutoImageProcessor.from_pretrained(vlm_dir)
    model = AutoModelForImageTextToText.from_pretrained(vlm_dir, dtype=torch.float32).eval()
    vocab = tok.get_vocab()
    x = images()
    got = judge.score(x, PROMPTS, [{}] * 5)["vlm_alignment"]
    assert got.shape == (5,) and got.dtype == torch.float32
    want = []
    for img, prompt in zip(x, PROMPTS):
        small = F.interpolate(img[None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        pix = ip(images=[small[0]], do_rescale=False, do_resize=False, return_tensors="pt")
        n_img = int(pix["image_grid_thw"][0].prod()) // 4
        text = ('<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>'
                + "<|image_pad|>" * n_img + f'<|vision_end|>Does this image match the caption "{prompt}"? '
                'Answer Yes or No.<|im_end|>\n<|im_start|>assistant\n')
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=pix["pixel_values"], image_grid_thw=pix["image_grid_thw"],
                           mm_token_type_ids=(ids == vocab["<|image_pad|>"]).int()).logits[0, -1]
        want.append(100 * torch.sigmoid(logits[vocab["Yes"]] - logits[vocab["No"]]))
    torch.testing.assert_close(got, torch.stack(want), rtol=0, atol=1e-4)
    assert got.std() > 0.01 and ((got > 0) & (got < 100)).all()


def test_batching_equals_one_by_one_and_is_deterministic(judge, vlm_dir):
    x = images()
    full = judge.score(x, PROMPTS, [{}] * 5)["vlm_alignment"]
    assert torch.equal(full, judge.score(x, PROMPTS, [{}] * 5)["vlm_alignment"])
    singles = torch.cat([judge.score(x[i:i + 1], PROMPTS[i:i + 1], [{}])["vlm_alignment"] for i in range(5)])
    torch.testing.assert_close(full, singles, rtol=0, atol=1e-4)
    small = build_reward({"name": "vlm_alignment", "kwargs": {"path": vlm_dir, "dtype": "float32",
                                                              "image_size": SIZE, "batch_size": 2}})
    torch.testing.assert_close(full, small.score(x, PROMPTS, [{}] * 5)["vlm_alignment"], rtol=0, atol=1e-4)
    # the prompt is in the alignment question; the quality question ignores it
    same = x[:1].expand(3, -1, -1, -1)
    align = judge.score(same, PROMPTS[:3], [{}] * 3)["vlm_alignment"]
    assert len(set(align.tolist())) == 3
    quality = build_reward({"name": "vlm_quality", "kwargs": {"path": vlm_dir, "dtype": "float32", "image_size": SIZE}})
    q = quality.score(same, PROMPTS[:3], [{}] * 3)["vlm_quality"]
    assert torch.equal(q, q[:1].expand(3)) and not torch.allclose(q, align[:1])


def test_a_tokenizer_that_splits_yes_is_refused(tmp_path, vlm_dir):
    bad = save_tiny_qwen2_vl(tmp_path / "bad", yes_single_token=False, with_model=False)
    with pytest.raises(ConfigError, match=r"the answer 'Yes' is 2 token\(s\) \['Y', 'es'\]"):
        build_rewards([{"name": "vlm_alignment", "kwargs": {"path": bad}}])
    with pytest.raises(ConfigError, match="the answer 'Maybe' is 5 token"):
        build_reward({"name": "vlm_yesno", "kwargs": {"path": vlm_dir, "question": "Ok?", "yes": "Maybe"}})
    with pytest.raises(ConfigError, match="may only hold the field"):
        build_reward({"name": "vlm_yesno", "kwargs": {"path": vlm_dir, "question": "Is {subject} here?"}})
    with pytest.raises(ConfigError, match="preset's own"):
        build_reward({"name": "vlm_photo", "kwargs": {"path": vlm_dir, "question": "Is it?"}})
    with pytest.raises(ConfigError, match="bad kwargs"):
        build_reward({"name": "vlm_photo", "kwargs": {"path": vlm_dir, "colour": "red"}})


def test_judge_is_frozen_and_differentiable_for_didr(judge, vlm_dir):
    from engine.methods.didr.math import check_reward

    assert not any(p.requires_grad for p in judge.model.parameters()) and not judge.model.training
    assert judge.differentiable
    x = images(3).requires_grad_(True)
    s = judge.score_differentiable(x, PROMPTS[:3], [{}] * 3)
    torch.testing.assert_close(s.detach(), judge.score(x.detach(), PROMPTS[:3], [{}] * 3)["vlm_alignment"],
                               rtol=0, atol=1e-5)
    s[1].backward()
    assert torch.isfinite(x.grad).all() and x.grad[1].abs().sum() > 0
    assert x.grad[0].abs().sum() == 0 and x.grad[2].abs().sum() == 0  # image i moves only score i
    assert not any(p.grad is not None for p in judge.model.parameters())
    check_reward(build_rewards([{"name": "vlm_alignment", "kwargs": {"path": vlm_dir, "dtype": "float32",
                                                                     "image_size": SIZE}}]))
    # declared non-differentiable (what a numpy processor path is): DIDR refuses it at startup, naming it
    frozen = build_rewards([{"name": "vlm_alignment", "kwargs": {"path": vlm_dir, "differentiable": False}}])
    with pytest.raises(ConfigError, match=r"DIDR needs a differentiable reward.*\['vlm_alignment'\]"):
        check_reward(frozen)
    with pytest.raises(TypeError, match="not differentiable"):
        frozen.components[0].reward.score_differentiable(images(1), PROMPTS[:1], [{}])


def test_judge_served_by_the_reward_server_equals_in_process(judge):
    """``python -m engine.rewards.server --reward vlm_alignment`` serves it unchanged: 8-bit images score the same."""
    from engine.rewards.server import RewardServer

    x = torch.randint(0, 256, (4, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(1)).float() / 255
    local = judge.score(x, PROMPTS[:4], [{}] * 4)["vlm_alignment"]
    with RewardServer(judge, port=0) as server:
        remote = build_rewards([{"name": "vlm_alignment", "backend": "remote",
                                 "kwargs": {"url": server.url, "timeout": 30, "retries": 0}}])
        out = remote.score(x, PROMPTS[:4], [{}] * 4)
        assert isinstance(remote.components[0].reward, RemoteReward)
    assert torch.equal(out["vlm_alignment"], local) and out["valid"].all()


def _recipe_rewards(recipe: str) -> list[dict]:
    from engine.config import load_config
    return [{"name": s.name, "weight": s.weight, "kwargs": dict(s.kwargs)}
            for s in load_config(os.path.join(ROOT, recipe)).rewards]


def test_fdfo_recipes_are_the_official_presets():
    """fdfo/config.py:78-89: pickscore = PickScore x 1; vlm_alignment = VLM x 1; combined = PickScore x 1 +
    VLM x 0.1."""
    presets = {"configs/sd35m_pickscore_fdfo.yaml": [("pickscore", 1.0)],
               "configs/sd35m_vlm_alignment_fdfo.yaml": [("vlm_alignment", 1.0)],
               "configs/sd35m_combined_fdfo.yaml": [("pickscore", 1.0), ("vlm_alignment", 0.1)]}
    for recipe, want in presets.items():
        specs = _recipe_rewards(recipe)
        assert [(s["name"], s["weight"]) for s in specs] == want, recipe
        for s in specs:  # PickScore in float32 (fdfo/rewards.py:72), the VLM in bf16 at 504 px (rewards.py:52-54, 88)
            assert s["kwargs"]["dtype"] == ("float32" if s["name"] == "pickscore" else "bfloat16"), recipe
            if s["name"] == "vlm_alignment":
                assert s["kwargs"].get("image_size", 504) == 504
        from engine.batch import derive_batch
        from engine.config import load_config
        cfg = load_config(os.path.join(ROOT, recipe))
        # the official trainer's defaults (fdfo/config.py:13-30, 116-123): 40 steps, no CFG, churn 0.0025, clip 3e-2
        assert (cfg.algo.num_steps, cfg.algo.cfg_scale, cfg.algo.gamma, cfg.algo.clip) == (40, 1.0, 0.0025, 0.03)
        assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.gradient_steps_per_epoch) == (3e-5, 1e-4, 4)
        for world in (1, 2, 4, 8):
            derive_batch(world, cfg.data.prompts_per_epoch, cfg.data.group_size, cfg.train.micro_batch_size,
                         cfg.train.gradient_steps_per_epoch, 1, exact_groups=False)


@pytest.mark.slow
def test_fdfo_epoch_on_tiny_sd3_with_the_combined_reward(tmp_path, vlm_dir):
    """One FDFO epoch on tiny SD3 trained on the combined recipe's rewards (its names and weights), with a tiny
    PickScore and the tiny judge: both components logged, the total is their weighted sum, updates happen."""
    from engine.rewards.tiny import save_tiny_clip
    from models.tiny import save_tiny_sd3
    from tests.test_engine_helpers import run_config
    from tests.test_fdfo_engine import CONFIG, fdfo_overrides, records

    clip = save_tiny_clip(str(tmp_path / "clip"), image_size=32, projection_dim=16)
    tiny = {"pickscore": {"path": clip, "tokenizer_path": clip, "dtype": "float32"},
            "vlm_alignment": {"path": vlm_dir, "dtype": "float32", "image_size": SIZE}}
    specs = [{**s, "kwargs": tiny[s["name"]]} for s in _recipe_rewards("configs/sd35m_combined_fdfo.yaml")]
    run = str(tmp_path / "run")
    last = run_config(fdfo_overrides(run, **{"model.family": "sd3", "model.path": str(save_tiny_sd3(tmp_path / "sd3")),
                                             "model.random_init": "false", "model.resolution": 16,
                                             "train.epochs": 1, "rewards": json.dumps(specs)}), config=CONFIG)
    steps = records(run)
    assert len(steps) == 2 and steps[0]["ratio_first_dev/max"] == 0.0 and all(s["grad_norm"] > 0 for s in steps)
    epoch = records(run, "epoch")[0]
    assert epoch["reward/bad_samples"] == 0
    pick, vlm = last["reward/pickscore/mean"], last["reward/vlm_alignment/mean"]
    assert 0 < vlm < 100
    assert last["reward/mean"] == pytest.approx(pick + 0.1 * vlm, rel=1e-5, abs=1e-5)


def test_any_chat_vlm_through_its_processor_is_scored_and_declared_non_differentiable(tmp_path):
    """A LLaVA judge (CLIP image processor): processor path with its chat template, left padding, the hand-computed
    score one by one, and DIDR refuses it at startup (the processor works in numpy)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from engine.methods.didr.math import check_reward

    path = save_tiny_llava(tmp_path / "llava")
    rs = build_rewards([{"name": "vlm_yesno", "kwargs": {"path": path, "dtype": "float32", "image_size": 28,
                                                         "question": "Is this {prompt}? Answer Yes or No."}}])
    r = rs.components[0].reward
    assert r.preprocess == "processor" and not r.differentiable
    x = images(3)
    got = r.score(x, PROMPTS[:3], [{}] * 3)["vlm_yesno"]
    proc, model = AutoProcessor.from_pretrained(path), AutoModelForImageTextToText.from_pretrained(path).eval()
    yes, no = proc.tokenizer.convert_tokens_to_ids("Yes"), proc.tokenizer.convert_tokens_to_ids("No")
    want = []
    for img, prompt in zip(x, PROMPTS[:3]):
        text = f"USER: <image>\nIs this {prompt}? Answer Yes or No. ASSISTANT:"
        small = F.interpolate(img[None], size=(28, 28), mode="bilinear", align_corners=False)[0]
        inputs = proc(text=[text], images=[small], images_kwargs={"do_rescale": False, "do_resize": False},
                      return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]
        want.append(100 * torch.sigmoid(logits[yes] - logits[no]))
    torch.testing.assert_close(got, torch.stack(want), rtol=0, atol=1e-4)
    with pytest.raises(ConfigError, match=r"DIDR needs a differentiable reward.*\['vlm_yesno'\]"):
        check_reward(rs)
    with pytest.raises(ConfigError, match="needs a Qwen2-VL-style image processor"):
        build_reward({"name": "vlm_yesno", "kwargs": {"path": path, "question": "Ok?", "preprocess": "torch"}})
