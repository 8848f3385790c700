"""Atomic, verified, pickle-free checkpoints: resume reproduces the uninterrupted run bit-for-bit (CPU, fp32).

A checkpoint is a directory ``<run>/checkpoints/step-00000012/`` holding
- ``ds/``: the DeepSpeed engine's own checkpoint (trainable weights, optimizer state (ZeRO partitions per rank), LR
  schedule); frozen weights are not written (they are the pretrained model, re-loaded from its directory);
- ``snapshots_rank<r>.safetensors``: this rank's storages of the EMA snapshots (theta_old, theta_samp, eval EMA;
  under ZeRO-3 the local partitions), with their fp32 masters;
- ``rng_rank<r>.safetensors``: this rank's python / numpy / torch (CPU and CUDA) RNG states;
- ``method_rank<r>.safetensors``: the method's own tensors (``Method.rank_state``), when it has any;
- ``state.json``: counters (epoch, optimizer step), data position, world size, the config;
- ``manifest.json``, written last: the size and SHA-256 of every other file.

Writing is atomic: everything goes to ``.tmp-step-...``; every rank fsyncs its files, then rank 0 writes the
manifest, fsyncs and renames the directory to its final name (a process killed while writing leaves only a ``.tmp-``
directory, which is never loaded and is removed by the next save). ANY failure while saving (``OSError``, the
``RuntimeError`` ``torch.save`` raises on a full disk, ...) removes the temporary directory and raises
:class:`CheckpointError` in one line; the previous checkpoint stays. The last ``keep`` are kept.

Verification: a checkpoint is listed only when its ``state.json`` parses and every file of its manifest has the
recorded size; ``checkpoint.resume=auto`` also checks the SHA-256s, newest first, skips (with a one-line warning) a
checkpoint that fails and resumes from the newest complete one; ``checkpoint.resume=PATH`` to a corrupt one is one
:class:`CheckpointError`. SHA-256, not a CRC: a cryptographic digest leaves no practical chance of a corrupted file
matching (hashlib uses the CPU's SHA instructions: about 0.75 GB/s on one shared core of the 2-core CI machine, small
next to writing the files). Checkpoints written before the manifest existed (``*.pt`` state files, no
``manifest.json``) still load, unverified, with a warning.

No pickle is executed on load: the state files are safetensors (a JSON header + raw tensor bytes) whose structure
(dicts, lists, tuples, numbers, numpy arrays of the RNG states) is JSON in the header (:func:`write_tree`);
``state.json`` is JSON. DeepSpeed writes ``ds/`` with ``torch.save`` and its ``TorchCheckpointEngine`` loads it with
``torch.load(weights_only=False)``, i.e. it would unpickle anything; :meth:`Checkpointer.load` therefore swaps in a
``weights_only=True`` loader for the duration of the load, allowing only the three plain DeepSpeed classes its
optimizer files hold (``ZeroStageEnum``, ``LossScaler``, ``fragment_address``). Legacy ``*.pt`` state files load
with ``weights_only=True`` too (numpy's array reconstruction allowed for the RNG file).

Resuming checks the run's config against the checkpoint's: the keys of :data:`MUST_MATCH` (method, the model and
its adapters, the ZeRO stage) must be equal, else one :class:`~engine.errors.ConfigError` names every differing
key; everything else (epochs, logging, learning rate, the method's hyperparameters, ...) may change.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import sys
from typing import Any

import numpy as np
import torch

from engine.errors import ConfigError

PREFIX = "step-"
TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"
FORMAT = 2  # 1: the *.pt state files without a manifest (before checksums); 2: safetensors + manifest.json

#: config keys a resumed run must share with its checkpoint: what the saved weights and optimizer state MEAN (the
#: method and its adapters/snapshots, the base model, the adapter layout and scale) and how DeepSpeed laid them out
#: (the ZeRO stage); the world size is checked separately. Anything else may change on resume.
MUST_MATCH = ("method", "model.family", "model.path", "model.random_init", "model.size", "model.finetune",
              "model.lora_rank", "model.lora_alpha", "model.lora_targets", "deepspeed.zero_stage")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read (the previous complete checkpoint is untouched)."""


def _warn(msg: str) -> None:
    print(f"[rlflow] warning: {msg}", file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


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


# ------------------------------------------------------------------------------------- pickle-free state files
def _encode(obj, tensors: dict[str, torch.Tensor], seen: set[int]):
    """``obj`` as JSON, every tensor replaced by ``{"x": key}`` into ``tensors``. Tagged objects keep what JSON
    loses: tuples, non-string dict keys, numpy arrays/scalars (exact: integers and float reprs round-trip)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if torch.is_tensor(obj):
        t = obj.detach().cpu().contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != t.nbytes:  # safetensors refuses shared storage
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        key = str(len(tensors))
        tensors[key] = t
        return {"x": key}
    if isinstance(obj, np.ndarray):
        return {"a": [obj.dtype.str, list(obj.shape), obj.ravel().tolist()]}
    if isinstance(obj, np.generic):
        return {"s": [obj.dtype.str, obj.item()]}
    if isinstance(obj, tuple):
        return {"t": [_encode(v, tensors, seen) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, seen) for v in obj]
    if isinstance(obj, dict):
        return {"d": [[_encode(k, tensors, seen), _encode(v, tensors, seen)] for k, v in obj.items()]}
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} (tensors, numbers, strings, None, numpy arrays, "
                    "and lists, tuples and dicts of them only)")


def _decode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    (tag, val), = obj.items()
    if tag == "x":
        return tensors[val]
    if tag == "a":
        return np.array(val[2], dtype=np.dtype(val[0])).reshape(val[1])
    if tag == "s":
        return np.dtype(val[0]).type(val[1])
    if tag == "t":
        return tuple(_decode(v, tensors) for v in val)
    if tag == "d":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in val}
    raise ValueError(f"unknown tag {tag!r}")


def write_tree(path: str, obj) -> None:
    """Write a tree of tensors and plain values as one safetensors file (the structure is its JSON metadata)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(obj, tensors, set())
    save_file(tensors, path, metadata={"rlflow_tree": json.dumps(tree)})


def read_tree(path: str):
    """The tree :func:`write_tree` wrote (tensors on the CPU). Parses JSON and raw tensor bytes only: no pickle."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "rlflow_tree" not in meta:
        raise ValueError(f"{path!r} is not an rlflow state file (no rlflow_tree metadata)")
    return _decode(json.loads(meta["rlflow_tree"]), tensors)


def _legacy_globals() -> list:
    """The only non-tensor types a format-1 ``rng_rank<r>.pt`` holds (numpy's RNG state array)."""
    core = getattr(np, "_core", None) or np.core
    return [np.ndarray, np.dtype, core.multiarray._reconstruct, type(np.dtype(np.uint32))]


def _read_state_file(path: str, stem: str):
    """``<stem>.safetensors`` (format 2) or the legacy ``<stem>.pt`` loaded with ``weights_only=True``; None when
    neither exists."""
    new, old = os.path.join(path, f"{stem}.safetensors"), os.path.join(path, f"{stem}.pt")
    if os.path.isfile(new):
        return read_tree(new)
    if os.path.isfile(old):
        with torch.serialization.safe_globals(_legacy_globals()):
            return torch.load(old, map_location="cpu", weights_only=True)
    return None


def _deepspeed_safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


class _SafeDeepSpeedLoads:
    """While active, the engine's ``TorchCheckpointEngine`` loads with ``torch.load(weights_only=True)`` (its own
    ``load`` passes ``weights_only=False``: arbitrary unpickling). Other checkpoint engines are left alone (they call
    ``torch.load`` without the argument, whose default is ``weights_only=True`` in torch >= 2.6)."""

    def __init__(self, engine) -> None:
        self.ce = getattr(engine, "checkpoint_engine", None)

    def __enter__(self):
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        if isinstance(self.ce, TorchCheckpointEngine):
            allowed = _deepspeed_safe_globals()

            def load(path, map_location=None):
                with torch.serialization.safe_globals(allowed):
                    return torch.load(path, map_location=map_location, weights_only=True)
            self.ce.load = load  # instance attribute: shadows the class's method
        else:
            self.ce = None
        return self

    def __exit__(self, *exc):
        if self.ce is not None:
            del self.ce.load


# ----------------------------------------------------------------------------------------------- fsync / digests
def _fsync_tree(path: str) -> None:
    """fsync every file and directory under ``path``. A file that vanishes during the walk is skipped: another rank's
    writer may be renaming its temporary file (safetensors writes ``.tmpXXXXXX`` and renames it); rank 0 walks the
    whole directory again once every rank is done."""
    for root, dirs, files in os.walk(path):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except FileNotFoundError:
                continue
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


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(path: str) -> list[str]:
    """Every file under ``path`` except the manifest, as sorted relative paths."""
    out = []
    for root, _, names in os.walk(path):
        out.extend(os.path.relpath(os.path.join(root, n), path) for n in names)
    return sorted(f for f in out if f != MANIFEST)


def _write_manifest(path: str) -> None:
    """Rank 0, after every rank wrote and fsynced its files: sizes and SHA-256 of all of them, fsynced."""
    files = {f: {"size": os.path.getsize(os.path.join(path, f)), "sha256": _sha256(os.path.join(path, f))}
             for f in _files(path)}
    with open(os.path.join(path, MANIFEST), "w") as fh:
        json.dump({"format": FORMAT, "files": files}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def _pause_for_tests(step: int) -> None:
    """Tests simulate a kill mid-write: with ``RLFLOW_CKPT_PAUSE=<file>`` (and ``RLFLOW_CKPT_PAUSE_STEP=<step>``)
    the writer creates ``<file>`` and sleeps here, half-way through the checkpoint, until it is killed."""
    flag = os.environ.get("RLFLOW_CKPT_PAUSE")
    if flag and int(os.environ.get("RLFLOW_CKPT_PAUSE_STEP", step)) == step:
        import time
        open(flag, "w").close()
        time.sleep(3600)


def config_differences(saved: dict, current: dict) -> list[str]:
    """``"key (checkpoint X, this run Y)"`` for every :data:`MUST_MATCH` key that differs (JSON-normalised values;
    ``model.path`` compared as a resolved path)."""
    def get(tree, dotted):
        for part in dotted.split("."):
            if not isinstance(tree, dict) or part not in tree:
                return None
            tree = tree[part]
        return json.loads(json.dumps(tree, default=str))

    out = []
    for key in MUST_MATCH:
        a, b = get(saved, key), get(current, key)
        if key == "model.path" and isinstance(a, str) and isinstance(b, str):
            same = os.path.realpath(a) == os.path.realpath(b)
        else:
            same = a == b
        if not same:
            out.append(f"{key} (checkpoint {a!r}, this run {b!r})")
    return out


class Checkpointer:
    """Save/find/load checkpoints under ``root`` (every rank calls every method; collectives inside)."""

    def __init__(self, root: str, dist, keep: int = 3) -> None:
        self.root, self.dist, self.keep = root, dist, keep

    # --------------------------------------------------------------------------------------------- listing
    def _step_dirs(self) -> list[str]:
        """Every ``step-*`` directory, complete or not, oldest first."""
        if not os.path.isdir(self.root):
            return []
        return [os.path.join(self.root, n) for n in sorted(os.listdir(self.root))
                if n.startswith(PREFIX) and os.path.isdir(os.path.join(self.root, n))]

    @staticmethod
    def problem(path: str, checksums: bool = True) -> str | None:
        """Why ``path`` is not a complete checkpoint (one phrase), or None. Checks that ``state.json`` parses, then
        the manifest: every file present with its recorded size and (``checksums``) SHA-256. A checkpoint without
        a manifest (format 1) passes unverified."""
        try:
            with open(os.path.join(path, "state.json")) as f:
                state = json.load(f)
            if not isinstance(state, dict):
                raise ValueError("not a JSON object")
        except FileNotFoundError:
            return "it has no state.json"
        except (OSError, ValueError) as e:
            return f"its state.json is unreadable ({_one_line(e)})"
        mpath = os.path.join(path, MANIFEST)
        if not os.path.exists(mpath):
            return None
        try:
            with open(mpath) as f:
                files = json.load(f)["files"]
            entries = [(name, int(e["size"]), str(e["sha256"])) for name, e in files.items()]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return f"its {MANIFEST} is unreadable ({_one_line(e)})"
        for name, size, digest in entries:
            fp = os.path.join(path, name)
            if not os.path.isfile(fp):
                return f"{name} is missing"
            got = os.path.getsize(fp)
            if got != size:
                return f"{name} has {got} bytes, {size} were written (truncated or overwritten)"
        if checksums:
            for name, _, digest in entries:
                if _sha256(os.path.join(path, name)) != digest:
                    return f"{name} does not match its SHA-256 in {MANIFEST} (corrupted)"
        return None

    def list(self) -> list[str]:
        """Complete checkpoints (state.json parses, files of the manifest at their sizes), oldest first."""
        return [p for p in self._step_dirs() if self.problem(p, checksums=False) is None]

    def latest(self, checksums: bool = True) -> str | None:
        """The newest checkpoint that passes :meth:`problem` (checksums too by default); every newer one that does
        not is skipped with a one-line warning."""
        for path in reversed(self._step_dirs()):
            why = self.problem(path, checksums)
            if why is None:
                if not os.path.exists(os.path.join(path, MANIFEST)):
                    _warn(f"checkpoint {path!r} has no {MANIFEST} (written before checksums were recorded): "
                          "using it unverified")
                return path
            _warn(f"skipping checkpoint {path!r}: {why}")
        return None

    def resolve(self, resume: str) -> str | None:
        """``''`` -> None, ``auto`` -> the newest complete checkpoint (None when there is none at all;
        CheckpointError when there are only corrupt ones), a path -> that path (ConfigError when it is not a
        checkpoint, CheckpointError when it is corrupt). Rank 0 verifies, the others follow."""
        if not resume:
            return None
        outcome = None
        if self.dist is None or self.dist.is_main:
            try:
                outcome = ("ok", self._resolve(resume))
            except (ConfigError, CheckpointError) as e:
                outcome = (type(e).__name__, str(e))
        if self.dist is not None and self.dist.world_size > 1:
            outcome = self.dist.broadcast_object(outcome)
        kind, value = outcome
        if kind == "ok":
            return value
        raise (ConfigError if kind == "ConfigError" else CheckpointError)(value)

    def _resolve(self, resume: str) -> str | None:
        if resume == "auto":
            found, dirs = self.latest(), self._step_dirs()
            if found is None and dirs:  # starting afresh would silently discard them (and append to the logs)
                raise CheckpointError(f"checkpoint.resume=auto: none of the {len(dirs)} checkpoints in "
                                      f"{self.root!r} is complete (see the warnings above); resume from a path "
                                      "or start a fresh run in another output_dir")
            return found
        if not os.path.isfile(os.path.join(resume, "state.json")):
            raise ConfigError(f"config key 'checkpoint.resume': {resume!r} is not a checkpoint directory "
                              "(no state.json)")
        why = self.problem(resume)
        if why is not None:
            raise CheckpointError(f"checkpoint {resume!r} is corrupt: {why}; resume from another one "
                                  "(checkpoint.resume=auto picks the newest complete checkpoint)")
        if not os.path.exists(os.path.join(resume, MANIFEST)):
            _warn(f"checkpoint {resume!r} has no {MANIFEST} (written before checksums were recorded): "
                  "loading it unverified")
        return resume

    # --------------------------------------------------------------------------------------------- saving
    def save(self, step: int, engine, snapshots, state: dict[str, Any], rank_state: dict | None = None) -> str:
        """Write checkpoint ``step`` atomically; returns its final path. ``rank_state``: this rank's method tensors
        (``Method.rank_state``), written as ``method_rank{r}.safetensors`` when not empty. Any failure (on any rank)
        removes the temporary directory and raises CheckpointError on every rank."""
        final = os.path.join(self.root, f"{PREFIX}{step:08d}")
        tmp = os.path.join(self.root, f"{TMP_PREFIX}{PREFIX}{step:08d}")
        d = self.dist
        error: BaseException | None = None
        try:
            if d.is_main:
                os.makedirs(self.root, exist_ok=True)
                for name in os.listdir(self.root):  # leftovers of killed writers
                    if name.startswith(TMP_PREFIX):
                        shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
                os.makedirs(tmp)
        except Exception as e:
            error = e
        if d.any(error is not None):  # (a collective: every rank waits for the directory)
            self._fail(final, tmp, error)
        try:
            engine.save_checkpoint(tmp, tag="ds", client_state={}, save_latest=False,
                                   exclude_frozen_parameters=True)
            write_tree(os.path.join(tmp, f"snapshots_rank{d.rank}.safetensors"),
                       snapshots.state_dict() if snapshots is not None else {})
            write_tree(os.path.join(tmp, f"rng_rank{d.rank}.safetensors"), rng_state())
            if rank_state:
                write_tree(os.path.join(tmp, f"method_rank{d.rank}.safetensors"), rank_state)
            if d.is_main:
                _pause_for_tests(step)
                with open(os.path.join(tmp, "state.json"), "w") as f:
                    json.dump(dict(state, step=step, world_size=d.world_size, format=FORMAT), f, indent=1,
                              default=str)
            _fsync_tree(tmp)
        except Exception as e:
            error = e
        if d.any(error is not None):  # every rank's files are written and fsynced when this returns False
            self._fail(final, tmp, error)
        try:
            if d.is_main:
                _fsync_tree(tmp)  # every rank's files, complete now
                _write_manifest(tmp)
                if os.path.exists(final):
                    shutil.rmtree(final)
                os.rename(tmp, final)
                _fsync_dir(self.root)
        except Exception as e:
            error = e
        if d.any(error is not None):
            self._fail(final, tmp, error)
        if d.is_main:
            for old in self._step_dirs()[:-self.keep]:  # corrupt ones too: they would never be loaded
                shutil.rmtree(old, ignore_errors=True)
        d.barrier()
        return final

    def _fail(self, final: str, tmp: str, error: BaseException | None):
        """Remove the temporary directory, then raise one CheckpointError line on every rank."""
        free = None
        if self.dist.is_main:
            try:
                free = shutil.disk_usage(self.root).free
            except OSError:
                pass
            shutil.rmtree(tmp, ignore_errors=True)
        self.dist.barrier()
        found = self.list()
        prev = found[-1] if found else None
        if error is None:
            why = "another rank failed to write"
        elif _is_enospc(error):
            why = f"out of disk space ({_one_line(error)})"
        else:
            why = f"a write failed ({_one_line(error)})"
        room = f"; {free / 2 ** 30:.2f} GiB were free" if free is not None else ""
        raise CheckpointError(f"checkpoint {final!r} not written: {why}{room}; the previous checkpoint {prev!r} is "
                              "kept (free disk space or lower checkpoint.keep)") from None

    # --------------------------------------------------------------------------------------------- loading
    @torch.no_grad()
    def _refresh_persistent(self, module) -> None:
        """ZeRO-3 keeps small ("persistent") parameters whole on every rank next to their partition; DeepSpeed's
        load restores the partitions only, so rebuild the whole copies from them (one small all-gather each)."""
        for p in module.parameters():
            if getattr(p, "ds_persist", False) and hasattr(p, "ds_tensor") and p.data.numel() == p.ds_numel:
                parts = self.dist.all_gather(p.ds_tensor.data)
                p.data.view(-1).copy_(parts.reshape(-1)[: p.ds_numel])

    def check_config(self, path: str, config: dict) -> None:
        """ConfigError naming every :data:`MUST_MATCH` key in which ``config`` (``to_dict`` of this run's config)
        differs from the one ``path`` was written with."""
        state = self._state(path)
        diff = config_differences(state.get("config") or {}, config) if state.get("config") else []
        if diff:
            raise ConfigError(f"config does not match checkpoint {path!r}: {'; '.join(diff)}; resume with the "
                              "checkpoint's settings or start a fresh run (checkpoint.resume='' or another "
                              "output_dir)")

    @staticmethod
    def _state(path: str) -> dict:
        try:
            with open(os.path.join(path, "state.json")) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path!r}: state.json is unreadable ({_one_line(e)})") from None

    def load(self, path: str, engine, snapshots) -> dict:
        """Restore engine (weights, optimizer, LR schedule), snapshots and RNG from ``path``; returns state.json,
        with this rank's method tensors (``method_rank{r}``, ``{}`` when absent) under ``"rank_state"``. Nothing
        is unpickled beyond tensors and the allowed plain types; any failure is one CheckpointError."""
        state = self._state(path)
        if state.get("world_size") != self.dist.world_size:
            raise CheckpointError(f"checkpoint {path!r} was written by {state.get('world_size')} ranks; resume it "
                                  f"with the same number of processes (this run has {self.dist.world_size})")
        r = self.dist.rank
        part = "ds/"
        try:
            with _SafeDeepSpeedLoads(engine):
                load_path, _ = engine.load_checkpoint(path, tag="ds", load_module_strict=False,
                                                      load_optimizer_states=True, load_lr_scheduler_states=True)
            if load_path is None:
                raise FileNotFoundError("DeepSpeed found no checkpoint in it")
            if engine.zero_optimization_stage() == 3:
                self._refresh_persistent(engine.module)
            part = f"snapshots_rank{r}"
            if snapshots is not None:
                snap = _read_state_file(path, part)
                if snap is None:
                    raise FileNotFoundError("missing")
                snapshots.load_state_dict(snap)
            part = f"rng_rank{r}"
            rng = _read_state_file(path, part)
            if rng is None:
                raise FileNotFoundError("missing")
            set_rng_state(rng)
            part = f"method_rank{r}"
            state["rank_state"] = _read_state_file(path, part) or {}
        except Exception as e:
            raise CheckpointError(f"checkpoint {path!r} could not be loaded ({part}): {_one_line(e)}") from None
        return state


def _is_enospc(error: BaseException) -> bool:
    """A full disk, whether raised as OSError(ENOSPC) or wrapped (``torch.save``: RuntimeError "file write failed",
    with or without the errno text)."""
    e: BaseException | None = error
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False
