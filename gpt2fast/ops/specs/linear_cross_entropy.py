"""``linear_cross_entropy``: the LM head's matmul fused with the cross-entropy loss, chunk by chunk.

``loss = cross_entropy(hidden @ weight.T, labels)`` without ever holding the ``[N, V]`` logits: the rows are
processed in chunks (:func:`chunk_rows`), and when a gradient is needed each chunk's logits are turned into their
gradient at once (softmax minus the one-hot label, times the reduction's scale), pushed through the two matmuls
into ``grad_hidden`` (a slice per chunk) and ``grad_weight`` (an fp32 sum over the chunks), and dropped.  The
backward only multiplies those saved gradients by the upstream gradient of the loss.  This is Liger-Kernel's
FusedLinearCrossEntropy scheme.  Every backend shares the chunk loop (:func:`chunked_loss`); a backend supplies
the per-chunk step (softmax, loss, gradient of the logits).

Numerics: logits come from a matmul in the input dtype (as ``lm_head(h)`` in transformers), every softmax, loss
and sum is fp32, ``grad_weight`` is accumulated in fp32 over the chunks and rounded to the weight's dtype once.
The loss is a 0-D fp32 tensor.  Labels equal to ``ignore_index`` contribute nothing; ``reduction="mean"`` divides
by the number of other labels, and when there are none the loss is 0 with zero gradients (``F.cross_entropy``,
and so transformers, give NaN there).

Labels are range-checked before any launch, which reads one boolean back to the host (one sync per call);
``check_labels=False``, a CUDA graph capture or ``torch.compile`` tracing skip that check, and an out-of-range
label then gives a NaN loss (and NaN gradients), never an out-of-bounds read.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gpt2fast.ops import _validate as v
from gpt2fast.ops._registry import dispatch, register_op
from gpt2fast.ops._spec import BadInput, BenchCase, EdgeInput, Inputs, OpSpec, Traffic, seeded_randn

ARGS = ("hidden", "weight", "labels", "ignore_index", "reduction")
GRAD_ARGS = ("hidden", "weight")
REDUCTIONS = ("mean", "sum")
LABEL_DTYPES = (torch.int64, torch.int32)
#: One chunk holds at most 1/CHUNK_FRACTION of the rows (so its fp32 logits are at most that share of the full).
CHUNK_FRACTION = 32


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str | None = None,
    check_labels: bool = True,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels``, never holding more than one chunk of logits.

    ``hidden`` is [N, C], ``weight`` [V, C] (the LM head, e.g. GPT-2's tied ``wte``), ``labels`` int64/int32 [N]
    with values in [0, V) or ``ignore_index``.  ``reduction`` is ``"mean"`` (over the labels that are not
    ``ignore_index``; 0 when every label is) or ``"sum"``.  Returns a 0-D fp32 loss, differentiable for ``hidden``
    and ``weight``.

    The label values are checked (one device-to-host read); a caller that guarantees them passes
    ``check_labels=False`` to skip that sync (an out-of-range label then gives a NaN loss).
    """
    validate(hidden, weight, labels, ignore_index, reduction, check_labels)
    return dispatch("linear_cross_entropy", backend, (hidden, weight, labels, ignore_index, reduction), hidden.device)


def validate(hidden, weight, labels, ignore_index, reduction, check_labels: bool = True) -> None:
    """The checks every backend relies on; the label values too (one host read) unless ``check_labels`` is False,
    a CUDA graph is being captured or ``torch.compile`` is tracing."""
    v.check_float("hidden", hidden)
    v.check_rank("hidden", hidden, 2, "[N, C]")
    v.check_nonempty("hidden", hidden)
    v.check_float("weight", weight)
    v.check_same("hidden", hidden, weight=weight)
    v.check_rank("weight", weight, 2, "[V, C]")
    v.check_nonempty("weight", weight)
    n, c = hidden.shape
    if weight.shape[1] != c:
        raise ValueError(f"weight must have shape [V, {c}] (C of hidden), got {v.fmt(weight.shape)}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be an int64 or int32 torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    v.check_shape("labels", labels, (n,))
    if labels.device != hidden.device:
        raise RuntimeError(f"labels is on {labels.device} but hidden is on {hidden.device}; move them to one device")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not check_labels or torch.compiler.is_compiling():
        return
    if hidden.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    vocab = weight.shape[0]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):  # the one host sync of a call
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels must be in [0, {vocab}) (V = weight.shape[0]) or ignore_index ({ignore_index}); "
            f"got {int(labels[pos])} at position {pos}"
        )


# ---- the chunk loop every backend shares ---------------------------------------------------------------------
def chunk_rows(n: int, vocab: int, c: int) -> int:
    """Rows per chunk: about as many logits as ``hidden`` has elements (Liger's rule, ``N·C/V`` rows rounded up to
    a power of two), at most ``N / 32`` rows (so a chunk's fp32 logits stay within 1/32 of the full logits'), at
    least 1."""
    rows = 1 << max(0, math.ceil(math.log2(max(1, -(-n // -(-vocab // c))))))
    return max(1, min(rows, n // CHUNK_FRACTION))


def reduction_scale(labels: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """The factor the summed loss (and each row's gradient) is multiplied by, as a 0-D fp32 device tensor (no host
    sync): 1 / (labels that are not ignored) for "mean" (1 when there are none), 1 for "sum"."""
    if reduction == "sum":
        return torch.ones((), dtype=torch.float32, device=labels.device)
    return 1.0 / (labels != ignore_index).sum().clamp(min=1).to(torch.float32)


def accumulate_grad_weight(acc: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """``acc += grad_logits.T @ hidden`` into the fp32 accumulator (one matmul in the inputs' dtype per chunk)."""
    if grad_logits.dtype == acc.dtype:
        acc.addmm_(grad_logits.t(), hidden)
    else:
        acc.add_(grad_logits.t() @ hidden)


def chunked_loss(hidden, weight, labels, ignore_index: int, reduction: str, need_hidden: bool, need_weight: bool, step):
    """The loss and, where needed, the gradients of ``hidden`` and ``weight`` (of the loss itself, before any
    upstream gradient), one chunk of logits at a time.

    ``step(logits, labels, losses, ignore_index, scale)`` gets one chunk's logits ([rows, V] in the input dtype,
    its own buffer: it may overwrite it), writes each row's fp32 loss into ``losses`` (0 for an ignored label,
    NaN for an out-of-range one) and, when ``scale`` (a 0-D fp32 tensor) is given, returns the gradient of the
    logits in the input dtype: ``(softmax - onehot(label)) * scale``, zero rows for ignored labels.
    Returns ``(loss, grad_hidden or None, grad_weight or None)``.
    """
    n, c = hidden.shape
    vocab = weight.shape[0]
    need = need_hidden or need_weight
    scale = reduction_scale(labels, ignore_index, reduction)
    losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty((n, c), dtype=hidden.dtype, device=hidden.device) if need_hidden else None
    grad_weight = torch.zeros((vocab, c), dtype=torch.float32, device=hidden.device) if need_weight else None
    rows = chunk_rows(n, vocab, c)
    for start in range(0, n, rows):
        end = min(start + rows, n)
        h = hidden[start:end]
        grad = step(h @ weight.t(), labels[start:end], losses[start:end], ignore_index, scale if need else None)
        if need_hidden:
            torch.mm(grad, weight, out=grad_hidden[start:end])
        if need_weight:
            accumulate_grad_weight(grad_weight, grad, h)
        del grad
    loss = losses.sum() * scale
    return loss, grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype)


def scale_saved_grads(grad_loss: torch.Tensor, grad_hidden, grad_weight) -> tuple:
    """The backward of every implementation: the saved gradients times the upstream gradient of the loss."""
    return (
        None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype),
        None if grad_weight is None else grad_weight * grad_loss.to(grad_weight.dtype),
    )


def torch_step(logits, labels, losses, ignore_index: int, scale):
    """The reference's per-chunk step in PyTorch (fp32 softmax, in place on one fp32 copy of the chunk)."""
    x = logits.float()
    vocab = x.shape[1]
    ignored = labels == ignore_index
    bad = ~ignored & ((labels < 0) | (labels >= vocab))
    target = torch.where(ignored | bad, 0, labels).long()[:, None]
    lse = torch.logsumexp(x, dim=1)
    loss = torch.where(ignored, 0.0, lse - x.gather(1, target)[:, 0])
    losses.copy_(torch.where(bad, math.nan, loss))
    if scale is None:
        return None
    x.sub_(lse[:, None]).exp_()
    x.scatter_add_(1, target, torch.full_like(lse, -1.0)[:, None])
    row_scale = torch.where(bad, math.nan, torch.where(ignored, 0.0, scale))
    return x.mul_(row_scale[:, None]).to(logits.dtype)


class _ReferenceFunction(torch.autograd.Function):
    """The reference with its gradient computed chunk by chunk in the forward and scaled in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, grad_hidden, grad_weight = chunked_loss(
            hidden, weight, labels, ignore_index, reduction, need_hidden, need_weight, torch_step
        )
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return (*scale_saved_grads(grad_loss, *ctx.saved_tensors), None, None, None)


def reference(hidden, weight, labels, ignore_index=-100, reduction="mean"):
    """Chunked PyTorch: fp32 softmax per chunk of rows, logits from matmuls in the input dtype (the extra memory is
    one chunk of logits plus the gradients); differentiable for ``hidden`` and ``weight``."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ReferenceFunction.apply(hidden, weight, labels, ignore_index, reduction)
    return chunked_loss(hidden, weight, labels, ignore_index, reduction, False, False, torch_step)[0]


# ---- inputs and test shapes ---------------------------------------------------------------------------------
def make_labels(shape: dict, gen: torch.Generator) -> torch.Tensor:
    """Seeded labels in [0, V) on the CPU; ``ignore`` of them (an int, or "all") set to ``ignore_index``."""
    n, vocab = shape["n"], shape["v"]
    labels = torch.randint(0, vocab, (n,), generator=gen)
    ignore = shape.get("ignore", 0)
    if ignore == "all":
        labels.fill_(shape.get("ignore_index", -100))
    elif ignore:
        labels[torch.randperm(n, generator=gen)[:ignore]] = shape.get("ignore_index", -100)
    return labels


def make_inputs(shape: dict, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Inputs:
    """``shape``: ``n``, ``c``, ``v``; optional ``ignore`` (how many labels are ``ignore_index``, or "all"),
    ``ignore_index`` (-100), ``reduction`` ("mean"), ``std`` of the logits (2), ``backward`` (inputs require
    grad: the benchmark times forward + backward)."""
    randn = seeded_randn(gen, device, dtype)
    n, c, vocab = shape["n"], shape["c"], shape["v"]
    hidden = randn(n, c)
    weight = randn(vocab, c, std=shape.get("std", 2.0) / math.sqrt(c))
    if shape.get("backward"):
        hidden.requires_grad_(True)
        weight.requires_grad_(True)
    return dict(
        hidden=hidden,
        weight=weight,
        labels=make_labels(shape, gen).to(device),
        ignore_index=shape.get("ignore_index", -100),
        reduction=shape.get("reduction", "mean"),
    )


TEST_SHAPES = (
    dict(n=1, c=16, v=5),
    dict(n=7, c=48, v=300, ignore=2),
    dict(n=40, c=16, v=1000, ignore=5, reduction="sum"),
    dict(n=5, c=8, v=50257),
    dict(n=9, c=100, v=257, ignore="all"),
    dict(n=70, c=24, v=130, ignore=3, ignore_index=0),
)
GPU_SHAPES = (
    dict(n=8192, c=768, v=50257, ignore=100),
    dict(n=1000, c=1600, v=50257, reduction="sum"),
    dict(n=4096, c=1024, v=32003, ignore=17),
)


def shape_strategy(size: int):
    """Hypothesis: up to 64·size rows, widths up to 80, vocabularies up to 2000 or GPT-2's, some labels ignored."""
    from hypothesis import strategies as st

    @st.composite
    def shapes(draw):
        n = draw(st.integers(1, 64 * size))
        return dict(
            n=n,
            c=draw(st.integers(1, 80)),
            v=draw(st.one_of(st.integers(1, 2000), st.just(50257))),
            ignore=draw(st.one_of(st.integers(0, n), st.just("all"))),
            reduction=draw(st.sampled_from(REDUCTIONS)),
            std=draw(st.sampled_from([0.5, 2.0, 8.0])),
        )

    return shapes()


def _rn(*shape: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(*shape).to(dtype=dtype, device=device)


def _args(hidden=None, weight=None, labels=None, ignore_index=-100, reduction="mean", n=4, c=8, vocab=11) -> Inputs:
    hidden = _rn(n, c) if hidden is None else hidden
    weight = _rn(vocab, c) if weight is None else weight
    labels = torch.arange(n) % vocab if labels is None else labels
    return dict(hidden=hidden, weight=weight, labels=labels, ignore_index=ignore_index, reduction=reduction)


BAD_INPUTS = (
    BadInput("lce-hidden-3d", "hidden [2, 4, 8] (flatten the tokens first)", lambda: _args(hidden=_rn(2, 4, 8)),
             ValueError, r"hidden must be 2-D \[N, C\], got shape \[2, 4, 8\]"),
    BadInput("lce-hidden-int", "hidden int64", lambda: _args(hidden=torch.ones(4, 8, dtype=torch.int64)),
             TypeError, r"hidden must be float32, float16 or bfloat16, got torch\.int64"),
    BadInput("lce-mixed-dtype", "weight bf16 with hidden fp32", lambda: _args(weight=_rn(11, 8, dtype=torch.bfloat16)),
             TypeError, r"weight has dtype torch\.bfloat16 but hidden has torch\.float32; they must match"),
    BadInput("lce-weight-width", "weight [11, 9] for hidden [4, 8]", lambda: _args(weight=_rn(11, 9)),
             ValueError, r"weight must have shape \[V, 8\] \(C of hidden\), got \[11, 9\]"),
    BadInput("lce-weight-other-device", "weight on another device (meta)",
             lambda: _args(weight=_rn(11, 8, device="meta")),
             RuntimeError, r"weight is on meta but hidden is on cpu; move them to one device"),
    BadInput("lce-empty", "hidden [0, 8] (no tokens)", lambda: _args(hidden=_rn(0, 8), labels=torch.zeros(0).long()),
             ValueError, r"hidden is empty \(shape \[0, 8\]\); every dimension must be >= 1"),
    BadInput("lce-labels-float", "labels float32", lambda: _args(labels=torch.zeros(4)),
             TypeError, r"labels must be int64 or int32, got torch\.float32"),
    BadInput("lce-labels-list", "labels a list", lambda: _args(labels=[0, 1, 2, 3]),
             TypeError, r"labels must be an int64 or int32 torch\.Tensor, got list"),
    BadInput("lce-labels-shape", "labels [2, 2] for hidden [4, 8]", lambda: _args(labels=torch.zeros(2, 2).long()),
             ValueError, r"labels must have shape \[4\], got \[2, 2\]"),
    BadInput("lce-labels-other-device", "labels on another device (meta)",
             lambda: _args(labels=torch.zeros(4, dtype=torch.long, device="meta")),
             RuntimeError, r"labels is on meta but hidden is on cpu; move them to one device"),
    BadInput("lce-label-too-big", "a label equal to V (11)", lambda: _args(labels=torch.tensor([0, 11, 2, 3])),
             ValueError, r"labels must be in \[0, 11\) \(V = weight\.shape\[0\]\) or ignore_index \(-100\); "
                         r"got 11 at position 1"),
    BadInput("lce-label-negative", "a label of -1 (ignore_index -100)",
             lambda: _args(labels=torch.tensor([0, 1, -1, 3])),
             ValueError, r"labels must be in \[0, 11\) .* or ignore_index \(-100\); got -1 at position 2"),
    BadInput("lce-reduction-none", "reduction='none'", lambda: _args(reduction="none"),
             ValueError, r"reduction must be 'mean' or 'sum', got 'none'"),
    BadInput("lce-ignore-float", "ignore_index=-100.0", lambda: _args(ignore_index=-100.0),
             TypeError, r"ignore_index must be an int, got -100\.0"),
)  # fmt: skip

EDGE_INPUTS = (
    EdgeInput("lce-weight-transposed", "weight a transposed [C, V] tensor's .t() (an untied, transposed head)",
              lambda d: _args(weight=_rn(8, 11, device=d).t(), hidden=_rn(4, 8, device=d),
                              labels=torch.tensor([0, 10, 5, 3], device=d))),
    EdgeInput("lce-labels-strided", "labels a strided view (every other element of a longer tensor)",
              lambda d: _args(hidden=_rn(4, 8, device=d), weight=_rn(11, 8, device=d),
                              labels=torch.tensor([1, 0, 10, 0, 3, 0, 4, 0], device=d)[::2])),
    EdgeInput("lce-int32-labels", "int32 labels with ignore_index among them",
              lambda d: _args(hidden=_rn(4, 8, device=d), weight=_rn(11, 8, device=d),
                              labels=torch.tensor([1, -100, 10, 0], dtype=torch.int32, device=d))),
    EdgeInput("lce-hidden-row-stride", "hidden rows of 8 inside rows of 24 (a column slice)",
              lambda d: _args(hidden=_rn(4, 24, device=d)[:, 8:16], weight=_rn(11, 8, device=d),
                              labels=torch.tensor([1, 2, 3, 4], device=d))),
)  # fmt: skip


# ---- benchmarks ---------------------------------------------------------------------------------------------
def _case(n: int, vocab: int, c: int, sweep: str, group: str) -> BenchCase:
    shape = dict(n=n, c=c, v=vocab, ignore=n // 64, backward=True)
    return BenchCase("linear_cross_entropy", shape, sweep, group, target=(n, vocab) == (8192, 50257))


def bench_cases(sweep: str) -> list[BenchCase]:
    """Forward + backward at GPT-2's width: N (tokens) from 1k to 32k at V = 50257, and V from 8k to 128k at
    N = 8192; GPT-2 small's N = 8192, V = 50257 is the target shape.  Tiny shapes on CPU."""
    if sweep == "cpu":
        return [_case(n, 1000, 32, "n", "cpu V=1000 C=32") for n in (8, 64)] + [_case(64, 5000, 32, "v", "cpu N=64")]
    ns = [1024, 4096, 8192, 16384, 32768] if sweep == "full" else [2048, 8192]
    vs = [8192, 32768, 50257, 131072] if sweep == "full" else [32768, 131072]
    widths = [768, 1600] if sweep == "full" else [768]
    cases = []
    for c in widths:
        cases += [_case(n, 50257, c, "n", f"V=50257 C={c}") for n in ns]
        cases += [_case(8192, vocab, c, "v", f"N=8192 C={c}") for vocab in vs if vocab != 50257]
    return cases


def traffic(shape: dict, dtype: torch.dtype) -> Traffic:
    """Read hidden, weight and labels (and write both gradients when timed with the backward); the FLOPs of the
    logits matmul (times 3 with the backward: the two gradient matmuls).  ``logits_bytes``: what the full fp32
    logits would take, the memory the op never allocates."""
    s = torch.empty((), dtype=dtype).element_size()
    n, c, vocab = shape["n"], shape["c"], shape["v"]
    passes = 3 if shape.get("backward") else 1
    tensors = (2 if shape.get("backward") else 1) * s * (n * c + vocab * c)
    return Traffic(tensors + 8 * n, passes * 2.0 * n * c * vocab, {"logits_bytes": 4 * n * vocab})


def baselines(device: torch.device) -> dict:
    """PyTorch over the full logits (``F.cross_entropy(hidden @ weight.T)`` with fp32 logits, as transformers'
    loss computes it), and PyTorch's own chunked ``F.linear_cross_entropy`` where this torch has it."""

    def full_logits(inp: Inputs):
        h, w, labels, ignore_index, reduction = (inp[a] for a in ARGS)
        return lambda: F.cross_entropy(
            (h @ w.t()).float(), labels.long(), ignore_index=ignore_index, reduction=reduction
        )

    out: dict = {"torch": full_logits}
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if hasattr(F, "linear_cross_entropy") and options is not None:

        def chunked_torch(inp: Inputs):
            h, w, labels, ignore_index, reduction = (inp[a] for a in ARGS)
            kw = dict(ignore_index=ignore_index, reduction=reduction, options=options())
            return lambda: F.linear_cross_entropy(h, w, labels.long(), **kw)

        out["torch.linear_cross_entropy"] = chunked_torch
    return out


register_op(OpSpec.from_module(__name__))
