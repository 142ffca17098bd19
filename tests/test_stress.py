"""Numerical stress: extreme but representable inputs must give finite results within the FlashAttention rule.

* Attention (prefill and decode) in fp16/bf16 with q/k scaled so the scores reach about ±1e4 before the softmax,
  over long sequences / caches (longer under ``gpu``).  The inputs stay representable (|q|, |k| < 700), but
  PyTorch's own fp16 path overflows here (q·kᵀ reaches ~1e5 > 65504 before the scale is applied) and its bf16
  path rounds the scores by up to ~±40, so the baseline of the rule is the fp32 reference rounded to the
  output dtype (``baseline=None``): a stricter bound than "what PyTorch gets in that dtype".  For the same
  reason the reference backend (which computes in the input dtype) is not run here: it gives NaN in fp16 and
  errors of ~2 in bf16 on these inputs; the kernels accumulate the scores in fp32.
* LayerNorm on rows with a huge mean and a tiny spread, against an fp64 reference, with PyTorch's own result in
  the input dtype as the baseline.  Each dtype gets a spread it can represent: a value near ``m`` is stored to
  ``m * 2**-p`` (p = 23 fp32, 10 fp16, 7 bf16), so fp32 uses 1e4 + N(0, 1e-2) (spacing ~1e-3: ~10 steps per
  std) and 1e4 + N(0, 1); fp16 cannot hold 1e4 + 1e-2 (spacing 8 at 1e4) and uses 2000 + N(0, 4) (spacing 1);
  bf16 uses 300 + N(0, 8) (spacing 2).
* GELU at ±large inputs: exactly ``x`` for large positive and 0 (or -0) for large negative, never inf/NaN.
* Greedy fp16 generation of 520 tokens with a tiny model (n_positions 1024) stays finite at every step.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _backends import DEVICE, backend_params

from gpt2fast import ops
from gpt2fast.config import GPT2Config
from gpt2fast.model import GPT2
from gpt2fast.ops import reference
from gpt2fast.testing import assert_fa_close

ON_GPU = DEVICE == "cuda"


# The kernels' tanh is 2/(1 + exp(-2x)) - 1: exp overflowing to inf for large |x| is intended (it saturates to
# ±1), but Triton's interpreter computes it with numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
LOW = [torch.float16, torch.bfloat16]
#: q and k are AMP * N(0, 1): with D = 64 and the default scale, scores have std ~AMP**2 and reach ~±1e4.
AMP = 60.0


def gen(seed: int) -> torch.Generator:
    """A seeded CPU generator (values are drawn on the CPU, then moved)."""
    return torch.Generator().manual_seed(seed)


def randn(g: torch.Generator, *shape: int, dtype: torch.dtype, std: float = 1.0) -> torch.Tensor:
    """Seeded normal values in ``dtype`` on the test device."""
    return (torch.randn(*shape, generator=g) * std).to(device=DEVICE, dtype=dtype)


def max_score(q: torch.Tensor, k: torch.Tensor) -> float:
    """Largest |q·kᵀ·D**-0.5| in fp32 for q [..., Tq, D], k [..., Tk, D]: proves the inputs stress the softmax."""
    return (q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5).abs().max().item()


# ----------------------------------------------------------------------------- attention
@pytest.mark.parametrize("backend", backend_params("attention", reference=False))
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("causal", [True, False])
def test_prefill_attention_large_scores(backend, dtype, causal):
    t = 2048 if ON_GPU else 384
    g = gen(1)
    q, k = randn(g, 1, 2, t, 64, dtype=dtype, std=AMP), randn(g, 1, 2, t, 64, dtype=dtype, std=AMP)
    v = randn(g, 1, 2, t, 64, dtype=dtype)
    assert max_score(q[..., :64, :], k[..., :64, :]) > 5e3
    out = ops.attention(q, k, v, causal, backend=backend)
    ref32 = reference.attention(q.float(), k.float(), v.float(), causal)
    assert_fa_close(out, ref32, msg=f"prefill {backend} T={t} causal={causal}")


@pytest.mark.parametrize("backend", backend_params("decode_attention", reference=False))
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("append", [True, False])
def test_decode_attention_large_scores_long_cache(backend, dtype, append):
    t_max = 32768 if ON_GPU else 4096
    full = t_max - 1 if append else t_max
    seqlens = torch.tensor([full, 1, t_max // 3], dtype=torch.int32, device=DEVICE)  # full, tiny, ragged
    g = gen(2)
    q = randn(g, 3, 2, 64, dtype=dtype, std=AMP)
    kc, vc = randn(g, 3, 2, t_max, 64, dtype=dtype, std=AMP), randn(g, 3, 2, t_max, 64, dtype=dtype)
    kn = randn(g, 3, 2, 64, dtype=dtype, std=AMP) if append else None
    vn = randn(g, 3, 2, 64, dtype=dtype) if append else None
    assert max_score(q[:, :, None], kc[:, :, :256]) > 5e3
    kc_o, vc_o = kc.clone(), vc.clone()
    out = ops.decode_attention(q, kc_o, vc_o, seqlens, kn, vn, backend=backend)
    f = {n: None if t is None else t.float() for n, t in dict(q=q, kc=kc, vc=vc, kn=kn, vn=vn).items()}
    ref32 = reference.decode_attention(f["q"], f["kc"], f["vc"], seqlens, f["kn"], f["vn"])
    assert_fa_close(out, ref32, msg=f"decode {backend} T_max={t_max} seqlens={seqlens.tolist()} append={append}")


# ----------------------------------------------------------------------------- layer_norm
LN_ROWS = [
    (torch.float32, 1e4, 1e-2),  # mean/std = 1e6: fp32 spacing at 1e4 is ~1e-3, ~10 steps per std
    (torch.float32, 1e4, 1.0),
    (torch.float16, 2000.0, 4.0),  # fp16 spacing at 2000 is 1 (at 1e4 it is 8: 1e4 + 1e-2 would be 1e4)
    (torch.bfloat16, 300.0, 8.0),  # bf16 spacing at 300 is 2
]


@pytest.mark.parametrize("backend", backend_params("layer_norm"))
@pytest.mark.parametrize(("dtype", "mean", "std"), LN_ROWS, ids=[f"{d}-{m:g}+N(0,{s:g})" for d, m, s in LN_ROWS])
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_huge_mean_tiny_variance(backend, dtype, mean, std, residual):
    n = 1600
    g = gen(3)
    x = (mean + std * torch.randn(4, n, generator=g, dtype=torch.float64)).to(device=DEVICE, dtype=dtype)
    r = None
    if residual:  # split the row between x and the residual: h = x + r carries the huge mean
        r = (std * torch.randn(4, n, generator=g, dtype=torch.float64)).to(device=DEVICE, dtype=dtype)
        x = (x.double() - r.double()).to(dtype)
    w, b = randn(g, n, dtype=dtype), randn(g, n, dtype=dtype)
    out = ops.layer_norm(x, w, b, residual=r, backend=backend)
    base = reference.layer_norm(x, w, b, 1e-5, r)
    h = x if r is None else base[1]  # the residual stream as stored in the input dtype
    ref64 = F.layer_norm(h.double(), (n,), w.double(), b.double(), 1e-5)
    y, y_base = (out[0], base[0]) if residual else (out, base)
    assert_fa_close(y, ref64, y_base, msg=f"layer_norm {backend} {dtype} {mean:g}+N(0,{std:g})")
    if residual:
        assert torch.equal(out[1], base[1]), "h = x + residual must be the rounded sum"


# ----------------------------------------------------------------------------- bias_gelu
GELU_CASES = [(torch.float32, [1e4, 3e4, 1e6]), (torch.float16, [1e4, 3e4, 6e4]), (torch.bfloat16, [1e4, 1e6, 1e30])]


@pytest.mark.parametrize("backend", backend_params("bias_gelu"))
@pytest.mark.parametrize(("dtype", "mags"), GELU_CASES, ids=[str(d) for d, _ in GELU_CASES])
def test_gelu_at_large_inputs_is_exact(backend, dtype, mags):
    vals = torch.tensor([s * m for m in mags for s in (1.0, -1.0)], dtype=torch.float64)
    x = vals.to(dtype).repeat(3, 1).to(DEVICE)  # 3 rows so the row loop runs more than once
    bias = torch.zeros(x.shape[-1], dtype=dtype, device=DEVICE)
    bias[0], bias[1] = 8.0, -8.0  # bias added before the GELU: still far from the knee
    out = ops.bias_gelu(x, bias, backend=backend)
    u = x + bias
    expected = torch.where(u > 0, u, torch.zeros_like(u))
    assert torch.isfinite(out).all(), out
    assert torch.equal(out, expected), f"{backend} {dtype}: {out[0].tolist()} != {expected[0].tolist()}"


# ----------------------------------------------------------------------------- long fp16 generation
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.gpu)])
def test_greedy_fp16_generation_stays_finite(backend):
    """520 greedy fp16 decode steps after a 12-token prompt: every step's logits are finite.

    On CPU only the reference backend runs it (<1 s); the Triton interpreter needs ~160 s for 520 steps, so
    triton is ``gpu``-marked."""
    config = GPT2Config(vocab_size=512, n_positions=1024, n_embd=32, n_layer=1, n_head=1)
    model = GPT2.random(config, seed=0, dtype=torch.float16, device=DEVICE, backend=backend)
    steps = 520
    prompt = torch.randint(0, 512, (2, 12), generator=gen(4)).to(DEVICE)
    model.setup_cache(2, 12 + steps)
    logits = model.prefill(prompt)
    finite = torch.isfinite(logits).all()
    for _ in range(steps):
        logits = model.decode_step(logits.argmax(-1))
        finite &= torch.isfinite(logits).all()
    assert bool(finite), "non-finite logits during fp16 generation"
    assert model.cache.seqlens.tolist() == [12 + steps] * 2
    assert torch.isfinite(model.cache.k).all() and torch.isfinite(model.cache.v).all()
