"""GenEval scoring rules on synthetic detections (every tag), the reward's filtering, the transformers detector and
CLIP colour classifier (tiny random models), and the testbed rule detector on rendered scenes."""
import importlib.util
import json
import os
import random

import pytest
import torch

from engine.data import load_prompts
from engine.rewards import Detection, build_reward, build_rewards
from engine.rewards.geneval import GenEvalReward
from engine.rewards.geneval_rules import COLORS, box_iou, relative_position, score_detections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENEVAL_FILE = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "geneval", "test_metadata.jsonl"))


def D(cls, box=(0, 0, 10, 10), color=None, score=1.0):
    return Detection(cls=cls, box=tuple(float(v) for v in box), score=score, color=color)


def both(dets, meta):
    return score_detections(dets, meta, strict=True), score_detections(dets, meta, strict=False)


# ---------------------------------------------------------------- relative position

def test_relative_position_geneval_rule():
    ref = (40, 40, 60, 60)
    assert relative_position((0, 40, 20, 60), ref) == {"left of"}
    assert relative_position((80, 40, 100, 60), ref) == {"right of"}
    assert relative_position((40, 0, 60, 20), ref) == {"above"}  # y grows downwards
    assert relative_position((40, 80, 60, 100), ref) == {"below"}
    assert relative_position((0, 0, 20, 20), ref) == {"left of", "above"}  # a clear diagonal has both
    assert relative_position((41, 40, 61, 60), ref) == set()  # within 0.1 x (sizes): no relation
    assert relative_position((44, 40, 64, 60), ref, threshold=0.0) == {"right of"}
    assert relative_position((44, 40, 64, 60), ref) == set()
    assert relative_position(ref, ref) == set()


def test_box_iou():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0


# ---------------------------------------------------------------- rules, tag by tag

SINGLE = {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}
TWO = {"tag": "two_object", "include": [{"class": "laptop", "count": 1}, {"class": "cow", "count": 1}],
       "prompt": "a photo of a laptop and a cow"}
COUNT = {"tag": "counting", "include": [{"class": "wine glass", "count": 2}],
         "exclude": [{"class": "wine glass", "count": 3}], "prompt": "a photo of two wine glasses"}
COLOR = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"}
POSITION = {"tag": "position", "include": [{"class": "laptop", "count": 1},
                                           {"class": "cow", "count": 1, "position": ["right of", 0]}],
            "prompt": "a photo of a cow right of a laptop"}
COLOR_ATTR = {"tag": "color_attr", "include": [{"class": "handbag", "count": 1, "color": "pink"},
                                               {"class": "scissors", "count": 1, "color": "black"}],
              "prompt": "a photo of a pink handbag and a black scissors"}


def test_single_object():
    assert both([D("dog")], SINGLE) == (1.0, 1.0)
    assert both([D("dog"), D("cat")], SINGLE) == (1.0, 1.0)  # other classes do not matter
    assert both([], SINGLE) == (0.0, 0.0)
    assert both([D("dog"), D("dog")], SINGLE) == (0.0, 0.0)  # count exactly: 1 - |1 - 2| / 1 = 0


def test_two_object():
    assert both([D("cow"), D("laptop")], TWO) == (1.0, 1.0)
    assert both([D("laptop")], TWO) == (0.0, 0.5)
    assert both([D("laptop"), D("cow"), D("cow")], TWO) == (0.0, 0.5)


def test_counting():
    assert both([D("wine glass")] * 2, COUNT) == (1.0, 1.0)
    assert both([D("wine glass")] * 3, COUNT) == (0.0, 0.5)  # the exclude on the included class adds no term
    assert both([D("wine glass")], COUNT) == (0.0, 0.5)
    assert both([D("wine glass")] * 5, COUNT) == (0.0, 0.0)  # clipped at 0 (Flow-GRPO would give -0.5)


def test_colors():
    assert both([D("car", color="red")], COLOR) == (1.0, 1.0)
    assert both([D("car", color="blue")], COLOR) == (0.0, 0.5)
    assert both([D("car", color=None)], COLOR) == (0.0, 0.5)  # unknown colour is not the asked colour
    assert both([D("car", color="red")] * 2, COLOR) == (0.0, 0.0)  # colour term needs the count to hold


def test_position():
    laptop = D("laptop", (40, 40, 60, 60))
    assert both([laptop, D("cow", (80, 40, 100, 60))], POSITION) == (1.0, 1.0)
    assert both([laptop, D("cow", (0, 40, 20, 60))], POSITION) == (0.0, pytest.approx(2 / 3))
    assert both([D("cow", (80, 40, 100, 60))], POSITION) == (0.0, pytest.approx(1 / 3))  # no reference object
    assert both([laptop, D("cow", (42, 40, 62, 60))], POSITION) == (0.0, pytest.approx(2 / 3))  # too close


def test_position_checks_every_pair():
    meta = {"tag": "position", "include": [{"class": "cup", "count": 2},
                                           {"class": "fork", "count": 1, "position": ["below", 0]}], "prompt": "p"}
    cups = [D("cup", (0, 0, 10, 10)), D("cup", (50, 0, 60, 10))]
    assert both(cups + [D("fork", (25, 50, 35, 60))], meta) == (1.0, 1.0)
    # below the first cup only (the second cup is far to its left/right and level): fails
    assert both(cups + [D("fork", (0, 12, 10, 22))], meta)[0] == 0.0


def test_color_attr():
    right = [D("handbag", color="pink"), D("scissors", color="black")]
    swapped = [D("handbag", color="black"), D("scissors", color="pink")]
    assert both(right, COLOR_ATTR) == (1.0, 1.0)
    assert both(swapped, COLOR_ATTR) == (0.0, 0.5)
    assert both(right[:1], COLOR_ATTR) == (0.0, 0.5)


def test_exclude_on_other_class_is_a_term():
    meta = {"tag": "single_object", "include": [{"class": "dog", "count": 1}],
            "exclude": [{"class": "cat", "count": 1}], "prompt": "a dog and no cat"}
    assert both([D("dog")], meta) == (1.0, 1.0)
    assert both([D("dog"), D("cat")], meta) == (0.0, 0.5)


def test_order_of_detections_does_not_matter():
    rng = random.Random(0)
    dets = [D("cup", (rng.uniform(0, 90), rng.uniform(0, 90), 95, 95), rng.choice(COLORS), rng.random())
            for _ in range(6)]
    meta = {"tag": "colors", "include": [{"class": "cup", "count": 6, "color": "red"}], "prompt": "p"}
    ref = both(dets, meta)
    for _ in range(5):
        rng.shuffle(dets)
        assert both(dets, meta) == ref


def perfect_detections(meta):
    """Detections that satisfy a GenEval record exactly (objects on a grid, relations by construction)."""
    offsets = {"left of": (-60, 0), "right of": (60, 0), "above": (0, -60), "below": (0, 60)}
    dets = []
    for req in meta["include"]:
        dx, dy = offsets[req["position"][0]] if "position" in req else (0, 200 * len(dets))
        for n in range(req["count"]):
            x, y = 300 + dx + 15 * n * (dx == 0), 300 + dy
            dets.append(D(req["class"], (x, y, x + 10, y + 10), req.get("color")))
    return dets


def test_every_real_geneval_record_perfect_and_random():
    if not os.path.isfile(GENEVAL_FILE):
        pytest.fail(f"real GenEval metadata {GENEVAL_FILE} is missing (../shared/data must sit beside the repo)")
    records = load_prompts(GENEVAL_FILE).metadata
    classes = sorted({r["class"] for m in records for r in m["include"]})
    rng = random.Random(1)
    for meta in records:
        assert both(perfect_detections(meta), meta) == (1.0, 1.0), meta
    for meta in records[::5]:
        for _ in range(3):
            names = [r["class"] for r in meta["include"]] + rng.sample(classes, 2)
            dets = [D(rng.choice(names), (rng.uniform(0, 400),) * 2 + (420, 420), rng.choice(COLORS + (None,)),
                      rng.random()) for _ in range(rng.randint(0, 5))]
            s, p = both(dets, meta)
            assert s in (0.0, 1.0) and 0.0 <= p <= 1.0
            assert (s == 1.0) == (p == 1.0), (meta, dets)


# ---------------------------------------------------------------- GenEvalReward filtering (fake detector)

class FixedDetector:
    def __init__(self, per_image):
        self.per_image = per_image

    def detect(self, images):
        return [[Detection(d.cls, d.box, d.score, d.color) for d in dets] for dets in self.per_image]


class RedClassifier:
    def __init__(self):
        self.calls = []

    def classify(self, image, boxes, classname, masks=None):
        self.calls.append((classname, len(boxes)))
        return ["red"] * len(boxes)


def test_reward_thresholds_nms_and_colour_classifier():
    images = torch.zeros(3, 3, 16, 16)
    dets = [
        [D("wine glass", score=0.95), D("wine glass", (20, 0, 30, 10), score=0.95), D("wine glass", score=0.5)],
        [D("car", score=0.8)],
        [D("dog", score=0.9), D("dog", (1, 0, 11, 10), score=0.85)],
    ]
    clf = RedClassifier()
    reward = GenEvalReward(FixedDetector(dets), clf, nms_iou=0.5)
    out = reward.score(images, ["p"] * 3, [COUNT, COLOR, SINGLE])
    # counting uses the 0.9 threshold (2 glasses left); the colour comes from the classifier; NMS merges the dogs
    assert out["geneval"].tolist() == [1.0, 1.0, 1.0] and out["geneval_strict"].tolist() == [1.0, 1.0, 1.0]
    assert clf.calls == [("car", 1)]
    no_nms = GenEvalReward(FixedDetector(dets), clf).score(images, ["p"] * 3, [COUNT, COLOR, SINGLE])
    assert no_nms["geneval_strict"].tolist() == [1.0, 1.0, 0.0]
    low = GenEvalReward(FixedDetector(dets), clf, counting_threshold=0.3).score(images, ["p"] * 3,
                                                                                [COUNT, COLOR, SINGLE])
    assert low["geneval"][0] == 0.5
    capped = GenEvalReward(FixedDetector(dets), clf, counting_threshold=0.0, max_objects=2)
    assert capped.score(images, ["p"] * 3, [COUNT, COLOR, SINGLE])["geneval_strict"][0] == 1.0


def test_reward_errors():
    images = torch.zeros(1, 3, 8, 8)
    reward = GenEvalReward(FixedDetector([[D("car", score=0.9)]]))
    with pytest.raises(ValueError, match="asks the colour of 'car'.*no color_classifier"):
        reward.score(images, ["p"], [COLOR])
    with pytest.raises(ValueError, match=r"metadata\[0\]: expected a non-empty list 'include'"):
        reward.score(images, ["p"], [{"tag": "colors", "prompt": "p"}])
    with pytest.raises(TypeError):
        reward.score_differentiable(images, ["p"], [COLOR])


# ---------------------------------------------------------------- transformers detector + CLIP colours (tiny)

LABELS = ["N/A", "person", "dog", "car", "mouse", "keyboard"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from engine.rewards.tiny import save_tiny_clip, save_tiny_detr, save_tiny_mask2former

    root = tmp_path_factory.mktemp("geneval_models")
    return (save_tiny_detr(str(root / "detr"), LABELS), save_tiny_clip(str(root / "clip")),
            save_tiny_mask2former(str(root / "mask2former"), LABELS))


def test_transformers_detector_output_format(tiny_dirs):
    from engine.rewards.detectors import TransformersDetector

    det = TransformersDetector(tiny_dirs[0], shortest_edge=64, longest_edge=96)
    assert "computer mouse" in det.labels and "computer keyboard" in det.labels  # COCO -> GenEval names
    images = torch.rand(3, 3, 40, 56)
    out = det.detect(images)
    assert len(out) == 3 and all(len(d) == 12 for d in out)  # every query, sorted by score
    for dets in out:
        assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
        for d in dets:
            assert isinstance(d, Detection) and d.cls in det.labels and 0.0 <= d.score <= 1.0
            x0, y0, x1, y1 = d.box
            assert 0 <= x0 <= x1 <= 56 and 0 <= y0 <= y1 <= 40
    again = det.detect(images)
    assert [[(d.cls, d.box) for d in x] for x in out] == [[(d.cls, d.box) for d in x] for x in again]
    with pytest.raises(FileNotFoundError, match="no config.json"):
        TransformersDetector(os.path.dirname(tiny_dirs[0]))


def test_mask2former_detector_output_format(tiny_dirs):
    from engine.rewards.detectors import TransformersDetector

    det = TransformersDetector(tiny_dirs[2], shortest_edge=48, longest_edge=80)
    assert det.segmentation and "computer mouse" in det.labels
    images = torch.rand(2, 3, 40, 56)
    out = det.detect(images)
    assert len(out) == 2 and all(1 <= len(d) <= 8 for d in out)
    for dets in out:
        assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
        for d in dets:
            assert d.cls in det.labels and 0.0 <= d.score <= 1.0
            assert d.mask is not None and d.mask.dtype == torch.bool and d.mask.shape == (40, 56)
            ys, xs = d.mask.nonzero(as_tuple=True)
            # the box is exactly the mask's bounding box (exclusive ends)
            assert d.box == (float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1)


def test_clip_color_classifier_and_full_geneval_reward(tiny_dirs):
    from engine.rewards.detectors import ClipColorClassifier

    clf = ClipColorClassifier(tiny_dirs[1])
    image = torch.rand(3, 40, 56)
    colors = clf.classify(image, [(0, 0, 20, 20), (10, 5, 50, 39), (55, 39, 56, 40)], "dog")
    assert len(colors) == 3 and all(c in COLORS for c in colors)
    assert clf.classify(image, [], "dog") == []
    # a mask keeps the object's pixels and greys out the rest, exactly as if the image had been painted so
    mask = torch.zeros(40, 56, dtype=torch.bool)
    mask[5:30, 10:40] = True
    painted = torch.where(mask[None], image, torch.full_like(image, 0x99 / 255))
    box = [(8, 3, 45, 35)]
    assert clf.classify(image, box, "dog", masks=[mask]) == clf.classify(painted, box, "dog")
    pixels = clf.clip.preprocess(painted[None, :, 3:35, 8:45])
    logits = clf.clip.pixel_features(pixels) @ clf._weights("dog").T
    assert clf.classify(painted, box, "dog") == [COLORS[int(logits.argmax())]]
    reward = build_reward({"name": "geneval", "kwargs": {
        "detector_path": tiny_dirs[0], "clip_path": tiny_dirs[1], "threshold": 0.0,
        "detector_kwargs": {"shortest_edge": 64}}})
    meta = [{"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}], "prompt": "a red dog"},
            COUNT]
    out = reward.score(torch.rand(2, 3, 40, 56), ["a red dog", "two wine glasses"], meta)
    assert set(out) == {"geneval", "geneval_strict"}
    assert out["geneval"].shape == (2,) and out["geneval"].dtype == torch.float32
    assert ((out["geneval"] >= 0) & (out["geneval"] <= 1)).all()
    seg = build_reward({"name": "geneval", "kwargs": {
        "detector_path": tiny_dirs[2], "clip_path": tiny_dirs[1], "threshold": 0.0,
        "detector_kwargs": {"shortest_edge": 48}}})
    out = seg.score(torch.rand(2, 3, 40, 56), ["a red dog", "two wine glasses"], meta)
    assert out["geneval"].shape == (2,) and ((out["geneval"] >= 0) & (out["geneval"] <= 1)).all()


# ---------------------------------------------------------------- the testbed rule detector (lazy registry entry)

def test_testbed_geneval_exact_on_rendered_scenes():
    if importlib.util.find_spec("engine.testbed.detector") is None:
        pytest.fail("engine.testbed.detector (the testbed's RuleDetector) is missing")
    from engine.testbed.world import render_metadata

    with open(os.path.join(ROOT, "data", "testbed", "test.jsonl")) as f:
        metadata = [json.loads(line) for line in f if line.strip()]
    images, _ = render_metadata(metadata, seed=0)
    rs = build_rewards([{"name": "testbed_geneval"}])
    out = rs.score(images, [m["prompt"] for m in metadata], metadata)
    assert out["testbed_geneval"].tolist() == [1.0] * len(metadata)
    assert out["testbed_geneval/strict"].tolist() == [1.0] * len(metadata)
    # the same images against other prompts' metadata score lower
    rolled = metadata[1:] + metadata[:1]
    wrong = rs.score(images, [m["prompt"] for m in rolled], rolled)
    assert wrong["testbed_geneval/strict"].mean() < 0.5 and wrong["testbed_geneval"].mean() < 0.9


def test_testbed_classifier_is_registered_lazily():
    from engine.errors import ConfigError
    from engine.rewards.registry import REWARDS, resolve

    assert REWARDS._paths["testbed_classifier"] == "engine.testbed.classifier:ClassifierReward"  # not imported yet
    if importlib.util.find_spec("engine.testbed.classifier") is None:
        with pytest.raises(ConfigError, match="module 'engine.testbed.classifier' cannot be imported"):
            resolve("testbed_classifier")
    else:
        cls = resolve("testbed_classifier")
        assert getattr(cls, "differentiable", None) is True
