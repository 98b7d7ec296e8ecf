// AVX2 + FMA build of the decoder's small per-token ops (chosen at run time by elementwise.cpp).
#include <immintrin.h>
#include <stdint.h>

#include "elementwise.h"

#pragma GCC target("avx2,fma")
// GCC contracts a * b + c written with intrinsics into an FMA by default in C++; torch rounds
// each product, and so must we to give its bits.
#pragma GCC optimize("fp-contract=off")

namespace {

#include "simd_avx2.h"

struct V : Avx2 {
  static __m256i first_lanes(int64_t n) {
    const int32_t count = n >= 8 ? 8 : int32_t(n);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  // Lanes [0, n) of p (the rest read as 0 and are never touched in memory).
  static reg load_first(const float* p, int64_t n) { return _mm256_maskload_ps(p, first_lanes(n)); }
  static void store_first(float* p, reg x, int64_t n) { _mm256_maskstore_ps(p, first_lanes(n), x); }
  static reg load_first_or(const float* p, int64_t n, float fill) {
    const __m256i lanes = first_lanes(n);
    return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, lanes), _mm256_castsi256_ps(lanes));
  }
  static reg iota() { return _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7); }
  // x where a > b (ordered: never where either is NaN), else y.
  static reg select_greater(reg a, reg b, reg x, reg y) { return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_GT_OQ)); }
  static int nan_lanes(reg x) { return _mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)); }
  static reg div(reg a, reg b) { return _mm256_div_ps(a, b); }
  static reg neg(reg x) { return _mm256_xor_ps(x, _mm256_set1_ps(-0.0f)); }
  // Cephes-style expf over the whole float range: 2^n applied as two factors so that n from -150
  // (denormal results) to 128 stays exact; past the largest finite result, +inf; NaN stays NaN.
  static reg exp(reg x) {
    const reg overflow = _mm256_cmp_ps(x, _mm256_set1_ps(88.72283935546875f), _CMP_GT_OQ);
    x = _mm256_min_ps(_mm256_set1_ps(88.72283935546875f), _mm256_max_ps(_mm256_set1_ps(-103.9f), x));
    reg n;
    reg y = exp_reduced(x, n);
    const __m256i k = _mm256_cvtps_epi32(n);
    const __m256i k1 = _mm256_srai_epi32(k, 1), k2 = _mm256_sub_epi32(k, k1);
    const __m256i bias = _mm256_set1_epi32(127);
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k1, bias), 23)));
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k2, bias), 23)));
    return _mm256_blendv_ps(y, _mm256_set1_ps(__builtin_inff()), overflow);
  }
};

}  // namespace

#include "elementwise_impl.h"

const omnibus_cpu::ElementwiseKernels omnibus_cpu::kElementwiseAvx2 = kKernels;
