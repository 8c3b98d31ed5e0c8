// cuda_update_f16.cu: the update kernels of f16 params (cuda_kernels.cuh). One file per param
// type, so that a parallel build compiles them side by side.
#include "cuda_kernels.cuh"

namespace ivon_fast {

const char* cuda_update_of(cuda_math::F16, const OpArgs& a, void* stream) {
  return launch_update<cuda_math::F16>(a, stream);
}

}  // namespace ivon_fast
