// torch binding of the CPU paged-attention kernels: checks inputs once, plans the work items,
// picks the ISA build and runs the items on torch's intra-op threads.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <vector>

#include "attention.h"
#include "block_linear_binding.h"
#include "cpu_features.h"

namespace omnibus_cpu {
namespace {

using TileFn = void (*)(const AttentionArgs&, const WorkItem&);

TileFn tile_fn(const std::string& isa) {
  if (isa == "avx512") {
    TORCH_CHECK(cpu_has_avx512(), "this CPU has no AVX-512 (F/BW/VL/DQ)");
    return attention_tile_avx512;
  }
  if (isa == "avx2") {
    TORCH_CHECK(cpu_has_avx2(), "this CPU has no AVX2 + FMA + F16C");
    return attention_tile_avx2;
  }
  TORCH_CHECK(false, "unknown isa '", isa, "' (avx512 or avx2)");
}

DType dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kFloat32;
    case at::kBFloat16: return kBFloat16;
    case at::kHalf: return kFloat16;
    case at::kChar: return kInt8;
    default: TORCH_CHECK(false, "unsupported dtype ", t.scalar_type(), " (float32, bfloat16, float16, int8)");
  }
}

// An int8 cache row (kernels/int8_kv.py): head_dim values, then a float32 scale per kScaleGroup.
constexpr int64_t kScaleGroup = 32;
constexpr int64_t kScaleBytes = 4;

// Elements per (token, KV head) row of a cache holding head_dim values.
int64_t cache_row(const at::Tensor& cache, int64_t head_dim) {
  return cache.scalar_type() == at::kChar ? head_dim + head_dim / kScaleGroup * kScaleBytes : head_dim;
}

using QuantizeFn = void (*)(const float*, int, int8_t*);

QuantizeFn quantize_fn(const std::string& isa) {
  tile_fn(isa);  // checks the name and this CPU
  return isa == "avx512" ? quantize_int8_row_avx512 : quantize_int8_row_avx2;
}

void check_index_tensor(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kInt && t.dim() == dim,
              name, " must be a CPU int32 tensor of ", dim, " dimension(s)");
}

// Work items, most expensive first, so a dynamic queue finishes evenly (longest job first).
std::vector<WorkItem> plan_items(const AttentionArgs& a, int64_t num_seqs, int64_t num_blocks,
                                 int64_t num_tokens, int64_t num_threads) {
  const int group = a.num_heads / a.num_kv_heads;
  const int rows_per_item = std::max(1, kMaxTileQueries / group);
  // Decode rows take all their KV heads at once (whole K/V rows stream better) when there are
  // enough of them to keep every thread busy; otherwise one item per KV head.
  int64_t num_decodes = 0;
  for (int32_t s = 0; s < num_seqs; ++s) num_decodes += a.cu_seqlens_q[s + 1] - a.cu_seqlens_q[s] == 1;
  const int heads_per_decode = (group < 8 && num_decodes >= 4 * num_threads) ? kMaxHeadsPerItem : 1;
  std::vector<std::pair<int64_t, WorkItem>> costed;
  TORCH_CHECK(a.cu_seqlens_q[0] == 0, "cu_seqlens_q must start at 0");
  for (int32_t s = 0; s < num_seqs; ++s) {
    const int32_t q_len = a.cu_seqlens_q[s + 1] - a.cu_seqlens_q[s];
    const int32_t seq_len = a.seq_lens[s];
    TORCH_CHECK(q_len >= 0 && q_len <= seq_len, "sequence ", s, ": query length ", q_len,
                " outside [0, seq_len ", seq_len, "]");
    TORCH_CHECK(a.cu_seqlens_q[s + 1] <= num_tokens, "cu_seqlens_q exceeds the query rows");
    TORCH_CHECK(int64_t(seq_len) <= a.block_table_stride * a.block_size, "sequence ", s,
                ": seq_len ", seq_len, " exceeds its block table");
    if (q_len == 0) continue;
    const int32_t* table = a.block_tables + s * a.block_table_stride;
    for (int32_t b = 0, n = (seq_len + a.block_size - 1) / a.block_size; b < n; ++b)
      TORCH_CHECK(table[b] >= 0 && table[b] < num_blocks, "sequence ", s, ": block id ", table[b],
                  " outside the cache's ", num_blocks, " blocks");
    const int32_t context = seq_len - q_len;
    if (q_len == 1 && heads_per_decode > 1) {
      for (int32_t h = 0; h < a.num_kv_heads; h += heads_per_decode) {
        const int32_t h1 = std::min<int32_t>(a.num_kv_heads, h + heads_per_decode);
        costed.push_back({int64_t(seq_len) * (h1 - h), WorkItem{s, h, h1, 0, 1}});
      }
      continue;
    }
    for (int32_t r0 = 0; r0 < q_len; r0 += rows_per_item) {
      const int32_t r1 = std::min(q_len, r0 + rows_per_item);
      const int64_t cost = int64_t(r1 - r0) * (context + r1);
      for (int32_t h = 0; h < a.num_kv_heads; ++h) costed.push_back({cost, WorkItem{s, h, h + 1, r0, r1}});
    }
  }
  std::stable_sort(costed.begin(), costed.end(),
                   [](const auto& x, const auto& y) { return x.first > y.first; });
  std::vector<WorkItem> items;
  items.reserve(costed.size());
  for (const auto& c : costed) items.push_back(c.second);
  return items;
}

}  // namespace

std::vector<std::string> supported_isas() {
  std::vector<std::string> isas;
  if (cpu_has_avx512()) isas.push_back("avx512");
  if (cpu_has_avx2()) isas.push_back("avx2");
  return isas;
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens,
                           const at::Tensor& cu_seqlens_q, double scale, const std::string& isa,
                           const c10::optional<at::Tensor>& out_opt) {
  const TileFn fn = tile_fn(isa);
  TORCH_CHECK(q.device().is_cpu() && q.dim() == 3 && q.stride(2) == 1,
              "q must be a CPU [tokens, heads, head_dim] tensor with contiguous head_dim");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes(),
              "k_cache and v_cache must be contiguous [blocks, block_size, kv_heads, head_dim] alike");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "k_cache and v_cache must share a dtype");
  TORCH_CHECK(q.scalar_type() != at::kChar, "q must be a floating-point tensor");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() || q.scalar_type() == at::kFloat,
              "the caches must have q's dtype, or q must be float32 (over a 16- or 8-bit cache)");
  check_index_tensor(block_tables, "block_tables", 2);
  check_index_tensor(seq_lens, "seq_lens", 1);
  check_index_tensor(cu_seqlens_q, "cu_seqlens_q", 1);
  TORCH_CHECK(block_tables.stride(1) == 1 && seq_lens.is_contiguous() && cu_seqlens_q.is_contiguous(),
              "block_tables rows, seq_lens and cu_seqlens_q must be contiguous");
  const int64_t num_seqs = seq_lens.size(0);
  TORCH_CHECK(cu_seqlens_q.size(0) == num_seqs + 1 && block_tables.size(0) == num_seqs,
              "block_tables, seq_lens and cu_seqlens_q disagree on the number of sequences");
  const int64_t num_heads = q.size(1), head_dim = q.size(2), num_kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == cache_row(k_cache, head_dim),
              "q and the cache disagree on head_dim (an int8 cache row is head_dim values and a 4-byte scale "
              "per 32)");
  TORCH_CHECK(k_cache.scalar_type() != at::kChar || head_dim % kScaleGroup == 0,
              "an int8 cache needs a head_dim that is a multiple of ", kScaleGroup);
  TORCH_CHECK(head_dim % 16 == 0 && head_dim <= kMaxHeadDim, "head_dim must be a multiple of 16, at most ",
              kMaxHeadDim);
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0 &&
                  num_heads / num_kv_heads <= kMaxTileQueries,
              "num_heads must be a multiple of num_kv_heads, at most ", kMaxTileQueries, " times it");

  at::Tensor out;
  if (out_opt.has_value()) {
    out = *out_opt;
    TORCH_CHECK(out.is_contiguous() && out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(),
                "out must be a contiguous tensor of q's shape and dtype");
  } else {
    out = at::empty({q.size(0), num_heads, head_dim}, q.options());
  }
  AttentionArgs args{};
  args.q = q.data_ptr();
  args.k_cache = k_cache.data_ptr();
  args.v_cache = v_cache.data_ptr();
  args.out = out.data_ptr();
  args.block_tables = block_tables.data_ptr<int32_t>();
  args.seq_lens = seq_lens.data_ptr<int32_t>();
  args.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  args.q_token_stride = q.stride(0);
  args.q_head_stride = q.stride(1);
  args.block_table_stride = block_tables.stride(0);
  args.num_heads = int32_t(num_heads);
  args.num_kv_heads = int32_t(num_kv_heads);
  args.head_dim = int32_t(head_dim);
  args.block_size = int32_t(k_cache.size(1));
  args.kv_row = int32_t(k_cache.size(3));
  args.dtype = dtype_code(q);
  args.kv_dtype = dtype_code(k_cache);
  args.scale = float(scale);

  const std::vector<WorkItem> items = plan_items(args, num_seqs, k_cache.size(0), q.size(0), at::get_num_threads());
  const int64_t used_rows = args.cu_seqlens_q[num_seqs];
  if (used_rows < q.size(0)) out.narrow(0, used_rows, q.size(0) - used_rows).zero_();

  const int64_t num_items = int64_t(items.size());
  std::atomic<int64_t> next{0};
  const int64_t num_threads = std::min<int64_t>(at::get_num_threads(), num_items);
  at::parallel_for(0, num_threads, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < num_items; i = next.fetch_add(1)) fn(args, items[i]);
  });
  return out;
}

void write_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping, const std::string& isa) {
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4 &&
                  k_cache.sizes() == v_cache.sizes(),
              "k_cache and v_cache must be contiguous [blocks, block_size, kv_heads, head_dim] alike");
  TORCH_CHECK(slot_mapping.device().is_cpu() && slot_mapping.scalar_type() == at::kLong &&
                  slot_mapping.dim() == 1 && slot_mapping.is_contiguous(),
              "slot_mapping must be a contiguous CPU int64 vector");
  const int64_t num_tokens = slot_mapping.size(0);
  const bool quantize = k_cache.scalar_type() == at::kChar;
  const int64_t head_dim = quantize ? k_cache.size(3) * kScaleGroup / (kScaleGroup + kScaleBytes) : k_cache.size(3);
  TORCH_CHECK(!quantize || cache_row(k_cache, head_dim) == k_cache.size(3),
              "an int8 cache row must be head_dim values (a multiple of 32) and a 4-byte scale per 32");
  const int64_t row = k_cache.size(2) * k_cache.size(3);
  for (const at::Tensor* t : {&key, &value}) {
    TORCH_CHECK(t->dim() == 3 && t->size(0) == num_tokens && t->size(1) == k_cache.size(2) &&
                    t->size(2) == head_dim,
                "key/value must be [tokens, kv_heads, head_dim] matching the cache and slot_mapping");
    TORCH_CHECK(t->stride(2) == 1 && t->stride(1) == head_dim, "each token's key/value heads must be contiguous");
    TORCH_CHECK(quantize ? t->scalar_type() == at::kFloat : t->scalar_type() == k_cache.scalar_type(),
                "key/value must have the cache's dtype (float32 for an int8 cache)");
  }
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < num_tokens; ++t)
    TORCH_CHECK_INDEX(slots[t] < num_slots, "slot ", slots[t], " outside the cache's ", num_slots, " slots");
  if (quantize) {
    const int64_t num_kv_heads = k_cache.size(2), head_row = k_cache.size(3);
    auto* kc = k_cache.data_ptr<int8_t>();
    auto* vc = v_cache.data_ptr<int8_t>();
    const float* kp = key.data_ptr<float>();
    const float* vp = value.data_ptr<float>();
    const QuantizeFn quantize = quantize_fn(isa);
    // A prefill chunk's rows are independent (every token has its own slot): spread them.
    at::parallel_for(0, num_tokens, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        if (slots[t] < 0) continue;
        for (int64_t h = 0; h < num_kv_heads; ++h) {
          quantize(kp + t * key.stride(0) + h * head_dim, int(head_dim), kc + slots[t] * row + h * head_row);
          quantize(vp + t * value.stride(0) + h * head_dim, int(head_dim), vc + slots[t] * row + h * head_row);
        }
      }
    });
    return;
  }
  const int64_t elem = k_cache.element_size();
  auto* kc = static_cast<char*>(k_cache.data_ptr());
  auto* vc = static_cast<char*>(v_cache.data_ptr());
  const auto* kp = static_cast<const char*>(key.data_ptr());
  const auto* vp = static_cast<const char*>(value.data_ptr());
  for (int64_t t = 0; t < num_tokens; ++t) {
    if (slots[t] < 0) continue;
    std::memcpy(kc + slots[t] * row * elem, kp + t * key.stride(0) * elem, row * elem);
    std::memcpy(vc + slots[t] * row * elem, vp + t * value.stride(0) * elem, row * elem);
  }
}

}  // namespace omnibus_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Omnibus CPU paged attention (AVX-512 / AVX2, chosen at run time)";
  m.def("supported_isas", &omnibus_cpu::supported_isas, "ISA builds this CPU can run, best first");
  m.def("paged_attention", &omnibus_cpu::paged_attention, "paged attention over a varlen batch");
  m.def("write_kv", &omnibus_cpu::write_kv, "store K/V rows at their slots (slot < 0 skipped)");
  m.def("block_linear", &omnibus_cpu::block_linear, "x w^T (+ bias) for a few rows, w in Q4_1 / Q8_0 blocks",
        pybind11::arg("x"), pybind11::arg("q"), pybind11::arg("scale"), pybind11::arg("min"), pybind11::arg("bias"),
        pybind11::arg("format"), pybind11::arg("isa") = "");
}
