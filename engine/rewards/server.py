"""HTTP reward server: ``python -m engine.rewards.server --reward ocr --port 8123``.

Serves one reward (built like ``build_rewards`` builds a local one) with the JSON wire format of
``engine.rewards.remote``. Every malformed request gets a 4xx with a one-sentence ``{"error": ...}`` (400 bad
JSON/fields/images, too deep or too long numbers included; 401 missing or wrong token; 404 unknown path, 405 wrong
method, 408 body too slow, 411 no length, 413 too large (body, batch, or pixels: checked from the PNG headers before
anything is decoded), 415 not JSON, 422 the reward refused the inputs with a ValueError); a failure inside the
reward gets a 500, a connection over ``max_connections`` a 503. The server keeps serving after any of them.

The work and memory of the server are bounded whatever clients send (the threat model is in the rewards README):
at most ``max_connections`` connection threads (+ ``max_decodes`` decoding threads, one scoring thread and the
accepting one), each request must arrive whole within ``request_timeout`` seconds, and at most ``max_decodes``
requests hold decoded pixels at once, each at most ``max_request_pixels`` of them.
Bind it to a loopback or private interface; ``token`` (``--token-file``) adds a shared bearer token.
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import io
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from .base import Reward
from .remote import (DEFAULT_MAX_BODY_BYTES, ImageDecodeError, decode_png_into, png_header, read_token_file,
                     scores_to_json)

log = logging.getLogger(__name__)

# Defaults of the limits (the CLI's too). 2**26 pixels is 256 images of 512^2 or 16 of 2048^2: 768 MiB as float32.
DEFAULT_MAX_BATCH = 256
DEFAULT_MAX_PIXELS = 2048 * 2048
DEFAULT_MAX_REQUEST_PIXELS = 2 ** 26
DEFAULT_MAX_DECODES = 2          # one batch scored while the next is decoded
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_BACKLOG = 128
DEFAULT_REQUEST_TIMEOUT = 60.0   # seconds for a whole request (line, headers, body) to arrive
DEFAULT_SOCKET_TIMEOUT = 30.0    # seconds of silence on a connection


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class RewardServer:
    """``RewardServer(reward, host, port)``: ``start()`` serves in a daemon thread, ``serve_forever()`` in this one.

    Limits (the defaults are the module's ``DEFAULT_*``): ``max_body_bytes`` per request, ``max_batch`` images per
    request, ``max_pixels`` per image and ``max_request_pixels`` per request (both read from the PNG headers before
    any pixel is decoded), ``max_decodes`` requests decoding or scoring at once, ``max_connections`` open
    connections (one thread each; more get a 503), ``backlog`` connections waiting to be accepted,
    ``request_timeout`` seconds for a whole request to arrive (a total, not per read) and ``socket_timeout`` seconds
    of silence. ``token``: when given, every request must carry ``Authorization: Bearer <token>`` (401 otherwise).
    """

    def __init__(self, reward: Reward, host: str = "127.0.0.1", port: int = 8123,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_batch: int = DEFAULT_MAX_BATCH,
                 max_pixels: int = DEFAULT_MAX_PIXELS, socket_timeout: float = DEFAULT_SOCKET_TIMEOUT, *,
                 max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS, max_decodes: int = DEFAULT_MAX_DECODES,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS, backlog: int = DEFAULT_BACKLOG,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT, token: str | None = None) -> None:
        limits = {"max_body_bytes": max_body_bytes, "max_batch": max_batch, "max_pixels": max_pixels,
                  "max_request_pixels": max_request_pixels, "max_decodes": max_decodes,
                  "max_connections": max_connections, "backlog": backlog,
                  "request_timeout": request_timeout, "socket_timeout": socket_timeout}
        bad = [k for k, v in limits.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0]
        if bad:
            raise ValueError(f"RewardServer: limits {bad} must be positive numbers")
        if token is not None and not token:
            raise ValueError("RewardServer: token must be a non-empty string (or None for no authentication)")
        self.reward = reward
        self.max_body_bytes, self.max_batch, self.max_pixels = max_body_bytes, max_batch, max_pixels
        self.max_request_pixels, self.max_decodes = max_request_pixels, max_decodes
        self.max_connections, self.request_timeout = max_connections, request_timeout
        # only a digest is kept and compared: constant time, and the token's length is not compared either
        self._token_digest = hashlib.sha256(token.encode()).digest() if token is not None else None
        # decoded batches alive at once (being decoded, waiting to be scored, or scored): bounds memory across
        # requests. Decoding runs in max_decodes threads of its own and scoring in one (one batch at a time through
        # the reward model, always from the same thread), so the allocator's per-thread caches of those big
        # intermediates number max_decodes + 1, not one per connection.
        self._decode_slots = threading.BoundedSemaphore(max_decodes)
        self._decoder = ThreadPoolExecutor(max_decodes, thread_name_prefix="reward-decode")
        self._scorer = ThreadPoolExecutor(1, thread_name_prefix="reward-score")
        handler = type("Handler", (_Handler,), {"app": self, "timeout": socket_timeout})
        self.httpd = _BoundedServer((host, port), handler, backlog=backlog, max_connections=max_connections)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "RewardServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="reward-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._decoder.shutdown(wait=False)
        self._scorer.shutdown(wait=False)

    def __enter__(self) -> "RewardServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def health(self) -> dict:
        return {"status": "ok", "reward": self.reward.name, "differentiable": False,
                "max_body_bytes": self.max_body_bytes, "max_batch": self.max_batch, "max_pixels": self.max_pixels,
                "max_request_pixels": self.max_request_pixels, "request_timeout": self.request_timeout,
                "auth": self._token_digest is not None}

    def authorized(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header value carries the token (always True without a token)."""
        if self._token_digest is None:
            return True
        scheme, _, credential = (header or "").strip().partition(" ")
        given = hashlib.sha256(credential.strip().encode("latin-1", "replace")).digest()
        return hmac.compare_digest(given, self._token_digest) and scheme.lower() == "bearer"

    def handle_score(self, payload: Any) -> dict:
        """Validate a ``/score`` payload, score it, return the reply (raises _BadRequest for 4xx)."""
        if not isinstance(payload, dict):
            raise _BadRequest(400, f"body must be a JSON object, got {type(payload).__name__}")
        missing = [k for k in ("images", "prompts", "metadata") if k not in payload]
        if missing:
            raise _BadRequest(400, f"missing fields {missing} (expected images, prompts, metadata)")
        images, prompts, metadata = payload["images"], payload["prompts"], payload["metadata"]
        for key, value in (("images", images), ("prompts", prompts), ("metadata", metadata)):
            if not isinstance(value, list):
                raise _BadRequest(400, f"'{key}' must be a list, got {type(value).__name__}")
        n = len(images)
        if n == 0:
            raise _BadRequest(400, "'images' is empty")
        if n > self.max_batch:
            raise _BadRequest(413, f"{n} images exceeds max_batch={self.max_batch}")
        if len(prompts) != n or len(metadata) != n:
            raise _BadRequest(400, f"{n} images but {len(prompts)} prompts and {len(metadata)} metadata entries")
        if not all(isinstance(p, str) for p in prompts):
            raise _BadRequest(400, "every prompt must be a string")
        if not all(isinstance(m, dict) for m in metadata):
            raise _BadRequest(400, "every metadata entry must be an object")
        # Every size from the headers first: a few KB of PNG can claim gigabytes of pixels, so nothing is
        # decoded or allocated until the whole request is known to fit.
        pngs, total = [], 0
        for i, img in enumerate(images):
            try:
                raw, w, h = png_header(img, f"images[{i}]")
            except ImageDecodeError as e:
                raise _BadRequest(400, str(e)) from None
            if w * h > self.max_pixels:
                raise _BadRequest(413, f"images[{i}]: {w}x{h} pixels exceeds the limit of {self.max_pixels} pixels")
            pngs.append((raw, w, h))
            total += w * h
        if total > self.max_request_pixels:
            raise _BadRequest(413, f"the {n} images hold {total} pixels, over the request limit of "
                                   f"{self.max_request_pixels} pixels (max_request_pixels); send smaller batches")
        if len({(w, h) for _, w, h in pngs}) != 1:
            raise _BadRequest(400, "all images of a request must have the same size")
        _, w, h = pngs[0]
        with self._decode_slots:
            batch = torch.empty(n, 3, h, w)  # decoded in place: no per-image tensors, no stacked copy
            self._decoder.submit(_decode_all, pngs, batch).result()
            scores = self._scorer.submit(self._score, batch, prompts, metadata).result()
        return {"reward": self.reward.name, "scores": scores_to_json(scores)}

    def _score(self, batch: torch.Tensor, prompts: list, metadata: list) -> dict:
        try:
            return self.reward.score(batch, prompts, metadata)
        except ValueError as e:  # the reward's own input checks (e.g. an OCR prompt without quotes)
            raise _BadRequest(422, f"reward {self.reward.name!r} refused the inputs: {e}") from None


def _decode_all(pngs: list, batch: torch.Tensor) -> None:
    for i, (raw, _, _) in enumerate(pngs):
        try:
            decode_png_into(raw, batch[i], f"images[{i}]")
        except ImageDecodeError as e:
            raise _BadRequest(400, str(e)) from None
        pngs[i] = None  # the PNG bytes are no longer needed


_BUSY_BODY = json.dumps({"error": "the reward server is at max_connections; retry later"}).encode()
_BUSY_REPLY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
               b"Connection: close\r\nContent-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY)


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` of them (a connection over it gets a 503 from the
    accepting thread, which never blocks on a client), and a listen backlog of ``backlog``."""

    daemon_threads = True

    def __init__(self, address, handler, *, backlog: int, max_connections: int) -> None:
        self.request_queue_size = backlog  # read by server_activate's listen()
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse_busy(request)
            return
        thread = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                                  name="reward-connection", daemon=True)
        try:
            thread.start()
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse_busy(self, request: socket.socket) -> None:
        try:
            request.setblocking(False)
            try:
                request.recv(1 << 16)  # what has already arrived: closing with unread data would reset the reply
            except OSError:
                pass
            request.send(_BUSY_REPLY)
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        # a client that vanished mid-request is routine, not a traceback on stderr
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class _DeadlineReader(io.RawIOBase):
    """The connection's reads, each limited to what is left of the request's deadline (and to ``socket_timeout``):
    a client trickling one byte at a time cannot hold a connection longer than ``request_timeout``."""

    def __init__(self, sock: socket.socket, handler: "_Handler") -> None:
        self._sock, self._handler = sock, handler

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        left = self._handler.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no whole request within request_timeout={self._handler.app.request_timeout}s")
        self._sock.settimeout(min(left, self._handler.timeout))
        return self._sock.recv_into(b)


class _Handler(BaseHTTPRequestHandler):
    app: RewardServer
    protocol_version = "HTTP/1.1"
    deadline = 0.0

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # http.server's reader, replaced by one that enforces the total deadline
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self))

    def handle_one_request(self) -> None:
        # the deadline covers the wait for the request too, so an idle kept-alive connection is closed as well
        self.deadline = time.monotonic() + self.app.request_timeout
        super().handle_one_request()

    def log_message(self, fmt: str, *args) -> None:  # route access logs to logging, not stderr (no headers logged)
        log.debug("%s - %s", self.address_string(), fmt % args)

    def _reply(self, status: int, obj: dict, headers: dict | None = None) -> None:
        body = json.dumps(obj, allow_nan=False).encode("utf-8")
        self.connection.settimeout(self.timeout)  # the reader may have left a nearly spent deadline on the socket
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._reply(status, {"error": message}, {"WWW-Authenticate": "Bearer"} if status == 401 else None)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors of http.server's own request parsing, as JSON; they are the client's fault, so never 5xx
        (an unknown method -> 405, an unsupported HTTP version -> 400)."""
        code = {501: 405, 505: 400}.get(code, code)
        self.close_connection = True
        if len(getattr(self, "requestline", "").split()) == 3:
            # a full request line whose version was refused: still answer with a status line
            self.request_version = "HTTP/1.0"
        try:
            self._error(code, message or "malformed request")
        except OSError:
            pass

    def _check_auth(self) -> None:
        if self.app.authorized(self.headers.get("Authorization")):
            return
        self.close_connection = True
        length = self.headers.get("Content-Length", "")
        if length.isdigit() and int(length) <= self.app.max_body_bytes:
            self._discard(int(length))  # so the client reads the 401 rather than a reset (bounded by the deadline)
        raise _BadRequest(401, "missing or wrong token (send 'Authorization: Bearer <token>')")

    def do_GET(self) -> None:
        try:
            self._check_auth()
        except _BadRequest as e:
            return self._error(e.status, str(e))
        if self.path == "/health":
            self._reply(200, self.app.health())
        elif self.path == "/score":
            self._error(405, "use POST for /score")
        else:
            self._error(404, f"unknown path {self.path!r} (expected /health or /score)")

    def do_POST(self) -> None:
        try:
            self._check_auth()
            if self.path != "/score":
                self.close_connection = True
                raise _BadRequest(404 if self.path != "/health" else 405,
                                  f"unknown path {self.path!r} (POST /score)" if self.path != "/health"
                                  else "use GET for /health")
            payload = self._read_json()
            self._reply(200, self.app.handle_score(payload))
        except _BadRequest as e:
            self._error(e.status, str(e))
        except Exception as e:  # the reward itself failed: report it, keep serving
            log.exception("reward %r failed", self.app.reward.name)
            self._error(500, f"reward {self.app.reward.name!r} failed: {type(e).__name__}: {e}")

    def _discard(self, size: int) -> None:
        try:
            while size > 0:
                chunk = self.rfile.read(min(size, 1 << 16))
                if not chunk:
                    return
                size -= len(chunk)
        except OSError:
            pass

    def _read_json(self) -> Any:
        ctype = self.headers.get("Content-Type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            self.close_connection = True  # the body is not read: do not reuse the connection
            raise _BadRequest(415, f"Content-Type must be application/json, got {ctype!r}")
        length = self.headers.get("Content-Length")
        if length is None or self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise _BadRequest(411, "a Content-Length header is required (no chunked bodies)")
        try:
            size = int(length)
        except ValueError:
            self.close_connection = True
            raise _BadRequest(400, f"Content-Length must be an integer, got {length[:40]!r}") from None
        if size < 0:
            self.close_connection = True
            raise _BadRequest(400, f"Content-Length must be non-negative, got {size}")
        if size > self.app.max_body_bytes:
            self.close_connection = True
            if size <= 4 * self.app.max_body_bytes:
                self._discard(size)  # a near miss: read it, so the client sees the 413 rather than a broken pipe
            raise _BadRequest(413, f"body of {size} bytes exceeds the limit of {self.app.max_body_bytes} bytes")
        try:
            raw = self.rfile.read(size)
        except (TimeoutError, OSError):
            self.close_connection = True
            raise _BadRequest(408, f"the body did not arrive in time (expected {size} bytes within "
                                   f"request_timeout={self.app.request_timeout}s)") from None
        if len(raw) != size:
            self.close_connection = True
            raise _BadRequest(400, f"body ended after {len(raw)} of {size} bytes")
        try:
            return json.loads(raw)
        except RecursionError:  # '[[[[...' deeper than the parser's recursion limit: the client's fault
            raise _BadRequest(400, "body is not valid JSON (nested too deeply)") from None
        except ValueError as e:  # JSONDecodeError, bad UTF-8, an integer over Python's 4300-digit limit
            raise _BadRequest(400, f"body is not valid JSON ({str(e)[:200]})") from None


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def main(argv: list[str] | None = None) -> None:
    from .registry import REWARDS, build_reward

    parser = argparse.ArgumentParser(description="Serve one reward over HTTP (JSON + base64 PNG).")
    parser.add_argument("--reward", required=True, help=f"registry name: {', '.join(REWARDS.names())}")
    parser.add_argument("--kwargs", default="{}", help="JSON object of constructor arguments (default: {})")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8123, help="port (default: 8123; 0 = any free port)")
    parser.add_argument("--token-file", default=None,
                        help="file holding a shared token; every request must then send 'Authorization: Bearer "
                             "<token>' (default: none, no authentication)")
    limit = parser.add_argument_group("limits")
    limit.add_argument("--max-body-mb", type=_positive(float), default=DEFAULT_MAX_BODY_BYTES / 2**20,
                       help="largest request body in MiB (default: 64)")
    limit.add_argument("--max-batch", type=_positive(int), default=DEFAULT_MAX_BATCH,
                       help=f"most images per request (default: {DEFAULT_MAX_BATCH})")
    limit.add_argument("--max-pixels", type=_positive(int), default=DEFAULT_MAX_PIXELS,
                       help="most pixels per image (default: 2048^2)")
    limit.add_argument("--max-request-pixels", type=_positive(int), default=DEFAULT_MAX_REQUEST_PIXELS,
                       help="most pixels per request, all images together (default: 2^26, 768 MiB decoded)")
    limit.add_argument("--max-decodes", type=_positive(int), default=DEFAULT_MAX_DECODES,
                       help=f"requests holding decoded images at once (default: {DEFAULT_MAX_DECODES})")
    limit.add_argument("--max-connections", type=_positive(int), default=DEFAULT_MAX_CONNECTIONS,
                       help=f"open connections, one thread each; more get 503 (default: {DEFAULT_MAX_CONNECTIONS})")
    limit.add_argument("--backlog", type=_positive(int), default=DEFAULT_BACKLOG,
                       help=f"listen backlog (default: {DEFAULT_BACKLOG})")
    limit.add_argument("--request-timeout", type=_positive(float), default=DEFAULT_REQUEST_TIMEOUT,
                       help=f"seconds for a whole request to arrive (default: {DEFAULT_REQUEST_TIMEOUT:g})")
    limit.add_argument("--socket-timeout", type=_positive(float), default=DEFAULT_SOCKET_TIMEOUT,
                       help=f"seconds of silence before a connection is dropped (default: {DEFAULT_SOCKET_TIMEOUT:g})")
    args = parser.parse_args(argv)
    try:
        kwargs = json.loads(args.kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError
    except ValueError:
        parser.error(f"--kwargs must be a JSON object, got {args.kwargs!r}")
    token = None
    if args.token_file is not None:
        try:
            token = read_token_file(args.token_file, "--token-file")
        except ValueError as e:
            parser.error(str(e))
    reward = build_reward({"name": args.reward, "kwargs": kwargs})
    server = RewardServer(reward, args.host, args.port, max_body_bytes=int(args.max_body_mb * 2**20),
                          max_batch=args.max_batch, max_pixels=args.max_pixels, socket_timeout=args.socket_timeout,
                          max_request_pixels=args.max_request_pixels, max_decodes=args.max_decodes,
                          max_connections=args.max_connections, backlog=args.backlog,
                          request_timeout=args.request_timeout, token=token)
    logging.basicConfig(level=logging.INFO)
    log.info("reward server limits: %s; authentication: %s", server.health(),
             "bearer token" if token is not None else "none (bind to a trusted interface)")
    print(f"serving reward {reward.name!r} at {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()


if __name__ == "__main__":
    main()
