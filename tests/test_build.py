"""Build-script and extension-loading tests (CPU only; the full sm_80/sm_90a compile is
``benchmarks/ptxas_check.py``, run by ``make test``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def setup_mod():
    return _load("gpt2fast_setup", ROOT / "setup.py")


@pytest.fixture(scope="module")
def ptxas_mod():
    return _load("gpt2fast_ptxas_check", ROOT / "benchmarks" / "ptxas_check.py")


def test_parse_archs(setup_mod):
    assert setup_mod.parse_archs("80;90a") == ["80", "90a"]
    assert setup_mod.parse_archs("9.0a, 8.0") == ["80", "90a"]
    assert setup_mod.parse_archs("sm_86 80 80") == ["80", "86"]
    with pytest.raises(ValueError, match="cannot parse"):
        setup_mod.parse_archs("ampere")
    with pytest.raises(ValueError, match="empty"):
        setup_mod.parse_archs(" ; ")


def test_default_gencode(setup_mod):
    flags = setup_mod.gencode_flags(setup_mod.parse_archs(setup_mod.DEFAULT_ARCHS))
    assert "-gencode=arch=compute_80,code=sm_80" in flags
    assert "-gencode=arch=compute_90a,code=sm_90a" in flags
    assert "-gencode=arch=compute_80,code=compute_80" in flags  # PTX for newer GPUs


def test_no_cuda_env_skips_extension(setup_mod, monkeypatch):
    monkeypatch.setenv("GPT2FAST_NO_CUDA", "1")
    assert setup_mod.find_nvcc() is None
    assert setup_mod.extensions() == []


def test_missing_pybind11_skips_extension(setup_mod, monkeypatch):
    monkeypatch.setattr(setup_mod, "find_nvcc", lambda: "/opt/cuda/bin/nvcc")
    monkeypatch.setattr(setup_mod, "_have_pybind11", lambda: False)
    assert setup_mod.extensions() == []
    monkeypatch.setattr(setup_mod, "_have_pybind11", lambda: True)
    assert [e.name for e in setup_mod.extensions()] == ["gpt2fast._C"]


def test_sources_listed(setup_mod):
    names = {p.name for p in setup_mod.cuda_sources()}
    assert {"layer_norm.cu", "bias_gelu.cu", "attention.cu", "decode_attention.cu"} <= names
    assert (ROOT / "csrc" / "binding.cpp").exists() and (ROOT / "csrc" / "common.cuh").exists()


def test_parse_ptxas(ptxas_mod):
    text = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 27648 bytes smem, 472 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barv' for 'sm_90a'
ptxas info    : Function properties for _Z3barv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 16 registers, used 0 barriers, 380 bytes cmem[0]
"""
    rows = ptxas_mod.parse_ptxas(text, "x.cu")
    assert [(r["kernel"], r["arch"], r["registers"], r["smem"]) for r in rows] == [
        ("_Z3fooPf", "sm_80", 96, 27648),
        ("_Z3barv", "sm_90a", 16, 0),
    ]
    assert (rows[0]["spill_stores"], rows[0]["spill_loads"], rows[0]["stack"]) == (4, 12, 8)
    assert rows[1]["spill_stores"] == rows[1]["spill_loads"] == 0


def test_extension_imports_without_gpu():
    """The built .so (when present) imports and reports the runtime state instead of crashing."""
    try:
        from gpt2fast import _C
    except ImportError:
        pytest.skip("gpt2fast._C is not built here")
    count, code, msg = _C.device_count()
    assert isinstance(count, int) and isinstance(code, int) and isinstance(msg, str)
    assert (code == 0) == (msg == "")
    for name in ("layer_norm", "bias_gelu", "attention", "decode_attention"):
        assert callable(getattr(_C, name))
    from gpt2fast.ops.cuda import _ext

    assert (_C.F32, _C.F16, _C.BF16) == tuple(_ext.DTYPE_CODE[t] for t in _ext.FLOAT_DTYPES)
    unset = r"gpt2fast\._C\.bias_gelu: CUDA error 1 \(.*\); a required field is unset .* in BiasGeluParams\(dtype=-1"
    with pytest.raises(RuntimeError, match=unset):  # refused before the runtime is asked anything
        _C.bias_gelu(_C.BiasGeluParams())
    if code != 0:  # no usable device: a launch whose fields pass the checks must raise, never crash
        params = _C.BiasGeluParams()
        for field, value in dict(dtype=_C.F32, x=16, x_row_stride=4, bias=32, y=48, rows=1, n=4, device=0).items():
            setattr(params, field, value)
        with pytest.raises(RuntimeError, match=rf"gpt2fast\._C\.bias_gelu: CUDA error {code} "):
            _C.bias_gelu(params)
    assert sys.modules["gpt2fast._C"] is _C
