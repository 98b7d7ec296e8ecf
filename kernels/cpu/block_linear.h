// Plain-data interface between the torch binding (block_linear.cpp) and the per-ISA builds of the
// small-batch matrix product over block-quantized weights. As with attention.h, the ISA
// translation units include no torch or standard-library headers.
//
// y[m, n] = sum_k x[m, k] w[n, k] (+ bias[n]) for a few rows m, with w stored as llama.cpp stores
// it, in blocks of 32 along k, each with its own float scale:
//   Q4_1: w = d q + min, q in 0..15, two per byte (byte j of a block: element j in its low
//         nibble, element j + 16 in its high one);
//   Q8_0: w = d q, q int8.
// Decode streams every weight once per step, so at a few rows the product costs the weights'
// bytes: 0.75 (Q4_1, float scales) or 1.125 (Q8_0) bytes a weight instead of float32's 4.
#pragma once

#include <stdint.h>

namespace omnibus_cpu {

constexpr int kQuantBlock = 32;    // weights per scale
constexpr int kMaxBlockRows = 16;  // rows of x per call (the caller measures where a float32 GEMM wins)

enum BlockFormat : int { kQ4_1 = 0, kQ8_0 = 1 };

struct BlockLinearArgs {
  float* y;             // [rows, out_features], row stride y_stride
  const float* x;       // [rows, in_features], row stride x_stride
  const uint8_t* q;     // [out_features, in_features / 2] (Q4_1) or [out_features, in_features] (Q8_0)
  const float* scale;   // d: [out_features, in_features / 32]
  const float* min;     // Q4_1's min: [out_features, in_features / 32]; null for Q8_0
  const float* bias;    // [out_features] or null
  int64_t y_stride, x_stride, rows, in_features, out_features;
  BlockFormat format;
};

// One ISA build: output features [begin, end) of every row.
struct BlockLinearKernels {
  void (*run)(const BlockLinearArgs&, int64_t begin, int64_t end);
};

extern const BlockLinearKernels kBlockLinearAvx512;
extern const BlockLinearKernels kBlockLinearAvx2;

}  // namespace omnibus_cpu
