// kernel_args.h: the plain-data interface between the op layer (ops.cpp, which sees torch) and the
// kernels (cpu_kernels.h, cuda_kernels.cuh, which see only raw pointers). Keeping torch out of the
// kernel TUs makes nvcc fast and makes the per-ISA CPU TUs safe (see ivon_math.h).
#pragma once

#include <cstdint>

#include "scalars.h"

namespace ivon_fast {

enum class ParamType : int { kFloat = 0, kBFloat16 = 1, kHalf = 2 };

// How update obtains the gradient mean and hessian term (docs/DESIGN.md section 5).
enum class GradMode : int {
  kGradOnly = 0,   // grad given, count == 1: the averages are not read
  kGradAvg = 1,    // grad given, count > 1: fold grad into the averages of count - 1 samples
  kAvgOnly = 2,    // grad None: the averages hold all samples
};

// The draws of stochastic rounding live in [2^62, 2^63) (docs/DESIGN.md section 16): an update's
// rounding draw is this plus its rounding index
constexpr uint64_t kRoundDrawBase = uint64_t(1) << 62;

struct OpArgs {
  ParamType ptype = ParamType::kFloat;
  // momentum and hess: float32, or (bf16_state) bf16 stored by stochastic rounding (Note
  // [bf16 state] in ivon_math.h); the mean, the averages and the prior inputs are float32
  bool bf16_state = false;
  int64_t n = 0;        // segment length
  int64_t offset = 0;   // global flat index of element 0
  uint64_t seed = 0, draw = 0, next_draw = 0;
  uint64_t round_draw = 0;  // update with bf16 state: kRoundDrawBase + the rounding index
  bool has_next_draw = false;
  bool price = true;    // hess_approx == 'price' (else 'gradsq')
  GradMode mode = GradMode::kGradOnly;
  bool first = true;    // accumulate: count == 1
  void* param = nullptr;            // param dtype
  const void* grad = nullptr;       // param dtype
  float* mean = nullptr;
  void* momentum = nullptr;         // float32, or uint16_t bf16 bits (bf16_state)
  void* hess = nullptr;             // float32, or uint16_t bf16 bits (bf16_state)
  float* avg_grad = nullptr;
  float* avg_hess_term = nullptr;
  Scalars s{};
  // update's optional device scalars (docs/DESIGN.md section 11): each points to the one float32
  // element of a tensor on the params' device, nullptr when the op did not get it. Only the
  // kernels read them (read_device_scalars in ivon_math.h), never the host: no synchronization.
  const float* grad_scale = nullptr;     // divide the grads and averages by it
  const float* found_inf = nullptr;      // nonzero (or NaN): skip the step
  const float* device_lr = nullptr;      // replaces s.lr
  const float* device_debias = nullptr;  // replaces s.debias
  // the training draw numbers read on the device (capturable steps, docs/DESIGN.md section 9):
  // sample / accumulate read [0] in place of draw, update [0] and (has_next_draw) [1] in place of
  // draw and next_draw, and (bf16_state) [1] as the rounding index; nullptr: the host's draw,
  // next_draw and round_draw (read_draws in ivon_math.h).
  const int64_t* device_draws = nullptr;
  // the optional per-element prior (Note [per-element prior] in ivon_math.h): float32 arrays of
  // the segment's length, nullptr when the op did not get them; a kernel instance reads one only
  // when its template flag says it was given (dispatch_flags.h)
  const float* prior_precision = nullptr;  // delta_i, replaces s.wd (every op)
  const float* prior_mean = nullptr;       // mu0_i, the step pulls toward it (update only)
};

// CPU entry points (cpu_dispatch.cpp picks the instruction set at run time).
void cpu_sample(const OpArgs& a);
void cpu_accumulate(const OpArgs& a);
void cpu_update(const OpArgs& a);
const char* cpu_isa_name();
// "" restores automatic selection; returns false for an unknown / unsupported name.
bool cpu_set_isa(const char* name);

// CUDA entry points (cuda_ops.cu), launched on `stream` (a cudaStream_t). They return
// nullptr on success, else the CUDA error string of the launch.
const char* cuda_sample(const OpArgs& a, void* stream);
const char* cuda_accumulate(const OpArgs& a, void* stream);
const char* cuda_update(const OpArgs& a, void* stream);

}  // namespace ivon_fast
