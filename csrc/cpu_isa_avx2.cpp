// The CPU kernels compiled for AVX2 + FMA (Haswell / Zen and later); cpu_dispatch.cpp calls them only when
// __builtin_cpu_supports says the CPU (and OS) can run them.
//
// Note [per-ISA translation units]: the instruction set is raised with a target pragma that covers
// only code after it. The standard headers are included before it, the kernel headers after, and
// everything the kernel headers define lives in a namespace of this ISA, so no AVX function can be
// picked by the linker for a call from baseline code. No torch header is included here.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma,bmi2")
#define IVON_MATH_NS isa_avx2
#define IVON_CPU_AVX2 1
#include "cpu_kernels.h"

IVON_DEFINE_ISA_TABLE(avx2)
#endif
