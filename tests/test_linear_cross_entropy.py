"""``ops.linear_cross_entropy``: the reference against ``F.cross_entropy`` over the full logits, the semantics every
backend shares (all-ignored labels, unchecked out-of-range labels), the chunking, the memory bound (peak resident
memory of a subprocess at N = 8192, V = 50257) and tracing by ``torch.compile``.  Parity of the kernel backends
against the reference, loss and gradients, is in test_ops_conformance.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _backends import DEVICE, backend_params

from gpt2fast import ops
from gpt2fast.ops.specs import linear_cross_entropy as lce

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = backend_params("linear_cross_entropy")


def _inputs(n, c, vocab, *, seed=0, ignore=0, ignore_index=-100, dtype=torch.float32, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    shape = dict(n=n, c=c, v=vocab, ignore=ignore, ignore_index=ignore_index)
    inp = lce.make_inputs(shape, dtype, torch.device(device), gen)
    return inp["hidden"], inp["weight"], inp["labels"]


def _loss_and_grads(fn, hidden, weight):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fn(h, w)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize(
    ("n", "c", "vocab", "ignore", "ignore_index"),
    [(1, 16, 5, 0, -100), (40, 16, 1000, 5, -100), (70, 24, 130, 9, 0), (5, 8, 50257, 1, -100)],
)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reference_matches_cross_entropy_over_full_logits(n, c, vocab, ignore, ignore_index, reduction):
    h, w, labels = _inputs(n, c, vocab, ignore=ignore, ignore_index=ignore_index, device="cpu")
    ours = _loss_and_grads(
        lambda h, w: ops.linear_cross_entropy(h, w, labels, ignore_index, reduction, "reference"), h, w
    )
    full = _loss_and_grads(
        lambda h, w: F.cross_entropy(h @ w.t(), labels, ignore_index=ignore_index, reduction=reduction), h, w
    )
    assert ours[0].dtype == torch.float32 and ours[0].shape == ()
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), ours, full):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item())), name


def test_reference_low_precision_gradients_accumulate_in_fp32():
    # bf16 inputs: grad_weight summed over many chunks in fp32 stays as close to the fp32 result as one bf16
    # rounding of it (a bf16 running sum over 64 chunks would not)
    h, w, labels = _inputs(2048, 8, 64, device="cpu")
    assert lce.chunk_rows(2048, 64, 8) * 32 <= 2048
    ref = _loss_and_grads(lambda h, w: ops.linear_cross_entropy(h, w, labels, backend="reference"), h, w)
    low = _loss_and_grads(
        lambda h, w: ops.linear_cross_entropy(h, w, labels, backend="reference"), h.bfloat16(), w.bfloat16()
    )
    rounded = ref[2].bfloat16().float()
    assert (low[2].float() - ref[2]).abs().max() <= 4 * (rounded - ref[2]).abs().max() + 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_labels_ignored_gives_zero_not_nan(backend, reduction):
    h, w, labels = _inputs(6, 16, 50, ignore="all")
    loss, gh, gw = _loss_and_grads(lambda h, w: ops.linear_cross_entropy(h, w, labels, -100, reduction, backend), h, w)
    assert loss.item() == 0.0
    assert torch.equal(gh, torch.zeros_like(gh)) and torch.equal(gw, torch.zeros_like(gw))
    with torch.no_grad():
        assert ops.linear_cross_entropy(h, w, labels, reduction=reduction, backend=backend).item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_out_of_range_label_gives_nan_not_a_crash(backend):
    h, w, labels = _inputs(5, 16, 50)
    labels[2] = 50
    with pytest.raises(ValueError, match=r"got 50 at position 2"):
        ops.linear_cross_entropy(h, w, labels, backend=backend)
    loss, gh, _ = _loss_and_grads(
        lambda h, w: ops.linear_cross_entropy(h, w, labels, backend=backend, check_labels=False), h, w
    )
    assert loss.isnan()
    assert gh[2].isnan().all() and not gh[[0, 1, 3, 4]].isnan().any()


def test_chunking():
    # every test shape but the smallest runs several chunks; a chunk is at most 1/32 of the rows
    for shape in lce.TEST_SHAPES:
        rows = lce.chunk_rows(shape["n"], shape["v"], shape["c"])
        assert 1 <= rows and (rows * lce.CHUNK_FRACTION <= shape["n"] or rows == 1)
    assert lce.chunk_rows(8192, 50257, 768) == 128  # GPT-2 small at 8 x 1024 tokens: 64 chunks of 25 MB fp32 logits
    assert lce.chunk_rows(8192, 50257, 16) == 4
    assert lce.chunk_rows(8192, 300, 768) == 256  # a tiny vocabulary: capped at N / 32


def test_chunks_hold_one_chunk_of_logits_at_a_time():
    seen = []

    def step(logits, labels, losses, ignore_index, scale):
        seen.append(tuple(logits.shape))
        return lce.torch_step(logits, labels, losses, ignore_index, scale)

    h, w, labels = _inputs(100, 16, 1000, device="cpu")
    loss, gh, gw = lce.chunked_loss(h, w, labels, -100, "mean", True, True, step)
    rows = lce.chunk_rows(100, 1000, 16)
    assert seen == [(min(rows, 100 - s), 1000) for s in range(0, 100, rows)]
    full, full_gh, full_gw = _loss_and_grads(lambda h, w: F.cross_entropy(h @ w.t(), labels), h, w)
    assert torch.allclose(loss, full)
    assert torch.allclose(gh, full_gh, atol=1e-6) and torch.allclose(gw, full_gw, atol=1e-6)


# ---- the memory bound ----------------------------------------------------------------------------------------
_PROBE = textwrap.dedent(
    """
    import json, os, sys, time
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(1)
    from gpt2fast import ops

    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def peak():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024

    which, n, vocab, c = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n, c, generator=gen).requires_grad_()
    w = (torch.randn(vocab, c, generator=gen) * 0.5).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::50] = -100

    def run(h, w, labels):
        if which == "F.cross_entropy":
            return F.cross_entropy(h @ w.t(), labels)
        return ops.linear_cross_entropy(h, w, labels, backend=which)

    run(h[:4], w[:7], labels[:4].clamp(0, 6)).backward()  # load and warm everything lazily loaded
    h.grad = w.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size (VmHWM) to the current one
    before, t0 = rss(), time.perf_counter()
    loss = run(h, w, labels)
    loss.backward()
    print(json.dumps(dict(growth=peak() - before, seconds=time.perf_counter() - t0, loss=loss.item())))
    """
)


def peak_growth(backend: str, n: int, vocab: int, c: int) -> dict:
    """Peak resident-memory growth (bytes) of one forward + backward of ``backend`` (or "F.cross_entropy") in a
    fresh CPU process, measured from just before the call."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, backend, str(n), str(vocab), str(c)],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


#: The memory-bound shape: GPT-2's vocabulary at 8 x 1024 tokens, a narrow C so the CPU run takes seconds.
MEM_N, MEM_V, MEM_C = 8192, 50257, 16


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (peak RSS reset)")
@pytest.mark.parametrize(
    "backend",
    [
        "reference",
        pytest.param("triton", marks=pytest.mark.skipif(
            os.environ.get("GPT2FAST_SLOW") != "1", reason="the interpreter takes minutes here: GPT2FAST_SLOW=1")),
    ],
)  # fmt: skip
def test_extra_memory_is_at_most_an_eighth_of_full_logits_cross_entropy(backend):
    # F.cross_entropy(hidden @ weight.T, labels) holds at least the fp32 logits (N x V x 4 bytes = 1.6 GB here; its
    # measured growth, forward + backward, is 4.9 GB): our whole growth, gradients included, must stay under 1/8
    # of the logits alone
    status = ops.backend_status(backend, "cpu")
    if not status.available:
        pytest.skip(status.reason)
    got = peak_growth(backend, MEM_N, MEM_V, MEM_C)
    logits = MEM_N * MEM_V * 4
    assert got["growth"] <= logits / 8, (
        f"{backend}: grew {got['growth'] / 2**20:.1f} MiB, logits are {logits / 2**20:.0f} MiB"
    )


@pytest.mark.skipif(os.environ.get("GPT2FAST_SLOW") != "1", reason="allocates ~5 GB: GPT2FAST_SLOW=1")
def test_full_logits_baseline_memory():
    # the baseline's own growth, to state the ratio (opt-in: it needs ~5 GB of RAM)
    got = peak_growth("F.cross_entropy", MEM_N, MEM_V, MEM_C)
    assert got["growth"] >= MEM_N * MEM_V * 4


# ---- torch.compile -------------------------------------------------------------------------------------------
def test_reference_traces_under_torch_compile_forward_and_backward():
    h, w, labels = _inputs(40, 16, 300, ignore=3, device="cpu")
    eager = _loss_and_grads(lambda h, w: ops.linear_cross_entropy(h, w, labels, backend="reference"), h, w)
    fn = torch.compile(lambda h, w: ops.linear_cross_entropy(h, w, labels, backend="reference"), backend="aot_eager")
    compiled = _loss_and_grads(fn, h, w)
    for a, b in zip(eager, compiled):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
