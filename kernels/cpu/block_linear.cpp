// torch binding of the small-batch block-quantized matrix product (block_linear.h): checks inputs,
// picks the ISA build and spreads output features over torch's intra-op threads.
#include "block_linear_binding.h"

#include <ATen/Parallel.h>

#include <algorithm>

#include "block_linear.h"
#include "isa_choice.h"

namespace omnibus_cpu {
namespace {

// Weights per task: fewer and waking the pool costs more than the product.
constexpr int64_t kMinWeightsPerTask = 1 << 15;

void check_table(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 2 &&
                  t.size(0) == rows && t.size(1) == cols,
              name, " must be a contiguous float32 CPU [", rows, ", ", cols, "] tensor");
}

}  // namespace

at::Tensor block_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                        const std::optional<at::Tensor>& min, const std::optional<at::Tensor>& bias,
                        int64_t format, const std::string& isa) {
  const BlockLinearKernels& kernels = table_for_isa(isa, kBlockLinearAvx512, kBlockLinearAvx2);
  TORCH_CHECK(format == kQ4_1 || format == kQ8_0, "format must be 0 (Q4_1) or 1 (Q8_0)");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1,
              "x must be a float32 CPU [rows, in_features] tensor with contiguous features");
  const int64_t rows = x.size(0), in_features = x.size(1);
  TORCH_CHECK(rows >= 1 && rows <= kMaxBlockRows, "x must have 1 to ", kMaxBlockRows, " rows");
  TORCH_CHECK(in_features > 0 && in_features % kQuantBlock == 0, "in_features must be a multiple of 32");
  const bool q4 = format == kQ4_1;
  TORCH_CHECK(q.device().is_cpu() && q.is_contiguous() && q.dim() == 2 &&
                  q.scalar_type() == (q4 ? at::kByte : at::kChar) && q.size(1) == (q4 ? in_features / 2 : in_features),
              q4 ? "Q4_1 q must be a contiguous uint8 [out_features, in_features / 2] tensor"
                 : "Q8_0 q must be a contiguous int8 [out_features, in_features] tensor");
  const int64_t out_features = q.size(0);
  check_table(scale, "scale", out_features, in_features / kQuantBlock);
  TORCH_CHECK(min.has_value() == q4, q4 ? "Q4_1 needs min" : "Q8_0 takes no min");
  if (q4) check_table(*min, "min", out_features, in_features / kQuantBlock);
  if (bias) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->dim() == 1 && bias->size(0) == out_features,
                "bias must be a contiguous float32 CPU vector of out_features elements");
  }
  at::Tensor y = at::empty({rows, out_features}, x.options());
  const BlockLinearArgs args{y.data_ptr<float>(), x.data_ptr<float>(), static_cast<const uint8_t*>(q.data_ptr()),
                             scale.data_ptr<float>(), q4 ? min->data_ptr<float>() : nullptr,
                             bias ? bias->data_ptr<float>() : nullptr, y.stride(0), x.stride(0), rows, in_features,
                             out_features, q4 ? kQ4_1 : kQ8_0};
  const int64_t grain = std::max<int64_t>(4, kMinWeightsPerTask / in_features);
  at::parallel_for(0, out_features, grain, [&](int64_t begin, int64_t end) { kernels.run(args, begin, end); });
  return y;
}

}  // namespace omnibus_cpu
