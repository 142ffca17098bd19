"""gpt2fast's ops, each dispatched to a backend: ``reference``, ``triton``, ``cuda``, one of your own, or "auto".

Every op is declared once, by a spec module in ``gpt2fast/ops/specs/`` (signature, shared validation,
reference implementation, test and benchmark data); each backend implements it in a file of its own and
registers it with :func:`register_impl`.  Every spec module found there is imported here, and its public
function becomes ``gpt2fast.ops.<op>``: today ``layer_norm``, ``bias_gelu``, ``attention`` and
``decode_attention``.  See ``gpt2fast/ops/README.md`` for adding an op or a backend.

Backend choice: per call (``backend=``), per process (:func:`set_backend` or ``GPT2FAST_BACKEND``), or "auto":
per op and per device, the available backend of highest priority that implements the op and supports the
arguments (cuda > triton > reference on CUDA tensors; reference on CPU).
"""

from __future__ import annotations

import importlib
import pkgutil

from gpt2fast.ops import specs as _specs_pkg
from gpt2fast.ops._registry import (
    AUTO,
    REFERENCE,
    BackendStatus,
    BackendUnavailableError,
    ImplRow,
    UnsupportedInputError,
    available_backends,
    backend_names,
    backend_status,
    get_backend,
    get_spec,
    implementations,
    register_backend,
    register_impl,
    register_op,
    set_backend,
    specs,
    supported,
    unregister_backend,
    unregister_op,
)

__all__ = [
    "AUTO",
    "REFERENCE",
    "BackendStatus",
    "BackendUnavailableError",
    "ImplRow",
    "UnsupportedInputError",
    "available_backends",
    "backend_names",
    "backend_status",
    "get_backend",
    "get_spec",
    "implementations",
    "register_backend",
    "register_impl",
    "register_op",
    "set_backend",
    "specs",
    "supported",
    "unregister_backend",
    "unregister_op",
]

for _mod in pkgutil.iter_modules(_specs_pkg.__path__):
    if not _mod.name.startswith("_"):
        importlib.import_module(f"{_specs_pkg.__name__}.{_mod.name}")
for _spec in specs():  # the spec modules ran register_op before this module was complete: bind their ops now
    globals()[_spec.name] = _spec.op
    __all__.append(_spec.name)
del _mod, _spec
