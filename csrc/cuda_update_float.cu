// cuda_update_float.cu: the update kernels of float32 params (cuda_kernels.cuh). One file per param
// type, so that a parallel build compiles them side by side.
#include "cuda_kernels.cuh"

namespace ivon_fast {

const char* cuda_update_of(float, const OpArgs& a, void* stream) {
  return launch_update<float>(a, stream);
}

}  // namespace ivon_fast
