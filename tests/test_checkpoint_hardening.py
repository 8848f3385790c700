"""Checkpoints that survive corruption, full disks and hostile files (issue 20): verified listing with fallback,
clean failure of a save, no pickle executed on load, refusal of an incompatible resume, no duplicate metrics.

Every run is the tiny random testbed of ``tests/test_engine_helpers.py`` on one CPU process. One reference run
(2 epochs, a checkpoint after each: ``step-00000002``, ``step-00000004``) is shared; the others copy its run
directory and damage it.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import pytest
import torch

from engine import checkpoint as ck
from engine.checkpoint import CheckpointError, Checkpointer, read_tree, write_tree
from engine.errors import ConfigError
from tests.test_engine_helpers import ROOT, register_test_rewards, run_config, tiny_overrides

pytestmark = pytest.mark.slow

#: a moving sampler snapshot, so the snapshot files matter for the bit-identical comparisons
COMMON = {"train.epochs": 2, "checkpoint.every": 1, "checkpoint.keep": 5, "crd.sampler_schedule": "0-0.5-0.0-0.5"}
VOLATILE = ("time/", "throughput/", "memory/")  # wall-clock values: the only fields two identical runs differ in


def _records(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in recs]


def _copy_run(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def _main(run_dir: str, method: str | None = None, **extra) -> int:
    """``engine/train.py``'s main on the tiny config: its exit code (0, 1 run failure, 2 config error)."""
    from engine.train import main

    register_test_rewards()
    argv = ["--config", os.path.join(ROOT, "configs/testbed_crd.yaml")] + (["--method", method] if method else [])
    return main(argv + tiny_overrides(run_dir, **{**COMMON, **extra}))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    """The uninterrupted run: steps 1-4, checkpoints after epoch 1 (step 2) and epoch 2 (step 4)."""
    run = str(tmp_path_factory.mktemp("ckpt") / "reference")
    run_config(tiny_overrides(run, **COMMON))
    return run


def test_a_failure_inside_torch_save_removes_the_temp_dir_and_is_one_line(reference, tmp_path, monkeypatch, capsys):
    """A full disk surfaces as a RuntimeError from inside torch.save (not an OSError): the save must still clean
    up, keep the previous checkpoint and end the run with one line and exit code 1; the resumed run then replays
    epoch 2 without duplicating its metrics records."""
    run = str(tmp_path / "full_disk")
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if "step-00000004" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0\n"
                               "PytorchStreamWriter failed writing file data/0: file write failed")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert _main(run) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: checkpoint ") and "step-00000004' not written: a write failed (RuntimeError:" in err
    assert "file write failed" in err and "the previous checkpoint" in err and "step-00000002' is kept" in err
    root = os.path.join(run, "checkpoints")
    assert os.listdir(root) == ["step-00000002"]  # no .tmp- directory left behind
    assert Checkpointer.problem(os.path.join(root, "step-00000002")) is None
    monkeypatch.undo()

    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"kind": "step", "step": 5, "loss/me')  # and a record torn by a kill mid-write
    run_config(tiny_overrides(run, **{**COMMON, "checkpoint.resume": "auto"}))
    got, want = _records(run), _records(reference)
    assert [(r["kind"], r["step"]) for r in got] == [(r["kind"], r["step"]) for r in want]  # one record per step
    assert got == want  # and each equal to the uninterrupted run's


def test_a_failure_after_every_rank_wrote_is_cleaned_up_too(reference, tmp_path, monkeypatch):
    """The last phase (rank 0's manifest, rename) failing with ENOSPC: same clean failure."""
    import errno

    from engine.context import build
    from engine.loop import save_checkpoint

    run = str(tmp_path / "late")
    register_test_rewards()
    from engine.config import load_config
    ctx, _ = build(load_config(os.path.join(ROOT, "configs/testbed_crd.yaml"), tiny_overrides(run, **COMMON)))
    try:
        ctx.global_step = 2
        good = save_checkpoint(ctx, 1)

        def full(path):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(ck, "_write_manifest", full)
        ctx.global_step = 4
        with pytest.raises(CheckpointError, match=r"step-00000004' not written: out of disk space .*GiB were free; "
                                                  r"the previous checkpoint '.*step-00000002' is kept") as info:
            save_checkpoint(ctx, 2)
        assert "\n" not in str(info.value)
        assert os.listdir(os.path.dirname(good)) == ["step-00000002"]
    finally:
        ctx.logger.close()


def _legacy(path: str) -> None:
    """Turn a checkpoint into the format written before this change: ``*.pt`` state files, no manifest."""
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            torch.save(read_tree(os.path.join(path, name)), os.path.join(path, name[: -len(".safetensors")] + ".pt"))
            os.remove(os.path.join(path, name))
    if os.path.exists(os.path.join(path, "manifest.json")):
        os.remove(os.path.join(path, "manifest.json"))
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    state.pop("format", None)
    with open(os.path.join(path, "state.json"), "w") as f:
        json.dump(state, f)


def test_auto_resume_skips_a_truncated_newest_checkpoint_and_loads_a_legacy_one(reference, tmp_path, capsys):
    """step-4's model-state file truncated: resume=auto warns, falls back to step-2 (here in the pre-manifest
    format, which still loads, unverified) and the run ends bit-identical to the uninterrupted one."""
    run = _copy_run(reference, str(tmp_path / "truncated"))
    root = os.path.join(run, "checkpoints")
    model = os.path.join(root, "step-00000004", "ds", "mp_rank_00_model_states.pt")
    size = os.path.getsize(model)
    with open(model, "r+b") as f:
        f.truncate(size // 2)
    _legacy(os.path.join(root, "step-00000002"))
    capsys.readouterr()
    run_config(tiny_overrides(run, **{**COMMON, "checkpoint.resume": "auto"}))
    err = capsys.readouterr().err
    assert (f"[rlflow] warning: skipping checkpoint '{root}/step-00000004': ds/mp_rank_00_model_states.pt has "
            f"{size // 2} bytes, {size} were written (truncated or overwritten)") in err
    assert f"checkpoint '{root}/step-00000002' has no manifest.json" in err and "unverified" in err
    assert _records(run) == _records(reference)
    for name in ("ds/mp_rank_00_model_states.pt", "snapshots_rank0.safetensors", "rng_rank0.safetensors"):
        a, b = (os.path.join(r, "checkpoints", "step-00000004", name) for r in (run, reference))
        with open(a, "rb") as fa, open(b, "rb") as fb:
            assert fa.read() == fb.read(), name  # the rewritten step-4 checkpoint is the uninterrupted one's


def test_verification_catches_unparsable_state_and_same_size_corruption(reference, tmp_path, capsys):
    root = os.path.join(_copy_run(reference, str(tmp_path / "bad")), "checkpoints")
    s2, s4 = (os.path.join(root, f"step-0000000{i}") for i in (2, 4))
    ckpt = Checkpointer(root, dist=None)
    # a same-size overwrite: only the SHA-256 sees it (the listing checks sizes, the resume checksums too)
    snap, = (os.path.join(s4, n) for n in os.listdir(s4) if n.startswith("snapshots_rank0."))
    with open(snap, "r+b") as f:
        f.seek(os.path.getsize(snap) - 1)
        last = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([last[0] ^ 0xFF]))
    assert ckpt.list() == [s2, s4]
    assert ckpt.resolve("auto") == s2
    assert "snapshots_rank0.safetensors does not match its SHA-256 in manifest.json" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=r"step-00000004' is corrupt: snapshots_rank0.safetensors does not "
                                              r"match its SHA-256 .*checkpoint.resume=auto picks"):
        ckpt.resolve(s4)
    # unparsable state.json (a torn write)
    with open(os.path.join(s4, "state.json"), "w") as f:
        f.write('{"epoch": 2, "step"')
    assert ckpt.list() == [s2] and ckpt.resolve("auto") == s2
    assert "step-00000004': its state.json is unreadable (JSONDecodeError:" in capsys.readouterr().err
    # resume=PATH to it through train.py: one line, exit code 1, before any model is built
    assert _main(str(tmp_path / "other"), **{"checkpoint.resume": s4}) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: checkpoint '{s4}' is corrupt: its state.json is unreadable")
    # only corrupt checkpoints: auto refuses rather than silently starting afresh over them
    shutil.rmtree(s2)
    with pytest.raises(CheckpointError, match="resume=auto: none of the 1 checkpoints .* is complete"):
        ckpt.resolve("auto")


def test_incompatible_resume_is_refused_naming_the_keys(reference, tmp_path, capsys):
    """Another method and another LoRA rank: exit 2 with one sentence naming both; harmless changes pass."""
    s4 = os.path.join(reference, "checkpoints", "step-00000004")
    assert _main(str(tmp_path / "x"), method="nft", **{"model.lora_rank": 8, "checkpoint.resume": s4}) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"config error: config does not match checkpoint '{s4}': method (checkpoint 'crd', this "
                          "run 'nft'); model.lora_rank (checkpoint 4, this run 8); resume with the checkpoint's")
    from engine.config import load_config, to_dict
    ckpt = Checkpointer(os.path.dirname(s4), dist=None)
    harmless = tiny_overrides(str(tmp_path / "y"), **{**COMMON, "train.epochs": 7, "train.lr": 1e-5,
                                                      "log.progress": "true", "checkpoint.keep": 1})
    ckpt.check_config(s4, to_dict(load_config(os.path.join(ROOT, "configs/testbed_crd.yaml"), harmless)))
    family = tiny_overrides(str(tmp_path / "z"), **{**COMMON, "model.random_init": "false",
                                                    "deepspeed.zero_stage": 2})
    with pytest.raises(ConfigError, match=r"model.random_init \(checkpoint True, this run False\); "
                                          r"deepspeed.zero_stage \(checkpoint 0, this run 2\)"):
        ckpt.check_config(s4, to_dict(load_config(os.path.join(ROOT, "configs/testbed_crd.yaml"), family)))


class _Evil:
    """A pickle whose loading creates ``marker`` (any code could run in its place)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("target", ["snapshots", "deepspeed"])
def test_resume_never_executes_a_pickle(reference, tmp_path, target):
    """A checkpoint from an untrusted source, manifest removed (so the loader itself is on trial), with a state
    file or DeepSpeed's model file replaced by a malicious pickle: the resume fails in one line, nothing runs."""
    run = _copy_run(reference, str(tmp_path / "evil"))
    s4 = os.path.join(run, "checkpoints", "step-00000004")
    if os.path.exists(os.path.join(s4, "manifest.json")):
        os.remove(os.path.join(s4, "manifest.json"))
    marker = str(tmp_path / "pwned")
    if target == "snapshots":
        for name in [n for n in os.listdir(s4) if n.startswith("snapshots_rank0.")]:
            os.remove(os.path.join(s4, name))
        torch.save({"policy": _Evil(marker)}, os.path.join(s4, "snapshots_rank0.pt"))
        where = "(snapshots_rank0)"
    else:
        model = os.path.join(s4, "ds", "mp_rank_00_model_states.pt")
        state = torch.load(model, weights_only=True)
        state["evil"] = _Evil(marker)
        torch.save(state, model)
        where = "(ds/)"
    with pytest.raises(CheckpointError, match=rf"step-00000004' could not be loaded {re.escape(where)}: "
                                              r"UnpicklingError: .*Weights only load failed") as info:
        run_config(tiny_overrides(run, **{**COMMON, "checkpoint.resume": s4}))
    assert "\n" not in str(info.value)
    assert not os.path.exists(marker)


def test_state_files_round_trip_rng_and_nested_state_exactly(tmp_path):
    """The pickle-free state format keeps every RNG state bit for bit (python, numpy, torch) and the structure of
    an optimizer state dict (int keys, tuples, tensors of every dtype)."""
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    random.random(), np.random.randn(), np.random.standard_normal(), torch.rand(3)  # mid-stream, cached gaussian
    path = str(tmp_path / "rng.safetensors")
    write_tree(path, ck.rng_state())
    want = (random.random(), np.random.randn(4).tolist(), torch.randn(4))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    ck.set_rng_state(read_tree(path))
    got = (random.random(), np.random.randn(4).tolist(), torch.randn(4))
    assert got[:2] == want[:2] and torch.equal(got[2], want[2])

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3, 2))], lr=1e-3, betas=(0.9, 0.99))
    opt.param_groups[0]["params"][0].grad = torch.ones(3, 2)
    opt.step()
    tree = {"opt": opt.state_dict(), "bf16": torch.randn(5).bfloat16(), ("snap", 0, 1): torch.arange(4),
            "floats": [float("inf"), 1e-310, 0.1, -0.0], "none": None, "np": np.float32(1.5)}
    write_tree(str(tmp_path / "t.safetensors"), tree)
    back = read_tree(str(tmp_path / "t.safetensors"))
    assert back["opt"]["param_groups"] == opt.state_dict()["param_groups"]  # tuples (betas) stay tuples
    assert torch.equal(back["opt"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert back["bf16"].dtype == torch.bfloat16 and torch.equal(back["bf16"], tree["bf16"])
    assert torch.equal(back[("snap", 0, 1)], tree[("snap", 0, 1)])
    assert str(back["floats"]) == str(tree["floats"]) and back["none"] is None
    assert type(back["np"]) is np.float32 and back["np"] == 1.5
    with pytest.raises(TypeError, match="cannot checkpoint a _Evil"):
        write_tree(str(tmp_path / "e.safetensors"), {"x": _Evil("nowhere")})

