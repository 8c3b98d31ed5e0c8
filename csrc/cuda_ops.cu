// cuda_ops.cu: the CUDA entry points (kernel_args.h): sample and accumulate, and the update's
// dispatch on the param type to cuda_update_<type>.cu, whose instances compile in parallel with
// this file (the kernels: cuda_kernels.cuh).
#include "cuda_kernels.cuh"

namespace ivon_fast {

const char* cuda_sample(const OpArgs& a, void* stream) {
  cuda_math::with_param_type(a.ptype, [&](auto pt) {
    for_each_part(a, [&](const Launch& l) {
      IVON_LAUNCH(grid_for(l.quads), kThreads, static_cast<cudaStream_t>(stream),
                  sample_kernel<decltype(pt)>)
      (l);
    });
  });
  return last_error();
}

const char* cuda_accumulate(const OpArgs& a, void* stream) {
  cuda_math::dispatch_accumulate_cuda(a, [&](auto pt, auto price, auto first) {
    for_each_part(a, [&](const Launch& l) {
      IVON_LAUNCH(grid_for(l.quads), kThreads, static_cast<cudaStream_t>(stream),
                  accumulate_kernel<decltype(pt), decltype(price)::value,
                                    decltype(first)::value>)
      (l);
    });
  });
  return last_error();
}

const char* cuda_update(const OpArgs& a, void* stream) {
  const char* error = nullptr;
  cuda_math::with_param_type(a.ptype,
                             [&](auto pt) { error = cuda_update_of(pt, a, stream); });
  return error;
}

}  // namespace ivon_fast
