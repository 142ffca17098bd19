// Prefill attention over [B, H, T, D] (D = 32, 64, 128), causal or full.
//
// fp16/bf16: FlashAttention-2 style.  A block of 4 warps owns BM = 64 query rows (16 per warp);
// it walks key tiles of BN keys, computing S = Q·Kᵀ and O += P·V with mma.sync.m16n8k16
// (fp32 accumulation) and an online softmax kept in registers.  P never leaves registers: the
// S accumulator layout of two adjacent n8 tiles is exactly the A-operand layout of one k16 step.
// The B operand of S = Q·Kᵀ is read with 32-bit shared loads from the row-major K tile; the B
// operand of P·V with ldmatrix.trans from the row-major V tile (row pitches padded by 16 bytes, so
// neither conflicts on banks).
// Causal: key tiles entirely above the diagonal are skipped; masking runs only on the tiles that
// cross the diagonal or the end of the sequence.  Query blocks run heaviest-first.
//
// fp32: a CUDA-core path (no fp32 tensor-core mma): a warp per 2 query rows, 32-key tiles in
// shared memory, lane j scores key j.
#include <math_constants.h>

#include "common.cuh"

namespace g2f {
namespace {

// ------------------------------------------------------------------ tensor-core helpers
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// d += a·b for one m16n8k16 tile (row-major A, column-major B, fp32 accumulators).
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <typename T>
__device__ __forceinline__ uint32_t lds32(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// Four 8x8 b16 matrices from shared memory, transposed: lane l supplies the (16-byte aligned)
// address of row l % 8 of matrix l / 8 and receives, in r[m], elements (2*(l%4), l/4) and
// (2*(l%4)+1, l/4) of matrix m as stored.  For a row-major [key][d] V tile this yields the
// column-major B operand of two adjacent n8 tiles: r[0], r[1] for d0.., r[2], r[3] for d0+8...
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// A tile of R rows x D columns of a [T, D] slice, staged in registers: each of the kThreadsN
// threads holds kN 16-byte vectors.  load() reads global memory (rows >= seqlen are zeros);
// store() writes shared memory, row-major with a pitch of P elements.
// Splitting the two lets the next tile's loads be in flight while the current tile is computed.
template <typename T, int R, int D, int kThreadsN>
struct TileRegs {
  static constexpr int W = Vec<T>::kSize;
  static constexpr int kPerRow = D / W;
  static constexpr int kN = (R * kPerRow + kThreadsN - 1) / kThreadsN;
  Vec<T> v[kN];

  __device__ __forceinline__ void load(const T* g, int64_t st, int row0, int seqlen) {
#pragma unroll
    for (int it = 0; it < kN; ++it) {
      const int i = threadIdx.x + it * kThreadsN;
      const int r = i / kPerRow, c = (i % kPerRow) * W;
      if (i < R * kPerRow && row0 + r < seqlen) {
        v[it] = load_vec(g + static_cast<int64_t>(row0 + r) * st + c);
      } else {
#pragma unroll
        for (int e = 0; e < W; ++e) v[it].v[e] = from_float<T>(0.f);
      }
    }
  }

  template <int P>
  __device__ __forceinline__ void store(T* smem) const {
#pragma unroll
    for (int it = 0; it < kN; ++it) {
      const int i = threadIdx.x + it * kThreadsN;
      if (i < R * kPerRow) store_vec(smem + (i / kPerRow) * P + (i % kPerRow) * W, v[it]);
    }
  }
};

// ------------------------------------------------------------------ fp16 / bf16 kernel
constexpr int kBM = 64;
constexpr int kWarps = 4;
constexpr int kMmaThreads = kWarps * 32;

template <int D>
struct MmaTile {
  static constexpr int BN = D == 128 ? 32 : 64;  // keeps smem static and under 48 KB
  static constexpr int kPad = 8;                 // 16 bytes: keeps rows 16-byte aligned, shifts banks
  static constexpr int QP = D + kPad;            // pitch of sQ / sK / sV rows
};

// s *= scale_log2 over this thread's S accumulators of one key tile.  With kMask, also -inf where the
// key (key0 + j * 8 + (e & 1)) is past the end of the sequence or, when causal, after the query row
// (row0 + (e >> 1) * 8).  A template rather than a runtime flag, so that the tiles without masking run
// none of its tests whatever the compiler's if-conversion heuristics decide.
template <bool kMask, int NS>
__device__ __forceinline__ void scale_tile(float (&s)[NS][4], float scale_log2, int key0, int row0, int seqlen,
                                           bool causal) {
#pragma unroll
  for (int j = 0; j < NS; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float x = s[j][e] * scale_log2;
      if constexpr (kMask) {
        const int key = key0 + j * 8 + (e & 1);
        const int row = row0 + (e >> 1) * 8;
        if (key >= seqlen || (causal && key > row)) x = -CUDART_INF_F;
      }
      s[j][e] = x;
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kMmaThreads) attention_mma_kernel(const AttentionParams p, const float scale_log2) {
  using Tile = MmaTile<D>;
  constexpr int BN = Tile::BN, QP = Tile::QP;
  constexpr int KD = D / 16;   // k16 steps over the head dim
  constexpr int NS = BN / 8;   // n8 tiles of S
  constexpr int KS = BN / 16;  // k16 steps over the keys
  constexpr int ND = D / 8;    // n8 tiles of O
  __shared__ alignas(16) T sQ[kBM * QP];
  __shared__ alignas(16) T sK[BN * QP];
  __shared__ alignas(16) T sV[BN * QP];

  const int m_block = gridDim.x - 1 - blockIdx.x;  // heaviest (causal) blocks first
  const int h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gid = lane >> 2, tq = lane & 3;
  const int T_ = p.seqlen;
  const int q_start = m_block * kBM;

  const T* qg = typed<T>(p.q) + p.q_strides.at(b, h);
  const T* kg = typed<T>(p.k) + p.k_strides.at(b, h);
  const T* vg = typed<T>(p.v) + p.v_strides.at(b, h);

  {
    TileRegs<T, kBM, D, kMmaThreads> qr;
    qr.load(qg, p.q_strides.time, q_start, T_);
    qr.template store<QP>(sQ);
  }
  __syncthreads();
  uint32_t qa[KD][4];
  {
    const T* base = sQ + (warp * 16) * QP;
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
      qa[kk][0] = lds32(base + gid * QP + kk * 16 + tq * 2);
      qa[kk][1] = lds32(base + (gid + 8) * QP + kk * 16 + tq * 2);
      qa[kk][2] = lds32(base + gid * QP + kk * 16 + tq * 2 + 8);
      qa[kk][3] = lds32(base + (gid + 8) * QP + kk * 16 + tq * 2 + 8);
    }
  }

  const int row0 = q_start + warp * 16 + gid;  // this thread's rows: row0 and row0 + 8
  float m_i[2] = {-CUDART_INF_F, -CUDART_INF_F};
  float l_i[2] = {0.f, 0.f};
  float acc[ND][4];
#pragma unroll
  for (int j = 0; j < ND; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;

  const int n_end = p.causal ? min(T_, q_start + kBM) : T_;
  TileRegs<T, BN, D, kMmaThreads> kr, vr;
  kr.load(kg, p.k_strides.time, 0, T_);
  vr.load(vg, p.v_strides.time, 0, T_);
  for (int n_start = 0; n_start < n_end; n_start += BN) {
    __syncthreads();  // the previous tile's sK/sV are no longer read
    kr.template store<QP>(sK);
    vr.template store<QP>(sV);
    __syncthreads();
    if (n_start + BN < n_end) {  // prefetch the next tile; the loads overlap the math below
      kr.load(kg, p.k_strides.time, n_start + BN, T_);
      vr.load(vg, p.v_strides.time, n_start + BN, T_);
    }

    float s[NS][4];
#pragma unroll
    for (int j = 0; j < NS; ++j) {
      s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
      const T* kb = sK + (j * 8 + gid) * QP + tq * 2;
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) mma16816<T>(s[j], qa[kk], lds32(kb + kk * 16), lds32(kb + kk * 16 + 8));
    }

    // Into the log2 domain; only the tiles that cross the diagonal or the end of the sequence are masked.
    if (n_start + BN > T_ || (p.causal && n_start + BN - 1 > q_start))
      scale_tile<true>(s, scale_log2, n_start + tq * 2, row0, T_, p.causal);
    else
      scale_tile<false>(s, scale_log2, n_start + tq * 2, row0, T_, p.causal);

    // Online softmax, one row at a time (r = 0: accumulator slots 0,1; r = 1: slots 2,3).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -CUDART_INF_F;
#pragma unroll
      for (int j = 0; j < NS; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
      mx = group_max<4>(mx);  // the 4 threads of a quad share the row
      const float m_new = fmaxf(m_i[r], mx);
      const float m_use = m_new == -CUDART_INF_F ? 0.f : m_new;
      const float corr = exp2f(m_i[r] - m_use);
      float rs = 0.f;
#pragma unroll
      for (int j = 0; j < NS; ++j) {
        s[j][2 * r] = exp2f(s[j][2 * r] - m_use);
        s[j][2 * r + 1] = exp2f(s[j][2 * r + 1] - m_use);
        rs += s[j][2 * r] + s[j][2 * r + 1];
      }
      l_i[r] = l_i[r] * corr + rs;  // per-thread partial; the quad is summed at the end
      m_i[r] = m_new;
#pragma unroll
      for (int j = 0; j < ND; ++j) {
        acc[j][2 * r] *= corr;
        acc[j][2 * r + 1] *= corr;
      }
    }

    // O += P·V, P straight from the S accumulators.
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      uint32_t pa[4];
      pa[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      pa[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int j = 0; j < ND; j += 2) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, sV + (kk * 16 + (lane & 15)) * QP + j * 8 + (lane >> 4) * 8);
        mma16816<T>(acc[j], pa, vb[0], vb[1]);
        mma16816<T>(acc[j + 1], pa, vb[2], vb[3]);
      }
    }
  }

  T* og = typed<T>(p.out) + ((static_cast<int64_t>(b) * p.heads + h) * T_) * D;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_i[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int row = row0 + r * 8;
    if (row < T_) {
#pragma unroll
      for (int j = 0; j < ND; ++j) {
        T* dst = og + static_cast<int64_t>(row) * D + j * 8 + tq * 2;
        *reinterpret_cast<uint32_t*>(dst) = pack2<T>(acc[j][2 * r] * inv, acc[j][2 * r + 1] * inv);
      }
    }
  }
}

// ------------------------------------------------------------------ fp32 kernel (CUDA cores)
constexpr int kF32Warps = 8;
constexpr int kF32RowsPerWarp = 2;
constexpr int kF32BQ = kF32Warps * kF32RowsPerWarp;
constexpr int kF32BK = 32;

template <int D>
__global__ void __launch_bounds__(kF32Warps * 32)
    attention_f32_kernel(const AttentionParams p, const float scale_log2) {
  constexpr int DPL = D / 32;  // output dims per lane
  constexpr int kThreadsN = kF32Warps * 32;
  __shared__ float sQ[kF32BQ][D];
  __shared__ float sK[kF32BK][D + 1];  // +1: lane j reads row j without bank conflicts
  __shared__ float sV[kF32BK][D];

  const int q_block = gridDim.x - 1 - blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int T_ = p.seqlen;
  const int q_start = q_block * kF32BQ;
  const float* qg = typed<float>(p.q) + p.q_strides.at(b, h);
  const float* kg = typed<float>(p.k) + p.k_strides.at(b, h);
  const float* vg = typed<float>(p.v) + p.v_strides.at(b, h);

  for (int i = threadIdx.x; i < kF32BQ * D; i += kThreadsN) {
    const int r = i / D, c = i % D;
    sQ[r][c] = q_start + r < T_ ? qg[static_cast<int64_t>(q_start + r) * p.q_strides.time + c] * scale_log2 : 0.f;
  }

  float m_i[kF32RowsPerWarp], l_i[kF32RowsPerWarp], acc[kF32RowsPerWarp][DPL];
#pragma unroll
  for (int r = 0; r < kF32RowsPerWarp; ++r) {
    m_i[r] = -CUDART_INF_F;
    l_i[r] = 0.f;
#pragma unroll
    for (int i = 0; i < DPL; ++i) acc[r][i] = 0.f;
  }

  const int n_end = p.causal ? min(T_, q_start + kF32BQ) : T_;
  for (int n_start = 0; n_start < n_end; n_start += kF32BK) {
    __syncthreads();  // sQ written (first tile) / previous sK, sV no longer read
    for (int i = threadIdx.x; i < kF32BK * D; i += kThreadsN) {
      const int r = i / D, c = i % D;
      const bool in = n_start + r < T_;
      sK[r][c] = in ? kg[static_cast<int64_t>(n_start + r) * p.k_strides.time + c] : 0.f;
      sV[r][c] = in ? vg[static_cast<int64_t>(n_start + r) * p.v_strides.time + c] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kF32RowsPerWarp; ++r) {
      const int lr = warp * kF32RowsPerWarp + r;
      const int row = q_start + lr;
      const int key = n_start + lane;
      float s = 0.f;
#pragma unroll 8
      for (int d = 0; d < D; ++d) s = fmaf(sQ[lr][d], sK[lane][d], s);
      if (key >= T_ || (p.causal && key > row)) s = -CUDART_INF_F;
      const float m_new = fmaxf(m_i[r], warp_max(s));
      const float m_use = m_new == -CUDART_INF_F ? 0.f : m_new;
      const float pr = exp2f(s - m_use);
      const float corr = exp2f(m_i[r] - m_use);
      l_i[r] = l_i[r] * corr + warp_sum(pr);
      m_i[r] = m_new;
#pragma unroll
      for (int i = 0; i < DPL; ++i) acc[r][i] *= corr;
#pragma unroll 4
      for (int j = 0; j < kF32BK; ++j) {
        const float pj = __shfl_sync(0xffffffffu, pr, j);
#pragma unroll
        for (int i = 0; i < DPL; ++i) acc[r][i] = fmaf(pj, sV[j][lane + 32 * i], acc[r][i]);
      }
    }
  }

  float* og = typed<float>(p.out) + ((static_cast<int64_t>(b) * p.heads + h) * T_) * D;
#pragma unroll
  for (int r = 0; r < kF32RowsPerWarp; ++r) {
    const int row = q_start + warp * kF32RowsPerWarp + r;
    const float inv = l_i[r] > 0.f ? 1.f / l_i[r] : 0.f;
    if (row < T_) {
#pragma unroll
      for (int i = 0; i < DPL; ++i) og[static_cast<int64_t>(row) * D + lane + 32 * i] = acc[r][i] * inv;
    }
  }
}

// ------------------------------------------------------------------ launch
// The kernels take the API struct itself (pointers viewed as T where used) and the one derived value.
static_assert(std::is_trivially_copyable_v<AttentionParams>, "passed to the kernels by value");
template <typename T, int D>
void launch(const AttentionParams& p) {
  const auto stream = static_cast<cudaStream_t>(p.stream);
  const float scale_log2 = softmax_scale_log2(p.scale);
  if constexpr (std::is_same_v<T, float>) {
    dim3 grid(ceil_div(p.seqlen, kF32BQ), p.heads, p.batch);
    attention_f32_kernel<D><<<grid, kF32Warps * 32, 0, stream>>>(p, scale_log2);
  } else {
    dim3 grid(ceil_div(p.seqlen, kBM), p.heads, p.batch);
    attention_mma_kernel<T, D><<<grid, kMmaThreads, 0, stream>>>(p, scale_log2);
  }
}

}  // namespace

int attention(const AttentionParams& a) {
  if (!launch_fields_set(a.dtype, a.device) || a.q == nullptr || a.k == nullptr || a.v == nullptr ||
      a.out == nullptr || !positive_finite(a.scale) || !supported_head_dim(a.head_dim))
    return cudaErrorInvalidValue;
  // seqlen <= 2^30: q_start + tile and n_start + tile stay within int.
  if (a.batch <= 0 || a.heads <= 0 || a.seqlen <= 0 || a.seqlen > (1 << 30) || a.batch > 65535 || a.heads > 65535)
    return cudaErrorInvalidValue;
  DeviceGuard guard(a.device);  // restores the caller's device on return
  G2F_RETURN_IF_ERROR(guard.status());
  G2F_DISPATCH_DTYPE(a.dtype, T, G2F_DISPATCH_HEAD_DIM(a.head_dim, D, launch<T, D>(a)));
  return launch_status();
}

}  // namespace g2f
