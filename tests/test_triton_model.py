"""A whole tiny GPT-2 on the Triton backend against the same model on the reference backend.

Without CUDA this runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1), so the model
is tiny; the ``gpu`` test runs GPT-2-small-sized layers in fp16 on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from gpt2fast import GPT2, ops
from gpt2fast.config import GPT2Config
from gpt2fast.testing import assert_fa_close
from gpt2fast.testing.conformance import count_dispatches

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STATUS = ops.backend_status("triton", DEVICE)
pytestmark = pytest.mark.skipif(not STATUS.available, reason=f"triton backend unavailable: {STATUS.reason}")

#: Head dim 32 (2 heads of 64-wide embeddings), a vocab that is no multiple of 16, 2 layers.
TINY = dict(vocab_size=101, n_positions=64, n_embd=64, n_layer=2, n_head=2)


def models(dtype=torch.float32, seed=0, **cfg):
    """(reference model, triton model) with identical random weights, every parameter perturbed
    (LayerNorm weights and biases included), in ``dtype`` on the test device."""
    config = GPT2Config(**{**TINY, **cfg})
    torch.manual_seed(seed)
    ref = GPT2(config, backend="reference")
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    tri = GPT2(config, backend="triton")
    tri.load_state_dict(ref.state_dict())
    return ref.to(DEVICE, dtype).eval(), tri.to(DEVICE, dtype).eval()


def ids(b, t, vocab=TINY["vocab_size"], seed=1):
    """Random token ids [b, t]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=g).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_logits_match_reference(dtype):
    ref32, _ = models(torch.float32)
    ref, tri = models(dtype)
    x = ids(2, 37)
    with torch.no_grad():
        assert_fa_close(tri(x), ref32(x), ref(x), msg=f"logits {dtype}")


def run_greedy(model, prompt, lengths, steps, max_len):
    """prefill + ``steps`` greedy decode steps; returns (tokens [B, steps], per-step logits)."""
    model.setup_cache(prompt.shape[0], max_len)
    logits = model.prefill(prompt, lengths)
    tokens, all_logits = [], [logits]
    for _ in range(steps):
        nxt = logits.argmax(-1)
        tokens.append(nxt)
        logits = model.decode_step(nxt)
        all_logits.append(logits)
    return torch.stack(tokens, 1), all_logits


def test_prefill_decode_greedy_tokens_match_reference():
    # Right-padded prompts of different lengths (1 and 9); the cache fills to max_len exactly.
    ref, tri = models(torch.float32)
    prompt = ids(2, 9)
    lengths = torch.tensor([1, 9], dtype=torch.int32, device=DEVICE)
    steps, max_len = 7, 16
    tok_r, log_r = run_greedy(ref, prompt, lengths, steps, max_len)
    tok_t, log_t = run_greedy(tri, prompt, lengths, steps, max_len)
    for i, (lt, lr) in enumerate(zip(log_t, log_r, strict=True)):
        assert_fa_close(lt, lr, msg=f"step {i}")
    assert torch.equal(tok_t, tok_r)
    assert torch.equal(tri.cache.seqlens, ref.cache.seqlens)
    assert tri.cache.seqlens.tolist() == [1 + steps, 9 + steps]


def test_generate_matches_reference():
    ref, tri = models(torch.float32, seed=3)
    if not hasattr(tri, "generate"):
        pytest.skip("GPT2.generate not available")
    prompt = ids(1, 5, seed=4)
    out_r = ref.generate(prompt, max_new_tokens=6)
    out_t = tri.generate(prompt, max_new_tokens=6)
    assert torch.equal(out_t, out_r)


def test_backend_setter_moves_every_op_to_the_new_backend():
    """``model.backend = name`` reaches every op module: each call of a forward then runs on ``name``."""
    ref, _ = models(torch.float32)
    x = ids(1, 4)
    L = TINY["n_layer"]
    per_op = {"layer_norm": 2 * L + 1, "bias_gelu": L, "attention": L}
    with torch.no_grad(), count_dispatches() as counts:
        expected = ref(x)
    assert dict(counts) == {(op, "reference"): n for op, n in per_op.items()}
    ref.backend = "triton"
    with torch.no_grad(), count_dispatches() as counts:
        got = ref(x)
    assert dict(counts) == {(op, "triton"): n for op, n in per_op.items()}
    assert ref.backend == "triton"
    assert_fa_close(got, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_gpt2_small_shapes(dtype):
    # GPT-2 small's widths (768, 12 heads of 64) with 2 layers, a 500-token prompt and 20 decode steps.
    shape = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=2, n_head=12)
    ref32, _ = models(torch.float32, **shape)
    ref, tri = models(dtype, **shape)
    x = ids(2, 500, vocab=shape["vocab_size"])
    with torch.no_grad():
        assert_fa_close(tri(x), ref32(x), ref(x), msg=f"logits {dtype}")
    lengths = torch.tensor([300, 500], dtype=torch.int32, device=DEVICE)
    tokens, log32 = run_greedy(ref32, x, lengths, 20, 1024)
    # Teacher forcing: all three models decode ref32's greedy tokens, so low-precision ties cannot diverge.
    log_r, log_t = (forced(m, x, lengths, tokens, 1024) for m in (ref, tri))
    for i, (lt, l32, lr) in enumerate(zip(log_t, log32, log_r, strict=True)):
        assert_fa_close(lt, l32, lr, msg=f"{dtype} step {i}")


def forced(model, prompt, lengths, tokens, max_len):
    """prefill, then decode the given tokens [B, steps]; returns the per-step logits."""
    model.setup_cache(prompt.shape[0], max_len)
    out = [model.prefill(prompt, lengths)]
    for i in range(tokens.shape[1]):
        out.append(model.decode_step(tokens[:, i]))
    return out
