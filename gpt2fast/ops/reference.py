"""The reference backend by op name: ``reference.layer_norm(...)`` is that op's spec's reference implementation.

Plain PyTorch, any device, computed in the input dtype: the parity oracle.  Run on inputs upcast one
precision (``gpt2fast.testing.upcast``: fp64 for fp32, fp32 for fp16/bf16) it gives the oracle; run on the
inputs themselves it gives "what PyTorch itself gets in that dtype", the baseline of the FlashAttention
tolerance rule (see :mod:`gpt2fast.testing`).  The implementations live in the op specs
(``gpt2fast/ops/specs/``); this module only looks them up, so a new op needs no edit here.
"""

from __future__ import annotations

from gpt2fast.ops._registry import get_spec


def __getattr__(name: str):
    """The reference implementation of op ``name``."""
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        return get_spec(name).reference
    except ValueError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r} (no op of that name)") from None
