"""Test set-up: Triton runs under its interpreter when there is no GPU; `gpu` tests skip cleanly."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import HealthCheck, settings

# Hypothesis profiles: "ci" (the default; >= 50 examples where a test asks for the profile's count),
# "extended" (>= 500) and "quick" (10, for benchmarks/gpu_check.sh).  Pick one with
# HYPOTHESIS_PROFILE=extended.  A failure prints a reproducer blob.
_common = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("quick", max_examples=10, **_common)  # the one-shot GPU script's time budget
settings.register_profile("ci", max_examples=50, **_common)
settings.register_profile("extended", max_examples=500, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HAS_CUDA = torch.cuda.is_available()
# Tiny test models gain nothing from intra-op threads, and on a 2-core machine they thrash.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``gpu`` when no CUDA device is present."""
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_fresh_backends():
    """Each test starts from seed 0 and re-checks backend availability (some tests mock it)."""
    from gpt2fast.ops import _registry

    torch.manual_seed(0)
    _registry.clear_cache()
    yield
    _registry.clear_cache()
