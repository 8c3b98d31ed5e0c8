// dispatch_flags.h: the one place where an op's run-time flags (OpArgs: param dtype, price or
// gradsq, first sample, grad mode, resampling, unscaling, the per-element prior's inputs) become
// template parameters. The CPU kernels (cpu_kernels.h) and the CUDA kernels (cuda_kernels.cuh)
// both call these, so the two can never disagree on which flag selects which instance (the CUDA
// kernels take a subset of the flags: Note [CUDA dispatch]).
//
// Each dispatcher calls a generic lambda once, with one argument per flag: a value of the param
// type (float, BF16 or F16) and std::integral_constant values for the others, so the lambda
// reads them as compile-time constants (decltype(flag)::value) and instantiates the kernel it
// needs. Included after ivon_math.h, inside the same per-ISA namespace (the param types live
// there).
#pragma once

#include <type_traits>

#include "ivon_math.h"
#include "kernel_args.h"

namespace ivon_fast {
namespace IVON_MATH_NS {

template <typename F>
inline void with_param_type(ParamType ptype, F&& f) {
  switch (ptype) {
    case ParamType::kFloat: return f(float{});
    case ParamType::kBFloat16: return f(BF16{});
    case ParamType::kHalf: return f(F16{});
  }
}

template <typename F>
inline void with_bool(bool flag, F&& f) {
  if (flag) return f(std::true_type{});
  return f(std::false_type{});
}

template <typename F>
inline void with_grad_mode(GradMode mode, F&& f) {
  switch (mode) {
    case GradMode::kGradOnly: return f(std::integral_constant<GradMode, GradMode::kGradOnly>{});
    case GradMode::kGradAvg: return f(std::integral_constant<GradMode, GradMode::kGradAvg>{});
    case GradMode::kAvgOnly: return f(std::integral_constant<GradMode, GradMode::kAvgOnly>{});
  }
}

// Note [prior flags]: in the CPU kernels the prior precision (Note [per-element prior] in
// ivon_math.h) is a flag of the sample and accumulate because an instance without it must not
// read it: an absent input costs no load and no branch per element, and the loops stay
// vectorized (prec = prior_precision given; 3 sample and 6 accumulate instances per CPU build).
// The CPU update takes its three rare inputs (grad scale, prior precision, prior mean) in one
// flag (Note [rare inputs of an update] in cpu_kernels.h). The CUDA kernels test them at run
// time instead.

// sample: f(param_type, prec)
template <typename F>
inline void dispatch_sample(const OpArgs& a, F&& f) {
  with_param_type(a.ptype, [&](auto pt) {
    with_bool(a.prior_precision != nullptr, [&](auto prec) { f(pt, prec); });
  });
}

// Note [CUDA dispatch]: the CUDA kernels take fewer template flags than the CPU ones (Note [CUDA
// run-time flags] in cuda_kernels.cuh), so each op has a CUDA dispatcher with the CUDA kernels'
// flags, and the CPU dispatcher is built on it, adding its own: the two agree on every flag they
// share. The CUDA update's param type is picked outside (one translation unit per type).

// accumulate (CUDA): f(param_type, price, first)
template <typename F>
inline void dispatch_accumulate_cuda(const OpArgs& a, F&& f) {
  with_param_type(a.ptype, [&](auto pt) {
    with_bool(a.price, [&](auto price) {
      with_bool(a.first, [&](auto first) { f(pt, price, first); });
    });
  });
}

// accumulate: f(param_type, price, first, prec); gradsq's hess term has no noise, so it never
// reads the prior precision and gets no instance with it
template <typename F>
inline void dispatch_accumulate(const OpArgs& a, F&& f) {
  dispatch_accumulate_cuda(a, [&](auto pt, auto price, auto first) {
    if constexpr (decltype(price)::value) {
      with_bool(a.prior_precision != nullptr, [&](auto prec) { f(pt, price, first, prec); });
    } else {
      f(pt, price, first, std::false_type{});
    }
  });
}

// update (CUDA): f(price, grad_mode, next) where next = a next sample is written
template <typename F>
inline void dispatch_update_cuda(const OpArgs& a, F&& f) {
  with_bool(a.price, [&](auto price) {
    with_grad_mode(a.mode, [&](auto mode) {
      with_bool(a.has_next_draw, [&](auto next) { f(price, mode, next); });
    });
  });
}

// update: f(param_type, price, grad_mode, next, rare) where rare = a grad_scale, a
// prior_precision or a prior_mean is given (Note [prior flags]; the other device scalars are
// read once per launch and need no instance of their own)
template <typename F>
inline void dispatch_update(const OpArgs& a, F&& f) {
  const bool rare =
      a.grad_scale != nullptr || a.prior_precision != nullptr || a.prior_mean != nullptr;
  with_param_type(a.ptype, [&](auto pt) {
    dispatch_update_cuda(a, [&](auto price, auto mode, auto next) {
      with_bool(rare, [&](auto rare_inputs) { f(pt, price, mode, next, rare_inputs); });
    });
  });
}

}  // namespace IVON_MATH_NS
}  // namespace ivon_fast
