// Backward of (residual add +) LayerNorm: `programs` blocks, each taking every programs-th row.  A thread owns
// kPer columns (c = threadIdx.x + i * blockDim.x) and keeps their weight and partial dweight / dbias sums in fp32
// registers; per row it reads h and grad_y once, recomputes the statistics (two-pass on the row shifted by its
// first element, as the forward), writes dh and adds dy * xhat and dy to its partial sums.  Each block then
// writes its partial sums to one row of the float workspace, and column_sum_kernel adds the rows up in a fixed
// order into dweight and dbias (no atomics).
#include "common.cuh"

namespace g2f {
namespace {

constexpr int kMaxN = 4096;  // 512 threads x 8 columns: wider rows would need more registers than a block gets

template <typename T, int kPer>
__global__ void __launch_bounds__(512) layer_norm_backward_kernel(LayerNormBackwardParams p) {
  __shared__ float scratch[4][32];
  const int n = static_cast<int>(p.n);
  const float inv_n = 1.f / static_cast<float>(n);
  const T* w = typed<T>(p.weight);
  float wr[kPer], dw[kPer], db[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    wr[i] = c < n ? to_float(w[c]) : 0.f;
    dw[i] = db[i] = 0.f;
  }
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {  // uniform over the block (block_sum syncs)
    const T* hr = typed<T>(p.h) + row * p.h_row_stride;
    const T* dyr = typed<T>(p.grad_y) + row * p.grad_y_row_stride;
    const float shift = to_float(hr[0]);
    float hv[kPer], dy[kPer];
    float s1 = 0.f;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int c = threadIdx.x + i * blockDim.x;
      hv[i] = c < n ? to_float(hr[c]) - shift : 0.f;
      dy[i] = c < n ? to_float(dyr[c]) : 0.f;
      s1 += hv[i];
    }
    const float mean_s = block_sum(s1, scratch[0]) * inv_n;
    float s2 = 0.f;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int c = threadIdx.x + i * blockDim.x;
      hv[i] = c < n ? hv[i] - mean_s : 0.f;
      s2 = fmaf(hv[i], hv[i], s2);
    }
    const float rstd = rsqrtf(block_sum(s2, scratch[1]) * inv_n + p.eps);
    float a = 0.f, b = 0.f;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      hv[i] *= rstd;  // xhat
      const float wdy = wr[i] * dy[i];
      a = fmaf(hv[i], wdy, a);
      b += wdy;
    }
    const float c1 = block_sum(a, scratch[2]) * inv_n, c2 = block_sum(b, scratch[3]) * inv_n;
    const T* ghr = p.grad_h == nullptr ? nullptr : typed<T>(p.grad_h) + row * p.grad_h_row_stride;
    T* dhr = typed<T>(p.dh) + row * static_cast<int64_t>(n);
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int c = threadIdx.x + i * blockDim.x;
      if (c < n) {
        float d = (wr[i] * dy[i] - (hv[i] * c1 + c2)) * rstd;
        if (ghr != nullptr) d += to_float(ghr[c]);
        dhr[c] = from_float<T>(d);
      }
      dw[i] = fmaf(dy[i], hv[i], dw[i]);
      db[i] += dy[i];
    }
  }
  float* part = p.partial + static_cast<int64_t>(blockIdx.x) * 2 * n;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (c < n) {
      part[c] = dw[i];
      part[n + c] = db[i];
    }
  }
}

template <typename T, int kPer>
void launch(const LayerNormBackwardParams& p, int threads, cudaStream_t s) {
  layer_norm_backward_kernel<T, kPer><<<static_cast<unsigned>(p.programs), threads, 0, s>>>(p);
}

}  // namespace

int layer_norm_backward(const LayerNormBackwardParams& p) {
  if (!launch_fields_set(p.dtype, p.device) || p.grad_y == nullptr || p.h == nullptr || p.weight == nullptr ||
      p.dh == nullptr || p.dweight == nullptr || p.dbias == nullptr || p.partial == nullptr || !positive_finite(p.eps))
    return cudaErrorInvalidValue;
  if (p.rows <= 0 || p.n <= 0 || p.n > kMaxN || p.programs <= 0 || p.programs > p.rows) return cudaErrorInvalidValue;
  DeviceGuard guard(p.device);  // restores the caller's device on return
  G2F_RETURN_IF_ERROR(guard.status());
  auto s = static_cast<cudaStream_t>(p.stream);
  // 256 threads up to 2048 columns, 512 beyond: at most 8 columns (kPer) per thread (80 registers).
  const int threads = p.n <= 2048 ? 256 : 512;
  const int64_t per = (p.n + threads - 1) / threads;
  G2F_DISPATCH_DTYPE(p.dtype, T, {
    if (per <= 1)
      launch<T, 1>(p, threads, s);
    else if (per <= 2)
      launch<T, 2>(p, threads, s);
    else if (per <= 4)
      launch<T, 4>(p, threads, s);
    else
      launch<T, 8>(p, threads, s);
    launch_column_sum<T>(p.partial, 2 * p.n, p.programs, p.n, static_cast<T*>(p.dweight), s);
    launch_column_sum<T>(p.partial + p.n, 2 * p.n, p.programs, p.n, static_cast<T*>(p.dbias), s);
  });
  return launch_status();
}

}  // namespace g2f
