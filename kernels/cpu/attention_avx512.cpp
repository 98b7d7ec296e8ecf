// AVX-512 build of the paged-attention work item (chosen at run time by ops.cpp).
#include <immintrin.h>
#include <stdint.h>

#include "attention.h"

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")

namespace {

#include "simd_avx512.h"

struct V : Avx512 {
  static reg load_bf16(const uint16_t* p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static reg load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static reg load_i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static reg min(reg a, reg b) { return _mm512_min_ps(a, b); }
  static reg abs(reg x) { return _mm512_abs_ps(x); }
  static reg div(reg a, reg b) { return _mm512_div_ps(a, b); }
  static reg round_even(reg x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static bool any_nan(reg x) { return _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q) != 0; }
  static float first(reg x) { return _mm512_cvtss_f32(x); }
  static float reduce_max(reg x) { return _mm512_reduce_max_ps(x); }
  // out[i] = sum of the lanes of rows[i], for 16 rows: a transposing add tree (15 adds).
  static void reduce_rows16(const reg* rows, float* out) {
    reg t[8], u[4];
    for (int i = 0; i < 8; ++i)
      t[i] = _mm512_add_ps(_mm512_unpacklo_ps(rows[2 * i], rows[2 * i + 1]),
                           _mm512_unpackhi_ps(rows[2 * i], rows[2 * i + 1]));
    for (int j = 0; j < 4; ++j) {
      const __m512d a = _mm512_castps_pd(t[2 * j]), b = _mm512_castps_pd(t[2 * j + 1]);
      u[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    // u[j]'s 128-bit lane k: lane k's partial sums of rows 4j..4j+3.
    const reg x0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xdd));
    const reg x1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xdd));
    _mm512_storeu_ps(out, _mm512_add_ps(_mm512_shuffle_f32x4(x0, x1, 0x88), _mm512_shuffle_f32x4(x0, x1, 0xdd)));
  }
  // Lanes [0, n) of x; the others become `fill`.
  static reg mask_first(reg x, int n, float fill) {
    const __mmask16 keep = n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
    return _mm512_mask_blend_ps(keep, _mm512_set1_ps(fill), x);
  }
  // e^x for the softmax's inputs, all <= 0 (below -87.3: 0 as near as matters).
  static reg exp(reg x) {
    reg n;
    const reg y = exp_reduced(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), n);
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
  }
};

}  // namespace

#include "attention_impl.h"
#include "kv_quantize_impl.h"

void omnibus_cpu::attention_tile_avx512(const AttentionArgs& args, const WorkItem& item) {
  dispatch(args, item);
}

void omnibus_cpu::quantize_int8_row_avx512(const float* x, int head_dim, int8_t* out) {
  quantize_row(x, head_dim, out);
}
