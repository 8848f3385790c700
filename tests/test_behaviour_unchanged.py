"""Behaviour pinned across refactors: short CPU runs of every method (testbed CRD/NFT/FDFO/DIDR, a tiny SD3 CRD run)
give, bit for bit, the per-step metrics and final weights recorded before the "one house" refactor
(``tests/golden/behaviour.json``, made by ``tests/behaviour_runs.py`` at commit 0a28f68, torch 2.13.0+cpu, one
thread). A change of any loss, gradient, draw or update order changes a float or a weight digest here.
The ``nft`` entry was re-recorded on 2026-12-03 (same procedure: one thread, ``python -m tests.behaviour_runs nft``)
because NFT's defaults now follow the official DiffusionNFT trainer (additive std floor ``std + 1e-4``, K of ALL N
sampler sigmas); every other entry is still the 0a28f68 recording, byte for byte."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.behaviour_runs import RUNS
from tests.test_engine_helpers import ROOT, clean_env

pytestmark = pytest.mark.slow

GOLDEN = os.path.join(ROOT, "tests", "golden", "behaviour.json")


def golden() -> dict:
    with open(GOLDEN) as f:
        return json.load(f)["runs"]


def run_now(name: str) -> dict:
    env = {**clean_env(), "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-m", "tests.behaviour_runs", name], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BEHAVIOUR ")]
    assert proc.returncode == 0 and lines, f"run {name} failed:\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("BEHAVIOUR "):])


def test_golden_covers_every_method_run():
    assert set(golden()) == set(RUNS)
    assert {"crd", "nft", "fdfo", "didr", "crd_sd3"} <= set(RUNS)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_run_is_bit_identical_to_the_recorded_one(name):
    want, got = golden()[name], run_now(name)
    assert len(got["steps"]) == len(want["steps"]), f"{name}: {len(got['steps'])} optimizer steps, expected " \
                                                    f"{len(want['steps'])}"
    for i, (w, g) in enumerate(zip(want["steps"], got["steps"])):
        missing = sorted(set(w) - set(g))
        assert not missing, f"{name} step {i}: metrics {missing} no longer logged"
        diff = {k: (w[k], g[k]) for k in w if w[k] != g[k]}
        assert not diff, f"{name} step {i}: metrics changed (recorded, now): {diff}"
    assert set(got["weights"]) == set(want["weights"]), \
        f"{name}: state keys changed: {sorted(set(got['weights']) ^ set(want['weights']))[:10]}"
    changed = sorted(k for k in want["weights"] if want["weights"][k] != got["weights"][k])
    assert not changed, f"{name}: final weights differ in {len(changed)} tensors, e.g. {changed[:5]}"
