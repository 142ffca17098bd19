"""Test helpers: the one tolerance rule every parity check uses (tests, CLI, benchmarks), and input helpers.

FlashAttention's rule: a low-precision result ``out`` passes when

    max|out - ref_fp32| <= 2 * max|baseline - ref_fp32| + eps

where ``ref_fp32`` is the oracle -- the computation in a precision above ``out``'s:
fp32 for fp16/bf16 results, fp64 for fp32 results (see :func:`upcast`) -- and
``baseline`` is plain PyTorch's own result in ``out``'s dtype.  In fp32 the baseline
error is PyTorch's own fp32 rounding (usually ~0, so ``eps`` decides).  ``eps`` is
absolute, scaled by ``max(1, max|ref_fp32|)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt2fast.ops._spec import as_list, seeded_randn

__all__ = [
    "EPS",
    "ParityResult",
    "as_list",
    "assert_all_fa_close",
    "assert_fa_close",
    "clone_inputs",
    "clone_layout",
    "fa_check",
    "oracle_dtype",
    "seeded_randn",
    "upcast",
]

#: Default epsilon of the rule per dtype (absolute, times max(1, max|ref|)).
EPS: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@dataclass(frozen=True)
class ParityResult:
    """Outcome of one comparison under the FlashAttention rule."""

    err: float  # max|out - ref_fp32|
    baseline_err: float  # max|baseline - ref_fp32|
    bound: float  # 2 * baseline_err + eps
    ok: bool

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        return f"{verdict}: err={self.err:.3e} bound={self.bound:.3e} (baseline err={self.baseline_err:.3e})"


def _maxabs(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def fa_check(
    out: torch.Tensor,
    ref_fp32: torch.Tensor,
    baseline: torch.Tensor | None = None,
    eps: float | None = None,
) -> ParityResult:
    """Compare ``out`` with ``ref_fp32`` under the FlashAttention rule.

    ``baseline`` defaults to ``ref_fp32`` cast to ``out.dtype`` and back (rounding error only).
    NaN or inf anywhere in ``out`` always fails.
    """
    ref = ref_fp32.double() if ref_fp32.dtype == torch.float64 else ref_fp32.float()
    if baseline is None:
        baseline = ref.to(out.dtype)
    if eps is None:
        eps = EPS.get(out.dtype, 1e-4)
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    err = _maxabs(out.float(), ref)
    base = _maxabs(baseline.float(), ref)
    bound = 2.0 * base + eps * scale
    ok = bool(torch.isfinite(out).all()) and err <= bound
    return ParityResult(err, base, bound, ok)


def assert_fa_close(
    out: torch.Tensor,
    ref_fp32: torch.Tensor,
    baseline: torch.Tensor | None = None,
    eps: float | None = None,
    msg: str = "",
) -> ParityResult:
    """Assert :func:`fa_check` passes; the message carries the figures and ``msg``."""
    res = fa_check(out, ref_fp32, baseline, eps)
    assert res.ok, f"{msg} {res} dtype={out.dtype} shape={tuple(out.shape)}"
    return res


# ---- helpers every op test uses (exactly once) ------------------------------------------------------------
def oracle_dtype(inputs: dict) -> torch.dtype:
    """The precision the oracle of the rule runs in for ``inputs``: fp64 when every floating tensor is fp32 (or
    wider), else fp32.  An fp32 result needs an oracle more precise than PyTorch's own fp32, whose rounding can
    exceed the rule's ``eps`` (its LayerNorm backward at N=1 on values ~10 is off by ~3e-4 where the exact
    gradient is 0); fp16/bf16 results keep the fp32 oracle of FlashAttention's rule."""
    floats = [t.dtype for t in inputs.values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    wide = bool(floats) and all(d in (torch.float32, torch.float64) for d in floats)
    return torch.float64 if wide else torch.float32


def upcast(inputs: dict) -> dict:
    """Copies of ``inputs`` with every floating tensor in :func:`oracle_dtype` (the oracle's inputs); others as
    given."""
    dt = oracle_dtype(inputs)
    return {k: (t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for k, t in inputs.items()}


def clone_layout(t: torch.Tensor) -> torch.Tensor:
    """An independent copy of ``t`` with its exact strides (a sliced, transposed or padded view stays one; an
    ``expand``-ed view stays expanded over a copy of its distinct elements)."""
    zero = [d for d in range(t.dim()) if t.stride(d) == 0 and t.shape[d] > 1]
    if zero:
        distinct = t[tuple(slice(0, 1) if d in zero else slice(None) for d in range(t.dim()))]
        return clone_layout(distinct).expand(t.shape)
    out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
    return out.copy_(t)


def clone_inputs(inputs: dict) -> dict:
    """Independent copies of every tensor in ``inputs``, same layouts (an op that writes its inputs gets its own)."""
    return {k: (clone_layout(t) if isinstance(t, torch.Tensor) else t) for k, t in inputs.items()}


def assert_all_fa_close(outs, refs, bases=None, msg: str = "") -> list[ParityResult]:
    """:func:`assert_fa_close` on matching lists (or tuples, or single tensors) of outputs."""
    outs, refs = as_list(outs), as_list(refs)
    bases = [None] * len(outs) if bases is None else as_list(bases)
    if not len(outs) == len(refs) == len(bases):
        raise AssertionError(f"{msg} {len(outs)} outputs for {len(refs)} reference outputs")
    return [assert_fa_close(o, r, b, msg=f"{msg} output {i}") for i, (o, r, b) in enumerate(zip(outs, refs, bases))]
