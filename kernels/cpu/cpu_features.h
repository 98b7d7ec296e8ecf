// What this CPU runs, asked once per process by both torch bindings (ops.cpp, elementwise.cpp).
#pragma once

namespace omnibus_cpu {

inline bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

// F16C too: the attention kernels convert float16 caches with it (every AVX2 CPU has it).
inline bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

}  // namespace omnibus_cpu
