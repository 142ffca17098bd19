"""``gpt2fast serve`` over HTTP on loopback, with the ``openai`` client: completions, streaming, n > 1, stop,
400/429 bodies, disconnects, metrics, and shutdown draining a running stream (a subprocess, SIGTERM)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from gpt2fast import GPT2  # noqa: E402
from gpt2fast.serve import Engine  # noqa: E402
from gpt2fast.serve.metrics import parse_metrics  # noqa: E402
from gpt2fast.serve.server import BackgroundServer, create_app  # noqa: E402
from gpt2fast.tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAME = "tiny"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def model() -> GPT2:
    return GPT2.random("tiny", seed=0)


@pytest.fixture(scope="module")
def server(model, tok):
    app = create_app(Engine(model, max_batch=4, max_queue=32, prefill_chunk=16), tok, NAME)
    with BackgroundServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def metrics(server) -> dict[str, float]:
    return parse_metrics(httpx.get(server.url + "/metrics").text)


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def offline_text(model, tok, prompt: str, n: int) -> tuple[list[int], str]:
    ids = tok.encode(prompt)
    new = model.generate(torch.tensor([ids]), max_new_tokens=n)[0, len(ids) :].tolist()
    return new, tok.decode(new)


# ---- completions ---------------------------------------------------------------------------------------------
def test_greedy_completion_equals_offline_generate(client, model, tok):
    r = client.completions.create(model=NAME, prompt="The fastest GPT-2", max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})  # fmt: skip
    text = offline_text(model, tok, "The fastest GPT-2", 12)[1]
    assert r.object == "text_completion" and r.model == NAME and r.id.startswith("cmpl-")
    assert [c.text for c in r.choices] == [text] and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(tok.encode("The fastest GPT-2")), 12)


def test_prompt_as_token_ids_and_as_a_list(client, model, tok):
    ids = tok.encode("Hello there")
    r = client.completions.create(model=NAME, prompt=[ids, "Hello there"], max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})  # fmt: skip
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == r.choices[1].text == offline_text(model, tok, "Hello there", 5)[1]


def test_streaming_matches_the_whole_response(client, server):
    kw = dict(model=NAME, prompt="Once upon a time", max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    raw = httpx.post(server.url + "/v1/completions", json={**kw.pop("extra_body"), **kw, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_n_choices_with_a_seed_are_reproducible(client):
    kw = dict(
        model=NAME, prompt="Seeds", max_tokens=8, n=3, seed=1234, temperature=1.0, extra_body={"ignore_eos": True}
    )
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # choice i samples with seed + i
    assert a.usage.completion_tokens == 24
    other = client.completions.create(**{**kw, "seed": 99})
    assert [c.text for c in other.choices] != [c.text for c in a.choices]


def test_stop_strings_cut_the_text(client, model, tok):
    _, text = offline_text(model, tok, "Stop here", 16)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop and stop in text
    for stream in (False, True):
        kw = dict(model=NAME, prompt="Stop here", max_tokens=16, temperature=0, stop=[stop, "\u2603never"],
                  stream=stream, extra_body={"ignore_eos": True})  # fmt: skip
        if stream:
            chunks = list(client.completions.create(**kw))
            got, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            c = client.completions.create(**kw).choices[0]
            got, reason = c.text, c.finish_reason
        assert got == text[: text.index(stop)] and reason == "stop"


def test_models_health_and_metrics(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    m = metrics(server)
    for name in ("gpt2fast_queue_depth", "gpt2fast_running", "gpt2fast_tokens_per_second",
                 "gpt2fast_time_to_first_token_seconds_count", "gpt2fast_inter_token_latency_seconds_count",
                 "gpt2fast_generated_tokens_total"):  # fmt: skip
        assert name in m, name


# ---- bad input and a full queue -------------------------------------------------------------------------------
BAD = [
    ({"model": "gpt-4", "prompt": "x"}, "model", "unknown model 'gpt-4'"),
    ({"prompt": "x"}, "model", "model is required"),
    ({"model": NAME, "prompt": ""}, "prompt", "prompt is empty"),
    ({"model": NAME, "prompt": []}, "prompt", "non-empty"),
    ({"model": NAME}, "prompt", "prompt is required"),
    ({"model": NAME, "prompt": [[1, 2], 3.5]}, "prompt", "prompt\\[1\\]"),
    ({"model": NAME, "prompt": [1, 50300]}, "prompt", "\\[0, 50257\\)"),
    ({"model": NAME, "prompt": "x", "max_tokens": 500}, "max_tokens", "exceeds the context of 128 tokens"),
    ({"model": NAME, "prompt": "x", "max_tokens": 0}, "max_tokens", "integer >= 1"),
    ({"model": NAME, "prompt": "x", "max_tokens": True}, "max_tokens", "integer >= 1"),
    ({"model": NAME, "prompt": "x", "temperature": 3}, "temperature", "\\[0, 2\\]"),
    ({"model": NAME, "prompt": "x", "temperature": "hot"}, "temperature", "\\[0, 2\\]"),
    ({"model": NAME, "prompt": "x", "top_p": 0}, "top_p", "\\(0, 1\\]"),
    ({"model": NAME, "prompt": "x", "top_k": -5}, "top_k", "integer >= 0"),
    ({"model": NAME, "prompt": "x", "n": 0}, "n", "\\[1, 16\\]"),
    ({"model": NAME, "prompt": "x", "seed": "s"}, "seed", "64-bit integer"),
    ({"model": NAME, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"model": NAME, "prompt": "x", "stop": [""]}, "stop", "non-empty string"),
    ({"model": NAME, "prompt": "x", "logprobs": 2}, "logprobs", "not supported"),
    ({"model": NAME, "prompt": "x", "presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"model": NAME, "prompt": "x", "stream": "yes"}, "stream", "a boolean"),
    ({"model": NAME, "prompt": "x", "repetition_penalty": 0}, "repetition_penalty", "> 0"),
    ([1, 2], "body", "JSON object"),
]


@pytest.mark.parametrize(("body", "param", "match"), BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_requests_get_openai_style_400s(server, body, param, match):
    import re

    r = httpx.post(server.url + "/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert re.search(match, err["message"]), err["message"]


def test_invalid_json_and_unknown_routes(server):
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    r = httpx.get(server.url + "/v1/chat")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=NAME, prompt="x", max_tokens=10_000)
    assert info.value.body["param"] == "max_tokens"


def test_full_queue_answers_429_at_once(model, tok):
    app = create_app(Engine(model, max_batch=1, max_queue=1), tok, NAME)
    runner = app.state.runner
    with BackgroundServer(app) as srv:
        body = {"model": NAME, "prompt": "queued", "max_tokens": 3, "temperature": 0}
        first: list = []
        with runner.paused():
            t = threading.Thread(target=lambda: first.append(httpx.post(srv.url + "/v1/completions", json=body,
                                                                        timeout=60)))  # fmt: skip
            t.start()
            assert wait_until(lambda: app.state.engine.num_waiting == 1)
            t0 = time.monotonic()
            r = httpx.post(srv.url + "/v1/completions", json=body, timeout=10)
            assert time.monotonic() - t0 < 5
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json() == {"error": {"message": "the queue is full (1 requests waiting); retry later",
                                          "type": "rate_limit_error", "param": None, "code": "queue_full"}}  # fmt: skip
            big = httpx.post(srv.url + "/v1/completions", json={**body, "n": 2}, timeout=10)
            assert big.status_code == 429  # n choices need n places in the queue
        t.join(60)
        assert first[0].status_code == 200 and first[0].json()["usage"]["completion_tokens"] == 3
        assert metrics(srv)['gpt2fast_rejected_requests_total{reason="queue_full"}'] == 2


# ---- disconnects ------------------------------------------------------------------------------------------------
def test_client_disconnect_mid_stream_cancels_and_frees_the_slot(server):
    before = metrics(server).get('gpt2fast_requests_total{finish_reason="cancelled"}', 0)
    body = {"model": NAME, "prompt": "long", "max_tokens": 120, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # leave after the first chunk: the connection closes
    assert wait_until(lambda: metrics(server)["gpt2fast_running"] == 0)
    m = metrics(server)
    assert m['gpt2fast_requests_total{finish_reason="cancelled"}'] == before + 1


def test_client_disconnect_while_waiting_for_a_whole_response_cancels(server, monkeypatch):
    # Each engine step takes at least 10 ms here, so the 120 tokens outlast the client's 0.3 s however fast the
    # backend decodes (the cpu backend does the tiny model's 120 steps in about that time).
    step = Engine.step

    def slow_step(self) -> int:
        time.sleep(0.01)
        return step(self)

    monkeypatch.setattr(Engine, "step", slow_step)
    before = metrics(server).get('gpt2fast_requests_total{finish_reason="cancelled"}', 0)
    body = {"model": NAME, "prompt": "long", "max_tokens": 120, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.3)
    assert wait_until(
        lambda: metrics(server).get('gpt2fast_requests_total{finish_reason="cancelled"}', 0) == before + 1
    )
    assert wait_until(lambda: metrics(server)["gpt2fast_running"] == 0)


# ---- shutdown drains ----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_a_running_stream():
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "gpt2fast", "serve", "--random", "tiny", "--port", str(port), "--max-batch", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None

        assert wait_until(up, timeout=60) and proc.poll() is None, proc.stdout.read().decode()
        body = {"model": "tiny", "prompt": "drain", "max_tokens": 40, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        events = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if not line:
                    continue
                events.append(line)
                if len(events) == 1:
                    proc.send_signal(signal.SIGTERM)
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == 40
        # uvicorn re-raises the signal once it has shut down gracefully: the process ends "killed by SIGTERM"
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        log = proc.stdout.read().decode()
        assert "Traceback" not in log and "error" not in log.lower(), log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
