// y = gelu_tanh(x + bias), computed in fp32; 128-bit loads when n and pointers allow it.
#include "common.cuh"

namespace g2f {
namespace {

// Grid-stride over chunks of kW elements of the logical [rows, n] array (n % kW == 0).
template <typename T, int kW>
__global__ void bias_gelu_kernel(const T* __restrict__ x, int64_t x_stride, const T* __restrict__ bias,
                                 T* __restrict__ y, int64_t rows, int64_t n) {
  const int64_t per_row = n / kW;
  const int64_t total = rows * per_row;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / per_row;
    const int64_t col = (i - row * per_row) * kW;
    if constexpr (kW == Vec<T>::kSize && kW > 1) {
      const Vec<T> a = load_vec(x + row * x_stride + col);
      const Vec<T> b = load_vec(bias + col);
      Vec<T> out;
#pragma unroll
      for (int k = 0; k < kW; ++k) out.v[k] = from_float<T>(gelu_tanh(to_float(a.v[k]) + to_float(b.v[k])));
      store_vec(y + row * n + col, out);
    } else {
      y[row * n + col] = from_float<T>(gelu_tanh(to_float(x[row * x_stride + col]) + to_float(bias[col])));
    }
  }
}

template <typename T, int kW>
void launch(const T* x, int64_t xs, const T* b, T* y, int64_t rows, int64_t n, cudaStream_t stream) {
  const int threads = 256;
  const int64_t chunks = rows * (n / kW);
  int64_t blocks = (chunks + threads - 1) / threads;
  if (blocks > 65536) blocks = 65536;  // grid-stride beyond this
  bias_gelu_kernel<T, kW><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(x, xs, b, y, rows, n);
}

}  // namespace

int bias_gelu(const BiasGeluParams& p) {
  if (!launch_fields_set(p.dtype, p.device) || p.x == nullptr || p.bias == nullptr || p.y == nullptr)
    return cudaErrorInvalidValue;
  if (p.rows <= 0 || p.n <= 0) return cudaErrorInvalidValue;
  DeviceGuard guard(p.device);  // restores the caller's device on return
  G2F_RETURN_IF_ERROR(guard.status());
  auto s = static_cast<cudaStream_t>(p.stream);
  const int64_t rows = p.rows, n = p.n, xs = p.x_row_stride;
  G2F_DISPATCH_DTYPE(p.dtype, T, {
    constexpr int kVecW = Vec<T>::kSize;
    auto xt = static_cast<const T*>(p.x);
    auto bt = static_cast<const T*>(p.bias);
    auto yt = static_cast<T*>(p.y);
    if (n % kVecW == 0 && xs % kVecW == 0 && aligned16(p.x) && aligned16(p.bias) && aligned16(p.y))
      launch<T, kVecW>(xt, xs, bt, yt, rows, n, s);
    else
      launch<T, 1>(xt, xs, bt, yt, rows, n, s);
  });
  return launch_status();
}

}  // namespace g2f
