"""``train.py --help`` describes every option of every section (engine and each registered method)."""
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import Config, help_lines
from engine.methods import method_configs
from engine.options import opt
from tests.test_engine_helpers import clean_env

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^  (?P<key>[\w.\[\]]+) \((?P<type>[^,]+), default .*\): (?P<help>.*)$")


def option_keys(cls, prefix=""):
    """Every leaf option of a config dataclass, as dotted keys (nested sections expanded)."""
    keys = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        inner = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        keys += option_keys(type(inner), key) if dataclasses.is_dataclass(inner) else [key]
    return keys


def test_help_prints_a_description_for_every_option():
    env = dict(clean_env(), DS_ACCELERATOR="cpu")
    out = subprocess.run([sys.executable, "engine/train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    described = {}
    for line in out.stdout.splitlines():
        m = LINE.match(line)
        if m:
            described[m["key"]] = m["help"].strip()
    expected = option_keys(Config) + [k for name, cls in method_configs().items() for k in option_keys(cls, name)]
    assert len(expected) > 100 and set(method_configs()) >= {"crd", "nft", "fdfo", "didr"}
    missing = [k for k in expected if k not in described]
    empty = [k for k in expected if k in described and len(described[k]) < 8]
    assert not missing, f"--help does not list {missing}"
    assert not empty, f"--help prints no description for {empty}"


def test_an_option_without_help_is_refused_where_it_is_declared():
    with pytest.raises(ValueError, match="help line"):
        opt(1, "")
    assert all(f.metadata.get("help") for f in dataclasses.fields(method_configs()["crd"]))
    assert any(line.startswith("  model.family (str, default 'testbed'): ") for line in help_lines())
