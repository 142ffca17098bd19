// Host-side entry points of the gpt2fast CUDA kernels.  Plain C++ (no CUDA headers), so the
// pybind11 binding compiles with g++ alone.  Pointers are device pointers; strides are in
// elements; `stream` is a cudaStream_t; `device` is the CUDA device index the tensors live on.
// Every function returns a cudaError_t as int (0 = success).
#pragma once

#include <cstdint>

#define G2F_F32 0
#define G2F_F16 1
#define G2F_BF16 2

namespace g2f {

// The CUDA runtime's message for an error code.
const char* error_string(int err);
// Number of CUDA devices the runtime sees (stored in *count); returns the error code.
int device_count(int* count);

// y = LN(x [+ residual]) over rows of n elements; with a residual also h = x + residual.
// residual/h are null when there is no residual; y and h are contiguous [rows, n].
int layer_norm(int dtype, const void* x, int64_t x_stride, const void* residual, int64_t res_stride,
               const void* weight, const void* bias, void* y, void* h, int64_t rows, int64_t n, float eps,
               void* stream, int device);

// y = gelu_tanh(x + bias); y is contiguous [rows, n].
int bias_gelu(int dtype, const void* x, int64_t x_stride, const void* bias, void* y, int64_t rows, int64_t n,
              void* stream, int device);

// Causal / full attention over [B, H, T, D] tensors with unit stride in D.  Strides are
// (batch, head, time) for q, k, v; out is contiguous [B, H, T, D].
int attention(int dtype, const void* q, const void* k, const void* v, void* out, int batch, int heads, int seqlen,
              int head_dim, const int64_t* q_strides, const int64_t* k_strides, const int64_t* v_strides, bool causal,
              float scale, void* stream, int device);

// Split-KV decode attention with an optional in-place append of k_new/v_new at cache_seqlens[b].
// q/k_new/v_new strides are (batch, head); cache strides are (batch, head, time).  The append writes
// position cache_seqlens[b] of the caches; the split that owns that position reads k_new/v_new directly.
// With num_splits == 1, o_part and lse may be null; otherwise they hold float [B, H, num_splits, D]
// and float [B, H, num_splits].  out is contiguous [B, H, D].
int decode_attention(int dtype, const void* q, const int64_t* q_strides, void* k_cache, void* v_cache,
                     const int64_t* kc_strides, const int64_t* vc_strides, const int32_t* cache_seqlens,
                     const void* k_new, const void* v_new, const int64_t* knew_strides,
                     const int64_t* vnew_strides, void* out, float* o_part,
                     float* lse, int batch, int heads, int t_max, int head_dim, int num_splits, float scale,
                     void* stream, int device);

}  // namespace g2f
