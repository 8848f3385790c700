"""The one JSONL reader: prompt files, GenEval metadata and run metrics (``metrics.jsonl``) are all read with it."""
from __future__ import annotations

import json
import os
from typing import Iterator


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, record)`` for every non-empty line of ``path`` (line numbers from 1).

    Reading is lazy, so a caller that stops early never parses the rest. A line that is not valid JSON, or not a
    JSON object, raises ValueError naming ``file:line`` and what was expected.
    """
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
            yield n, record
