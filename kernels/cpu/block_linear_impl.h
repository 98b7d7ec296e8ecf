// The small-batch block-quantized matrix product, written once over a SIMD vocabulary `V` (see the
// ISA files). Included only by block_linear_avx512.cpp / block_linear_avx2.cpp, after their
// `#pragma GCC target`. Everything here has internal linkage.
//
// Each weight is dequantized once per call into registers (fma(q, d, min): q d is exact in
// float32, so this is the float32 number the dequantized model holds, bit for bit) and multiplied
// into every row of x; only the summation order differs from a float32 GEMM.

namespace {

using namespace omnibus_cpu;

constexpr int kW = V::kWidth;
constexpr int kBlockVectors = kQuantBlock / kW;  // vectors per block of 32 weights

// Block `b` of output feature `n`, as float32 vectors.
template <BlockFormat F>
inline void dequantize_block(const BlockLinearArgs& a, int64_t n, int64_t b, V::reg* w) {
  const int64_t blocks = a.in_features / kQuantBlock;
  const V::reg d = V::set1(a.scale[n * blocks + b]);
  if constexpr (F == kQ4_1) {
    const uint8_t* q = a.q + n * (a.in_features / 2) + b * (kQuantBlock / 2);
    const V::reg m = V::set1(a.min[n * blocks + b]);
    for (int c = 0; c < kBlockVectors / 2; ++c) {
      w[c] = V::fma(V::low_nibbles(q + c * kW), d, m);
      w[kBlockVectors / 2 + c] = V::fma(V::high_nibbles(q + c * kW), d, m);
    }
  } else {
    const int8_t* q = reinterpret_cast<const int8_t*>(a.q) + n * a.in_features + b * kQuantBlock;
    for (int c = 0; c < kBlockVectors; ++c) w[c] = V::mul(V::int8s(q + c * kW), d);
  }
}

// Output features [n0, n0 + N) of all M rows: N x M accumulators, each weight block dequantized
// once for the M rows.
template <BlockFormat F, int M, int N>
inline void output_group(const BlockLinearArgs& a, int64_t n0) {
  V::reg acc[N][M];
  for (int j = 0; j < N; ++j)
    for (int m = 0; m < M; ++m) acc[j][m] = V::zero();
  const int64_t blocks = a.in_features / kQuantBlock;
  for (int64_t b = 0; b < blocks; ++b) {
    for (int j = 0; j < N; ++j) {
      V::reg w[kBlockVectors];
      dequantize_block<F>(a, n0 + j, b, w);
      for (int m = 0; m < M; ++m) {
        const float* x = a.x + m * a.x_stride + b * kQuantBlock;
        for (int c = 0; c < kBlockVectors; ++c) acc[j][m] = V::fma(w[c], V::load(x + c * kW), acc[j][m]);
      }
    }
  }
  for (int j = 0; j < N; ++j) {
    const float bias = a.bias ? a.bias[n0 + j] : 0.0f;
    for (int m = 0; m < M; ++m) a.y[m * a.y_stride + n0 + j] = V::reduce_add(acc[j][m]) + bias;
  }
}

// Output features a few at a time, so that at most 16 accumulators are live; one for the rest.
template <BlockFormat F, int M>
void run_rows(const BlockLinearArgs& a, int64_t begin, int64_t end) {
  constexpr int kGroup = M <= 4 ? 4 : M <= 8 ? 2 : 1;
  int64_t n = begin;
  for (; n + kGroup <= end; n += kGroup) output_group<F, M, kGroup>(a, n);
  for (; n < end; ++n) output_group<F, M, 1>(a, n);
}

template <BlockFormat F>
void run_format(const BlockLinearArgs& a, int64_t begin, int64_t end) {
  static_assert(kMaxBlockRows == 16, "one case per row count");
  switch (a.rows) {
    case 1: return run_rows<F, 1>(a, begin, end);
    case 2: return run_rows<F, 2>(a, begin, end);
    case 3: return run_rows<F, 3>(a, begin, end);
    case 4: return run_rows<F, 4>(a, begin, end);
    case 5: return run_rows<F, 5>(a, begin, end);
    case 6: return run_rows<F, 6>(a, begin, end);
    case 7: return run_rows<F, 7>(a, begin, end);
    case 8: return run_rows<F, 8>(a, begin, end);
    case 9: return run_rows<F, 9>(a, begin, end);
    case 10: return run_rows<F, 10>(a, begin, end);
    case 11: return run_rows<F, 11>(a, begin, end);
    case 12: return run_rows<F, 12>(a, begin, end);
    case 13: return run_rows<F, 13>(a, begin, end);
    case 14: return run_rows<F, 14>(a, begin, end);
    case 15: return run_rows<F, 15>(a, begin, end);
    default: return run_rows<F, 16>(a, begin, end);
  }
}

void run(const BlockLinearArgs& a, int64_t begin, int64_t end) {
  if (a.format == kQ4_1) return run_format<kQ4_1>(a, begin, end);
  return run_format<kQ8_0>(a, begin, end);
}

constexpr BlockLinearKernels kKernels{run};

}  // namespace
