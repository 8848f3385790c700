"""A served VLM judge: one OpenAI-compatible chat request per image (vLLM, sglang, any ``/v1/chat/completions``).

Flow-GRPO / DiffusionNFT users train against judges behind such endpoints (UnifiedReward, Qwen-VL). Each image goes
as a base64 PNG data URL in the user turn, before the question (``{prompt}`` = the generation prompt). The score
comes from one of two parsers:

- ``number``: the first match of ``number_regex`` in the reply text (e.g. "Score: 7" -> 7), optionally required to
  lie in ``valid_range``;
- ``yes_no_logprobs``: ``100 * sigmoid(logprob(yes) - logprob(no))`` from the first generated token's
  ``top_logprobs`` (the server must return them: vLLM and sglang do with ``logprobs: true``); the log-softmax
  difference equals the logit difference, so this is the in-process ``vlm_yesno`` score of the same model.

Either is multiplied by ``scale``. Requests run in a bounded thread pool (``max_concurrency`` in flight at most);
each has a total deadline of ``timeout`` seconds over all its attempts; 5xx, 408, 429, timeouts and connection
errors are retried with exponential backoff inside that deadline; any other 4xx is not (the request is wrong).
A sample whose request fails or whose answer does not parse is NaN: ``RewardSet`` marks it invalid and the engine
drops its group; nothing is filled in. The API key is read from the environment variable named by ``api_key_env``
(never from the config, which gets logged) and is redacted from every message.
"""
from __future__ import annotations

import http.client
import json
import logging
import math
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch

from engine.errors import ConfigError

from .remote import encode_images
from .vlm import VLM_QUESTIONS

log = logging.getLogger(__name__)
PARSERS = ("number", "yes_no_logprobs")
_RETRYABLE_4XX = (408, 429)  # "too slow" / "too many": the same request may succeed later


class _Failed(Exception):
    """One sample's request failed for good (the message is its reason, already redacted)."""


class OpenAIJudgeReward:
    """``OpenAIJudgeReward(url, model, ...)``: a non-differentiable ``Reward`` scored by a served chat VLM.

    ``url``: the API base (``http://host:8000/v1``; ``/chat/completions`` is appended unless already there);
    ``model``: the served model name; ``question``: the user text after the image (default: FDFO's alignment
    question); ``system_prompt``: an optional system turn; ``parser``/``number_regex``/``valid_range``/``yes``/
    ``no``/``top_logprobs``/``scale``: see the module docstring; ``max_tokens``: reply length (default 1 for
    ``yes_no_logprobs``, 32 for ``number``); ``temperature``: 0 = greedy (deterministic on a deterministic server);
    ``max_concurrency``: requests in flight; ``timeout``: seconds per request, all attempts together; ``retries``:
    extra attempts; ``backoff``: seconds before the first retry, doubling; ``api_key_env``: name of the environment
    variable holding the key (sent as ``Authorization: Bearer``); ``max_reply_bytes``: a longer reply is a failure;
    ``extra_body``: more JSON fields for the request (e.g. ``{"top_k": 1}``).
    """

    differentiable = False

    def __init__(self, url: str, model: str, *, name: str = "openai_judge",
                 question: str = VLM_QUESTIONS["vlm_alignment"], system_prompt: str | None = None,
                 parser: str = "number", number_regex: str = r"-?\d+(?:\.\d+)?",
                 valid_range: Sequence[float] | None = None, yes: str = "Yes", no: str = "No", top_logprobs: int = 20,
                 scale: float = 1.0, max_tokens: int | None = None, temperature: float = 0.0,
                 max_concurrency: int = 8, timeout: float = 60.0, retries: int = 3, backoff: float = 0.5,
                 api_key_env: str | None = None, max_reply_bytes: int = 4 * 2**20, extra_body: dict | None = None
                 ) -> None:
        where = f"reward {name}"
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}: url must start with http:// or https://, got {url!r}")
        if not isinstance(model, str) or not model:
            raise ConfigError(f"{where}: model must be the served model's name, got {model!r}")
        if not isinstance(question, str) or not question:
            raise ConfigError(f"{where}: question must be a non-empty string, got {question!r}")
        try:
            question.format(prompt="x")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"{where}: question {question!r} may only hold the field {{prompt}} ({e})") from None
        if parser not in PARSERS:
            raise ConfigError(f"{where}: parser must be one of {', '.join(PARSERS)}, got {parser!r}")
        try:
            self._number = re.compile(number_regex)
        except (re.error, TypeError) as e:
            raise ConfigError(f"{where}: number_regex {number_regex!r} is not a regular expression ({e})") from None
        if valid_range is not None and (len(valid_range) != 2 or not valid_range[0] <= valid_range[1]):
            raise ConfigError(f"{where}: valid_range must be [low, high] with low <= high, got {valid_range!r}")
        for key, v, lo in (("max_concurrency", max_concurrency, 1), ("retries", retries, 0),
                           ("top_logprobs", top_logprobs, 1), ("max_reply_bytes", max_reply_bytes, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{where}: {key} must be an integer >= {lo}, got {v!r}")
        if not timeout > 0 or backoff < 0:
            raise ConfigError(f"{where}: need timeout > 0 and backoff >= 0, got {timeout!r}, {backoff!r}")
        self._key = None
        if api_key_env is not None:
            self._key = os.environ.get(api_key_env) or None
            if self._key is None:
                raise ConfigError(f"{where}: api_key_env names the environment variable {api_key_env!r}, which is "
                                  f"not set (export it; the key never goes in the config)")
        base = url.rstrip("/")
        self.endpoint = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.name, self.model, self.question, self.system_prompt = name, model, question, system_prompt
        self.parser, self.valid_range, self.yes, self.no = parser, valid_range, yes, no
        self.top_logprobs, self.scale, self.temperature = top_logprobs, float(scale), float(temperature)
        self.max_tokens = max_tokens if max_tokens is not None else (1 if parser == "yes_no_logprobs" else 32)
        self.max_concurrency, self.timeout, self.retries, self.backoff = max_concurrency, timeout, retries, backoff
        self.max_reply_bytes, self.extra_body = max_reply_bytes, dict(extra_body or {})
        #: per-sample failure reasons of the last ``score`` call (index -> one sentence; empty when all parsed)
        self.last_errors: dict[int, str] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def __repr__(self) -> str:  # never the key
        return f"OpenAIJudgeReward({self.endpoint!r}, model={self.model!r}, parser={self.parser!r})"

    # ---------------------------------------------------------------------------------------------------------
    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> dict[str, torch.Tensor]:
        n = images.shape[0]
        if len(prompts) != n:
            raise ValueError(f"{self.name}: {n} images but {len(prompts)} prompts")
        urls = [f"data:image/png;base64,{b64}" for b64 in encode_images(images)]
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix=self.name)
        futures = [self._pool.submit(self._score_one, u, self.question.format(prompt=p))
                   for u, p in zip(urls, prompts)]
        scores, errors = [], {}
        for i, f in enumerate(futures):
            try:
                scores.append(f.result())
            except _Failed as e:
                scores.append(float("nan"))
                errors[i] = str(e)
        self.last_errors = errors
        if errors:
            first = next(iter(errors.values()))
            log.warning("%s: %d of %d samples invalid (first: %s)", self.name, len(errors), n, first)
        return {self.name: torch.tensor(scores, dtype=torch.float32)}

    def score_differentiable(self, images, prompts, metadata):
        raise TypeError(f"{self.name} ({self.endpoint}) is not differentiable: gradients do not cross HTTP")

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    # ---------------------------------------------------------------------------------------------------------
    def request_body(self, image_url: str, question: str) -> dict:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                     {"type": "text", "text": question}]})
        body = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                "temperature": self.temperature}
        if self.parser == "yes_no_logprobs":
            body.update(logprobs=True, top_logprobs=self.top_logprobs)
        body.update(self.extra_body)
        return body

    def parse(self, reply: object) -> float:
        """The score of one chat-completion reply (``_Failed`` naming what is missing or malformed)."""
        try:
            choice = reply["choices"][0]
        except (TypeError, KeyError, IndexError):
            raise _Failed("reply has no choices[0]") from None
        if self.parser == "number":
            content = (choice.get("message") or {}).get("content") if isinstance(choice, dict) else None
            if not isinstance(content, str):
                raise _Failed("reply has no message content")
            m = self._number.search(content)
            if m is None:
                raise _Failed(f"no number in the answer {content[:80]!r}")
            try:
                value = float(m.group(1) if m.re.groups else m.group(0))
            except (TypeError, ValueError):
                raise _Failed(f"the match {m.group(0)!r} is not a number") from None
            if not math.isfinite(value) or (self.valid_range is not None
                                            and not self.valid_range[0] <= value <= self.valid_range[1]):
                raise _Failed(f"the number {value} is outside valid_range {list(self.valid_range or [])}")
            return self.scale * value
        try:
            top = choice["logprobs"]["content"][0]["top_logprobs"]
            lps = {}
            for t in top:
                lps.setdefault(t["token"], float(t["logprob"]))  # first listed wins (the server's own order)
        except (TypeError, KeyError, IndexError, ValueError):
            raise _Failed("reply has no logprobs.content[0].top_logprobs (does the server return logprobs?)") from None
        missing = [w for w in (self.yes, self.no) if w not in lps]
        if missing:
            raise _Failed(f"{missing} not among the first token's {len(lps)} top logprobs (raise top_logprobs)")
        return self.scale * 100.0 * (1.0 / (1.0 + math.exp(-(lps[self.yes] - lps[self.no]))))

    def _score_one(self, image_url: str, question: str) -> float:
        body = json.dumps(self.request_body(image_url, question)).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self._key is not None:
            headers["Authorization"] = f"Bearer {self._key}"
        deadline = time.monotonic() + self.timeout
        last, sent = "", 0
        for attempt in range(self.retries + 1):
            if attempt:
                pause = self.backoff * 2 ** (attempt - 1)
                if time.monotonic() + pause >= deadline:
                    break
                time.sleep(pause)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            req = urllib.request.Request(self.endpoint, data=body, method="POST", headers=headers)
            sent += 1
            try:
                with urllib.request.urlopen(req, timeout=remaining) as resp:
                    raw = self._read(resp, deadline)
            except urllib.error.HTTPError as e:
                message = self._redact(_error_text(e))
                if 400 <= e.code < 500 and e.code not in _RETRYABLE_4XX:
                    raise _Failed(f"the judge rejected the request (HTTP {e.code}): {message}") from None
                last = f"HTTP {e.code}: {message}"
                continue
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout,
                    TimeoutError) as e:
                last = self._redact(f"{type(e).__name__}: {getattr(e, 'reason', e)}")
                continue
            try:
                reply = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise _Failed("the judge answered with invalid JSON") from None
            return self.parse(reply)
        raise _Failed(f"no answer within {self.timeout} s after {sent} attempt(s); last: {last or 'timeout'}")

    def _read(self, resp, deadline: float) -> bytes:
        """The reply body, at most ``max_reply_bytes``, abandoned past the deadline (checked between chunks)."""
        chunks, size = [], 0
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError("reply still arriving at the deadline")
            chunk = resp.read(1 << 16)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > self.max_reply_bytes:
                raise _Failed(f"reply longer than max_reply_bytes={self.max_reply_bytes}")
            chunks.append(chunk)

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        raw = e.read(4096).decode("utf-8", "replace")
    except Exception:
        return str(e.reason)
    try:
        obj = json.loads(raw)
        err = obj.get("error", obj) if isinstance(obj, dict) else obj
        return str(err.get("message", err) if isinstance(err, dict) else err)[:300]
    except (json.JSONDecodeError, AttributeError):
        return raw[:300]
