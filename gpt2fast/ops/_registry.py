"""The op registry: which ops exist (their specs), which backends exist, and which backend implements what.

Three tables, filled at import time and read on every op call:

* **ops**: an :class:`~gpt2fast.ops._spec.OpSpec` per op (signature, validation, reference, test and bench
  data), added by :func:`register_op`.  The spec's reference implementation is registered as the op's
  implementation on the ``reference`` backend, so ``reference`` implements every op.
* **backends**: :func:`register_backend` (name, priority, ``is_available(device)``).  Built-in backends other
  than ``reference`` live in their own packages (``gpt2fast.ops.triton``, ``gpt2fast.ops.cuda``) and are
  imported on first use, so importing gpt2fast never needs triton or the CUDA extension; a package that fails
  to import registers itself as unavailable with the reason.
* **implementations**: :func:`register_impl` links (op, backend) to a function taking the op's own arguments,
  with an optional ``supports(*args)`` predicate (shapes, dtypes, strides only: never values) that returns
  ``None`` or the reason it cannot run those arguments, and whether gradients flow through it
  (``differentiable``; a call whose inputs require grad only runs differentiable implementations).

Resolution (:func:`dispatch`): a named backend runs its implementation or raises a clear error (unknown backend,
backend lacking the op, backend unavailable on the device, input unsupported).  ``"auto"`` takes, per op and per
device, every available backend implementing the op, highest priority first, and runs the first whose
``supports`` accepts the arguments: an op or an input a backend lacks falls through to the next one, down to
``reference``.  The candidate list is memoised per (op, backend, device), so a call is one dict lookup plus the
predicates; that keeps ``torch.compile(fullgraph=True)`` tracing through the ops once they have run eagerly.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from gpt2fast.ops._spec import OpSpec

#: Modules of the built-in backends besides ``reference``, imported on first use.
BUILTIN_BACKENDS: tuple[str, ...] = ("gpt2fast.ops.triton", "gpt2fast.ops.cuda", "gpt2fast.ops.cpu")
#: The backend that implements every op (each spec's reference implementation); always available.
REFERENCE = "reference"
AUTO = "auto"


class BackendUnavailableError(RuntimeError):
    """A requested backend cannot run here: unknown to it, lacking the op, or unavailable on the device."""


class UnsupportedInputError(ValueError):
    """A named backend does not support these arguments (a head dim, a stride, a row width...)."""


@dataclass(frozen=True)
class Backend:
    """A registered backend."""

    name: str
    priority: int
    is_available: Callable[[torch.device], str | None]
    auto_devices: tuple[str, ...] | None = None  # device types "auto" may pick it on (None: every device)
    describe: Callable[[torch.device], str] | None = None  # a one-line description where it is available


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of one op."""

    op: str
    backend: str
    fn: Callable
    supports: Callable[..., str | None] | None = None
    differentiable: bool = False  # gradients flow through fn (reference: torch autograd; kernels: their backward)
    module: str | None = None  # the module that registered it (e.g. the kernel module, for the compile check)

    def declines(self, args: tuple) -> str | None:
        """Why this implementation cannot run ``args``: an input that needs a gradient it cannot give, or its
        ``supports`` reason; None when it can."""
        if not self.differentiable and torch.is_grad_enabled():
            for a in args:
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    return (
                        f"backend {self.backend!r} has no backward for {self.op!r} and an input requires grad; "
                        "use torch.no_grad() or a backend that registers one"
                    )
        return None if self.supports is None else self.supports(*args)


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run on a device, and why (not)."""

    name: str
    available: bool
    reason: str


class ImplRow(NamedTuple):
    """A row of :func:`implementations`: ``reason`` is ``None`` when the backend is usable on the device."""

    op: str
    backend: str
    priority: int
    reason: str | None


_specs: dict[str, OpSpec] = {}
_backends: dict[str, Backend] = {}
_impls: dict[tuple[str, str], Impl] = {}
_memo: dict[tuple[str, str, torch.device], tuple[Impl, ...]] = {}
_status: dict[tuple[str, torch.device], str | None] = {}
_default: str | None = None
_loaded = False


def clear_cache() -> None:
    """Forget resolved candidates and availability (after registering, or in tests that change availability)."""
    _memo.clear()
    _status.clear()


# ---- backends ------------------------------------------------------------------------------------------------
def register_backend(
    name: str,
    *,
    priority: int,
    is_available: Callable[[torch.device], str | None],
    auto_devices: tuple[str, ...] | None = None,
    describe: Callable[[torch.device], str] | None = None,
) -> None:
    """Register (or re-register) backend ``name``.

    ``priority`` orders "auto" (highest first; ``reference`` is 0).  ``is_available(device)`` returns ``None``
    when the backend can run tensors on ``device``, else a one-line reason.  ``auto_devices`` limits the device
    types on which "auto" considers it (e.g. ``("cuda",)`` for kernels that only run interpreted on CPU);
    naming the backend still works wherever it is available.  ``describe(device)`` says what it is, for
    ``gpt2fast info``.
    """
    if not isinstance(name, str) or not name or name == AUTO:
        raise ValueError(f"a backend name must be a non-empty str other than {AUTO!r}, got {name!r}")
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TypeError(f"priority must be an int, got {priority!r}")
    if not callable(is_available):
        raise TypeError(f"is_available must be callable(device) -> None | str, got {is_available!r}")
    _backends[name] = Backend(name, priority, is_available, auto_devices, describe)
    clear_cache()


def unregister_backend(name: str) -> None:
    """Remove backend ``name`` and its implementations (``reference`` cannot be removed)."""
    if name == REFERENCE:
        raise ValueError("the reference backend implements every op and cannot be unregistered")
    _ensure_loaded()
    if name not in _backends:
        raise ValueError(f"unknown backend {name!r}; registered: {backend_names()}")
    del _backends[name]
    for key in [k for k in _impls if k[1] == name]:
        del _impls[key]
    clear_cache()


def backend_names() -> list[str]:
    """Every registered backend, highest priority first."""
    _ensure_loaded()
    return [b.name for b in sorted(_backends.values(), key=lambda b: -b.priority)]


def _availability(name: str, device: torch.device) -> str | None:
    key = (name, device)
    if key not in _status:
        try:
            reason = _backends[name].is_available(device)
        except Exception as exc:  # a broken backend is reported, never fatal to "auto"
            reason = f"availability check failed: {type(exc).__name__}: {exc}"
        _status[key] = None if reason is None else str(reason)
    return _status[key]


def _device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def backend_status(name: str, device: torch.device | str | None = None) -> BackendStatus:
    """Whether backend ``name`` can run tensors on ``device`` (default: CUDA when present, else CPU), and why."""
    _ensure_loaded()
    if name not in _backends:
        raise ValueError(f"unknown backend {name!r}; choose one of {(*backend_names(), AUTO)}")
    device = _device(device)
    reason = _availability(name, device)
    if reason is not None:
        return BackendStatus(name, False, reason)
    describe = _backends[name].describe
    return BackendStatus(name, True, describe(device) if describe else f"{name} backend")


def available_backends(device: torch.device | str | None = None) -> list[BackendStatus]:
    """Every backend (highest priority first) with whether it is available on ``device`` and why."""
    return [backend_status(name, device) for name in backend_names()]


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend (``None`` restores ``GPT2FAST_BACKEND`` / "auto")."""
    global _default
    if name is not None and name != AUTO:
        _ensure_loaded()
        if name not in _backends:
            raise ValueError(f"unknown backend {name!r}; choose one of {(*backend_names(), AUTO)}")
    _default = name


def get_backend() -> str:
    """The process-wide default backend name (``set_backend``, else ``GPT2FAST_BACKEND``, else "auto")."""
    if _default is not None:
        return _default
    return os.environ.get("GPT2FAST_BACKEND", AUTO) or AUTO


# ---- ops and implementations ---------------------------------------------------------------------------------
def register_op(spec: OpSpec) -> None:
    """Register an op from its spec: its public function becomes ``gpt2fast.ops.<name>`` and its reference
    implementation the ``reference`` backend's."""
    if spec.name in _backends or spec.name in (AUTO,) or not spec.name.isidentifier():
        raise ValueError(f"bad op name {spec.name!r}")
    _specs[spec.name] = spec
    _impls[(spec.name, REFERENCE)] = Impl(
        spec.name, REFERENCE, spec.reference, differentiable=True, module=spec.reference.__module__
    )
    ops_module = sys.modules.get("gpt2fast.ops")
    if ops_module is not None:
        setattr(ops_module, spec.name, spec.op)
    clear_cache()


def unregister_op(name: str) -> None:
    """Remove op ``name`` and every implementation of it (for ops added at run time, e.g. in tests)."""
    if name not in _specs:
        raise ValueError(f"unknown op {name!r}")
    del _specs[name]
    for key in [k for k in _impls if k[0] == name]:
        del _impls[key]
    ops_module = sys.modules.get("gpt2fast.ops")
    if ops_module is not None and getattr(ops_module, name, None) is not None:
        delattr(ops_module, name)
    clear_cache()


def specs() -> list[OpSpec]:
    """Every registered op's spec, in registration order."""
    return list(_specs.values())


def get_spec(name: str) -> OpSpec:
    """The spec of op ``name``."""
    try:
        return _specs[name]
    except KeyError:
        raise ValueError(f"unknown op {name!r}; registered ops: {list(_specs)}") from None


def register_impl(
    op: str, backend: str, *, supports: Callable[..., str | None] | None = None, differentiable: bool = False
) -> Callable:
    """Decorator: register the decorated function as ``backend``'s implementation of ``op``.

    The function takes the op's own arguments (the spec's ``args``, in order, without ``backend``); the shared
    validation has already run.  ``supports(*args)`` returns ``None`` or why this backend cannot run those
    arguments; it may read shapes, dtypes and strides, never tensor values (no host sync, graph-safe).
    ``differentiable``: gradients flow through the function (a custom op with its backward registered); a call
    that needs a gradient skips (under "auto") or refuses (named) an implementation that is not.
    """
    if backend not in _backends:
        raise ValueError(f"register_backend({backend!r}, ...) before registering its implementations")
    spec = get_spec(op)
    module = sys._getframe(1).f_globals.get("__name__")  # the registering module (the fn may be a custom op)

    def decorate(fn: Callable) -> Callable:
        _check_arity(spec, fn, "implementation")
        if supports is not None:
            _check_arity(spec, supports, "supports predicate")
        _impls[(op, backend)] = Impl(op, backend, fn, supports, differentiable, module)
        clear_cache()
        return fn

    return decorate


def _check_arity(spec: OpSpec, fn: Callable, what: str) -> None:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or C function: nothing to check
        return
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) != len(spec.args):
        raise TypeError(
            f"{spec.name} {what} {getattr(fn, '__qualname__', fn)!r} takes {len(positional)} positional arguments; "
            f"the op's are {spec.args}"
        )


def implementations(device: torch.device | str | None = None) -> list[ImplRow]:
    """Every (op, backend) implementation, by op then priority: ``(op, backend, priority, reason)`` where
    ``reason`` says why the backend cannot run on ``device`` (default: CUDA when present, else CPU) or is None."""
    _ensure_loaded()
    device = _device(device)
    order = {name: i for i, name in enumerate(backend_names())}
    rows = [
        ImplRow(op, be, _backends[be].priority, _availability(be, device))
        for (op, be) in _impls
        if be in _backends and op in _specs
    ]
    ops_order = {name: i for i, name in enumerate(_specs)}
    return sorted(rows, key=lambda r: (ops_order[r.op], order[r.backend]))


def get_impl(op: str, backend: str) -> Impl:
    """``backend``'s registered implementation of ``op`` (clear error when there is none)."""
    _ensure_loaded()
    impl = _impls.get((op, backend))
    if impl is None:
        _unknown(op, backend)
    return impl


def _unknown(op: str, backend: str) -> None:
    get_spec(op)
    if backend not in _backends:
        raise ValueError(f"unknown backend {backend!r}; choose one of {(*backend_names(), AUTO)}")
    has = sorted(o for (o, b) in _impls if b == backend)
    raise BackendUnavailableError(f"backend {backend!r} does not implement op {op!r} (it implements: {', '.join(has)})")


def supported(op: str, backend: str, *args) -> str | None:
    """Why named ``backend`` cannot run ``op`` on these (validated) arguments, or ``None`` when it can.

    Checks that the backend exists and implements the op, and its ``supports`` predicate; not the device
    (see :func:`backend_status`).  Works on meta tensors, so a model can check its shapes up front.
    """
    if backend in (None, AUTO):
        return None
    try:
        impl = get_impl(op, backend)
    except (ValueError, BackendUnavailableError) as exc:
        return str(exc)
    return impl.declines(args)


# ---- dispatch ------------------------------------------------------------------------------------------------
def _resolve(op: str, name: str, device: torch.device) -> tuple[Impl, ...]:
    _ensure_loaded()
    get_spec(op)
    if name == AUTO:
        cands = tuple(
            _impls[(op, b)]
            for b in backend_names()
            if (op, b) in _impls
            and (_backends[b].auto_devices is None or device.type in _backends[b].auto_devices)
            and _availability(b, device) is None
        )
        if not cands:
            raise BackendUnavailableError(f"no available backend implements {op!r} for {device} tensors")
        return cands
    impl = get_impl(op, name)
    reason = _availability(name, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} is unavailable for {device} tensors: {reason}")
    return (impl,)


def candidates(op: str, backend: str | None, device: torch.device) -> tuple[Impl, ...]:
    """The implementations a call of ``op`` with ``backend`` on ``device`` may run, in the order tried (memoised)."""
    name = backend if backend is not None else get_backend()
    key = (op, name, device)
    impls = _memo.get(key)
    if impls is None:
        impls = _memo[key] = _resolve(op, name, device)
    return impls


def select(op: str, backend: str | None, args: tuple, device: torch.device) -> Impl:
    """The implementation a call runs: the named backend's (its ``supports`` must accept ``args``), or under
    "auto" the first candidate whose ``supports`` does."""
    name = backend if backend is not None else get_backend()
    impls = candidates(op, name, device)
    if name != AUTO:
        impl = impls[0]
        reason = impl.declines(args)
        if reason is not None:
            raise UnsupportedInputError(reason)
        return impl
    for impl in impls:
        if impl.declines(args) is None:
            return impl
    raise UnsupportedInputError(f"no available backend supports these {op} arguments on {device}")


def dispatch(op: str, backend: str | None, args: tuple, device: torch.device):
    """Run ``op`` on validated ``args`` with the implementation :func:`select` picks."""
    return select(op, backend, args, device).fn(*args)


def _ensure_loaded() -> None:
    """Import the built-in backend packages once (each registers itself, or its unavailability)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_BACKENDS:
        try:
            importlib.import_module(module)
        except Exception as exc:  # a broken built-in backend must not break the others
            name = module.rsplit(".", 1)[-1]
            reason = f"cannot import {module}: {type(exc).__name__}: {exc}"
            register_backend(name, priority=-1, is_available=lambda device, reason=reason: reason)


register_backend(
    REFERENCE,
    priority=0,
    is_available=lambda device: None,
    describe=lambda device: "pure PyTorch, runs on any device",
)
