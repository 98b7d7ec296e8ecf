// Paged attention for rows of one query token each: decode, and the exact fallback for prefill.
//
// One CTA per (launch row, kv head, split). A launch row is a sequence in decode mode (the
// sequence's single query token; sequences with any other query length are left to the prefill
// kernel) or a flat query token in rows mode (any batch: the token's sequence is found by binary
// search, the causal limit applied, and padding rows past cu_seqlens_q[num_seqs] zeroed). It serves every query head of the GQA group at once,
// so each K/V page is read from memory once per kv head, not once per query head. The context is
// walked in tiles of kTile tokens with an fp32 online softmax in the log2 domain; when the host
// splits the context, each split writes a normalised partial output and its log-sum-exp, and
// omnibus_decode_merge combines them.
#include "common.cuh"

namespace omnibus {

constexpr int kDecodeThreads = 128;
constexpr int kDecodeWarps = kDecodeThreads / 32;
constexpr int kTile = 64;
constexpr int kRowsMode = 0;    // launch row = flat query token
constexpr int kDecodeMode = 1;  // launch row = sequence; only sequences with q_len == 1 do work

// Sequence owning flat query row `token`: the last s with cu_seqlens_q[s] <= token.
__device__ __forceinline__ int find_seq(const int* __restrict__ cu_seqlens_q, int num_seqs, int token) {
  int lo = 0, hi = num_seqs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (cu_seqlens_q[mid] <= token) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <typename T, int D, int BS, int GMAX>
__device__ __forceinline__ void decode_body(
    T* __restrict__ out, float* __restrict__ part_out, float* __restrict__ part_lse,
    const T* __restrict__ q, const T* __restrict__ k_cache, const T* __restrict__ v_cache,
    const int* __restrict__ block_tables, const int* __restrict__ seq_lens,
    const int* __restrict__ cu_seqlens_q, int num_seqs, int num_rows, int num_heads, int num_kv_heads,
    int max_blocks_per_seq, long long q_stride, int mode, float scale_log2, int partition_size) {
  constexpr int VEC = 8;               // elements per 16-byte load
  constexpr int TPR = D / VEC;         // threads sharing one K/V row
  constexpr int ROWS = kDecodeThreads / TPR;
  constexpr int PASSES = kTile / ROWS;  // K/V rows each thread loads per tile
  constexpr int NPAIR = GMAX * TPR;     // (head, 16-byte column) pairs of the output
  constexpr int PPT = NPAIR >= kDecodeThreads ? NPAIR / kDecodeThreads : 1;
  constexpr int JSUB = NPAIR >= kDecodeThreads ? 1 : kDecodeThreads / NPAIR;
  static_assert(D % 64 == 0 && TPR <= 32 && kTile % ROWS == 0, "unsupported head_dim");
  static_assert(kTile % BS == 0 && kTile == 64, "tile must hold whole pages; softmax assumes 64");
  static_assert(JSUB * NPAIR == kDecodeThreads || PPT * kDecodeThreads == NPAIR, "GMAX must be a power of 2");

  __shared__ __align__(16) float q_s[GMAX][D];
  __shared__ float p_s[GMAX][kTile];
  __shared__ __align__(16) uint4 v_s[kTile][TPR];
  __shared__ float m_s[GMAX], l_s[GMAX], alpha_s[GMAX];

  const int tid = threadIdx.x;
  const int launch_row = blockIdx.x;  // index of this row's partial results
  const int kvh = blockIdx.y;
  const int split = blockIdx.z;
  const int num_splits = gridDim.z;
  const int group = num_heads / num_kv_heads;
  const int head0 = kvh * group;

  int seq, token, kv_len;  // causal: the row sees keys at positions < kv_len
  if (mode == kDecodeMode) {
    seq = launch_row;
    token = cu_seqlens_q[seq];
    if (cu_seqlens_q[seq + 1] - token != 1) return;  // empty, or a prefill chunk: not this kernel's row
    kv_len = seq_lens[seq];
  } else {
    token = launch_row;
    if (token >= cu_seqlens_q[num_seqs]) {
      seq = -1;
      kv_len = 0;  // padding row past the last sequence: written as zeros below, nothing read
    } else {
      seq = find_seq(cu_seqlens_q, num_seqs, token);
      kv_len = seq_lens[seq] - (cu_seqlens_q[seq + 1] - 1 - token);  // minus the chunk's later tokens
    }
  }
  const int begin = split * partition_size;
  const int end = min(kv_len, begin + partition_size);
  const long long out_row = static_cast<long long>(token) * num_heads + head0;
  const long long part_row = (static_cast<long long>(split) * num_rows + launch_row) * num_heads + head0;

  if (begin >= end) {
    if (num_splits > 1) {
      if (tid < group) part_lse[part_row + tid] = neg_inf();
    } else {
      for (int i = tid; i < group * D; i += kDecodeThreads) out[out_row * D + i] = float2_to_pack<T>(0.f, 0.f).x;
    }
    return;
  }

  const T* q_row = q + token * q_stride + static_cast<long long>(head0) * D;
  for (int i = tid; i < GMAX * D; i += kDecodeThreads) {
    const int g = i / D;
    q_s[g][i % D] = g < group ? to_float(q_row[i]) * scale_log2 : 0.f;
  }
  if (tid < GMAX) {
    m_s[tid] = neg_inf();
    l_s[tid] = 0.f;
  }

  const int* bt = block_tables + static_cast<long long>(seq) * max_blocks_per_seq;
  const int c = tid % TPR;
  const int row = tid / TPR;
  uint4 kreg[PASSES], vreg[PASSES];

  auto load_tile = [&](int tile) {
#pragma unroll
    for (int p = 0; p < PASSES; ++p) {
      const int t = tile + p * ROWS + row;
      if (t < end) {
        const long long off = cache_offset<D, BS>(__ldg(bt + t / BS), t, num_kv_heads, kvh) + c * VEC;
        kreg[p] = __ldg(reinterpret_cast<const uint4*>(k_cache + off));
        vreg[p] = __ldg(reinterpret_cast<const uint4*>(v_cache + off));
      } else {
        kreg[p] = make_uint4(0u, 0u, 0u, 0u);  // never read past the context: unused slots may hold NaN
        vreg[p] = make_uint4(0u, 0u, 0u, 0u);
      }
    }
  };

  float acc[PPT][VEC];
#pragma unroll
  for (int i = 0; i < PPT; ++i)
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[i][e] = 0.f;

  load_tile(begin);
  __syncthreads();  // q_s, m_s, l_s ready

  for (int tile = begin; tile < end; tile += kTile) {
    // Scores: each row of TPR threads dots its K row with all GMAX query heads.
#pragma unroll
    for (int p = 0; p < PASSES; ++p) {
      const int tt = p * ROWS + row;
      float kf[VEC];
      unpack8<T>(kreg[p], kf);
#pragma unroll
      for (int g = 0; g < GMAX; ++g) {
        const float4 qa = *reinterpret_cast<const float4*>(&q_s[g][c * VEC]);
        const float4 qb = *reinterpret_cast<const float4*>(&q_s[g][c * VEC + 4]);
        float dot = qa.x * kf[0] + qa.y * kf[1] + qa.z * kf[2] + qa.w * kf[3] + qb.x * kf[4] +
                    qb.y * kf[5] + qb.z * kf[6] + qb.w * kf[7];
        dot = group_sum<TPR>(dot);
        if (c == 0) p_s[g][tt] = tile + tt < end ? dot : neg_inf();
      }
      v_s[tt][c] = vreg[p];
    }
    __syncthreads();

    // Online softmax, one warp per head: rescale factor for the old sum, probabilities in place.
    const int warp = tid / 32, lane = tid % 32;
    for (int g = warp; g < GMAX; g += kDecodeWarps) {
      const float s0 = p_s[g][lane], s1 = p_s[g][lane + 32];
      const float m_old = m_s[g];
      const float m_new = fmaxf(m_old, group_max<32>(fmaxf(s0, s1)));  // finite: tile has a valid key
      const float e0 = exp2f(s0 - m_new), e1 = exp2f(s1 - m_new);
      const float sum = group_sum<32>(e0 + e1);
      p_s[g][lane] = e0;
      p_s[g][lane + 32] = e1;
      __syncwarp();
      if (lane == 0) {
        const float alpha = exp2f(m_old - m_new);
        alpha_s[g] = alpha;
        l_s[g] = l_s[g] * alpha + sum;
        m_s[g] = m_new;
      }
    }
    __syncthreads();

    if (tile + kTile < end) load_tile(tile + kTile);  // next tile's loads overlap the accumulation

    // Weighted V sum: each thread owns PPT (head, column) pairs over a 1/JSUB slice of the tile.
#pragma unroll
    for (int i = 0; i < PPT; ++i) {
      const int pair = JSUB == 1 ? tid + i * kDecodeThreads : tid % NPAIR;
      const int g = pair / TPR, cc = pair % TPR;
      const int j = JSUB == 1 ? 0 : tid / NPAIR;
      const float alpha = alpha_s[g];
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[i][e] *= alpha;
#pragma unroll 4
      for (int tt = j; tt < kTile; tt += JSUB) {
        const float w = p_s[g][tt];
        float vf[VEC];
        unpack8<T>(v_s[tt][cc], vf);
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[i][e] += w * vf[e];
      }
    }
    __syncthreads();
  }

  if constexpr (JSUB > 1) {
    // Sum the JSUB token slices; v_s is free after the loop's last barrier.
    static_assert(sizeof(v_s) >= sizeof(float) * kDecodeThreads * VEC, "reduction buffer too small");
    float* red = reinterpret_cast<float*>(v_s);
#pragma unroll
    for (int e = 0; e < VEC; ++e) red[tid * VEC + e] = acc[0][e];
    __syncthreads();
    if (tid >= NPAIR) return;
    for (int j = 1; j < JSUB; ++j)
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[0][e] += red[(j * NPAIR + tid) * VEC + e];
  }

#pragma unroll
  for (int i = 0; i < PPT; ++i) {
    const int pair = tid + i * kDecodeThreads;
    const int g = pair / TPR, cc = pair % TPR;
    if (g >= group) continue;
    const float inv_l = 1.f / l_s[g];
    float o[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) o[e] = acc[i][e] * inv_l;
    const long long dst = (out_row + g) * D + cc * VEC;
    if (num_splits == 1) {
      *reinterpret_cast<uint4*>(out + dst) = pack8<T>(o);
    } else {
      float4* po = reinterpret_cast<float4*>(part_out + (part_row + g) * D + cc * VEC);
      po[0] = make_float4(o[0], o[1], o[2], o[3]);
      po[1] = make_float4(o[4], o[5], o[6], o[7]);
      if (cc == 0) part_lse[part_row + g] = m_s[g] + log2f(l_s[g]);
    }
  }
}

// Combines the splits of one (launch row, head): weights 2^(lse_s - max), empty splits skipped.
// Launch rows are those of omnibus_decode with the same mode, so a decode-mode row whose sequence
// is not a single-token decode has no partials and is skipped here too.
template <typename T, int D>
__device__ __forceinline__ void merge_body(T* __restrict__ out, const float* __restrict__ part_out,
                                           const float* __restrict__ part_lse,
                                           const int* __restrict__ cu_seqlens_q, int num_rows, int num_heads,
                                           int num_splits, int mode) {
  int token = blockIdx.x;
  if (mode == kDecodeMode) {
    token = cu_seqlens_q[blockIdx.x];
    if (cu_seqlens_q[blockIdx.x + 1] - token != 1) return;
  }
  const long long row = static_cast<long long>(blockIdx.x) * num_heads + blockIdx.y;
  const long long out_row = static_cast<long long>(token) * num_heads + blockIdx.y;
  const long long split_rows = static_cast<long long>(num_rows) * num_heads;
  const int d = threadIdx.x;
  float mx = neg_inf();
  bool nan = false;  // fmaxf drops NaN: track it, so a NaN partial reaches the output, not a zero
  for (int s = 0; s < num_splits; ++s) {
    const float lse = part_lse[s * split_rows + row];
    nan |= lse != lse;
    mx = fmaxf(mx, lse);
  }
  float value = 0.f;  // no split saw a key
  if (nan) {
    value = __int_as_float(0x7fc00000);
  } else if (mx != neg_inf()) {
    float num = 0.f, den = 0.f;  // den >= 1: the split holding the maximum has weight 1
    for (int s = 0; s < num_splits; ++s) {
      const float lse = part_lse[s * split_rows + row];
      if (lse == neg_inf()) continue;  // its partial output was never written
      const float w = exp2f(lse - mx);
      den += w;
      num += w * part_out[(s * split_rows + row) * D + d];
    }
    value = num / den;
  }
  out[out_row * D + d] = float2_to_pack<T>(value, 0.f).x;
}

}  // namespace omnibus

// num_rows is gridDim.x: sequences in decode mode (mode 1), flat query tokens in rows mode (0).
extern "C" __global__ void __launch_bounds__(omnibus::kDecodeThreads)
    omnibus_decode(OMNIBUS_SCALAR* out, float* part_out, float* part_lse, const OMNIBUS_SCALAR* q,
                   const OMNIBUS_SCALAR* k_cache, const OMNIBUS_SCALAR* v_cache, const int* block_tables,
                   const int* seq_lens, const int* cu_seqlens_q, int num_seqs, int num_rows, int num_heads,
                   int num_kv_heads, int max_blocks_per_seq, long long q_stride, int mode, float scale_log2,
                   int partition_size) {
  omnibus::decode_body<OMNIBUS_SCALAR, OMNIBUS_HEAD_DIM, OMNIBUS_BLOCK_SIZE, OMNIBUS_GROUP_MAX>(
      out, part_out, part_lse, q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, num_seqs, num_rows,
      num_heads, num_kv_heads, max_blocks_per_seq, q_stride, mode, scale_log2, partition_size);
}

extern "C" __global__ void omnibus_decode_merge(OMNIBUS_SCALAR* out, const float* part_out,
                                                const float* part_lse, const int* cu_seqlens_q, int num_rows,
                                                int num_heads, int num_splits, int mode) {
  omnibus::merge_body<OMNIBUS_SCALAR, OMNIBUS_HEAD_DIM>(out, part_out, part_lse, cu_seqlens_q, num_rows,
                                                        num_heads, num_splits, mode);
}
