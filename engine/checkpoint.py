"""Atomic, complete checkpoints: resume reproduces the uninterrupted run bit-for-bit (CPU, fp32).

A checkpoint is a directory ``<run>/checkpoints/step-00000012/`` holding
- ``ds/``: the DeepSpeed engine's own checkpoint (trainable weights, optimizer state (ZeRO partitions per rank), LR
  schedule); frozen weights are not written (they are the pretrained model, re-loaded from its directory);
- ``snapshots_rank<r>.pt``: this rank's storages of the EMA snapshots (theta_old, theta_samp, eval EMA; under ZeRO-3
  the local partitions), with their fp32 masters;
- ``rng_rank<r>.pt``: every rank's python / numpy / torch (CPU and CUDA) RNG states;
- ``state.json``: counters (epoch, optimizer step), data position, world size, the config.

Writing is atomic: everything goes to ``.tmp-step-...``; every rank fsyncs its files, then rank 0 fsyncs and
renames the directory to its final name (a process killed while writing leaves only a ``.tmp-`` directory, which
is never loaded and is removed by the next save). Only complete directories are listed; the last ``keep`` are kept.
Out of disk: the temporary directory is removed and :class:`CheckpointError` says so; the previous checkpoint stays.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
from typing import Any

import numpy as np
import torch

from engine.errors import ConfigError

PREFIX = "step-"
TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read (the previous complete checkpoint is untouched)."""


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(path: str) -> None:
    for root, dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pause_for_tests(step: int) -> None:
    """Tests simulate a kill mid-write: with ``RLFLOW_CKPT_PAUSE=<file>`` (and ``RLFLOW_CKPT_PAUSE_STEP=<step>``)
    the writer creates ``<file>`` and sleeps here, half-way through the checkpoint, until it is killed."""
    flag = os.environ.get("RLFLOW_CKPT_PAUSE")
    if flag and int(os.environ.get("RLFLOW_CKPT_PAUSE_STEP", step)) == step:
        import time
        open(flag, "w").close()
        time.sleep(3600)


class Checkpointer:
    """Save/find/load checkpoints under ``root`` (every rank calls every method; collectives inside)."""

    def __init__(self, root: str, dist, keep: int = 3) -> None:
        self.root, self.dist, self.keep = root, dist, keep

    # --------------------------------------------------------------------------------------------- listing
    def list(self) -> list[str]:
        """Complete checkpoints, oldest first."""
        if not os.path.isdir(self.root):
            return []
        names = sorted(n for n in os.listdir(self.root) if n.startswith(PREFIX)
                       and os.path.isfile(os.path.join(self.root, n, "state.json")))
        return [os.path.join(self.root, n) for n in names]

    def latest(self) -> str | None:
        found = self.list()
        return found[-1] if found else None

    def resolve(self, resume: str) -> str | None:
        """``''`` -> None, ``auto`` -> latest (or None), a path -> that path (ConfigError when not a checkpoint)."""
        if not resume:
            return None
        if resume == "auto":
            return self.latest()
        if not os.path.isfile(os.path.join(resume, "state.json")):
            raise ConfigError(f"config key 'checkpoint.resume': {resume!r} is not a checkpoint directory "
                              "(no state.json)")
        return resume

    # --------------------------------------------------------------------------------------------- saving
    def save(self, step: int, engine, snapshots, state: dict[str, Any], rank_state: dict | None = None) -> str:
        """Write checkpoint ``step`` atomically; returns its final path. ``rank_state``: this rank's method tensors
        (``Method.rank_state``), written as ``method_rank{r}.pt`` when not empty."""
        final = os.path.join(self.root, f"{PREFIX}{step:08d}")
        tmp = os.path.join(self.root, f"{TMP_PREFIX}{PREFIX}{step:08d}")
        d = self.dist
        if d.is_main:
            os.makedirs(self.root, exist_ok=True)
            for name in os.listdir(self.root):  # leftovers of killed writers
                if name.startswith(TMP_PREFIX):
                    shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
            os.makedirs(tmp)
        d.barrier()
        error: BaseException | None = None
        try:
            engine.save_checkpoint(tmp, tag="ds", client_state={}, save_latest=False,
                                   exclude_frozen_parameters=True)
            torch.save(snapshots.state_dict() if snapshots is not None else {},
                       os.path.join(tmp, f"snapshots_rank{d.rank}.pt"))
            torch.save(rng_state(), os.path.join(tmp, f"rng_rank{d.rank}.pt"))
            if rank_state:
                torch.save(rank_state, os.path.join(tmp, f"method_rank{d.rank}.pt"))
            if d.is_main:
                _pause_for_tests(step)
                with open(os.path.join(tmp, "state.json"), "w") as f:
                    json.dump(dict(state, step=step, world_size=d.world_size), f, indent=1, default=str)
            _fsync_tree(tmp)
        except OSError as e:
            error = e
        if d.any(error is not None):
            if d.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            d.barrier()
            prev = self.latest()
            why = "out of disk space" if isinstance(error, OSError) and error.errno == errno.ENOSPC else \
                f"a write failed ({error})" if error is not None else "another rank failed to write"
            raise CheckpointError(f"checkpoint {final!r} not written: {why}; the previous checkpoint "
                                  f"{prev!r} is kept (free disk space or lower checkpoint.keep)")
        d.barrier()
        if d.is_main:
            if os.path.exists(final):
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            for old in self.list()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        d.barrier()
        return final

    # --------------------------------------------------------------------------------------------- loading
    @torch.no_grad()
    def _refresh_persistent(self, module) -> None:
        """ZeRO-3 keeps small ("persistent") parameters whole on every rank next to their partition; DeepSpeed's
        load restores the partitions only, so rebuild the whole copies from them (one small all-gather each)."""
        for p in module.parameters():
            if getattr(p, "ds_persist", False) and hasattr(p, "ds_tensor") and p.data.numel() == p.ds_numel:
                parts = self.dist.all_gather(p.ds_tensor.data)
                p.data.view(-1).copy_(parts.reshape(-1)[: p.ds_numel])

    def load(self, path: str, engine, snapshots) -> dict:
        """Restore engine (weights, optimizer, LR schedule), snapshots and RNG from ``path``; returns state.json,
        with this rank's method tensors (``method_rank{r}.pt``, ``{}`` when absent) under ``"rank_state"``."""
        with open(os.path.join(path, "state.json")) as f:
            state = json.load(f)
        if state.get("world_size") != self.dist.world_size:
            raise CheckpointError(f"checkpoint {path!r} was written by {state.get('world_size')} ranks; resume it "
                                  f"with the same number of processes (this run has {self.dist.world_size})")
        load_path, _ = engine.load_checkpoint(path, tag="ds", load_module_strict=False, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {os.path.join(path, 'ds')!r}")
        if engine.zero_optimization_stage() == 3:
            self._refresh_persistent(engine.module)
        if snapshots is not None:
            snapshots.load_state_dict(torch.load(os.path.join(path, f"snapshots_rank{self.dist.rank}.pt"),
                                                 weights_only=False))
        set_rng_state(torch.load(os.path.join(path, f"rng_rank{self.dist.rank}.pt"), weights_only=False))
        method_file = os.path.join(path, f"method_rank{self.dist.rank}.pt")
        state["rank_state"] = torch.load(method_file, weights_only=False) if os.path.isfile(method_file) else {}
        return state
