"""Pictures of testbed results, PIL only: sample grids and a run's reward curve (``engine.testbed.eval``)."""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch

from engine.data.jsonl import read_jsonl


def save_grid(images: torch.Tensor, path: str, nrow: int = 8, scale: int = 2) -> str:
    """NCHW images in [0, 1] -> one PNG grid (``scale``x nearest upsampling so 32 px samples are visible)."""
    from PIL import Image

    imgs = images.detach().float().clamp(0, 1).cpu()
    n, c, h, w = imgs.shape
    nrow = max(1, min(nrow, n))
    rows = -(-n // nrow)
    grid = torch.full((c, rows * (h + 2), nrow * (w + 2)), 0.5)  # grey frames: the testbed background is white
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[:, r * (h + 2) + 1:r * (h + 2) + 1 + h, q * (w + 2) + 1:q * (w + 2) + 1 + w] = imgs[i]
    img = Image.fromarray((grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path


def _smoothed(pts: list[tuple[float, float]], window: int) -> list[tuple[float, float]]:
    """Centred moving mean over ``window`` consecutive points (fewer at the ends)."""
    h = window // 2
    out = []
    for i, (x, _) in enumerate(pts):
        part = [v for _, v in pts[max(0, i - h):i + h + 1]]
        out.append((x, sum(part) / len(part)))
    return out


def curve_series(metrics_jsonl: str, keys: Sequence[str]) -> dict[str, list[tuple[float, float]]]:
    """{key: [(epoch, value), ...]} of a run's ``metrics.jsonl``: ``eval/*`` keys from the eval records (epoch 0 =
    before training), the others from the epoch records only (an eval record repeats its epoch's training metrics);
    keys without values are left out."""
    series: dict[str, dict[float, float]] = {k: {} for k in keys}
    epoch_no = 0
    for _, rec in read_jsonl(metrics_jsonl):
        if rec.get("kind") == "epoch":
            epoch_no = int(rec.get("epoch", epoch_no)) + 1
        if rec.get("kind") not in ("epoch", "eval"):
            continue
        x = epoch_no if rec.get("kind") == "epoch" or rec.get("step", 0) else 0
        for k in keys:
            if rec.get("kind") == "eval" and not k.startswith("eval/"):
                continue
            v = rec.get(k)
            if isinstance(v, (int, float)) and v == v:
                series[k].setdefault(float(x), float(v))
    return {k: sorted(v.items()) for k, v in series.items() if v}


def reward_curve(metrics_jsonl: str, path: str, keys: Sequence[str] = ("reward/mean", "eval/reward"),
                 width: int = 640, height: int = 360, smooth: int = 1, title: str = "") -> str | None:
    """Plot the per-epoch ``reward/mean`` (and eval points) of a run's ``metrics.jsonl`` as a PNG (PIL only).

    ``eval/*`` keys are read from the loop's eval records (``eval.every``: held-out prompts at fixed noise; epoch 0
    is the model before training), the others from the epoch records (one value per epoch). ``smooth`` > 1 draws
    the non-eval keys as a centred ``smooth``-epoch moving mean (line) over their per-epoch values (faint dots).
    Returns the path, or None when the file has no such values."""
    from PIL import Image, ImageDraw

    raw = curve_series(metrics_jsonl, keys)
    if not raw:
        return None
    lines = {k: (_smoothed(p, smooth) if smooth > 1 and not k.startswith("eval/") else p) for k, p in raw.items()}
    xs = [p[0] for s in raw.values() for p in s]
    ys = [p[1] for s in list(raw.values()) + list(lines.values()) for p in s]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = min(ys), max(ys)
    pad = max(1e-3, 0.05 * (y1 - y0))
    y0, y1 = y0 - pad, y1 + pad
    L, R, T, B = 60, 20, 30 + (14 if title else 0), 40
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)

    def px(x, y):
        return (L + (x - x0) / (x1 - x0) * (width - L - R), T + (y1 - y) / (y1 - y0) * (height - T - B))

    d.rectangle([L, T, width - R, height - B], outline="black")
    for i in range(5):  # y ticks
        y = y0 + (y1 - y0) * i / 4
        _, py = px(x0, y)
        d.line([L - 4, py, L, py], fill="black")
        d.text((4, py - 6), f"{y:.3f}", fill="black")
    xstep = max(1, math.ceil((x1 - x0) / 5))  # x ticks on whole epochs
    for x in range(math.ceil(x0), math.floor(x1) + 1, xstep):
        qx, _ = px(x, y0)
        d.line([qx, height - B, qx, height - B + 4], fill="black")
        d.text((qx - 8, height - B + 6), f"{x:.0f}", fill="black")
    d.text((width // 2 - 20, height - 16), "epoch", fill="black")
    if title:
        d.text((L, 6), title, fill="black")
    colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44)]
    step = (width - L) // max(1, len(raw))
    for j, k in enumerate(raw):
        col = colors[j % len(colors)]
        smoothed = lines[k] is not raw[k]
        if smoothed:  # the per-epoch values as faint dots under the moving mean
            faint = tuple(int(c + 0.6 * (255 - c)) for c in col)
            for p in raw[k]:
                qx, qy = px(*p)
                d.ellipse([qx - 2, qy - 2, qx + 2, qy + 2], fill=faint)
        pts = lines[k]
        if len(pts) > 1:
            d.line([px(*p) for p in pts], fill=col, width=2)
        if not smoothed:
            for p in pts:
                qx, qy = px(*p)
                d.ellipse([qx - 3, qy - 3, qx + 3, qy + 3], outline=col)
        label = f"{k} ({smooth}-epoch mean)" if smoothed else k
        d.text((L + 10 + step * j, T - 22), label, fill=col)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path
