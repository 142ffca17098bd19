"""``gpt2fast serve`` as a Ray Serve deployment: replicas of the engine + its OpenAI app, routed by Ray's proxy.

Needs the ``ray`` extra (``pip install 'gpt2fast[ray]'``).  Each replica loads the model (``random=SIZE`` or
``model=DIR``), builds an :class:`~gpt2fast.serve.engine.Engine` with its own KV-cache slot pool and engine
thread, and serves the very same FastAPI app as ``gpt2fast serve`` (the ingress is built on the replica, through
``__serve_build_asgi_app__``).  Ray Serve spreads requests over the replicas; each replica batches what it gets.

Python::

    from ray import serve
    from gpt2fast.serve.ray_deployment import deployment

    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(deployment(num_replicas=2).bind(random="gpt2", max_batch=16), route_prefix="/")

Command line (Ray's own): ``serve run gpt2fast.serve.ray_deployment:app random=gpt2 num_replicas=2``.  On GPUs,
``deployment(num_replicas=N, ray_actor_options={"num_gpus": 1})`` gives every replica a GPU of its own.
"""

from __future__ import annotations

from typing import Any

from ray import serve


class GPT2FastReplica:
    """One replica: the model, the engine and its app.  Arguments: ``random`` (a size) or ``model`` (a checkpoint
    directory), ``model_name`` (default: the size or the directory), ``init_seed``, ``device``, ``dtype``
    ("fp32", "fp16", "bf16"), ``backend``, and the engine's ``max_batch``, ``max_queue``, ``max_len``,
    ``prefill_chunk``."""

    def __init__(self, random: str | None = None, model: str | None = None, model_name: str | None = None,
                 init_seed: int = 0, device: str | None = None, dtype: str | None = None, backend: str | None = None,
                 max_batch: int = 16, max_queue: int = 256, max_len: int | None = None,
                 prefill_chunk: int = 256) -> None:  # fmt: skip
        import torch

        from gpt2fast import GPT2
        from gpt2fast.parity import DTYPES
        from gpt2fast.serve.engine import Engine
        from gpt2fast.tokenizer import Tokenizer

        if (random is None) == (model is None):
            raise ValueError("give exactly one of random=SIZE or model=DIR")
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dt = DTYPES[dtype] if dtype else (torch.float16 if dev.type == "cuda" else torch.float32)
        if model is not None:
            net = GPT2.from_pretrained(model, dtype=dt, device=dev, backend=backend, quiet=True)
        else:
            net = GPT2.random(random, seed=init_seed, dtype=dt, device=dev, backend=backend)
        self.engine = Engine(net, max_batch=max_batch, max_queue=max_queue, max_len=max_len,
                             prefill_chunk=prefill_chunk)  # fmt: skip
        self.tokenizer = Tokenizer.from_pretrained(model) if model and _has_tokenizer(model) else Tokenizer.default()
        self.model_name = model_name or model or random

    def __serve_build_asgi_app__(self):
        """The replica's FastAPI app (Ray runs its lifespan: the engine thread starts, and drains at shutdown)."""
        from gpt2fast.serve.server import create_app

        return create_app(self.engine, self.tokenizer, self.model_name)


def _has_tokenizer(directory: str) -> bool:
    from pathlib import Path

    d = Path(directory)
    return (d / "tokenizer.json").is_file() or (d / "vocab.json").is_file()


def deployment(num_replicas: int = 1, **options: Any) -> serve.Deployment:
    """The Ray Serve deployment of :class:`GPT2FastReplica` with ``num_replicas`` and other
    ``serve.deployment`` options (``ray_actor_options``, ``max_ongoing_requests``, ...); ``.bind(**replica args)``."""
    options.setdefault("max_ongoing_requests", 1024)  # the engine queues and batches; Ray need not hold back
    return serve.deployment(serve.ingress()(GPT2FastReplica), name="gpt2fast", num_replicas=num_replicas, **options)


def app(args: dict[str, str]) -> serve.Application:
    """The application builder of ``serve run gpt2fast.serve.ray_deployment:app key=value ...``: ``num_replicas``
    goes to the deployment, every other key to :class:`GPT2FastReplica` (numbers parsed)."""
    args = dict(args)
    replicas = int(args.pop("num_replicas", 1))
    ints = {"init_seed", "max_batch", "max_queue", "max_len", "prefill_chunk"}
    kwargs = {k: int(v) if k in ints else v for k, v in args.items()}
    return deployment(num_replicas=replicas).bind(**kwargs)
