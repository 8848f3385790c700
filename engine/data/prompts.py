"""Prompt files: ``.txt`` (one prompt a line), ``.jsonl`` (``prompt`` plus metadata) and GenEval metadata JSONL.

Every malformed line fails at load time with ``file:line: what was expected``, so a bad prompt file stops a run
before any sampling. ``kind="ocr"`` additionally checks the OCR convention: the target text is between the first
pair of double quotes of the prompt (as Flow-GRPO's OCR reward reads it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from itertools import islice
from typing import Sequence

from .geneval import validate_geneval_metadata
from .jsonl import read_jsonl

KINDS = ("plain", "ocr", "geneval")


@dataclass
class PromptSet:
    """Prompts and one metadata dict per prompt (``metadata[i]["prompt"] == prompts[i]``)."""

    prompts: list[str]
    metadata: list[dict]
    path: str = ""
    kind: str = "plain"
    #: 1-based line number of each prompt in its file (for error messages downstream)
    lines: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.metadata):
            raise ValueError(f"PromptSet {self.path!r}: {len(self.prompts)} prompts but {len(self.metadata)} metadata")

    def __len__(self) -> int:
        return len(self.prompts)

    def tag_ids(self) -> list[int]:
        """Per prompt, the index of its GenEval ``tag`` among the file's sorted tags (the sampler's strata);
        ValueError when a prompt has no tag."""
        tags = [(m or {}).get("tag") for m in self.metadata]
        missing = [i for i, t in enumerate(tags) if not t]
        if missing:
            where = self.lines[missing[0]] if self.lines else missing[0] + 1
            raise ValueError(f"{self.path}:{where}: no 'tag' in the metadata (tag balancing needs GenEval tags "
                             f"on every prompt; {len(missing)} of {len(tags)} lack one)")
        names = sorted(set(tags))
        return [names.index(t) for t in tags]

    def select(self, indices: Sequence[int]) -> tuple[list[str], list[dict]]:
        """Prompts and metadata at ``indices`` (e.g. ``EpochBatch.prompt_idx.tolist()``, once per epoch)."""
        return [self.prompts[i] for i in indices], [self.metadata[i] for i in indices]


def ocr_target(prompt: str) -> str:
    """The OCR target text: what stands between the first pair of double quotes (Flow-GRPO's ``split('"')[1]``).

    Raises ValueError when the prompt has no such non-empty text.
    """
    parts = prompt.split('"')
    if len(parts) < 3 or not parts[1].replace(" ", ""):
        raise ValueError(f"OCR prompt must hold its target text in double quotes, got {prompt[:120]!r}")
    return parts[1]


def load_prompts(path: str | os.PathLike, kind: str | None = None, limit: int | None = None) -> PromptSet:
    """Read a prompt file into a ``PromptSet``.

    ``.txt``: one prompt a line, surrounding whitespace stripped, blank lines skipped; metadata ``{"prompt": p}``.
    ``.jsonl``: one JSON object a line with a non-empty string ``prompt``; the whole object is the metadata.
    ``kind``: ``None`` = ``"geneval"`` for a ``.jsonl`` whose first record has ``include`` else ``"plain"``;
    ``"geneval"`` validates every record as GenEval metadata; ``"ocr"`` checks the quoted-target convention.
    ``limit``: keep the first ``limit`` prompts (after validation of those lines only).
    """
    path = os.fspath(path)
    if kind is not None and kind not in KINDS:
        raise ValueError(f"load_prompts({path!r}): kind must be one of {KINDS} or None, got {kind!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist (expected a .txt or .jsonl file)")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".txt":
        if kind == "geneval":
            raise ValueError(f"{path}: GenEval metadata must be a .jsonl file, got a .txt file")
        prompts, metadata, lines = _read_txt(path, limit)
    elif ext == ".jsonl":
        prompts, metadata, lines = _read_jsonl(path, limit)
        if kind is None:
            kind = "geneval" if metadata and "include" in metadata[0] else "plain"
        if kind == "geneval":
            for meta, n in zip(metadata, lines):
                validate_geneval_metadata(meta, f"{path}:{n}")
    else:
        raise ValueError(f"prompt file {path!r}: unknown extension {ext!r} (expected .txt or .jsonl)")
    kind = kind or "plain"
    if kind == "ocr":
        for prompt, n in zip(prompts, lines):
            try:
                ocr_target(prompt)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: {e}") from None
    if not prompts:
        raise ValueError(f"prompt file {path!r} holds no prompts")
    return PromptSet(prompts, metadata, path=path, kind=kind, lines=lines)


def _read_txt(path: str, limit: int | None) -> tuple[list[str], list[dict], list[int]]:
    prompts, lines = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if limit is not None and len(prompts) >= limit:
                break
            text = line.strip()
            if text:
                prompts.append(text)
                lines.append(n)
    return prompts, [{"prompt": p} for p in prompts], lines


def _read_jsonl(path: str, limit: int | None) -> tuple[list[str], list[dict], list[int]]:
    prompts, metadata, lines = [], [], []
    # islice pulls no record past the limit, so lines after it are never parsed (one record = one prompt)
    for n, record in islice(read_jsonl(path), None if limit is None else max(limit, 0)):
        prompt = record.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{path}:{n}: expected a non-empty string 'prompt'")
        prompts.append(prompt.strip())
        metadata.append(record)
        lines.append(n)
    return prompts, metadata, lines
