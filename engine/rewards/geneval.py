"""GenEval: the reward around a pluggable detector, scored by the GenEval rules of ``geneval_rules``.

``geneval_rules.score_detections(detections, meta, strict=...)`` is the only place where GenEval metadata is checked
against detections; the real-image reward (a transformers COCO detector + a CLIP colour classifier, built here), the
testbed reward (the testbed's rule detector, built by ``engine.testbed.detector``) and evaluation all call it.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch

from engine.data.geneval import validate_geneval_metadata

from .base import Detection, Detector
from .geneval_rules import box_iou, score_detections


class ColorClassifier(Protocol):
    def classify(self, image: torch.Tensor, boxes: Sequence[Sequence[float]], classname: str,
                 masks: Sequence[torch.Tensor | None] | None = None) -> list[str]:
        """image: float [3, H, W] in [0, 1] -> one colour name (from ``geneval_rules.COLORS``) per box
        (``masks``: optional bool [H, W] per box, the object's pixels)."""
        ...


class GenEvalReward:
    """GenEval reward around a pluggable ``Detector`` (and a ``ColorClassifier`` for detectors that give no colour).

    Filtering as GenEval does: detections below ``threshold`` confidence are dropped (``counting_threshold`` for
    prompts tagged ``counting``), at most ``max_objects`` per class are kept, and boxes of the same class that overlap
    a more confident one by IoU >= ``nms_iou`` are removed (1.0 = off, GenEval's default).
    Output: ``{name: partial credit, name + "_strict": strict correctness}`` (float32 [N]); see ``score_detections``.
    """

    differentiable = False

    def __init__(self, detector: Detector, color_classifier: ColorClassifier | None = None, *, name: str = "geneval",
                 threshold: float = 0.3, counting_threshold: float = 0.9, max_objects: int = 16,
                 nms_iou: float = 1.0, position_threshold: float = 0.1) -> None:
        self.detector, self.color_classifier, self.name = detector, color_classifier, name
        self.threshold, self.counting_threshold = threshold, counting_threshold
        self.max_objects, self.nms_iou, self.position_threshold = max_objects, nms_iou, position_threshold

    def detect(self, images: torch.Tensor, metadata: Sequence[dict]) -> list[list[Detection]]:
        """Filtered detections per image, with colours filled in for classes whose colour the metadata asks."""
        raw = self.detector.detect(images)
        if len(raw) != images.shape[0]:
            raise ValueError(f"{self.name}: detector returned {len(raw)} lists for {images.shape[0]} images")
        out = []
        for image, dets, meta in zip(images, raw, metadata):
            thr = self.counting_threshold if meta.get("tag") == "counting" else self.threshold
            kept = self._filter([d for d in dets if d.score > thr or thr <= 0])
            self._fill_colors(image, kept, meta)
            out.append(kept)
        return out

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> dict[str, torch.Tensor]:
        if len(metadata) != images.shape[0]:
            raise ValueError(f"{self.name}: {images.shape[0]} images but {len(metadata)} metadata entries")
        for i, meta in enumerate(metadata):
            validate_geneval_metadata(meta, f"{self.name}: metadata[{i}]")
        dets = self.detect(images, metadata)
        partial = [score_detections(d, m, strict=False, position_threshold=self.position_threshold)
                   for d, m in zip(dets, metadata)]
        strict = [score_detections(d, m, strict=True, position_threshold=self.position_threshold)
                  for d, m in zip(dets, metadata)]
        return {self.name: torch.tensor(partial, dtype=torch.float32),
                f"{self.name}_strict": torch.tensor(strict, dtype=torch.float32)}

    def score_differentiable(self, images, prompts, metadata):
        raise TypeError(f"{self.name} (detector-based) is not differentiable")

    def _filter(self, dets: list[Detection]) -> list[Detection]:
        by_class: dict[str, list[Detection]] = {}
        for d in sorted(dets, key=lambda d: -d.score):
            group = by_class.setdefault(d.cls, [])
            if len(group) >= self.max_objects:
                continue
            if self.nms_iou < 1.0 and any(box_iou(d.box, g.box) >= self.nms_iou for g in group):
                continue
            group.append(d)
        return [d for group in by_class.values() for d in group]

    def _fill_colors(self, image: torch.Tensor, dets: list[Detection], meta: dict) -> None:
        wanted = {req["class"] for req in meta["include"] if "color" in req}
        for cls in wanted:
            todo = [d for d in dets if d.cls == cls and d.color is None]
            if not todo:
                continue
            if self.color_classifier is None:
                raise ValueError(f"{self.name}: metadata asks the colour of {cls!r} but the detector gives no colours "
                                 "and no color_classifier was given")
            masks = [d.mask for d in todo]
            colors = self.color_classifier.classify(image, [d.box for d in todo], cls,
                                                    masks=None if all(m is None for m in masks) else masks)
            if len(colors) != len(todo):
                raise ValueError(f"{self.name}: colour classifier returned {len(colors)} colours for {len(todo)} boxes")
            for d, color in zip(todo, colors):
                d.color = color


def build_geneval_reward(detector_path: str, clip_path: str | None = None, device: str = "cpu",
                         detector_kwargs: dict | None = None, color_kwargs: dict | None = None,
                         **reward_kwargs) -> GenEvalReward:
    """The ``geneval`` registry entry: a transformers COCO detector from ``detector_path`` and, when ``clip_path``
    is given, a CLIP zero-shot colour classifier; ``reward_kwargs`` go to ``GenEvalReward``."""
    from .detectors import ClipColorClassifier, TransformersDetector

    detector = TransformersDetector(detector_path, device=device, **(detector_kwargs or {}))
    colors = ClipColorClassifier(clip_path, device=device, **(color_kwargs or {})) if clip_path else None
    return GenEvalReward(detector, colors, **reward_kwargs)

