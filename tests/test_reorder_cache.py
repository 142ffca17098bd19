"""The ``reorder_cache`` op beyond the conformance suite: exactly the live prefixes of moved rows change, a cycle of
rows is safe in place, the Triton custom op passes opcheck, one launch per call, and beam search's indices."""

from __future__ import annotations

import pytest
import torch
from _backends import DEVICE, backend_params

from gpt2fast import ops
from gpt2fast.testing import conformance as cf


def _cache(layers=2, rows=6, heads=2, t=10, d=32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(layers, rows, heads, t, d, generator=g).to(DEVICE),
            torch.randn(layers, rows, heads, t, d, generator=g).to(DEVICE))  # fmt: skip


@pytest.mark.parametrize("backend", backend_params("reorder_cache"))
def test_only_live_prefixes_of_moved_rows_change(backend):
    k, v = _cache()
    before_k, before_v = k.clone(), v.clone()
    lens = torch.tensor([4, 4, 4, 7, 7, 7], dtype=torch.int32, device=DEVICE)
    src = torch.tensor([1, 2, 0, 3, 3, 4], device=DEVICE)  # a 3-cycle in group 0; group 1 keeps row 3, copies it
    out = ops.reorder_cache(k, v, lens, src, 3, backend=backend)
    assert out[0] is k and out[1] is v
    for r, (s, n) in enumerate(zip(src.tolist(), lens.tolist())):
        for got, old in ((k, before_k), (v, before_v)):
            assert torch.equal(got[:, r, :, :n], old[:, s, :, :n]), (r, s)
            assert torch.equal(got[:, r, :, n:], old[:, r, :, n:]), f"row {r}: a dead position changed"


@pytest.mark.parametrize("backend", backend_params("reorder_cache", reference=False))
def test_triton_is_one_launch_and_identity_moves_nothing(backend):
    pytest.importorskip("triton")
    k, v = _cache()
    lens = torch.full((6,), 10, dtype=torch.int32, device=DEVICE)
    ident = torch.arange(6, device=DEVICE)
    before = k.clone()
    if DEVICE == "cpu":
        with cf.count_triton_launches() as launches:
            ops.reorder_cache(k, v, lens, ident, 2, backend=backend)
        assert launches == {"_reorder_cache_kernel": 1}
    else:
        ops.reorder_cache(k, v, lens, ident, 2, backend=backend)
    assert torch.equal(k, before)


def test_opcheck():
    pytest.importorskip("triton")
    import gpt2fast.ops.triton.reorder_cache  # noqa: F401  (registers the custom op)

    k, v = _cache()
    lens = torch.tensor([3, 3, 9, 9, 0, 0], dtype=torch.int32, device=DEVICE)
    src = torch.tensor([1, 0, 3, 3, 5, 4], device=DEVICE)
    torch.library.opcheck(torch.ops.gpt2fast_triton.reorder_cache.default, (k, v, lens, src, 2))


def test_unchecked_values_skip_the_host_read(monkeypatch):
    """``check_values=False`` (beam search's call) reads no tensor value on the host."""
    k, v = _cache()
    lens = torch.zeros(6, dtype=torch.int32, device=DEVICE)
    src = torch.tensor([0, 0, 0, 0, 0, 0], device=DEVICE)  # out of group for rows 2..5: only a value check sees it
    ops.reorder_cache(k, v, lens, src, 2, backend="reference", check_values=False)
    with pytest.raises(ValueError, match=r"beam_idx\[2\] = 0 is not a row of row 2's group"):
        ops.reorder_cache(k, v, lens, src, 2, backend="reference")
