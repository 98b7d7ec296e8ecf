// AVX2 + FMA + F16C build of the paged-attention work item (chosen at run time by ops.cpp).
#include <immintrin.h>
#include <stdint.h>

#include "attention.h"

#pragma GCC target("avx2,fma,f16c")

namespace {

#include "simd_avx2.h"

struct V : Avx2 {
  static reg load_bf16(const uint16_t* p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static reg load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static reg load_i8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static reg min(reg a, reg b) { return _mm256_min_ps(a, b); }
  static reg abs(reg x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x); }
  static reg div(reg a, reg b) { return _mm256_div_ps(a, b); }
  static reg round_even(reg x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static bool any_nan(reg x) { return _mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)) != 0; }
  static float first(reg x) { return _mm256_cvtss_f32(x); }
  static float reduce_max(reg x) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // out[i] = sum of the lanes of rows[i], for 16 rows: two transposing add trees of 8.
  static void reduce_rows16(const reg* rows, float* out) {
    for (int half = 0; half < 2; ++half) {
      const reg* r = rows + 8 * half;
      reg t[4], u[2];
      for (int i = 0; i < 4; ++i)
        t[i] = _mm256_add_ps(_mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]), _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]));
      for (int j = 0; j < 2; ++j) {
        const __m256d a = _mm256_castps_pd(t[2 * j]), b = _mm256_castps_pd(t[2 * j + 1]);
        u[j] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)), _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)));
      }
      _mm256_storeu_ps(out + 8 * half, _mm256_add_ps(_mm256_permute2f128_ps(u[0], u[1], 0x20),
                                                     _mm256_permute2f128_ps(u[0], u[1], 0x31)));
    }
  }
  // Lanes [0, n) of x; the others become `fill`.
  static reg mask_first(reg x, int n, float fill) {
    const reg lanes = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    const reg keep = _mm256_cmp_ps(lanes, _mm256_set1_ps(float(n)), _CMP_LT_OQ);
    return _mm256_blendv_ps(_mm256_set1_ps(fill), x, keep);
  }
  // e^x for the softmax's inputs, all <= 0 (below -87.3: 0 as near as matters).
  static reg exp(reg x) {
    reg n;
    const reg y = exp_reduced(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), n);
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  }
};

}  // namespace

#include "attention_impl.h"
#include "kv_quantize_impl.h"

void omnibus_cpu::attention_tile_avx2(const AttentionArgs& args, const WorkItem& item) {
  dispatch(args, item);
}

void omnibus_cpu::quantize_int8_row_avx2(const float* x, int head_dim, int8_t* out) {
  quantize_row(x, head_dim, out);
}
