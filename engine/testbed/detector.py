"""The testbed's rule-based object detector: colour segmentation + connected components + shape tests.

Every pixel is assigned to its nearest palette colour (object colours and the background); pixels farther than
``color_threshold`` from every palette colour are ignored (off-palette). Each object colour's mask is split into
4-connected components (one ``scipy.ndimage.label`` call for the whole batch); components smaller than ``min_area``
are noise and dropped. A component's shape comes from two scale-free features of its pixels: the fill ratio of its
bounding box (square 1.0, circle ~0.8, triangle ~0.6) and the vertical offset of its centroid from the box centre
in box heights (triangles point up: ~+0.13; circles and squares: 0). The nearest prototype wins; components far
from every prototype (ragged blobs, bars, inverted triangles) are not objects. On rendered scenes this is exact.

``build_testbed_geneval_reward`` (the ``testbed_geneval`` reward) scores its detections with the GenEval rules.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from engine.rewards.base import Detection
from engine.rewards.geneval import GenEvalReward
from engine.testbed.world import BACKGROUND, COLORS

# (fill ratio, ASYM_WEIGHT * centroid offset) per shape; measured on the renderer's masks for sizes 7..14
SHAPE_PROTOTYPES = {"square": (1.0, 0.0), "circle": (0.8, 0.0), "triangle": (0.6, 0.34)}
ASYM_WEIGHT = 2.5
_PROTO_NAMES = tuple(SHAPE_PROTOTYPES)
_PROTO = np.asarray([SHAPE_PROTOTYPES[n] for n in _PROTO_NAMES], np.float64)


@dataclass
class RuleDetectorConfig:
    """Thresholds of the rule detector (defaults are exact on rendered scenes and tolerant to sampling noise)."""

    #: max RGB distance from a palette colour for a pixel to count (palette colours are >= 1 apart)
    color_threshold: float = 0.5
    #: components with fewer pixels are noise (the smallest rendered object, a 7 px triangle, has 31)
    min_area: int = 12
    #: max distance in (fill, weighted asymmetry) feature space to the nearest shape prototype
    max_shape_distance: float = 0.3
    #: boxes whose aspect ratio (long/short side) exceeds this are not shapes of the world
    max_aspect: float = 1.6


class RuleDetector:
    """Detector protocol (``engine.rewards.base.Detector``) for testbed images: ``detect(images)`` with images
    float NCHW in [0, 1] -> per image, its ``Detection``s (class, box (x0, y0, x1, y1) with exclusive ends,
    score in (0, 1], colour name), sorted by score, highest first."""

    def __init__(self, config: RuleDetectorConfig | None = None, **overrides) -> None:
        cfg = config or RuleDetectorConfig()
        for key, val in overrides.items():
            if not hasattr(cfg, key):
                raise ValueError(f"RuleDetector: unknown option {key!r}")
            setattr(cfg, key, val)
        self.config = cfg
        self.color_names = tuple(COLORS)
        # object colours first, background last
        self.palette = np.asarray([COLORS[c] for c in self.color_names] + [BACKGROUND], np.float32)

    def segment(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """Per-pixel palette index [N, H, W] int: 0..P-1 object colours, P background, -1 off-palette."""
        x = images.detach().to("cpu", torch.float32).numpy() if isinstance(images, torch.Tensor) else \
            np.asarray(images, np.float32)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"RuleDetector expects images of shape [N, 3, H, W], got {tuple(x.shape)}")
        d2 = ((x[:, None] - self.palette[None, :, :, None, None]) ** 2).sum(axis=2)  # [N, P+1, H, W]
        nearest = d2.argmin(axis=1)
        off = np.take_along_axis(d2, nearest[:, None], axis=1)[:, 0] > self.config.color_threshold ** 2
        nearest[off] = -1
        return nearest

    def detect(self, images: torch.Tensor | np.ndarray) -> list[list[Detection]]:
        """Objects in each image (see the class docstring)."""
        seg = self.segment(images)
        n, h, w = seg.shape
        n_colors = len(self.color_names)
        masks = seg[:, None] == np.arange(n_colors)[None, :, None, None]  # [N, P, H, W]
        planes = masks.reshape(n * n_colors, h, w)
        structure = np.zeros((3, 3, 3), bool)
        structure[1] = ndimage.generate_binary_structure(2, 1)  # 4-connected within a plane, never across planes
        labels, n_comp = ndimage.label(planes, structure=structure)
        out: list[list[Detection]] = [[] for _ in range(n)]
        if n_comp == 0:
            return out
        flat = labels.ravel()
        area = np.bincount(flat, minlength=n_comp + 1)[1:].astype(np.float64)
        ys = np.broadcast_to(np.arange(h, dtype=np.float64)[None, :, None], planes.shape).ravel()
        y_sum = np.bincount(flat, weights=ys, minlength=n_comp + 1)[1:]
        slices = ndimage.find_objects(labels)
        boxes = np.asarray([(s[0].start, s[2].start, s[1].start, s[2].stop, s[1].stop) for s in slices], np.int64)
        plane, x0, y0, x1, y1 = boxes.T
        bw, bh = (x1 - x0).astype(np.float64), (y1 - y0).astype(np.float64)
        fill = area / (bw * bh)
        asym = ((y_sum / area + 0.5) - (y0 + y1) / 2.0) / bh
        feats = np.stack([fill, ASYM_WEIGHT * asym], axis=1)
        dist = np.sqrt(((feats[:, None, :] - _PROTO[None]) ** 2).sum(-1))  # [C, shapes]
        best = dist.argmin(axis=1)
        best_dist = dist[np.arange(len(best)), best]
        aspect = np.maximum(bw, bh) / np.minimum(bw, bh)
        keep = (area >= self.config.min_area) & (best_dist <= self.config.max_shape_distance) & \
               (aspect <= self.config.max_aspect)
        score = 1.0 - best_dist / (2 * self.config.max_shape_distance)
        for k in np.nonzero(keep)[0]:
            img, color = divmod(int(plane[k]), n_colors)
            out[img].append(Detection(cls=_PROTO_NAMES[best[k]],
                                      box=(float(x0[k]), float(y0[k]), float(x1[k]), float(y1[k])),
                                      score=float(score[k]), color=self.color_names[color]))
        for dets in out:
            dets.sort(key=lambda d: -d.score)
        return out

    def __call__(self, images: torch.Tensor | np.ndarray) -> list[list[Detection]]:
        return self.detect(images)


def build_testbed_geneval_reward(detector_kwargs: dict | None = None, **reward_kwargs) -> GenEvalReward:
    """The ``testbed_geneval`` registry entry: ``RuleDetector`` under the GenEval rules of the real reward. Its
    confidences are shape-fit scores, not probabilities, so no confidence threshold by default."""
    reward_kwargs = {"name": "testbed_geneval", "threshold": 0.0, "counting_threshold": 0.0, **reward_kwargs}
    return GenEvalReward(RuleDetector(**(detector_kwargs or {})), **reward_kwargs)
