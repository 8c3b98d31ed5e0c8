// The CPU kernels compiled for AVX-512 (F, VL, BW, DQ); cpu_dispatch.cpp calls them only when
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

// GCC 12 flags its own intrinsics' intentionally undefined pass-through operands
// (_mm512_undefined_epi32 in _mm512_cvtepi64_epi32, _mm512_mul_epu32, _mm512_srli_epi64), at the
// kernels' call sites, so the warnings are off for this file; the AVX2 and portable builds of
// the same kernels keep them.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,bmi2,prefer-vector-width=512")
#define IVON_MATH_NS isa_avx512
#define IVON_CPU_AVX512 1
#include "cpu_kernels.h"

IVON_DEFINE_ISA_TABLE(avx512)
#endif
