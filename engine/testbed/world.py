"""The testbed world: vocabulary, a procedural renderer of flat shapes, and GenEval-style prompt families.

Images are 32x32 RGB in [0, 1]: flat, fully saturated shapes (palette colours are corners of the RGB cube, so any
two are at distance >= 1 and segmentation by nearest palette colour is exact) on a white background, no
anti-aliasing, no overlaps (bounding boxes at least ``GAP`` pixels apart). Everything is deterministic from a seed.

Prompts follow GenEval's six tags and metadata format (``tag``, ``include`` [{class, count, color?, position?}],
``exclude``, ``prompt``), so the GenEval scoring rules read testbed and real GenEval files alike and
``engine.data.load_prompts`` reads them back. The train/test split is disjoint in attribute combinations: held-out
colour-shape bindings, shape pairs, count-shape pairs and spatial arrangements only ever appear in test prompts
(``single_object`` names a single attribute, so its three prompts are shared by both splits).

CLI: ``python -m engine.testbed.world --out data/testbed`` writes ``train.jsonl`` and ``test.jsonl``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np
import torch

from engine.data.geneval import GENEVAL_TAGS, RELATIONS
from engine.rewards.geneval_rules import relative_position

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
# name -> RGB in [0, 1]; corners of the RGB cube (pairwise distance >= 1, and >= 1 from the background)
COLORS = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "purple": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
}
BACKGROUND = (1.0, 1.0, 1.0)
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
FAMILIES = GENEVAL_TAGS  # the prompt families are GenEval's six tags (and its RELATIONS, imported above)
COUNTING_RANGE = (2, 3, 4)  # GenEval's counting family uses 2..4 (one object is single_object)

MIN_SIZE = 7  # below 7 px a rasterised circle fills > 0.85 of its box and is hard to tell from a square
GAP = 2  # minimum empty pixels between two objects' bounding boxes (components never touch)

# Held-out attribute combinations: they appear only in test prompts.
HELD_OUT_COLOR_SHAPE = frozenset({("red", "triangle"), ("green", "circle"), ("blue", "square"),
                                  ("yellow", "circle")})
HELD_OUT_SHAPE_PAIRS = frozenset({frozenset({"circle", "triangle"})})
HELD_OUT_COUNTS = frozenset({("circle", 3), ("square", 4), ("triangle", 2)})
# spatial arrangements (first, axis, second) meaning "first is left of / above second"; both phrasings held out
HELD_OUT_ARRANGEMENTS = frozenset({("circle", "h", "square"), ("triangle", "v", "circle"),
                                   ("square", "h", "triangle")})


def vocabulary_words() -> list[str]:
    """Every word any testbed prompt uses (sorted); the word-level tokenizer is built from this list."""
    words = {"a", "and"}
    words.update(SHAPES)
    words.update(PLURALS.values())
    words.update(COLORS)
    words.update(COUNT_WORDS.values())
    for rel in RELATIONS:
        words.update(rel.split())
    return sorted(words)


# ----------------------------------------------------------------------------------------------------- rendering
@lru_cache(maxsize=None)
def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean [size, size] mask of ``shape`` filling a ``size`` x ``size`` box (pixel centres tested)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    c = (np.arange(size) + 0.5) - size / 2.0  # pixel-centre offsets from the box centre
    yy, xx = np.meshgrid(c, c, indexing="ij")
    if shape == "square":
        mask = np.ones((size, size), bool)
    elif shape == "circle":
        mask = xx ** 2 + yy ** 2 <= (size / 2.0) ** 2
    else:  # isosceles triangle, apex at the top centre, base on the bottom row
        rows = np.arange(size)[:, None] + 1.0  # 1 .. size
        mask = np.abs(xx) <= rows / size * (size / 2.0)
    mask.setflags(write=False)
    return mask


@dataclass(frozen=True)
class SceneObject:
    """One rendered object: its shape, colour name and bounding box ``(x0, y0, x1, y1)`` (x1, y1 exclusive)."""

    shape: str
    color: str
    box: tuple[int, int, int, int]

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2.0, (y0 + y1) / 2.0


def render_objects(objects: Sequence[SceneObject], size: int = IMAGE_SIZE) -> np.ndarray:
    """Paint ``objects`` on a background canvas -> float32 [3, size, size] in [0, 1] (no anti-aliasing)."""
    canvas = np.empty((3, size, size), np.float32)
    canvas[:] = np.asarray(BACKGROUND, np.float32)[:, None, None]
    for obj in objects:
        x0, y0, x1, y1 = obj.box
        if x1 - x0 != y1 - y0 or x0 < 0 or y0 < 0 or x1 > size or y1 > size:
            raise ValueError(f"object box {obj.box} must be a square inside the {size}x{size} canvas")
        mask = shape_mask(obj.shape, x1 - x0)
        region = canvas[:, y0:y1, x0:x1]
        region[:, mask] = np.asarray(COLORS[obj.color], np.float32)[:, None]
    return canvas


def _boxes_clear(box, others) -> bool:
    x0, y0, x1, y1 = box
    return all(x1 + GAP <= b[0] or b[2] + GAP <= x0 or y1 + GAP <= b[1] or b[3] + GAP <= y0 for b in others)


def _max_size(n_objects: int) -> int:
    return {1: 14, 2: 12, 3: 10}.get(n_objects, 9)


def geneval_relations(box_a, box_b, threshold: float = 0.1) -> set[str]:
    """GenEval's relative position of box a w.r.t. box b: the one shared rule of ``engine.rewards.geneval_rules``."""
    return relative_position([float(v) for v in box_a], [float(v) for v in box_b], threshold)


def _clear_relation(box_a, box_b, rel: str) -> bool:
    """``rel`` holds for a w.r.t. b with margin (normalised revised offset beyond 0.7, the rule needs 0.5)."""
    a, b = np.asarray(box_a, np.float64), np.asarray(box_b, np.float64)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    dims = (a[2:] - a[:2]) + (b[2:] - b[:2])
    revised = np.maximum(np.abs(offset) - 0.1 * dims, 0) * np.sign(offset)
    norm = np.linalg.norm(offset)
    if norm < 1e-6:
        return False
    dx, dy = revised / norm
    return {"left of": dx < -0.7, "right of": dx > 0.7, "above": dy < -0.7, "below": dy > 0.7}[rel]


def place_objects(specs: Sequence[tuple[str, str]], rng: np.random.Generator, *,
                  relation: tuple[str, int, int] | None = None, size: int = IMAGE_SIZE,
                  max_tries: int = 200) -> list[SceneObject]:
    """Random non-overlapping placement of ``specs`` [(shape, colour)]; optionally ``relation`` =
    (rel, i, j): object i must be ``rel`` object j (with margin). Raises RuntimeError if no layout is found."""
    hi = _max_size(len(specs))
    for _ in range(max_tries):
        boxes: list[tuple[int, int, int, int]] = []
        for _spec in specs:
            for _attempt in range(50):
                s = int(rng.integers(MIN_SIZE, hi + 1))
                x0, y0 = int(rng.integers(0, size - s + 1)), int(rng.integers(0, size - s + 1))
                box = (x0, y0, x0 + s, y0 + s)
                if _boxes_clear(box, boxes):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) != len(specs):
            continue
        if relation is not None:
            rel, i, j = relation
            if not _clear_relation(boxes[i], boxes[j], rel):
                continue
        return [SceneObject(shape, color, box) for (shape, color), box in zip(specs, boxes)]
    raise RuntimeError(f"could not place {len(specs)} objects on a {size}x{size} canvas")


def scene_for(meta: dict, rng: np.random.Generator) -> list[SceneObject]:
    """A random scene that satisfies GenEval metadata ``meta`` exactly (unspecified colours are random)."""
    include = meta.get("include")
    if not include:
        raise ValueError(f"metadata {meta.get('prompt')!r} has no 'include' list")
    colors = list(COLORS)
    specs, relation = [], None
    for idx, req in enumerate(include):
        if req["class"] not in SHAPES:
            raise ValueError(f"metadata class {req['class']!r} is not a testbed shape {SHAPES}")
        first = len(specs)
        for _ in range(int(req.get("count", 1))):
            color = req.get("color") or colors[int(rng.integers(len(colors)))]
            specs.append((req["class"], color))
        if "position" in req:
            rel, ref = req["position"]
            if int(req.get("count", 1)) != 1 or int(include[ref].get("count", 1)) != 1:
                raise ValueError("testbed position prompts need count 1 on both objects")
            ref_first = sum(int(r.get("count", 1)) for r in include[:ref])
            relation = (rel, first, ref_first)
    return place_objects(specs, rng, relation=relation)


def random_scene(rng: np.random.Generator, max_objects: int = 4) -> list[SceneObject]:
    """A scene of 0..max_objects random shapes and colours (classifier training and reference statistics)."""
    n = int(rng.integers(0, max_objects + 1))
    specs = [(SHAPES[int(rng.integers(len(SHAPES)))], list(COLORS)[int(rng.integers(len(COLORS)))])
             for _ in range(n)]
    return place_objects(specs, rng)


def render_metadata(metadata: Sequence[dict], seed: int) -> tuple[torch.Tensor, list[list[SceneObject]]]:
    """Render one scene per metadata entry -> (images float32 [N, 3, 32, 32] in [0, 1], scenes); deterministic."""
    rng = np.random.default_rng(seed)
    scenes = [scene_for(m, rng) for m in metadata]
    images = np.stack([render_objects(s) for s in scenes]) if scenes else np.zeros((0, 3, IMAGE_SIZE, IMAGE_SIZE),
                                                                                 np.float32)
    return torch.from_numpy(images), scenes


def perturb_metadata(meta: dict, scene: Sequence[SceneObject], rng: np.random.Generator | None = None) -> dict:
    """A copy of ``meta`` that ``scene`` (rendered for ``meta``) does NOT satisfy: one more object (counting), the
    opposite relation (position), a colour absent from the scene (colors, color_attr), or a shape absent from the
    scene (single_object, two_object). For tests of detectors and rewards; ``rng`` is unused (kept for symmetry)."""
    bad = json.loads(json.dumps(meta))
    inc, tag = bad["include"], meta["tag"]
    if tag == "counting":  # one fewer (or, from two, one more): the exact count and its exclude both move
        delta = -1 if inc[0]["count"] > 2 else 1
        inc[0]["count"] += delta
        for req in bad.get("exclude", []):
            req["count"] += delta
    elif tag == "position":
        flip = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        inc[1]["position"][0] = flip[inc[1]["position"][0]]
    elif tag in ("colors", "color_attr"):
        present = {o.color for o in scene}
        inc[0]["color"] = [c for c in COLORS if c not in present][0]
    else:
        present = {o.shape for o in scene}
        inc[0]["class"] = [s for s in SHAPES if s not in present][0]
    bad["prompt"] = f"(perturbed) {meta['prompt']}"
    return bad


# ------------------------------------------------------------------------------------------------------ prompts
def _a(shape: str, color: str | None = None) -> str:
    return f"a {color} {shape}" if color else f"a {shape}"


def all_prompts() -> list[dict]:
    """Every prompt of the world, GenEval metadata dicts in a fixed order (family by family)."""
    out: list[dict] = []
    for s in SHAPES:
        out.append({"tag": "single_object", "include": [{"class": s, "count": 1}], "prompt": _a(s)})
    for s1, s2 in itertools.permutations(SHAPES, 2):
        out.append({"tag": "two_object", "include": [{"class": s1, "count": 1}, {"class": s2, "count": 1}],
                    "prompt": f"{_a(s1)} and {_a(s2)}"})
    for s in SHAPES:
        for n in COUNTING_RANGE:
            out.append({"tag": "counting", "include": [{"class": s, "count": n}],
                        "exclude": [{"class": s, "count": n + 1}], "prompt": f"{COUNT_WORDS[n]} {PLURALS[s]}"})
    for c in COLORS:
        for s in SHAPES:
            out.append({"tag": "colors", "include": [{"class": s, "count": 1, "color": c}], "prompt": _a(s, c)})
    for target, ref in itertools.permutations(SHAPES, 2):
        for rel in RELATIONS:
            # GenEval order: the reference object first, the positioned one refers to index 0
            out.append({"tag": "position", "include": [{"class": ref, "count": 1},
                                                       {"class": target, "count": 1, "position": [rel, 0]}],
                        "prompt": f"{_a(target)} {rel} {_a(ref)}"})
    for s1, s2 in itertools.permutations(SHAPES, 2):
        for c1, c2 in itertools.permutations(COLORS, 2):
            out.append({"tag": "color_attr", "include": [{"class": s1, "count": 1, "color": c1},
                                                         {"class": s2, "count": 1, "color": c2}],
                        "prompt": f"{_a(s1, c1)} and {_a(s2, c2)}"})
    return out


def combination_keys(meta: dict) -> set:
    """The attribute combinations a prompt names (what the split keeps disjoint); empty for single_object."""
    tag, inc = meta["tag"], meta["include"]
    if tag == "two_object":
        return {("pair", frozenset({inc[0]["class"], inc[1]["class"]}))}
    if tag == "counting":
        return {("count", inc[0]["class"], inc[0]["count"])}
    if tag in ("colors", "color_attr"):
        return {("binding", r["color"], r["class"]) for r in inc}
    if tag == "position":
        ref, target = inc[0]["class"], inc[1]["class"]
        rel = inc[1]["position"][0]
        return {("arrangement", _arrangement(target, rel, ref))}
    return set()


def _arrangement(target: str, rel: str, ref: str) -> tuple[str, str, str]:
    """Canonical (first, axis, second): "first is left of / above second" (both phrasings map to one key)."""
    return {"left of": (target, "h", ref), "right of": (ref, "h", target),
            "above": (target, "v", ref), "below": (ref, "v", target)}[rel]


def is_test(meta: dict) -> bool:
    """True when the prompt names a held-out combination (single_object prompts belong to both splits)."""
    for key in combination_keys(meta):
        if key[0] == "pair" and key[1] in HELD_OUT_SHAPE_PAIRS:
            return True
        if key[0] == "count" and (key[1], key[2]) in HELD_OUT_COUNTS:
            return True
        if key[0] == "binding" and (key[1], key[2]) in HELD_OUT_COLOR_SHAPE:
            return True
        if key[0] == "arrangement" and key[1] in HELD_OUT_ARRANGEMENTS:
            return True
    return False


def build_splits() -> tuple[list[dict], list[dict]]:
    """(train, test) metadata lists; single_object prompts are in both, every other prompt in exactly one."""
    train, test = [], []
    for meta in all_prompts():
        if meta["tag"] == "single_object":
            train.append(meta)
            test.append(meta)
        elif is_test(meta):
            test.append(meta)
        else:
            train.append(meta)
    return train, test


class FamilyBalancedPrompts:
    """Metadata grouped by family; ``draw(rng, n)`` picks a family uniformly, then a prompt of that family."""

    def __init__(self, metadata: Sequence[dict]) -> None:
        self.by_family = {}
        for meta in metadata:
            self.by_family.setdefault(meta["tag"], []).append(meta)
        if not self.by_family:
            raise ValueError("FamilyBalancedPrompts needs at least one prompt")
        self.families = sorted(self.by_family)

    def draw(self, rng: np.random.Generator, n: int) -> list[dict]:
        fams = rng.integers(0, len(self.families), n)
        out = []
        for f in fams:
            pool = self.by_family[self.families[int(f)]]
            out.append(pool[int(rng.integers(len(pool)))])
        return out


def write_jsonl(path: str, metadata: Iterable[dict]) -> None:
    """Write metadata dicts one per line (atomic: temp file then rename)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        for meta in metadata:
            f.write(json.dumps(meta) + "\n")
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the testbed train/test prompt files (GenEval metadata JSONL)")
    parser.add_argument("--out", default="data/testbed", help="output directory")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    train, test = build_splits()
    write_jsonl(os.path.join(args.out, "train.jsonl"), train)
    write_jsonl(os.path.join(args.out, "test.jsonl"), test)
    for name, split in (("train", train), ("test", test)):
        counts = {fam: sum(m["tag"] == fam for m in split) for fam in FAMILIES}
        print(f"{name}: {len(split)} prompts {counts}")


if __name__ == "__main__":
    main()
