"""Metrics, progress and sample grids.

- :class:`StepStats` accumulates per-sample tensors during the micro-steps of one optimizer step ON DEVICE (sums,
  squares, counts, min, max; no ``.item()``), then :meth:`StepStats.reduce` does ONE all-reduce for sums and one for
  extrema across ranks and ONE host transfer, giving ``name/mean``, ``name/std``, ``name/min``, ``name/max``.
- :class:`RunLogger` (rank 0 only writes): JSONL (``metrics.jsonl``, one record per optimizer step plus epoch
  records), TensorBoard (when installed), Weights & Biases (when asked and installed), a one-line progress bar, and
  PNG sample grids. A resumed run first rewinds ``metrics.jsonl`` to its checkpoint (:func:`rewind_jsonl`), so the
  epochs it replays are not recorded twice: readers never need to de-duplicate.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import defaultdict

import torch


class StepStats:
    """Device-side accumulation of per-sample statistics between two optimizer steps."""

    def __init__(self) -> None:
        self._sum: dict[str, torch.Tensor] = {}
        self._sq: dict[str, torch.Tensor] = {}
        self._n: dict[str, torch.Tensor] = {}
        self._max: dict[str, torch.Tensor] = {}
        self._min: dict[str, torch.Tensor] = {}

    def add(self, name: str, values: torch.Tensor) -> None:
        v = values.detach().reshape(-1).double()
        if name not in self._sum:
            z = torch.zeros((), dtype=torch.float64, device=v.device)
            self._sum[name], self._sq[name], self._n[name] = z.clone(), z.clone(), z.clone()
            self._max[name] = torch.full((), -math.inf, dtype=torch.float64, device=v.device)
            self._min[name] = torch.full((), math.inf, dtype=torch.float64, device=v.device)
        self._sum[name] += v.sum()
        self._sq[name] += v.square().sum()
        self._n[name] += v.numel()
        if v.numel():
            self._max[name] = torch.maximum(self._max[name], v.max())
            self._min[name] = torch.minimum(self._min[name], v.min())

    def reduce(self, dist) -> dict[str, float]:
        """Global mean/std/min/max of every accumulated name (one sum all-reduce, one max all-reduce, one sync)."""
        names = sorted(self._sum)
        if not names:
            return {}
        sums = torch.stack([torch.stack([self._sum[k], self._sq[k], self._n[k]]) for k in names])
        ext = torch.stack([torch.stack([self._max[k], -self._min[k]]) for k in names])
        sums, ext = dist.all_reduce_sum(sums), dist.all_reduce_max(ext)
        sums, ext = sums.cpu().tolist(), ext.cpu().tolist()
        out = {}
        for k, (s, q, n), (mx, neg_mn) in zip(names, sums, ext):
            if n <= 0:
                continue
            mean = s / n
            out[f"{k}/mean"] = mean
            out[f"{k}/std"] = math.sqrt(max(q / n - mean * mean, 0.0))
            out[f"{k}/max"] = mx
            out[f"{k}/min"] = -neg_mn
        self.__init__()
        return out


class Timer:
    """Wall time and item counts per phase (images/s per phase)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.items: dict[str, int] = defaultdict(int)

    def phase(self, name: str, items: int = 0):
        timer = self

        class _Ctx:
            def __enter__(self_inner):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self_inner.t = time.perf_counter()

            def __exit__(self_inner, *exc):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                timer.seconds[name] += time.perf_counter() - self_inner.t
                timer.items[name] += items

        return _Ctx()

    def pop(self) -> dict[str, float]:
        out = {}
        for k, s in self.seconds.items():
            out[f"time/{k}_s"] = s
            if self.items[k] and s > 0:
                out[f"throughput/{k}_images_per_s"] = self.items[k] / s
        self.seconds.clear()
        self.items.clear()
        return out


def peak_memory() -> dict[str, float]:
    if torch.cuda.is_available():
        return {"memory/peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30}
    try:
        import resource
        return {"memory/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
    except Exception:  # pragma: no cover
        return {}


def _replayed(rec, step: int, epoch: int) -> bool:
    """True for a record written after the checkpoint of (optimizer step ``step``, next epoch ``epoch``): a later
    step, or an epoch/eval record of an epoch >= ``epoch`` (an epoch without optimizer steps keeps the step)."""
    if not isinstance(rec, dict):
        return False
    s, e = rec.get("step"), rec.get("epoch")
    return (isinstance(s, (int, float)) and s > step) or (isinstance(e, (int, float)) and e >= epoch)


def rewind_jsonl(path: str, step: int, epoch: int) -> int:
    """Drop the records of ``path`` that a run resumed from (``step``, ``epoch``) writes again, and a torn last
    line (a writer killed mid-record); atomic (temp file, fsync, rename). Returns how many lines were dropped."""
    if not os.path.isfile(path):
        return 0
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    keep, dropped = [], 0
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError:
            if i == len(lines) - 1:  # no newline after it: the last write was cut short
                dropped += 1
                continue
            rec = None  # somebody else's line: kept as it is
        if _replayed(rec, step, epoch):
            dropped += 1
        else:
            keep.append(raw)
    if dropped:
        tmp = path + ".rewind"
        with open(tmp, "wb") as f:
            f.write(b"".join(line + b"\n" for line in keep))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return dropped


class RunLogger:
    """Rank-0 sinks: JSONL, TensorBoard, wandb, progress line, sample grids. Other ranks do nothing.

    ``resumed_at=(step, epoch)``: the run continues from a checkpoint taken after optimizer step ``step`` with
    ``epoch`` the next epoch; ``metrics.jsonl`` is first rewound to it (:func:`rewind_jsonl`)."""

    def __init__(self, run_dir: str, cfg, is_main: bool, total_epochs: int,
                 resumed_at: tuple[int, int] | None = None) -> None:
        self.is_main, self.run_dir, self.total = is_main, run_dir, total_epochs
        self.tb = self.wandb = None
        self.jsonl = None
        self.progress = cfg.log.progress
        if not is_main:
            return
        os.makedirs(run_dir, exist_ok=True)
        if resumed_at is not None:
            rewind_jsonl(os.path.join(run_dir, "metrics.jsonl"), *resumed_at)
        self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except Exception as e:  # tensorboard missing: JSONL still has everything
                print(f"[rlflow] TensorBoard disabled: {e}", file=sys.stderr)
        if cfg.log.wandb:
            try:
                import wandb
                from engine.config import to_dict
                self.wandb = wandb.init(project=cfg.log.wandb_project, dir=run_dir, config=to_dict(cfg))
            except ImportError:
                print("[rlflow] log.wandb=true but wandb is not installed: skipping it", file=sys.stderr)
        self._t0 = time.time()

    def log(self, step: int, metrics: dict[str, float], kind: str = "step") -> None:
        if not self.is_main:
            return
        rec = {"kind": kind, "step": step, **{k: (float(v) if isinstance(v, (int, float)) else v)
                                              for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                if self.tb is not None:
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def progress_line(self, epoch: int, metrics: dict[str, float]) -> None:
        if not (self.is_main and self.progress):
            return
        done = epoch + 1
        width = 24
        fill = int(width * done / max(1, self.total))
        el = time.time() - self._t0
        keys = [k for k in ("reward/mean", "loss", "kl/mean", "grad_norm") if k in metrics]
        shown = " ".join(f"{k.split('/')[0]}={metrics[k]:.4g}" for k in keys)
        print(f"\r[{'#' * fill}{'.' * (width - fill)}] epoch {done}/{self.total} {el:6.0f}s {shown}",
              end="" if done < self.total else "\n", file=sys.stderr, flush=True)

    def save_grid(self, images: torch.Tensor, name: str, nrow: int = 8) -> str | None:
        """Write NCHW images in [0, 1] as one PNG grid under ``<run>/samples/`` (nothing for other shapes: the
        known-answer family's "images" are [N, d] points)."""
        if not self.is_main or images.numel() == 0 or images.dim() != 4:
            return None
        from PIL import Image

        imgs = images.detach().float().clamp(0, 1).cpu()
        n, c, h, w = imgs.shape
        nrow = min(nrow, n)
        rows = (n + nrow - 1) // nrow
        grid = torch.ones(c, rows * (h + 2), nrow * (w + 2))
        for i in range(n):
            r, q = divmod(i, nrow)
            grid[:, r * (h + 2) + 1: r * (h + 2) + 1 + h, q * (w + 2) + 1: q * (w + 2) + 1 + w] = imgs[i]
        arr = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        if c == 1:
            arr = arr[..., 0]
        path = os.path.join(self.run_dir, "samples", f"{name}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(arr).save(path)
        return path

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
