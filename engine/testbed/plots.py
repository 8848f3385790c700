"""Pictures of testbed results, PIL only: sample grids and a run's reward curve (``engine.testbed.eval``)."""
from __future__ import annotations

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


def reward_curve(metrics_jsonl: str, path: str, keys: Sequence[str] = ("reward/mean", "eval/reward"),
                 width: int = 640, height: int = 360) -> str | None:
    """Plot the per-epoch ``reward/mean`` (and eval points) of a run's ``metrics.jsonl`` as a PNG (PIL only).
    Returns the path, or None when the file has no such values."""
    from PIL import Image, ImageDraw

    series: dict[str, list[tuple[float, float]]] = {k: [] for k in keys}
    epoch_no = 0
    for _, rec in read_jsonl(metrics_jsonl):
        if rec.get("kind") == "epoch":
            epoch_no = int(rec.get("epoch", epoch_no)) + 1
        if rec.get("kind") not in ("epoch", "eval"):
            continue
        x = epoch_no if rec.get("kind") == "epoch" or rec.get("step", 0) else 0
        for k in keys:
            v = rec.get(k)
            if isinstance(v, (int, float)) and v == v:
                series[k].append((float(x), float(v)))
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    xs = [p[0] for s in series.values() for p in s]
    ys = [p[1] for s in series.values() for p in s]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = min(ys), max(ys)
    pad = max(1e-3, 0.05 * (y1 - y0))
    y0, y1 = y0 - pad, y1 + pad
    L, R, T, B = 60, 20, 30, 40
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
    for i in range(5):  # x ticks
        x = x0 + (x1 - x0) * i / 4
        qx, _ = px(x, y0)
        d.line([qx, height - B, qx, height - B + 4], fill="black")
        d.text((qx - 8, height - B + 6), f"{x:.0f}", fill="black")
    d.text((width // 2 - 20, height - 16), "epoch", fill="black")
    colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44)]
    for j, (k, pts) in enumerate(series.items()):
        col = colors[j % len(colors)]
        pts = sorted(pts)
        if len(pts) > 1:
            d.line([px(*p) for p in pts], fill=col, width=2)
        for p in pts:
            qx, qy = px(*p)
            d.ellipse([qx - 3, qy - 3, qx + 3, qy + 3], outline=col)
        d.text((L + 10 + 160 * j, 8), k, fill=col)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path
