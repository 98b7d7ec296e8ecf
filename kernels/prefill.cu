// Prefill / chunked-prefill attention over the paged KV cache on the tensor cores (mma.sync m16n8k16).
//
// GQA rows are packed: for a kv head, the M dimension enumerates (query token, head of the group)
// pairs, row r = token * group + head, so one K/V tile serves every query head of the group. One CTA
// (4 warps, 16 rows each) takes kBlockM such rows of one sequence and walks its keys in tiles of
// kBlockN, copied into shared memory with cp.async (slots past the causal end are zero-filled).
// The grid is flat over the batch's row tiles (grid.x), sequence after sequence, so it is sized by
// the real work; each CTA finds its sequence with a block-wide scan of cu_seqlens_q.
// Scores, the online softmax (log2 domain) and the output accumulators stay in registers: the
// accumulator layout of one mma is reused as the A operand of the next, as in FlashAttention-2.
#include "common.cuh"

namespace omnibus {

constexpr int kPrefillThreads = 128;
constexpr int kBlockM = 64;
constexpr int kBlockN = 64;

struct RowTile {
  int seq;   // -1: no tile (the grid was an upper bound); num_seqs: the padding rows
  int row0;  // first packed row of the tile within its sequence
};

// Tile `tile` of the batch. A sequence of q_len tokens has ceil(q_len * group / kBlockM) tiles, none
// when skip_single and q_len == 1 (the decode kernel serves those rows). With zero_padding, the
// rows past cu_seqlens_q[num_seqs] count as one more sequence, whose tiles are zeroed.
__device__ __forceinline__ RowTile find_row_tile(const int* __restrict__ cu_seqlens_q, int num_seqs, int num_tokens,
                                                 int group, int skip_single, int zero_padding, int tile) {
  constexpr int kWarps = kPrefillThreads / 32;
  __shared__ int warp_total[kWarps];
  __shared__ RowTile found;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int num_entries = num_seqs + (zero_padding ? 1 : 0);
  if (tid == 0) found = RowTile{-1, 0};
  __syncthreads();
  int base = 0;  // tiles of the entries before this chunk
  for (int first = 0; first < num_entries; first += kPrefillThreads) {
    const int s = first + tid;
    int count = 0;
    if (s < num_entries) {
      const int q_len = (s < num_seqs ? cu_seqlens_q[s + 1] : num_tokens) - cu_seqlens_q[s];
      count = skip_single && q_len == 1 && s < num_seqs ? 0 : (q_len * group + kBlockM - 1) / kBlockM;
    }
    int incl = count;  // inclusive scan over the warp, then over the warps
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const int y = __shfl_up_sync(0xffffffffu, incl, off);
      if (lane >= off) incl += y;
    }
    if (lane == 31) warp_total[warp] = incl;
    __syncthreads();
    int before = 0, chunk = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      before += w < warp ? warp_total[w] : 0;
      chunk += warp_total[w];
    }
    const int start = base + before + incl - count;
    if (count > 0 && tile >= start && tile < start + count) found = RowTile{s, (tile - start) * kBlockM};
    base += chunk;
    __syncthreads();  // `found` is visible, warp_total free for the next chunk
    if (found.seq >= 0) break;  // uniform: every thread reads the same shared value
  }
  return found;
}

// Zeroes the tile's packed rows among the padding rows (tokens cu_seqlens_q[num_seqs]..num_tokens).
template <typename T, int D>
__device__ __forceinline__ void zero_padding_rows(T* __restrict__ out, int first_token, int num_tokens,
                                                  int row0, int group, int num_heads, int kvh) {
  constexpr int CHUNKS = D / 8;  // 16-byte stores per row
  const int num_rows = (num_tokens - first_token) * group;
  for (int i = threadIdx.x; i < kBlockM * CHUNKS; i += kPrefillThreads) {
    const int r = row0 + i / CHUNKS;
    if (r >= num_rows) break;
    const long long orow = static_cast<long long>(first_token + r / group) * num_heads + kvh * group + r % group;
    *reinterpret_cast<uint4*>(out + orow * D + (i % CHUNKS) * 8) = make_uint4(0u, 0u, 0u, 0u);
  }
}

template <typename T, int D, int BS>
__device__ __forceinline__ void prefill_body(T* __restrict__ out, const T* __restrict__ q,
                                             const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                                             const int* __restrict__ block_tables, const int* __restrict__ seq_lens,
                                             const int* __restrict__ cu_seqlens_q, int num_seqs, int num_tokens,
                                             int num_heads, int num_kv_heads, int max_blocks_per_seq,
                                             long long q_stride, float scale_log2, int skip_single,
                                             int zero_padding) {
  constexpr int LDS = D + 8;  // padded row: conflict-free fragment reads
  constexpr int KS = D / 16;  // k-steps of the QK^T product
  constexpr int NB = kBlockN / 8;
  constexpr int OB = D / 8;
  constexpr int CHUNKS = D / 8;  // 16-byte chunks per K/V row
  static_assert(D % 16 == 0 && kBlockN % 16 == 0, "unsupported head_dim");

  __shared__ __align__(16) unsigned short k_s[kBlockN][LDS];
  __shared__ __align__(16) unsigned short v_s[kBlockN][LDS];

  const int kvh = blockIdx.y;
  const int group = num_heads / num_kv_heads;
  const RowTile tile = find_row_tile(cu_seqlens_q, num_seqs, num_tokens, group, skip_single, zero_padding,
                                     blockIdx.x);
  if (tile.seq < 0) return;  // past the batch's last tile
  if (tile.seq == num_seqs) {
    zero_padding_rows<T, D>(out, cu_seqlens_q[num_seqs], num_tokens, tile.row0, group, num_heads, kvh);
    return;
  }
  const int seq = tile.seq;
  const int row0 = tile.row0;
  const int q_begin = cu_seqlens_q[seq];
  const int q_len = cu_seqlens_q[seq + 1] - q_begin;
  const int num_rows = q_len * group;

  const int ctx_before = seq_lens[seq] - q_len;
  const int last_token = (min(num_rows, row0 + kBlockM) - 1) / group;
  const int kv_end = ctx_before + last_token + 1;  // keys any row of this CTA may see

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int gid = lane / 4, tig = lane % 4;  // mma fragment coordinates
  const int r_lo = row0 + warp * 16 + gid;
  const int r_hi = r_lo + 8;
  const bool ok_lo = r_lo < num_rows, ok_hi = r_hi < num_rows;
  const int pos_lo = ctx_before + r_lo / group;  // absolute position of the row's query token
  const int pos_hi = ctx_before + r_hi / group;
  const long long orow_lo = static_cast<long long>(q_begin + r_lo / group) * num_heads + kvh * group + r_lo % group;
  const long long orow_hi = static_cast<long long>(q_begin + r_hi / group) * num_heads + kvh * group + r_hi % group;

  // Q fragments for the whole head_dim, straight from global memory (read once).
  unsigned qf[KS][4];
  {
    const T* q_lo = q + (q_begin + r_lo / group) * q_stride + (kvh * group + r_lo % group) * D;
    const T* q_hi = q + (q_begin + r_hi / group) * q_stride + (kvh * group + r_hi % group) * D;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      const int col = ks * 16 + tig * 2;
      qf[ks][0] = ok_lo ? *reinterpret_cast<const unsigned*>(q_lo + col) : 0u;
      qf[ks][1] = ok_hi ? *reinterpret_cast<const unsigned*>(q_hi + col) : 0u;
      qf[ks][2] = ok_lo ? *reinterpret_cast<const unsigned*>(q_lo + col + 8) : 0u;
      qf[ks][3] = ok_hi ? *reinterpret_cast<const unsigned*>(q_hi + col + 8) : 0u;
    }
  }

  float o[OB][4];
#pragma unroll
  for (int nb = 0; nb < OB; ++nb) o[nb][0] = o[nb][1] = o[nb][2] = o[nb][3] = 0.f;
  float m_lo = neg_inf(), m_hi = neg_inf(), l_lo = 0.f, l_hi = 0.f;

  const int* bt = block_tables + static_cast<long long>(seq) * max_blocks_per_seq;

  // One K/V tile of kBlockN keys into shared memory, as its own cp.async group.
  auto load_tile = [&](unsigned short (*dst)[LDS], const T* cache, int kv0) {
    for (int i = tid; i < kBlockN * CHUNKS; i += kPrefillThreads) {
      const int r = i / CHUNKS, ch = i % CHUNKS;
      const int t = kv0 + r;
      const bool ok = t < kv_end;
      const long long off = ok ? cache_offset<D, BS>(bt[t / BS], t, num_kv_heads, kvh) + ch * 8 : 0;
      cp_async16(&dst[r][ch * 8], cache + off, ok);
    }
    cp_async_commit();
  };

  // Pipeline: K(j+1) loads during softmax and PV of tile j, V(j+1) during QK^T of tile j+1.
  load_tile(k_s, k_cache, 0);
  load_tile(v_s, v_cache, 0);
  for (int kv0 = 0; kv0 < kv_end; kv0 += kBlockN) {
    const bool has_next = kv0 + kBlockN < kv_end;
    cp_async_wait<1>();  // K(j) landed; V(j) may still be in flight
    __syncthreads();

    // S = Q K^T for this warp's 16 rows and kBlockN keys.
    float s[NB][4];
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
      s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        const unsigned short* kr = &k_s[nb * 8 + gid][ks * 16 + tig * 2];
        const unsigned b[2] = {*reinterpret_cast<const unsigned*>(kr), *reinterpret_cast<const unsigned*>(kr + 8)};
        mma_16816<T>(s[nb], qf[ks], b);
      }
    }
    __syncthreads();  // every warp is done with k_s
    if (has_next) load_tile(k_s, k_cache, kv0 + kBlockN);

    // Causal mask, scale, and the row maxima (a row's 4 owners are lanes 4*gid .. 4*gid+3).
    float mx_lo = neg_inf(), mx_hi = neg_inf();
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = kv0 + nb * 8 + tig * 2 + (e & 1);
        const int pos = e < 2 ? pos_lo : pos_hi;
        s[nb][e] = key <= pos && key < kv_end ? s[nb][e] * scale_log2 : neg_inf();
      }
      mx_lo = fmaxf(mx_lo, fmaxf(s[nb][0], s[nb][1]));
      mx_hi = fmaxf(mx_hi, fmaxf(s[nb][2], s[nb][3]));
    }
    mx_lo = group_max<4>(mx_lo);
    mx_hi = group_max<4>(mx_hi);
    const float m_new_lo = fmaxf(m_lo, mx_lo), m_new_hi = fmaxf(m_hi, mx_hi);
    // A row with no visible key yet keeps everything at zero instead of computing inf - inf.
    const float base_lo = m_new_lo == neg_inf() ? 0.f : m_new_lo;
    const float base_hi = m_new_hi == neg_inf() ? 0.f : m_new_hi;
    const float alpha_lo = exp2f(m_lo - base_lo), alpha_hi = exp2f(m_hi - base_hi);
    m_lo = m_new_lo;
    m_hi = m_new_hi;
    float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
      s[nb][0] = exp2f(s[nb][0] - base_lo);
      s[nb][1] = exp2f(s[nb][1] - base_lo);
      s[nb][2] = exp2f(s[nb][2] - base_hi);
      s[nb][3] = exp2f(s[nb][3] - base_hi);
      sum_lo += s[nb][0] + s[nb][1];
      sum_hi += s[nb][2] + s[nb][3];
    }
    l_lo = l_lo * alpha_lo + sum_lo;  // per-lane partial sums; lanes are added at the end
    l_hi = l_hi * alpha_hi + sum_hi;
#pragma unroll
    for (int nb = 0; nb < OB; ++nb) {
      o[nb][0] *= alpha_lo;
      o[nb][1] *= alpha_lo;
      o[nb][2] *= alpha_hi;
      o[nb][3] *= alpha_hi;
    }

    if (has_next) cp_async_wait<1>(); else cp_async_wait<0>();  // V(j) landed
    __syncthreads();

    // O += P V. The two score tiles of keys [16kk, 16kk+16) are exactly the A fragment of P.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const unsigned a[4] = {pack2_bits<T>(s[2 * kk][0], s[2 * kk][1]), pack2_bits<T>(s[2 * kk][2], s[2 * kk][3]),
                             pack2_bits<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             pack2_bits<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int nb = 0; nb < OB; ++nb) {
        unsigned b[2];
        ldmatrix_x2_trans(b, &v_s[kk * 16 + lane % 16][nb * 8]);
        mma_16816<T>(o[nb], a, b);
      }
    }
    __syncthreads();  // every warp is done with v_s
    if (has_next) load_tile(v_s, v_cache, kv0 + kBlockN);
  }

  l_lo = group_sum<4>(l_lo);
  l_hi = group_sum<4>(l_hi);
  const float inv_lo = l_lo > 0.f ? 1.f / l_lo : 0.f;
  const float inv_hi = l_hi > 0.f ? 1.f / l_hi : 0.f;
#pragma unroll
  for (int nb = 0; nb < OB; ++nb) {
    const int col = nb * 8 + tig * 2;
    if (ok_lo) *reinterpret_cast<unsigned*>(out + orow_lo * D + col) = pack2_bits<T>(o[nb][0] * inv_lo, o[nb][1] * inv_lo);
    if (ok_hi) *reinterpret_cast<unsigned*>(out + orow_hi * D + col) = pack2_bits<T>(o[nb][2] * inv_hi, o[nb][3] * inv_hi);
  }
}

}  // namespace omnibus

// grid (row tiles, num_kv_heads, 1); see find_row_tile for skip_single and zero_padding.
extern "C" __global__ void __launch_bounds__(omnibus::kPrefillThreads, 2)
    omnibus_prefill(OMNIBUS_SCALAR* out, const OMNIBUS_SCALAR* q, const OMNIBUS_SCALAR* k_cache,
                    const OMNIBUS_SCALAR* v_cache, const int* block_tables, const int* seq_lens,
                    const int* cu_seqlens_q, int num_seqs, int num_tokens, int num_heads, int num_kv_heads,
                    int max_blocks_per_seq, long long q_stride, float scale_log2, int skip_single,
                    int zero_padding) {
  omnibus::prefill_body<OMNIBUS_SCALAR, OMNIBUS_HEAD_DIM, OMNIBUS_BLOCK_SIZE>(
      out, q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, num_seqs, num_tokens, num_heads, num_kv_heads,
      max_blocks_per_seq, q_stride, scale_log2, skip_single, zero_padding);
}
