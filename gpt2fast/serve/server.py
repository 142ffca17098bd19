"""The OpenAI-compatible HTTP server: FastAPI on uvicorn over an engine running on a thread of its own.

Endpoints: ``POST /v1/completions`` (OpenAI's completions API, streamed as server-sent events when
``stream`` is true, ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /health`` and ``GET /metrics``
(Prometheus text).  The engine's steps run on an :class:`~gpt2fast.serve.engine.EngineThread`; the event
loop only checks requests, tokenizes, queues them and turns delivered tokens into JSON.

* Bad input: a 400 with OpenAI's error JSON whose message and ``param`` name the field (see
  :mod:`gpt2fast.serve.protocol`); a full queue: a 429 at once (``Retry-After: 1``), never a wait.
* A client that disconnects (mid-stream, or while waiting for a whole response) cancels its requests,
  which frees their slots at the next engine step.
* Shutdown (uvicorn's, on SIGINT/SIGTERM): uvicorn stops accepting connections and lets the open ones finish;
  then the app's lifespan drains the engine (``drain_timeout`` seconds) and stops its thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from gpt2fast.serve import protocol
from gpt2fast.serve.engine import EngineLike, EngineThread, QueueFull, RequestError, TokenEvent
from gpt2fast.serve.metrics import CONTENT_TYPE, ServerMetrics
from gpt2fast.serve.protocol import APIError, ChoiceText, CompletionRequest

if TYPE_CHECKING:
    from gpt2fast.tokenizer import Tokenizer


def create_app(
    engine: EngineLike,
    tokenizer: Tokenizer,
    model_name: str,
    drain_timeout: float = 30.0,
    eos_token_id: int | None = None,
) -> FastAPI:
    """The FastAPI app serving ``engine`` as ``model_name``; the engine thread starts with the app's lifespan.

    ``eos_token_id`` (default the tokenizer's) ends a request unless it asks ``ignore_eos``.  The app's
    ``state`` holds ``runner`` (the :class:`EngineThread`), ``metrics`` (:class:`ServerMetrics`) and ``engine``.
    """
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    metrics = ServerMetrics(engine)
    engine.metrics = metrics
    runner = EngineThread(engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not runner.alive:
            runner.start()
        yield
        await asyncio.to_thread(runner.shutdown, drain_timeout)

    app = FastAPI(title="gpt2fast", lifespan=lifespan)
    app.state.runner, app.state.metrics, app.state.engine = runner, metrics, engine
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), None, kind).body(), status_code=exc.status_code)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = runner.alive and runner.accepting
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "gpt2fast",
                "max_model_len": engine.max_context}  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON", "body") from None
        try:
            creq = protocol.parse_completion(body, tokenizer, model_name, eos)
        except APIError:
            metrics.rejected.labels("bad_request").inc()
            raise
        return await _serve(creq, request, runner, metrics, tokenizer)

    return app


class _Call:
    """One completions call: its engine requests (one per choice) and the events they deliver."""

    def __init__(self, creq: CompletionRequest, runner: EngineThread, tokenizer: Tokenizer) -> None:
        self.creq, self.runner = creq, runner
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[int, TokenEvent]] = asyncio.Queue()
        items = []
        for ids in creq.prompts:
            for j in range(creq.n):
                index = len(items)
                seed = None if creq.params.seed is None else creq.params.seed + j
                callback = lambda r, e, i=index: loop.call_soon_threadsafe(self.events.put_nowait, (i, e))
                items.append((ids, replace(creq.params, seed=seed), callback))
        self.reqs = runner.submit(items)
        self.texts = [ChoiceText(tokenizer, creq.stop) for _ in items]
        self.counts = [0] * len(items)
        self.pending = set(range(len(items)))
        self.disconnected = False

    def apply(self, index: int, event: TokenEvent) -> str | None:
        """Fold one event into its choice; returns the text to send (None: the choice had already ended)."""
        if index not in self.pending:
            return None
        text = self.texts[index]
        self.counts[index] += len(event.tokens)
        piece = text.feed(event.tokens, event.finish_reason)
        if text.finish_reason is not None:
            self.pending.discard(index)
            if event.finish_reason is None:  # a stop string ended it: the engine request still runs
                self.runner.cancel(self.reqs[index])
        return piece

    def usage(self) -> dict:
        return protocol.usage(sum(len(p) for p in self.creq.prompts), sum(self.counts))

    def cancel(self) -> None:
        """Cancel every engine request that is still running."""
        for r in self.reqs:
            self.runner.cancel(r)


async def _serve(creq: CompletionRequest, request: Request, runner: EngineThread, metrics: ServerMetrics,
                 tokenizer: Tokenizer) -> Response:  # fmt: skip
    try:
        call = _Call(creq, runner, tokenizer)
    except RequestError as exc:
        metrics.rejected.labels("bad_request").inc()
        raise protocol.request_error(exc) from None
    except QueueFull as exc:
        metrics.rejected.labels("queue_full").inc()
        raise APIError(429, str(exc), None, "rate_limit_error", "queue_full") from None
    cid, created = protocol.completion_id(), int(time.time())
    if creq.stream:
        return StreamingResponse(_stream(call, cid, created), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
    watcher = asyncio.ensure_future(_cancel_on_disconnect(request, call))
    try:
        while call.pending:
            index, event = await call.events.get()
            call.apply(index, event)
    except BaseException:
        call.cancel()
        raise
    finally:
        watcher.cancel()
    if call.disconnected:
        return Response(status_code=499)  # nobody is listening
    if any(t.finish_reason == "error" for t in call.texts):
        raise APIError(500, "the engine failed while generating; see the server log", None, "server_error")
    choices = [protocol.choice(i, t.text, t.finish_reason) for i, t in enumerate(call.texts)]
    return JSONResponse(protocol.completion(cid, creq.model, choices, call.usage(), created))


async def _cancel_on_disconnect(request: Request, call: _Call) -> None:
    """Wait for the client to go away (its ``http.disconnect``), then cancel the call's requests."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            call.disconnected = True
            call.cancel()
            return


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def _stream(call: _Call, cid: str, created: int) -> AsyncIterator[str]:
    """The SSE chunks of a streamed call: one per delivered step of each choice, the usage chunk when asked,
    then ``[DONE]``.  Cancelled (the client left) or not, every unfinished engine request is cancelled at the end."""
    model = call.creq.model
    try:
        while call.pending:
            index, event = await call.events.get()
            piece = call.apply(index, event)
            if piece is None:
                continue
            choice = protocol.choice(index, piece, call.texts[index].finish_reason)
            yield _sse(protocol.completion(cid, model, [choice], None, created))
        if call.creq.include_usage:
            yield _sse(protocol.completion(cid, model, [], call.usage(), created))
        yield _sse("[DONE]")
    finally:
        call.cancel()


# ---- running it ------------------------------------------------------------------------------------------------
class BackgroundServer:
    """uvicorn serving ``app`` on a thread, on ``host:port`` (port 0: a free one); for tests and benchmarks.

    ``with BackgroundServer(app) as srv: ... srv.url ...``; leaving the block shuts uvicorn down gracefully
    (open requests finish, then the app's lifespan drains the engine).
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        """``http://host:port``."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        """Start serving; returns once uvicorn is up."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Shut down gracefully and wait for the thread."""
        self.server.should_exit = True
        self._thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
