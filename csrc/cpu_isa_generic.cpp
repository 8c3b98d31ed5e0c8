// The CPU kernels for the compiler's baseline instruction set: the portable fallback.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#define IVON_MATH_NS isa_generic
#include "cpu_kernels.h"

IVON_DEFINE_ISA_TABLE(generic)
