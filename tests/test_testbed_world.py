"""Testbed world: renderer, prompt splits and the rule detector (exact on rendered ground truth)."""
import json
import os

import numpy as np
import pytest
import torch

from engine.data import load_prompts
from engine.testbed import world
from engine.testbed.detector import RuleDetector
from engine.testbed.world import (COLORS, FAMILIES, SHAPES, SceneObject, build_splits, render_metadata,
                                  render_objects, scene_for)

from engine.rewards.geneval_rules import score_detections  # the GenEval rules live once, in their own module

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def strict_ok(dets, meta) -> bool:
    return score_detections(dets, meta, strict=True) == 1.0


_wrong = world.perturb_metadata


def test_committed_prompt_files_match_the_generator():
    train, test = build_splits()
    for name, split in (("train", train), ("test", test)):
        assert load_prompts(os.path.join(REPO, "data", "testbed", f"{name}.jsonl")).metadata == \
            json.loads(json.dumps(split))
    assert 100 <= len(train) <= 400 and 60 <= len(test) <= 200
    for split in (train, test):
        assert {m["tag"] for m in split} == set(FAMILIES)


def test_splits_are_disjoint_in_attribute_combinations():
    train, test = build_splits()
    train_prompts = {m["prompt"] for m in train}
    train_keys = set().union(*(world.combination_keys(m) for m in train))
    for meta in test:
        if meta["tag"] == "single_object":  # a single attribute is not a combination: shared by design
            assert meta["prompt"] in train_prompts
            continue
        assert meta["prompt"] not in train_prompts
        keys = world.combination_keys(meta)
        assert keys and not (keys <= train_keys), meta["prompt"]
    # every held-out binding / pair / count / arrangement really is absent from training prompts
    train_bindings = {(k[1], k[2]) for k in train_keys if k[0] == "binding"}
    assert not (train_bindings & world.HELD_OUT_COLOR_SHAPE)
    assert not ({k[1] for k in train_keys if k[0] == "pair"} & world.HELD_OUT_SHAPE_PAIRS)
    assert not ({(k[1], k[2]) for k in train_keys if k[0] == "count"} & world.HELD_OUT_COUNTS)
    assert not ({k[1] for k in train_keys if k[0] == "arrangement"} & world.HELD_OUT_ARRANGEMENTS)
    # and every word of every prompt is in the tokenizer vocabulary
    vocab = set(world.vocabulary_words())
    assert all(set(m["prompt"].split()) <= vocab for m in train + test)


def test_renderer_is_deterministic_and_flat():
    train, test = build_splits()
    metas = (train + test)[::7]
    a, scenes_a = render_metadata(metas, seed=123)
    b, scenes_b = render_metadata(metas, seed=123)
    c, _ = render_metadata(metas, seed=124)
    assert a.shape == (len(metas), 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and scenes_a == scenes_b
    assert not torch.equal(a, c)
    palette = torch.tensor(list(COLORS.values()) + [world.BACKGROUND])
    pix = a.permute(0, 2, 3, 1).reshape(-1, 3)
    assert ((pix[:, None] - palette[None]).abs().sum(-1) == 0).any(-1).all()  # every pixel is a palette colour


def test_scenes_respect_gaps_and_metadata():
    rng = np.random.default_rng(0)
    train, test = build_splits()
    for meta in (train + test):
        scene = scene_for(meta, rng)
        assert len(scene) == sum(r["count"] for r in meta["include"])
        for i, o in enumerate(scene):
            assert all(world._boxes_clear(o.box, [p.box]) for p in scene[i + 1:])


@pytest.mark.parametrize("family", FAMILIES)
def test_detector_exact_on_rendered_ground_truth(family):
    train, test = build_splits()
    fam = [m for m in train + test if m["tag"] == family]
    rng = np.random.default_rng(FAMILIES.index(family))
    metas = [fam[i] for i in rng.integers(0, len(fam), 150)]
    images, scenes = render_metadata(metas, seed=7 + FAMILIES.index(family))
    dets = RuleDetector().detect(images)
    for meta, scene, found in zip(metas, scenes, dets):
        truth = sorted((o.shape, o.color, tuple(float(v) for v in o.box)) for o in scene)
        assert sorted((d.cls, d.color, d.box) for d in found) == truth, meta["prompt"]
        assert strict_ok(found, meta), meta["prompt"]
        assert not strict_ok(found, _wrong(meta, scene, rng)), meta["prompt"]


def test_detector_on_random_scenes_and_edge_cases():
    rng = np.random.default_rng(5)
    scenes = [world.random_scene(rng) for _ in range(300)]
    images = torch.from_numpy(np.stack([render_objects(s) for s in scenes]))
    det = RuleDetector()
    for scene, found in zip(scenes, det.detect(images)):
        assert sorted((d.cls, d.color) for d in found) == sorted((o.shape, o.color) for o in scene)
    # objects at the canvas border, both size extremes
    edge = [SceneObject("triangle", "red", (0, 0, 7, 7)), SceneObject("circle", "blue", (18, 18, 32, 32)),
            SceneObject("square", "cyan", (0, 25, 7, 32))]
    assert sorted((d.cls, d.color) for d in det.detect(torch.from_numpy(render_objects(edge))[None])[0]) == \
        sorted((o.shape, o.color) for o in edge)
    # a blank canvas and off-palette grey have no objects; tiny specks are ignored
    grey = torch.full((2, 3, 32, 32), 0.5)
    speck = torch.ones(1, 3, 32, 32)
    speck[0, 1:, 5:7, 5:7] = 0.0  # a 2x2 red speck
    assert det.detect(torch.cat([grey, speck, torch.ones(1, 3, 32, 32)])) == [[], [], [], []]
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        det.detect(torch.ones(3, 32, 32))


def test_detector_tolerates_sampling_noise():
    rng = np.random.default_rng(11)
    scenes = [world.random_scene(rng) for _ in range(200)]
    images = torch.from_numpy(np.stack([render_objects(s) for s in scenes]))
    noisy = (images + 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    found = RuleDetector().detect(noisy)
    exact = np.mean([sorted((d.cls, d.color) for d in f) == sorted((o.shape, o.color) for o in s)
                     for s, f in zip(scenes, found)])
    assert exact >= 0.98


def test_testbed_geneval_reward_scores_rendered_scenes():
    from engine.testbed.detector import build_testbed_geneval_reward

    reward = build_testbed_geneval_reward()
    train, test = build_splits()
    metas = (train + test)[::5]
    images, scenes = render_metadata(metas, seed=3)
    out = reward.score(images, [m["prompt"] for m in metas], metas)
    assert torch.equal(out["testbed_geneval_strict"], torch.ones(len(metas)))
    assert torch.equal(out["testbed_geneval"], torch.ones(len(metas)))
    rng = np.random.default_rng(0)
    wrong = [_wrong(m, s, rng) for m, s in zip(metas, scenes)]
    bad = reward.score(images, [m["prompt"] for m in wrong], wrong)
    assert bad["testbed_geneval_strict"].sum() == 0 and (bad["testbed_geneval"] < 1).all()
