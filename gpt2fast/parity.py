"""Parity of gpt2fast against its references, as a library: ``gpt2fast parity`` and the tests both call it.

* :func:`op_parity`: every registered op (``ops.specs()``) on each of its test shapes, for every backend that
  implements it and is available on the device, against the op's reference in fp32.
* :func:`run_parity`: the whole model's logits (full forward, and cached prefill + decode) against
  transformers' ``GPT2LMHeadModel`` in fp32.

Both use the FlashAttention tolerance rule (:func:`gpt2fast.testing.fa_check`): in fp16/bf16 the baseline is the
reference computed in that same dtype, so a result passes when it is at most about twice as far from fp32 as
PyTorch's own low-precision result is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2fast import ops as registry
from gpt2fast.ops._spec import OpSpec, shape_id
from gpt2fast.testing import ParityResult, as_list, clone_inputs, fa_check, upcast

#: dtype names of the command line and of the parity rows.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of ``dtype`` ("fp16"), or its torch name for a dtype outside :data:`DTYPES`."""
    return next((k for k, v in DTYPES.items() if v == dtype), str(dtype).replace("torch.", ""))


# ---- ops -----------------------------------------------------------------------------------------------------
@dataclass
class OpParityRow:
    """One op on one backend, dtype and test shape: the worst output against the oracle.

    ``err``/``bound``/``baseline_err`` are those of the output (or in-place write) closest to failing;
    ``error`` is the exception text when the backend raised (then ``ok`` is False and the figures are None).
    """

    op: str
    backend: str
    dtype: str
    shape: str
    err: float | None
    bound: float | None
    baseline_err: float | None
    ok: bool
    error: str | None = None


def _selected_specs(names: Sequence[str] | None) -> list[OpSpec]:
    if names is None:
        return registry.specs()
    return [registry.get_spec(name) for name in dict.fromkeys(names)]  # ValueError naming an unknown op


def _worst(results: list[ParityResult]) -> ParityResult:
    return max(results, key=lambda r: (not r.ok, r.err - r.bound))


def op_parity(
    ops: Sequence[str] | None = None,
    backends: Sequence[str] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[OpParityRow]:
    """Every registered op (or those named in ``ops``) against its reference, on every test shape of its spec.

    For each op, shape and dtype (``dtypes``, default the spec's own, restricted to those the spec supports),
    the inputs are ``spec.make_inputs(shape, dtype, device, torch.Generator().manual_seed(0))``; the reference
    runs on an fp32 copy (the oracle) and on a copy in ``dtype`` (the baseline).  Each backend that implements
    the op and is available on ``device`` (only those in ``backends`` when given) runs on a fresh copy; its
    outputs and the arguments the op writes in place (``spec.mutates``) are checked with
    :func:`~gpt2fast.testing.fa_check`.  A backend that raises gives a failing row carrying the error.

    ``device`` defaults to CUDA when present, else CPU.  ``progress(done, total)`` is called after each
    (op, shape, dtype) case.  Raises ``ValueError`` for an unknown op name.
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    specs = _selected_specs(ops)
    wanted = None if backends is None else set(backends)
    runnable: dict[str, list[str]] = {}
    for row in registry.implementations(device):
        if row.reason is None and (wanted is None or row.backend in wanted):
            runnable.setdefault(row.op, []).append(row.backend)
    plan = [
        (spec, shape, dtype)
        for spec in specs
        if runnable.get(spec.name)
        for shape in spec.test_shapes
        for dtype in (spec.dtypes if dtypes is None else [d for d in dtypes if d in spec.dtypes])
    ]
    rows: list[OpParityRow] = []
    for i, (spec, shape, dtype) in enumerate(plan):
        rows += _op_case(spec, shape, dtype, device, runnable[spec.name])
        if progress is not None:
            progress(i + 1, len(plan))
    return rows


def _op_case(
    spec: OpSpec, shape: dict, dtype: torch.dtype, device: torch.device, backends: list[str]
) -> list[OpParityRow]:
    """The rows of one (op, shape, dtype) case, one per backend."""
    inputs = spec.make_inputs(shape, dtype, device, torch.Generator().manual_seed(0))
    ref_in, base_in = upcast(clone_inputs(inputs)), clone_inputs(inputs)
    ref32, base = spec.run_reference(ref_in), spec.run_reference(base_in)
    ref32 += [ref_in[name] for name in spec.mutates]
    base += [base_in[name] for name in spec.mutates]
    rows = []
    for backend in backends:
        row = OpParityRow(spec.name, backend, dtype_name(dtype), shape_id(shape), None, None, None, False)
        try:
            ins = clone_inputs(inputs)
            out = as_list(spec.call(ins, backend)) + [ins[name] for name in spec.mutates]
            if len(out) != len(ref32):
                raise ValueError(f"{len(out)} outputs for the reference's {len(ref32)}")
            worst = _worst([fa_check(o, r, b) for o, r, b in zip(out, ref32, base)])
            row.err, row.bound, row.baseline_err, row.ok = worst.err, worst.bound, worst.baseline_err, worst.ok
        except Exception as exc:  # a crashing backend is a failed check, reported with the others
            row.error = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        rows.append(row)
    return rows


# ---- the model -----------------------------------------------------------------------------------------------
@dataclass
class ParityRow:
    """One parity comparison: our logits (``path``: full forward or cached decode) against HF fp32."""

    dtype: str
    backend: str
    path: str
    err: float
    bound: float
    baseline_err: float
    greedy_agree: float
    ok: bool


def _hf_logits(ckpt: Path, dtype: torch.dtype, device: torch.device, ids: torch.Tensor) -> torch.Tensor:
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = GPT2LMHeadModel.from_pretrained(str(ckpt), dtype=dtype).to(device).eval()
    with torch.no_grad():
        logits = model(ids).logits.float()
    del model
    return logits


def _our_logits(model, ids: torch.Tensor, n_decode: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-forward logits ``[B, T, V]``, and the last ``n_decode + 1`` positions' logits computed
    through the KV cache (prefill of ``T - n_decode`` tokens, then one decode step per token)."""
    B, T = ids.shape
    with torch.no_grad():
        full = model(ids)
        model.setup_cache(B, T)
        steps = [model.prefill(ids[:, : T - n_decode])]
        steps += [model.decode_step(ids[:, j]) for j in range(T - n_decode, T)]
    return full, torch.stack(steps, dim=1)


def run_parity(
    ckpt: Path,
    ids: torch.Tensor,
    dtypes: Sequence[str],
    backends: Sequence[str],
    device: torch.device,
    n_decode: int,
    progress: Callable[[], None] | None = None,
) -> list[ParityRow]:
    """Compare gpt2fast with transformers' ``GPT2LMHeadModel`` on checkpoint ``ckpt``.

    For every dtype (names of :data:`DTYPES`) and backend, our logits (full forward, and the cached prefill +
    decode path over the last ``n_decode`` tokens) are checked with :func:`gpt2fast.testing.fa_check` against
    transformers in fp32; in fp16/bf16 the baseline is transformers' own logits in that dtype.  ``progress()``
    is called after each (dtype, backend).
    """
    from gpt2fast.model import GPT2

    ids = ids.to(device)
    T = ids.shape[1]
    last = slice(T - n_decode - 1, T)
    ref32 = _hf_logits(ckpt, torch.float32, device, ids)
    rows = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        base = None if dtype == torch.float32 else _hf_logits(ckpt, dtype, device, ids)
        for backend in backends:
            model = GPT2.from_pretrained(ckpt, dtype=dtype, device=device, backend=backend, quiet=True)
            full, cached = _our_logits(model, ids, n_decode)
            del model
            for path, out, ref, bl in (
                ("forward", full, ref32, base),
                ("decode", cached, ref32[:, last], None if base is None else base[:, last]),
            ):
                res = fa_check(out, ref, bl)
                agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
                rows.append(ParityRow(dname, backend, path, res.err, res.bound, res.baseline_err, agree, res.ok))
            if progress is not None:
                progress()
    return rows
