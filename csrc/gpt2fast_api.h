// Host-side entry points of the gpt2fast CUDA kernels.  Plain C++ (no CUDA or PyTorch headers), so the
// pybind11 binding compiles with g++ alone.
//
// Each entry point takes one named parameter struct (exposed to Python field by field, see binding.cpp),
// so that no two arguments can be swapped unnoticed.  In every struct:
//   * pointers are device pointers; strides are in elements; sizes are element counts;
//   * `dtype` is G2F_F32 / G2F_F16 / G2F_BF16 (default -1: unset);
//   * `stream` is a cudaStream_t (null: the legacy default stream), `device` the CUDA device index the
//     tensors live on (default -1: unset).
// The defaults are "unset" values that the entry points reject: a required pointer left null, a size left
// 0, dtype or device left -1, eps or scale left 0 make the call return cudaErrorInvalidValue before any
// launch.  Strides default to 0 and are never rejected (0 is a valid stride for a broadcast dimension).
// Every entry point returns a cudaError_t as int (0 = success).
// The attention kernels take their struct itself, by value (kernels view the void pointers as their element
// type where they use them): the structs stay plain, trivially copyable data.
#pragma once

#include <cstdint>

#define G2F_F32 0
#define G2F_F16 1
#define G2F_BF16 2

#if defined(__CUDACC__)
#define G2F_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define G2F_HOST_DEVICE inline
#endif

namespace g2f {

// The CUDA runtime's message for an error code.
const char* error_string(int err);
// Number of CUDA devices the runtime sees (stored in *count); returns the error code.
int device_count(int* count);

// Element strides of one [B, H, (T,) D] operand whose D axis has unit stride; `time` is 0 for a
// [B, H, D] operand (one token per sequence).
struct Strides {
  int64_t batch = 0;
  int64_t head = 0;
  int64_t time = 0;
  // Offset of the (b, h) slice.
  G2F_HOST_DEVICE int64_t at(int b, int h) const { return b * batch + h * head; }
};

// y = LN(x [+ residual]) over `rows` rows of `n` elements; with a residual also h = x + residual.
// Required: x, weight, bias, y, rows > 0, n > 0, eps > 0.  residual and h are both set or both null.
// y and h are contiguous [rows, n]; x and residual rows are `*_row_stride` elements apart.
struct LayerNormParams {
  int dtype = -1;
  const void* x = nullptr;
  int64_t x_row_stride = 0;
  const void* residual = nullptr;
  int64_t residual_row_stride = 0;
  const void* weight = nullptr;  // contiguous [n]
  const void* bias = nullptr;    // contiguous [n]
  void* y = nullptr;
  void* h = nullptr;
  int64_t rows = 0;
  int64_t n = 0;
  float eps = 0.f;
  void* stream = nullptr;
  int device = -1;
};
int layer_norm(const LayerNormParams& p);

// y = gelu_tanh(x + bias) over `rows` rows of `n` elements; y is contiguous [rows, n].
// Required: x, bias, y, rows > 0, n > 0.
struct BiasGeluParams {
  int dtype = -1;
  const void* x = nullptr;
  int64_t x_row_stride = 0;
  const void* bias = nullptr;  // contiguous [n]
  void* y = nullptr;
  int64_t rows = 0;
  int64_t n = 0;
  void* stream = nullptr;
  int device = -1;
};
int bias_gelu(const BiasGeluParams& p);

// Causal / full attention over [B, H, T, D] tensors with unit stride in D.  Strides are
// (batch, head, time) for q, k, v; out is contiguous [B, H, T, D].
// Required: q, k, v, out, batch > 0, heads > 0, seqlen > 0, head_dim in (32, 64, 128), scale > 0.
struct AttentionParams {
  int dtype = -1;
  const void* q = nullptr;
  Strides q_strides;
  const void* k = nullptr;
  Strides k_strides;
  const void* v = nullptr;
  Strides v_strides;
  void* out = nullptr;
  int batch = 0;
  int heads = 0;
  int seqlen = 0;
  int head_dim = 0;
  bool causal = true;
  float scale = 0.f;  // softmax scale (e.g. 1/sqrt(D))
  void* stream = nullptr;
  int device = -1;
};
int attention(const AttentionParams& p);

// Split-KV decode attention with an optional in-place append of k_new/v_new at cache_seqlens[b].
// q/k_new/v_new strides are (batch, head) (time = 0); cache strides are (batch, head, time).  The append
// writes position cache_seqlens[b] of the caches; the split that owns that position reads k_new/v_new
// directly.  With num_splits == 1, o_part and lse may be null; otherwise they hold float
// [B, H, num_splits, D] and float [B, H, num_splits].  out is contiguous [B, H, D].
// Required: q, k_cache, v_cache, cache_seqlens, out, batch > 0, heads > 0, t_max > 0,
// head_dim in (32, 64, 128), 0 < num_splits <= t_max, scale > 0; k_new and v_new both set or both null.
struct DecodeAttentionParams {
  int dtype = -1;
  const void* q = nullptr;
  Strides q_strides;
  void* k_cache = nullptr;
  Strides k_cache_strides;
  void* v_cache = nullptr;
  Strides v_cache_strides;
  const int32_t* cache_seqlens = nullptr;  // contiguous int32 [B], read on the device only
  const void* k_new = nullptr;             // null: no append
  Strides k_new_strides;
  const void* v_new = nullptr;
  Strides v_new_strides;
  void* out = nullptr;
  float* o_part = nullptr;
  float* lse = nullptr;
  int batch = 0;
  int heads = 0;
  int t_max = 0;
  int head_dim = 0;
  int num_splits = 0;
  float scale = 0.f;
  void* stream = nullptr;
  int device = -1;
};
int decode_attention(const DecodeAttentionParams& p);

}  // namespace g2f
