// The decoder's small per-token ops, written once over a SIMD vocabulary `V` (see the ISA files).
// Included only by elementwise_avx512.cpp / elementwise_avx2.cpp, after their `#pragma GCC target`
// and `fp-contract=off`. Everything here has internal linkage: nothing compiled for one ISA leaks
// into another.
//
// Products and sums are separate roundings in torch's order (no contraction into FMAs), so the
// rotary and the normalisation's scaling give torch's bits; what differs is the summation order of
// the mean of squares (vector lanes, not torch's cascade) and SiLU's exp (Cephes, not Sleef).

namespace {

using namespace omnibus_cpu;

constexpr int64_t kW = V::kWidth;

// residual[i] += x[i] over [0, n); returns the sum of squares of the new residual.
inline float add_and_sum_squares(const float* x, float* residual, int64_t n) {
  V::reg acc0 = V::zero(), acc1 = V::zero();
  int64_t i = 0;
  for (; i + 2 * kW <= n; i += 2 * kW) {
    const V::reg r0 = V::add(V::load(residual + i), V::load(x + i));
    const V::reg r1 = V::add(V::load(residual + i + kW), V::load(x + i + kW));
    V::store(residual + i, r0);
    V::store(residual + i + kW, r1);
    acc0 = V::fma(r0, r0, acc0);
    acc1 = V::fma(r1, r1, acc1);
  }
  for (; i < n; i += kW) {  // masked lanes load as 0 and add nothing
    const V::reg r = V::add(V::load_first(residual + i, n - i), V::load_first(x + i, n - i));
    V::store_first(residual + i, r, n - i);
    acc0 = V::fma(r, r, acc0);
  }
  return V::reduce_add(V::add(acc0, acc1));
}

inline float sum_squares(const float* x, int64_t n) {
  V::reg acc0 = V::zero(), acc1 = V::zero();
  int64_t i = 0;
  for (; i + 2 * kW <= n; i += 2 * kW) {
    const V::reg a = V::load(x + i), b = V::load(x + i + kW);
    acc0 = V::fma(a, a, acc0);
    acc1 = V::fma(b, b, acc1);
  }
  for (; i < n; i += kW) {
    const V::reg a = V::load_first(x + i, n - i);
    acc0 = V::fma(a, a, acc0);
  }
  return V::reduce_add(V::add(acc0, acc1));
}

// torch's order: mean = sum / n, then 1 / sqrt(mean + eps).
inline float inverse_rms(float sum_sq, int64_t n, float eps) {
  return 1.0f / __builtin_sqrtf(sum_sq / float(n) + eps);
}

// out = (x * inv_rms) * weight, rounded after each product as torch does.
inline void scale_row(float* out, const float* x, const float* weight, int64_t n, float inv_rms) {
  const V::reg s = V::set1(inv_rms);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) V::store(out + i, V::mul(V::mul(V::load(x + i), s), V::load(weight + i)));
  if (i < n)
    V::store_first(out + i, V::mul(V::mul(V::load_first(x + i, n - i), s), V::load_first(weight + i, n - i)),
                   n - i);
}

void add_rms_norm(const AddRmsNormArgs& a, int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) {
    float* x = a.x + t * a.x_stride;
    float* residual = a.residual + t * a.residual_stride;
    const float inv_rms = inverse_rms(add_and_sum_squares(x, residual, a.hidden), a.hidden, a.eps);
    scale_row(x, residual, a.weight, a.hidden, inv_rms);
  }
}

void rms_norm(const RmsNormArgs& a, int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) {
    const float* x = a.x + t * a.x_stride;
    const float inv_rms = inverse_rms(sum_squares(x, a.hidden), a.hidden, a.eps);
    scale_row(a.out + t * a.out_stride, x, a.weight, a.hidden, inv_rms);
  }
}

// torch's SiLU: g / (1 + exp(-g)).
inline V::reg silu(V::reg g) { return V::div(g, V::add(V::set1(1.0f), V::exp(V::neg(g)))); }

void silu_and_mul(const SiluAndMulArgs& a, int64_t begin, int64_t end) {
  const int64_t n = a.intermediate;
  for (int64_t t = begin; t < end; ++t) {
    const float* gate = a.gate_up + t * a.gate_up_stride;
    const float* up = gate + n;
    float* out = a.out + t * a.out_stride;
    int64_t i = 0;
    for (; i + kW <= n; i += kW) V::store(out + i, V::mul(silu(V::load(gate + i)), V::load(up + i)));
    if (i < n)
      V::store_first(out + i, V::mul(silu(V::load_first(gate + i, n - i)), V::load_first(up + i, n - i)), n - i);
  }
}

// One head's halves at offset i (`m` lanes valid): x1 c1 - x2 s1 and x2 c2 + x1 s2, which is
// torch's x * cos + cat(-x2, x1) * sin bit for bit (a + (-b) s rounds as a - b s).
inline void rotate_lanes(float* x, const float* cos, const float* sin, int64_t half, int64_t i, int64_t m) {
  const V::reg x1 = V::load_first(x + i, m), x2 = V::load_first(x + half + i, m);
  const V::reg c1 = V::load_first(cos + i, m), s1 = V::load_first(sin + i, m);
  const V::reg c2 = V::load_first(cos + half + i, m), s2 = V::load_first(sin + half + i, m);
  V::store_first(x + i, V::sub(V::mul(x1, c1), V::mul(x2, s1)), m);
  V::store_first(x + half + i, V::add(V::mul(x2, c2), V::mul(x1, s2)), m);
}

void rotary_neox(const RotaryArgs& a, int64_t begin, int64_t end) {
  const int64_t half = a.head_dim / 2;
  for (int64_t t = begin; t < end; ++t) {
    const float* cos = a.cos + t * a.cos_stride;
    const float* sin = a.sin + t * a.sin_stride;
    for (int64_t h = 0; h < a.num_heads; ++h) {
      float* x = a.qk + t * a.token_stride + h * a.head_stride;
      for (int64_t i = 0; i < half; i += kW) rotate_lanes(x, cos, sin, half, i, half - i);
    }
  }
}

// Each lane keeps the largest value it has seen and the first index holding it (a strict, ordered
// >: a later equal value or a NaN never replaces it); the row's answer is the smallest index among
// the lanes holding the largest value. torch's argmax walks the row one element at a time, which
// at a decode batch of 32 x 49152 logits cost 25x its max (1.5 ms of a 50 ms step).
inline int64_t first_nan(const float* x, int64_t n) {
  int64_t i = 0;
  while (i < n && x[i] == x[i]) ++i;
  return i;
}

inline int64_t row_argmax(const float* x, int64_t n) {
  const float lowest = -__builtin_inff();  // what vector tails read past n: never chosen over x
  V::reg best = V::load_first_or(x, n, lowest);
  V::reg best_index = V::iota();
  int nan_lanes = V::nan_lanes(best);
  int64_t i = kW;
  for (; i + kW <= n; i += kW) {
    const V::reg v = V::load(x + i);
    nan_lanes |= V::nan_lanes(v);
    best_index = V::select_greater(v, best, V::add(V::iota(), V::set1(float(i))), best_index);
    best = V::select_greater(v, best, v, best);
  }
  if (i < n) {
    const V::reg v = V::load_first_or(x + i, n - i, lowest);
    nan_lanes |= V::nan_lanes(v);
    best_index = V::select_greater(v, best, V::add(V::iota(), V::set1(float(i))), best_index);
    best = V::select_greater(v, best, v, best);
  }
  if (nan_lanes) return first_nan(x, n);  // torch ranks NaN above everything
  alignas(64) float values[kW], indices[kW];
  V::store(values, best);
  V::store(indices, best_index);
  int lane = 0;
  for (int l = 1; l < kW; ++l)
    if (values[l] > values[lane] || (values[l] == values[lane] && indices[l] < indices[lane])) lane = l;
  return int64_t(indices[lane]);
}

void argmax_rows(const ArgmaxArgs& a, int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) a.out[t] = row_argmax(a.x + t * a.x_stride, a.n);
}

constexpr ElementwiseKernels kKernels{add_rms_norm, rms_norm, silu_and_mul, rotary_neox, argmax_rows};

}  // namespace
