// Flash-decoding: one query token per (batch, head) against a KV cache.
//
// decode_split_kernel: grid (num_splits, H, B).  Split s covers cache positions
// [s*chunk, (s+1)*chunk) clipped to the sequence's length; a block of 128 threads walks them in
// groups of G = D/W threads per key (W elements = 16 bytes per thread), with an online softmax
// per group, then merges its groups in shared memory.  It writes a partial output and its
// log2-sum-exp, or, when there is a single split, the final output directly.  With several splits,
// the last block of a (batch, head) to finish (one arrival counter each: a fence, then one atomicAdd)
// merges the splits' partials in split order and resets the counter: one launch does everything, and
// the result does not depend on which block arrived last.
// The split owning position cache_seqlens[b] also appends k_new/v_new to the caches there and
// uses k_new/v_new for that position directly, so the append costs no extra launch.
//
// cache_seqlens is read on the device only (graph capturable); a sequence with no position to
// attend to outputs zeros.
#include <math_constants.h>

#include "common.cuh"

namespace g2f {
namespace {

constexpr int kThreads = 128;
constexpr int kUnroll = 4;  // keys per thread group per loop iteration

// `chunk`: cache positions per split; out is written when num_splits == 1, o_part and lse otherwise.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    decode_split_kernel(const DecodeAttentionParams p, const int chunk, const float scale_log2) {
  constexpr int W = Vec<T>::kSize;  // elements per thread per key
  constexpr int G = D / W;          // threads per key
  constexpr int NG = kThreads / G;  // keys in flight per block
  static_assert(D % W == 0 && G <= 32 && (G & (G - 1)) == 0, "unsupported head dim");

  __shared__ float sm_m[NG];
  __shared__ float sm_l[NG];
  __shared__ float sm_acc[NG][D];

  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, g = tid / G, lane_in_group = tid % G;
  const int64_t bh = static_cast<int64_t>(b) * p.heads + h;
  const int dim0 = lane_in_group * W;

  // Sequence length, clamped so that bad values (unchecked under graph capture) cannot go out of bounds.
  int seqlen = p.cache_seqlens[b];
  seqlen = seqlen < 0 ? 0 : (seqlen > p.t_max ? p.t_max : seqlen);
  const bool append = p.k_new != nullptr && seqlen < p.t_max;
  const int pos_new = append ? seqlen : -1;
  const int length = seqlen + (append ? 1 : 0);

  const int start = split * chunk;
  const int end = min(start + chunk, length);

  const T* kn = append ? typed<T>(p.k_new) + p.k_new_strides.at(b, h) : nullptr;
  const T* vn = append ? typed<T>(p.v_new) + p.v_new_strides.at(b, h) : nullptr;
  T* kc = typed<T>(p.k_cache) + p.k_cache_strides.at(b, h);
  T* vc = typed<T>(p.v_cache) + p.v_cache_strides.at(b, h);

  // The owning split writes the new key/value into the cache (nobody else touches that slot): one
  // 16-byte vector per thread of the first G (G <= 32 < kThreads, so one pass covers the row).
  if (append && pos_new >= start && pos_new < start + chunk && tid < G) {
    store_vec(kc + pos_new * p.k_cache_strides.time + tid * W, load_vec(kn + tid * W));
    store_vec(vc + pos_new * p.v_cache_strides.time + tid * W, load_vec(vn + tid * W));
  }

  float q[W];
  {
    const Vec<T> qv = load_vec(typed<T>(p.q) + p.q_strides.at(b, h) + dim0);
#pragma unroll
    for (int i = 0; i < W; ++i) q[i] = to_float(qv.v[i]) * scale_log2;
  }

  float m = -CUDART_INF_F, l = 0.f, acc[W];
#pragma unroll
  for (int i = 0; i < W; ++i) acc[i] = 0.f;

  // kUnroll keys per group per iteration: all their loads are issued before any math, to keep
  // enough bytes in flight.  The trip count is uniform over the block, so every lane reaches the
  // group shuffles.
  for (int t0 = start; t0 < end; t0 += NG * kUnroll) {
    Vec<T> kraw[kUnroll], vraw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = t0 + u * NG + g;
      if (t < end) {
        kraw[u] = load_vec((t == pos_new ? kn : kc + t * p.k_cache_strides.time) + dim0);
        vraw[u] = load_vec((t == pos_new ? vn : vc + t * p.v_cache_strides.time) + dim0);
      } else {
#pragma unroll
        for (int i = 0; i < W; ++i) kraw[u].v[i] = vraw[u].v[i] = from_float<T>(0.f);
      }
    }
    float s[kUnroll];
    float mx = m;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float d = 0.f;
#pragma unroll
      for (int i = 0; i < W; ++i) d = fmaf(q[i], to_float(kraw[u].v[i]), d);
      d = group_sum<G>(d);
      s[u] = t0 + u * NG + g < end ? d : -CUDART_INF_F;
      mx = fmaxf(mx, s[u]);
    }
    if (mx != -CUDART_INF_F) {  // this group has at least one key in this iteration (or before)
      const float corr = exp2f(m - mx);  // m = -inf before the first key: corr = 0
      l *= corr;
#pragma unroll
      for (int i = 0; i < W; ++i) acc[i] *= corr;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const float pr = exp2f(s[u] - mx);  // an invalid key has s = -inf: pr = 0
        l += pr;
#pragma unroll
        for (int i = 0; i < W; ++i) acc[i] = fmaf(pr, to_float(vraw[u].v[i]), acc[i]);
      }
      m = mx;
    }
  }

  // Merge the NG groups of this block.
  if (lane_in_group == 0) {
    sm_m[g] = m;
    sm_l[g] = l;
  }
#pragma unroll
  for (int i = 0; i < W; ++i) sm_acc[g][dim0 + i] = acc[i];
  __syncthreads();

  if (tid < D) {
    float mx = -CUDART_INF_F;
    for (int j = 0; j < NG; ++j) mx = fmaxf(mx, sm_m[j]);
    float sum_l = 0.f, o = 0.f;
    if (mx != -CUDART_INF_F) {
      for (int j = 0; j < NG; ++j) {
        const float w = exp2f(sm_m[j] - mx);  // an empty group has m = -inf: w = 0
        sum_l = fmaf(sm_l[j], w, sum_l);
        o = fmaf(sm_acc[j][tid], w, o);
      }
    }
    const float result = sum_l > 0.f ? o / sum_l : 0.f;
    if (p.num_splits == 1) {
      typed<T>(p.out)[bh * D + tid] = from_float<T>(result);
    } else {
      p.o_part[(bh * p.num_splits + split) * D + tid] = result;
      if (tid == 0) p.lse[bh * p.num_splits + split] = sum_l > 0.f ? mx + log2f(sum_l) : -CUDART_INF_F;
    }
  }
  if (p.num_splits == 1) return;

  // The last block of this (batch, head) to arrive merges the splits.  Every thread fences its partial
  // stores to device scope before the barrier; thread 0's atomic then orders them before the count.
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (tid == 0) last = atomicAdd(p.counters + bh, 1) == p.num_splits - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();  // acquire side: the other blocks' partials, read through L2 (__ldcg) below
  if (tid < D) {
    const float* l = p.lse + bh * p.num_splits;
    float m_all = -CUDART_INF_F;
    for (int s = 0; s < p.num_splits; ++s) m_all = fmaxf(m_all, __ldcg(l + s));
    float num = 0.f, den = 0.f;
    if (m_all != -CUDART_INF_F) {
      for (int s = 0; s < p.num_splits; ++s) {
        const float w = exp2f(__ldcg(l + s) - m_all);  // an empty split has lse = -inf: w = 0
        den += w;
        num = fmaf(w, __ldcg(p.o_part + (bh * p.num_splits + s) * D + tid), num);
      }
    }
    typed<T>(p.out)[bh * D + tid] = from_float<T>(den > 0.f ? num / den : 0.f);  // zeros when all are empty
  }
  if (tid == 0) p.counters[bh] = 0;  // zero again for the next launch (or graph replay)
}

// The split kernel takes the API struct itself (pointers viewed as T where used) and the derived values.
static_assert(std::is_trivially_copyable_v<DecodeAttentionParams>, "passed to the kernels by value");
template <typename T, int D>
void launch(const DecodeAttentionParams& p) {
  const auto stream = static_cast<cudaStream_t>(p.stream);
  const int chunk = ceil_div(p.t_max, p.num_splits);
  dim3 grid(p.num_splits, p.heads, p.batch);
  decode_split_kernel<T, D><<<grid, kThreads, 0, stream>>>(p, chunk, softmax_scale_log2(p.scale));
}

}  // namespace

int decode_attention(const DecodeAttentionParams& a) {
  if (!launch_fields_set(a.dtype, a.device) || a.q == nullptr || a.k_cache == nullptr || a.v_cache == nullptr ||
      a.cache_seqlens == nullptr || a.out == nullptr || !positive_finite(a.scale) || !supported_head_dim(a.head_dim))
    return cudaErrorInvalidValue;
  const int batch = a.batch, heads = a.heads, t_max = a.t_max, num_splits = a.num_splits;
  if (batch <= 0 || heads <= 0 || t_max <= 0 || num_splits <= 0 || heads > 65535 || batch > 65535)
    return cudaErrorInvalidValue;
  // B*H counters and partial rows are indexed in int64, the positions split*chunk + chunk in int.
  if (int64_t{batch} * heads > 0x7fffffffLL || t_max > (1 << 30) || num_splits > t_max) return cudaErrorInvalidValue;
  if (num_splits > 1 && (a.o_part == nullptr || a.lse == nullptr || a.counters == nullptr))
    return cudaErrorInvalidValue;
  if ((a.k_new == nullptr) != (a.v_new == nullptr)) return cudaErrorInvalidValue;
  DeviceGuard guard(a.device);  // restores the caller's device on return
  G2F_RETURN_IF_ERROR(guard.status());
  G2F_DISPATCH_DTYPE(a.dtype, T, G2F_DISPATCH_HEAD_DIM(a.head_dim, D, launch<T, D>(a)));
  return launch_status();
}

}  // namespace g2f
