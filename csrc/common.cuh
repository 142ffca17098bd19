// Helpers shared by every gpt2fast CUDA kernel: dtype conversion, 128-bit vector
// types, warp/block reductions, dtype dispatch and error checking.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>
#include <type_traits>

#include "gpt2fast_api.h"

namespace g2f {

// ---------------------------------------------------------------- conversion
// to_float<T>: T -> float (exact); from_float<T>: float -> T, rounded to nearest even.
template <typename T>
__device__ __forceinline__ float to_float(T v);
template <typename T>
__device__ __forceinline__ T from_float(float v);

// One row per element type: the type, its T -> float and its float -> T conversion.
#define G2F_CONVERSIONS(T, TO_FLOAT, FROM_FLOAT)                                     \
  template <>                                                                        \
  __device__ __forceinline__ float to_float<T>(T v) { return TO_FLOAT(v); }          \
  template <>                                                                        \
  __device__ __forceinline__ T from_float<T>(float v) { return FROM_FLOAT(v); }
G2F_CONVERSIONS(float, float, float)  // float(v): the identity
G2F_CONVERSIONS(__half, __half2float, __float2half_rn)
G2F_CONVERSIONS(__nv_bfloat16, __bfloat162float, __float2bfloat16_rn)
#undef G2F_CONVERSIONS

// ---------------------------------------------------------------- the API structs in kernels
// Kernels take their entry point's parameter struct (gpt2fast_api.h) by value and view its untyped
// pointers as their element type where they use them: typed<T>(p.q) is a const T*, typed<T>(p.out) a T*.
template <typename T>
G2F_HOST_DEVICE const T* typed(const void* p) {
  return static_cast<const T*>(p);
}
template <typename T>
G2F_HOST_DEVICE T* typed(void* p) {
  return static_cast<T*>(p);
}

// The attention kernels' softmax runs in base 2: exp2f(s * softmax_scale_log2(scale)) = e^(s * scale).
constexpr float kLog2e = 1.4426950408889634f;
inline float softmax_scale_log2(float scale) { return scale * kLog2e; }

// ---------------------------------------------------------------- 128-bit vectors
// Vec<T> is 16 bytes of T: 4 floats or 8 halves; loads/stores compile to one LDG/STG.128.
template <typename T>
struct alignas(16) Vec {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <typename T>
__device__ __forceinline__ Vec<T> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T>*>(p);
}
template <typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T>& v) {
  *reinterpret_cast<Vec<T>*>(p) = v;
}

// Host/device: is a pointer 16-byte aligned?
__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// ---------------------------------------------------------------- reductions
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Reduce within aligned groups of kWidth lanes: lanes [k*kWidth, (k+1)*kWidth) reduce together.
// kWidth must be a power of two <= 32 and every lane of the warp must call it.
template <int kWidth>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int o = kWidth / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <int kWidth>
__device__ __forceinline__ float group_max(float v) {
#pragma unroll
  for (int o = kWidth / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum of `v` over a 1-D block (blockDim.x a multiple of 32, <= 1024); every thread gets
// the total.  Every thread of the block must call it (it contains __syncthreads).
// `scratch` holds 32 floats of shared memory, reusable after the call returns.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : 0.f;
  return warp_sum(v);
}

// ---------------------------------------------------------------- GELU (tanh approximation)
constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)

// GPT-2's gelu_new: 0.5 v (1 + tanh(sqrt(2/pi) (v + 0.044715 v^3))).
__device__ __forceinline__ float gelu_tanh(float v) {
  return 0.5f * v * (1.f + tanhf(kGeluC * (v + 0.044715f * v * v * v)));
}

// Its derivative.  Where tanh saturates (1 - t^2 == 0, |v| >~ 10) the slope is exactly 1 or 0 and the second term is
// skipped, so v^2 overflowing to inf never makes 0 * inf = NaN.
__device__ __forceinline__ float gelu_tanh_grad(float v) {
  const float t = tanhf(kGeluC * (v + 0.044715f * v * v * v));
  const float sech2 = 1.f - t * t;
  const float inner = sech2 > 0.f ? 0.5f * v * sech2 * kGeluC * (1.f + 0.134145f * v * v) : 0.f;
  return 0.5f * (1.f + t) + inner;
}

// ---------------------------------------------------------------- backward partial sums
// out[c] = sum over g < programs of partial[g * stride + c] (c < m), in a fixed order: the second stage of the
// backward kernels that reduce over rows (one row of partial sums per block; no atomics, so run-to-run identical).
template <typename T>
__global__ void column_sum_kernel(const float* __restrict__ partial, int64_t stride, int programs, int64_t m,
                                  T* __restrict__ out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= m) return;
  float acc = 0.f;
  for (int g = 0; g < programs; ++g) acc += partial[g * stride + c];
  out[c] = from_float<T>(acc);
}

template <typename T>
void launch_column_sum(const float* partial, int64_t stride, int programs, int64_t m, T* out, cudaStream_t s) {
  constexpr int kThreads = 256;
  column_sum_kernel<T><<<static_cast<unsigned>((m + kThreads - 1) / kThreads), kThreads, 0, s>>>(
      partial, stride, programs, m, out);
}

// ---------------------------------------------------------------- host side
inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// The fields every parameter struct shares were set: a known dtype code and a device index.
inline bool launch_fields_set(int dtype, int device) { return dtype >= G2F_F32 && dtype <= G2F_BF16 && device >= 0; }

// A positive, finite float: rejects 0 (a parameter left unset), negatives, NaN and inf.
inline bool positive_finite(float v) { return v > 0.f && v <= FLT_MAX; }

// A head dim the attention kernels are instantiated for (G2F_DISPATCH_HEAD_DIM's cases).
inline bool supported_head_dim(int d) { return d == 32 || d == 64 || d == 128; }

// Makes `device` current for one entry point's launches and restores the caller's device on
// destruction: this (statically linked) runtime shares the thread's current context with
// PyTorch's runtime, so a bare cudaSetDevice would change torch.cuda.current_device() behind
// PyTorch's back.  It first drops a stale non-sticky error of this runtime (already reported by an
// earlier call, or left by a failed restore), so that launch_status() reports this call's own
// launches; sticky errors (a faulted context) resurface at the launch anyway.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    (void)cudaGetLastError();
    status_ = cudaGetDevice(&prev_);
    if (status_ == cudaSuccess && prev_ != device) {
      status_ = cudaSetDevice(device);
      restore_ = status_ == cudaSuccess;
    }
  }
  ~DeviceGuard() {
    if (restore_) (void)cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  // cudaSuccess (as int) when `device` is current.
  int status() const { return static_cast<int>(status_); }

 private:
  int prev_ = -1;
  bool restore_ = false;
  cudaError_t status_ = cudaSuccess;
};

// The launch status of the kernel(s) just enqueued.
inline int launch_status() { return static_cast<int>(cudaGetLastError()); }

}  // namespace g2f

#define G2F_RETURN_IF_ERROR(expr)      \
  do {                                 \
    int g2f_err_ = (expr);             \
    if (g2f_err_ != 0) return g2f_err_; \
  } while (0)

// Run `__VA_ARGS__` with `T` bound to the C++ type of dtype code `code` (G2F_F32/F16/BF16);
// an unknown code returns cudaErrorInvalidValue.
#define G2F_DISPATCH_DTYPE(code, T, ...)                                   \
  switch (code) {                                                          \
    case G2F_F32: {                                                        \
      using T = float;                                                     \
      __VA_ARGS__;                                                         \
    } break;                                                               \
    case G2F_F16: {                                                        \
      using T = __half;                                                    \
      __VA_ARGS__;                                                         \
    } break;                                                               \
    case G2F_BF16: {                                                       \
      using T = __nv_bfloat16;                                             \
      __VA_ARGS__;                                                         \
    } break;                                                               \
    default:                                                               \
      return static_cast<int>(cudaErrorInvalidValue);                      \
  }

// Run `__VA_ARGS__` with `constexpr int D` bound to head dim `d` (32, 64 or 128); any other
// value returns cudaErrorInvalidValue.
#define G2F_DISPATCH_HEAD_DIM(d, D, ...)               \
  switch (d) {                                         \
    case 32: {                                         \
      constexpr int D = 32;                            \
      __VA_ARGS__;                                     \
    } break;                                           \
    case 64: {                                         \
      constexpr int D = 64;                            \
      __VA_ARGS__;                                     \
    } break;                                           \
    case 128: {                                        \
      constexpr int D = 128;                           \
      __VA_ARGS__;                                     \
    } break;                                           \
    default:                                           \
      return static_cast<int>(cudaErrorInvalidValue);  \
  }
