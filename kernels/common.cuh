// Shared device helpers for the Omnibus paged-attention kernels.
// Built both by nvcc (CI build check) and by NVRTC through CuPy, so it includes
// only CUDA headers that NVRTC ships (no <cstdint>, no std library).
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace omnibus {

constexpr float kLog2e = 1.4426950408889634f;

// -inf without <cmath>'s INFINITY, which NVRTC does not provide.
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000u); }

template <typename T> struct Pack2;
template <> struct Pack2<__half> { using type = __half2; };
template <> struct Pack2<__nv_bfloat16> { using type = __nv_bfloat162; };

__device__ __forceinline__ float2 to_float2(__half2 v) { return __half22float2(v); }
__device__ __forceinline__ float2 to_float2(__nv_bfloat162 v) { return __bfloat1622float2(v); }

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ typename Pack2<T>::type float2_to_pack(float a, float b);
template <> __device__ __forceinline__ __half2 float2_to_pack<__half>(float a, float b) {
  return __floats2half2_rn(a, b);
}
template <> __device__ __forceinline__ __nv_bfloat162 float2_to_pack<__nv_bfloat16>(float a, float b) {
  return __floats2bfloat162_rn(a, b);
}

// Two floats rounded to T and packed into one 32-bit word, `a` in the low half.
template <typename T>
__device__ __forceinline__ unsigned pack2_bits(float a, float b) {
  typename Pack2<T>::type p = float2_to_pack<T>(a, b);
  return *reinterpret_cast<unsigned*>(&p);
}

// A 16-byte vector of eight T to eight floats.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& v, float (&f)[8]) {
  using P = typename Pack2<T>::type;
  const P* p = reinterpret_cast<const P*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = to_float2(p[i]);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}

template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
  uint4 v;
  v.x = pack2_bits<T>(f[0], f[1]);
  v.y = pack2_bits<T>(f[2], f[3]);
  v.z = pack2_bits<T>(f[4], f[5]);
  v.w = pack2_bits<T>(f[6], f[7]);
  return v;
}

// Butterfly reductions over aligned groups of WIDTH consecutive lanes; every lane gets the result.
template <int WIDTH>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int off = WIDTH / 2; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

template <int WIDTH>
__device__ __forceinline__ float group_max(float x) {
#pragma unroll
  for (int off = WIDTH / 2; off > 0; off /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

// Element offset of (token slot, kv head) in a [num_blocks, block_size, num_kv_heads, head_dim] cache,
// 64-bit: a large cache overflows 32-bit element offsets.
template <int D, int BS>
__device__ __forceinline__ long long cache_offset(int page, int token, int num_kv_heads, int kv_head) {
  return ((static_cast<long long>(page) * BS + token % BS) * num_kv_heads + kv_head) * D;
}

// Asynchronous 16-byte global->shared copy (sm_80+). With valid == false nothing is read and the
// 16 destination bytes are zero-filled, so masked rows never carry NaN from unused cache slots.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Two 8x8 b16 tiles from shared memory, transposed: lanes 0-15 give the row addresses (16-byte
// aligned); each lane receives the column pair an mma B fragment wants from a row-major tile.
__device__ __forceinline__ void ldmatrix_x2_trans(unsigned (&r)[2], const void* smem_row) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr)
               : "memory");
}

// D += A * B for one m16n8k16 tile on the tensor cores, fp32 accumulators.
// Fragment layouts are the PTX ISA's for mma.m16n8k16 (row-major A, column-major B).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const unsigned (&a)[4],
                                                          const unsigned (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

}  // namespace omnibus

// Each .cu compiles one configuration, chosen by -D flags from kernels/cuda_ops.py; the defaults
// below are what a plain `nvcc -c` (the CI build check) compiles.
#ifndef OMNIBUS_SCALAR
#define OMNIBUS_SCALAR __nv_bfloat16
#endif
#ifndef OMNIBUS_HEAD_DIM
#define OMNIBUS_HEAD_DIM 128
#endif
#ifndef OMNIBUS_BLOCK_SIZE
#define OMNIBUS_BLOCK_SIZE 16
#endif
#ifndef OMNIBUS_GROUP_MAX
#define OMNIBUS_GROUP_MAX 4
#endif
