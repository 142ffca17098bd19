"""The bad-input catalogue: one table of bad inputs across the public API, each with the exception it must raise.

Every row names the input, the call that makes it, the exception type and a regex that must name the argument
and what was expected.  Op rows run on every backend: ``reference`` and ``triton`` (Triton's interpreter on CPU)
for real, and ``cuda`` with the compiled ``gpt2fast._C`` replaced by a mock (the backend is made to look available
for CPU tensors, so the public op really dispatches to it).  For every op row the test counts, per backend, the
calls that reached the backend module and the kernel launches (Triton interpreter launches, the mock's
launchers), and asserts that nothing was launched; rows refused by the shared validation must not even reach the
backend.

Some inputs are bad for one backend only (a head dim the kernels are not built for, a last-dim stride the CUDA
kernels cannot follow).  Those rows give a per-backend outcome; ``ACCEPTED`` means the backend must handle the
input and its result must equal the reference op on contiguous copies.  The CUDA backend cannot run here, so for
it ``ACCEPTED`` means "passed every layout check and stopped at the device check (CPU tensors), nothing launched".
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from gpt2fast import cli, ops
from gpt2fast.config import GPT2Config
from gpt2fast.loading import CheckpointError
from gpt2fast.model import GPT2
from gpt2fast.ops import cuda as cuda_backend
from gpt2fast.testing import assert_fa_close
from gpt2fast.tokenizer import Tokenizer

OP_BACKENDS = ("reference", "triton", "cuda")
OP_NAMES = ("layer_norm", "bias_gelu", "attention", "decode_attention")
ACCEPTED = None  # outcome: the backend handles the input (see the module docstring)
META = torch.device("meta")  # stands in for "a second device": tensors there carry a device but no data

#: The tiny model every model/generate row uses: V=64, 32 positions, one layer, head dim 32.
TINY = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=1)


class CliUsageExit(Exception):
    """``cli.main`` returned exit status 2; the message is what it printed on stderr."""


# ----------------------------------------------------------------------------- table
@dataclass(frozen=True)
class Case:
    """One bad input: ``call(ctx)`` triggers it; ``exc``/``match`` is what must be raised.

    Op rows (``op`` set) run once per backend; ``ctx.backend`` names it.  ``per_backend`` overrides the
    outcome for some backends (``ACCEPTED`` or ``(exc, regex)``); such outcomes come from the backend's own
    checks, so the call may reach the backend module (but still launch nothing).
    """

    id: str
    input: str
    api: str
    call: Callable[[SimpleNamespace], object]
    exc: type[BaseException]
    match: str
    op: str | None = None
    per_backend: dict = field(default_factory=dict)

    def outcome(self, backend: str | None):
        """``(exc, regex)`` or ``ACCEPTED`` for ``backend``."""
        return self.per_backend.get(backend, (self.exc, self.match))


def rn(*shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Random normal tensor."""
    return torch.randn(*shape).to(dtype=dtype, device=device)


def ln(ctx, x=None, w=None, b=None, eps=1e-5, residual=None, n=32):
    """ops.layer_norm with defaults for every argument not given."""
    x = rn(3, n) if x is None else x
    w = rn(x.shape[-1]) if w is None else w
    b = rn(x.shape[-1]) if b is None else b
    return ops.layer_norm(x, w, b, eps, residual=residual, backend=ctx.backend)


def gelu(ctx, x=None, bias=None):
    """ops.bias_gelu with defaults."""
    x = rn(3, 32) if x is None else x
    return ops.bias_gelu(x, rn(x.shape[-1]) if bias is None else bias, backend=ctx.backend)


def attn(ctx, q=None, k=None, v=None, causal=True, scale=None, shape=(1, 2, 5, 32)):
    """ops.attention with defaults."""
    q = rn(*shape) if q is None else q
    k = rn(*q.shape) if k is None else k
    v = rn(*q.shape) if v is None else v
    return ops.attention(q, k, v, causal, scale, backend=ctx.backend)


def dec(ctx, *, b=2, h=2, t=8, d=32, seqlens=(3, 5), append=True, **over):
    """ops.decode_attention on fresh inputs; ``over`` replaces any argument."""
    kw = dict(q=rn(b, h, d), k_cache=rn(b, h, t, d), v_cache=rn(b, h, t, d))
    kw["cache_seqlens"] = torch.tensor(seqlens, dtype=torch.int32)
    kw["k_new"], kw["v_new"] = (rn(b, h, d), rn(b, h, d)) if append else (None, None)
    kw.update(over)
    return ops.decode_attention(**kw, backend=ctx.backend)


def tiny_model() -> GPT2:
    """A fresh random tiny model on CPU (fp32, reference backend)."""
    return GPT2.random(TINY, seed=0, backend="reference")


def ids(b=2, t=5, high=64) -> torch.Tensor:
    """Random token ids [b, t] below ``high``."""
    return torch.randint(0, high, (b, t))


def prefilled(max_len=8, t=5) -> GPT2:
    """A tiny model whose cache (batch 2, ``max_len`` positions) holds a prompt of ``t`` tokens."""
    m = tiny_model()
    m.setup_cache(2, max_len)
    m.prefill(ids(2, t))
    return m


def prefill_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """Prefill a tiny model's fresh cache (batch 2, 8 positions) with 5-token prompts of ``lengths``."""
    m = tiny_model()
    m.setup_cache(2, 8)
    return m.prefill(ids(2, 5), lengths)


def full_cache() -> GPT2:
    """A tiny model whose 8-position cache is full."""
    m = prefilled(8, 5)
    for _ in range(3):
        m.decode_step(torch.tensor([1, 2]))
    return m


def run_cli(ctx, *argv: str) -> int:
    """Run ``cli.main``; exit status 2 raises :class:`CliUsageExit` with stderr (which must be one line)."""
    code = cli.main(list(argv))
    err = ctx.capsys.readouterr().err
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        raise CliUsageExit(" ".join(err.split()))
    return code


def _copy_checkpoint(ctx, name: str) -> Path:
    d = ctx.root / name
    d.mkdir()
    for f in ctx.ckpt.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    return d


def truncated_checkpoint(ctx) -> Path:
    """The tiny checkpoint with model.safetensors cut in half."""
    d = _copy_checkpoint(ctx, "truncated")
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return d


def corrupt_checkpoint(ctx) -> Path:
    """The tiny checkpoint with a model.safetensors of random bytes."""
    d = _copy_checkpoint(ctx, "corrupt")
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 8)
    return d


def disagreeing_checkpoint(ctx) -> Path:
    """The tiny checkpoint whose config.json says n_embd=64 (the weights are 32 wide)."""
    d = _copy_checkpoint(ctx, "disagree")
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_embd"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def no_config_checkpoint(ctx) -> Path:
    """The tiny checkpoint without config.json."""
    d = _copy_checkpoint(ctx, "noconfig")
    (d / "config.json").unlink()
    return d


def tokenizer_without_merges(ctx) -> Path:
    """A tokenizer directory holding vocab.json but no merges.txt."""
    d = ctx.root / "tok_no_merges"
    d.mkdir()
    (d / "vocab.json").write_text(json.dumps({"a": 0, "<|endoftext|>": 1}))
    return d


def expanded_cache() -> torch.Tensor:
    """A [2, 2, 8, 32] cache whose 8 positions alias one row (an ``expand``-ed view)."""
    return rn(2, 2, 1, 32).expand(2, 2, 8, 32)


UNIT = r"must have unit stride in its last dim"
AT_DEVICE_CHECK = (cuda_backend.CudaBackendError, r"is a cpu tensor; it needs CUDA tensors")

CASES: list[Case] = [
    # ---- layer_norm
    Case("ln-dtype-fp64", "x float64", "ops.layer_norm", lambda c: ln(c, x=rn(3, 32, dtype=torch.float64)),
         TypeError, r"x must be float32, float16 or bfloat16, got torch\.float64", op="layer_norm"),
    Case("ln-mixed-dtype", "x fp32, weight fp16", "ops.layer_norm",
         lambda c: ln(c, w=rn(32, dtype=torch.float16)),
         TypeError, r"weight has dtype torch\.float16 but x has torch\.float32; they must match", op="layer_norm"),
    Case("ln-other-device", "bias on another device (meta)", "ops.layer_norm", lambda c: ln(c, b=rn(32, device=META)),
         RuntimeError, r"bias is on meta but x is on cpu", op="layer_norm"),
    Case("ln-weight-len", "weight [31] for rows of 32", "ops.layer_norm", lambda c: ln(c, w=rn(31)),
         ValueError, r"weight must have shape \[32\], got \[31\]", op="layer_norm"),
    Case("ln-residual-shape", "residual [3, 1, 32] for x [3, 32]", "ops.layer_norm",
         lambda c: ln(c, residual=rn(3, 1, 32)),
         ValueError, r"residual must have shape \[3, 32\], got \[3, 1, 32\]", op="layer_norm"),
    Case("ln-empty", "x [0, 32] (no rows)", "ops.layer_norm", lambda c: ln(c, x=rn(0, 32)),
         ValueError, r"x is empty \(shape \[0, 32\]\)", op="layer_norm"),
    Case("ln-scalar", "x 0-D", "ops.layer_norm", lambda c: ln(c, x=torch.tensor(1.0), w=rn(1), b=rn(1)),
         ValueError, r"x must have at least 1 dimension", op="layer_norm"),
    Case("ln-eps-zero", "eps=0", "ops.layer_norm", lambda c: ln(c, eps=0.0),
         ValueError, r"eps must be a positive finite number, got 0\.0", op="layer_norm"),
    Case("ln-eps-inf", "eps=inf (gave all-zero rows before)", "ops.layer_norm", lambda c: ln(c, eps=math.inf),
         ValueError, r"eps must be a positive finite number, got inf", op="layer_norm"),
    Case("ln-strided-last-dim", "x[:, ::2] (last-dim stride 2)", "ops.layer_norm",
         lambda c: ln(c, x=rn(3, 64)[:, ::2]), ValueError, "cuda backend: x " + UNIT, op="layer_norm",
         per_backend={"reference": ACCEPTED, "triton": ACCEPTED}),
    Case("ln-residual-transposed", "residual a transposed view (rows share no single stride)", "ops.layer_norm",
         lambda c: ln(c, x=rn(4, 6, 32), residual=rn(6, 4, 32).transpose(0, 1)),
         ValueError, r"residual .* cannot be viewed as \[rows, 32\]", op="layer_norm",
         per_backend={"reference": ACCEPTED, "triton": ACCEPTED}),
    Case("ln-too-wide", "rows of 16400 (> triton's register row)", "ops.layer_norm", lambda c: ln(c, x=rn(1, 16400)),
         ValueError, r"triton layer_norm keeps a row in registers: N must be <= 16384, got 16400", op="layer_norm",
         per_backend={"reference": ACCEPTED, "cuda": AT_DEVICE_CHECK}),
    # ---- bias_gelu
    Case("gelu-not-tensor", "x a list", "ops.bias_gelu", lambda c: gelu(c, x=[[1.0, 2.0]], bias=rn(2)),
         TypeError, r"x must be a torch\.Tensor, got list", op="bias_gelu"),
    Case("gelu-int", "x int32", "ops.bias_gelu", lambda c: gelu(c, x=torch.ones(3, 32, dtype=torch.int32)),
         TypeError, r"x must be float32, float16 or bfloat16, got torch\.int32", op="bias_gelu"),
    Case("gelu-mixed-dtype", "x fp32, bias bf16", "ops.bias_gelu", lambda c: gelu(c, bias=rn(32, dtype=torch.bfloat16)),
         TypeError, r"bias has dtype torch\.bfloat16 but x has torch\.float32", op="bias_gelu"),
    Case("gelu-bias-len", "bias [33] for rows of 32", "ops.bias_gelu", lambda c: gelu(c, bias=rn(33)),
         ValueError, r"bias must have shape \[32\], got \[33\]", op="bias_gelu"),
    Case("gelu-other-device", "bias on another device (meta)", "ops.bias_gelu",
         lambda c: gelu(c, bias=rn(32, device=META)), RuntimeError, r"bias is on meta but x is on cpu", op="bias_gelu"),
    Case("gelu-empty", "x [2, 0, 32] (batch of 0 rows)", "ops.bias_gelu", lambda c: gelu(c, x=rn(2, 0, 32)),
         ValueError, r"x is empty \(shape \[2, 0, 32\]\)", op="bias_gelu"),
    Case("gelu-transposed", "x a transposed [32, 3] view", "ops.bias_gelu", lambda c: gelu(c, x=rn(3, 32).t()),
         ValueError, "cuda backend: x " + UNIT, op="bias_gelu",
         per_backend={"reference": ACCEPTED, "triton": ACCEPTED}),
    # ---- attention
    Case("attn-rank3", "q 3-D", "ops.attention", lambda c: attn(c, q=rn(2, 5, 32)),
         ValueError, r"q must be 4-D \[B, H, T, D\], got shape \[2, 5, 32\]", op="attention"),
    Case("attn-k-shape", "k with a different T", "ops.attention", lambda c: attn(c, k=rn(1, 2, 6, 32)),
         ValueError, r"k must have shape \[1, 2, 5, 32\], got \[1, 2, 6, 32\]", op="attention"),
    Case("attn-mixed-dtype", "v fp16 with q/k fp32", "ops.attention",
         lambda c: attn(c, v=rn(1, 2, 5, 32, dtype=torch.float16)),
         TypeError, r"v has dtype torch\.float16 but q has torch\.float32", op="attention"),
    Case("attn-other-device", "k on another device (meta)", "ops.attention",
         lambda c: attn(c, k=rn(1, 2, 5, 32, device=META)), RuntimeError, r"k is on meta but q is on cpu",
         op="attention"),
    Case("attn-batch0", "batch of 0", "ops.attention", lambda c: attn(c, shape=(0, 2, 5, 32)),
         ValueError, r"q is empty \(shape \[0, 2, 5, 32\]\)", op="attention"),
    Case("attn-causal-int", "causal=1", "ops.attention", lambda c: attn(c, causal=1),
         TypeError, r"causal must be a bool, got int", op="attention"),
    Case("attn-scale-neg", "scale=-0.1", "ops.attention", lambda c: attn(c, scale=-0.1),
         ValueError, r"scale must be None or a positive finite number, got -0\.1", op="attention"),
    Case("attn-scale-inf", "scale=inf (gave NaN before)", "ops.attention", lambda c: attn(c, scale=math.inf),
         ValueError, r"scale must be None or a positive finite number, got inf", op="attention"),
    Case("attn-head-dim-48", "head dim 48", "ops.attention", lambda c: attn(c, shape=(1, 2, 5, 48)),
         ValueError, r"cuda backend: head dim D = 48 is not supported; supported: \(32, 64, 128\)", op="attention",
         per_backend={"reference": ACCEPTED,
                      "triton": (ValueError, r"triton attention supports head dims \(32, 64, 128\); got q with D=48")}),
    Case("attn-bthd-view", "q/k/v [B, T, H, D] tensors transposed to [B, H, T, D] (no copy)", "ops.attention",
         lambda c: attn(c, *(rn(2, 7, 3, 32).transpose(1, 2) for _ in range(3))),
         *AT_DEVICE_CHECK, op="attention", per_backend={"reference": ACCEPTED, "triton": ACCEPTED}),
    Case("attn-strided-last-dim", "q[..., ::2] (last-dim stride 2)", "ops.attention",
         lambda c: attn(c, q=rn(1, 2, 5, 64)[..., ::2]), ValueError, "cuda backend: q " + UNIT, op="attention",
         per_backend={"reference": ACCEPTED, "triton": ACCEPTED}),
    # ---- decode_attention
    Case("dec-q-rank", "q 4-D", "ops.decode_attention", lambda c: dec(c, q=rn(2, 2, 1, 32)),
         ValueError, r"q must be 3-D \[B, H, D\], got shape \[2, 2, 1, 32\]", op="decode_attention"),
    Case("dec-seqlens-int64", "cache_seqlens int64", "ops.decode_attention",
         lambda c: dec(c, cache_seqlens=torch.tensor([3, 5])),
         TypeError, r"cache_seqlens must be int32, got torch\.int64", op="decode_attention"),
    Case("dec-seqlens-list", "cache_seqlens a list", "ops.decode_attention", lambda c: dec(c, cache_seqlens=[3, 5]),
         TypeError, r"cache_seqlens must be an int32 torch\.Tensor, got list", op="decode_attention"),
    Case("dec-seqlens-len", "cache_seqlens of length 3 for B=2", "ops.decode_attention",
         lambda c: dec(c, cache_seqlens=torch.tensor([1, 2, 3], dtype=torch.int32)),
         ValueError, r"cache_seqlens must have shape \[2\], got \[3\]", op="decode_attention"),
    Case("dec-seqlens-device", "cache_seqlens on another device (meta)", "ops.decode_attention",
         lambda c: dec(c, cache_seqlens=torch.zeros(2, dtype=torch.int32, device=META)),
         RuntimeError, r"cache_seqlens is on meta but q is on cpu", op="decode_attention"),
    Case("dec-seqlens-negative", "cache_seqlens [-1, 5]", "ops.decode_attention", lambda c: dec(c, seqlens=(-1, 5)),
         ValueError, r"cache_seqlens has a negative length \(-1\)", op="decode_attention"),
    Case("dec-seqlens-over", "cache_seqlens 9 > T_max 8 (no append)", "ops.decode_attention",
         lambda c: dec(c, seqlens=(2, 9), append=False),
         ValueError, r"cache_seqlens has length 9: exceeds the cache \(T_max = 8\)", op="decode_attention"),
    Case("dec-append-overflow", "append at cache_seqlens = T_max (a full cache)", "ops.decode_attention",
         lambda c: dec(c, seqlens=(8, 0)),
         ValueError, r"cache_seqlens has length 8: appending k_new/v_new would overflow the cache \(T_max = 8\)",
         op="decode_attention"),
    Case("dec-knew-alone", "k_new without v_new", "ops.decode_attention", lambda c: dec(c, v_new=None),
         ValueError, r"k_new and v_new must be given together", op="decode_attention"),
    Case("dec-vcache-shape", "v_cache with another T_max", "ops.decode_attention",
         lambda c: dec(c, v_cache=rn(2, 2, 9, 32)),
         ValueError, r"v_cache must have shape \[2, 2, 8, 32\], got \[2, 2, 9, 32\]", op="decode_attention"),
    Case("dec-tmax0", "caches with T_max = 0", "ops.decode_attention",
         lambda c: dec(c, t=0, seqlens=(0, 0), append=False),
         ValueError, r"k_cache has T_max = 0", op="decode_attention"),
    Case("dec-batch0", "batch of 0", "ops.decode_attention", lambda c: dec(c, b=0, seqlens=()),
         ValueError, r"q is empty \(shape \[0, 2, 32\]\)", op="decode_attention"),
    Case("dec-mixed-dtype", "k_cache bf16 with q fp32", "ops.decode_attention",
         lambda c: dec(c, k_cache=rn(2, 2, 8, 32, dtype=torch.bfloat16)),
         TypeError, r"k_cache has dtype torch\.bfloat16 but q has torch\.float32", op="decode_attention"),
    Case("dec-expanded-append", "append into an expand()-ed k_cache (silently corrupted it before)",
         "ops.decode_attention", lambda c: dec(c, k_cache=expanded_cache()),
         ValueError, r"k_cache has overlapping strides \(.*\) for shape \[2, 2, 8, 32\]", op="decode_attention"),
    Case("dec-expanded-read", "read-only decode from an expand()-ed k_cache", "ops.decode_attention",
         lambda c: dec(c, k_cache=expanded_cache(), append=False),
         *AT_DEVICE_CHECK, op="decode_attention", per_backend={"reference": ACCEPTED, "triton": ACCEPTED}),
    Case("dec-head-dim-16", "head dim 16", "ops.decode_attention", lambda c: dec(c, d=16),
         ValueError, r"cuda backend: head dim D = 16 is not supported", op="decode_attention",
         per_backend={"reference": ACCEPTED, "triton": (ValueError, r"triton decode_attention supports head dims "
                                                        r"\(32, 64, 128\); got q with D=16")}),
    Case("dec-cache-slice", "caches sliced along T_max (big[:, :, :8])", "ops.decode_attention",
         lambda c: dec(c, k_cache=rn(2, 2, 12, 32)[:, :, :8], v_cache=rn(2, 2, 12, 32)[:, :, :8]),
         *AT_DEVICE_CHECK, op="decode_attention", per_backend={"reference": ACCEPTED, "triton": ACCEPTED}),
    # ---- model
    Case("fwd-float-ids", "float input_ids", "GPT2.forward", lambda c: tiny_model()(ids().float()),
         TypeError, r"input_ids must be an integer tensor, got torch\.float32"),
    Case("fwd-1d-ids", "1-D input_ids", "GPT2.forward", lambda c: tiny_model()(ids()[0]),
         ValueError, r"input_ids must be 2-D \[batch, seq\], got shape \[5\]"),
    Case("fwd-empty", "input_ids [2, 0]", "GPT2.forward", lambda c: tiny_model()(ids(2, 0)),
         ValueError, r"input_ids is empty \(shape \[2, 0\]\)"),
    Case("fwd-id-over-vocab", "id 64 with vocab 64", "GPT2.forward",
         lambda c: tiny_model()(torch.tensor([[1, 64]])),
         ValueError, r"input_ids contains id 64, outside the vocabulary \[0, 64\)"),
    Case("fwd-id-negative", "id -1", "GPT2.forward", lambda c: tiny_model()(torch.tensor([[-1, 3]])),
         ValueError, r"input_ids contains id -1, outside the vocabulary \[0, 64\)"),
    Case("fwd-too-long", "33 tokens with n_positions 32", "GPT2.forward", lambda c: tiny_model()(ids(1, 33)),
         ValueError, r"sequence length 33 exceeds n_positions=32"),
    Case("fwd-other-device", "input_ids on another device (meta)", "GPT2.forward",
         lambda c: tiny_model()(ids().to(META)), RuntimeError, r"input_ids is on meta but the model is on cpu"),
    Case("cache-too-long", "setup_cache(max_len=33) with n_positions 32", "GPT2.setup_cache",
         lambda c: tiny_model().setup_cache(2, 33), ValueError, r"max_len must be in \[1, n_positions=32\], got 33"),
    Case("cache-batch0", "setup_cache(batch_size=0)", "GPT2.setup_cache", lambda c: tiny_model().setup_cache(0, 8),
         ValueError, r"batch_size must be >= 1, got 0"),
    Case("prefill-no-cache", "prefill before setup_cache", "GPT2.prefill", lambda c: tiny_model().prefill(ids()),
         RuntimeError, r"call setup_cache\(2, max_len\) before prefill"),
    Case("prefill-too-long", "prompt of 10 into an 8-position cache", "GPT2.prefill",
         lambda c: prefilled(8, 10), ValueError, r"prompt length 10 exceeds the cache's max_len 8"),
    Case("prefill-length0", "lengths [0, 5]", "GPT2.prefill",
         lambda c: prefill_lengths(torch.tensor([0, 5])),
         ValueError, r"lengths must lie in \[1, 5\], got \[0, 5\]"),
    Case("decode-no-cache", "decode_step before setup_cache", "GPT2.decode_step",
         lambda c: tiny_model().decode_step(torch.tensor([1, 2])), RuntimeError, r"call setup_cache\(B, max_len\)"),
    Case("decode-float-tokens", "float tokens", "GPT2.decode_step",
         lambda c: prefilled().decode_step(torch.tensor([1.0, 2.0])),
         ValueError, r"tokens must be integer ids \[2\], got torch\.float32 \[2\]"),
    Case("decode-full", "decode_step on a full cache", "GPT2.decode_step",
         lambda c: full_cache().decode_step(torch.tensor([1, 2])),
         ValueError, r"the KV cache is full \(8 positions\)"),
    # ---- generate
    Case("gen-zero-new", "max_new_tokens=0", "GPT2.generate", lambda c: tiny_model().generate(ids(), max_new_tokens=0),
         ValueError, r"max_new_tokens must be >= 1, got 0"),
    Case("gen-past-context", "prompt 30 + 3 new > n_positions 32", "GPT2.generate",
         lambda c: tiny_model().generate(ids(1, 30), max_new_tokens=3),
         ValueError, r"prompt length 30 \+ max_new_tokens 3 exceeds the model's n_positions=32"),
    Case("gen-top-p-0", "top_p=0", "GPT2.generate", lambda c: tiny_model().generate(ids(), do_sample=True, top_p=0.0),
         ValueError, r"top_p must lie in \(0, 1\], got 0\.0"),
    Case("gen-temp-0", "temperature=0 with do_sample", "GPT2.generate",
         lambda c: tiny_model().generate(ids(), do_sample=True, temperature=0.0),
         ValueError, r"temperature must be > 0 when do_sample=True, got 0\.0"),
    Case("gen-temp-nan", "temperature=nan", "GPT2.generate",
         lambda c: tiny_model().generate(ids(), temperature=math.nan),
         TypeError, r"temperature must be a finite number, got nan"),
    Case("gen-top-k-neg", "top_k=-1", "GPT2.generate", lambda c: tiny_model().generate(ids(), top_k=-1),
         ValueError, r"top_k must be >= 0 \(0 disables it\), got -1"),
    Case("gen-right-padded", "right-padded attention_mask", "GPT2.generate",
         lambda c: tiny_model().generate(ids(2, 3), torch.tensor([[1, 1, 1], [1, 1, 0]])),
         ValueError, r"attention_mask must be left-padded"),
    Case("gen-eos-over-vocab", "eos_token_id 64 with vocab 64", "GPT2.generate",
         lambda c: tiny_model().generate(ids(), eos_token_id=64),
         ValueError, r"eos_token_id must be \[0, 64\), got 64"),
    Case("gen-generator-type", "generator=42", "GPT2.generate", lambda c: tiny_model().generate(ids(), generator=42),
         TypeError, r"generator must be a torch\.Generator, got int"),
    # ---- loading
    Case("load-truncated", "model.safetensors cut in half", "GPT2.from_pretrained",
         lambda c: GPT2.from_pretrained(truncated_checkpoint(c), quiet=True),
         CheckpointError, r"model\.safetensors is not a readable safetensors file \(truncated or corrupt\?\)"),
    Case("load-corrupt", "model.safetensors of random bytes", "GPT2.from_pretrained",
         lambda c: GPT2.from_pretrained(corrupt_checkpoint(c), quiet=True),
         CheckpointError, r"model\.safetensors is not a readable safetensors file \(truncated or corrupt\?\)"),
    Case("load-config-disagrees", "config.json says n_embd=64, weights are 32 wide", "GPT2.from_pretrained",
         lambda c: GPT2.from_pretrained(disagreeing_checkpoint(c), quiet=True),
         CheckpointError, r"tensor 'transformer\.\S+' has shape \[[\d, ]+\] in the checkpoint, expected \[[\d, ]+\]"),
    Case("load-no-config", "checkpoint directory without config.json", "GPT2.from_pretrained",
         lambda c: GPT2.from_pretrained(no_config_checkpoint(c), quiet=True),
         FileNotFoundError, r"no config\.json at .*noconfig"),
    Case("load-no-weights", "directory with no weight file", "GPT2.from_pretrained",
         lambda c: GPT2.from_pretrained(c.root, quiet=True),
         CheckpointError, r"holds neither model\.safetensors nor pytorch_model\.bin"),
    # ---- tokenizer
    Case("tok-missing-merges", "tokenizer directory without merges.txt", "Tokenizer.from_pretrained",
         lambda c: Tokenizer.from_pretrained(tokenizer_without_merges(c)),
         FileNotFoundError, r"no tokenizer in .*: need tokenizer\.json, or vocab\.json \+ merges\.txt "
         r"\(missing merges\.txt\)"),
    Case("tok-decode-over-vocab", "decode id 50257", "Tokenizer.decode",
         lambda c: Tokenizer.default().decode([50257]), ValueError, r"ids must be ints in \[0, 50257\), got 50257"),
    Case("tok-encode-bytes", "encode(b'hi')", "Tokenizer.encode", lambda c: Tokenizer.default().encode(b"hi"),
         TypeError, r"text must be a str, got bytes"),
    # ---- command line (exit status 2 and a one-line message)
    Case("cli-top-p", "generate --top-p 0", "gpt2fast generate",
         lambda c: run_cli(c, "generate", "--random", "tiny", "--top-p", "0"),
         CliUsageExit, r"invalid sampling settings: top_p must lie in \(0, 1\], got 0\.0"),
    Case("cli-temp-nan", "generate --temperature nan", "gpt2fast generate",
         lambda c: run_cli(c, "generate", "--random", "tiny", "--temperature", "nan"),
         CliUsageExit, r"temperature must be a finite number, got nan"),
    Case("cli-past-context", "generate --max-new-tokens 200 (tiny: n_positions 128)", "gpt2fast generate",
         lambda c: run_cli(c, "generate", "--random", "tiny", "--max-new-tokens", "200"),
         CliUsageExit, r"max_new_tokens 200 exceeds the model's n_positions=128"),
    Case("cli-corrupt-model", "generate --model DIR with a corrupt model.safetensors", "gpt2fast generate",
         lambda c: run_cli(c, "generate", "--model", str(corrupt_checkpoint(c))),
         CliUsageExit, r"not a readable safetensors file \(truncated or corrupt\?\)"),
    Case("cli-missing-tokenizer", "generate --tokenizer DIR without merges.txt", "gpt2fast generate",
         lambda c: run_cli(c, "generate", "--random", "tiny", "--tokenizer", str(tokenizer_without_merges(c))),
         CliUsageExit, r"no tokenizer in .* \(missing merges\.txt\)"),
]  # fmt: skip


def _params():
    for case in CASES:
        for backend in OP_BACKENDS if case.op else (None,):
            yield pytest.param(case, backend, id=case.id + (f"-{backend}" if backend else ""))


# ----------------------------------------------------------------------------- launch accounting
@dataclass
class Counts:
    """Calls that reached each backend module's ops, and kernel launches."""

    dispatched: int = 0
    launched: int = 0


def _counting(fn, counts: Counts, attr: str):
    def wrapper(*args, **kwargs):
        setattr(counts, attr, getattr(counts, attr) + 1)
        return fn(*args, **kwargs)

    return wrapper


@pytest.fixture
def counts(monkeypatch) -> Counts:
    """Count backend-op calls (every backend) and kernel launches (Triton interpreter launches and the
    launchers of a mocked ``gpt2fast._C``, which also makes the cuda backend dispatchable for CPU tensors)."""
    c = Counts()
    for name in OP_BACKENDS:
        mod = importlib.import_module(f"gpt2fast.ops.{name}")
        for op in OP_NAMES:
            monkeypatch.setattr(mod, op, _counting(getattr(mod, op), c, "dispatched"))
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setattr(InterpretedFunction, "run", _counting(InterpretedFunction.run, c, "launched"))
    ext = mock.MagicMock(name="gpt2fast._C")
    ext.device_count.return_value = (1, 0, "")
    for op in OP_NAMES:
        getattr(ext, op).side_effect = _counting(lambda *a, **k: None, c, "launched")
    monkeypatch.setattr(cuda_backend, "_load_ext", lambda: ext)
    monkeypatch.setattr(cuda_backend, "_runtime", None)
    monkeypatch.setattr(cuda_backend, "is_available", lambda device: (True, "mocked for the catalogue"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return c


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> SimpleNamespace:
    """A tiny saved checkpoint (``ckpt``), copied and broken by the loading rows."""
    ckpt = tmp_path_factory.mktemp("catalogue") / "ckpt"
    tiny_model().save_pretrained(ckpt)
    return SimpleNamespace(ckpt=ckpt)


def _contiguous(value):
    return value.contiguous().clone() if isinstance(value, torch.Tensor) else value


def _reference_on_copies(case: Case, ctx: SimpleNamespace):
    """Re-run ``case`` on the reference backend with every tensor argument made contiguous (same random draws)."""
    calls = []
    real = {op: getattr(ops, op) for op in OP_NAMES}

    def capture(op):
        def run(*args, **kwargs):
            calls.append((op, [_contiguous(a) for a in args], {k: _contiguous(v) for k, v in kwargs.items()}))
            return real[op](*args, **kwargs)

        return run

    with mock.patch.multiple(ops, **{op: capture(op) for op in OP_NAMES}):
        torch.manual_seed(1)
        out = case.call(ctx)
    (op, args, kwargs), = calls  # fmt: skip
    kwargs["backend"] = "reference"
    return out, real[op](*args, **kwargs)


# ----------------------------------------------------------------------------- the test
@pytest.mark.parametrize(("case", "backend"), list(_params()))
def test_bad_input(case: Case, backend: str | None, files, capsys, request, tmp_path):
    """Each bad input raises its exception with a message naming the argument, before any kernel launch."""
    counts = request.getfixturevalue("counts") if case.op else Counts()  # the cuda mock only for op rows
    ctx = SimpleNamespace(backend=backend, capsys=capsys, root=tmp_path, ckpt=files.ckpt)
    expected = case.outcome(backend)
    if expected is ACCEPTED:
        out, ref = _reference_on_copies(case, ctx)
        for o, r in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
            assert_fa_close(o, r, msg=f"{case.id} on {backend}")
        assert counts.launched > 0 or backend == "reference"
        return
    exc, regex = expected
    torch.manual_seed(1)
    with pytest.raises(exc, match=regex):
        case.call(ctx)
    assert counts.launched == 0, f"{case.id}: a kernel was launched before the error"
    if case.op and not case.per_backend:
        assert counts.dispatched == 0, f"{case.id}: the shared validation let the input reach the {backend} backend"


def test_launch_counters_can_fail(counts: Counts):
    """The accounting above is live: a valid call on triton launches and dispatches."""
    ops.layer_norm(rn(2, 32), rn(32), rn(32), backend="triton")
    assert counts.launched >= 1 and counts.dispatched == 1


def test_catalogue_size_and_coverage():
    """At least 25 bad inputs, covering every op and every public entry point."""
    apis = {c.api for c in CASES}
    assert len(CASES) >= 25
    assert {c.op for c in CASES if c.op} == set(OP_NAMES)
    needed = {"GPT2.forward", "GPT2.prefill", "GPT2.decode_step", "GPT2.setup_cache", "GPT2.generate"}
    assert needed | {"GPT2.from_pretrained", "Tokenizer.from_pretrained", "gpt2fast generate"} <= apis
