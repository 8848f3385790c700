"""Hardening of the reward server (issue 20), each against a real server on 127.0.0.1: a pixel budget checked from
PNG headers (413 before allocating; measured as the server process's peak RSS), concurrent decodes that cannot add
up, deep JSON and over-long integers as 400, a listen backlog that takes 32 concurrent clients without resets, a
total per-request deadline against slow-loris clients with a bounded number of connection threads, an optional
bearer token, the client's retry classification, and a mixed good/hostile load test."""
import base64
import http.client
import io
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from PIL import Image

from engine.rewards import RemoteReward, RemoteRewardError, RemoteRewardUnavailable
from engine.rewards.remote import decode_image
from engine.rewards.server import RewardServer

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
TOKEN = "s3cret-Token_0123456789abcdef"
BIG = 2048                  # the default per-image limit is BIG x BIG
REQUEST_PIXELS = 2 * BIG * BIG  # the subprocess server's max_request_pixels: two maximal images
DECODES = 2                 # the subprocess server's max_decodes
MB = 1 << 20


class MeanReward:
    """Per-image mean and green mean: every reply is checkable against a local computation."""
    name = "mean"
    differentiable = False

    def __init__(self):
        self.calls = 0

    def score(self, images, prompts, metadata):
        self.calls += 1
        return {"mean": images.mean(dim=(1, 2, 3)), "mean_green": images[:, 1].mean(dim=(1, 2))}


def bitmap_png(size, white_rows=0):
    """A 1-bit PNG (the smallest body per decoded pixel): black, with the first ``white_rows`` rows white."""
    img = Image.new("1", size, 0)
    if white_rows:
        img.paste(1, (0, 0, size[0], white_rows))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


def rgb_png(seed, size=16):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(a, "RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def expected_mean(png):
    return float(MeanReward().score(decode_image(png, 1 << 30)[None], ["p"], [{}])["mean"][0])


def payload(images):
    return json.dumps({"images": images, "prompts": ["p"] * len(images), "metadata": [{}] * len(images)}).encode()


def post(url, body, token=None, extra=None):
    """(status, reply) of one POST /score on a fresh connection; raises on a reset or a broken reply."""
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {}),
               **(extra or {})}
    try:
        conn.request("POST", "/score", body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}"), dict(resp.getheaders())
    finally:
        conn.close()


def concurrently(fn, n):
    """fn(i) for i < n in n threads started together; returns results (exceptions as values)."""
    out = [None] * n
    barrier = threading.Barrier(n)

    def run(i):
        barrier.wait()
        try:
            out[i] = fn(i)
        except Exception as e:
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def status_kb(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def decode_bound_kb():
    """At most max_decodes batches live at once, each its float32 pixels (12 B/pixel) plus one image's 8-bit
    intermediates (PIL's own copy, RGB at 4 B/pixel, numpy's at 3), with 128 MiB of slack: not one per request."""
    return (DECODES * (REQUEST_PIXELS * 12 + BIG * BIG * 8) + 128 * MB) // 1024


def reset_peak_rss(pid):
    """Reset the process's VmHWM (peak RSS) to its current RSS: each test measures its own peak."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")
    return status_kb(pid, "VmRSS")


@pytest.fixture(scope="module")
def proc_server(tmp_path_factory):
    """The real CLI in a subprocess (so its RSS is its own), with a token and a 2-image pixel budget."""
    tmp = tmp_path_factory.mktemp("server")
    (tmp / "token").write_text(TOKEN + "\n")
    log_path = tmp / "server.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, ROOT, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "engine.rewards.server", "--reward", "test_rewards_server_hardening:MeanReward",
           "--port", "0", "--token-file", str(tmp / "token"), "--max-request-pixels", str(REQUEST_PIXELS),
           "--max-decodes", str(DECODES), "--request-timeout", "5"]
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log_file, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving reward 'mean' at http://127.0.0.1:"), (line, log_path.read_text())
        yield line.split(" at ")[1].strip(), proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        assert TOKEN not in log_path.read_text()  # the token is never logged


@pytest.fixture
def local_server():
    reward = MeanReward()
    server = RewardServer(reward, "127.0.0.1", 0, request_timeout=1.5, socket_timeout=5.0,
                          max_connections=8).start()
    try:
        yield server, reward
    finally:
        server.shutdown()


# ------------------------------------------------------------------------------------------------ memory bombs

def test_pixel_bomb_is_413_before_anything_is_decoded(proc_server):
    url, pid = proc_server
    bomb = payload([bitmap_png((BIG, BIG))] * 16)  # each image within max_pixels; 64 Mpx (768 MiB) in all
    assert len(bomb) < 64 * 1024
    base = reset_peak_rss(pid)
    replies = concurrently(lambda i: post(url, bomb, TOKEN), 2)
    for r in replies:
        assert not isinstance(r, Exception), r
        status, reply, _ = r
        assert status == 413 and "max_request_pixels" in reply["error"], reply
    # nothing was allocated for the pixels: the peak stayed within noise of the baseline
    assert status_kb(pid, "VmHWM") - base < 32 * 1024


def test_concurrent_requests_within_the_budget_do_not_add_up(proc_server):
    url, pid = proc_server
    half = bitmap_png((BIG, BIG), white_rows=BIG // 2)  # mean exactly 0.5
    body = payload([half, half])  # exactly the request budget: 2 * 4 Mpx = 96 MiB as float32
    n = 8
    base = reset_peak_rss(pid)
    replies = concurrently(lambda i: post(url, body, TOKEN), n)
    for r in replies:
        assert not isinstance(r, Exception), r
        status, reply, _ = r
        assert status == 200 and reply["scores"]["mean"] == [0.5, 0.5], reply
    assert status_kb(pid, "VmHWM") - base < decode_bound_kb()


# --------------------------------------------------------------------------------------------- hostile JSON

@pytest.mark.parametrize("body", [
    b"[" * 200000,
    b'{"images": ' + b"[" * 200000,
    b'{"images": [], "prompts": [], "metadata": [' + b'{"a": ' * 100000,
    b"9" * 5000,
    b'{"images": ["x"], "prompts": ["p"], "metadata": [{"n": ' + b"7" * 5000 + b"}]}",
], ids=["deep-array", "deep-images", "deep-metadata", "5000-digit-int", "5000-digit-int-in-metadata"])
def test_deep_json_and_long_integers_are_400(local_server, body):
    server, reward = local_server
    status, reply, _ = post(server.url, body)
    assert status == 400 and "not valid JSON" in reply["error"], reply
    assert reward.calls == 0
    good = payload([rgb_png(1)])
    assert post(server.url, good)[0] == 200


# ------------------------------------------------------------------------------------------ backlog, threads

def test_32_concurrent_clients_get_no_resets():
    server = RewardServer(MeanReward(), "127.0.0.1", 0).start()
    try:
        assert server.httpd.request_queue_size >= 128
        pngs = [rgb_png(i) for i in range(32)]
        want = [expected_mean(p) for p in pngs]

        def client(i):
            errors = []
            for _ in range(10):  # a fresh connection per request, all 32 clients connecting at once
                try:
                    status, reply, _ = post(server.url, payload([pngs[i]]))
                    if status != 200 or abs(reply["scores"]["mean"][0] - want[i]) > 1e-6:
                        errors.append((status, reply))
                except Exception as e:
                    errors.append(repr(e))
            return errors

        results = concurrently(client, 32)
        assert all(r == [] for r in results), [r for r in results if r]
    finally:
        server.shutdown()


class SlowLoris:
    """Connections that send ``data`` one byte per ``tick()``; ``closed_at`` records when the server hung up."""

    def __init__(self, url, data, n):
        host, port = url.split("//")[1].split(":")
        self.data, self.t0 = data, time.monotonic()
        self.socks = [socket.create_connection((host, int(port)), timeout=5) for _ in range(n)]
        self.sent = [0] * n
        self.closed_at = [None] * n
        self.replies = [b""] * n

    def tick(self, wait):
        open_ = [i for i, t in enumerate(self.closed_at) if t is None]
        for i in open_:
            if self.sent[i] < len(self.data):
                try:
                    self.socks[i].send(self.data[self.sent[i]:self.sent[i] + 1])
                    self.sent[i] += 1
                except OSError:
                    pass
        readable, _, _ = select.select([self.socks[i] for i in open_], [], [], wait)
        for i in open_:
            if self.socks[i] in readable:
                try:
                    chunk = self.socks[i].recv(65536)
                except OSError:
                    chunk = b""
                self.replies[i] += chunk
                if not chunk or self.replies[i].endswith(b"}"):
                    self.closed_at[i] = time.monotonic() - self.t0

    def close(self):
        for s in self.socks:
            s.close()


SLOW_LINE = b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n" * 4


def test_slow_loris_is_dropped_at_the_total_deadline(local_server):
    server, _ = local_server  # request_timeout 1.5 s, socket_timeout 5 s: each byte comes well within 5 s
    line = SlowLoris(server.url, SLOW_LINE, 1)
    head = b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n"
    body = SlowLoris(server.url, b"", 1)
    body.socks[0].sendall(head)
    body.data = b" " * 200
    try:
        while time.monotonic() - line.t0 < 6 and None in line.closed_at + body.closed_at:
            line.tick(0.2)
            body.tick(0.0)
        assert line.closed_at[0] is not None and line.closed_at[0] < 1.5 + 1.5, line.closed_at
        assert body.closed_at[0] is not None and body.closed_at[0] < 1.5 + 1.5, body.closed_at
        assert body.replies[0].startswith(b"HTTP/1.1 408"), body.replies[0][:200]
    finally:
        line.close()
        body.close()


def test_slow_loris_connections_cannot_exhaust_threads(local_server):
    server, _ = local_server  # max_connections 8
    threads0 = threading.active_count()
    few = SlowLoris(server.url, SLOW_LINE, 5)
    many = None
    try:
        few.tick(0.2)
        # a good client is served at once while they hold their connections
        assert post(server.url, payload([rgb_png(3)]))[0] == 200
        assert all(t is None for t in few.closed_at), few.closed_at
        many = SlowLoris(server.url, SLOW_LINE, 20)
        for _ in range(3):
            many.tick(0.2)
            few.tick(0.0)
        # the connection threads, capped; the decoding and scoring pools were started by the first good request
        assert threading.active_count() - threads0 <= 8 + 2 + 1
        busy = [r for r in many.replies if r.startswith(b"HTTP/1.1 503")]
        assert len(busy) >= 20 - 3, many.replies  # over the cap: refused at once (3 may have got a freed slot)
        # after the deadline every slow connection is gone and service is back
        while time.monotonic() - few.t0 < 6 and None in few.closed_at + many.closed_at:
            few.tick(0.2)
            many.tick(0.0)
        assert None not in few.closed_at + many.closed_at
        status, reply, _ = post(server.url, payload([rgb_png(4)]))
        assert status == 200 and abs(reply["scores"]["mean"][0] - expected_mean(rgb_png(4))) < 1e-6
    finally:
        few.close()
        if many is not None:
            many.close()


# ----------------------------------------------------------------------------------------------------- auth

def test_bearer_token(tmp_path, monkeypatch, caplog):
    caplog.set_level("DEBUG", logger="engine.rewards.server")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    reward = MeanReward()
    with RewardServer(reward, "127.0.0.1", 0, token=TOKEN) as server:
        good = payload([rgb_png(5)])
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": TOKEN}):
            status, reply, reply_headers = post(server.url, good, extra=headers)
            assert status == 401 and reply_headers.get("WWW-Authenticate") == "Bearer", (headers, reply)
            assert TOKEN not in json.dumps(reply)
        status, _, _ = post(server.url, b"x" * (200 * 1024), extra={"Authorization": "Bearer wrong"})
        assert status == 401  # a large body is read and dropped: the client sees the 401, not a reset
        assert post(server.url, good, extra={"Authorization": f"bearer {TOKEN}"})[0] == 200
        assert reward.calls == 1
        # the client: from a file, from the environment, or refused at once (401 is never retried)
        want = expected_mean(rgb_png(5))
        images = decode_image(rgb_png(5), 1 << 20)[None]
        client = RemoteReward(server.url, retries=0, token_file=str(token_file))
        assert client.health()["auth"] is True
        assert abs(float(client.score(images, ["p"], [{}])["mean"][0]) - want) < 1e-6
        assert TOKEN not in repr(client)
        with pytest.raises(RemoteRewardError, match=r"\(401\).*token_file or set \$RLFLOW_REWARD_TOKEN") as e:
            RemoteReward(server.url, retries=3, backoff=0.0).score(images, ["p"], [{}])
        assert TOKEN not in str(e.value)
        monkeypatch.setenv("RLFLOW_REWARD_TOKEN", TOKEN)
        assert RemoteReward(server.url, retries=0).health()["reward"] == "mean"
        assert reward.calls == 2
    assert TOKEN not in caplog.text and "Bearer" not in caplog.text
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        RemoteReward("http://127.0.0.1:9", token_file=str(tmp_path / "empty"))
    r = subprocess.run([sys.executable, "-m", "engine.rewards.server", "--reward", "ocr", "--token-file",
                        str(tmp_path / "empty")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--token-file" in r.stderr and "is empty" in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------- client retry rules

@pytest.fixture
def fake_server():
    """A socket listener answering every connection with ``reply`` (raw bytes); ``hits`` counts connections."""
    state = {"reply": b"", "hits": 0}
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.settimeout(0.1)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except OSError:
                continue
            with conn:
                state["hits"] += 1
                conn.settimeout(2)
                try:
                    data = b""
                    while b"\r\n\r\n" not in data:
                        data += conn.recv(65536)
                    conn.sendall(state["reply"])
                except OSError:
                    pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    state["url"] = f"http://127.0.0.1:{lsock.getsockname()[1]}"
    yield state
    stop.set()
    t.join(5)
    lsock.close()


def http_reply(status, body=b'{"error": "x"}', extra=b""):
    return (b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\nConnection: close\r\n" + extra + b"\r\n" + body)


@pytest.mark.parametrize("reply,retried", [
    (b"garbage\r\n\r\n", True),                                  # a broken status line
    (http_reply(b"200 OK", b'{"reward": "mean", "sc')[:-5], True),  # a reply cut short
    (http_reply(b"408 Request Timeout"), True),
    (http_reply(b"503 Service Unavailable"), True),
    (http_reply(b"400 Bad Request"), False),
    (http_reply(b"302 Found", extra=b"Location: http://127.0.0.1:9/score\r\n"), False),  # never followed
], ids=["bad-status-line", "truncated", "408", "503", "400", "redirect"])
def test_client_retries_faults_and_not_request_errors(fake_server, reply, retried):
    fake_server["reply"] = reply
    client = RemoteReward(fake_server["url"], timeout=5, retries=2, backoff=0.0)
    with pytest.raises(RemoteRewardUnavailable if retried else RemoteRewardError):
        client.health()
    assert fake_server["hits"] == (3 if retried else 1)


# ---------------------------------------------------------------------------------------------- load test

def test_load_mixed_good_and_hostile(proc_server):
    url, pid = proc_server
    good_pngs = [rgb_png(100 + i) for i in range(24)]
    want = [expected_mean(p) for p in good_pngs]
    small = rgb_png(0)
    hostile = [
        (payload([bitmap_png((BIG, BIG))] * 32), TOKEN, 413),                  # pixel bomb
        (b"[" * 200000, TOKEN, 400),                                             # deep JSON
        (b'{"images": [], "n": ' + b"1" * 5000 + b"}", TOKEN, 400),             # long integer
        (payload([small]), None, 401),                                          # no token
        (payload([small]), "wrong", 401),                                       # wrong token
        (payload(["!!not base64!!"]), TOKEN, 400),
        (payload([small, bitmap_png((8, 8))]), TOKEN, 400),                    # mixed sizes
        (payload([small] * 300), TOKEN, 413),                                  # over max_batch
    ]
    slow = SlowLoris(url, SLOW_LINE, 4)
    stop = threading.Event()

    def trickle():
        while not stop.is_set():
            slow.tick(0.2)

    ticker = threading.Thread(target=trickle, daemon=True)
    ticker.start()
    base = reset_peak_rss(pid)

    def client(i):
        bad = []
        for j in range(8):
            if j % 2 == 0:
                status, reply, _ = post(url, payload([good_pngs[i]]), TOKEN)
                if status != 200 or abs(reply["scores"]["mean"][0] - want[i]) > 1e-6:
                    bad.append(("good", status, reply))
            else:
                body, token, expected = hostile[(i + j) % len(hostile)]
                status, reply, _ = post(url, body, token)
                if status != expected or not reply.get("error"):
                    bad.append(("hostile", expected, status, reply))
        return bad

    try:
        results = concurrently(client, 24)
    finally:
        stop.set()
        ticker.join(5)
        slow.close()
    assert all(r == [] for r in results), [r for r in results if r]
    assert status_kb(pid, "VmHWM") - base < decode_bound_kb()
    status, reply, _ = post(url, payload([good_pngs[0]]), TOKEN)
    assert status == 200 and abs(reply["scores"]["mean"][0] - want[0]) < 1e-6
