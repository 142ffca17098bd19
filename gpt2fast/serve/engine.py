"""Continuous batching on the static KV cache: a fixed pool of cache slots, one ragged decode step for all.

The model's KV cache ``[layers, slots, heads, max_len, head_dim]`` is a pool of ``max_batch`` slots, one
request each.  Every :meth:`Engine.step`:

1. applies cancellations (their slots are free at once) and admits waiting requests into free slots
   (lowest slot first, so the busy slots stay packed at the front of the pool);
2. prefills: up to ``prefill_chunk`` prompt tokens in all, a chunk of one prompt at a time
   (:meth:`GPT2.prefill_chunk` into that slot's rows), so a long prompt enters over several steps while the
   running requests keep decoding; a prompt's last chunk picks its first token;
3. runs one decode step over the slots ``[0, bucket)``, where ``bucket`` is the smallest batch-size bucket
   covering every decoding slot: the decode kernels take per-sequence ``cache_seqlens``, so requests of any
   lengths share the step; rows that are not decoding are masked (their lengths restored on the device);
4. reads the new tokens back (one host sync per step: tokens, done and live flags of every row together),
   hands them to each request's callback and frees finished slots at once.

Per-slot sampling parameters (temperature, top-k, top-p, repetition penalty, seed, max tokens, stop ids) live
on the device in a :class:`~gpt2fast.serve.slots.SlotTable`, so one step serves requests with different
settings.  On CUDA the decode step of each bucket is captured once in a CUDA graph
(:class:`gpt2fast.cuda_graph.GraphStep`) and replayed.  A greedy request (temperature 0) gets the tokens an
offline ``model.generate`` of its prompt gives, whatever else shares the batch.

The engine itself is single-threaded (:meth:`step`); :meth:`add_requests` and :meth:`cancel` may be called
from other threads.  :class:`EngineThread` runs the steps on a thread of their own (the HTTP server's event
loop never runs model code).  The engine owns the model's ``cache`` while it exists.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from gpt2fast.model import KVCache
from gpt2fast.serve import slots
from gpt2fast.serve.slots import FLOAT_COLUMNS, INT_COLUMNS, Features, SlotTable

if TYPE_CHECKING:
    from gpt2fast.model import GPT2

log = logging.getLogger("gpt2fast.serve")

#: Finish reasons: a stop id was generated, ``max_tokens`` were generated, the request was cancelled, or the
#: engine failed while running it.
FINISH_REASONS = ("stop", "length", "cancelled", "error")


class QueueFull(RuntimeError):
    """The engine's waiting queue is full: the request was not accepted (HTTP 429)."""


class RequestError(ValueError):
    """A request the engine cannot serve; ``param`` names the offending field (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        raise RequestError(f"{name} must be a finite number, got {value!r}", name)
    return float(value)


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {value!r}", name)
    return value


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded.  ``temperature=0`` is greedy; ``top_k=0``, ``top_p=1`` and
    ``repetition_penalty=1`` disable those processors; ``seed=None`` draws one; ``stop_token_ids`` end the
    request when generated (the stop token is its last output token)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def check(self, vocab_size: int, max_stop_ids: int) -> None:
        """Raise :class:`RequestError` naming the first bad field."""
        if _integer("max_tokens", self.max_tokens) < 1:
            raise RequestError(f"max_tokens must be >= 1, got {self.max_tokens}", "max_tokens")
        if _number("temperature", self.temperature) < 0:
            raise RequestError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}", "temperature")
        if _integer("top_k", self.top_k) < 0:
            raise RequestError(f"top_k must be >= 0 (0 disables it), got {self.top_k}", "top_k")
        if not 0 < _number("top_p", self.top_p) <= 1:
            raise RequestError(f"top_p must lie in (0, 1], got {self.top_p}", "top_p")
        if _number("repetition_penalty", self.repetition_penalty) <= 0:
            raise RequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}", "repetition_penalty")
        if self.seed is not None and not -(2**63) <= _integer("seed", self.seed) < 2**63:
            raise RequestError(f"seed must fit in 64 bits, got {self.seed}", "seed")
        if len(self.stop_token_ids) > max_stop_ids:
            raise RequestError(f"at most {max_stop_ids} stop token ids, got {len(self.stop_token_ids)}",
                               "stop_token_ids")  # fmt: skip
        for t in self.stop_token_ids:
            if not 0 <= _integer("stop_token_ids", t) < vocab_size:
                raise RequestError(f"stop_token_ids must be ids in [0, {vocab_size}), got {t}", "stop_token_ids")


@dataclass
class TokenEvent:
    """What a request's callback receives after a step: its new tokens and, on its last event, why it ended."""

    tokens: list[int]
    finish_reason: str | None = None


Callback = Callable[["Request", TokenEvent], None]
_ids = itertools.count()


class Request:
    """One generation request: the prompt ids, its :class:`SamplingParams`, and what it produced so far.

    ``callback(request, event)`` is called on the engine's thread after every step that gave the request
    tokens, and once more (possibly with no tokens) when it finishes.  Timestamps are ``time.perf_counter()``.
    """

    def __init__(self, prompt: list[int], params: SamplingParams, callback: Callback | None, seed: int) -> None:
        self.id = f"req-{next(_ids)}"
        self.prompt, self.params, self.callback, self.seed = prompt, params, callback, seed
        self.output: list[int] = []
        self.finish_reason: str | None = None
        self.arrival = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.done = threading.Event()
        # engine-side
        self.slot: int | None = None
        self.progress = 0  # prompt tokens in the cache
        self.ids: torch.Tensor | None = None  # the prompt on the device [1, P]

    @property
    def finished(self) -> bool:
        """Whether the request has ended (any finish reason)."""
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return f"Request({self.id}, prompt={len(self.prompt)} tokens, output={len(self.output)}, {self.finish_reason})"


class Metrics(Protocol):
    """What the engine reports to (see :class:`gpt2fast.serve.metrics.ServerMetrics`)."""

    def on_tokens(self, request: Request, n: int, now: float) -> None:
        """``n`` new tokens of ``request`` delivered at ``now``; called before ``request.first_token_at`` and
        ``last_token_at`` are updated (``first_token_at is None``: these are its first tokens)."""

    def on_finish(self, request: Request) -> None:
        """``request`` ended (its ``finish_reason`` is set)."""


class RequestQueue:
    """What every engine shares: request checks, the waiting queue (thread-safe), cancellation requests, and
    handing tokens to a request's callback and the metrics.  Subclasses implement :meth:`step`,
    :attr:`num_running` and :meth:`_release` (free what a request holds)."""

    def __init__(self, vocab_size: int, max_len: int, max_queue: int, max_stop_ids: int,
                 metrics: Metrics | None) -> None:  # fmt: skip
        from gpt2fast import checks

        checks.check_int("max_queue", max_queue, 0)
        checks.check_int("max_stop_ids", max_stop_ids, 1)
        self.vocab_size, self.max_len, self.max_queue, self.max_stop_ids = vocab_size, max_len, max_queue, max_stop_ids
        self.metrics = metrics
        self._lock = threading.Lock()
        self._waiting: deque[Request] = deque()
        self._cancels: list[Request] = []

    @property
    def max_context(self) -> int:
        """The most positions a request's prompt plus ``max_tokens`` may take."""
        return self.max_len

    @property
    def num_waiting(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        """Requests being served (prefilling or decoding)."""
        raise NotImplementedError

    def check_request(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """Raise :class:`RequestError` (naming ``prompt`` or a parameter) for a request this engine refuses."""
        if not isinstance(prompt, (list, tuple)) or len(prompt) == 0:
            raise RequestError("prompt must be a non-empty list of token ids", "prompt")
        for t in prompt:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise RequestError(f"prompt token ids must be integers in [0, {self.vocab_size}), got {t!r}", "prompt")
        params.check(self.vocab_size, self.max_stop_ids)
        if len(prompt) + params.max_tokens > self.max_len:
            raise RequestError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the context of "
                f"{self.max_len} tokens",
                "max_tokens",
            )

    def add_requests(self, items: Sequence[tuple[Sequence[int], SamplingParams, Callback | None]]) -> list[Request]:
        """Queue ``(prompt ids, params, callback)`` requests, all or none (thread-safe).  Raises
        :class:`RequestError` for a bad one and :class:`QueueFull` when they do not all fit in the queue."""
        for prompt, params, _ in items:
            self.check_request(prompt, params)
        reqs = [Request(list(p), s, cb, random.getrandbits(63) if s.seed is None else s.seed) for p, s, cb in items]
        with self._lock:
            if len(self._waiting) + len(reqs) > self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self._waiting.extend(reqs)
        return reqs

    def add_request(self, prompt: Sequence[int], params: SamplingParams | None = None,
                    callback: Callback | None = None) -> Request:  # fmt: skip
        """Queue one request (see :meth:`add_requests`)."""
        return self.add_requests([(prompt, params or SamplingParams(), callback)])[0]

    def cancel(self, request: Request) -> None:
        """Cancel ``request`` (thread-safe): it ends with finish reason "cancelled" at the next step, which frees
        what it holds; a finished request is left alone."""
        with self._lock:
            self._cancels.append(request)

    def has_work(self) -> bool:
        """Whether a step has anything to do (waiting, running or cancelled requests)."""
        return bool(self._waiting or self._cancels or self.num_running)

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Request]:
        """Run ``prompts`` to completion on the calling thread (no :class:`EngineThread` may be running)."""
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        reqs = self.add_requests([(p, s, None) for p, s in zip(prompts, params)])
        while not all(r.finished for r in reqs):
            self.step()
        return reqs

    def step(self) -> int:
        """Run one step; returns the number of tokens delivered."""
        raise NotImplementedError

    # ---- for subclasses (the engine's thread) --------------------------------------------------------------
    def _pop_waiting(self) -> Request | None:
        with self._lock:
            return self._waiting.popleft() if self._waiting else None

    def _apply_cancels(self) -> None:
        """End every request cancelled since the last step, freeing what it holds."""
        with self._lock:
            cancels, self._cancels = self._cancels, []
        for r in cancels:
            if r.finished:
                continue
            if r.slot is None:
                with self._lock:
                    try:
                        self._waiting.remove(r)
                    except ValueError:
                        continue  # not this engine's
            else:
                self._release(r)
            self._emit(r, [], "cancelled", time.perf_counter())

    def _release(self, r: Request) -> None:
        raise NotImplementedError

    def _emit(self, r: Request, tokens: list[int], reason: str | None, now: float) -> None:
        """Hand ``tokens`` (and the finish ``reason``, if it ended) to ``r``, its metrics and its callback."""
        if tokens:
            r.output.extend(tokens)
            if self.metrics is not None:  # before the timestamps move: it measures from them
                self.metrics.on_tokens(r, len(tokens), now)
            if r.first_token_at is None:
                r.first_token_at = now
            r.last_token_at = now
        if reason is not None:
            r.finish_reason = reason
            if self.metrics is not None:
                self.metrics.on_finish(r)
        if r.callback is not None and (tokens or reason is not None):
            try:
                r.callback(r, TokenEvent(tokens, reason))
            except Exception:  # a broken consumer must not stop the engine
                log.exception("callback of %s failed", r.id)
        if reason is not None:
            r.done.set()

    def _running(self) -> list[Request]:
        """The requests :meth:`fail_all` ends besides the waiting ones."""
        raise NotImplementedError

    def fail_all(self, message: str) -> None:
        """End every running and waiting request with finish reason "error" (after a failed step)."""
        now = time.perf_counter()
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for r in [*self._running(), *waiting]:
            if r.slot is not None:
                try:
                    self._release(r)
                except Exception:  # the device may be what failed
                    log.exception("releasing %s failed", r.id)
            log.error("%s failed: %s", r.id, message)
            self._emit(r, [], "error", now)


def buckets_for(max_batch: int) -> tuple[int, ...]:
    """The decode batch-size buckets: powers of two below ``max_batch``, then ``max_batch``."""
    out = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return (*out, max_batch)


class Engine(RequestQueue):
    """Continuous batching for a :class:`~gpt2fast.model.GPT2` (see the module docstring).

    ``max_batch``: cache slots (requests decoding at once); ``max_queue``: requests allowed to wait for a slot
    (beyond it :meth:`add_requests` raises :class:`QueueFull`); ``max_len``: positions per slot (default the
    model's context; a prompt plus its ``max_tokens`` must fit); ``prefill_chunk``: prompt tokens prefilled per
    step; ``max_stop_ids``: stop ids per request; ``use_cuda_graph``: capture each bucket's decode step (default:
    on for CUDA models); ``metrics``: see :class:`Metrics`.
    """

    def __init__(
        self,
        model: GPT2,
        max_batch: int = 16,
        max_queue: int = 256,
        max_len: int | None = None,
        prefill_chunk: int = 256,
        max_stop_ids: int = 8,
        use_cuda_graph: bool | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        from gpt2fast import checks

        n_pos = model.config.n_positions
        max_len = n_pos if max_len is None else max_len
        checks.check_int("max_batch", max_batch, 1)
        checks.check_int("max_len", max_len, 2, n_pos + 1)
        checks.check_int("prefill_chunk", prefill_chunk, 1)
        super().__init__(model.config.vocab_size, max_len, max_queue, max_stop_ids, metrics)
        self.device = model.wte.weight.device
        checks.check_use_cuda_graph(use_cuda_graph, self.device)
        self.model = model.eval()
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.use_cuda_graph = _graphs_wanted(self.device, use_cuda_graph)
        self.cache = model.setup_cache(max_batch, max_len)
        self.table = SlotTable(max_batch, max_len + 1, max_stop_ids, self.device)
        self.buckets = buckets_for(max_batch)
        self._slot_caches = [self._rows_cache(s, s + 1) for s in range(max_batch)]
        self._bucket_caches = {b: self._rows_cache(0, b) for b in self.buckets}
        self._bucket_tables = {b: self.table.rows(0, b) for b in self.buckets}
        self._graph_steps: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}
        self._free = list(range(max_batch))  # a heap: the lowest free slot first
        self._slots: list[Request | None] = [None] * max_batch
        self._prefilling: list[Request] = []  # admitted, prompt not fully in the cache (admission order)
        self._decoding: set[int] = set()  # slots whose request is generating
        self.steps = 0

    def _rows_cache(self, start: int, stop: int) -> KVCache:
        c = self.cache
        return KVCache(c.k[:, start:stop], c.v[:, start:stop], c.seqlens[start:stop])

    @property
    def num_running(self) -> int:
        """Slots holding a request (prefilling or decoding)."""
        return self.max_batch - len(self._free)

    def _running(self) -> list[Request]:
        return [r for r in self._slots if r is not None]

    # ---- one step (the engine's thread) --------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> int:
        """Run one engine step (see the module docstring); returns the number of tokens delivered."""
        self._apply_cancels()
        self._admit()
        packs: list[torch.Tensor] = []
        order: list[int] = []
        self._prefill(packs, order)
        self._decode(packs, order)
        self.steps += 1
        if not packs:
            return 0
        tokens, done, live = torch.cat(packs, dim=1).tolist()  # the step's one host read-back
        return self._deliver(order, tokens, done, live)

    def _admit(self) -> None:
        while self._free:
            r = self._pop_waiting()
            if r is None:
                return
            slot = heapq.heappop(self._free)
            p = r.params
            r.ids = torch.tensor([r.prompt], dtype=torch.long).to(self.device, non_blocking=True)
            values = dict(temperature=p.temperature, top_p=p.top_p, repetition_penalty=p.repetition_penalty,
                          top_k=p.top_k, seed=r.seed, max_tokens=p.max_tokens, generated=0)  # fmt: skip
            floats = torch.tensor([values[c] for c in FLOAT_COLUMNS], dtype=torch.float32)
            ints = torch.tensor([values[c] for c in INT_COLUMNS], dtype=torch.long)
            stop = torch.full((self.max_stop_ids,), -1, dtype=torch.long)
            stop[: len(p.stop_token_ids)] = torch.tensor(p.stop_token_ids, dtype=torch.long)
            self.table.load(slot, r.ids[0], floats, ints, stop)
            r.slot, r.progress = slot, 0
            self._slots[slot] = r
            self._prefilling.append(r)

    def _prefill(self, packs: list[torch.Tensor], order: list[int]) -> None:
        budget = self.prefill_chunk
        for r in list(self._prefilling):
            if budget <= 0:
                return
            n = min(len(r.prompt) - r.progress, budget)
            start, s = r.progress, r.slot
            logits = self.model.prefill_chunk(r.ids[:, start : start + n], self._slot_caches[s], start)
            r.progress += n
            budget -= n
            if r.progress == len(r.prompt):  # the prompt is in: pick the first token
                self.table.active[s] = True
                packs.append(slots.select(logits, self.table.rows(s, s + 1), _features([r])))
                order.append(s)
                self._prefilling.remove(r)
                self._decoding.add(s)

    def _decode(self, packs: list[torch.Tensor], order: list[int]) -> None:
        if not self._decoding:
            return
        b = next(b for b in self.buckets if b > max(self._decoding))
        cache = self._bucket_caches[b]
        # a host-side bound of the lengths (prompt + tokens so far), for decode_step's cache-room check
        cache.host_max = max(len(r.prompt) + len(r.output) for r in map(self._slots.__getitem__, self._decoding))
        self.model.cache = cache
        if self.use_cuda_graph:
            step = self._graph_steps.get(b)
            if step is None:
                step = self._graph_steps[b] = self._graph_step(b)
        else:
            step = self._eager_step(b, _features(self._slots[s] for s in self._decoding))
        packs.append(step(self.table.last[:b]))
        order.extend(range(b))

    def _eager_step(self, b: int, features: Features) -> Callable[[torch.Tensor], torch.Tensor]:
        """The decode step over slots ``[0, b)``: ``tokens [b]`` in, ``[3, b]`` (token, done, live) out."""
        cache, table, model = self._bucket_caches[b], self._bucket_tables[b], self.model

        def step(tokens: torch.Tensor) -> torch.Tensor:
            live = table.active & ~table.done
            logits = model.decode_step(tokens, check_ids=False)
            cache.seqlens -= (~live).int()  # rows that did not decode keep their length
            return slots.select(logits, table, features)

        return step

    def _graph_step(self, b: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """Bucket ``b``'s decode step captured in a CUDA graph (at its first call), every processor on."""
        from gpt2fast.cuda_graph import GraphStep

        def on_failure(exc: Exception) -> None:
            warnings.warn(f"CUDA-graph capture of the batch-{b} decode step failed ({exc!r}); decoding eagerly",
                          stacklevel=2)  # fmt: skip

        return GraphStep(self.model, self._bucket_tables[b], self._eager_step(b, slots.ALL), on_failure)

    def _deliver(self, order: list[int], tokens: list[int], done: list[int], live: list[int]) -> int:
        new: dict[Request, list[int]] = {}
        reasons: dict[Request, str] = {}
        for j, s in enumerate(order):
            if not live[j]:
                continue
            r = self._slots[s]
            new.setdefault(r, []).append(tokens[j])
            if done[j]:
                reasons[r] = "stop" if tokens[j] in r.params.stop_token_ids else "length"
        now = time.perf_counter()
        for r, toks in new.items():
            reason = reasons.get(r)
            if reason is not None:
                self._release(r)
            self._emit(r, toks, reason, now)
        return sum(map(len, new.values()))

    def _release(self, r: Request) -> None:
        s = r.slot
        self.table.active[s] = False
        self._slots[s] = None
        self._decoding.discard(s)
        if r in self._prefilling:
            self._prefilling.remove(r)
        heapq.heappush(self._free, s)
        r.slot, r.ids = None, None


def _graphs_wanted(device: torch.device, use_cuda_graph: bool | None) -> bool:
    """Whether the decode steps are captured: on CUDA unless ``use_cuda_graph`` is False."""
    return device.type == "cuda" and use_cuda_graph is not False


def _features(requests) -> Features:
    """The processors some of ``requests`` need (an eager step skips the others)."""
    penalty = sample = top_k = top_p = False
    for r in requests:
        p = r.params
        penalty |= p.repetition_penalty != 1.0
        if p.temperature > 0:
            sample, top_k, top_p = True, top_k or p.top_k > 0, top_p or p.top_p < 1.0
    return Features(penalty, sample, top_k, top_p)


class EngineLike(Protocol):
    """What :class:`EngineThread` and the server need of an engine (:class:`Engine`, or the naive baseline)."""

    max_queue: int
    vocab_size: int

    @property
    def max_context(self) -> int: ...
    @property
    def num_waiting(self) -> int: ...
    @property
    def num_running(self) -> int: ...
    def check_request(self, prompt: Sequence[int], params: SamplingParams) -> None: ...
    def add_requests(self, items: Sequence[tuple[Sequence[int], SamplingParams, Callback | None]]) -> list[Request]: ...
    def cancel(self, request: Request) -> None: ...
    def has_work(self) -> bool: ...
    def step(self) -> int: ...
    def fail_all(self, message: str) -> None: ...


class EngineThread:
    """Runs an engine's steps on a daemon thread of its own while it has work; other threads submit and cancel.

    :meth:`shutdown` stops taking requests, lets the running and waiting ones finish (up to ``timeout``),
    cancels what is left and joins the thread.  :meth:`paused` holds the steps (maintenance, tests).
    """

    def __init__(self, engine: EngineLike, name: str = "gpt2fast-engine") -> None:
        self.engine = engine
        self._cond = threading.Condition()
        self._stop = False
        self._paused = 0
        self.accepting = True
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> EngineThread:
        """Start the thread; returns self."""
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        """Whether the engine thread is running."""
        return self._thread.is_alive()

    def submit(self, items: Sequence[tuple[Sequence[int], SamplingParams, Callback | None]]) -> list[Request]:
        """:meth:`Engine.add_requests`, then wake the thread.  Raises :class:`QueueFull` after shutdown began."""
        if not self.accepting:
            raise QueueFull("the server is shutting down")
        reqs = self.engine.add_requests(items)
        self._wake()
        return reqs

    def cancel(self, request: Request) -> None:
        """:meth:`Engine.cancel`, then wake the thread."""
        if not request.finished:
            self.engine.cancel(request)
            self._wake()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the engine between steps while the block runs (requests still queue up)."""
        with self._cond:
            self._paused += 1
        try:
            yield
        finally:
            with self._cond:
                self._paused -= 1
                self._cond.notify_all()

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not self._stop and (self._paused or not engine.has_work()):
                    self._cond.wait(timeout=0.5)
                if self._stop:
                    return
            try:
                engine.step()
            except Exception as exc:  # keep serving: fail what was running, log it
                log.exception("engine step failed")
                engine.fail_all(f"{type(exc).__name__}: {exc}")

    def shutdown(self, timeout: float | None = 30.0) -> bool:
        """Stop accepting, drain (up to ``timeout`` seconds), cancel the rest, stop the thread.  Returns whether
        everything drained."""
        self.accepting = False
        deadline = None if timeout is None else time.monotonic() + timeout
        drained = True
        while self.engine.has_work() and self.alive:
            if deadline is not None and time.monotonic() > deadline:
                drained = False
                break
            time.sleep(0.01)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if self.engine.has_work():
            self.engine.fail_all("the server shut down before the request finished")
        return drained
