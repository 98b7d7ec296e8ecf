// Plain-data interface between the torch binding (ops.cpp) and the per-ISA attention kernels.
// The ISA translation units include no torch or standard-library headers, so no inline function
// compiled for AVX-512 can be shared with (and picked by the linker for) AVX2-only code.
#pragma once

#include <stdint.h>

namespace omnibus_cpu {

// kInt8: caches only (kernels/int8_kv.py): each (token, KV head) row is head_dim int8 values, then
// a float32 scale per 32 of them.
enum DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kInt8 = 3 };

// Limits of one work item: its queries' accumulators live on the stack.
constexpr int kMaxHeadDim = 256;
constexpr int kMaxTileQueries = 64;  // (query rows x GQA group) per work item
constexpr int kKeyTile = 16;         // keys scored together

struct AttentionArgs {
  const void* q;        // [num_tokens, num_heads, head_dim], head_dim contiguous
  const void* k_cache;  // [num_blocks, block_size, num_kv_heads, kv_row], contiguous
  const void* v_cache;
  void* out;            // [num_tokens, num_heads, head_dim], contiguous
  const int32_t* block_tables;  // [num_seqs, block_table_stride]
  const int32_t* seq_lens;      // [num_seqs]
  const int32_t* cu_seqlens_q;  // [num_seqs + 1]
  int64_t q_token_stride, q_head_stride;  // in elements
  int64_t block_table_stride;
  int32_t num_heads, num_kv_heads, head_dim, block_size;
  int32_t kv_row;    // elements per (token, KV head) row of the caches: head_dim, or head_dim * 9 / 8 (int8)
  int32_t dtype;     // of q and out
  int32_t kv_dtype;  // of the caches: dtype, or 16- or 8-bit under a float32 model (fewer bytes to read)
  float scale;
};

constexpr int kMaxHeadsPerItem = 8;  // KV heads one decode item may cover

// One unit of parallel work: query rows [row_begin, row_end) of sequence `seq` (rows counted
// from the start of that sequence's chunk), all query heads of KV heads [kv_head, kv_head_end).
// Items with several KV heads are single decode rows: reading all heads of each cached token
// together streams whole K/V rows, which the memory system serves far better than a 1/heads slice.
struct WorkItem {
  int32_t seq, kv_head, kv_head_end, row_begin, row_end;
};

void attention_tile_avx512(const AttentionArgs& args, const WorkItem& item);
void attention_tile_avx2(const AttentionArgs& args, const WorkItem& item);

// One (token, KV head) row of head_dim floats into an int8 cache row (kernels/int8_kv.py).
void quantize_int8_row_avx512(const float* x, int head_dim, int8_t* out);
void quantize_int8_row_avx2(const float* x, int head_dim, int8_t* out);

}  // namespace omnibus_cpu
