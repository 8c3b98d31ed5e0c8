// cpu_isa_table.h: the functions one instruction-set build of the CPU kernels exports.
#pragma once

#include <cstdint>

#include "kernel_args.h"

namespace ivon_fast {

using CpuRangeFn = void (*)(const OpArgs&, int64_t q_begin, int64_t q_end);

struct CpuIsaTable {
  const char* name;
  CpuRangeFn sample, accumulate, update;
};

extern const CpuIsaTable cpu_isa_generic;
#if defined(__x86_64__) && defined(__GNUC__)
#define IVON_HAVE_X86_ISAS 1
extern const CpuIsaTable cpu_isa_avx2;
extern const CpuIsaTable cpu_isa_avx512;
#endif

}  // namespace ivon_fast
