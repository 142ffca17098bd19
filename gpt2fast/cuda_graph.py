"""CUDA-graph decode: one captured graph replays a whole decode step (all layers, LM head, sampling).

:func:`make_graph_step` is the CUDA side of the seam in :func:`gpt2fast.generation.make_step`: it takes
the eager step ``step(tokens[B]) -> next_tokens[B]`` (``model.decode_step`` + ``DecodeState.select``)
and returns a step with the same contract that replays a CUDA graph of it instead.

How it works
------------
* Prefill runs eagerly, outside the graph.  The graph is captured lazily, at the first decode step.
* The step reads only device tensors: the token input buffer, the model's static KV cache and its int32
  ``seqlens`` (so positions and attention lengths advance on the device), and the decode state's
  tensors (token history, finished flags, step counter, pad/EOS ids).  Nothing syncs with the host per
  token: a call is a copy into the input buffer, one ``graph.replay()`` and a copy out of the output.
* Warm-up (Triton JIT, cuBLAS workspaces) runs on the capture stream, a side stream, before capture;
  everything it mutates (cache lengths, history, flags, RNG state) is restored afterwards, so the warm-up
  leaves no trace.  A state with ``reorders_cache = True`` (beam search, :mod:`gpt2fast.beam`, whose step
  moves cache rows with the ``reorder_cache`` op) also gets the cache's live prefixes restored.
* Sampling: the default CUDA generator is handled by ``torch.cuda.graph``; a user ``torch.Generator``
  is registered with the graph (``CUDAGraph.register_generator_state``), so each replay advances it
  exactly as the eager step would and seeded sampling gives the eager path's tokens.  On a torch
  without that API a user generator falls back to the eager step (with a warning).

Graph cache
-----------
Captured graphs are kept on the model (``model._gpt2fast_graphs``, at most :data:`MAX_GRAPHS`, least
recently used evicted) keyed by batch size, dtype, cache ``max_len``, the cache and weight storage, the
backend, the sampling config, the generator and the decode-state layout.  A later generate call with
the same key reuses the graph: its decode state's tensors are copied into the graph's buffers and the
state is re-pointed at them (``state.history``, ``state.done``, ... become the graph's tensors), which
is why callers must read the state through its attributes, never through saved references.  Replacing
the weights' tensors (``model.to(...)``) or the cache gives a new key, so a stale graph is never
replayed; in-place weight updates (``load_state_dict``) are seen by the graph.

If capture fails (an op in the step that cannot be captured), a warning is issued and that key runs the
eager step from then on.  Everything here needs CUDA: on other devices :func:`make_graph_step` raises.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from gpt2fast import checks, ops

if TYPE_CHECKING:
    from gpt2fast.model import GPT2

#: Graphs kept per model (each holds a private memory pool for the step's intermediates).
MAX_GRAPHS = 8
#: Eager runs of the step on a side stream before capture.
WARMUP_STEPS = 2

_CACHE_ATTR = "_gpt2fast_graphs"
_FAILED = "capture-failed"  # cache value for a key whose capture failed

Step = Callable[[torch.Tensor], torch.Tensor]


# ---- the decode state's device tensors --------------------------------------------------------------------


def state_tensors(state: object) -> dict[str, torch.Tensor]:
    """Every tensor the decode state holds, by dotted attribute path (one level of nesting, e.g.
    ``history.tokens``).  These are what a captured step reads and writes besides the model."""
    found: dict[str, torch.Tensor] = {}
    for name, value in vars(state).items():
        if isinstance(value, torch.Tensor):
            found[name] = value
        elif hasattr(value, "__dict__") and not isinstance(value, (torch.Generator, type)):
            for sub, t in vars(value).items():
                if isinstance(t, torch.Tensor):
                    found[f"{name}.{sub}"] = t
    return found


def _layout(state: object) -> tuple:
    """The shapes/dtypes of the state's tensors and its non-tensor settings, as a hashable key part."""
    tensors = tuple((k, tuple(t.shape), t.dtype) for k, t in sorted(state_tensors(state).items()))
    cfg = getattr(state, "cfg", None)
    gen = getattr(state, "generator", None)
    return tensors, cfg if isinstance(cfg, Hashable) else id(cfg), None if gen is None else id(gen)


def adopt_state(state: object, owner: object) -> None:
    """Make ``state`` use ``owner``'s tensors: copy ``state``'s values into them, then re-point ``state``.

    Nested holders (``state.history``) are re-pointed as a whole.  ``state`` and ``owner`` must have the
    same layout (see :func:`_layout`).
    """
    for name, dst in state_tensors(owner).items():
        dst.copy_(_get(state, name))
    for name, value in vars(owner).items():
        if isinstance(value, torch.Tensor) or any(k.startswith(f"{name}.") for k in state_tensors(owner)):
            setattr(state, name, value)


def _get(obj: object, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


class _Snapshot:
    """Values of the model cache's lengths, the state's tensors and the RNG, to undo a warm-up."""

    def __init__(self, model: GPT2, state: object) -> None:
        self.cache = model.cache
        self.host_max = model.cache.host_max
        self.targets = [model.cache.seqlens, *state_tensors(state).values()]
        if getattr(state, "reorders_cache", False):
            # a beam-search step copies live prefixes between cache rows: keep every position a warm-up step can
            # touch (the prefixes and the slot each step appends), not the whole cache
            end = min(model.cache.max_len, model.cache.host_max + WARMUP_STEPS)
            self.targets += [model.cache.k[..., :end, :], model.cache.v[..., :end, :]]
        self.values = [t.clone() for t in self.targets]
        self.generator = getattr(state, "generator", None)
        self.device = model.cache.seqlens.device
        self.rng = self._get_rng()

    def _get_rng(self) -> torch.Tensor:
        if self.generator is not None:
            return self.generator.get_state()
        if self.device.type == "cuda":
            return torch.cuda.get_rng_state(self.device)
        return torch.get_rng_state()

    def restore_tensors(self) -> None:
        """Put back the cache lengths (device and host bound) and the decode state's tensors."""
        self.cache.host_max = self.host_max
        for t, v in zip(self.targets, self.values):
            t.copy_(v)

    def restore(self) -> None:
        """Put back the tensors and the RNG state."""
        self.restore_tensors()
        if self.generator is not None:
            self.generator.set_state(self.rng)
        elif self.device.type == "cuda":
            torch.cuda.set_rng_state(self.rng, self.device)
        else:
            torch.set_rng_state(self.rng)


@contextmanager
def _side_stream(device: torch.device) -> Iterator[None]:
    """Run the body on the device's capture stream (a side stream: cuBLAS sets up its per-stream workspace
    there during the warm-up, outside any graph), ordered after (and before) the current one; a no-op off CUDA."""
    if device.type != "cuda":
        yield
        return
    main = torch.cuda.current_stream(device)
    side = _capture_stream(device)
    side.wait_stream(main)
    try:
        with torch.cuda.stream(side):
            yield
    finally:
        main.wait_stream(side)


def _capture(fn: Callable[[], torch.Tensor], generator: torch.Generator | None, device: torch.device):
    """Capture ``fn`` into a CUDA graph; returns ``(graph, output)``.  Nothing runs: replay runs it.

    A user ``generator`` is registered with the graph so each replay advances it like an eager run;
    the default CUDA generator (of ``device``) is registered by ``torch.cuda.graph`` itself.

    The capture stream is one per device (:func:`_capture_stream`): ``torch.cuda.graph``'s default capture
    stream is one per process, created on whichever device was current at its first use, and capturing a
    model on another device there would record nothing of the model's work (its kernels would run eagerly).
    """
    with torch.cuda.device(device):
        graph = torch.cuda.CUDAGraph()
        if generator is not None:
            graph.register_generator_state(generator)
        with torch.cuda.graph(graph, stream=_capture_stream(device)):
            out = fn()
    return graph, out


#: One capture stream per device, reused like torch's default one (cuBLAS keeps a workspace per stream).
_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream decode graphs of ``device`` are captured on."""
    stream = _CAPTURE_STREAMS.get(device)
    if stream is None:
        stream = _CAPTURE_STREAMS[device] = torch.cuda.Stream(device=device)
    return stream


# ---- one captured step ------------------------------------------------------------------------------------


class GraphStep:
    """A decode step captured in a CUDA graph (lazily, at the first call), with static input/output buffers.

    Calling it runs one step: a copy into the input buffer, ``graph.replay()``, a copy of the output.
    If capture fails it calls ``on_failure(exc)`` and runs ``eager_step`` from then on.
    """

    def __init__(self, model: GPT2, state: object, eager_step: Step, on_failure: Callable[[Exception], None]) -> None:
        self.model, self.state, self.eager_step, self.on_failure = model, state, eager_step, on_failure
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_in: torch.Tensor | None = None
        self.static_out: torch.Tensor | None = None
        self.replays = 0
        self.failed = False

    def capture(self, tokens: torch.Tensor) -> None:
        """Warm up on a side stream, undo the warm-up, then capture one step reading ``static_in``.

        The model cache and decode state hold the same values afterwards as before (the tensors are
        restored after capture too, a no-op for a real capture, which runs nothing).
        """
        device = tokens.device
        self.static_in = tokens.clone()
        snapshot = _Snapshot(self.model, self.state)
        try:
            with torch.no_grad():
                with _side_stream(device):
                    for _ in range(WARMUP_STEPS):
                        self.eager_step(self.static_in)
                        snapshot.restore()
                self.graph, self.static_out = _capture(
                    lambda: self.eager_step(self.static_in), getattr(self.state, "generator", None), device
                )
        except BaseException:
            snapshot.restore()
            raise
        snapshot.restore_tensors()  # not the RNG: a registered generator belongs to the graph now

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run one decode step; returns a fresh ``[B]`` tensor of next tokens."""
        if self.failed:
            return self.eager_step(tokens)
        if self.graph is None:
            try:
                self.capture(tokens)
            except Exception as exc:  # a step that cannot be captured still decodes, eagerly
                self.failed = True
                self.on_failure(exc)
                return self.eager_step(tokens)
        cache = self.model.cache
        checks.check_cache_room(cache)  # the same refusal as the eager decode_step, without a sync
        host_max = cache.host_max  # the replay advances the device lengths; keep the host bound in step
        self.static_in.copy_(tokens)
        self.graph.replay()
        cache.host_max = host_max + 1
        self.replays += 1
        return self.static_out.clone()  # the buffer is overwritten by the next replay


# ---- the factory (the seam generation.make_step calls) ----------------------------------------------------


def graph_key(model: GPT2, state: object) -> tuple:
    """What a captured step depends on: shapes, dtype, storage of the cache and weights, backend,
    sampling config, generator and decode-state layout."""
    cache = model.cache
    weights = (model.wte.weight.dtype, *(p.data_ptr() for p in model.parameters()))
    cache_ptrs = (cache.k.data_ptr(), cache.v.data_ptr(), cache.seqlens.data_ptr())
    backend = (getattr(model, "backend", None), ops.get_backend())
    return (cache.batch_size, cache.max_len, cache.k.dtype, cache.k.device, cache_ptrs, weights, backend,
            _layout(state))  # fmt: skip


def graph_cache(model: GPT2) -> OrderedDict:
    """The model's captured decode steps, by :func:`graph_key` (least recently used first)."""
    cache = model.__dict__.get(_CACHE_ATTR)
    if cache is None:
        cache = OrderedDict()
        model.__dict__[_CACHE_ATTR] = cache
    return cache


def clear_graphs(model: GPT2) -> None:
    """Drop every captured decode step of ``model`` (frees their memory pools once unreferenced)."""
    model.__dict__.pop(_CACHE_ATTR, None)


def _require_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise ValueError(f"CUDA-graph decode needs a CUDA model; this one is on {device} (use the eager step)")


def _check_model(model, state: object) -> None:
    weight = getattr(getattr(model, "wte", None), "weight", None)
    if weight is None or not hasattr(model, "decode_step"):
        raise TypeError(f"model must be a gpt2fast.GPT2, got {type(model).__name__}")
    _require_cuda(weight.device)
    if getattr(model, "cache", None) is None:
        raise RuntimeError("call model.setup_cache(batch_size, max_len) before make_graph_step")
    for name, t in state_tensors(state).items():
        if t.device != weight.device:
            raise ValueError(f"decode state tensor {name} is on {t.device} but the model is on {weight.device}")


def make_graph_step(model: GPT2, state: object, eager_step: Step) -> Step:
    """Return ``step(tokens[B]) -> next_tokens[B]`` that replays a CUDA graph of ``eager_step``.

    ``eager_step`` must be ``state.select(model.decode_step(tokens, check_ids=False))`` (see
    :func:`gpt2fast.generation.make_step`): it reads ``tokens`` and updates ``model.cache`` and ``state`` in
    place.  The graph is captured at the first call, or reused from the model's graph cache (then
    ``state`` is re-pointed at the cached graph's buffers, see the module docstring).  Raises
    ``ValueError`` for a non-CUDA model.  Returns ``eager_step`` itself when graphs cannot be used here
    (a user generator on a torch without ``register_generator_state``, or an earlier capture failure
    for this key).
    """
    _check_model(model, state)
    generator = getattr(state, "generator", None)
    if generator is not None and not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        warnings.warn(
            "this torch cannot register a user torch.Generator with a CUDA graph; decoding eagerly", stacklevel=3
        )
        return eager_step
    key = graph_key(model, state)
    cache = graph_cache(model)
    entry = cache.get(key)
    if entry is _FAILED:
        return eager_step
    if entry is not None:
        cache.move_to_end(key)
        adopt_state(state, entry.state)  # the cached graph reads and writes its own state's tensors
        return entry

    def on_failure(exc: Exception) -> None:
        cache[key] = _FAILED
        warnings.warn(f"CUDA-graph capture of the decode step failed ({exc!r}); decoding eagerly", stacklevel=3)

    entry = GraphStep(model, state, eager_step, on_failure)
    cache[key] = entry
    while len(cache) > MAX_GRAPHS:
        cache.popitem(last=False)
    return entry
