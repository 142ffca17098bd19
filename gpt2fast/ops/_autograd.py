"""Helpers of the differentiable implementations: whether a call needs a gradient, and running a backward op.

A backend's forward custom op registers its backward with ``torch.library.register_autograd``; that backward is an
op of its own in the registry (``layer_norm_backward``, ``bias_gelu_backward``, ``attention_backward``), run by
:func:`run_backward`: on the forward's backend when that backend implements the backward op, is available and
supports the arguments, else on whatever "auto" picks (down to ``reference``), so a backend may register a forward
whose backward runs elsewhere.  The backward op's public function is called, so its shared validation runs first.
"""

from __future__ import annotations

import torch

from gpt2fast.ops._registry import AUTO, BackendUnavailableError, candidates, get_spec


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Grad mode is on and one of ``tensors`` requires grad (then a forward saves what its backward needs)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def backward_backend(op: str, backend: str, args: tuple, device: torch.device) -> str:
    """``backend`` when it can run backward op ``op`` on ``args`` on ``device``, else "auto"."""
    try:
        impl = candidates(op, backend, device)[0]
    except (BackendUnavailableError, ValueError):
        return AUTO
    return backend if impl.declines(args) is None else AUTO


def run_backward(op: str, backend: str, *args):
    """Run backward op ``op`` on ``args`` (its own arguments, in order), preferring ``backend``."""
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    return get_spec(op).op(*args, backend=backward_backend(op, backend, args, device))
