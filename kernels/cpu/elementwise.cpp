// torch binding of the decoder's small per-token ops (elementwise.h): checks inputs once, picks the
// ISA build and runs tokens on torch's intra-op threads. Registered as the torch library
// `omnibus_cpu_elementwise` when the extension is loaded (kernels/cpu_ops.py), so they are
// `torch.ops.omnibus_cpu_elementwise.*` without a pybind entry in ops.cpp.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "elementwise.h"
#include "cpu_features.h"
#include "isa_choice.h"

namespace omnibus_cpu {
namespace {

// Below this many elements per task a token range runs on the calling thread: waking the pool
// costs more than the work (one decode token's norm is 576 floats).
constexpr int64_t kMinElementsPerTask = 32768;

const ElementwiseKernels& kernels_for(c10::string_view isa) {
  return table_for_isa(std::string_view(isa.data(), isa.size()), kElementwiseAvx512, kElementwiseAvx2);
}

// A [tokens, features] float32 CPU tensor whose features are contiguous.
void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.dim() == 2 && (t.stride(1) == 1 || t.size(1) <= 1), name,
              " must be [tokens, features] with contiguous features");
}

void check_weight(const at::Tensor& weight, int64_t hidden) {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.dim() == 1 &&
                  weight.is_contiguous() && weight.size(0) == hidden,
              "weight must be a contiguous float32 CPU vector of ", hidden, " elements");
}

template <class Args>
void run_tokens(void (*fn)(const Args&, int64_t, int64_t), const Args& args, int64_t num_tokens,
                int64_t elements_per_token) {
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(1, elements_per_token));
  at::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) { fn(args, begin, end); });
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> isas;
  if (cpu_has_avx512()) isas.push_back("avx512");
  if (cpu_has_avx2()) isas.push_back("avx2");
  return isas;
}

void fused_add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps,
                        c10::string_view isa) {
  const ElementwiseKernels& kernels = kernels_for(isa);
  check_rows(x, "x");
  check_rows(residual, "residual");
  TORCH_CHECK(x.sizes() == residual.sizes(), "x and residual must have the same shape");
  check_weight(weight, x.size(1));
  at::assert_no_internal_overlap(x);
  at::assert_no_internal_overlap(residual);
  at::assert_no_overlap(x, residual);
  const AddRmsNormArgs args{x.data_ptr<float>(), residual.data_ptr<float>(), weight.data_ptr<float>(),
                            x.stride(0), residual.stride(0), x.size(1), float(eps)};
  run_tokens(kernels.add_rms_norm, args, x.size(0), 2 * x.size(1));
}

void rms_norm(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps, c10::string_view isa) {
  const ElementwiseKernels& kernels = kernels_for(isa);
  check_rows(out, "out");
  check_rows(x, "x");
  TORCH_CHECK(out.sizes() == x.sizes(), "out and x must have the same shape");
  check_weight(weight, x.size(1));
  at::assert_no_internal_overlap(out);
  at::assert_no_partial_overlap(out, x);  // out may be x itself: a row is read whole before it is written
  const RmsNormArgs args{out.data_ptr<float>(), x.data_ptr<float>(), weight.data_ptr<float>(),
                         out.stride(0), x.stride(0), x.size(1), float(eps)};
  run_tokens(kernels.rms_norm, args, x.size(0), x.size(1));
}

void silu_and_mul(at::Tensor& out, const at::Tensor& gate_up, c10::string_view isa) {
  const ElementwiseKernels& kernels = kernels_for(isa);
  check_rows(out, "out");
  check_rows(gate_up, "gate_up");
  const int64_t intermediate = gate_up.size(1) / 2;
  TORCH_CHECK(gate_up.size(1) % 2 == 0 && out.size(0) == gate_up.size(0) && out.size(1) == intermediate,
              "gate_up must be [tokens, 2 * I] and out [tokens, I]");
  at::assert_no_internal_overlap(out);
  at::assert_no_overlap(out, gate_up);
  const SiluAndMulArgs args{out.data_ptr<float>(), gate_up.data_ptr<float>(), out.stride(0), gate_up.stride(0),
                            intermediate};
  run_tokens(kernels.silu_and_mul, args, out.size(0), 3 * intermediate);
}

void rotary_neox(at::Tensor& qk, const at::Tensor& cos, const at::Tensor& sin, c10::string_view isa) {
  const ElementwiseKernels& kernels = kernels_for(isa);
  TORCH_CHECK(qk.device().is_cpu() && qk.scalar_type() == at::kFloat && qk.dim() == 3 && qk.stride(2) == 1,
              "qk must be a float32 CPU [tokens, heads, head_dim] tensor with contiguous head_dim");
  const int64_t num_tokens = qk.size(0), head_dim = qk.size(2);
  TORCH_CHECK(head_dim % 2 == 0, "head_dim must be even");
  check_rows(cos, "cos");
  check_rows(sin, "sin");
  TORCH_CHECK(cos.size(0) == num_tokens && cos.size(1) == head_dim && sin.sizes() == cos.sizes(),
              "cos and sin must be [tokens, head_dim]");
  at::assert_no_internal_overlap(qk);
  at::assert_no_overlap(qk, cos);
  at::assert_no_overlap(qk, sin);
  const RotaryArgs args{qk.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), qk.stride(0),
                        qk.stride(1), cos.stride(0), sin.stride(0), qk.size(1), head_dim};
  run_tokens(kernels.rotary_neox, args, num_tokens, 2 * qk.size(1) * head_dim);
}

void argmax_rows(at::Tensor& out, const at::Tensor& x, c10::string_view isa) {
  const ElementwiseKernels& kernels = kernels_for(isa);
  check_rows(x, "x");
  TORCH_CHECK(x.size(1) > 0 && x.size(1) < (int64_t(1) << 24), "x must have 1 to 2^24 - 1 columns");
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kLong && out.dim() == 1 && out.is_contiguous() &&
                  out.size(0) == x.size(0),
              "out must be a contiguous int64 CPU vector of one element per row of x");
  const ArgmaxArgs args{out.data_ptr<int64_t>(), x.data_ptr<float>(), x.stride(0), x.size(1)};
  run_tokens(kernels.argmax_rows, args, x.size(0), x.size(1));
}

void define_ops(torch::Library& m) {
  m.def("supported_isas() -> str[]", &supported_isas);
  m.def("fused_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps, str isa=\"\") -> ()",
        &fused_add_rms_norm);
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps, str isa=\"\") -> ()", &rms_norm);
  m.def("silu_and_mul(Tensor(a!) out, Tensor gate_up, str isa=\"\") -> ()", &silu_and_mul);
  m.def("rotary_neox(Tensor(a!) qk, Tensor cos, Tensor sin, str isa=\"\") -> ()", &rotary_neox);
  m.def("argmax_rows(Tensor(a!) out, Tensor x, str isa=\"\") -> ()", &argmax_rows);
}

// TORCH_LIBRARY(omnibus_cpu_elementwise, m), except that a second build of this extension loaded
// into the same process (its sources edited while the process runs, another cache directory)
// keeps the first build's ops (as Python keeps the first build's attention module): torch refuses
// a namespace defined twice by throwing from the static initialiser, which aborts the process.
struct Registration {
  std::unique_ptr<torch::Library> library;
  Registration() {
    const c10::OperatorName probe{"omnibus_cpu_elementwise::supported_isas", ""};
    if (c10::Dispatcher::singleton().findSchema(probe).has_value()) return;
    library = std::make_unique<torch::Library>(torch::Library::DEF, "omnibus_cpu_elementwise", std::nullopt,
                                               __FILE__, __LINE__);
    define_ops(*library);
  }
};
const Registration registration;

}  // namespace
}  // namespace omnibus_cpu
