"""CPU tests of the CUDA backend's Python side: every bad input is refused before any launch.

The compiled module is replaced by a mock, so these run without nvcc or a GPU and can assert
that no kernel entry point was called.  The marshalling tests pretend the device check passed
and check the exact pointers/sizes/strides handed to the launcher.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from gpt2fast import ops
from gpt2fast.ops import cuda

LAUNCHERS = ("layer_norm", "bias_gelu", "attention", "decode_attention")


@pytest.fixture
def ext(monkeypatch):
    """A mock gpt2fast._C seeing one device; the device check stays real (so CPU tensors are refused)."""
    fake = mock.MagicMock(name="gpt2fast._C")
    fake.device_count.return_value = (1, 0, "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "_load_ext", lambda: fake)
    monkeypatch.setattr(cuda, "_runtime", None)
    yield fake
    for name in LAUNCHERS:
        assert not getattr(fake, name).called, f"{name} was launched despite the error"


@pytest.fixture
def launch_ok(monkeypatch):
    """A mock gpt2fast._C with the device check bypassed: CPU tensors reach the launcher."""
    fake = mock.MagicMock(name="gpt2fast._C")
    monkeypatch.setattr(cuda, "_load_ext", lambda: fake)
    monkeypatch.setattr(cuda, "_check_device", lambda **tensors: 0)
    monkeypatch.setattr(cuda, "_stream", lambda device: 1234)
    monkeypatch.setattr(cuda, "_num_sms", lambda device: 132)
    return fake


def _ln_args(n=64, rows=3, dtype=torch.float32):
    return torch.randn(rows, n, dtype=dtype), torch.ones(n, dtype=dtype), torch.zeros(n, dtype=dtype)


# ----------------------------------------------------------------------------- refused inputs
def test_layer_norm_wrong_dtype(ext):
    x, w, b = _ln_args(dtype=torch.float64)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        cuda.layer_norm(x, w, b, 1e-5, None)


def test_layer_norm_last_dim_stride(ext):
    x, w, b = _ln_args(n=128)
    with pytest.raises(ValueError, match="x must have unit stride in its last dim"):
        cuda.layer_norm(x[:, ::2], w[:64], b[:64], 1e-5, None)


def test_layer_norm_residual_not_viewable(ext):
    x = torch.randn(4, 6, 32)
    r = torch.randn(6, 4, 32).transpose(0, 1)  # rows cannot share one stride
    w, b = torch.ones(32), torch.zeros(32)
    with pytest.raises(ValueError, match=r"residual .* cannot be viewed as \[rows, 32\]"):
        cuda.layer_norm(x, w, b, 1e-5, r)


def test_layer_norm_strided_weight(ext):
    x, _, _ = _ln_args(n=64)
    w = torch.ones(128)[::2]
    with pytest.raises(ValueError, match="weight must be a contiguous 1-D tensor"):
        cuda.layer_norm(x, w, torch.zeros(64), 1e-5, None)


def test_cpu_tensors_refused(ext):
    x, w, b = _ln_args()
    with pytest.raises(cuda.CudaBackendError, match="x is a cpu tensor; it needs CUDA tensors"):
        cuda.layer_norm(x, w, b, 1e-5, None)
    with pytest.raises(cuda.CudaBackendError, match="x is a cpu tensor"):
        cuda.bias_gelu(x, b)


def test_bias_gelu_stride(ext):
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="x must have unit stride"):
        cuda.bias_gelu(x.t(), torch.zeros(4))
    with pytest.raises(ValueError, match="bias must be a contiguous 1-D tensor"):
        cuda.bias_gelu(x, torch.zeros(128)[::2])


@pytest.mark.parametrize("d", [16, 48, 96, 256])
def test_attention_unsupported_head_dim(ext, d):
    q = torch.randn(1, 2, 8, d, dtype=torch.float16)
    with pytest.raises(ValueError, match=rf"head dim D = {d} is not supported"):
        cuda.attention(q, q, q, True, None)


def test_attention_misaligned(ext):
    k = torch.randn(1, 2, 8, 64, dtype=torch.float16)
    v = torch.randn(1, 2, 8, 68, dtype=torch.float16)[..., :64]  # row stride 68 is not a multiple of 8
    with pytest.raises(ValueError, match=r"v strides \(1088, 544, 68, 1\) must be multiples of 8"):
        cuda.attention(k, k, v, True, None)
    with pytest.raises(ValueError, match="k must have unit stride"):
        cuda.attention(k, k.transpose(2, 3).contiguous().transpose(2, 3)[..., :8, :], k, True, None)


def test_attention_misaligned_pointer(launch_ok):
    q = torch.randn(1, 2, 8, 72, dtype=torch.float16)[..., 1:65]  # storage offset of 1 element
    assert q.stride() == (1152, 576, 72, 1)
    k = torch.randn(1, 2, 8, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="q must be 16-byte aligned"):
        cuda.attention(q, k, k, True, None)
    assert not launch_ok.attention.called


def test_size_one_dims_may_have_any_stride(launch_ok):
    base = torch.randn(1, 2, 8, 64, dtype=torch.float16)
    q = base.as_strided((1, 2, 8, 64), (3, 512, 64, 1))  # batch of 1 with an odd (unused) stride
    cuda.attention(q, base, base, True, None)
    assert launch_ok.attention.call_args.args[9] == [3, 512, 64]


def test_attention_cpu_refused(ext):
    q = torch.randn(1, 2, 8, 64, dtype=torch.float16)
    with pytest.raises(cuda.CudaBackendError, match="q is a cpu tensor"):
        cuda.attention(q, q, q, True, None)


def _decode_args(b=2, h=3, t=16, d=64, dtype=torch.float16):
    q = torch.randn(b, h, d, dtype=dtype)
    kc = torch.randn(b, h, t, d, dtype=dtype)
    vc = torch.randn(b, h, t, d, dtype=dtype)
    sl = torch.tensor([3, 7][:b] + [0] * max(0, b - 2), dtype=torch.int32)
    return q, kc, vc, sl, torch.randn(b, h, d, dtype=dtype), torch.randn(b, h, d, dtype=dtype)


def test_decode_bad_cache_layout(ext):
    q, kc, vc, sl, kn, vn = _decode_args()
    kc_t = kc.transpose(2, 3).contiguous().transpose(2, 3)  # D not unit-stride
    with pytest.raises(ValueError, match="k_cache must have unit stride in its last dim"):
        cuda.decode_attention(q, kc_t, vc, sl, kn, vn, None)


def test_decode_misaligned_cache_pointer(launch_ok):
    q, kc, _, sl, kn, vn = _decode_args()
    vc_off = torch.randn(2 * 3 * 16 * 64 + 4, dtype=torch.float16)[4:].view(2, 3, 16, 64)
    with pytest.raises(ValueError, match="v_cache must be 16-byte aligned"):
        cuda.decode_attention(q, kc, vc_off, sl, kn, vn, None)
    assert not launch_ok.decode_attention.called


def test_decode_bad_new_and_seqlens(ext):
    q, kc, vc, sl, kn, vn = _decode_args()
    kn_strided = torch.randn(2, 3, 64 * 2, dtype=torch.float16)[..., ::2]
    with pytest.raises(ValueError, match="k_new must have unit stride"):
        cuda.decode_attention(q, kc, vc, sl, kn_strided, vn, None)
    sl_strided = torch.zeros(4, dtype=torch.int32)[::2]
    with pytest.raises(ValueError, match="cache_seqlens must be contiguous"):
        cuda.decode_attention(q, kc, vc, sl_strided, kn, vn, None)
    with pytest.raises(ValueError, match=r"head dim D = 80 is not supported"):
        qq = torch.randn(2, 3, 80, dtype=torch.float16)
        cuda.decode_attention(qq, qq[:, :, None].expand(2, 3, 4, 80), qq[:, :, None], sl, None, None, None)


def test_decode_cpu_refused(ext):
    q, kc, vc, sl, kn, vn = _decode_args()
    with pytest.raises(cuda.CudaBackendError, match="q is a cpu tensor"):
        cuda.decode_attention(q, kc, vc, sl, kn, vn, None)


def _meta(*shape, dtype=torch.float16):
    return torch.empty(shape, dtype=dtype, device="meta")


def test_int32_and_grid_limits(ext):
    """Sizes past the kernels' int32 position math or grid limits are refused (meta tensors: no memory)."""
    q = _meta(1, 1, 2**30 + 1, 32)
    with pytest.raises(ValueError, match=r"T must be <= 2\*\*30"):
        cuda.attention(q, q, q, True, None)
    qd, kc = _meta(1, 1, 32), _meta(1, 1, 2**30 + 1, 32)
    sl = torch.empty(1, dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match=r"T_max must be <= 2\*\*30"):
        cuda.decode_attention(qd, kc, kc, sl, None, None, None)
    qd, kc = _meta(65535, 65535, 32), _meta(65535, 65535, 1, 32)
    sl = torch.empty(65535, dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match=r"B\*H must be <= 2\*\*31 - 1"):
        cuda.decode_attention(qd, kc, kc, sl, None, None, None)
    with pytest.raises(ValueError, match=r"N <= 2\*\*30"):
        cuda.layer_norm(_meta(2, 2**30 + 8), _meta(2**30 + 8), _meta(2**30 + 8), 1e-5, None)
    with pytest.raises(ValueError, match="exceeds the grid limit"):
        cuda.layer_norm(_meta(2**31, 264), _meta(264), _meta(264), 1e-5, None)


@pytest.mark.parametrize("value", [1e-39, 1e-300, 2e38])
def test_eps_and_scale_outside_fp32(ext, value):
    """eps / scale that round to 0 (or overflow) in the kernels' fp32 are refused, not silently changed."""
    x, w, b = _ln_args()
    with pytest.raises(ValueError, match=r"eps = .* outside"):
        cuda.layer_norm(x, w, b, value, None)
    q = torch.randn(1, 2, 8, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"scale = .* outside"):
        cuda.attention(q, q, q, True, value)
    q, kc, vc, sl, kn, vn = _decode_args()
    with pytest.raises(ValueError, match=r"scale = .* outside"):
        cuda.decode_attention(q, kc, vc, sl, kn, vn, value)


# ----------------------------------------------------------------------------- availability
def test_not_built(monkeypatch):
    monkeypatch.setattr(cuda, "_load_ext", lambda: None)
    monkeypatch.setattr(cuda, "_ext_error", "No module named 'gpt2fast._C'")
    ok, reason = cuda.is_available(torch.device("cuda"))
    assert not ok and "gpt2fast._C is not built" in reason and "No module named" in reason
    x, w, b = _ln_args()
    with pytest.raises(cuda.CudaBackendError, match="not built"):
        cuda.layer_norm(x, w, b, 1e-5, None)


def test_runtime_without_driver(monkeypatch, ext):
    """A built extension on a machine whose driver cannot run it: a clear error, no launch."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ext.device_count.return_value = (0, 35, "CUDA driver version is insufficient for CUDA runtime version")
    ok, reason = cuda.is_available(torch.device("cuda", 0))
    assert not ok and "error 35" in reason and "insufficient" in reason
    x, _, b = _ln_args()
    with pytest.raises(cuda.CudaBackendError, match=r"no CUDA device usable by gpt2fast\._C"):
        cuda.bias_gelu(x, b)


def test_no_device(monkeypatch, ext):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ok, reason = cuda.is_available(torch.device("cuda"))
    assert not ok and "torch.cuda.is_available() is False" in reason


def test_cpu_device_not_available(monkeypatch, ext):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ok, reason = cuda.is_available(torch.device("cpu"))
    assert not ok and "CUDA tensors only" in reason


def test_public_op_refuses_cuda_backend_on_cpu():
    x, w, b = _ln_args()
    with pytest.raises(ops.BackendUnavailableError, match="backend 'cuda' is unavailable"):
        ops.layer_norm(x, w, b, backend="cuda")


# ----------------------------------------------------------------------------- marshalling
def test_layer_norm_marshalling(launch_ok):
    x = torch.randn(2, 3, 40)
    r = torch.randn(2, 3, 40)
    w, b = torch.ones(40), torch.zeros(40)
    y = cuda.layer_norm(x, w, b, 1e-5, None)
    assert y.shape == x.shape and y.dtype == x.dtype
    args = launch_ok.layer_norm.call_args.args
    assert args[0] == 0 and args[1] == x.data_ptr() and args[2] == 40 and args[3] == 0 and args[8] == 0
    assert args[9:13] == (6, 40, pytest.approx(1e-5), 1234)
    y, h = cuda.layer_norm(x.half(), w.half(), b.half(), 1e-3, r.half()[:, :, :])
    args = launch_ok.layer_norm.call_args.args
    assert args[0] == 1 and args[3] != 0 and args[4] == 40 and args[7] == y.data_ptr() and args[8] == h.data_ptr()


def test_bias_gelu_marshalling_row_stride(launch_ok):
    big = torch.randn(5, 96, dtype=torch.bfloat16)
    x = big[:, :64]  # rows of 64 with row stride 96
    bias = torch.zeros(64, dtype=torch.bfloat16)
    y = cuda.bias_gelu(x, bias)
    assert y.shape == (5, 64) and y.is_contiguous()
    args = launch_ok.bias_gelu.call_args.args
    assert args[:8] == (2, x.data_ptr(), 96, bias.data_ptr(), y.data_ptr(), 5, 64, 1234)


def test_attention_marshalling(launch_ok):
    qkv = torch.randn(2, 5, 3, 4, 32, dtype=torch.float16)  # [B, T, 3, H, D] like the model's c_attn output
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    out = cuda.attention(q, k, v, True, None)
    assert out.shape == (2, 4, 5, 32) and out.is_contiguous()
    args = launch_ok.attention.call_args.args
    assert args[0] == 1 and args[5:9] == (2, 4, 5, 32)
    assert args[9] == [5 * 3 * 4 * 32, 32, 3 * 4 * 32]
    assert args[12] is True and args[13] == pytest.approx(32**-0.5)


def test_decode_marshalling(launch_ok):
    q, kc, vc, sl, kn, vn = _decode_args(b=2, h=3, t=4096, d=64)
    out = cuda.decode_attention(q, kc, vc, sl, kn, vn, 0.5)
    assert out.shape == (2, 3, 64)
    args = launch_ok.decode_attention.call_args.args
    splits = cuda.choose_splits(6, 4096, 132)
    assert args[15:22] == (2, 3, 4096, 64, splits, 0.5, 1234)
    assert splits > 1 and args[13] != 0 and args[14] != 0  # partial buffers allocated
    assert args[5] == [3 * 4096 * 64, 4096 * 64, 64] and args[8] == kn.data_ptr()
    cuda.decode_attention(q, kc, vc, sl, None, None, None)
    args = launch_ok.decode_attention.call_args.args
    assert args[8] == 0 and args[9] == 0


@pytest.mark.parametrize("bh,t_max", [(1, 1), (1, 100), (12, 1024), (4096, 1024), (8, 4096), (1, 1 << 20)])
def test_choose_splits(bh, t_max):
    s = cuda.choose_splits(bh, t_max, 132)
    assert 1 <= s <= cuda.MAX_SPLITS
    chunk = -(-t_max // s)
    assert (s - 1) * chunk < t_max  # no split is empty for a full cache
    if bh >= 2 * 132:
        assert s == 1


def test_fake_impls_shape_only():
    """The register_fake implementations give shapes without touching the extension."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 4, 9, 64, dtype=torch.float16)
        assert torch.ops.gpt2fast.cuda_attention(q, q, q, True, 0.125).shape == q.shape
        x = torch.empty(3, 40)
        y, h = torch.ops.gpt2fast.cuda_layer_norm_residual(x, torch.empty(40), torch.empty(40), 1e-5, x)
        assert y.shape == h.shape == x.shape
        kc = torch.empty(2, 4, 16, 64)
        out = torch.ops.gpt2fast.cuda_decode_attention(
            q[:, :, 0], kc, kc, torch.empty(2, dtype=torch.int32), None, None, 0.1
        )
        assert out.shape == (2, 4, 64)


def test_compile_fullgraph_through_custom_ops(launch_ok):
    """dynamo + AOT autograd trace all four ops as custom ops in one graph (fake impls, mutated caches)."""

    def block(x, w, b, r, q, kc, vc, sl, kn):
        y, h = cuda.layer_norm(x, w, b, 1e-5, r)
        g = cuda.bias_gelu(y, b)
        a = cuda.attention(q, q, q, True, None)
        d = cuda.decode_attention(q[:, :, 0], kc, vc, sl, kn, kn, None)
        return g, h, a, d

    dt = torch.float16
    x, r = torch.randn(4, 64, dtype=dt), torch.randn(4, 64, dtype=dt)
    w, b = torch.ones(64, dtype=dt), torch.zeros(64, dtype=dt)
    q = torch.randn(2, 2, 9, 64, dtype=dt)
    kc, vc = torch.randn(2, 2, 32, 64, dtype=dt), torch.randn(2, 2, 32, 64, dtype=dt)
    sl, kn = torch.tensor([3, 30], dtype=torch.int32), torch.randn(2, 2, 64, dtype=dt)
    torch._dynamo.reset()
    g, h, a, d = torch.compile(block, backend="aot_eager", fullgraph=True)(x, w, b, r, q, kc, vc, sl, kn)
    assert g.shape == h.shape == x.shape and a.shape == q.shape and d.shape == (2, 2, 64)
    for name in ("layer_norm", "bias_gelu", "attention", "decode_attention"):
        assert getattr(launch_ok, name).call_count == 1, name
