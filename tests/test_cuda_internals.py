"""CPU tests of the CUDA backend's Python side (``gpt2fast/ops/cuda/``): what it declines and why, how it fills the
kernels' parameter structs, where it launches, and what it says when it cannot run.

``gpt2fast._C`` is replaced by a fake module whose parameter structs record every field set by name (and refuse
names the real structs lack), and whose kernel entry points are mocks; so these run without nvcc or a GPU and can
assert exactly what would have reached a kernel, or that nothing did.  Where the extension is built, the same
marshalling also runs through the real ``_C`` structs (launchers still mocked), and the fake's field lists are
checked against the real ones.  The parity of the kernels themselves is ``tests/test_ops_conformance.py`` (on a
GPU); the GPU-only internals are ``tests/test_cuda_gpu.py``.
"""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from gpt2fast import ops
from gpt2fast.ops import _registry, _workspace, reference
from gpt2fast.ops.cuda import (
    _ext,
    attention,
    bias_gelu,
    bias_gelu_backward,
    decode_attention,
    layer_norm,
    layer_norm_backward,
)

FORWARD_KERNELS = ("layer_norm", "bias_gelu", "attention", "decode_attention")
KERNELS = (*FORWARD_KERNELS, "layer_norm_backward", "bias_gelu_backward")
#: The fields of each ``_C`` parameter struct, in declaration order (checked against the real ``FIELDS``).
FIELDS = {
    "LayerNormParams": (
        "dtype", "stream", "device", "x", "x_row_stride", "residual", "residual_row_stride", "weight", "bias", "y",
        "h", "rows", "n", "eps",
    ),
    "BiasGeluParams": ("dtype", "stream", "device", "x", "x_row_stride", "bias", "y", "rows", "n"),
    "LayerNormBackwardParams": (
        "dtype", "stream", "device", "grad_y", "grad_y_row_stride", "h", "h_row_stride", "weight", "grad_h",
        "grad_h_row_stride", "dh", "dweight", "dbias", "partial", "programs", "rows", "n", "eps",
    ),
    "BiasGeluBackwardParams": (
        "dtype", "stream", "device", "grad_y", "grad_y_row_stride", "x", "x_row_stride", "bias", "dx", "dbias",
        "partial", "programs", "rows", "n",
    ),
    "AttentionParams": (
        "dtype", "stream", "device", "q", "q_strides", "k", "k_strides", "v", "v_strides", "out", "batch", "heads",
        "seqlen", "head_dim", "causal", "scale",
    ),
    "DecodeAttentionParams": (
        "dtype", "stream", "device", "q", "q_strides", "k_cache", "k_cache_strides", "v_cache", "v_cache_strides",
        "cache_seqlens", "k_new", "k_new_strides", "v_new", "v_new_strides", "out", "o_part", "lse", "counters",
        "batch", "heads", "t_max", "head_dim", "num_splits", "scale",
    ),
}  # fmt: skip
DEVICE = 3  # the device index the mocked device check reports
STREAM = 1000 + DEVICE


def _real_ext():
    try:
        from gpt2fast import _C
    except ImportError:
        return None
    return _C


# ---- the fake extension --------------------------------------------------------------------------------------
class FakeStrides:
    """``_C.Strides``: keyword-only batch/head/time."""

    def __init__(self, *, batch: int = 0, head: int = 0, time: int = 0):
        self.batch, self.head, self.time = batch, head, time

    def __eq__(self, other):
        return (self.batch, self.head, self.time) == (other.batch, other.head, other.time)

    def __repr__(self):
        return f"Strides(batch={self.batch}, head={self.head}, time={self.time})"


class FakeParams:
    """A ``_C`` parameter struct that records each field set, refuses unknown names and a field set twice."""

    FIELDS: tuple[str, ...] = ()

    def __init__(self):
        object.__setattr__(self, "values", {})

    def __setattr__(self, name, value):
        if name not in self.FIELDS:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}")
        if name in self.values:
            raise AssertionError(f"{type(self).__name__}.{name} set twice")
        self.values[name] = value

    def __getattr__(self, name):
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None


def _fake_ext(structs: str = "fake"):
    """A fake ``gpt2fast._C``: mocked entry points, and fake (or, with ``structs="real"``, the real) structs."""
    if structs == "real":
        real = _real_ext()
        classes = {name: getattr(real, name) for name in FIELDS} | {"Strides": real.Strides}
    else:
        classes = {name: type(name, (FakeParams,), {"FIELDS": fields}) for name, fields in FIELDS.items()}
        classes["Strides"] = FakeStrides
    fake = SimpleNamespace(F32=0, F16=1, BF16=2, device_count=mock.Mock(return_value=(1, 0, "")), **classes)
    for name in KERNELS:
        setattr(fake, name, mock.Mock(name=f"_C.{name}"))
    return fake


def _launched(fake) -> dict[str, int]:
    return {name: getattr(fake, name).call_count for name in KERNELS}


@pytest.fixture
def fake(monkeypatch):
    """The fake ``_C`` as the loaded extension, one usable device (the real device check: CPU tensors refused)."""
    ext = _fake_ext()
    monkeypatch.setattr(_ext, "load", lambda: ext)
    monkeypatch.setattr(_ext, "_runtime", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _registry.clear_cache()
    return ext


@pytest.fixture
def available(monkeypatch):
    """The fake ``_C``, with the cuda backend available for CPU tensors too, so the public ops dispatch to it
    (``torch.cuda.is_available`` stays False: dynamo asks it too)."""
    ext = _fake_ext()
    monkeypatch.setattr(_ext, "load", lambda: ext)
    monkeypatch.setattr(_ext, "unavailable_reason", lambda device: None)
    _registry.clear_cache()
    yield ext
    _registry.clear_cache()


def _launch_ok(monkeypatch, ext):
    guard = SimpleNamespace(device=None, entered=[], checked=[])

    @contextmanager
    def device_guard(device):
        guard.entered.append(device)
        guard.device = device
        try:
            yield
        finally:
            guard.device = None

    def check_device(**tensors):
        guard.checked.append(sorted(name for name, t in tensors.items() if t is not None))
        return DEVICE

    def record(name):
        def launcher(params):
            assert guard.device == DEVICE, f"_C.{name} launched outside the device guard"
            launched.params = params

        return launcher

    launched = SimpleNamespace(params=None, guard=guard, ext=ext)
    for name in KERNELS:
        getattr(ext, name).side_effect = record(name)
    monkeypatch.setattr(_ext, "load", lambda: ext)
    monkeypatch.setattr(_ext, "check_device", check_device)
    monkeypatch.setattr(_ext, "device_guard", device_guard)
    monkeypatch.setattr(_ext, "current_stream", lambda device: 1000 + device)
    monkeypatch.setattr(_ext, "num_sms", lambda device: 132)
    return launched


@pytest.fixture(params=["fake", "real"])
def launch_ok(request, monkeypatch):
    """CPU tensors reach the (mocked) entry points: the device check reports device 3, the device guard and the
    stream are recorded.  Parametrised over fake structs and, where ``_C`` is built, the real ones."""
    if request.param == "real" and _real_ext() is None:
        pytest.skip("gpt2fast._C is not built here")
    return _launch_ok(monkeypatch, _fake_ext(request.param))


def _fields(params) -> dict:
    """Every field of a (fake or real) struct as plain values (Strides as (batch, head, time))."""
    names = type(params).FIELDS
    out = {name: getattr(params, name) for name in names}
    if isinstance(params, FakeParams):
        assert set(params.values) == set(names), f"fields never set: {set(names) - set(params.values)}"
    return {k: (v.batch, v.head, v.time) if hasattr(v, "batch") else v for k, v in out.items()}


def _ln_args(n=64, rows=3, dtype=torch.float32):
    return torch.randn(rows, n, dtype=dtype), torch.ones(n, dtype=dtype), torch.zeros(n, dtype=dtype)


def _decode_args(b=2, h=3, t=16, d=64, dtype=torch.float16):
    q = torch.randn(b, h, d, dtype=dtype)
    kc = torch.randn(b, h, t, d, dtype=dtype)
    vc = torch.randn(b, h, t, d, dtype=dtype)
    sl = torch.tensor([3, 7][:b] + [0] * max(0, b - 2), dtype=torch.int32)
    return q, kc, vc, sl, torch.randn(b, h, d, dtype=dtype), torch.randn(b, h, d, dtype=dtype)


def _meta(*shape, dtype=torch.float16):
    return torch.empty(shape, dtype=dtype, device="meta")


# ---- supports: what the kernels decline, and why -------------------------------------------------------------
def test_layer_norm_declines():
    x, w, b = _ln_args()
    assert layer_norm.supports(x, w, b, 1e-5, None) is None
    assert layer_norm.supports(x, w, b, 1e-5, torch.randn(3, 64)) is None
    strided = torch.randn(3, 128)[:, ::2]
    assert layer_norm.supports(strided, w, b, 1e-5, None) == (
        "cuda backend: x must have unit stride in its last dim, got strides (128, 2)"
    )
    x3, w3, b3 = torch.randn(4, 6, 32), torch.ones(32), torch.zeros(32)
    r = torch.randn(6, 4, 32).transpose(0, 1)  # rows cannot share one stride
    assert layer_norm.supports(x3, w3, b3, 1e-5, r) == (
        "cuda backend: residual (shape (4, 6, 32), strides (32, 128, 1)) cannot be viewed as [rows, 32] with one "
        "row stride; pass a .contiguous() tensor"
    )
    assert layer_norm.supports(x, torch.ones(128)[::2], b, 1e-5, None) == (
        "cuda backend: weight must be a contiguous 1-D tensor, got strides (2,)"
    )
    assert layer_norm.supports(x, w, torch.zeros(128)[::2], 1e-5, None).startswith("cuda backend: bias must be")
    assert layer_norm.supports(x.double(), w, b, 1e-5, None) == (
        "cuda backend: x must be float32, float16 or bfloat16, got torch.float64"
    )


def test_bias_gelu_declines():
    x = torch.randn(4, 64)
    assert bias_gelu.supports(x, torch.zeros(64)) is None
    assert bias_gelu.supports(torch.randn(4, 96)[:, :64], torch.zeros(64)) is None  # a row stride is fine
    assert bias_gelu.supports(x.t(), torch.zeros(4)) == (
        "cuda backend: x must have unit stride in its last dim, got strides (1, 64)"
    )
    assert bias_gelu.supports(x, torch.zeros(128)[::2]) == (
        "cuda backend: bias must be a contiguous 1-D tensor, got strides (2,)"
    )


@pytest.mark.parametrize("d", [8, 16, 48, 96, 256])
def test_attention_head_dims(d):
    q = torch.randn(1, 2, 8, d, dtype=torch.float16)
    assert attention.supports(q, q, q, True, None) == (
        f"cuda backend: head dim D = {d} is not supported; supported: (32, 64, 128)"
    )
    qd = torch.randn(2, 3, d, dtype=torch.float16)
    kc = torch.randn(2, 3, 4, d, dtype=torch.float16)
    assert decode_attention.supports(qd, kc, kc, torch.zeros(2, dtype=torch.int32), None, None, None) == (
        f"cuda backend: head dim D = {d} is not supported; supported: (32, 64, 128)"
    )


@pytest.mark.parametrize("d", [32, 64, 128])
def test_attention_supported_layouts(d):
    """Contiguous tensors, the model's views of one QKV projection, and size-1 dims with any stride."""
    q = torch.randn(1, 2, 8, d, dtype=torch.float16)
    assert attention.supports(q, q, q, True, None) is None
    qkv = torch.randn(2, 5, 3, 4, d, dtype=torch.float16)  # [B, T, 3, H, D]
    qs, ks, vs = (t.transpose(1, 2) for t in qkv.unbind(2))
    assert attention.supports(qs, ks, vs, False, 0.3) is None
    odd = q.as_strided((1, 2, 8, d), (3, 8 * d, d, 1))  # batch of 1 with an odd (unused) stride
    assert attention.supports(odd, q, q, True, None) is None


def test_attention_declines_misaligned_strides():
    k = torch.randn(1, 2, 8, 64, dtype=torch.float16)
    v = torch.randn(1, 2, 8, 68, dtype=torch.float16)[..., :64]  # row stride 68 is not a multiple of 8
    assert attention.supports(k, k, v, True, None) == (
        "cuda backend: v strides (1088, 544, 68, 1) must be multiples of 8 elements (16 bytes) except the last; "
        "pass a .contiguous() tensor"
    )
    k_t = k.transpose(2, 3).contiguous().transpose(2, 3)
    assert attention.supports(k, k_t, k, True, None).startswith("cuda backend: k must have unit stride")


def test_decode_declines():
    q, kc, vc, sl, kn, vn = _decode_args()
    assert decode_attention.supports(q, kc, vc, sl, kn, vn, None) is None
    assert decode_attention.supports(q, kc, vc, sl, None, None, 0.5) is None
    kc_t = kc.transpose(2, 3).contiguous().transpose(2, 3)
    assert decode_attention.supports(q, kc_t, vc, sl, kn, vn, None).startswith(
        "cuda backend: k_cache must have unit stride in its last dim"
    )
    kn_strided = torch.randn(2, 3, 128, dtype=torch.float16)[..., ::2]
    assert decode_attention.supports(q, kc, vc, sl, kn_strided, vn, None).startswith(
        "cuda backend: k_new must have unit stride"
    )
    assert decode_attention.supports(q, kc, vc, torch.zeros(4, dtype=torch.int32)[::2], kn, vn, None) == (
        "cuda backend: cache_seqlens must be contiguous, got strides (2,)"
    )


def test_int32_and_grid_limits():
    """Sizes past the kernels' int32 position math or grid limits are declined (meta tensors: no memory)."""
    q = _meta(1, 1, 2**30 + 1, 32)
    assert "T must be <= 2**30" in attention.supports(q, q, q, True, None)
    q = _meta(65536, 1, 4, 32)
    assert attention.supports(q, q, q, True, None) == (
        "cuda backend: B and H must be <= 65535 (grid limits), got B=65536, H=1"
    )
    qd, kc = _meta(1, 1, 32), _meta(1, 1, 2**30 + 1, 32)
    sl = torch.empty(1, dtype=torch.int32, device="meta")
    assert "T_max must be <= 2**30" in decode_attention.supports(qd, kc, kc, sl, None, None, None)
    qd, kc = _meta(65535, 65535, 32), _meta(65535, 65535, 1, 32)
    sl = torch.empty(65535, dtype=torch.int32, device="meta")
    assert "B*H must be <= 2**31 - 1" in decode_attention.supports(qd, kc, kc, sl, None, None, None)
    n = 2**30 + 8
    assert "N <= 2**30" in layer_norm.supports(_meta(2, n), _meta(n), _meta(n), 1e-5, None)
    assert "exceeds the grid limit" in layer_norm.supports(_meta(2**31, 264), _meta(264), _meta(264), 1e-5, None)
    assert layer_norm.supports(_meta(2**31, 256), _meta(256), _meta(256), 1e-5, None) is None  # 4 rows per block


@pytest.mark.parametrize("value", [1e-39, 1e-300, 2e38])
def test_eps_and_scale_outside_fp32(value):
    """eps / scale that round to 0 (or overflow) in the kernels' fp32 are declined, not silently changed."""
    x, w, b = _ln_args()
    assert "eps = " in layer_norm.supports(x, w, b, value, None) and "outside" in layer_norm.supports(
        x, w, b, value, None
    )
    q = torch.randn(1, 2, 8, 64, dtype=torch.float16)
    assert attention.supports(q, q, q, True, value).startswith(f"cuda backend: scale = {value!r} is outside")
    q, kc, vc, sl, kn, vn = _decode_args()
    assert decode_attention.supports(q, kc, vc, sl, kn, vn, value).startswith(f"cuda backend: scale = {value!r}")


def test_registry_reads_the_same_reasons():
    """``ops.supported`` (no device check) gives the modules' reasons: the predicates are the registered ones."""
    q = torch.randn(1, 2, 5, 48)
    assert ops.supported("attention", "cuda", q, q, q, True, None) == attention.supports(q, q, q, True, None)
    x = torch.randn(3, 64)[:, ::2]
    w = torch.ones(32)
    assert ops.supported("layer_norm", "cuda", x, w, w, 1e-5, None) == (
        "cuda backend: x must have unit stride in its last dim, got strides (64, 2)"
    )


# ---- declined or invalid input reaches no launcher -----------------------------------------------------------
def test_declined_input_reaches_no_launcher(available):
    q = torch.randn(1, 2, 5, 48)
    with pytest.raises(ops.UnsupportedInputError, match=r"head dim D = 48 is not supported"):
        ops.attention(q, q, q, backend="cuda")
    x = torch.randn(3, 64)[:, ::2]
    with pytest.raises(ops.UnsupportedInputError, match=r"x must have unit stride"):
        ops.bias_gelu(x, torch.zeros(32), backend="cuda")
    # "auto" falls through to the next backend (reference, on CPU tensors) on the same inputs.
    torch.testing.assert_close(ops.attention(q, q, q, backend="auto"), reference.attention(q, q, q))
    torch.testing.assert_close(ops.bias_gelu(x, torch.zeros(32)), reference.bias_gelu(x, torch.zeros(32)))
    assert _launched(available) == dict.fromkeys(KERNELS, 0)


def test_invalid_input_reaches_no_launcher(available):
    x, w, b = _ln_args()
    with pytest.raises(ValueError, match=r"weight must have shape \[64\]"):
        ops.layer_norm(x, w[:32], b, backend="cuda")
    q, kc, vc, _, kn, vn = _decode_args()
    with pytest.raises(ValueError, match="cache_seqlens has a negative length"):
        ops.decode_attention(q, kc, vc, torch.tensor([-1, 0], dtype=torch.int32), kn, vn, backend="cuda")
    assert _launched(available) == dict.fromkeys(KERNELS, 0)


def test_cpu_tensors_refused_before_launch(fake):
    """The custom ops check the device on the real tensors: CPU tensors never reach ``_C``."""
    x, w, b = _ln_args()
    with pytest.raises(_ext.CudaBackendError, match="cuda backend: x is a cpu tensor; it needs CUDA tensors"):
        layer_norm.layer_norm(x, w, b, 1e-5, None)
    with pytest.raises(_ext.CudaBackendError, match="x is a cpu tensor"):
        bias_gelu.bias_gelu(x, b)
    q = torch.randn(1, 2, 8, 64, dtype=torch.float16)
    with pytest.raises(_ext.CudaBackendError, match="q is a cpu tensor"):
        attention.attention(q, q, q, True, None)
    with pytest.raises(_ext.CudaBackendError, match="q is a cpu tensor"):
        decode_attention.decode_attention(*_decode_args(), None)
    assert _launched(fake) == dict.fromkeys(KERNELS, 0)


def test_misaligned_pointers_refused_before_launch(launch_ok):
    q = torch.randn(1, 2, 8, 72, dtype=torch.float16)[..., 1:65]  # storage offset of 1 element
    assert q.stride() == (1152, 576, 72, 1) and attention.supports(q, q, q, True, None) is None
    k = torch.randn(1, 2, 8, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"cuda backend: q must be 16-byte aligned \(got data_ptr % 16 = 2\)"):
        attention.attention(q, k, k, True, None)
    q, kc, _, sl, kn, vn = _decode_args()
    vc_off = torch.randn(2 * 3 * 16 * 64 + 4, dtype=torch.float16)[4:].view(2, 3, 16, 64)
    with pytest.raises(ValueError, match="v_cache must be 16-byte aligned"):
        decode_attention.decode_attention(q, kc, vc_off, sl, kn, vn, None)
    assert _launched(launch_ok.ext) == dict.fromkeys(KERNELS, 0)


# ---- device checks -------------------------------------------------------------------------------------------
def test_check_device_returns_the_tensors_device(fake):
    """The launch device is the tensors' own (here cuda:1 fake tensors), not the current device."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, bias = torch.empty(3, 64, device="cuda:1"), torch.empty(64, device="cuda:1")
        assert _ext.check_device(x=x, bias=bias, residual=None) == 1
        with pytest.raises(_ext.CudaBackendError, match="cuda backend: bias is on cuda:0 but x is on cuda:1"):
            _ext.check_device(x=x, bias=torch.empty(64, device="cuda:0"))


def test_not_built(monkeypatch):
    monkeypatch.setattr(_ext, "load", lambda: None)
    monkeypatch.setattr(_ext, "_error", "No module named 'gpt2fast._C'")
    reason = _ext.unavailable_reason(torch.device("cuda"))
    assert "gpt2fast._C is not built" in reason and "No module named" in reason and "build_ext" in reason
    assert ops.backend_status("cuda", "cuda").reason == reason
    x, w, b = _ln_args()
    with pytest.raises(_ext.CudaBackendError, match="not built"):
        layer_norm.layer_norm(x, w, b, 1e-5, None)
    with pytest.raises(ops.BackendUnavailableError, match=r"backend 'cuda' is unavailable .*not built"):
        ops.layer_norm(x, w, b, backend="cuda")


def test_runtime_without_driver(fake):
    """A built extension on a machine whose driver cannot run it: a clear reason, no launch."""
    fake.device_count.return_value = (0, 35, "CUDA driver version is insufficient for CUDA runtime version")
    reason = _ext.unavailable_reason(torch.device("cuda", 0))
    assert "error 35" in reason and "insufficient" in reason
    x, _, b = _ln_args()
    with pytest.raises(_ext.CudaBackendError, match=r"no CUDA device usable by gpt2fast\._C"):
        bias_gelu.bias_gelu(x, b)
    fake.device_count.return_value = (1, 0, "")
    assert _ext.unavailable_reason(torch.device("cuda", 0)) == reason  # probed once, then cached
    assert fake.device_count.call_count == 1
    assert _launched(fake) == dict.fromkeys(KERNELS, 0)


def test_zero_devices_and_no_torch_cuda(fake, monkeypatch):
    fake.device_count.return_value = (0, 0, "")
    assert _ext.unavailable_reason(torch.device("cuda")) == "no CUDA device: gpt2fast._C's CUDA runtime sees 0 devices"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _ext.unavailable_reason(torch.device("cuda")) == "no CUDA device: torch.cuda.is_available() is False"


def test_cpu_device_not_available(fake):
    assert _ext.unavailable_reason(torch.device("cpu")) == "the cuda backend runs CUDA tensors only, not cpu tensors"
    assert _ext.unavailable_reason(torch.device("cuda")) is None
    assert ops.backend_status("cuda", "cpu").reason == "the cuda backend runs CUDA tensors only, not cpu tensors"


def test_public_op_refuses_cuda_backend_on_cpu():
    x, w, b = _ln_args()
    with pytest.raises(ops.BackendUnavailableError, match="backend 'cuda' is unavailable"):
        ops.layer_norm(x, w, b, backend="cuda")


def test_registered_like_the_other_backends():
    assert "cuda" in ops.backend_names() and ops.backend_names().index("cuda") == 0
    rows = [r for r in ops.implementations("cpu") if r.backend == "cuda"]
    assert sorted(r.op for r in rows) == sorted(KERNELS) and {r.priority for r in rows} == {30}


# ---- marshalling: every struct field, by name ----------------------------------------------------------------
def test_layer_norm_marshalling(launch_ok):
    x = torch.randn(2, 3, 40)
    w, b = torch.ones(40), torch.zeros(40)
    y = layer_norm.layer_norm(x, w, b, 1e-5, None)
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    got = _fields(launch_ok.params)
    assert got.pop("eps") == pytest.approx(1e-5)
    assert got == dict(
        dtype=0, stream=STREAM, device=DEVICE, x=x.data_ptr(), x_row_stride=40, residual=0, residual_row_stride=0,
        weight=w.data_ptr(), bias=b.data_ptr(), y=y.data_ptr(), h=0, rows=6, n=40,
    )  # fmt: skip
    assert launch_ok.guard.entered == [DEVICE] and launch_ok.guard.checked == [["bias", "weight", "x"]]

    big = torch.randn(5, 96, dtype=torch.float16)
    xr, r = big[:, :64], torch.randn(5, 128, dtype=torch.float16)[:, 64:]  # row strides 96 and 128
    wh, bh = torch.ones(64, dtype=torch.float16), torch.zeros(64, dtype=torch.float16)
    y, h = layer_norm.layer_norm(xr, wh, bh, 1e-3, r)
    got = _fields(launch_ok.params)
    assert got.pop("eps") == pytest.approx(1e-3)
    assert got == dict(
        dtype=1, stream=STREAM, device=DEVICE, x=xr.data_ptr(), x_row_stride=96, residual=r.data_ptr(),
        residual_row_stride=128, weight=wh.data_ptr(), bias=bh.data_ptr(), y=y.data_ptr(), h=h.data_ptr(), rows=5,
        n=64,
    )  # fmt: skip


def test_bias_gelu_marshalling(launch_ok):
    x = torch.randn(5, 96, dtype=torch.bfloat16)[:, :64]  # rows of 64 with row stride 96
    bias = torch.zeros(64, dtype=torch.bfloat16)
    y = bias_gelu.bias_gelu(x, bias)
    assert y.shape == (5, 64) and y.is_contiguous()
    assert _fields(launch_ok.params) == dict(
        dtype=2, stream=STREAM, device=DEVICE, x=x.data_ptr(), x_row_stride=96, bias=bias.data_ptr(),
        y=y.data_ptr(), rows=5, n=64,
    )  # fmt: skip
    bias_gelu.bias_gelu(x[:1], bias)  # one row: its stride is the row width
    assert _fields(launch_ok.params)["x_row_stride"] == 64


def test_attention_marshalling(launch_ok):
    qkv = torch.randn(2, 5, 3, 4, 32, dtype=torch.float16)  # [B, T, 3, H, D] like the model's c_attn output
    q, k, _ = (t.transpose(1, 2) for t in qkv.unbind(2))
    v = torch.randn(2, 4, 5, 32, dtype=torch.float16)  # contiguous: other strides than q's and k's
    out = attention.attention(q, k, v, True, None)
    assert out.shape == (2, 4, 5, 32) and out.is_contiguous()
    got = _fields(launch_ok.params)
    assert got.pop("scale") == pytest.approx(32**-0.5)
    view = (5 * 3 * 4 * 32, 32, 3 * 4 * 32)
    assert got == dict(
        dtype=1, stream=STREAM, device=DEVICE, q=q.data_ptr(), q_strides=view, k=k.data_ptr(), k_strides=view,
        v=v.data_ptr(), v_strides=(4 * 5 * 32, 5 * 32, 32), out=out.data_ptr(), batch=2, heads=4, seqlen=5,
        head_dim=32, causal=True,
    )  # fmt: skip
    attention.attention(q, k, v, False, 0.25)
    got = _fields(launch_ok.params)
    assert got["causal"] is False and got["scale"] == 0.25


def test_decode_marshalling(launch_ok):
    q, kc, _, sl, kn, _ = _decode_args(b=2, h=3, t=4096, d=64)
    # v_cache and v_new with other strides than k_cache and k_new, so a swapped pair cannot pass
    vc = torch.randn(2, 3, 4100, 64, dtype=torch.float16)[:, :, :4096]
    vn = torch.randn(2, 3, 128, dtype=torch.float16)[..., :64]
    out = decode_attention.decode_attention(q, kc, vc, sl, kn, vn, 0.5)
    assert out.shape == (2, 3, 64)
    splits = decode_attention.choose_splits(6, 4096, 132)
    got = _fields(launch_ok.params)
    o_part, lse, cnt = got.pop("o_part"), got.pop("lse"), got.pop("counters")
    assert splits > 1 and o_part != 0 and lse != 0 and o_part != lse  # partial buffers allocated
    assert cnt == _workspace.counters(q.device, 6).data_ptr()  # the zeroed arrival counters of the merge
    cache = (3 * 4096 * 64, 4096 * 64, 64)
    assert got == dict(
        dtype=1, stream=STREAM, device=DEVICE, q=q.data_ptr(), q_strides=(3 * 64, 64, 0), k_cache=kc.data_ptr(),
        k_cache_strides=cache, v_cache=vc.data_ptr(), v_cache_strides=(3 * 4100 * 64, 4100 * 64, 64),
        cache_seqlens=sl.data_ptr(), k_new=kn.data_ptr(), k_new_strides=(3 * 64, 64, 0), v_new=vn.data_ptr(),
        v_new_strides=(3 * 128, 128, 0),
        out=out.data_ptr(), batch=2, heads=3, t_max=4096, head_dim=64, num_splits=splits, scale=0.5,
    )  # fmt: skip
    assert launch_ok.guard.checked[-1] == ["cache_seqlens", "k_cache", "k_new", "q", "v_cache", "v_new"]

    q, kc, vc, sl, _, _ = _decode_args(b=64, h=12, t=16, d=32, dtype=torch.float32)
    decode_attention.decode_attention(q, kc, vc, sl, None, None, None)
    got = _fields(launch_ok.params)
    assert got["num_splits"] == 1 and got["o_part"] == got["lse"] == got["counters"] == 0  # one split: no partials
    assert got["k_new"] == got["v_new"] == 0 and got["k_new_strides"] == got["v_new_strides"] == (0, 0, 0)
    assert got["dtype"] == 0 and got["scale"] == pytest.approx(32**-0.5)


def test_layer_norm_backward_marshalling(launch_ok):
    h = torch.randn(5, 96)[:, :40]  # rows of 40 with row stride 96
    gy, gh, w = torch.randn(5, 40), torch.randn(5, 64)[:, :40], torch.ones(40)
    dh, dw, db = layer_norm_backward.layer_norm_backward(gy, h, w, 1e-5, gh)
    assert dh.shape == (5, 40) and dh.is_contiguous() and dw.shape == db.shape == (40,)
    got = _fields(launch_ok.params)
    assert got.pop("eps") == pytest.approx(1e-5)
    partial = got.pop("partial")
    assert partial not in (0, dh.data_ptr(), dw.data_ptr(), db.data_ptr())
    assert got == dict(
        dtype=0, stream=STREAM, device=DEVICE, grad_y=gy.data_ptr(), grad_y_row_stride=40, h=h.data_ptr(),
        h_row_stride=96, weight=w.data_ptr(), grad_h=gh.data_ptr(), grad_h_row_stride=64, dh=dh.data_ptr(),
        dweight=dw.data_ptr(), dbias=db.data_ptr(), programs=5, rows=5, n=40,
    )  # fmt: skip
    assert launch_ok.guard.checked[-1] == ["grad_h", "grad_y", "h", "weight"]
    layer_norm_backward.layer_norm_backward(torch.randn(1000, 8), torch.randn(1000, 8), torch.ones(8), 1e-5, None)
    got = _fields(launch_ok.params)
    assert got["programs"] == 4 * 132 and got["grad_h"] == 0 and got["grad_h_row_stride"] == 0  # 4 blocks per SM


def test_bias_gelu_backward_marshalling(launch_ok):
    x = torch.randn(3, 96, dtype=torch.float16)[:, :64]
    gy, bias = torch.randn(3, 64, dtype=torch.float16), torch.zeros(64, dtype=torch.float16)
    dx, db = bias_gelu_backward.bias_gelu_backward(gy, x, bias)
    assert dx.shape == (3, 64) and dx.is_contiguous() and db.shape == (64,)
    got = _fields(launch_ok.params)
    assert got.pop("partial") not in (0, dx.data_ptr(), db.data_ptr())
    assert got == dict(
        dtype=1, stream=STREAM, device=DEVICE, grad_y=gy.data_ptr(), grad_y_row_stride=64, x=x.data_ptr(),
        x_row_stride=96, bias=bias.data_ptr(), dx=dx.data_ptr(), dbias=db.data_ptr(), programs=3, rows=3, n=64,
    )  # fmt: skip
    expanded = torch.ones((), dtype=torch.float16).expand(3, 64)  # the gradient of a .sum(): copied, not declined
    bias_gelu_backward.bias_gelu_backward(expanded, x, bias)
    assert _fields(launch_ok.params)["grad_y_row_stride"] == 64


def test_backward_declines():
    assert layer_norm_backward.supports(_meta(2, 4097), _meta(2, 4097), _meta(4097), 1e-5, None) == (
        "cuda backend: layer_norm_backward rows must have N <= 4096, got 4097"
    )
    t = _meta(4, 32)
    assert layer_norm_backward.supports(t, _meta(32, 4).t(), _meta(32), 1e-5, None) == (
        "cuda backend: h must have unit stride in its last dim, got strides (1, 4)"
    )
    assert layer_norm_backward.supports(_meta(32, 4).t(), t, _meta(32), 1e-5, t) is None  # grads are copied
    assert bias_gelu_backward.supports(_meta(32, 4), _meta(4, 32).t(), _meta(4)) == (
        "cuda backend: x must have unit stride in its last dim, got strides (1, 32)"
    )
    assert bias_gelu_backward.supports(t, t, _meta(32)) is None


def test_training_goes_through_the_cuda_backward(available, monkeypatch):
    """A cuda layer_norm / bias_gelu forward is differentiable: its backward runs the cuda backward op; cuda
    attention is not (it saves no log-sum-exp), so "auto" skips it when a gradient is needed."""
    launched = _launch_ok(monkeypatch, available)
    calls = []

    def record(name):
        def launcher(params):
            calls.append(name)

        return launcher

    for name in KERNELS:
        getattr(launched.ext, name).side_effect = record(name)
    x, w, b = (t.requires_grad_() for t in _ln_args(n=32, rows=4))
    ops.layer_norm(x, w, b, backend="cuda").sum().backward()
    ops.bias_gelu(x, b, backend="cuda").sum().backward()
    assert calls == ["layer_norm", "layer_norm_backward", "bias_gelu", "bias_gelu_backward"]
    assert _registry.get_impl("attention", "cuda").differentiable is False
    q = torch.randn(1, 2, 4, 32, requires_grad=True)
    with pytest.raises(ops.UnsupportedInputError, match="has no backward for 'attention'"):
        ops.attention(q, q, q, backend="cuda")


def test_struct_fields_match_the_extension():
    """The fake structs above have exactly the real ``_C`` structs' fields, and the real ones refuse unknown
    names (so a misspelt field cannot be set silently)."""
    real = _real_ext()
    if real is None:
        pytest.skip("gpt2fast._C is not built here")
    for name, fields in FIELDS.items():
        cls = getattr(real, name)
        assert cls.FIELDS == fields, name
        params = cls()
        with pytest.raises(AttributeError):
            params.not_a_field = 1
        assert repr(params).startswith(f"{name}(dtype=-1, stream=0, device=-1, ")
    assert real.Strides(batch=1, head=2, time=3) == real.Strides(batch=1, head=2, time=3)
    with pytest.raises(TypeError):
        real.Strides(1, 2, 3)  # keyword-only: no positional order to get wrong


def test_make_params_refuses_unknown_fields(fake):
    with pytest.raises(AttributeError, match="no field 'x_stride'"):
        _ext.make_params("bias_gelu", x_stride=4)
    assert _ext.struct_name("decode_attention") == "DecodeAttentionParams"
    assert _fields(_ext.make_params("bias_gelu", **dict.fromkeys(FIELDS["BiasGeluParams"], 7))) == dict.fromkeys(
        FIELDS["BiasGeluParams"], 7
    )


# ---- splits, fake impls, compile -----------------------------------------------------------------------------
@pytest.mark.parametrize("bh,t_max", [(1, 1), (1, 100), (12, 1024), (4096, 1024), (8, 4096), (1, 1 << 20)])
def test_choose_splits(bh, t_max):
    s = decode_attention.choose_splits(bh, t_max, 132)
    assert 1 <= s <= decode_attention.MAX_SPLITS
    chunk = -(-t_max // s)
    assert (s - 1) * chunk < t_max  # no split is empty for a full cache
    if bh >= 2 * 132:
        assert s == 1
    if t_max >= 64 and bh * 2 <= 132:
        assert s > 1  # small B·H and a long cache: several splits


def test_fake_impls_shape_only(fake):
    """The register_fake implementations give shapes without touching the extension."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 4, 9, 64, dtype=torch.float16)
        assert torch.ops.gpt2fast.cuda_attention(q, q, q, True, 0.125).shape == q.shape
        x = torch.empty(3, 40)
        assert torch.ops.gpt2fast.cuda_layer_norm(x, torch.empty(40), torch.empty(40), 1e-5).shape == x.shape
        y, h = torch.ops.gpt2fast.cuda_layer_norm_residual(x, torch.empty(40), torch.empty(40), 1e-5, x)
        assert y.shape == h.shape == x.shape
        assert torch.ops.gpt2fast.cuda_bias_gelu(x, torch.empty(40)).shape == x.shape
        kc = torch.empty(2, 4, 16, 64)
        out = torch.ops.gpt2fast.cuda_decode_attention(
            q[:, :, 0], kc, kc, torch.empty(2, dtype=torch.int32), None, None, 0.1
        )
        assert out.shape == (2, 4, 64)
    assert _launched(fake) == dict.fromkeys(KERNELS, 0)


def ops_block(x, r, w, b, q, kc, vc, sl, kn):
    """Every op once on the cuda backend, as a model block calls them (also used by tests/test_cuda_gpu.py)."""
    y, h = ops.layer_norm(x, w, b, 1e-5, residual=r, backend="cuda")
    g = ops.bias_gelu(y, b, backend="cuda")
    a = ops.attention(q, q, q, causal=True, backend="cuda")
    d = ops.decode_attention(q[:, :, 0], kc, vc, sl, kn, kn, backend="cuda", check_seqlens=False)
    return g, h, a, d


def ops_block_args(device: str, dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, ...]:
    """Arguments of :func:`ops_block` on ``device``."""
    x, r = (torch.randn(4, 64, device=device, dtype=dtype) for _ in range(2))
    w, b = (torch.randn(64, device=device, dtype=dtype) for _ in range(2))
    q = torch.randn(2, 2, 9, 64, device=device, dtype=dtype)
    kc, vc = (torch.randn(2, 2, 32, 64, device=device, dtype=dtype) for _ in range(2))
    sl = torch.tensor([3, 30], device=device, dtype=torch.int32)
    kn = torch.randn(2, 2, 64, device=device, dtype=dtype)
    return x, r, w, b, q, kc, vc, sl, kn


def test_compile_fullgraph_through_custom_ops(available, monkeypatch):
    """dynamo + AOT autograd trace the public ops (registry, supports, custom ops with fake impls and mutated
    caches) into one graph; at run time each kernel is launched exactly once."""
    launched = _launch_ok(monkeypatch, available)
    args = ops_block_args("cpu")
    torch._dynamo.reset()
    g, h, a, d = torch.compile(ops_block, backend="aot_eager", fullgraph=True)(*args)
    assert g.shape == h.shape == args[0].shape and a.shape == args[4].shape and d.shape == (2, 2, 64)
    assert _launched(launched.ext) == dict.fromkeys(FORWARD_KERNELS, 1) | dict.fromkeys(KERNELS[4:], 0)
    assert launched.guard.entered == [DEVICE] * 4


# ---- the entry points' own checks (real extension) -----------------------------------------------------------
#: Fields that pass the C-side checks (fake 16-byte aligned addresses: only launched where no device is usable).
VALID = {
    "LayerNormParams": dict(dtype=0, x=16, x_row_stride=64, weight=32, bias=48, y=64, rows=2, n=64, eps=1e-5),
    "BiasGeluParams": dict(dtype=1, x=16, x_row_stride=64, bias=32, y=48, rows=2, n=64),
    "LayerNormBackwardParams": dict(
        dtype=0, grad_y=16, h=32, weight=48, dh=64, dweight=80, dbias=96, partial=112, programs=2, rows=2, n=64,
        eps=1e-5,
    ),
    "BiasGeluBackwardParams": dict(dtype=2, grad_y=16, x=32, bias=48, dx=64, dbias=80, partial=96, programs=1, rows=2,
                                   n=64),
    "AttentionParams": dict(dtype=1, q=16, k=32, v=48, out=64, batch=1, heads=2, seqlen=8, head_dim=64, scale=0.125),
    "DecodeAttentionParams": dict(
        dtype=2, q=16, k_cache=32, v_cache=48, cache_seqlens=64, out=80, batch=1, heads=2, t_max=16, head_dim=64,
        num_splits=1, scale=0.125,
    ),
}  # fmt: skip


def _real_params(real, struct: str, **over):
    params = getattr(real, struct)()
    for name, value in {**VALID[struct], "device": 0, **over}.items():
        setattr(params, name, value)
    return params


@pytest.mark.parametrize("struct", list(VALID))
def test_entry_points_refuse_unset_fields(struct):
    """Each required field left at its default (null, 0, -1), or an inconsistent pair, makes the entry point return
    cudaErrorInvalidValue before anything else; with every field set it gets past that check."""
    real = _real_ext()
    if real is None:
        pytest.skip("gpt2fast._C is not built here")
    kernel = getattr(real, {_ext.struct_name(k): k for k in KERNELS}[struct])
    default = getattr(real, struct)()
    required = [name for name in [*VALID[struct], "device"] if "stride" not in name]  # strides may be 0
    broken = [{name: getattr(default, name)} for name in required]
    broken += {
        "LayerNormParams": [dict(residual=96), dict(h=96), dict(n=2**30 + 1), dict(eps=float("nan"))],
        "BiasGeluParams": [dict(n=-1)],
        "LayerNormBackwardParams": [dict(n=4097), dict(programs=3), dict(eps=0.0)],
        "BiasGeluBackwardParams": [dict(programs=3), dict(n=-5)],
        "AttentionParams": [dict(head_dim=48), dict(dtype=3), dict(scale=-1.0), dict(seqlen=2**30 + 1)],
        "DecodeAttentionParams": [dict(k_new=96), dict(v_new=96), dict(num_splits=2), dict(num_splits=17)],
    }[struct]
    for over in broken:
        with pytest.raises(RuntimeError, match=r"CUDA error 1 \(.*\); a required field is unset or out of range"):
            kernel(_real_params(real, struct, **over))
    _, code, _ = real.device_count()
    if code != 0:  # no usable device here: a valid struct reaches the runtime, which refuses it
        with pytest.raises(RuntimeError, match=rf"CUDA error {code} "):
            kernel(_real_params(real, struct))
