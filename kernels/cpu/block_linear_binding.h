// The torch binding of the block-quantized matrix product (block_linear.cpp), for ops.cpp's module.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace omnibus_cpu {

// y = x w^T (+ bias) for 1 to kMaxBlockRows rows of float32 x, w in `format` blocks (block_linear.h).
at::Tensor block_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                        const std::optional<at::Tensor>& min, const std::optional<at::Tensor>& bias,
                        int64_t format, const std::string& isa);

}  // namespace omnibus_cpu
