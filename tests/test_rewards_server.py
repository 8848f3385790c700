"""The HTTP reward server and its client on 127.0.0.1 (ephemeral ports): round trip, retries/backoff, timeouts,
and 20+ malformed or hostile requests that must get a 4xx while the server keeps serving."""
import base64
import http.client
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import pytest
import torch
from PIL import Image

from engine.rewards import RemoteReward, RemoteRewardError, RemoteRewardUnavailable, build_rewards
from engine.rewards.remote import decode_image, encode_images
from engine.rewards.server import RewardServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class MeanReward:
    name = "mean"
    differentiable = False

    def __init__(self):
        self.calls = 0
        self.fail_first = 0     # raise RuntimeError on the first k calls (a server-side failure -> 500)
        self.delay = 0.0

    def score(self, images, prompts, metadata):
        self.calls += 1
        if self.calls <= self.fail_first:
            raise RuntimeError("GPU fell off the bus")
        if self.delay:
            time.sleep(self.delay)
        if any(p == "refuse" for p in prompts):
            raise ValueError("prompt 'refuse' is not allowed")
        m = images.mean(dim=(1, 2, 3))
        m = torch.where(torch.tensor(["nan" in p for p in prompts]), torch.full_like(m, float("nan")), m)
        return {"mean": m, "mean_green": images[:, 1].mean(dim=(1, 2))}


@pytest.fixture(scope="module")
def server_once():
    """One server for the module: every test (hostile ones included) must leave it serving for the next."""
    reward = MeanReward()
    server = RewardServer(reward, "127.0.0.1", 0, max_body_bytes=1 << 20, max_batch=8, max_pixels=64 * 64,
                          socket_timeout=1.0).start()
    try:
        yield server, reward
    finally:
        server.shutdown()


@pytest.fixture
def served(server_once):
    server, reward = server_once
    reward.__init__()  # fresh counters and no injected failures
    assert raw_request(server.url, "GET", "/health")[0] == 200
    return server, reward


def quantised_batch(n=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 255.0


def png_b64(size=(16, 16), color=(10, 20, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def fake_png_header(width, height):
    """A PNG whose IHDR claims width x height (valid CRC) followed by nothing: a decompression-bomb probe."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + chunk).decode()


def raw_request(url, method, path, body=b"", headers=None):
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def raw_socket(url, data: bytes, read_timeout=5.0, status=True):
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout) as s:
        s.sendall(data)
        chunks = b""
        try:
            while True:
                c = s.recv(65536)
                if not c:
                    break
                chunks += c
                if b"\r\n\r\n" in chunks and chunks.split(b"\r\n\r\n", 1)[1].endswith(b"}"):
                    break
        except (socket.timeout, ConnectionResetError):
            pass
    return int(chunks.split(b" ")[1]) if status else chunks


def post_json(url, obj, headers=None):
    body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return raw_request(url, "POST", "/score", body, {"Content-Type": "application/json", **(headers or {})})


def test_codec_round_trip_is_exact_on_8bit_images():
    images = quantised_batch()
    decoded = torch.stack([decode_image(s, 1 << 20) for s in encode_images(images)])
    assert torch.equal(decoded, images)


def test_round_trip_matches_local_scoring(served, register_reward):
    server, reward = served
    register_reward("mean", f"{__name__}:MeanReward")
    client = RemoteReward(server.url, 10, 0, name="mean")  # (url, timeout, retries)
    assert client.health()["reward"] == "mean"
    images = quantised_batch()
    prompts, meta = ["a", "nan please", "c"], [{"k": 1}, {}, {}]
    got = client.score(images, prompts, meta)
    local = reward.score(images, prompts, meta)
    assert torch.allclose(got["mean"][[0, 2]], local["mean"][[0, 2]], atol=1e-6)
    assert torch.isnan(got["mean"][1])  # NaN travels as null and comes back as NaN
    assert torch.allclose(got["mean_green"], local["mean_green"], atol=1e-6)
    # through build_rewards with the remote backend: NaN -> invalid sample
    rs = build_rewards([{"name": "mean", "backend": "remote", "key": "m",
                         "kwargs": {"url": server.url, "retries": 0}}])
    out = rs.score(images, prompts, meta)
    assert out["valid"].tolist() == [True, False, True] and "m/green" in out


def test_client_refuses_a_server_serving_another_reward(served):
    server, _ = served
    with pytest.raises(RemoteRewardError, match="serves reward 'mean', but this client expects 'ocr'"):
        RemoteReward(server.url, name="ocr", retries=0).score(quantised_batch(1), ["x"], [{}])


def test_retries_with_backoff_on_5xx_then_succeeds(served):
    server, reward = served
    reward.fail_first = 2
    client = RemoteReward(server.url, timeout=10, retries=3, backoff=0.05)
    t0 = time.perf_counter()
    out = client.score(quantised_batch(2), ["a", "b"], [{}, {}])
    assert reward.calls == 3 and out["mean"].shape == (2,)
    assert time.perf_counter() - t0 >= 0.05 + 0.1  # slept backoff * (1 + 2)


def test_5xx_exhausts_retries_with_a_clear_error(served):
    server, reward = served
    reward.fail_first = 10
    with pytest.raises(RemoteRewardUnavailable, match="failed on all 2 attempts; last: HTTP 500.*GPU fell off"):
        RemoteReward(server.url, retries=1, backoff=0.0).score(quantised_batch(1), ["a"], [{}])
    assert reward.calls == 2
    assert raw_request(server.url, "GET", "/health")[0] == 200


def test_4xx_is_not_retried(served):
    server, reward = served
    with pytest.raises(RemoteRewardError, match=r"\(422\).*'refuse' is not allowed"):
        RemoteReward(server.url, retries=3, backoff=0.0).score(quantised_batch(1), ["refuse"], [{}])
    assert reward.calls == 1


def test_timeout_and_connection_refused(served):
    server, reward = served
    reward.delay = 0.6
    with pytest.raises(RemoteRewardUnavailable, match="failed on all 1 attempts"):
        RemoteReward(server.url, timeout=0.2, retries=0).score(quantised_batch(1), ["a"], [{}])
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RemoteRewardUnavailable, match="2 attempts.*(Connection refused|URLError)"):
        RemoteReward(f"http://127.0.0.1:{port}", retries=1, backoff=0.01).health()


def test_client_side_checks():
    with pytest.raises(ValueError, match="url must start with http"):
        RemoteReward("127.0.0.1:8123")
    client = RemoteReward("http://127.0.0.1:9", max_body_bytes=100)
    with pytest.raises(ValueError, match="exceeds max_body_bytes=100"):
        client.score(quantised_batch(1), ["a"], [{}])
    with pytest.raises(TypeError, match="not differentiable"):
        client.score_differentiable(None, None, None)


GOOD = {"images": None, "prompts": ["a", "b"], "metadata": [{}, {}]}


def hostile_cases():
    img = png_b64()
    truncated = base64.b64encode(base64.b64decode(img)[:40]).decode()
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, format="JPEG")
    ok = {"images": [img, img], "prompts": ["a", "b"], "metadata": [{}, {}]}
    return [
        ("bad json", b'{"images": [', 400),
        ("json array", b"[1, 2, 3]", 400),
        ("json string", b'"hello"', 400),
        ("not utf8", b"\xff\xfe\x00garbage", 400),
        ("missing images", {"prompts": ["a"], "metadata": [{}]}, 400),
        ("missing prompts", {"images": [img], "metadata": [{}]}, 400),
        ("missing metadata", {"images": [img], "prompts": ["a"]}, 400),
        ("images is a string", {**ok, "images": img}, 400),
        ("prompts is a dict", {**ok, "prompts": {"a": 1}}, 400),
        ("metadata is a dict", {**ok, "metadata": {}}, 400),
        ("prompt is an int", {**ok, "prompts": ["a", 3]}, 400),
        ("metadata entry is a list", {**ok, "metadata": [{}, [1]]}, 400),
        ("too few prompts", {**ok, "prompts": ["a"]}, 400),
        ("too many metadata", {**ok, "metadata": [{}, {}, {}]}, 400),
        ("empty batch", {"images": [], "prompts": [], "metadata": []}, 400),
        ("image is a number", {**ok, "images": [img, 5]}, 400),
        ("image is null", {**ok, "images": [None, img]}, 400),
        ("invalid base64", {**ok, "images": [img, "!!not base64!!"]}, 400),
        ("jpeg not png", {**ok, "images": [img, base64.b64encode(jpeg.getvalue()).decode()]}, 400),
        ("text not png", {**ok, "images": [img, base64.b64encode(b"hello world").decode()]}, 400),
        ("truncated png", {**ok, "images": [img, truncated]}, 400),
        ("header-only png", {**ok, "images": [img, fake_png_header(32, 32)]}, 400),
        ("huge image (bomb header)", {**ok, "images": [img, fake_png_header(100000, 100000)]}, 413),
        ("image over max_pixels", {**ok, "images": [img, png_b64((65, 65))]}, 413),
        ("mixed image sizes", {**ok, "images": [img, png_b64((8, 8))]}, 400),
        ("batch over max_batch", {"images": [img] * 9, "prompts": ["a"] * 9, "metadata": [{}] * 9}, 413),
        ("reward refuses input", {**ok, "prompts": ["a", "refuse"]}, 422),
    ]


@pytest.mark.parametrize("case", hostile_cases(), ids=lambda c: c[0])
def test_hostile_payloads_get_4xx_and_server_survives(served, case):
    server, _ = served
    _, body, expected = case
    status, reply = post_json(server.url, body)
    assert status == expected, reply
    assert isinstance(reply.get("error"), str) and reply["error"]
    assert raw_request(server.url, "GET", "/health") == (200, server.health())


def test_hostile_http_level_requests(served):
    server, reward = served
    url = server.url
    ok = json.dumps({"images": [png_b64()], "prompts": ["a"], "metadata": [{}]}).encode()
    assert raw_request(url, "POST", "/score", ok, {"Content-Type": "text/plain"})[0] == 415
    assert raw_request(url, "POST", "/score", ok, {})[0] == 415  # no content type at all
    assert raw_request(url, "GET", "/nope")[0] == 404
    assert raw_request(url, "POST", "/nope", ok, {"Content-Type": "application/json"})[0] == 404
    assert raw_request(url, "GET", "/score")[0] == 405
    assert raw_request(url, "POST", "/health", ok, {"Content-Type": "application/json"})[0] == 405
    head = b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    assert raw_socket(url, head + b"\r\n" + ok) == 411  # no Content-Length
    assert raw_socket(url, head + b"Content-Length: 12abc\r\n\r\n" + ok) == 400
    assert raw_socket(url, head + b"Content-Length: -5\r\n\r\n") == 400
    assert raw_socket(url, head + b"Content-Length: 999999999\r\n\r\n" + ok[:100]) == 413  # oversized body
    assert raw_socket(url, head + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n") == 411
    assert raw_socket(url, head + b"Content-Length: 5000\r\n\r\n" + ok[:100]) == 408  # body never completes
    assert raw_socket(url, b"BREW /score HTTP/1.1\r\nHost: x\r\n\r\n") == 405  # unknown method
    assert raw_socket(url, b"GET /health HTTP/9.9\r\n\r\n") == 400  # unknown HTTP version
    assert raw_socket(url, b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n") == 414  # request line too long
    raw_socket(url, b"GARBAGE\r\n\r\n", read_timeout=2.0, status=False)  # not HTTP at all: just closed
    # a real body just over the limit, sent in full
    big = json.dumps({"images": ["A" * (1 << 20)], "prompts": ["a"], "metadata": [{}]}).encode()
    assert post_json(url, big)[0] == 413
    assert reward.calls == 0  # none of these reached the reward
    status, reply = post_json(url, ok)
    assert status == 200 and reply["reward"] == "mean" and len(reply["scores"]["mean"]) == 1


def test_server_failure_is_500_and_server_keeps_serving(served):
    server, reward = served
    reward.fail_first = 1
    ok = {"images": [png_b64()], "prompts": ["a"], "metadata": [{}]}
    status, reply = post_json(server.url, ok)
    assert status == 500 and "GPU fell off the bus" in reply["error"]
    assert post_json(server.url, ok)[0] == 200


def test_concurrent_clients(served):
    server, _ = served
    client = RemoteReward(server.url, retries=0)
    images = quantised_batch(2)
    results, errors = [], []

    def work():
        try:
            results.append(client.score(images, ["a", "b"], [{}, {}])["mean"])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(results) == 6
    assert all(torch.equal(r, results[0]) for r in results)


def test_cli_serves_ocr_and_stops():
    proc = subprocess.Popen([sys.executable, "-m", "engine.rewards.server", "--reward", "ocr", "--port", "0",
                             "--host", "127.0.0.1"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving reward 'ocr' at http://127.0.0.1:"), (line, proc.stderr.read())
        url = line.split(" at ")[1].strip()
        health = RemoteReward(url, retries=0).health()
        assert health["status"] == "ok" and health["reward"] == "ocr"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_cli_rejects_bad_arguments():
    r = subprocess.run([sys.executable, "-m", "engine.rewards.server", "--reward", "ocr", "--kwargs", "[1]"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--kwargs must be a JSON object" in r.stderr
