"""Remote rewards: the wire format shared by the reward server and ``RemoteReward``, its HTTP client.

Wire format (JSON only, never pickle): ``POST /score`` with ``{"images": [base64 PNG, ...], "prompts": [str, ...],
"metadata": [object, ...]}`` -> ``{"reward": name, "scores": {key: [float | null, ...]}}`` (null = NaN/inf: the
sample is invalid). ``GET /health`` -> ``{"status": "ok", "reward": name, "max_body_bytes": ..., ...}``.
Errors come back as ``{"error": "one sentence"}`` with a 4xx status (the request is wrong: never retried, except
408/429, which say "too slow" / "too many" rather than "wrong") or 5xx (the server failed or is busy: retried with
exponential backoff, as are connection errors, broken replies and timeouts). A server started with ``--token-file``
wants ``Authorization: Bearer <token>`` on every request (401 otherwise).
Images travel as 8-bit PNG: a [0, 1] float image is rounded to the nearest of 256 levels.
"""
from __future__ import annotations

import base64
import binascii
import http.client
import io
import json
import math
import os
import socket
import struct
import time
import urllib.error
import urllib.request
from typing import Sequence

import numpy as np
import torch
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
TOKEN_ENV = "RLFLOW_REWARD_TOKEN"  # the client's token when no token_file is given
_RETRYABLE_4XX = (408, 429)  # "you were too slow" / "too many requests": the same request may succeed later


class RemoteRewardError(ValueError):
    """The server rejected the request (4xx): the request itself is wrong; retrying cannot help."""


class RemoteRewardUnavailable(ConnectionError):
    """The server failed (5xx), timed out or could not be reached, on every attempt."""


class ImageDecodeError(ValueError):
    """A request image is not a valid base64 PNG within the size limits."""


class ImageTooLargeError(ImageDecodeError):
    """A request image's header claims more pixels than allowed (the server answers 413)."""


def read_token_file(path: str, where: str = "token file") -> str:
    """The shared secret in ``path`` (surrounding whitespace stripped); ValueError naming the file, never the token.

    The token must be printable ASCII without spaces, so it fits a header unchanged and compares as bytes."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{where} {path!r} cannot be read ({type(e).__name__})") from None
    return _check_token(token, f"{where} {path!r}")


def _check_token(token: str, where: str) -> str:
    if not token:
        raise ValueError(f"{where} is empty: expected a shared token")
    if not all(33 <= ord(c) < 127 for c in token):
        raise ValueError(f"{where} must hold printable ASCII without spaces")
    return token


def encode_images(images: torch.Tensor) -> list[str]:
    """float NCHW in [0, 1] -> one base64 PNG (RGB, 8 bit) per image."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"encode_images: expected [N, 3, H, W], got {tuple(images.shape)}")
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a, "RGB").save(buf, format="PNG", compress_level=1)
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def png_header(data: object, where: str = "image") -> tuple[bytes, int, int]:
    """base64 PNG -> (PNG bytes, width, height) read from its IHDR chunk; no pixel is decoded, so a server can
    check every image's size (and the request's total) before allocating anything."""
    if not isinstance(data, str):
        raise ImageDecodeError(f"{where}: expected a base64 PNG string, got {type(data).__name__}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ImageDecodeError(f"{where}: not valid base64") from None
    if not raw.startswith(PNG_SIGNATURE):
        raise ImageDecodeError(f"{where}: not a PNG (bad signature)")
    # the PNG spec puts IHDR (13 bytes of data) first; anything else is refused rather than searched for
    if len(raw) < 33 or raw[8:16] != b"\x00\x00\x00\x0dIHDR":
        raise ImageDecodeError(f"{where}: corrupt PNG (no IHDR chunk first)")
    w, h = struct.unpack(">II", raw[16:24])
    if w < 1 or h < 1:
        raise ImageDecodeError(f"{where}: corrupt PNG ({w}x{h} pixels)")
    return raw, w, h


def decode_png_into(raw: bytes, out: torch.Tensor, where: str = "image") -> None:
    """Decode PNG bytes (checked by ``png_header``) into ``out``, a preallocated float [3, H, W], as [0, 1] values;
    only this one image's 8-bit intermediates exist besides ``out``."""
    try:
        with Image.open(io.BytesIO(raw), formats=["PNG"]) as img:
            if img.size != (out.shape[2], out.shape[1]):  # e.g. a second IHDR: PIL would believe the last one
                raise ImageDecodeError(f"{where}: corrupt PNG (decodes to {img.size[0]}x{img.size[1]} but its "
                                       f"header says {out.shape[2]}x{out.shape[1]})")
            img.load()
            rgb = np.array(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
    except (ImageDecodeError, MemoryError):
        raise
    except Exception as e:  # whatever PIL makes of hostile bytes (OSError, SyntaxError, zlib, EOF, ...) is a 400
        raise ImageDecodeError(f"{where}: corrupt or truncated PNG ({type(e).__name__}: {e})") from None
    out.copy_(torch.from_numpy(rgb).permute(2, 0, 1))
    out.div_(255.0)  # the same float32 division as uint8 / 255.0: bit-identical values


def decode_image(data: object, max_pixels: int, where: str = "image") -> torch.Tensor:
    """base64 PNG -> float [3, H, W] in [0, 1]; ImageDecodeError naming ``where`` for anything else (its subclass
    ImageTooLargeError, raised before any pixel is decoded, when the header claims more than ``max_pixels``)."""
    raw, w, h = png_header(data, where)
    if w * h > max_pixels:
        raise ImageTooLargeError(f"{where}: {w}x{h} pixels exceeds the limit of {max_pixels} pixels")
    out = torch.empty(3, h, w)
    decode_png_into(raw, out, where)
    return out


def scores_to_json(scores: dict[str, torch.Tensor]) -> dict[str, list]:
    """Named [N] tensors -> JSON lists, NaN/inf as null (JSON has no NaN)."""
    return {k: [float(x) if math.isfinite(x) else None for x in torch.as_tensor(v).float().tolist()]
            for k, v in scores.items()}


def scores_from_json(scores: object, n: int, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(scores, dict):
        raise RemoteRewardError(f"{where}: reply 'scores' must be an object")
    out = {}
    for k, v in scores.items():
        if not isinstance(v, list) or len(v) != n or not all(x is None or isinstance(x, (int, float)) for x in v):
            raise RemoteRewardError(f"{where}: reply scores[{k!r}] must be a list of {n} numbers or nulls")
        out[k] = torch.tensor([float("nan") if x is None else float(x) for x in v], dtype=torch.float32)
    return out


class RemoteReward:
    """``RemoteReward(url, timeout, retries)``: a ``Reward`` served by ``python -m engine.rewards.server`` at ``url``
    (e.g. ``http://127.0.0.1:8123``).

    ``timeout``: seconds per attempt; ``retries``: extra attempts after a 5xx, 408/429, timeout, broken reply or
    connection error, sleeping ``backoff * 2**k`` seconds before attempt k+1 (any other 4xx raises RemoteRewardError
    at once); ``max_body_bytes``: refuse locally to send a larger request.
    ``name``: the reward the server must be serving (checked on every reply); None = whatever it serves.
    ``token_file``: a file holding the server's shared token (sent as ``Authorization: Bearer``); without it the
    token comes from the environment variable ``token_env`` when set. The token itself is never a constructor
    argument (configs get logged) and never appears in a message or repr.
    """

    differentiable = False

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 3, backoff: float = 0.5,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, name: str | None = None,
                 token_file: str | None = None, token_env: str = TOKEN_ENV) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"RemoteReward: url must start with http:// or https://, got {url!r}")
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError(f"RemoteReward: need timeout > 0, retries >= 0, backoff >= 0; got {timeout}, "
                             f"{retries}, {backoff}")
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff, self.max_body_bytes = timeout, retries, backoff, max_body_bytes
        self._name = name
        if token_file is not None:
            token = read_token_file(token_file, "RemoteReward: token_file")
        elif os.environ.get(token_env):
            token = _check_token(os.environ[token_env], f"RemoteReward: environment variable {token_env}")
        else:
            token = None
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._token_env = token_env
        # redirects are refused: urllib would resend the Authorization header to wherever they point
        self._opener = urllib.request.build_opener(_NoRedirect())

    def __repr__(self) -> str:
        return f"RemoteReward({self.url!r}, auth={'token' if self._headers else 'none'})"

    @property
    def name(self) -> str:
        if self._name is None:
            self._name = self.health()["reward"]
        return self._name

    def health(self) -> dict:
        """``GET /health`` (with the same retries)."""
        return self._request("GET", "/health", None)

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> dict[str, torch.Tensor]:
        n = images.shape[0]
        if len(prompts) != n or len(metadata) != n:
            raise ValueError(f"RemoteReward: {n} images but {len(prompts)} prompts and {len(metadata)} metadata")
        body = json.dumps({"images": encode_images(images), "prompts": list(prompts),
                           "metadata": list(metadata)}).encode("utf-8")
        if len(body) > self.max_body_bytes:
            raise ValueError(f"RemoteReward: request of {len(body)} bytes exceeds max_body_bytes="
                             f"{self.max_body_bytes}; score smaller batches")
        reply = self._request("POST", "/score", body)
        where = f"reward server {self.url}"
        served = reply.get("reward")
        if self._name is not None and served != self._name:
            raise RemoteRewardError(f"{where} serves reward {served!r}, but this client expects {self._name!r}")
        self._name = served
        scores = scores_from_json(reply.get("scores"), n, where)
        if served not in scores:
            raise RemoteRewardError(f"{where}: reply lacks the main score {served!r}")
        return scores

    def score_differentiable(self, images, prompts, metadata):
        raise TypeError(f"RemoteReward({self.url}) is not differentiable: gradients do not cross HTTP")

    def _request(self, method: str, path: str, body: bytes | None) -> dict:
        url = self.url + path
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            headers = dict(self._headers)
            if body is not None:
                headers["Content-Type"] = "application/json"
            req = urllib.request.Request(url, data=body, method=method, headers=headers)
            try:
                with self._opener.open(req, timeout=self.timeout) as resp:
                    return _parse_reply(resp.read(), url)
            except urllib.error.HTTPError as e:
                message = _error_message(e)
                if e.code < 500 and e.code not in _RETRYABLE_4XX:  # the request is wrong (or redirected): final
                    hint = (f" (the server wants a token: pass token_file or set ${self._token_env})"
                            if e.code == 401 else "")
                    raise RemoteRewardError(f"reward server {url} rejected the request ({e.code}): {message}{hint}"
                                            ) from None
                last = f"HTTP {e.code}: {message}"
            except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError,
                    http.client.HTTPException) as e:  # HTTPException: a reply cut short or garbled in transit
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        raise RemoteRewardUnavailable(f"reward server {url} failed on all {self.retries + 1} attempts; last: {last}")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises the 3xx as an HTTPError: a final RemoteRewardError


def _parse_reply(raw: bytes, url: str) -> dict:
    try:
        reply = json.loads(raw)
    except json.JSONDecodeError:
        raise RemoteRewardError(f"reward server {url} answered with invalid JSON") from None
    if not isinstance(reply, dict):
        raise RemoteRewardError(f"reward server {url} answered with a non-object JSON reply")
    return reply


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(e.read()).get("error", e.reason))
    except Exception:
        return str(e.reason)
