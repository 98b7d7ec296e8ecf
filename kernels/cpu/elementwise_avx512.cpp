// AVX-512 build of the decoder's small per-token ops (chosen at run time by elementwise.cpp).
#include <immintrin.h>
#include <stdint.h>

#include "elementwise.h"

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
// GCC contracts a * b + c written with intrinsics into an FMA by default in C++; torch rounds
// each product, and so must we to give its bits.
#pragma GCC optimize("fp-contract=off")

namespace {

#include "simd_avx512.h"

struct V : Avx512 {
  static __mmask16 first_lanes(int64_t n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1); }
  // Lanes [0, n) of p (the rest read as 0 and are never touched in memory).
  static reg load_first(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(first_lanes(n), p); }
  static void store_first(float* p, reg x, int64_t n) { _mm512_mask_storeu_ps(p, first_lanes(n), x); }
  static reg load_first_or(const float* p, int64_t n, float fill) {
    return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), first_lanes(n), p);
  }
  static reg iota() { return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
  // x where a > b (ordered: never where either is NaN), else y.
  static reg select_greater(reg a, reg b, reg x, reg y) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_GT_OQ), y, x);
  }
  static int nan_lanes(reg x) { return int(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q)); }
  static reg div(reg a, reg b) { return _mm512_div_ps(a, b); }
  static reg neg(reg x) { return _mm512_xor_ps(x, _mm512_set1_ps(-0.0f)); }
  // Cephes-style expf over the whole float range: 2^n applied as two factors so that n from -150
  // (denormal results) to 128 stays exact; past the largest finite result, +inf; NaN stays NaN.
  static reg exp(reg x) {
    const __mmask16 overflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(88.72283935546875f), _CMP_GT_OQ);
    x = _mm512_min_ps(_mm512_set1_ps(88.72283935546875f), _mm512_max_ps(_mm512_set1_ps(-103.9f), x));
    reg n;
    reg y = exp_reduced(x, n);
    const __m512i k = _mm512_cvtps_epi32(n);
    const __m512i k1 = _mm512_srai_epi32(k, 1), k2 = _mm512_sub_epi32(k, k1);
    const __m512i bias = _mm512_set1_epi32(127);
    y = _mm512_mul_ps(y, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(k1, bias), 23)));
    y = _mm512_mul_ps(y, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(k2, bias), 23)));
    return _mm512_mask_blend_ps(overflow, y, _mm512_set1_ps(__builtin_inff()));
  }
};

}  // namespace

#include "elementwise_impl.h"

const omnibus_cpu::ElementwiseKernels omnibus_cpu::kElementwiseAvx512 = kKernels;
