"""A bounded load test of ``gpt2fast serve`` on loopback with the ``openai`` async client.

Two rounds of 200 requests at concurrency 32 on a tiny model: mixed prompt lengths (1 to past the prefill chunk),
a quarter streamed, a tenth cancelled mid-stream.  Every request that was not cancelled must come back with
exactly its ``max_tokens`` tokens, ``/metrics`` must show no running request afterwards (no slot leaks), no
engine request may stay alive, and the process's memory must not grow between the rounds.  Each round is
bounded in time (``ROUND_TIMEOUT_S``) and stops by itself.
"""

from __future__ import annotations

import asyncio
import gc
import random
import time
import weakref

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from gpt2fast import GPT2  # noqa: E402
from gpt2fast.serve import Engine, engine  # noqa: E402
from gpt2fast.serve.metrics import parse_metrics  # noqa: E402
from gpt2fast.serve.server import BackgroundServer, create_app  # noqa: E402
from gpt2fast.tokenizer import Tokenizer  # noqa: E402

REQUESTS, CONCURRENCY = 200, 32
ROUND_TIMEOUT_S = 240.0
#: Allowed RSS growth from the end of round 1 to the end of round 2.
RSS_SLACK_MB = 40.0


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def one(client: openai.AsyncOpenAI, i: int, rng: random.Random) -> tuple[str, int, int]:
    """Request ``i``: returns (kind, expected tokens, received tokens)."""
    n_prompt = rng.choice([1, 3, 8, 20, 45, 70])
    prompt = [rng.randrange(50257) for _ in range(n_prompt)]
    max_tokens = rng.randint(1, 12)
    kind = "cancel" if i % 10 == 0 else "stream" if i % 4 == 1 else "plain"
    kw = dict(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=rng.choice([0.0, 0.8]),
              extra_body={"ignore_eos": True})  # fmt: skip
    if kind == "plain":
        r = await client.completions.create(**kw)
        return kind, max_tokens, r.usage.completion_tokens
    if kind == "cancel":
        kw["max_tokens"] = max_tokens = 50
    stream = await client.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    got = 0
    async for chunk in stream:
        if kind == "cancel":
            await stream.close()  # leave after the first chunk: the server must cancel and free the slot
            return kind, max_tokens, -1
        if chunk.usage is not None:
            got = chunk.usage.completion_tokens
    return kind, max_tokens, got


async def round_of(url: str, seed: int) -> list[tuple[str, int, int]]:
    rng = random.Random(seed)
    limit = asyncio.Semaphore(CONCURRENCY)
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:

        async def bounded(i: int):
            async with limit:
                return await one(client, i, rng)

        return await asyncio.wait_for(asyncio.gather(*(bounded(i) for i in range(REQUESTS))), ROUND_TIMEOUT_S)


def test_two_rounds_of_200_requests_at_concurrency_32():
    live: weakref.WeakSet = weakref.WeakSet()
    original_init = engine.Request.__init__

    def tracked(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        live.add(self)

    model = GPT2.random("tiny", seed=0)
    app = create_app(Engine(model, max_batch=16, max_queue=REQUESTS, prefill_chunk=32), Tokenizer.default(), "tiny")
    rss = []
    with BackgroundServer(app) as srv:
        engine.Request.__init__ = tracked
        try:
            for seed in (1, 2):
                t0 = time.monotonic()
                results = asyncio.run(round_of(srv.url, seed))
                elapsed = time.monotonic() - t0
                kinds = [k for k, _, _ in results]
                assert kinds.count("cancel") == REQUESTS // 10 and kinds.count("stream") >= REQUESTS // 5
                wrong = [(k, want, got) for k, want, got in results if k != "cancel" and want != got]
                assert not wrong, f"{len(wrong)} requests came back with the wrong token count: {wrong[:5]}"
                deadline = time.monotonic() + 10
                while True:  # cancellations reach the engine at its next step
                    m = parse_metrics(httpx.get(srv.url + "/metrics").text)
                    if (m["gpt2fast_running"] == 0 and m["gpt2fast_queue_depth"] == 0) or time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
                assert m["gpt2fast_running"] == 0 and m["gpt2fast_queue_depth"] == 0, "a slot leaked"
                assert m['gpt2fast_requests_total{finish_reason="cancelled"}'] == (REQUESTS // 10) * seed
                gc.collect()
                assert len(live) == 0, f"engine requests still referenced: {list(live)[:3]}"
                rss.append(rss_mb())
                print(f"round {seed}: {elapsed:.1f} s, RSS {rss[-1]:.0f} MB")
        finally:
            engine.Request.__init__ = original_init
    assert rss[1] - rss[0] < RSS_SLACK_MB, f"RSS grew from {rss[0]:.0f} MB to {rss[1]:.0f} MB between rounds"
