"""A patched transformers GPT-2 trains: loss, logits and every gradient match the unpatched model.

The patched modules run gpt2fast's differentiable implementations in ``train()`` mode with grad enabled (the
registry runs only differentiable implementations when a gradient is needed; ``reference`` is), and with labels
the loss goes through ``ops.linear_cross_entropy``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
import transformers
from transformers import GPT2DoubleHeadsModel

from gpt2fast import hf_patch_stats, ops, patch_hf
from gpt2fast.ops._registry import get_impl
from gpt2fast.testing import assert_fa_close
from tests._hf import N_LAYER, count_calls, ids, tiny_model

# odd widths on purpose: n_embd not a power of two, T not a multiple of any tile, padding labels of -100
NO_DROPOUT = dict(n_embd=96, n_head=3, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0)


@pytest.fixture
def counts():
    """{op name: calls that reached a backend's implementation} during the test."""
    yield from count_calls()


def _batch(t: int = 11):
    x = ids(batch=2, t=t)
    labels = x.clone()
    labels[0, :4] = -100
    labels[1, -2:] = -100
    return x, labels


def _train_step(model, x, labels, **kw):
    """One forward + backward in train() mode: (loss, logits, {name: grad})."""
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(x, labels=labels, **kw)
    out.loss.backward()
    return out.loss.detach(), out.logits, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(got: dict, ref: dict) -> None:
    assert got.keys() == ref.keys()
    for name in ref:  # relative 1e-4, with an absolute floor for gradients that are analytically ~0
        err, scale = (got[name] - ref[name]).abs().max(), ref[name].abs().max()
        assert err <= 1e-4 * scale + 1e-7, f"{name}: gradient error {err:.2e} (max |grad| {scale:.2e})"


@pytest.mark.parametrize("fused_loss", [True, False])
def test_training_step_matches_unpatched(fused_loss, counts):
    """Loss, logits (kept by default) and every parameter's gradient, fp32, relative 1e-4."""
    x, labels = _batch()
    ref_loss, ref_logits, ref_grads = _train_step(tiny_model(**NO_DROPOUT), x, labels)
    model = patch_hf(tiny_model(**NO_DROPOUT), backend="reference", fused_loss=fused_loss)
    loss, logits, grads = _train_step(model, x, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_fa_close(logits.detach(), ref_logits.detach())
    _assert_grads_close(grads, ref_grads)
    assert counts["layer_norm"] == 2 * N_LAYER + 1 and counts["bias_gelu"] == N_LAYER
    assert counts["attention"] == N_LAYER
    assert counts["linear_cross_entropy"] == (1 if fused_loss else 0)
    assert hf_patch_stats(model).routes("loss") == (
        {"gpt2fast.linear_cross_entropy": 1} if fused_loss else {"fallback: fused_loss=False": 1}
    )


def test_skip_logits_option(counts):
    """Default: logits kept (as transformers).  ``skip_logits=None`` is Liger's rule: with labels, ``train()``
    skips them and ``eval()`` keeps them; ``True`` always skips them."""
    x, labels = _batch()
    model = patch_hf(tiny_model(**NO_DROPOUT), backend="reference")
    assert model.train()(x, labels=labels).logits is not None
    patch_hf(model, backend="reference", skip_logits=None)
    assert model.train()(x, labels=labels).logits is None
    with torch.no_grad():
        out = model.eval()(x, labels=labels)
        ref = tiny_model(**NO_DROPOUT)(x, labels=labels)
    assert_fa_close(out.logits, ref.logits)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    patch_hf(model, backend="reference", skip_logits=True)
    assert model.eval()(x, labels=labels).logits is None
    assert model(x).logits is not None  # no labels: transformers' forward
    assert counts["linear_cross_entropy"] == 4


def test_num_items_in_batch_and_shift_labels_follow_transformers(counts):
    x, labels = _batch()
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    model = patch_hf(tiny_model(**NO_DROPOUT), backend="reference")
    ref = tiny_model(**NO_DROPOUT)
    for kw in (dict(num_items_in_batch=torch.tensor(7)), dict(shift_labels=shift)):
        with torch.no_grad():
            torch.testing.assert_close(model(x, labels=labels, **kw).loss, ref(x, labels=labels, **kw).loss)
    assert counts["linear_cross_entropy"] == 2


def test_double_heads_training_matches_unpatched(counts):
    x = ids(batch=6, t=11).view(2, 3, 11)  # three different choices per example
    labels = x.clone()
    labels[0, :, :4] = -100
    inputs = dict(
        input_ids=x,
        labels=labels,
        mc_token_ids=torch.full((2, 3), x.shape[1] - 1),
        mc_labels=torch.tensor([0, 2]),
    )

    def step(model):
        model.train().zero_grad(set_to_none=True)
        out = model(**inputs)
        (out.loss + out.mc_loss).backward()
        return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = step(tiny_model(cls=GPT2DoubleHeadsModel, **NO_DROPOUT))
    model = patch_hf(tiny_model(cls=GPT2DoubleHeadsModel, **NO_DROPOUT), backend="reference")
    loss, grads = step(model)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    _assert_grads_close(grads, ref_grads)
    assert counts["linear_cross_entropy"] == 1 and counts["attention"] == N_LAYER


def test_attention_dropout_falls_back_for_attention_only(counts):
    """The kernels have no dropout: with ``attn_pdrop > 0`` in train(), attention runs transformers' code (same
    RNG stream as unpatched, so the loss matches); LayerNorm, MLP and the loss stay on gpt2fast."""
    cfg = dict(NO_DROPOUT, attn_pdrop=0.3)
    x, labels = _batch()
    ref, model = tiny_model(**cfg), patch_hf(tiny_model(**cfg), backend="reference")
    torch.manual_seed(5)
    ref_loss, _, ref_grads = _train_step(ref, x, labels)
    torch.manual_seed(5)
    loss, _, grads = _train_step(model, x, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    _assert_grads_close(grads, ref_grads)
    assert hf_patch_stats(model).routes("attention") == {"fallback: attention dropout in training (attn_pdrop=0.3)": 2}
    assert counts["layer_norm"] == 2 * N_LAYER + 1 and counts["attention"] == 0


def test_bf16_autocast_training_within_tolerance(counts):
    """Under CPU bf16 autocast (Trainer's bf16=True), LayerNorm runs in fp32 and the rest in bf16, as torch does."""
    x, labels = _batch()

    def step(model):
        model.train().zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, labels=labels).loss
        loss.backward()
        return loss.detach().float(), model.transformer.wte.weight.grad

    ref32_loss, _, ref32_grads = _train_step(tiny_model(**NO_DROPOUT), x, labels)  # fp32, no autocast
    base_loss, base_grad = step(tiny_model(**NO_DROPOUT))  # transformers under autocast: the baseline
    loss, grad = step(patch_hf(tiny_model(**NO_DROPOUT), backend="reference"))
    ref32_grad = ref32_grads["transformer.wte.weight"]
    assert_fa_close(loss.reshape(1), ref32_loss.reshape(1), base_loss.reshape(1), msg="loss")
    assert_fa_close(grad, ref32_grad, base_grad, msg="wte gradient")
    assert counts["layer_norm"] == 2 * N_LAYER + 1 and counts["linear_cross_entropy"] == 1


def test_torch_compile_aot_eager_forward_and_backward():
    """The patched model compiles (aot_eager: forward and backward), matches the unpatched gradients and, once
    compiled, does not recompile per step.  ``count_dispatches`` is not used here: its counter, read inside the
    graph, would itself force recompiles; the graph runs the patched forward (no logits: the fused loss ran)."""
    x, labels = _batch()
    cfg = dict(NO_DROPOUT, n_layer=1)  # one layer: compiling is the slow part
    ref_loss, _, ref_grads = _train_step(tiny_model(**cfg), x, labels)
    model = patch_hf(tiny_model(**cfg), backend="reference", skip_logits=True)
    _train_step(model, x, labels)  # one eager step first: the registry memoises its choices (see ops/README.md)
    assert hf_patch_stats(model).routes("loss") == {"gpt2fast.linear_cross_entropy": 1}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    loss, logits, grads = _train_step(compiled, x, labels)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert logits is None  # skip_logits=True: the patched head's fused loss, inside the graph
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    _assert_grads_close({n.removeprefix("_orig_mod."): g for n, g in grads.items()}, ref_grads)
    assert hf_patch_stats(model).fallback() == 0  # compiled calls are not counted (see HFPatchStats)
    for _ in range(2):
        torch.testing.assert_close(_train_step(compiled, x, labels)[0], loss)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no recompilation


def test_trainer_runs_a_patched_tiny_model(tmp_path, counts):
    """A few ``transformers.Trainer`` steps on a patched model: the same losses as the unpatched model's run."""
    pytest.importorskip("accelerate")
    x = ids(batch=8, t=12)
    rows = [{"input_ids": r, "labels": r} for r in x]

    def train(model, name):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / name),
            per_device_train_batch_size=4,
            max_steps=3,
            learning_rate=1e-3,
            logging_steps=1,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            seed=0,
            dataloader_num_workers=0,
        )
        trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    ref = train(tiny_model(**NO_DROPOUT), "ref")
    model = patch_hf(tiny_model(**NO_DROPOUT), backend="reference")
    got = train(model, "patched")
    assert len(got) == len(ref) == 3
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-4, atol=1e-5)
    stats = hf_patch_stats(model)
    assert stats.routes("loss") == {"gpt2fast.linear_cross_entropy": 3}
    assert stats.fast("attention") == 3 * N_LAYER and stats.fallback() == 0
    assert counts["linear_cross_entropy"] == 3


def test_named_backend_without_backward_falls_back_with_the_reason(counts):
    """A named backend whose implementation has no backward is not run when a gradient is needed."""
    ok = ops.backend_status("triton", "cpu").available
    if not ok:
        pytest.skip("triton unavailable")
    x, labels = _batch()
    model = patch_hf(tiny_model(**NO_DROPOUT), backend="triton", fused_loss=False)
    loss, _, grads = _train_step(model, x, labels)
    ref_loss, _, ref_grads = _train_step(tiny_model(**NO_DROPOUT), x, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    _assert_grads_close(grads, ref_grads)
    for site, routes in (("layer_norm", 2 * N_LAYER + 1), ("attention", N_LAYER)):
        got = hf_patch_stats(model).routes(site)
        if get_impl(site, "triton").differentiable:
            assert got == {f"gpt2fast.{site}": routes}, got
        else:
            assert sum(got.values()) == routes and all("has no backward" in r for r in got), got
