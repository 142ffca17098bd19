"""``gpt2fast bench serve``: the load generator against in-process servers of both engines, its figures, its
options.  (The committed CPU run, benchmarks/results/serve_cpu_gpt2.json, exercised the subprocess servers.)"""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("transformers")

from gpt2fast import GPT2, cli
from gpt2fast.bench import results
from gpt2fast.bench import serve as bench
from gpt2fast.serve import Engine
from gpt2fast.serve.naive import NaiveEngine, hf_copy
from gpt2fast.serve.server import BackgroundServer, create_app
from gpt2fast.tokenizer import Tokenizer


@pytest.mark.parametrize("engine", ["gpt2fast", "naive"])
def test_a_level_against_each_engine(engine):
    model = GPT2.random("tiny", seed=0)
    eng = Engine(model, max_batch=4, max_queue=16) if engine == "gpt2fast" else NaiveEngine(hf_copy(model))
    with BackgroundServer(create_app(eng, Tokenizer.default(), "tiny")) as srv:
        level = asyncio.run(bench.run_level(srv.url, "tiny", 3, 5, 6, 4, 50257, duration_s=60, grace_s=30))
    assert (level["requests"], level["completed"], level["failed"], level["tokens"]) == (5, 5, 0, 20)
    assert level["throughput_tokens_per_s"] > 0 and level["ttft_ms"]["p50"] > 0
    assert level["itl_ms"]["p99"] >= level["itl_ms"]["p50"] > 0 and level["errors"] == []


def test_a_wrong_model_counts_as_failed_requests():
    with BackgroundServer(create_app(Engine(GPT2.random("tiny"), max_batch=2), Tokenizer.default(), "tiny")) as srv:
        level = asyncio.run(bench.run_level(srv.url, "other", 2, 3, 4, 2, 50257, duration_s=30, grace_s=10))
    assert level["completed"] == 0 and level["failed"] == 3 and "HTTP 400" in level["errors"][0]


def test_summary_ratio_and_document():
    ok = [bench.Result(True, 4, 0.1, (0.01, 0.02, 0.03), 0.16) for _ in range(3)]
    s = bench.summarize([*ok, bench.Result(False, error="x")], wall=2.0, concurrency=4)
    assert (s["completed"], s["failed"], s["tokens"], s["throughput_tokens_per_s"]) == (3, 1, 12, 6.0)
    assert s["itl_ms"]["p50"] == 20.0 and s["ttft_ms"]["p99"] == 100.0 and s["tpot_ms_mean"] == 20.0
    recs = [{"engine": "gpt2fast", "concurrency": 16, "error": None, "throughput_tokens_per_s": 300.0},
            {"engine": "naive", "concurrency": 16, "error": None, "throughput_tokens_per_s": 100.0},
            {"engine": "naive", "concurrency": None, "error": "boom"}]  # fmt: skip
    assert bench.ratios(recs) == {"16": 3.0}
    doc = results.new_document("serve", {k: None for k in results.META_FIELDS}, None)
    doc["records"] = recs
    results.validate(json.loads(json.dumps(doc)))


def test_server_command_bounds_the_context_and_threads():
    cmd = bench.server_command(bench.Options(size="gpt2", prompt_tokens=32, max_tokens=16), "naive", 1234)
    assert cmd[cmd.index("--max-len") + 1] == "48" and cmd[cmd.index("--engine") + 1] == "naive"
    assert cmd[cmd.index("--threads") + 1] == "1"


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--engines", "vllm"], "unknown"),
        (["--size", "huge"], "huge"),
        (["--max-tokens", "0"], "max-tokens"),
        (["--concurrency", "0"], "concurrency"),
        (["--concurrency", "a,b"], "integers"),
    ],
)
def test_bad_options_exit_2(argv, match, capsys):
    assert cli.main(["bench", "serve", *argv]) == 2
    assert match in capsys.readouterr().err
