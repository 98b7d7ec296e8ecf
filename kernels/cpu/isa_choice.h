// Which ISA build of a kernel table a torch binding runs (elementwise.cpp, block_linear.cpp).
#pragma once

#include <c10/util/Exception.h>

#include <string_view>

#include "cpu_features.h"

namespace omnibus_cpu {

// `isa` is "avx512", "avx2", or "" for the best build this CPU runs; one this CPU lacks is refused.
template <class Table>
const Table& table_for_isa(std::string_view isa, const Table& avx512, const Table& avx2) {
  if (isa == "avx512" || (isa.empty() && cpu_has_avx512())) {
    TORCH_CHECK(cpu_has_avx512(), "this CPU has no AVX-512 (F/BW/VL/DQ)");
    return avx512;
  }
  if (isa == "avx2" || isa.empty()) {
    TORCH_CHECK(cpu_has_avx2(), "this CPU has no AVX2 + FMA");
    return avx2;
  }
  TORCH_CHECK(false, "unknown isa '", isa, "' (avx512, avx2 or empty for the best)");
}

}  // namespace omnibus_cpu
