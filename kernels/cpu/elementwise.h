// Plain-data interface between the torch binding (elementwise.cpp) and the per-ISA builds of the
// decoder's small per-token ops: RMSNorm (with the residual add fused in), SiLU-and-mul, rotary,
// and greedy sampling's row argmax.
// As with attention.h, the ISA translation units include no torch or standard-library headers.
#pragma once

#include <stdint.h>

namespace omnibus_cpu {

// Every tensor is float32 with contiguous features; rows (tokens) may be strided. Strides are in
// elements.

// residual += x; x = rms_norm(residual) * weight, in place.
struct AddRmsNormArgs {
  float* x;
  float* residual;
  const float* weight;  // [hidden]
  int64_t x_stride, residual_stride, hidden;
  float eps;
};

// out = rms_norm(x) * weight (out may be x itself).
struct RmsNormArgs {
  float* out;
  const float* x;
  const float* weight;
  int64_t out_stride, x_stride, hidden;
  float eps;
};

// out = silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:].
struct SiluAndMulArgs {
  float* out;
  const float* gate_up;
  int64_t out_stride, gate_up_stride, intermediate;
};

// Neox rotary in place on qk [tokens, heads, head_dim]: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s),
// x1/x2 the first/second half of each head, cos/sin [tokens, head_dim].
struct RotaryArgs {
  float* qk;
  const float* cos;
  const float* sin;
  int64_t token_stride, head_stride, cos_stride, sin_stride, num_heads, head_dim;
};

// out[t] = the first index of the largest x[t, :], or of its first NaN: torch.argmax(x, -1).
// 0 < n < 2^24 (indices are carried in float lanes, exact below that).
struct ArgmaxArgs {
  int64_t* out;
  const float* x;
  int64_t x_stride, n;
};

// One ISA build: each function handles tokens [begin, end).
struct ElementwiseKernels {
  void (*add_rms_norm)(const AddRmsNormArgs&, int64_t begin, int64_t end);
  void (*rms_norm)(const RmsNormArgs&, int64_t begin, int64_t end);
  void (*silu_and_mul)(const SiluAndMulArgs&, int64_t begin, int64_t end);
  void (*rotary_neox)(const RotaryArgs&, int64_t begin, int64_t end);
  void (*argmax_rows)(const ArgmaxArgs&, int64_t begin, int64_t end);
};

extern const ElementwiseKernels kElementwiseAvx512;
extern const ElementwiseKernels kElementwiseAvx2;

}  // namespace omnibus_cpu
