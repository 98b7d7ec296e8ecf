// AVX2 build of the small-batch block-quantized matrix product (chosen at run time).
#include <immintrin.h>
#include <stdint.h>

#include "block_linear.h"

#pragma GCC target("avx2,fma")

namespace {

#include "simd_avx2.h"

struct V : Avx2 {
  // 8 bytes from p: their low (high) nibbles as floats.
  static reg low_nibbles(const uint8_t* p) {
    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    return _mm256_cvtepi32_ps(_mm256_and_si256(bytes, _mm256_set1_epi32(15)));
  }
  static reg high_nibbles(const uint8_t* p) {
    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    return _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4));
  }
  static reg int8s(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
};

}  // namespace

#include "block_linear_impl.h"

const omnibus_cpu::BlockLinearKernels omnibus_cpu::kBlockLinearAvx2 = kKernels;
