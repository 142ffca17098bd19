"""Randomized parity of every op on every kernel backend against the oracle (FlashAttention rule).

Each op's spec supplies the Hypothesis strategy of its shapes (``shape_strategy``: extents from 1 up to moderately
large, every supported head dim, ragged cache lengths that include 0 and a full cache, scales, causal flags...);
Hypothesis also draws the dtype and the seed of the values.  A backend that declines a drawn input (its
``supports``) must say so before any launch, and "auto" must then match the reference
(``gpt2fast.testing.conformance.check_declines_or_matches``).

The number of examples comes from the Hypothesis profile (conftest: ``ci`` 50, ``extended`` 500, chosen by
``HYPOTHESIS_PROFILE``).  Extents scale with ``GPT2FAST_PARITY_SIZE`` (default 1 under ``ci``, 4 under
``extended``, 16 on a GPU).  A failure prints the shape and seed in the assertion message and a reproducer blob.
"""

from __future__ import annotations

import os

import pytest
import torch
from _backends import DEVICE
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2fast import ops
from gpt2fast.testing import conformance as cf

_DEFAULT_SIZE = "16" if DEVICE == "cuda" else ("4" if os.environ.get("HYPOTHESIS_PROFILE") == "extended" else "1")
#: Multiplies every drawn extent's upper bound (rows, widths, sequence lengths, cache lengths).
SIZE = max(1, int(os.environ.get("GPT2FAST_PARITY_SIZE", _DEFAULT_SIZE)))
DEV = torch.device(DEVICE)

# The kernels' tanh is 2/(1 + exp(-2x)) - 1: exp overflowing to inf for large |x| is intended (it saturates to
# ±1), but Triton's interpreter computes it with numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

PAIRS = [
    pytest.param(
        ops.get_spec(r.op),
        r.backend,
        marks=pytest.mark.skipif(r.reason is not None, reason=f"{r.backend} unavailable: {r.reason}"),
        id=f"{r.op}-{r.backend}",
    )
    for r in ops.implementations(DEV)
    if r.backend != ops.REFERENCE and ops.get_spec(r.op).shape_strategy is not None
]


@pytest.mark.parametrize(("spec", "backend"), PAIRS)
@settings()
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_random_shapes(spec, backend, data, seed):
    shape = data.draw(spec.shape_strategy(SIZE), label="shape")
    dtype = data.draw(st.sampled_from(spec.dtypes), label="dtype")
    inputs = spec.make_inputs(shape, dtype, DEV, torch.Generator().manual_seed(seed))
    cf.check_declines_or_matches(spec, backend, inputs, msg=f"{shape} {dtype} seed={seed}")
