// Backward of y = gelu_tanh(x + bias): a 2-D grid of (tiles of kTile columns, `programs` row groups).  A thread owns
// kPer columns of its tile and keeps their bias and partial dbias sums in fp32 registers; it takes every
// programs-th row, writes dx = dy * gelu_tanh'(x + bias) and adds dx to its partial sums, written at the end to
// row blockIdx.y of the float workspace; column_sum_kernel adds the rows up in a fixed order into dbias.
#include "common.cuh"

namespace g2f {
namespace {

constexpr int kThreads = 256;
constexpr int kPer = 4;
constexpr int kTile = kThreads * kPer;

template <typename T>
__global__ void bias_gelu_backward_kernel(BiasGeluBackwardParams p) {
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x;
  const T* bias = typed<T>(p.bias);
  float b[kPer], acc[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t c = col0 + i * kThreads;
    b[i] = c < p.n ? to_float(bias[c]) : 0.f;
    acc[i] = 0.f;
  }
  for (int64_t row = blockIdx.y; row < p.rows; row += gridDim.y) {
    const T* xr = typed<T>(p.x) + row * p.x_row_stride;
    const T* dyr = typed<T>(p.grad_y) + row * p.grad_y_row_stride;
    T* dxr = typed<T>(p.dx) + row * p.n;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int64_t c = col0 + i * kThreads;
      if (c < p.n) {
        const float d = to_float(dyr[c]) * gelu_tanh_grad(to_float(xr[c]) + b[i]);
        dxr[c] = from_float<T>(d);
        acc[i] += d;
      }
    }
  }
  float* part = p.partial + static_cast<int64_t>(blockIdx.y) * p.n;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t c = col0 + i * kThreads;
    if (c < p.n) part[c] = acc[i];
  }
}

}  // namespace

int bias_gelu_backward(const BiasGeluBackwardParams& p) {
  if (!launch_fields_set(p.dtype, p.device) || p.grad_y == nullptr || p.x == nullptr || p.bias == nullptr ||
      p.dx == nullptr || p.dbias == nullptr || p.partial == nullptr)
    return cudaErrorInvalidValue;
  if (p.rows <= 0 || p.n <= 0 || p.programs <= 0 || p.programs > p.rows || p.programs > 65535)
    return cudaErrorInvalidValue;
  const int64_t tiles = (p.n + kTile - 1) / kTile;
  if (tiles > 0x7fffffffLL) return cudaErrorInvalidValue;
  DeviceGuard guard(p.device);  // restores the caller's device on return
  G2F_RETURN_IF_ERROR(guard.status());
  auto s = static_cast<cudaStream_t>(p.stream);
  G2F_DISPATCH_DTYPE(p.dtype, T, {
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(p.programs));
    bias_gelu_backward_kernel<T><<<grid, kThreads, 0, s>>>(p);
    launch_column_sum<T>(p.partial, p.n, p.programs, p.n, static_cast<T*>(p.dbias), s);
  });
  return launch_status();
}

}  // namespace g2f
