"""Training through ``GPT2``: the loss and every gradient against transformers, dropout, train/eval modes,
and ``torch.compile`` of a training step.

Gradient parity runs with dropout off on odd configs (n_embd not a power of two, T not a multiple of any tile,
labels padded with -100): fp32 within 1e-4 relative to the largest reference gradient of each tensor, fp16/bf16
within the FlashAttention rule applied to every gradient.  Every backend that can train the model runs: the
reference on CPU, Triton under its interpreter once it registers backward kernels for all the model's ops.
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from _backends import DEVICE
from test_model_parity import hf_model, random_ids

from gpt2fast import GPT2, ops
from gpt2fast.loading import _is_conv1d
from gpt2fast.ops._registry import get_impl
from gpt2fast.testing import assert_fa_close
from gpt2fast.testing.conformance import count_dispatches, count_triton_launches

transformers = pytest.importorskip("transformers")

NO_DROPOUT = dict(embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
#: Head dim 24 (no kernel has it: the reference only); V = 101, T = 13.
ODD = dict(vocab_size=101, n_positions=40, n_embd=48, n_layer=2, n_head=2)
#: Head dim 32 (the kernels' smallest), n_embd 96; T = 37 is no multiple of any tile.
ODD_TRITON = dict(vocab_size=101, n_positions=48, n_embd=96, n_layer=2, n_head=3)
#: The ops one training step of the model runs (decode_attention never needs a gradient).
TRAINING_OPS = ("layer_norm", "bias_gelu", "attention", "linear_cross_entropy")

needs_loss = pytest.mark.skipif(
    not hasattr(ops, "linear_cross_entropy"),
    reason="ops.linear_cross_entropy (issue 11 item 2) is not registered in this tree",
)


def cannot_train(backend: str) -> str | None:
    """Why ``backend`` cannot run a training step of the model on ``DEVICE`` (an op it lacks or has no backward
    for), or None."""
    status = ops.backend_status(backend, DEVICE)
    if not status.available:
        return f"{backend} unavailable: {status.reason}"
    have = {(r.op, r.backend) for r in ops.implementations(DEVICE)}
    for op in TRAINING_OPS:
        if (op, backend) not in have:
            return f"{backend} does not implement {op!r} yet"
        if not get_impl(op, backend).differentiable:
            return f"{backend} registers no backward for {op!r} yet"
    return None


def trainable(backend: str, config: dict):
    """``pytest.param(backend, config)``, skipped with the reason when ``backend`` cannot train here."""
    reason = cannot_train(backend) if hasattr(ops, "linear_cross_entropy") else "no linear_cross_entropy"
    return pytest.param(backend, config, id=backend, marks=pytest.mark.skipif(reason is not None, reason=str(reason)))


BACKENDS = [trainable("reference", ODD), trainable("triton", ODD_TRITON)]


def padded_labels(ids: torch.Tensor) -> torch.Tensor:
    """``ids`` as labels with -100 padding: the tail of row 0, every third token of row 1."""
    labels = ids.clone()
    labels[0, -4:] = -100
    labels[1, ::3] = -100
    return labels


def train_step(model, ids: torch.Tensor, labels: torch.Tensor, embed: torch.nn.Module) -> tuple[torch.Tensor, dict]:
    """One forward + backward of ``model`` (gpt2fast or transformers); returns the loss and the gradients:
    every parameter's (by gpt2fast name, in gpt2fast's layout) and the token-embedding output's (``"embeddings"``)."""
    model.zero_grad(set_to_none=True)
    seen = []

    def keep(module, inputs, out):
        out.retain_grad()
        seen.append(out)

    hook = embed.register_forward_hook(keep)
    try:
        loss = model(ids, labels=labels).loss
        loss.backward()
    finally:
        hook.remove()
    if isinstance(model, GPT2):
        grads = {n: p.grad for n, p in model.named_parameters()}
    else:  # transformers: "transformer." names, Conv1D weights [in, out]; the LM head shares wte's gradient
        grads = {n: p.grad.t() if _is_conv1d(n) else p.grad for n, p in model.transformer.named_parameters()}
    grads["embeddings"] = seen[0].grad
    return loss.detach(), grads


def hf_and_ours(config: dict, backend: str, dtype: torch.dtype = torch.float32, **hf_kwargs):
    """(transformers model in fp32, gpt2fast copy in ``dtype`` on ``backend``), both in train mode and trainable."""
    hf = hf_model(config, **{**NO_DROPOUT, **hf_kwargs}).train()
    model = GPT2.from_hf(hf, dtype=dtype, device=DEVICE, backend=backend).train().requires_grad_(True)
    return hf.to(DEVICE), model


def assert_relative(out: torch.Tensor, ref: torch.Tensor, rtol: float, msg: str) -> None:
    """``max|out - ref| <= rtol * max|ref|`` (and finite)."""
    err = (out.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    assert torch.isfinite(out).all() and err <= rtol * scale, f"{msg}: err {err:.3e} > {rtol} x {scale:.3e}"


def seq_len(config: dict) -> int:
    return 13 if config is ODD else 37


@needs_loss
@pytest.mark.parametrize("backend, config", BACKENDS)
def test_fp32_loss_and_every_gradient_match_transformers(backend, config):
    hf, model = hf_and_ours(config, backend)
    ids = random_ids(config["vocab_size"], (3, seq_len(config))).to(DEVICE)
    labels = padded_labels(ids)
    ref_loss, ref = train_step(hf, ids, labels, hf.transformer.wte)
    with count_dispatches() as forward_calls:
        out = model(ids, labels=labels)
    assert out.logits is None and out.loss.dim() == 0
    assert {b for _, b in forward_calls} == {backend}, f"an op fell back: {dict(forward_calls)}"
    assert forward_calls[("linear_cross_entropy", backend)] == 1
    with count_triton_launches() if backend == "triton" else nullcontext({}) as launches:
        loss, grads = train_step(model, ids, labels, model.wte)
    if backend == "triton":
        assert sum(launches.values()) > 0, "no Triton kernel ran in the backward pass"
    assert_relative(loss, ref_loss, 1e-4, "loss")
    assert set(grads) == set(ref)
    for name, g in grads.items():
        assert g is not None, f"{name} got no gradient"
        assert_relative(g, ref[name], 1e-4, name)


@needs_loss
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend, config", BACKENDS)
def test_low_precision_gradients_follow_the_tolerance_rule(backend, config, dtype):
    """Each gradient against transformers' fp32 one, with transformers' own in ``dtype`` as the baseline."""
    hf, model = hf_and_ours(config, backend, dtype)
    ids = random_ids(config["vocab_size"], (2, seq_len(config))).to(DEVICE)
    labels = padded_labels(ids)
    ref_loss, ref = train_step(hf, ids, labels, hf.transformer.wte)
    base_loss, base = train_step(hf.to(dtype), ids, labels, hf.transformer.wte)
    loss, grads = train_step(model, ids, labels, model.wte)
    assert_fa_close(loss, ref_loss, base_loss, msg="loss")
    for name, g in grads.items():
        assert g.dtype == dtype
        assert_fa_close(g, ref[name], base[name], msg=name)


@needs_loss
def test_dropout_masks_and_gradients_equal_transformers_under_one_seed():
    """With dropout on, gpt2fast draws the same masks in the same order as transformers' SDPA model: embeddings,
    then per block the attention probabilities, the attention output and the MLP output.  Same seed, same loss
    and gradients: every dropout sits where transformers has it, with its probability."""
    drop = dict(embd_pdrop=0.1, resid_pdrop=0.2, attn_pdrop=0.3)
    hf = hf_model(ODD, attn_implementation="sdpa", **drop).train()
    model = GPT2.from_hf(hf, backend="reference").train().requires_grad_(True)
    ids = random_ids(ODD["vocab_size"], (3, 13))
    labels = padded_labels(ids)
    torch.manual_seed(7)
    ref_loss, ref = train_step(hf, ids, labels, hf.transformer.wte)
    torch.manual_seed(7)
    loss, grads = train_step(model, ids, labels, model.wte)
    assert_relative(loss, ref_loss, 1e-5, "loss")
    for name, g in grads.items():
        assert_relative(g, ref[name], 1e-4, name)
    torch.manual_seed(8)  # another seed, other masks
    assert (model(ids, labels=labels).loss - loss).abs().item() > 1e-4
    model.eval()  # no dropout: the same as a model without it
    plain = GPT2.from_hf(hf_model(ODD, attn_implementation="sdpa", **NO_DROPOUT), backend="reference")
    with torch.no_grad():
        assert torch.equal(model(ids), plain(ids))


def _refuse(name: str):
    def refuse(*args, **kwargs):
        raise AssertionError(f"{name} ran outside training")

    return refuse


def test_eval_mode_runs_no_dropout_code(monkeypatch):
    """Dropout is in the config (0.1 each by default) but eval() + no_grad never reaches any of it: forward,
    prefill and decode run exactly the ops they ran before training support."""
    hf = hf_model(ODD)  # transformers' default dropout probabilities
    model = GPT2.from_hf(hf, backend="reference")
    assert (model.config.embd_pdrop, model.config.attn_pdrop, model.config.resid_pdrop) == (0.1, 0.1, 0.1)
    monkeypatch.setattr(F, "dropout", _refuse("F.dropout"))
    monkeypatch.setattr(F, "scaled_dot_product_attention", _refuse("SDPA"))
    ids = random_ids(ODD["vocab_size"], (2, 5))
    model.setup_cache(2, 8)
    L = ODD["n_layer"]
    with torch.no_grad(), count_dispatches() as counts:
        logits = model(ids)
        model.prefill(ids)
        model.decode_step(ids[:, 0])
    assert logits.grad_fn is None
    assert dict(counts) == {
        ("layer_norm", "reference"): 3 * (2 * L + 1),
        ("bias_gelu", "reference"): 3 * L,
        ("attention", "reference"): 2 * L,
        ("decode_attention", "reference"): L,
    }


def test_train_mode_attention_dropout_is_sdpa_and_no_dropout_keeps_the_kernels(monkeypatch):
    """attn_pdrop > 0 in train(): the attention runs as SDPA with dropout (the one op that falls back);
    attn_pdrop = 0: the registry's attention op, even in train()."""
    L = ODD["n_layer"]
    sdpa_calls = []
    real_sdpa = F.scaled_dot_product_attention

    def sdpa(*args, **kwargs):
        sdpa_calls.append(kwargs.get("dropout_p"))
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    ids = random_ids(ODD["vocab_size"], (2, 9))
    for attn_pdrop, expect_sdpa in ((0.25, L), (0.0, 0)):
        sdpa_calls.clear()
        model = GPT2.from_hf(hf_model(ODD, attn_pdrop=attn_pdrop), backend="reference").train()
        with count_dispatches() as counts:
            model(ids)
        assert sdpa_calls == [attn_pdrop] * expect_sdpa
        assert counts[("attention", "reference")] == L - expect_sdpa
        assert counts[("layer_norm", "reference")] == 2 * L + 1 and counts[("bias_gelu", "reference")] == L


def test_train_mode_dropout_is_random_and_eval_is_not():
    model = GPT2.from_hf(hf_model(ODD), backend="reference").train()  # 0.1 everywhere
    ids = random_ids(ODD["vocab_size"], (2, 9))
    with torch.no_grad():
        a, b = model(ids), model(ids)
        model.eval()
        c, d = model(ids), model(ids)
    assert not torch.equal(a, b)
    assert torch.equal(c, d)


@needs_loss
def test_labels_shift_inside_and_ignored_labels_drop_out_of_the_mean():
    """The loss is the mean over predicted tokens that are not -100, position t predicting labels[t + 1];
    nothing to predict (all -100, or T = 1) gives 0, not NaN."""
    model = GPT2.from_hf(hf_model(ODD), backend="reference")
    ids = random_ids(ODD["vocab_size"], (2, 6))
    labels = padded_labels(ids)
    with torch.no_grad():
        logits = model(ids).float()
        loss = model(ids, labels=labels).loss
        expected = F.cross_entropy(logits[:, :-1].reshape(-1, 101), labels[:, 1:].reshape(-1), ignore_index=-100)
        assert_relative(loss, expected, 1e-5, "loss")
        assert model(ids, labels=torch.full_like(ids, -100)).loss.item() == 0.0
        assert model(ids[:, :1], labels=ids[:, :1]).loss.item() == 0.0


@needs_loss
def test_out_of_range_labels_are_refused():
    model = GPT2.from_hf(hf_model(ODD), backend="reference")
    ids = random_ids(ODD["vocab_size"], (2, 6))
    for bad in (101, -5):
        labels = ids.clone()
        labels[1, 3] = bad
        with pytest.raises(ValueError, match="labels"):
            model(ids, labels=labels)


@needs_loss
def test_torch_compile_of_a_training_step_matches_eager():
    """forward + backward of the model under torch.compile (aot_eager: the compiled forward and the backward
    AOTAutograd derives from it) give eager's loss and gradients.  Few tokens: the reference loss's chunk loop is
    traced chunk by chunk."""
    hf = hf_model(ODD, **NO_DROPOUT)
    ids = random_ids(ODD["vocab_size"], (2, 6))
    labels = padded_labels(ids)
    eager = GPT2.from_hf(hf, backend="reference").train().requires_grad_(True)
    model = GPT2.from_hf(hf, backend="reference").train().requires_grad_(True)
    compiled = torch.compile(model, backend="aot_eager")
    ref_loss, ref = train_step(eager, ids, labels, eager.wte)
    model.zero_grad(set_to_none=True)
    loss = compiled(ids, labels=labels).loss
    loss.backward()
    assert_relative(loss.detach(), ref_loss, 1e-6, "loss")
    for name, p in model.named_parameters():
        assert_relative(p.grad, ref[name], 1e-5, name)
