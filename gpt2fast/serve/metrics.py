"""The server's Prometheus metrics (prometheus-client), fed by the engine's thread and read at ``GET /metrics``.

Gauges read the engine when scraped (queue depth, running slots, slot count, generated tokens per second over
the last :data:`RATE_WINDOW_S` seconds); counters and histograms are updated as tokens are delivered:
time to first token (from the request's arrival), inter-token latency (the gap between two deliveries of a
request, spread over the tokens delivered), request latency, and requests by finish reason.  Each server has
a registry of its own, so several servers can live in one process (tests).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from gpt2fast.serve.engine import EngineLike, Request

#: Seconds of deliveries the tokens-per-second gauge averages over.
RATE_WINDOW_S = 10.0
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    """The metrics of one server over ``engine`` (implements the engine's ``Metrics`` protocol)."""

    def __init__(self, engine: EngineLike | None = None, prefix: str = "gpt2fast") -> None:
        self.registry = CollectorRegistry()
        self._engine = engine
        self._window: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        r, p = self.registry, prefix
        Gauge(f"{p}_queue_depth", "requests waiting for a slot", registry=r).set_function(
            lambda: self._engine.num_waiting if self._engine else 0
        )
        Gauge(f"{p}_running", "requests holding a slot (prefilling or decoding)", registry=r).set_function(
            lambda: self._engine.num_running if self._engine else 0
        )
        Gauge(f"{p}_slots", "cache slots of the engine", registry=r).set_function(
            lambda: getattr(self._engine, "max_batch", 1) if self._engine else 0
        )
        Gauge(f"{p}_tokens_per_second", f"generated tokens/s over the last {RATE_WINDOW_S:g} s",
              registry=r).set_function(self.tokens_per_second)  # fmt: skip
        self.generated = Counter(f"{p}_generated_tokens", "tokens generated", registry=r)
        self.prompt_tokens = Counter(f"{p}_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.requests = Counter(f"{p}_requests", "finished requests by finish reason", ["finish_reason"], registry=r)
        self.rejected = Counter(f"{p}_rejected_requests", "requests refused before queueing", ["reason"], registry=r)
        self.ttft = Histogram(f"{p}_time_to_first_token_seconds", "arrival to first token", registry=r,
                              buckets=_LATENCY_BUCKETS)  # fmt: skip
        self.itl = Histogram(f"{p}_inter_token_latency_seconds", "gap between a request's tokens", registry=r,
                             buckets=_LATENCY_BUCKETS)  # fmt: skip
        self.latency = Histogram(f"{p}_request_latency_seconds", "arrival to the end of a request", registry=r,
                                 buckets=_LATENCY_BUCKETS)  # fmt: skip

    def bind(self, engine: EngineLike) -> None:
        """Read the gauges from ``engine`` (the engine is built with these metrics, then bound)."""
        self._engine = engine

    def on_tokens(self, request: Request, n: int, now: float) -> None:
        """Count ``n`` tokens of ``request`` delivered at ``now``; observe TTFT or the inter-token gaps."""
        self.generated.inc(n)
        with self._lock:
            self._window.append((now, n))
        if request.first_token_at is None:
            self.ttft.observe(now - request.arrival)
            for _ in range(n - 1):
                self.itl.observe(0.0)
        else:
            gap = (now - request.last_token_at) / n
            for _ in range(n):
                self.itl.observe(gap)

    def on_finish(self, request: Request) -> None:
        """Count a finished request."""
        self.requests.labels(request.finish_reason).inc()
        self.prompt_tokens.inc(len(request.prompt))
        self.latency.observe(time.perf_counter() - request.arrival)

    def tokens_per_second(self) -> float:
        """Tokens delivered per second over the last :data:`RATE_WINDOW_S` seconds."""
        now = time.perf_counter()
        with self._lock:
            while self._window and self._window[0][0] < now - RATE_WINDOW_S:
                self._window.popleft()
            total = sum(n for _, n in self._window)
        return total / RATE_WINDOW_S

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


def parse_metrics(text: str) -> dict[str, float]:
    """``name{labels} value`` lines of a Prometheus text exposition as a dict (comments skipped)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
