"""Backend registry and selection for :mod:`gpt2fast.ops`.

A backend is a module exposing the four ops plus ``is_available(device)``, which
returns ``(ok, reason)``.  Backends are imported lazily so that importing
gpt2fast never needs triton or the CUDA extension.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch

#: Every backend gpt2fast knows, fastest first (the order "auto" tries them in).
BACKENDS: tuple[str, ...] = ("cuda", "triton", "reference")

_MODULES = {
    "reference": "gpt2fast.ops.reference",
    "triton": "gpt2fast.ops.triton",
    "cuda": "gpt2fast.ops.cuda",
}

_default: str | None = None


class BackendUnavailableError(RuntimeError):
    """Raised when a requested backend cannot run the given tensors, with the reason."""


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run on a device, and why (not)."""

    name: str
    available: bool
    reason: str


def _load(name: str):
    try:
        return importlib.import_module(_MODULES[name])
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose one of {(*BACKENDS, 'auto')}") from None


def backend_status(name: str, device: torch.device | str | None = None) -> BackendStatus:
    """Return whether backend ``name`` can run tensors on ``device`` and why.

    ``device=None`` means "the best device here": CUDA when present, else CPU.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    try:
        mod = _load(name)
    except ValueError:
        raise
    except Exception as exc:  # an import error says why the backend is missing
        return BackendStatus(name, False, f"cannot import {_MODULES[name]}: {exc}")
    try:
        ok, reason = mod.is_available(device)
    except Exception as exc:  # a broken backend is reported, never fatal to "auto"
        return BackendStatus(name, False, f"availability check failed: {type(exc).__name__}: {exc}")
    return BackendStatus(name, ok, reason)


def available_backends(device: torch.device | str | None = None) -> list[BackendStatus]:
    """List every backend with whether it is available on ``device`` and why."""
    return [backend_status(name, device) for name in BACKENDS]


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend (``None`` restores the env var / "auto")."""
    global _default
    if name is not None and name != "auto":
        _load(name)  # validates the name
    _default = name


def get_backend() -> str:
    """Return the process-wide default backend name (may be ``"auto"``)."""
    if _default is not None:
        return _default
    return os.environ.get("GPT2FAST_BACKEND", "auto") or "auto"


#: Backends already found usable, by (name, device): the per-op hot path is then one dict lookup, which
#: also lets torch.compile(fullgraph=True) trace through ``gpt2fast.ops`` once each backend has been used
#: eagerly (Dynamo does not trace the first look-up's ``importlib``; without fullgraph it graph-breaks there).
_resolved: dict[tuple[str, torch.device], object] = {}


def clear_cache() -> None:
    """Forget which backends were found usable (for tests that change availability)."""
    _resolved.clear()


def resolve(backend: str | None, device: torch.device):
    """Return the backend module to run on ``device``; raise with a reason if it cannot."""
    name = backend if backend is not None else get_backend()
    mod = _resolved.get((name, device))
    if mod is None:
        mod = _resolved[(name, device)] = _resolve_uncached(name, device)
    return mod


def _resolve_uncached(name: str, device: torch.device):
    if name == "auto":
        for cand in BACKENDS:
            status = backend_status(cand, device)
            if status.available and (cand == "reference" or device.type == "cuda"):
                return _load(cand)
        raise BackendUnavailableError(f"no backend can run tensors on {device}")
    status = backend_status(name, device)
    if not status.available:
        raise BackendUnavailableError(f"backend {name!r} is unavailable for {device} tensors: {status.reason}")
    return _load(name)
