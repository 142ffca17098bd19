"""``gpt2fast serve``: continuous batching on the static KV cache behind an OpenAI-compatible HTTP server.

* :mod:`gpt2fast.serve.engine`: the library API: :class:`Engine` (a slot pool on the KV cache, chunked
  prefill, one ragged decode step for every running request, per-slot sampling on the device, CUDA-graph
  decode per batch bucket) and :class:`EngineThread` (the engine on a thread of its own);
  :mod:`gpt2fast.serve.slots`: the per-slot device state and per-row sampling;
* :mod:`gpt2fast.serve.server`: the FastAPI app (``/v1/completions``, ``/v1/models``, ``/health``,
  ``/metrics``); :mod:`gpt2fast.serve.protocol`: OpenAI's request checks and JSON; :mod:`gpt2fast.serve.metrics`:
  its Prometheus metrics;
* :mod:`gpt2fast.serve.naive`: the baseline of ``gpt2fast bench serve``, one transformers ``generate`` per request;
* :mod:`gpt2fast.serve.ray_deployment`: the engine and its app as a Ray Serve deployment (optional).

The server's modules need the ``serve`` extra (fastapi, uvicorn, prometheus-client); the engine needs only torch.
"""

from gpt2fast.serve.engine import (
    Engine,
    EngineThread,
    QueueFull,
    Request,
    RequestError,
    SamplingParams,
    TokenEvent,
)

__all__ = ["Engine", "EngineThread", "QueueFull", "Request", "RequestError", "SamplingParams", "TokenEvent"]
