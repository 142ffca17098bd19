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

// ---------------------------------------------------------------- parameter structs
// Each struct's fields are listed once, as X(type, name, default, doc) rows of a G2F_*_FIELDS(X) list:
// G2F_PARAMS declares them here (launch fields first), binding.cpp binds them to Python by name, in this
// order, with `doc` as the property's docstring.

// The fields every parameter struct has.
#define G2F_LAUNCH_FIELDS(X)                                                         \
  X(int, dtype, -1, "G2F_F32 / F16 / BF16 (_C.F32, _C.F16, _C.BF16); -1 = unset")    \
  X(void*, stream, nullptr, "cudaStream_t as an int (0: the legacy default stream)") \
  X(int, device, -1, "CUDA device index of the tensors; -1 = unset")

#define G2F_DECLARE_FIELD(type, name, init, doc) type name = init;
// struct NAME with the launch fields, then the fields of FIELDS.
#define G2F_PARAMS(NAME, FIELDS)         \
  struct NAME {                          \
    G2F_LAUNCH_FIELDS(G2F_DECLARE_FIELD) \
    FIELDS(G2F_DECLARE_FIELD)            \
  }

// y = LN(x [+ residual]) over `rows` rows of `n` elements; with a residual also h = x + residual.
// Required: x, weight, bias, y, rows > 0, n > 0, eps > 0.  residual and h are both set or both null.
// y and h are contiguous [rows, n]; x and residual rows are `*_row_stride` elements apart.
#define G2F_LAYER_NORM_FIELDS(X)                                                   \
  X(const void*, x, nullptr, "input rows [rows, n]")                               \
  X(int64_t, x_row_stride, 0, "elements between rows of x")                        \
  X(const void*, residual, nullptr, "added to x before the norm; 0 = none")        \
  X(int64_t, residual_row_stride, 0, "elements between rows of residual")          \
  X(const void*, weight, nullptr, "contiguous [n]")                                \
  X(const void*, bias, nullptr, "contiguous [n]")                                  \
  X(void*, y, nullptr, "output, contiguous [rows, n]")                             \
  X(void*, h, nullptr, "x + residual, contiguous [rows, n]; 0 without a residual") \
  X(int64_t, rows, 0, "number of rows (> 0)")                                      \
  X(int64_t, n, 0, "elements per row (> 0)")                                       \
  X(float, eps, 0.f, "variance epsilon (> 0)")
G2F_PARAMS(LayerNormParams, G2F_LAYER_NORM_FIELDS);
int layer_norm(const LayerNormParams& p);

// y = gelu_tanh(x + bias) over `rows` rows of `n` elements; y is contiguous [rows, n].
// Required: x, bias, y, rows > 0, n > 0.
#define G2F_BIAS_GELU_FIELDS(X)                             \
  X(const void*, x, nullptr, "input rows [rows, n]")        \
  X(int64_t, x_row_stride, 0, "elements between rows of x") \
  X(const void*, bias, nullptr, "contiguous [n]")           \
  X(void*, y, nullptr, "output, contiguous [rows, n]")      \
  X(int64_t, rows, 0, "number of rows (> 0)")               \
  X(int64_t, n, 0, "elements per row (> 0)")
G2F_PARAMS(BiasGeluParams, G2F_BIAS_GELU_FIELDS);
int bias_gelu(const BiasGeluParams& p);

// Backward of y = LN(h) over `rows` rows of `n` elements (h: the normalised input, x or x + residual):
// dh = rstd * (w*dy - mean(w*dy) - xhat * mean(w*dy*xhat)) (+ grad_h when set: the gradient reaching the
// residual stream), the statistics recomputed from h.  `programs` blocks each take every programs-th row and
// write their partial column sums of dy*xhat and dy to row blockIdx of `partial` (float [programs, 2n]); a second
// kernel adds them up, in a fixed order, into dweight and dbias.
// Required: grad_y, h, weight, dh, dweight, dbias, partial, rows > 0, 0 < n <= 4096, 0 < programs <= rows
// (and <= 2^31 - 1), eps > 0.  dh is contiguous [rows, n]; grad_y, h and grad_h rows are `*_row_stride` apart.
#define G2F_LAYER_NORM_BACKWARD_FIELDS(X)                                                 \
  X(const void*, grad_y, nullptr, "gradient of y [rows, n]")                              \
  X(int64_t, grad_y_row_stride, 0, "elements between rows of grad_y")                     \
  X(const void*, h, nullptr, "the normalised input [rows, n]")                            \
  X(int64_t, h_row_stride, 0, "elements between rows of h")                               \
  X(const void*, weight, nullptr, "contiguous [n]")                                       \
  X(const void*, grad_h, nullptr, "gradient of the h output, added to dh; 0 = none")      \
  X(int64_t, grad_h_row_stride, 0, "elements between rows of grad_h")                     \
  X(void*, dh, nullptr, "output, contiguous [rows, n]")                                   \
  X(void*, dweight, nullptr, "output, contiguous [n]")                                    \
  X(void*, dbias, nullptr, "output, contiguous [n]")                                      \
  X(float*, partial, nullptr, "workspace, float [programs, 2 n]")                         \
  X(int, programs, 0, "blocks of the row kernel, 1..rows")                                \
  X(int64_t, rows, 0, "number of rows (> 0)")                                             \
  X(int64_t, n, 0, "elements per row, 1..4096")                                           \
  X(float, eps, 0.f, "variance epsilon (> 0)")
G2F_PARAMS(LayerNormBackwardParams, G2F_LAYER_NORM_BACKWARD_FIELDS);
int layer_norm_backward(const LayerNormBackwardParams& p);

// Backward of y = gelu_tanh(x + bias) over `rows` rows of `n` elements: dx = dy * gelu_tanh'(x + bias) (contiguous
// [rows, n]); `programs` row groups each write their partial column sums of dx to row blockIdx.y of `partial`
// (float [programs, n]), added up in a fixed order into dbias.
// Required: grad_y, x, bias, dx, dbias, partial, rows > 0, n > 0, 0 < programs <= min(rows, 65535).
#define G2F_BIAS_GELU_BACKWARD_FIELDS(X)                                     \
  X(const void*, grad_y, nullptr, "gradient of y [rows, n]")                 \
  X(int64_t, grad_y_row_stride, 0, "elements between rows of grad_y")        \
  X(const void*, x, nullptr, "input rows [rows, n]")                         \
  X(int64_t, x_row_stride, 0, "elements between rows of x")                  \
  X(const void*, bias, nullptr, "contiguous [n]")                            \
  X(void*, dx, nullptr, "output, contiguous [rows, n]")                      \
  X(void*, dbias, nullptr, "output, contiguous [n]")                         \
  X(float*, partial, nullptr, "workspace, float [programs, n]")              \
  X(int, programs, 0, "row groups (grid y), 1..min(rows, 65535)")            \
  X(int64_t, rows, 0, "number of rows (> 0)")                                \
  X(int64_t, n, 0, "elements per row (> 0)")
G2F_PARAMS(BiasGeluBackwardParams, G2F_BIAS_GELU_BACKWARD_FIELDS);
int bias_gelu_backward(const BiasGeluBackwardParams& p);

// Causal / full attention over [B, H, T, D] tensors with unit stride in D.  Strides are
// (batch, head, time) for q, k, v; out is contiguous [B, H, T, D].  scale is the softmax scale
// (e.g. 1/sqrt(D)).
// Required: q, k, v, out, batch > 0, heads > 0, seqlen > 0, head_dim in (32, 64, 128), scale > 0.
#define G2F_ATTENTION_FIELDS(X)                                 \
  X(const void*, q, nullptr, "[B, H, T, D], unit stride in D")  \
  X(Strides, q_strides, {}, "(batch, head, time) strides of q") \
  X(const void*, k, nullptr, "[B, H, T, D], unit stride in D")  \
  X(Strides, k_strides, {}, "(batch, head, time) strides of k") \
  X(const void*, v, nullptr, "[B, H, T, D], unit stride in D")  \
  X(Strides, v_strides, {}, "(batch, head, time) strides of v") \
  X(void*, out, nullptr, "output, contiguous [B, H, T, D]")     \
  X(int, batch, 0, "B (> 0)")                                   \
  X(int, heads, 0, "H (> 0)")                                   \
  X(int, seqlen, 0, "T (> 0)")                                  \
  X(int, head_dim, 0, "D: 32, 64 or 128")                       \
  X(bool, causal, true, "mask keys after the query")            \
  X(float, scale, 0.f, "softmax scale (> 0)")
G2F_PARAMS(AttentionParams, G2F_ATTENTION_FIELDS);
int attention(const AttentionParams& p);

// Split-KV decode attention with an optional in-place append of k_new/v_new at cache_seqlens[b].
// q/k_new/v_new strides are (batch, head) (time = 0); cache strides are (batch, head, time).  The append
// writes position cache_seqlens[b] of the caches; the split that owns that position reads k_new/v_new
// directly.  With num_splits == 1, o_part, lse and counters may be null; otherwise they hold float
// [B, H, num_splits, D], float [B, H, num_splits] and the int32 [B*H] arrival counters (zero before the
// launch, zero again after it: the last split of each (batch, head) merges them and resets its counter).
// out is contiguous [B, H, D].  cache_seqlens is read on the device only.
// Required: q, k_cache, v_cache, cache_seqlens, out, batch > 0, heads > 0, t_max > 0,
// head_dim in (32, 64, 128), 0 < num_splits <= t_max, scale > 0; k_new and v_new both set or both null.
#define G2F_DECODE_ATTENTION_FIELDS(X)                                               \
  X(const void*, q, nullptr, "[B, H, D], unit stride in D")                          \
  X(Strides, q_strides, {}, "(batch, head) strides of q; time = 0")                  \
  X(void*, k_cache, nullptr, "[B, H, T_max, D], written at the append slot")         \
  X(Strides, k_cache_strides, {}, "(batch, head, time) strides")                     \
  X(void*, v_cache, nullptr, "[B, H, T_max, D], written at the append slot")         \
  X(Strides, v_cache_strides, {}, "(batch, head, time) strides")                     \
  X(const int32_t*, cache_seqlens, nullptr, "contiguous int32 [B]")                  \
  X(const void*, k_new, nullptr, "[B, H, D] appended at cache_seqlens[b]; 0 = none") \
  X(Strides, k_new_strides, {}, "(batch, head) strides of k_new")                    \
  X(const void*, v_new, nullptr, "[B, H, D]; set exactly when k_new is")             \
  X(Strides, v_new_strides, {}, "(batch, head) strides of v_new")                    \
  X(void*, out, nullptr, "output, contiguous [B, H, D]")                             \
  X(float*, o_part, nullptr, "float [B, H, splits, D]; 0 when num_splits == 1")      \
  X(float*, lse, nullptr, "float [B, H, splits]; 0 when num_splits == 1")            \
  X(int32_t*, counters, nullptr, "int32 [B*H], zero between launches; 0 if 1 split") \
  X(int, batch, 0, "B (> 0)")                                                        \
  X(int, heads, 0, "H (> 0)")                                                        \
  X(int, t_max, 0, "cache positions T_max (> 0)")                                    \
  X(int, head_dim, 0, "D: 32, 64 or 128")                                            \
  X(int, num_splits, 0, "KV splits, 1..T_max")                                       \
  X(float, scale, 0.f, "softmax scale (> 0)")
G2F_PARAMS(DecodeAttentionParams, G2F_DECODE_ATTENTION_FIELDS);
int decode_attention(const DecodeAttentionParams& p);

#undef G2F_PARAMS
#undef G2F_DECLARE_FIELD

}  // namespace g2f
