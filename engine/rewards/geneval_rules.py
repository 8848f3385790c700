"""The GenEval rules, implemented once: the scoring of detections against GenEval metadata and its constants.

The real-image GenEval reward (``engine.rewards.geneval``), its detectors (``engine.rewards.detectors``) and the
testbed (world, rule detector, evaluation) all import these rules from here. This module imports no detector, no
reward model and nothing of the testbed, so every one of them may depend on it without an import cycle.
"""
from __future__ import annotations

import math
from typing import Sequence

from .base import Detection

#: GenEval's colour vocabulary (the colour classifier chooses among these)
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
#: COCO names as transformers' DETR-family configs spell them -> GenEval's class names
COCO_TO_GENEVAL = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}


def relative_position(box_a: Sequence[float], box_b: Sequence[float], threshold: float = 0.1) -> set[str]:
    """GenEval's relations of box a to box b (boxes ``(x0, y0, x1, y1)``, y grows downwards).

    The centroid offset ``o = c_a - c_b`` is shrunk per axis by ``threshold * (size_a + size_b)`` (towards 0, not
    past it); if nothing is left the boxes have no relation. Otherwise with ``(dx, dy) = shrunk / |o|``:
    ``dx < -0.5`` left of, ``dx > 0.5`` right of, ``dy < -0.5`` above, ``dy > 0.5`` below.
    """
    ax0, ay0, ax1, ay1 = box_a
    bx0, by0, bx1, by1 = box_b
    ox, oy = (ax0 + ax1 - bx0 - bx1) / 2, (ay0 + ay1 - by0 - by1) / 2
    sx = max(abs(ox) - threshold * (abs(ax1 - ax0) + abs(bx1 - bx0)), 0.0) * math.copysign(1.0, ox)
    sy = max(abs(oy) - threshold * (abs(ay1 - ay0) + abs(by1 - by0)), 0.0) * math.copysign(1.0, oy)
    if abs(sx) < 1e-3 and abs(sy) < 1e-3:
        return set()
    norm = math.hypot(ox, oy)
    dx, dy = sx / norm, sy / norm
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def score_detections(detections: Sequence[Detection], meta: dict, *, strict: bool,
                     position_threshold: float = 0.1) -> float:
    """Score one image's detections against its GenEval metadata.

    Detections are grouped by class, each group ordered by confidence (highest first); ``n_c`` is the group size.
    For include requirement i (class c, count k, optional colour, optional position ``[rel, j]``):

    - count holds iff ``n_c == k`` (exactly; GenEval's counting excludes of ``k + 1`` say the same);
    - colour holds iff count holds and all k objects have ``Detection.color == colour``;
    - position holds iff count and colour hold, requirement j is matched, and ``rel`` is in
      ``relative_position(obj, ref)`` for EVERY object of class c and every object of j's class;
    - requirement i is matched iff all of its parts hold.

    ``strict=True`` (GenEval correctness, for evaluation): 1.0 if every include is matched and, for every exclude
    (class e, count m), fewer than m objects of class e were detected; else 0.0.

    ``strict=False`` (partial credit, for training; Flow-GRPO's GenEval reward, made consistent): the mean of these
    terms, each in [0, 1]: per include a count term ``max(0, 1 - |k - n_c| / k)``; if it has a colour, a colour term
    (number of its objects with that colour) / k, 0 unless the count holds; if it has a position, a position term,
    1.0 if the position holds else 0.0; per exclude on a class that no include names, 1.0 if fewer than m such
    objects else 0.0 (an exclude on an included class is already implied by that class's exact-count term).
    Differences from Flow-GRPO: the count term is clipped at 0 (Flow-GRPO goes negative beyond 2k objects), and
    every requirement always contributes its terms (Flow-GRPO omits a position term after a colour failure and
    appends both 0 and 1 for a failed position check). A perfect image scores 1.0 in both modes.
    """
    by_class: dict[str, list[Detection]] = {}
    for d in sorted(detections, key=lambda d: -d.score):  # stable: equal scores keep the detector's order
        by_class.setdefault(d.cls, []).append(d)

    terms: list[float] = []
    matched: list[bool] = []
    for req in meta["include"]:
        found = by_class.get(req["class"], [])
        k = req["count"]
        count_ok = len(found) == k
        terms.append(max(0.0, 1.0 - abs(k - len(found)) / k))
        ok = count_ok
        if "color" in req:
            n_color = sum(d.color == req["color"] for d in found) if count_ok else 0
            terms.append(n_color / k)
            ok = ok and n_color == k
        if "position" in req:
            rel, j = req["position"]
            refs = by_class.get(meta["include"][j]["class"], [])
            pos_ok = ok and matched[j] and all(
                rel in relative_position(obj.box, ref.box, position_threshold) for obj in found for ref in refs)
            terms.append(1.0 if pos_ok else 0.0)
            ok = pos_ok
        matched.append(ok)

    included = {req["class"] for req in meta["include"]}
    excludes_ok = True
    for req in meta.get("exclude", []):
        ok = len(by_class.get(req["class"], [])) < req["count"]
        excludes_ok = excludes_ok and ok
        if req["class"] not in included:
            terms.append(1.0 if ok else 0.0)

    if strict:
        return 1.0 if all(matched) and excludes_ok else 0.0
    return sum(terms) / len(terms)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
