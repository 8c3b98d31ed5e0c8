// cuda_update_bf16.cu: the update kernels of bf16 params (cuda_kernels.cuh). One file per param
// type, so that a parallel build compiles them side by side.
#include "cuda_kernels.cuh"

namespace ivon_fast {

const char* cuda_update_of(cuda_math::BF16, const OpArgs& a, void* stream) {
  return launch_update<cuda_math::BF16>(a, stream);
}

}  // namespace ivon_fast
