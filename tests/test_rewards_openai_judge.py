"""The served judge client (``openai_judge``) against a stub OpenAI-compatible chat server on 127.0.0.1 (an
ephemeral port, bounded bodies): good answers parsed (a number, or Yes/No top logprobs), malformed answers,
rejections and timeouts become invalid samples (never filled in), 5xx retried and 4xx not, concurrency bounded,
and the API key sent but never shown."""
from __future__ import annotations

import base64
import io
import json
import logging
import math
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from PIL import Image

from engine.errors import ConfigError
from engine.rewards import build_reward, build_rewards

KEY = "sk-test-0123456789abcdef"


class StubJudge:
    """A chat-completions server whose answer is chosen by the prompt inside the question (see ``answer``).
    ``hold``: every request waits (at most 1 s) until that many have arrived, so a client sending them all at
    once has them all in flight, and a bounded one reaches exactly its bound."""

    def __init__(self, hold: int = 0) -> None:
        self.cond = threading.Condition()
        self.in_flight = self.max_in_flight = self.arrived = 0
        self.hold = hold
        self.attempts: Counter = Counter()
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 10

            def log_message(self, *args):
                pass

            def do_POST(self):
                stub.handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        size = int(h.headers.get("Content-Length", "0"))
        if h.path != "/v1/chat/completions" or not 0 < size <= 4 * 2**20:
            return self.reply(h, 404 if h.path != "/v1/chat/completions" else 413, {"error": "no"})
        body = json.loads(h.rfile.read(size))
        with self.cond:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.cond.notify_all()
            self.arrived += 1
            self.cond.notify_all()
            if self.hold:  # hold every request until `hold` have arrived (or 1 s): whatever may be in flight is
                self.cond.wait_for(lambda: self.arrived >= self.hold, timeout=1.0)
            self.bodies.append(body)
            self.headers.append(dict(h.headers))
            prompt = body["messages"][-1]["content"][1]["text"].removeprefix("Rate: ")
            self.attempts[prompt] += 1
            attempt = self.attempts[prompt]
        try:
            status, obj = self.answer(prompt, attempt, h.headers.get("Authorization", ""))
        finally:
            with self.cond:  # before replying: the client may start its next request as soon as it reads this
                self.in_flight -= 1
        self.reply(h, status, obj)

    @staticmethod
    def answer(prompt: str, attempt: int, auth: str):
        word, _, arg = prompt.partition(" ")
        text = lambda s: (200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": s}}]})
        if word == "good":
            return text(f"The score is {arg}.")
        if word == "words":
            return text("I cannot rate this image.")
        if word == "badjson":
            return 200, b"{not json"
        if word == "nochoices":
            return 200, {"choices": []}
        if word == "slow":
            time.sleep(1.0)
            return text("8")
        if word == "flaky":
            return (503, {"error": {"message": "overloaded"}}) if attempt <= 2 else text("5")
        if word == "reject":  # echoes the credentials, as a careless server might: the client must redact them
            return 400, {"error": {"message": f"image too small (auth was {auth})"}}
        if word == "lp":
            tops = [{"token": t, "logprob": float(v)} for t, v in zip(("Maybe", "Yes", "No"), ["-6"] + arg.split())]
            return 200, {"choices": [{"index": 0, "message": {"content": "Yes"},
                                      "logprobs": {"content": [{"token": "Yes", "logprob": tops[1]["logprob"],
                                                                "top_logprobs": tops}]}}]}
        return 500, {"error": "unknown stub prompt"}

    @staticmethod
    def reply(h, status: int, obj) -> None:
        raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(raw)))
            h.end_headers()
            h.wfile.write(raw)
        except OSError:  # the client gave up (timeout test)
            pass


@pytest.fixture
def stub():
    s = StubJudge()
    yield s
    s.close()


def judge(url, **kw):
    kwargs = {"url": url, "model": "qwen2.5-vl-7b", "question": "Rate: {prompt}", "timeout": 5, "retries": 3,
              "backoff": 0.01, **kw}
    return build_reward({"name": "openai_judge", "kwargs": kwargs})


def images(n, seed=0):
    return torch.randint(0, 256, (n, 3, 12, 10), generator=torch.Generator().manual_seed(seed)).float() / 255


def test_good_numeric_answers_and_the_request_format(stub, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", KEY)
    r = judge(stub.url, api_key_env="JUDGE_KEY", scale=0.1, system_prompt="Be strict.")
    x = images(3)
    out = r.score(x, ["good 7", "good 3.5", "good -2"], [{}] * 3)["openai_judge"]
    assert out.tolist() == pytest.approx([0.7, 0.35, -0.2])
    assert r.last_errors == {}
    assert all(hd["Authorization"] == f"Bearer {KEY}" for hd in stub.headers)
    by_prompt = {b["messages"][-1]["content"][1]["text"]: b for b in stub.bodies}
    for i, p in enumerate(["good 7", "good 3.5", "good -2"]):
        b = by_prompt[f"Rate: {p}"]
        assert b["model"] == "qwen2.5-vl-7b" and b["temperature"] == 0 and b["max_tokens"] == 32
        assert b["messages"][0] == {"role": "system", "content": "Be strict."}
        img = b["messages"][-1]["content"][0]
        assert img["type"] == "image_url" and img["image_url"]["url"].startswith("data:image/png;base64,")
        png = Image.open(io.BytesIO(base64.b64decode(img["image_url"]["url"].split(",", 1)[1])))
        got = torch.from_numpy(__import__("numpy").asarray(png.convert("RGB")).copy()).permute(2, 0, 1)
        assert torch.equal(got, (x[i] * 255).round().to(torch.uint8))  # the image itself, 8-bit exact
    assert KEY not in repr(r)


def test_malformed_answers_rejections_and_timeouts_are_invalid_never_filled(stub, monkeypatch, caplog):
    monkeypatch.setenv("JUDGE_KEY", KEY)
    prompts = ["good 4", "words", "badjson", "nochoices", "slow", "reject", "flaky", "good 11"]
    rs = build_rewards([{"name": "openai_judge", "kwargs": {
        "url": stub.url, "model": "m", "question": "Rate: {prompt}", "timeout": 0.4, "retries": 3, "backoff": 0.01,
        "api_key_env": "JUDGE_KEY", "valid_range": [0, 10]}}])
    with caplog.at_level(logging.WARNING):
        out = rs.score(images(len(prompts)), prompts, [{}] * len(prompts))
    assert out["valid"].tolist() == [True, False, False, False, False, False, True, False]
    assert out["openai_judge"][0] == 4 and out["openai_judge"][6] == 5
    assert torch.isnan(out["reward"][~out["valid"]]).all() and torch.isnan(out["openai_judge"][~out["valid"]]).all()
    errors = rs.components[0].reward.last_errors
    assert set(errors) == {1, 2, 3, 4, 5, 7}
    assert "no number" in errors[1] and "invalid JSON" in errors[2] and "choices" in errors[3]
    assert "no answer within 0.4 s" in errors[4] and "HTTP 400" in errors[5] and "valid_range" in errors[7]
    assert stub.attempts["reject"] == 1 and stub.attempts["flaky"] == 3  # 4xx not retried, 503 retried
    assert stub.attempts["words"] == 1  # a malformed answer is the judge's answer: not asked again
    everything = " ".join(errors.values()) + caplog.text + json.dumps(rs.last_errors)
    assert KEY not in everything and "***" in errors[5]


def test_yes_no_from_top_logprobs(stub):
    r = judge(stub.url, parser="yes_no_logprobs", top_logprobs=5)
    out = r.score(images(3), ["lp -0.1 -2.5", "lp -3 -0.05", "lp -1"], [{}] * 3)["openai_judge"]
    assert out[0].item() == pytest.approx(100 / (1 + math.exp(-(-0.1 + 2.5))), rel=1e-6)
    assert out[1].item() == pytest.approx(100 / (1 + math.exp(-(-3 + 0.05))), rel=1e-6)
    assert math.isnan(out[2]) and "['No'] not among" in r.last_errors[2]
    assert all(b["logprobs"] is True and b["top_logprobs"] == 5 and b["max_tokens"] == 1 for b in stub.bodies)
    plain = judge(stub.url, parser="yes_no_logprobs").score(images(1), ["good 3"], [{}])["openai_judge"]
    assert math.isnan(plain[0])  # a server that returns no logprobs gives no score, not a guess


@pytest.mark.parametrize("limit", [1, 3])
def test_concurrency_is_bounded(limit):
    stub = StubJudge(hold=2 * limit)  # all requests in flight at once unless the client bounds them
    try:
        out = judge(stub.url, max_concurrency=limit).score(images(2 * limit), ["good 1"] * 2 * limit,
                                                           [{}] * 2 * limit)
    finally:
        stub.close()
    assert out["openai_judge"].tolist() == [1.0] * 2 * limit
    assert stub.max_in_flight == limit


def test_config_errors_and_didr_refusal(stub, monkeypatch):
    from engine.methods.didr.math import check_reward

    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    with pytest.raises(ConfigError, match="'NO_SUCH_JUDGE_KEY', which is not set"):
        judge(stub.url, api_key_env="NO_SUCH_JUDGE_KEY")
    with pytest.raises(ConfigError, match="parser must be one of"):
        judge(stub.url, parser="vibes")
    with pytest.raises(ConfigError, match="url must start with"):
        judge("ftp://x")
    with pytest.raises(ConfigError, match="max_concurrency must be an integer >= 1"):
        judge(stub.url, max_concurrency=0)
    with pytest.raises(ConfigError, match="may only hold the field"):
        judge(stub.url, question="Is {thing} there?")
    served = build_rewards([{"name": "openai_judge", "kwargs": {"url": stub.url, "model": "m"}}])
    with pytest.raises(ConfigError, match=r"DIDR needs a differentiable reward.*\['openai_judge'\]"):
        check_reward(served)


def test_the_served_judge_crd_recipe_loads_and_builds_without_contacting_the_judge():
    import os

    from engine.batch import derive_batch
    from engine.config import load_config
    from engine.rewards.openai_judge import OpenAIJudgeReward

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs/sd35m_geneval_crd_judge.yaml"))
    assert cfg.method == "crd" and [(s.name, s.weight, s.backend) for s in cfg.rewards] == [("openai_judge", 1.0,
                                                                                              "async")]
    rs = build_rewards(cfg.rewards)  # builds the client only: the judge at 10.0.0.5 is never asked
    client = rs.components[0].reward.reward
    assert isinstance(client, OpenAIJudgeReward) and client.parser == "yes_no_logprobs" and client.scale == 0.01
    assert client.endpoint == "http://10.0.0.5:8000/v1/chat/completions"
    rs.close()
    derive_batch(8, cfg.data.prompts_per_epoch, cfg.data.group_size, cfg.train.micro_batch_size,
                 cfg.train.gradient_steps_per_epoch, 1)
