"""HTTP reward server: ``python -m engine.rewards.server --reward ocr --port 8123``.

Serves one reward (built like ``build_rewards`` builds a local one) with the JSON wire format of
``engine.rewards.remote``. Every malformed request gets a 4xx with a one-sentence ``{"error": ...}`` (400 bad
JSON/fields/images, 404 unknown path, 405 wrong method, 408 body too slow, 411 no length, 413 too large,
415 not JSON, 422 the reward refused the inputs with a ValueError); a failure inside the reward gets a 500.
The server keeps serving after either. Bind it to a loopback or private interface: it has no authentication.
"""
from __future__ import annotations

import argparse
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from .base import Reward
from .remote import DEFAULT_MAX_BODY_BYTES, ImageDecodeError, decode_image, scores_to_json

log = logging.getLogger(__name__)


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class RewardServer:
    """``RewardServer(reward, host, port)``: ``start()`` serves in a daemon thread, ``serve_forever()`` in this one.

    Limits: ``max_body_bytes`` per request, ``max_batch`` images per request, ``max_pixels`` per image,
    ``socket_timeout`` seconds for a client to send its request.
    """

    def __init__(self, reward: Reward, host: str = "127.0.0.1", port: int = 8123,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_batch: int = 256, max_pixels: int = 2048 * 2048,
                 socket_timeout: float = 30.0) -> None:
        self.reward = reward
        self.max_body_bytes, self.max_batch, self.max_pixels = max_body_bytes, max_batch, max_pixels
        self._lock = threading.Lock()  # one batch at a time through the reward model
        handler = type("Handler", (_Handler,), {"app": self, "timeout": socket_timeout})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
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

    def __enter__(self) -> "RewardServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def health(self) -> dict:
        return {"status": "ok", "reward": self.reward.name, "differentiable": False,
                "max_body_bytes": self.max_body_bytes, "max_batch": self.max_batch, "max_pixels": self.max_pixels}

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
        try:
            decoded = [decode_image(img, self.max_pixels, f"images[{i}]") for i, img in enumerate(images)]
        except ImageDecodeError as e:
            raise _BadRequest(413 if "exceeds the limit" in str(e) else 400, str(e)) from None
        if len({tuple(t.shape) for t in decoded}) != 1:
            raise _BadRequest(400, "all images of a request must have the same size")
        batch = torch.stack(decoded)
        with self._lock:
            try:
                scores = self.reward.score(batch, prompts, metadata)
            except ValueError as e:  # the reward's own input checks (e.g. an OCR prompt without quotes)
                raise _BadRequest(422, f"reward {self.reward.name!r} refused the inputs: {e}") from None
        return {"reward": self.reward.name, "scores": scores_to_json(scores)}


class _Handler(BaseHTTPRequestHandler):
    app: RewardServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args) -> None:  # route access logs to logging, not stderr
        log.debug("%s - %s", self.address_string(), fmt % args)

    def _reply(self, status: int, obj: dict) -> None:
        body = json.dumps(obj, allow_nan=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._reply(status, {"error": message})

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

    def do_GET(self) -> None:
        if self.path == "/health":
            self._reply(200, self.app.health())
        elif self.path == "/score":
            self._error(405, "use POST for /score")
        else:
            self._error(404, f"unknown path {self.path!r} (expected /health or /score)")

    def do_POST(self) -> None:
        try:
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
            raise _BadRequest(400, f"Content-Length must be an integer, got {length!r}") from None
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
            raise _BadRequest(408, f"the body did not arrive in time (expected {size} bytes)") from None
        if len(raw) != size:
            self.close_connection = True
            raise _BadRequest(400, f"body ended after {len(raw)} of {size} bytes")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _BadRequest(400, f"body is not valid JSON ({e})") from None


def main(argv: list[str] | None = None) -> None:
    from .registry import REWARDS, build_reward

    parser = argparse.ArgumentParser(description="Serve one reward over HTTP (JSON + base64 PNG).")
    parser.add_argument("--reward", required=True, help=f"registry name: {', '.join(REWARDS.names())}")
    parser.add_argument("--kwargs", default="{}", help="JSON object of constructor arguments (default: {})")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8123, help="port (default: 8123; 0 = any free port)")
    parser.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_BYTES / 2**20,
                        help="largest request body in MiB (default: 64)")
    parser.add_argument("--max-batch", type=int, default=256, help="most images per request (default: 256)")
    parser.add_argument("--max-pixels", type=int, default=2048 * 2048, help="most pixels per image (default: 2048^2)")
    args = parser.parse_args(argv)
    try:
        kwargs = json.loads(args.kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError
    except ValueError:
        parser.error(f"--kwargs must be a JSON object, got {args.kwargs!r}")
    reward = build_reward({"name": args.reward, "kwargs": kwargs})
    server = RewardServer(reward, args.host, args.port, max_body_bytes=int(args.max_body_mb * 2**20),
                          max_batch=args.max_batch, max_pixels=args.max_pixels)
    logging.basicConfig(level=logging.INFO)
    print(f"serving reward {reward.name!r} at {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()


if __name__ == "__main__":
    main()
