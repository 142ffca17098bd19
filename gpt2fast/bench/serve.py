"""``gpt2fast bench serve``: a bounded load generator on loopback, against gpt2fast serve and a naive baseline.

For each engine (``gpt2fast``: continuous batching; ``naive``: one transformers ``generate`` per request
behind the same HTTP layer, see :mod:`gpt2fast.serve.naive`) the benchmark starts ``python -m gpt2fast
serve`` on a free loopback port (a process of its own, so the load generator does not share its GIL), waits
for ``/health``, warms it up, then for each concurrency level sends ``requests`` streamed completions with at
most ``concurrency`` in flight.  Every request has the same shape (``prompt_tokens`` random token ids, seeded;
``max_tokens`` new tokens, greedy, ``ignore_eos``), so both engines do the same work.  A level stops launching
requests after ``duration_s`` and abandons what is still running ``grace_s`` later (counted as failed): the
run is bounded in count and time and stops by itself.  Then the server gets SIGTERM.

Per level: throughput (completion tokens over the level's wall time), time to first token and inter-token
latency (the gaps between a request's streamed chunks) at p50 and p99, time per output token, requests
completed and failed.  The document's ``ratio`` holds gpt2fast's throughput over the baseline's per level.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ENGINES = ("gpt2fast", "naive")
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Options:
    """One ``bench serve`` run."""

    size: str = "tiny"
    engines: tuple[str, ...] = ENGINES
    concurrency: tuple[int, ...] = (1, 4, 16)
    requests: int | None = None  # per level; default max(8, 2 * concurrency)
    prompt_tokens: int = 32
    max_tokens: int = 32
    max_batch: int = 16
    duration_s: float = 120.0
    grace_s: float = 30.0
    device: str = "cpu"
    dtype: str | None = None
    threads: int | None = 1  # torch threads of each server (on a shared CPU, 1 avoids OpenMP spinning)
    seed: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad option."""
        from gpt2fast.config import GPT2Config

        GPT2Config.from_name(self.size)
        bad = [e for e in self.engines if e not in ENGINES]
        if bad or not self.engines:
            raise ValueError(f"--engines: unknown {bad}; choose from {ENGINES}")
        for name in ("prompt_tokens", "max_tokens", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"--concurrency must be positive integers, got {self.concurrency}")
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"--requests must be >= 1, got {self.requests}")
        if self.duration_s <= 0 or self.grace_s < 0:
            raise ValueError("--duration-s must be > 0 and --grace-s >= 0")

    def requests_at(self, concurrency: int) -> int:
        """Requests sent at ``concurrency``."""
        return self.requests if self.requests is not None else max(8, 2 * concurrency)


@dataclass
class Result:
    """One request as the client saw it (times in seconds from its send)."""

    ok: bool
    tokens: int = 0
    ttft: float | None = None
    gaps: tuple[float, ...] = ()
    total: float | None = None
    error: str | None = None


async def one_request(client, url: str, model: str, prompt: list[int], max_tokens: int) -> Result:
    """Send one streamed completion and time its chunks."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    arrivals, tokens = [], 0
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return Result(False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    arrivals.append(time.perf_counter() - t0)
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except Exception as exc:  # a failed request is counted, not fatal
        return Result(False, error=f"{type(exc).__name__}: {exc}")
    if not arrivals or tokens != max_tokens:
        return Result(False, tokens, error=f"got {tokens} of {max_tokens} tokens")
    gaps = tuple(b - a for a, b in itertools.pairwise(arrivals))
    return Result(True, tokens, arrivals[0], gaps, time.perf_counter() - t0)


async def run_level(url: str, model: str, concurrency: int, n_requests: int, prompt_tokens: int, max_tokens: int,
                    vocab: int, duration_s: float, grace_s: float, seed: int = 0) -> dict:  # fmt: skip
    """``n_requests`` at ``concurrency`` against the server at ``url``; returns the level's figures."""
    import httpx

    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(prompt_tokens)] for _ in range(n_requests)]
    limit = asyncio.Semaphore(concurrency)
    t0 = time.perf_counter()
    stop_launching = t0 + duration_s
    timeout = httpx.Timeout(duration_s + grace_s)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=concurrency + 4)) as client:

        async def bounded(prompt: list[int]) -> Result:
            async with limit:
                if time.perf_counter() > stop_launching:
                    return Result(False, error="not sent: the level's time ran out")
                return await one_request(client, url, model, prompt, max_tokens)

        tasks = [asyncio.ensure_future(bounded(p)) for p in prompts]
        done, pending = await asyncio.wait(tasks, timeout=duration_s + grace_s)
        for t in pending:
            t.cancel()
        results = [t.result() for t in done] + [Result(False, error="abandoned at the deadline")] * len(pending)
    wall = time.perf_counter() - t0
    return summarize(results, wall, concurrency)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(results: list[Result], wall: float, concurrency: int) -> dict:
    """The figures of one level from its requests."""
    ok = [r for r in results if r.ok]
    ms = lambda v: None if v is None else round(1e3 * v, 3)
    ttft = [r.ttft for r in ok]
    gaps = [g for r in ok for g in r.gaps]
    tpot = [(r.total - r.ttft) / (r.tokens - 1) for r in ok if r.tokens > 1]
    tokens = sum(r.tokens for r in ok)
    errors = sorted({r.error for r in results if r.error})
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": round(wall, 3),
        "tokens": tokens,
        "throughput_tokens_per_s": round(tokens / wall, 3) if wall > 0 else None,
        "ttft_ms": {"p50": ms(_pct(ttft, 0.5)), "p99": ms(_pct(ttft, 0.99))},
        "itl_ms": {"p50": ms(_pct(gaps, 0.5)), "p99": ms(_pct(gaps, 0.99))},
        "tpot_ms_mean": ms(sum(tpot) / len(tpot)) if tpot else None,
        "errors": errors[:5],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(opts: Options, engine: str, port: int) -> list[str]:
    """The ``gpt2fast serve`` command line of one engine."""
    cmd = [sys.executable, "-m", "gpt2fast", "serve", "--random", opts.size, "--init-seed", str(opts.seed),
           "--port", str(port), "--engine", engine, "--max-batch", str(opts.max_batch), "--max-queue", "4096",
           "--max-len", str(opts.prompt_tokens + opts.max_tokens), "--device", opts.device]  # fmt: skip
    cmd += ["--dtype", opts.dtype] if opts.dtype else []
    return cmd + (["--threads", str(opts.threads)] if opts.threads else [])


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server was not healthy after {timeout:g} s")


def bench_engine(opts: Options, engine: str, log=print) -> list[dict]:
    """Start ``engine``'s server, run every level, stop it; one record per level."""
    from gpt2fast.config import GPT2Config

    vocab = GPT2Config.from_name(opts.size).vocab_size
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(server_command(opts, engine, port), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    records = []
    try:
        _wait_healthy(url, proc, timeout=300)
        asyncio.run(run_level(url, opts.size, 2, 2, opts.prompt_tokens, opts.max_tokens, vocab, 120, 30, seed=99))
        for c in opts.concurrency:
            n = opts.requests_at(c)
            log(f"bench serve: {engine} at concurrency {c} ({n} requests)")
            level = asyncio.run(run_level(url, opts.size, c, n, opts.prompt_tokens, opts.max_tokens, vocab,
                                          opts.duration_s, opts.grace_s, seed=opts.seed + c))  # fmt: skip
            records.append({"engine": engine, "error": None, **level})
            log(f"  {level['throughput_tokens_per_s']} tok/s, TTFT p50 {level['ttft_ms']['p50']} ms, ITL p50 "
                f"{level['itl_ms']['p50']} ms, {level['completed']}/{level['requests']} completed")  # fmt: skip
    except Exception as exc:
        records.append({"engine": engine, "error": f"{type(exc).__name__}: {exc}", "concurrency": None})
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return records


def run(opts: Options, log=print) -> dict:
    """The whole benchmark: a results document (``kind`` "serve") with a record per engine and level."""
    import torch

    from gpt2fast.bench import results

    opts.validate()
    doc = results.new_document("serve", results.run_metadata(torch.device(opts.device)), None)
    doc["options"] = asdict(opts)
    doc["meta"]["load_average_start"] = os.getloadavg()  # a shared CPU's other work shows here
    doc["command"] = " ".join(["gpt2fast", "bench", "serve", *sys.argv[3:]]) if sys.argv[1:3] == ["bench", "serve"] \
        else None  # fmt: skip
    for engine in opts.engines:
        doc["records"].extend(bench_engine(opts, engine, log))
    doc["meta"]["load_average_end"] = os.getloadavg()
    doc["ratio"] = ratios(doc["records"])
    return doc


def ratios(records: list[dict]) -> dict[str, float]:
    """gpt2fast's throughput over the naive baseline's, per concurrency level both ran."""
    by = {(r["engine"], r["concurrency"]): r.get("throughput_tokens_per_s") for r in records if r["error"] is None}
    out = {}
    for (engine, c), fast in by.items():
        base = by.get(("naive", c))
        if engine == "gpt2fast" and fast and base:
            out[str(c)] = round(fast / base, 3)
    return out


# ---- the command line (wired into ``gpt2fast bench`` by gpt2fast.cli.bench) -----------------------------------
def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def add_parser(sub) -> None:
    """Add ``serve`` to the ``gpt2fast bench`` subparsers."""
    p = sub.add_parser("serve", help="load test: gpt2fast serve vs one transformers generate per request")
    p.add_argument("--size", default="tiny", help="random model size: tiny (default), gpt2, ...")
    p.add_argument("--engines", type=lambda t: tuple(v for v in t.split(",") if v), default=ENGINES,
                   help="gpt2fast,naive (default both)")  # fmt: skip
    p.add_argument("--concurrency", type=_ints, default=(1, 4, 16), help="levels, e.g. 1,4,16 (default)")
    p.add_argument("--requests", type=int, default=None, help="requests per level (default max(8, 2 x level))")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16, help="gpt2fast's cache slots")
    p.add_argument("--duration-s", type=float, default=120.0, help="per level: stop sending after this")
    p.add_argument("--grace-s", type=float, default=30.0, help="per level: abandon requests this much later")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"))
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server (default 1; 0: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the results document here")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    """Handler of ``bench serve``: exit 0 when every engine ran every level, 1 otherwise."""
    from gpt2fast.bench import results

    opts = Options(size=args.size, engines=args.engines, concurrency=args.concurrency, requests=args.requests,
                   prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, max_batch=args.max_batch,
                   duration_s=args.duration_s, grace_s=args.grace_s, device=args.device, dtype=args.dtype,
                   threads=args.threads or None, seed=args.seed)  # fmt: skip
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    doc = run(opts, log)
    if args.json:
        results.write_json(doc, args.json)
    for r in doc["records"]:
        if r["error"] is None:
            print(f"{r['engine']:>9} c={r['concurrency']:<3} {r['throughput_tokens_per_s']:>9.1f} tok/s  "
                  f"TTFT p50/p99 {r['ttft_ms']['p50']}/{r['ttft_ms']['p99']} ms  "
                  f"ITL p50/p99 {r['itl_ms']['p50']}/{r['itl_ms']['p99']} ms  "
                  f"{r['completed']}/{r['requests']} ok")  # fmt: skip
        else:
            print(f"{r['engine']:>9} FAILED: {r['error']}")
    print(f"throughput ratio gpt2fast / naive per concurrency: {doc['ratio']}")
    ok = all(r["error"] is None and r["failed"] == 0 for r in doc["records"])
    return 0 if ok else 1
