// KV write (reshape_and_cache): copy each new token's K and V rows into its cache slot.
// The copy is dtype-agnostic: a token's row is num_kv_heads * head_dim contiguous elements in both
// the input and the cache, so the kernel moves bytes in VecT-sized words (16 bytes when aligned).
#include "common.cuh"

namespace omnibus {

template <typename VecT, typename SlotT>
__device__ __forceinline__ void write_kv_body(const char* __restrict__ key, const char* __restrict__ value,
                                              char* __restrict__ k_cache, char* __restrict__ v_cache,
                                              const SlotT* __restrict__ slot_mapping, long long key_stride,
                                              long long value_stride, int row_bytes) {
  const int token = blockIdx.x;
  const long long slot = static_cast<long long>(slot_mapping[token]);
  if (slot < 0) return;  // padding token: nothing to store
  const int num_words = row_bytes / static_cast<int>(sizeof(VecT));
  const VecT* k_src = reinterpret_cast<const VecT*>(key + token * key_stride);
  const VecT* v_src = reinterpret_cast<const VecT*>(value + token * value_stride);
  VecT* k_dst = reinterpret_cast<VecT*>(k_cache + slot * row_bytes);
  VecT* v_dst = reinterpret_cast<VecT*>(v_cache + slot * row_bytes);
  for (int i = threadIdx.x; i < num_words; i += blockDim.x) {
    const VecT k = k_src[i];
    const VecT v = v_src[i];
    k_dst[i] = k;
    v_dst[i] = v;
  }
}

}  // namespace omnibus

// Strides are in bytes between consecutive tokens of key / value; row_bytes is one token's
// num_kv_heads * head_dim * element_size. slot_mapping is int32 or int64 (slot_is_int64).
#define OMNIBUS_WRITE_KV_ENTRY(NAME, VEC)                                                            \
  extern "C" __global__ void NAME(const char* key, const char* value, char* k_cache, char* v_cache,  \
                                  const void* slot_mapping, int slot_is_int64, long long key_stride, \
                                  long long value_stride, int row_bytes) {                           \
    if (slot_is_int64)                                                                               \
      omnibus::write_kv_body<VEC, long long>(key, value, k_cache, v_cache,                           \
                                             static_cast<const long long*>(slot_mapping), key_stride, \
                                             value_stride, row_bytes);                               \
    else                                                                                             \
      omnibus::write_kv_body<VEC, int>(key, value, k_cache, v_cache,                                 \
                                       static_cast<const int*>(slot_mapping), key_stride,            \
                                       value_stride, row_bytes);                                     \
  }

OMNIBUS_WRITE_KV_ENTRY(omnibus_write_kv_v16, uint4)
OMNIBUS_WRITE_KV_ENTRY(omnibus_write_kv_v4, unsigned)
OMNIBUS_WRITE_KV_ENTRY(omnibus_write_kv_v2, unsigned short)
