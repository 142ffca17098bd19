// Fused (residual add +) LayerNorm: one warp per row for short rows, one block per row for long
// ones.  128-bit loads when n and every pointer/stride allow it, scalar loads otherwise.
// Statistics in fp32 and exact two-pass (mean, then mean squared deviation), so the variance has
// no cancellation even when |mean| >> std; the second and third reads of the row hit L1/L2.
// Both passes work on v - v0 (v0 = the row's first element, one cached broadcast load): the
// shifted values are small when |mean| >> std, so the fp32 sum of pass 1 and hence the mean are
// accurate to the shifted values' scale, not to |mean|'s.
// The statistics use the unrounded fp32 x + residual; h is written rounded to the input dtype.
#include "common.cuh"

namespace g2f {
namespace {

// Element width of one load: a full Vec<T> when vectorised, a single element otherwise.
template <typename T, bool kVec>
struct Chunk {
  static constexpr int kSize = kVec ? Vec<T>::kSize : 1;
  T v[kSize];
  __device__ __forceinline__ void load(const T* p) {
    if constexpr (kVec) {
      Vec<T> t = load_vec(p);
#pragma unroll
      for (int i = 0; i < kSize; ++i) v[i] = t.v[i];
    } else {
      v[0] = *p;
    }
  }
  __device__ __forceinline__ void store(T* p) const {
    if constexpr (kVec) {
      Vec<T> t;
#pragma unroll
      for (int i = 0; i < kSize; ++i) t.v[i] = v[i];
      store_vec(p, t);
    } else {
      *p = v[0];
    }
  }
};

// f = x[off..] (+ residual[off..]) in fp32, for one chunk.
template <typename T, bool kVec, bool kResidual>
__device__ __forceinline__ void load_sum(const T* xr, const T* rr, int64_t off, float (&f)[Chunk<T, kVec>::kSize]) {
  Chunk<T, kVec> a;
  a.load(xr + off);
#pragma unroll
  for (int i = 0; i < Chunk<T, kVec>::kSize; ++i) f[i] = to_float(a.v[i]);
  if constexpr (kResidual) {
    Chunk<T, kVec> r;
    r.load(rr + off);
#pragma unroll
    for (int i = 0; i < Chunk<T, kVec>::kSize; ++i) f[i] += to_float(r.v[i]);
  }
}

// Sum over the threads that share a row: the warp, or the whole 1-D block (uniform branch).
__device__ __forceinline__ float row_sum(float v, float* scratch) {
  return blockDim.x == 32 ? warp_sum(v) : block_sum(v, scratch);
}

// Each row is handled by blockDim.x threads (32 = a warp, then blockDim.y rows per block; or a
// whole 1-D block of >32 threads, then blockDim.y == 1 and gridDim.x == rows).
template <typename T, bool kVec, bool kResidual>
__global__ void layer_norm_kernel(const T* __restrict__ x, int64_t x_stride, const T* __restrict__ residual,
                                  int64_t res_stride, const T* __restrict__ weight, const T* __restrict__ bias,
                                  T* __restrict__ y, T* __restrict__ h, int64_t rows, int n, float eps) {
  using C = Chunk<T, kVec>;
  __shared__ float scratch[2][32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  // Only the warp-per-row layout can have surplus rows, and it never calls __syncthreads.
  if (row >= rows) return;
  const T* xr = x + row * x_stride;
  const T* rr = kResidual ? residual + row * res_stride : nullptr;
  const int nchunks = n / C::kSize;

  const float inv_n = 1.f / static_cast<float>(n);
  // The shift: exactly the fp32 value load_sum computes for element 0 (same operations).
  float shift = to_float(xr[0]);
  if constexpr (kResidual) shift += to_float(rr[0]);

  // Pass 1: the shifted mean (and h = x + residual, rounded to T, written out).
  float s1 = 0.f;
  for (int c = threadIdx.x; c < nchunks; c += blockDim.x) {
    const int64_t off = static_cast<int64_t>(c) * C::kSize;
    float f[C::kSize];
    load_sum<T, kVec, kResidual>(xr, rr, off, f);
    if constexpr (kResidual) {
      C hs;
#pragma unroll
      for (int i = 0; i < C::kSize; ++i) hs.v[i] = from_float<T>(f[i]);
      hs.store(h + row * static_cast<int64_t>(n) + off);
    }
#pragma unroll
    for (int i = 0; i < C::kSize; ++i) s1 += f[i] - shift;
  }
  const float mean_s = row_sum(s1, scratch[0]) * inv_n;  // mean(v - v0)

  // Pass 2: the variance as the mean of squared deviations (no cancellation); the row is
  // re-read from L1/L2.
  float s2 = 0.f;
  for (int c = threadIdx.x; c < nchunks; c += blockDim.x) {
    float f[C::kSize];
    load_sum<T, kVec, kResidual>(xr, rr, static_cast<int64_t>(c) * C::kSize, f);
#pragma unroll
    for (int i = 0; i < C::kSize; ++i) {
      const float dv = (f[i] - shift) - mean_s;
      s2 = fmaf(dv, dv, s2);
    }
  }
  const float rstd = rsqrtf(row_sum(s2, scratch[1]) * inv_n + eps);

  // Pass 3: normalise in fp32.
  T* yr = y + row * static_cast<int64_t>(n);
  for (int c = threadIdx.x; c < nchunks; c += blockDim.x) {
    const int64_t off = static_cast<int64_t>(c) * C::kSize;
    C w, b, out;
    w.load(weight + off);
    b.load(bias + off);
    float f[C::kSize];
    load_sum<T, kVec, kResidual>(xr, rr, off, f);
#pragma unroll
    for (int i = 0; i < C::kSize; ++i)
      out.v[i] = from_float<T>(((f[i] - shift) - mean_s) * rstd * to_float(w.v[i]) + to_float(b.v[i]));
    out.store(yr + off);
  }
}

template <typename T, bool kVec, bool kResidual>
void launch(const T* x, int64_t xs, const T* r, int64_t rs, const T* w, const T* b, T* y, T* h, int64_t rows, int n,
            float eps, cudaStream_t stream) {
  const int chunk = kVec ? Vec<T>::kSize : 1;
  const int nchunks = n / chunk;
  if (nchunks <= 256) {  // short rows: a warp per row, 4 rows per block
    dim3 block(32, 4);
    const int64_t grid = (rows + 3) / 4;
    layer_norm_kernel<T, kVec, kResidual>
        <<<static_cast<unsigned>(grid), block, 0, stream>>>(x, xs, r, rs, w, b, y, h, rows, n, eps);
  } else {  // long rows: a block per row (rows <= 2^31 - 1 = gridDim.x's limit, checked by the caller)
    int threads = ((nchunks / 2 + 31) / 32) * 32;
    threads = threads < 64 ? 64 : (threads > 1024 ? 1024 : threads);
    layer_norm_kernel<T, kVec, kResidual>
        <<<static_cast<unsigned>(rows), dim3(threads, 1), 0, stream>>>(x, xs, r, rs, w, b, y, h, rows, n, eps);
  }
}

}  // namespace

int layer_norm(const LayerNormParams& p) {
  if (!launch_fields_set(p.dtype, p.device) || p.x == nullptr || p.weight == nullptr || p.bias == nullptr ||
      p.y == nullptr || !positive_finite(p.eps))
    return cudaErrorInvalidValue;
  // gridDim.x <= 2^31 - 1: ceil(rows / 4) blocks for short rows, one block per row for long ones
  // (which have n > 256).
  const int64_t rows = p.rows, n = p.n;
  if (rows <= 0 || n <= 0 || n > (int64_t{1} << 30) || rows > 0x7fffffffLL * 4) return cudaErrorInvalidValue;
  if (n > 256 && rows > 0x7fffffffLL) return cudaErrorInvalidValue;
  if ((p.residual == nullptr) != (p.h == nullptr)) return cudaErrorInvalidValue;
  DeviceGuard guard(p.device);  // restores the caller's device on return
  G2F_RETURN_IF_ERROR(guard.status());
  auto s = static_cast<cudaStream_t>(p.stream);
  const int64_t xs = p.x_row_stride, rs = p.residual_row_stride;
  G2F_DISPATCH_DTYPE(p.dtype, T, {
    const int vec = Vec<T>::kSize;
    const bool can_vec = n % vec == 0 && xs % vec == 0 && aligned16(p.x) && aligned16(p.weight) &&
                         aligned16(p.bias) && aligned16(p.y) &&
                         (p.residual == nullptr || (rs % vec == 0 && aligned16(p.residual) && aligned16(p.h)));
    auto xt = static_cast<const T*>(p.x);
    auto rt = static_cast<const T*>(p.residual);
    auto wt = static_cast<const T*>(p.weight);
    auto bt = static_cast<const T*>(p.bias);
    auto yt = static_cast<T*>(p.y);
    auto ht = static_cast<T*>(p.h);
    const int ni = static_cast<int>(n);
    const float eps = p.eps;
    if (p.residual != nullptr) {
      if (can_vec)
        launch<T, true, true>(xt, xs, rt, rs, wt, bt, yt, ht, rows, ni, eps, s);
      else
        launch<T, false, true>(xt, xs, rt, rs, wt, bt, yt, ht, rows, ni, eps, s);
    } else {
      if (can_vec)
        launch<T, true, false>(xt, xs, rt, 0, wt, bt, yt, ht, rows, ni, eps, s);
      else
        launch<T, false, false>(xt, xs, rt, 0, wt, bt, yt, ht, rows, ni, eps, s);
    }
  });
  return launch_status();
}

}  // namespace g2f
