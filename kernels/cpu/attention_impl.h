// The paged-attention work item, written once over a SIMD vocabulary `V` (see the ISA files).
// Included only by attention_avx512.cpp / attention_avx2.cpp, after their `#pragma GCC target`.
// Everything here has internal linkage: nothing compiled for one ISA leaks into another.
//
// One work item = some query rows of one sequence x all query heads of one KV head. Keys are
// visited once, in tiles of kKeyTile, straight from their pages: each K/V row is read from the
// cache once per KV head (the whole GQA group shares it) and never copied to a gathered tensor.
// Scores, an fp32 online softmax and the V accumulation run per tile.

namespace {

using namespace omnibus_cpu;

struct F32 { using T = float; };
struct BF16 { using T = uint16_t; };
struct F16 { using T = uint16_t; };
struct I8 { using T = int8_t; };  // caches only: see CacheRow<I8>

// Few queries (decode: one row x the GQA group) score each key with a dot product; many queries
// (prefill rows) first transpose the key tile so 16 scores come out of broadcast FMAs.
constexpr int kTransposeMinQueries = 8;  // run_tiles has a case for each count below
constexpr float kNegInf = -__builtin_inff();

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  __builtin_memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN stays NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even, as torch does
  return uint16_t(bits >> 16);
}

// Element access per storage type: scalar and vector loads convert to fp32.
template <class D> struct Codec;
template <> struct Codec<F32> {
  static float load1(const float* p) { return *p; }
  static void store1(float* p, float x) { *p = x; }
  static V::reg loadv(const float* p) { return V::load(p); }
};
template <> struct Codec<BF16> {
  static float load1(const uint16_t* p) { return bf16_to_float(*p); }
  static void store1(uint16_t* p, float x) { *p = float_to_bf16(x); }
  static V::reg loadv(const uint16_t* p) { return V::load_bf16(p); }
};
template <> struct Codec<F16> {
  static float load1(const uint16_t* p) { return _cvtsh_ss(*p); }
  static void store1(uint16_t* p, float x) { *p = _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT); }
  static V::reg loadv(const uint16_t* p) { return V::load_f16(p); }
};

template <class D> inline float load1(const typename D::T* p) { return Codec<D>::load1(p); }
template <class D> inline void store1(typename D::T* p, float x) { Codec<D>::store1(p, x); }
template <class D> inline V::reg loadv(const typename D::T* p) { return Codec<D>::loadv(p); }

// Element d (or the vector from d) of a cached K/V row, as the float32 number it stands for.
template <class D> struct CacheRow {
  static float one(const typename D::T* row, int d, int) { return load1<D>(row + d); }
  static V::reg vec(const typename D::T* row, int d, int) { return loadv<D>(row + d); }
};
// An int8 row (kernels/int8_kv.py): head_dim values, then a float32 scale per kScaleGroup of them;
// value x scale, the same float32 product the reference dequantizes with. A vector never straddles
// two groups (kScaleGroup is a multiple of every kWidth).
constexpr int kScaleGroup = 32;
template <> struct CacheRow<I8> {
  static float scale(const int8_t* row, int d, int head_dim) {
    float s;
    __builtin_memcpy(&s, row + head_dim + int(sizeof s) * (d / kScaleGroup), sizeof s);
    return s;
  }
  static float one(const int8_t* row, int d, int head_dim) { return float(row[d]) * scale(row, d, head_dim); }
  static V::reg vec(const int8_t* row, int d, int head_dim) {
    return V::mul(V::load_i8(row + d), V::set1(scale(row, d, head_dim)));
  }
};
template <class D> inline float read1(const typename D::T* row, int d, int head_dim) {
  return CacheRow<D>::one(row, d, head_dim);
}
template <class D> inline V::reg readv(const typename D::T* row, int d, int head_dim) {
  return CacheRow<D>::vec(row, d, head_dim);
}

inline int min_int(int a, int b) { return a < b ? a : b; }

constexpr int kTileRegs = kKeyTile / V::kWidth;  // vectors per tile of scores
// Keys per softmax update of a decode row (a multiple of kKeyTile): see softmax_update.
constexpr int kDecodeChunk = 128;

// Per-item state: queries (pre-scaled), output accumulators, softmax statistics.
struct TileState {
  alignas(64) float q[kMaxTileQueries * kMaxHeadDim];
  alignas(64) float acc[kMaxTileQueries * kMaxHeadDim];
  alignas(64) float p[kMaxTileQueries * kKeyTile];  // scores, then probabilities
  alignas(64) float kt[kMaxHeadDim * kKeyTile];      // transposed key tile
  float max[kMaxTileQueries];
  float sum[kMaxTileQueries];
  int last[kMaxTileQueries];  // position of the last key each query may see
  static constexpr int kScoreStride = kKeyTile;  // floats between two queries' rows of p
};

// Scores of every query against the tile's `count` keys, by dot products: each key row is loaded
// once for the whole (small) group of queries, and the per-key partial sums are reduced 16 at a
// time by a transposing add tree instead of one horizontal sum per score.
template <class D, int M, class State>
inline void score_group(State& st, int head_dim, const typename D::T* const* keys, int count, int first = 0) {
  constexpr int num_queries = M;  // a compile-time count keeps the accumulators in registers
  typename V::reg partial[M][kKeyTile];
  const int num_vectors = head_dim / V::kWidth;
  for (int t = 0; t < kKeyTile; ++t) {
    if (t >= count) {
      for (int m = 0; m < num_queries; ++m) partial[m][t] = V::zero();
      continue;
    }
    typename V::reg sums[M];
    for (int m = 0; m < num_queries; ++m) sums[m] = V::zero();
    for (int c = 0; c < num_vectors; ++c) {
      const typename V::reg k = readv<D>(keys[t], c * V::kWidth, head_dim);
      for (int m = 0; m < num_queries; ++m)
        sums[m] = V::fma(V::load(st.q + m * head_dim + c * V::kWidth), k, sums[m]);
    }
    for (int m = 0; m < num_queries; ++m) partial[m][t] = sums[m];
  }
  for (int m = 0; m < num_queries; ++m) V::reduce_rows16(partial[m], st.p + m * State::kScoreStride + first);
}

// Scores of queries [m0, m0 + 4) against the transposed tile (unused query slots are skipped).
inline void score_transposed4(TileState& st, int m0, int count, int head_dim) {
  typename V::reg acc[4][kTileRegs];
  for (int i = 0; i < 4; ++i)
    for (int r = 0; r < kTileRegs; ++r) acc[i][r] = V::zero();
  for (int d = 0; d < head_dim; ++d) {
    typename V::reg k[kTileRegs];
    for (int r = 0; r < kTileRegs; ++r) k[r] = V::load(st.kt + d * kKeyTile + r * V::kWidth);
    for (int i = 0; i < count; ++i) {
      typename V::reg qd = V::set1(st.q[(m0 + i) * head_dim + d]);
      for (int r = 0; r < kTileRegs; ++r) acc[i][r] = V::fma(qd, k[r], acc[i][r]);
    }
  }
  for (int i = 0; i < count; ++i)
    for (int r = 0; r < kTileRegs; ++r) V::store(st.p + (m0 + i) * kKeyTile + r * V::kWidth, acc[i][r]);
}

template <class D>
inline void transpose_keys(TileState& st, const typename D::T* const* keys, int count, int head_dim) {
  for (int t = 0; t < kKeyTile; ++t) {
    if (t < count) {
      for (int d = 0; d < head_dim; ++d) st.kt[d * kKeyTile + t] = read1<D>(keys[t], d, head_dim);
    } else {
      for (int d = 0; d < head_dim; ++d) st.kt[d * kKeyTile + t] = 0.0f;
    }
  }
}

// Online-softmax update of query m with its scores in st.p (first `visible` lanes valid):
// leaves probabilities in the first `span` lanes of st.p (0 past `visible`) and rescales the
// accumulator. Decode rows score up to kDecodeChunk keys per update, so this chain of horizontal
// reductions and exps (latency, not throughput) is paid once per chunk, not once per 16 keys.
template <class State>
inline void softmax_update(State& st, int m, int visible, int span, int head_dim) {
  float* p = st.p + m * State::kScoreStride;
  const int num_regs = (span + V::kWidth - 1) / V::kWidth;
  typename V::reg tile_max = V::set1(kNegInf);
  for (int r = 0; r < num_regs; ++r)
    tile_max = V::max(tile_max, V::mask_first(V::load(p + r * V::kWidth), visible - r * V::kWidth, kNegInf));
  const float old_max = st.max[m];
  float new_max = V::reduce_max(tile_max);
  new_max = new_max > old_max ? new_max : old_max;
  // 0 on the first tile; the vector exp, because libm's expf is a call per query per tile.
  const float correction = V::first(V::exp(V::set1(old_max - new_max)));
  typename V::reg total = V::zero();
  const typename V::reg shift = V::set1(new_max);
  for (int r = 0; r < num_regs; ++r) {
    const typename V::reg s = V::load(p + r * V::kWidth);
    const typename V::reg e = V::mask_first(V::exp(V::sub(s, shift)), visible - r * V::kWidth, 0.0f);
    total = V::add(total, e);
    V::store(p + r * V::kWidth, e);
  }
  st.sum[m] = st.sum[m] * correction + V::reduce_add(total);
  st.max[m] = new_max;
  if (correction != 1.0f) {
    float* acc = st.acc + m * head_dim;
    const typename V::reg c = V::set1(correction);
    for (int d = 0; d < head_dim; d += V::kWidth) V::store(acc + d, V::mul(V::load(acc + d), c));
  }
}

// Accumulator chunks have compile-time widths: with a run-time vector count GCC stages the value
// loads through a stack array and calls memcpy per key (measured: a third of the kernel's time).
// A head_dim whose vector count is not a multiple of the chunk ends with one single-vector chunk.
template <int N> struct Width { static constexpr int value = N; };  // no <type_traits>: see above

template <int kChunk, class Fn>
inline void for_each_chunk(int head_dim, Fn&& chunk) {
  int d0 = 0;
  for (; d0 + kChunk * V::kWidth <= head_dim; d0 += kChunk * V::kWidth) chunk(d0, Width<kChunk>{});
  for (; d0 < head_dim; d0 += V::kWidth) chunk(d0, Width<1>{});
}

// acc[m] += sum over the tile's first `visible` keys of p[m][t] * value[t].
template <class D>
inline void accumulate_values(TileState& st, int m, int visible, int head_dim,
                              const typename D::T* const* values) {
  const float* p = st.p + m * kKeyTile;
  float* acc = st.acc + m * head_dim;
  for_each_chunk<4>(head_dim, [&](int d0, auto width) {
    constexpr int n = decltype(width)::value;
    typename V::reg a[n];
    for (int c = 0; c < n; ++c) a[c] = V::load(acc + d0 + c * V::kWidth);
    for (int t = 0; t < visible; ++t) {
      const typename V::reg w = V::set1(p[t]);
      for (int c = 0; c < n; ++c) a[c] = V::fma(w, readv<D>(values[t], d0 + c * V::kWidth, head_dim), a[c]);
    }
    for (int c = 0; c < n; ++c) V::store(acc + d0 + c * V::kWidth, a[c]);
  });
}

// The same for a small group of queries at once: each value row is loaded once for all of them.
// Probabilities past a query's causal limit are 0, so all `count` keys can be summed.
template <class D, int M, class State>
inline void accumulate_values_group(State& st, int count, int head_dim, const typename D::T* const* values) {
  for_each_chunk<2>(head_dim, [&](int d0, auto width) {
    constexpr int n = decltype(width)::value;
    typename V::reg a[M][n];
    for (int m = 0; m < M; ++m)
      for (int c = 0; c < n; ++c) a[m][c] = V::load(st.acc + m * head_dim + d0 + c * V::kWidth);
    for (int t = 0; t < count; ++t) {
      typename V::reg v[n];
      for (int c = 0; c < n; ++c) v[c] = readv<D>(values[t], d0 + c * V::kWidth, head_dim);
      for (int m = 0; m < M; ++m) {
        const typename V::reg w = V::set1(st.p[m * State::kScoreStride + t]);
        for (int c = 0; c < n; ++c) a[m][c] = V::fma(w, v[c], a[m][c]);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int c = 0; c < n; ++c) V::store(st.acc + m * head_dim + d0 + c * V::kWidth, a[m][c]);
  });
}

// Software prefetch of `count` rows of `bytes` each (count <= 0: none), into L1 or L2.
constexpr int kL1 = 3, kL2 = 2;  // __builtin_prefetch locality: T0, T1
// Measured: 1 or 2 key tiles ahead alike (26% off the decode kernel); a whole tile of every
// head's K and V rows in one burst at its start gained nothing.
constexpr int kPrefetchKeyTiles = 2;

template <int kLocality, class T>
inline void prefetch_rows(const T* const* rows, int count, int bytes) {
  for (int t = 0; t < count; ++t) {
    const char* row = reinterpret_cast<const char*>(rows[t]);
    for (int b = 0; b < bytes; b += 64) __builtin_prefetch(row + b, 0, kLocality);
  }
}

// Where one work item's keys live: its sequence's block table, its KV head's rows.
template <class D>
struct KeyRows {
  const typename D::T* k_cache;
  const typename D::T* v_cache;
  const int32_t* table;
  int64_t token_stride, head_offset;
  int block_size;
  int row;  // elements per (token, KV head) row: AttentionArgs::kv_row

  // Row pointers of positions [j0, j0 + count): one division per tile, not per key.
  void locate(int j0, int count, const typename D::T** keys, const typename D::T** values) const {
    int page = j0 / block_size, offset = j0 - page * block_size;
    for (int t = 0; t < count; ++t) {
      const int64_t row = (int64_t(table[page]) * block_size + offset) * token_stride + head_offset;
      keys[t] = k_cache + row;
      values[t] = v_cache + row;
      if (++offset == block_size) offset = 0, ++page;
    }
  }
};

// The key loop for many queries (prefill rows): transposed key tiles, one query at a time after.
template <class D>
void run_tiles_transposed(TileState& st, const KeyRows<D>& rows, int num_queries, int num_keys, int head_dim) {
  const typename D::T* keys[kKeyTile];
  const typename D::T* values[kKeyTile];
  for (int j0 = 0; j0 < num_keys; j0 += kKeyTile) {
    const int count = min_int(kKeyTile, num_keys - j0);
    rows.locate(j0, count, keys, values);
    transpose_keys<D>(st, keys, count, head_dim);
    for (int m0 = 0; m0 < num_queries; m0 += 4) score_transposed4(st, m0, min_int(4, num_queries - m0), head_dim);
    for (int m = 0; m < num_queries; ++m) {
      const int visible = min_int(count, st.last[m] - j0 + 1);
      if (visible <= 0) continue;  // this tile lies past the query's causal limit
      softmax_update(st, m, visible, kKeyTile, head_dim);
      accumulate_values<D>(st, m, visible, head_dim, values);
    }
  }
}

// The key loop for a few queries (decode: the GQA group of one row): all M queries per key row.
template <class D, int M>
void run_tiles_grouped(TileState& st, const KeyRows<D>& rows, int num_keys, int head_dim) {
  const typename D::T* keys[kKeyTile];
  const typename D::T* values[kKeyTile];
  const typename D::T* ahead_keys[kKeyTile];
  const typename D::T* ahead_values[kKeyTile];
  const int row_bytes = rows.row * int(sizeof(typename D::T));
  for (int j0 = 0; j0 < num_keys; j0 += kKeyTile) {
    const int count = min_int(kKeyTile, num_keys - j0);
    rows.locate(j0, count, keys, values);
    const int ahead = j0 + kPrefetchKeyTiles * kKeyTile;  // as in run_decode_heads
    const int ahead_count = min_int(kKeyTile, num_keys - ahead);
    if (ahead_count > 0) {
      rows.locate(ahead, ahead_count, ahead_keys, ahead_values);
      prefetch_rows<kL1>(ahead_keys, ahead_count, row_bytes);
      prefetch_rows<kL2>(ahead_values, ahead_count, row_bytes);
    }
    score_group<D, M>(st, head_dim, keys, count);
    for (int m = 0; m < M; ++m) {
      const int visible = min_int(count, st.last[m] - j0 + 1);
      if (visible > 0) {
        softmax_update(st, m, visible, kKeyTile, head_dim);
      } else {
        for (int t = 0; t < kKeyTile; ++t) st.p[m * kKeyTile + t] = 0.0f;
      }
    }
    accumulate_values_group<D, M>(st, count, head_dim, values);
  }
}

// The queries of one KV head inside a multi-head decode item: its GQA group of the one row.
template <int M>
struct HeadState {
  alignas(64) float q[M * kMaxHeadDim];
  alignas(64) float acc[M * kMaxHeadDim];
  alignas(64) float p[M * kDecodeChunk];
  float max[M];
  float sum[M];
  int last[M];
  static constexpr int kScoreStride = kDecodeChunk;
};

// One decode row, KV heads [kv_head, kv_head_end): per chunk of kDecodeChunk keys, every head's
// keys of the same tokens, so each token's whole K and V rows are read within the chunk.
template <class Q, class D, int M>
void run_decode_heads(const AttentionArgs& args, const WorkItem& item) {
  using T = typename D::T;
  using QT = typename Q::T;
  const int head_dim = args.head_dim;
  const int num_kv = item.kv_head_end - item.kv_head;
  const int q_start = args.cu_seqlens_q[item.seq];
  const int num_keys = args.seq_lens[item.seq];
  HeadState<M> heads[kMaxHeadsPerItem];
  for (int h = 0; h < num_kv; ++h) {
    for (int g = 0; g < M; ++g) {
      const QT* q = static_cast<const QT*>(args.q) + q_start * args.q_token_stride +
                    ((item.kv_head + h) * M + g) * args.q_head_stride;
      for (int d = 0; d < head_dim; ++d) {
        heads[h].q[g * head_dim + d] = load1<Q>(q + d) * args.scale;
        heads[h].acc[g * head_dim + d] = 0.0f;
      }
      heads[h].max[g] = kNegInf;
      heads[h].sum[g] = 0.0f;
      heads[h].last[g] = num_keys - 1;
    }
  }
  const int64_t token_stride = int64_t(args.num_kv_heads) * args.kv_row;
  const KeyRows<D> rows{static_cast<const T*>(args.k_cache), static_cast<const T*>(args.v_cache),
                        args.block_tables + item.seq * args.block_table_stride, token_stride,
                        int64_t(item.kv_head) * args.kv_row, args.block_size, args.kv_row};
  const T* key_rows[kDecodeChunk];
  const T* value_rows[kDecodeChunk];
  const T* keys[kDecodeChunk];
  const T* values[kDecodeChunk];
  const int row_bytes = args.kv_row * int(sizeof(T));
  for (int j0 = 0; j0 < num_keys; j0 += kDecodeChunk) {
    const int count = min_int(kDecodeChunk, num_keys - j0);
    rows.locate(j0, count, key_rows, value_rows);
    for (int h = 0; h < num_kv; ++h) {
      for (int t = 0; t < count; ++t) {
        keys[t] = key_rows[t] + h * args.kv_row;
        values[t] = value_rows[t] + h * args.kv_row;
      }
      // Keys two tiles ahead into L1, this tile's values into L2 for the accumulation below:
      // without it the loads wait on memory (perf: 42% of the kernel at one key load).
      prefetch_rows<kL1>(keys, min_int(kPrefetchKeyTiles * kKeyTile, count), row_bytes);
      for (int t0 = 0; t0 < count; t0 += kKeyTile) {
        const int n = min_int(kKeyTile, count - t0);
        const int ahead = t0 + kPrefetchKeyTiles * kKeyTile;
        prefetch_rows<kL1>(keys + ahead, min_int(kKeyTile, count - ahead), row_bytes);
        prefetch_rows<kL2>(values + t0, n, row_bytes);
        score_group<D, M>(heads[h], head_dim, keys + t0, n, t0);
      }
      for (int g = 0; g < M; ++g) softmax_update(heads[h], g, count, count, head_dim);
      accumulate_values_group<D, M>(heads[h], count, head_dim, values);
    }
  }
  QT* out = static_cast<QT*>(args.out);
  for (int h = 0; h < num_kv; ++h) {
    for (int g = 0; g < M; ++g) {
      QT* o = out + (int64_t(q_start) * args.num_heads + (item.kv_head + h) * M + g) * head_dim;
      const float inv = 1.0f / heads[h].sum[g];
      for (int d = 0; d < head_dim; ++d) store1<Q>(o + d, heads[h].acc[g * head_dim + d] * inv);
    }
  }
}

template <class Q, class D>
void run_decode_heads_for_group(const AttentionArgs& args, const WorkItem& item, int group) {
  switch (group) {
    case 1: return run_decode_heads<Q, D, 1>(args, item);
    case 2: return run_decode_heads<Q, D, 2>(args, item);
    case 3: return run_decode_heads<Q, D, 3>(args, item);
    case 4: return run_decode_heads<Q, D, 4>(args, item);
    case 5: return run_decode_heads<Q, D, 5>(args, item);
    case 6: return run_decode_heads<Q, D, 6>(args, item);
    default: return run_decode_heads<Q, D, 7>(args, item);
  }
}

template <class D>
void run_tiles(TileState& st, const KeyRows<D>& rows, int num_queries, int num_keys, int head_dim) {
  static_assert(kTransposeMinQueries == 8, "one case per grouped query count");
  switch (num_queries) {
    case 1: return run_tiles_grouped<D, 1>(st, rows, num_keys, head_dim);
    case 2: return run_tiles_grouped<D, 2>(st, rows, num_keys, head_dim);
    case 3: return run_tiles_grouped<D, 3>(st, rows, num_keys, head_dim);
    case 4: return run_tiles_grouped<D, 4>(st, rows, num_keys, head_dim);
    case 5: return run_tiles_grouped<D, 5>(st, rows, num_keys, head_dim);
    case 6: return run_tiles_grouped<D, 6>(st, rows, num_keys, head_dim);
    case 7: return run_tiles_grouped<D, 7>(st, rows, num_keys, head_dim);
    default: return run_tiles_transposed<D>(st, rows, num_queries, num_keys, head_dim);
  }
}

// `Q`: the storage of q and out; `D`: that of the caches (the same, or 16-bit under float32).
template <class Q, class D>
void attention_tile(const AttentionArgs& args, const WorkItem& item) {
  using T = typename D::T;
  using QT = typename Q::T;
  const int head_dim = args.head_dim;
  const int group = args.num_heads / args.num_kv_heads;
  if (item.kv_head_end - item.kv_head > 1) return run_decode_heads_for_group<Q, D>(args, item, group);
  const int q_start = args.cu_seqlens_q[item.seq];
  const int q_len = args.cu_seqlens_q[item.seq + 1] - q_start;
  const int context = args.seq_lens[item.seq] - q_len;  // cached tokens before the chunk
  const int num_queries = (item.row_end - item.row_begin) * group;
  const int first_head = item.kv_head * group;

  TileState st;
  for (int row = item.row_begin; row < item.row_end; ++row) {
    for (int g = 0; g < group; ++g) {
      const int m = (row - item.row_begin) * group + g;
      const QT* q = static_cast<const QT*>(args.q) + (q_start + row) * args.q_token_stride +
                    (first_head + g) * args.q_head_stride;
      for (int d = 0; d < head_dim; ++d) {
        st.q[m * head_dim + d] = load1<Q>(q + d) * args.scale;
        st.acc[m * head_dim + d] = 0.0f;
      }
      st.max[m] = kNegInf;
      st.sum[m] = 0.0f;
      st.last[m] = context + row;
    }
  }

  const KeyRows<D> rows{static_cast<const T*>(args.k_cache), static_cast<const T*>(args.v_cache),
                        args.block_tables + item.seq * args.block_table_stride,
                        int64_t(args.num_kv_heads) * args.kv_row, int64_t(item.kv_head) * args.kv_row,
                        args.block_size, args.kv_row};
  run_tiles<D>(st, rows, num_queries, context + item.row_end, head_dim);  // the last row's keys

  QT* out = static_cast<QT*>(args.out);
  for (int row = item.row_begin; row < item.row_end; ++row) {
    for (int g = 0; g < group; ++g) {
      const int m = (row - item.row_begin) * group + g;
      QT* o = out + (int64_t(q_start + row) * args.num_heads + first_head + g) * head_dim;
      const float inv = 1.0f / st.sum[m];
      for (int d = 0; d < head_dim; ++d) store1<Q>(o + d, st.acc[m * head_dim + d] * inv);
    }
  }
}

// ops.cpp admits a cache dtype other than q's only under float32 q (int8 only as a cache).
inline void dispatch(const AttentionArgs& args, const WorkItem& item) {
  if (args.dtype == kFloat32) {
    switch (args.kv_dtype) {
      case kFloat32: return attention_tile<F32, F32>(args, item);
      case kBFloat16: return attention_tile<F32, BF16>(args, item);
      case kInt8: return attention_tile<F32, I8>(args, item);
      default: return attention_tile<F32, F16>(args, item);
    }
  }
  switch (args.dtype) {
    case kBFloat16: return attention_tile<BF16, BF16>(args, item);
    default: return attention_tile<F16, F16>(args, item);
  }
}

}  // namespace
