// The int8 KV cache's quantizer (kernels/int8_kv.py's quantize_rows), written once over a SIMD
// vocabulary `V`. Included by attention_avx512.cpp / attention_avx2.cpp after their
// `#pragma GCC target`, for their round and divide instructions: the baseline x86-64 build of
// ops.cpp has no rounding instruction, and std::nearbyint there is a libm call per value
// (measured: 1.9 ms of a 32-row decode step, 20 ms of a 512-token prefill).

namespace {

using namespace omnibus_cpu;

constexpr float kQuantNaN = __builtin_nanf("");

// One group of kScaleGroup values: scale = max|x| / 127, values round-half-even(x / scale)
// clamped to [-127, 127], the same float32 operations as the reference; a group holding a NaN
// gets a NaN scale and zeros, an all-zero group scale 0 and zeros.
inline float quantize_group(const float* x, int8_t* out) {
  typename V::reg amax = V::zero();
  bool nan = false;
  for (int i = 0; i < kScaleGroup; i += V::kWidth) {
    const typename V::reg a = V::abs(V::load(x + i));
    nan |= V::any_nan(a);
    amax = V::max(amax, a);
  }
  const float scale = nan ? kQuantNaN : V::reduce_max(amax) / 127.0f;
  if (!(scale > 0.0f)) {
    for (int i = 0; i < kScaleGroup; ++i) out[i] = 0;
    return scale;
  }
  alignas(64) float rounded[kScaleGroup];
  const typename V::reg s = V::set1(scale);
  const typename V::reg lo = V::set1(-127.0f), hi = V::set1(127.0f);
  for (int i = 0; i < kScaleGroup; i += V::kWidth)
    V::store(rounded + i, V::min(hi, V::max(lo, V::round_even(V::div(V::load(x + i), s)))));
  for (int i = 0; i < kScaleGroup; ++i) out[i] = int8_t(rounded[i]);  // exact: whole numbers in range
  return scale;
}

inline void quantize_row(const float* x, int head_dim, int8_t* out) {
  for (int g = 0; g < head_dim / kScaleGroup; ++g) {
    const float scale = quantize_group(x + g * kScaleGroup, out + g * kScaleGroup);
    __builtin_memcpy(out + head_dim + int(sizeof scale) * g, &scale, sizeof scale);
  }
}

}  // namespace
