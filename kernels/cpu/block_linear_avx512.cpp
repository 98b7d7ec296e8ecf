// AVX-512 build of the small-batch block-quantized matrix product (chosen at run time).
#include <immintrin.h>
#include <stdint.h>

#include "block_linear.h"

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")

namespace {

#include "simd_avx512.h"

struct V : Avx512 {
  // 16 bytes from p: their low (high) nibbles as floats.
  static reg low_nibbles(const uint8_t* p) {
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15)));
  }
  static reg high_nibbles(const uint8_t* p) {
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
  }
  static reg int8s(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
};

}  // namespace

#include "block_linear_impl.h"

const omnibus_cpu::BlockLinearKernels omnibus_cpu::kBlockLinearAvx512 = kKernels;
