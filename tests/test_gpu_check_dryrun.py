"""The prepared GPU check (``benchmarks/gpu_check.py``) runs end to end on CPU at tiny widths, so the one GPU run it
exists for cannot fail on imports, shapes, dtypes or table writing. The dry run executes the very code the GPU run
does (the fused kernels in bf16 through the Triton interpreter, the SD3/FLUX micro-steps, the rollout, the engine
epoch through DeepSpeed next to the reference loop); only the sizes, the timer and the compile backend differ."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = ("crd_loss", "nft_loss", "fdfo_pairs", "fdfo_loss")


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run (about 20 s on the 2-core CPU machine) into a copy of the real README."""
    d = tmp_path_factory.mktemp("gpu_check")
    readme = d / "README.md"
    original = open(os.path.join(ROOT, "benchmarks", "README.md")).read()
    readme.write_text(original)
    out = d / "gpu_check.json"
    from tests.test_engine_helpers import clean_env
    # without this pytest process's rendezvous variables: an in-process engine test earlier in the session leaves
    # MASTER_PORT behind, still held by its store (EADDRINUSE in the dry run's epoch)
    env = {**clean_env(), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out),
                           "--readme", str(readme)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=3000)
    return dict(proc=proc, out=out, readme=readme, original=original, dir=d)


def test_dry_run_succeeds_and_writes_json(dry_run):
    proc = dry_run["proc"]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads(dry_run["out"].read_text())
    assert res["meta"]["dry_run"] is True and res["errors"] == []
    # nothing skipped for a missing package or a budget: every path ran (GRPO may be absent from the engine)
    assert all(s["reason"].startswith("grpo:") for s in res["skipped"]), res["skipped"]
    nums = list(_numbers({k: v for k, v in res.items() if k != "meta"}))
    assert nums and all(math.isfinite(x) for x in nums)

    rows = {(r["kernel"], r["impl"], r["batch"]) for r in res["kernels"]}
    for kernel in KERNELS:  # fused and eager at both sizes, torch.compile at the bandwidth size
        assert {(kernel, "fused", 4), (kernel, "reference", 4), (kernel, "compiled", 4), (kernel, "fused", 2),
                (kernel, "reference", 2)} <= rows
    for r in res["kernels"]:
        assert r["ms"] > 0 and r["gbps"] > 0 and r["ideal_bytes"] > 0
        if r["impl"] != "reference":
            assert r["speedup_vs_eager"] > 0

    methods = [(r["model"], r["method"]) for r in res["microsteps"]]
    assert [m for f, m in methods if f == "tiny SD3"][:3] == ["crd", "nft", "fdfo"]
    assert ("tiny FLUX", "crd") in methods
    from engine.methods import METHODS
    if "grpo" in METHODS:  # registered: its micro-step must run too
        assert ("tiny SD3", "grpo") in methods
    else:
        assert any(s["reason"].startswith("grpo:") for s in res["skipped"])
    for r in res["microsteps"]:
        assert r["ms"] > 0 and r["flops_per_step"] > 0 and r["peak_bytes"] > 0

    (roll,) = res["rollout"]
    assert roll["images_per_s"] > 0 and roll["images"] == 2
    (ep,) = res["epoch"]
    assert ep["engine_s"] > 0 and ep["reference_s"] > 0 and ep["ratio"] > 0 and ep["must_show"] == 1.5
    assert ep["engine_peak_bytes"] > 0 and ep["reference_peak_bytes"] > 0


def test_dry_run_writes_the_table_between_the_markers(dry_run):
    from benchmarks.gpu_check import BEGIN, END

    doc = dry_run["readme"].read_text()
    assert doc.count(BEGIN) == 1 and doc.count(END) == 1
    before, rest = doc.split(BEGIN)
    block, after = rest.split(END)
    orig = dry_run["original"]
    if BEGIN in orig:  # the rest of the README is left exactly as it was
        assert before == orig.split(BEGIN)[0] and after == orig.split(END)[1]
    else:
        assert before.rstrip("\n") == orig.rstrip("\n")
    assert "CPU dry run" in block and "triton" in block
    for kernel in KERNELS:
        assert f"| {kernel} | fused |" in block and f"| {kernel} | compiled |" in block
    for method in ("crd", "nft", "fdfo"):
        assert f"| tiny SD3 | {method} |" in block
    assert "| tiny FLUX | crd |" in block and "reference / engine" in block
    # the table alone comes back beside the JSON (the device machine's README copy does not)
    assert (dry_run["dir"] / "gpu_check.md").read_text().strip() == BEGIN + block + END


def test_from_json_rewrites_the_block_in_place(dry_run, tmp_path):
    """The device run's JSON is turned into README rows here; a second write replaces the block, never appends."""
    from benchmarks import gpu_check

    target = tmp_path / "README.md"
    target.write_text("# Title\n\ntext before\n")
    for _ in range(2):
        assert gpu_check.main(["--from-json", str(dry_run["out"]), "--readme", str(target)]) == 0
    doc = target.read_text()
    assert doc.startswith("# Title\n\ntext before\n") and doc.count(gpu_check.BEGIN) == 1
    assert (dry_run["dir"] / "gpu_check.md").read_text().strip() in doc


def test_deadline_skips_what_is_left_and_says_so(tmp_path):
    """Past the total deadline every section is skipped with its reason (nothing raises, nothing half-measured)."""
    from benchmarks import gpu_check

    res = gpu_check.run(dry_run=True, deadline_s=0.0, sections=gpu_check.SECTIONS, run_dir=str(tmp_path))
    assert res["errors"] == []
    assert all(res[s] == [] for s in gpu_check.SECTIONS)
    reasons = [s for s in res["skipped"] if not s["reason"].startswith("grpo:")]
    assert {s["section"] for s in reasons} == set(gpu_check.SECTIONS)
    assert all("total deadline" in s["reason"] for s in reasons)


def test_device_figures_by_name():
    from benchmarks.gpu_check import hbm_bytes_per_s
    from benchmarks.flops import peak_flops

    assert hbm_bytes_per_s("NVIDIA H200") == 4.8e12 and hbm_bytes_per_s("NVIDIA H100 80GB HBM3") == 3.35e12
    assert hbm_bytes_per_s("NVIDIA H100 PCIe") == 2.0e12 and hbm_bytes_per_s("Tesla T4") is None
    assert peak_flops("NVIDIA H200") == peak_flops("NVIDIA H100 80GB HBM3") == 989e12


def test_hard_stop_writes_what_was_measured(tmp_path, monkeypatch):
    """A row that outlasts the deadline by the grace period triggers the watchdog with the results so far and the
    name of that row (the real run then writes them and exits with status 3, inside the 8 minutes)."""
    import threading
    import time

    from benchmarks import gpu_check

    monkeypatch.setitem(gpu_check.RUNNERS, "rollout", lambda c: time.sleep(3.0))
    got, fired = {}, threading.Event()

    def on_hard_stop(res):
        got.update(res)
        fired.set()

    gpu_check.run(dry_run=True, deadline_s=0.2, sections=["rollout"], run_dir=str(tmp_path),
                  on_hard_stop=on_hard_stop, grace_s=0.3)
    assert fired.is_set()
    (err,) = got["errors"]
    assert "hard stop" in err["error"] and "section rollout was still running" in err["error"]
