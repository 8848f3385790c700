"""GenEval's detector and colour classifier from local transformers directories (no mmdet/mmcv).

``TransformersDetector``: a COCO detector: the DETR family (``AutoModelForObjectDetection``) or Mask2Former/
MaskFormer instance segmentation (``AutoModelForUniversalSegmentation``). ``ClipColorClassifier``: GenEval's
zero-shot CLIP colour classifier on object crops (masked objects pasted on grey, as GenEval does).
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F

from .base import Detection
from .clip_models import ClipEmbedder
from .geneval_rules import COCO_TO_GENEVAL, COLORS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


SEGMENTATION_TYPES = ("mask2former", "maskformer", "oneformer")


class TransformersDetector:
    """``TransformersDetector(path, device="cpu", shortest_edge=800, longest_edge=1333, batch_size=8,
    class_aliases=None, mask_threshold=0.0)`` -> ``detect(images) -> list[list[Detection]]`` (one per query, highest
    score first).

    Two families of local transformers checkpoints trained on COCO:

    - object detection (``AutoModelForObjectDetection``: DETR, Conditional/Deformable DETR, RT-DETR, ...): scores are
      a softmax over classes without the trailing "no object" logit when the head has one (DETR), else per-class
      sigmoids (focal-loss heads); boxes (normalised cx, cy, w, h) become pixel ``(x0, y0, x1, y1)``.
    - instance segmentation (``AutoModelForUniversalSegmentation``: Mask2Former, MaskFormer; GenEval's own detector
      is a Mask2Former): per query the best class (softmax without "no object") times the mask score (mean sigmoid
      inside the mask ``logit > mask_threshold``), as transformers' instance post-processing; the box is the mask's
      bounding box and the mask travels with the ``Detection`` (queries with empty masks are dropped).

    Preprocessing as the transformers image processors do it: resize keeping the aspect ratio so the shortest side
    is ``shortest_edge`` (the longest at most ``longest_edge``), ImageNet normalisation, zero padding to a multiple of
    32 for segmentation models. Class names come from ``config.id2label``, renamed by ``COCO_TO_GENEVAL`` and then
    by ``class_aliases``.
    """

    def __init__(self, path: str, device: str = "cpu", shortest_edge: int = 800, longest_edge: int = 1333,
                 batch_size: int = 8, class_aliases: dict[str, str] | None = None, mask_threshold: float = 0.0
                 ) -> None:
        from transformers import AutoConfig, AutoModelForObjectDetection, AutoModelForUniversalSegmentation

        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"detector directory {path!r} has no config.json (expected a local transformers "
                                    "COCO detector, e.g. DETR or Mask2Former)")
        model_type = AutoConfig.from_pretrained(path).model_type
        self.segmentation = model_type in SEGMENTATION_TYPES
        auto = AutoModelForUniversalSegmentation if self.segmentation else AutoModelForObjectDetection
        self.model = auto.from_pretrained(path).to(device).eval().requires_grad_(False)
        self.device, self.batch_size = torch.device(device), batch_size
        self.shortest_edge, self.longest_edge = shortest_edge, longest_edge
        self.mask_threshold = mask_threshold
        aliases = {**COCO_TO_GENEVAL, **(class_aliases or {})}
        id2label = self.model.config.id2label
        self.labels = [aliases.get(id2label[i], id2label[i]) for i in range(len(id2label))]

    def _preprocess(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        h, w = images.shape[-2:]
        scale = self.shortest_edge / min(h, w)
        if max(h, w) * scale > self.longest_edge:
            scale = self.longest_edge / max(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        x = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        if self.segmentation:  # the pixel decoder's strides need sizes divisible by 32
            x = F.pad(x, (0, -size[1] % 32, 0, -size[0] % 32))
        return x, size

    @torch.no_grad()
    def detect(self, images: torch.Tensor) -> list[list[Detection]]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"TransformersDetector expects images [N, 3, H, W] in [0, 1], got {tuple(images.shape)}")
        out: list[list[Detection]] = []
        for chunk in images.split(self.batch_size):
            pixels, size = self._preprocess(chunk.to(self.device))
            res = self.model(pixel_values=pixels)
            if self.segmentation:
                out.extend(self._instances(res, size, images.shape[-2:]))
            else:
                out.extend(self._boxes(res, images.shape[-2:]))
        for dets in out:
            dets.sort(key=lambda d: -d.score)
        return out

    def _class_probs(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if logits.shape[-1] == len(self.labels) + 1:  # the last logit is "no object"
            return logits.softmax(-1)[..., :-1]
        return logits.sigmoid()

    def _boxes(self, res, hw) -> list[list[Detection]]:
        h, w = hw
        scores, labels = self._class_probs(res.logits).max(-1)
        cx, cy, bw, bh = res.pred_boxes.float().unbind(-1)
        boxes = torch.stack([((cx - bw / 2) * w).clamp(0, w), ((cy - bh / 2) * h).clamp(0, h),
                             ((cx + bw / 2) * w).clamp(0, w), ((cy + bh / 2) * h).clamp(0, h)], -1)
        return [[Detection(cls=self.labels[l], box=tuple(b), score=float(sc)) for sc, l, b in zip(s, lab, bx)]
                for s, lab, bx in zip(scores.cpu().tolist(), labels.cpu().tolist(), boxes.cpu().tolist())]

    def _instances(self, res, size, hw) -> list[list[Detection]]:
        h, w = hw
        class_scores, labels = self._class_probs(res.class_queries_logits).max(-1)  # [B, Q]
        # mask logits are at 1/4 of the padded input: up to the padded size, crop the padding, back to the image
        logits = res.masks_queries_logits.float()
        padded = (logits.shape[-2] * 4, logits.shape[-1] * 4)
        logits = F.interpolate(logits, size=padded, mode="bilinear", align_corners=False)[..., :size[0], :size[1]]
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        masks = logits > self.mask_threshold
        mask_scores = (logits.sigmoid() * masks).flatten(2).sum(-1) / (masks.flatten(2).sum(-1) + 1e-6)
        scores = class_scores * mask_scores
        rows, cols = masks.any(-1), masks.any(-2)  # [B, Q, H], [B, Q, W]
        out = []
        for b in range(masks.shape[0]):
            dets = []
            for q in range(masks.shape[1]):
                ys, xs = rows[b, q].nonzero(), cols[b, q].nonzero()
                if len(ys) == 0:
                    continue
                box = (float(xs[0]), float(ys[0]), float(xs[-1]) + 1.0, float(ys[-1]) + 1.0)
                dets.append(Detection(cls=self.labels[int(labels[b, q])], box=box, score=float(scores[b, q]),
                                      mask=masks[b, q].cpu()))
            out.append(dets)
        return out


class ClipColorClassifier:
    """GenEval's colour classifier: each box's crop is classified zero-shot by CLIP among ``colors`` with the
    prompt templates "a photo of a {color} {class}", "a photo of a {color}-colored {class}" and
    "a photo of a {color} object" (normalised text embeddings averaged per colour). Each crop goes through CLIP's
    preprocessing (shortest side resized, centre crop); a box is grown to at least 2 px so every crop has pixels.
    A detection's mask, when given, keeps only the object's pixels (the rest grey), as GenEval does."""

    TEMPLATES = ("a photo of a {color} {cls}", "a photo of a {color}-colored {cls}", "a photo of a {color} object")

    def __init__(self, path: str, device: str = "cpu", colors: Sequence[str] = COLORS, batch_size: int = 16,
                 tokenizer_path: str | None = None) -> None:
        self.clip = ClipEmbedder(path, tokenizer_path=tokenizer_path, device=device, batch_size=batch_size)
        self.colors = tuple(colors)
        self._class_weights: dict[str, torch.Tensor] = {}

    def _weights(self, cls: str) -> torch.Tensor:
        if cls not in self._class_weights:
            prompts = [t.format(color=c, cls=cls) for c in self.colors for t in self.TEMPLATES]
            emb = self.clip.text_features(prompts).view(len(self.colors), len(self.TEMPLATES), -1).mean(1)
            self._class_weights[cls] = F.normalize(emb, dim=-1)  # [colors, D]
        return self._class_weights[cls]

    #: GenEval pastes a masked object on this grey (#999) before cropping
    BACKGROUND = 0x99 / 255

    @torch.no_grad()
    def classify(self, image: torch.Tensor, boxes: Sequence[Sequence[float]], classname: str,
                 masks: Sequence[torch.Tensor | None] | None = None) -> list[str]:
        """One colour per box; ``masks`` (bool [H, W] or None per box) restrict the crop to the object."""
        if not boxes:
            return []
        _, h, w = image.shape
        masks = masks if masks is not None else [None] * len(boxes)
        crops = []
        for (x0, y0, x1, y1), mask in zip(boxes, masks):
            x0, y0 = min(max(int(x0), 0), w - 2), min(max(int(y0), 0), h - 2)
            x1, y1 = max(min(int(round(x1)), w), x0 + 2), max(min(int(round(y1)), h), y0 + 2)
            src = image.float()
            if mask is not None:
                src = torch.where(mask.to(src.device)[None], src, torch.full_like(src, self.BACKGROUND))
            crops.append(self.clip.preprocess(src[None, :, y0:y1, x0:x1]))  # CLIP's resize + crop
        feats = self.clip.pixel_features(torch.cat(crops))
        pred = (feats @ self._weights(classname).to(feats.device).T).argmax(-1)
        return [self.colors[i] for i in pred.cpu().tolist()]
