// ops.cpp: the torch ops ivon_fast::sample / accumulate / update (schemas, input validation,
// host-side scalar preparation) and their CPU and CUDA registrations. The kernels themselves see
// only the plain OpArgs of kernel_args.h.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>

#include "kernel_args.h"

#ifdef IVON_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace ivon_fast {
namespace {

// Note [uint64 seeds and draws]: seeds and draw numbers are uint64 (evaluation draws have bit 63
// set), but the schema type `int` is int64. The Python wrapper passes the same 64 bits as a
// signed value and the kernels reinterpret them, so no value is lost.
uint64_t as_u64(int64_t v) { return static_cast<uint64_t>(v); }

ParamType param_type(const at::Tensor& param) {
  switch (param.scalar_type()) {
    case at::kFloat: return ParamType::kFloat;
    case at::kBFloat16: return ParamType::kBFloat16;
    case at::kHalf: return ParamType::kHalf;
    default:
      TORCH_CHECK(false, "ivon_fast: param must be float32, bfloat16 or float16, got ",
                  param.scalar_type());
  }
}

// Every tensor of a call: same device as `like`, same number of elements, contiguous, and the
// expected dtype (the param dtype for param / grad, float32 for the state).
void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name,
                  at::ScalarType dtype) {
  TORCH_CHECK(t.defined(), "ivon_fast: ", name, " is undefined");
  TORCH_CHECK(t.device() == like.device(), "ivon_fast: ", name, " is on ", t.device(), " but ",
              like_name, " is on ", like.device());
  TORCH_CHECK(t.numel() == like.numel(), "ivon_fast: ", name, " has ", t.numel(),
              " elements but ", like_name, " has ", like.numel());
  TORCH_CHECK(t.is_contiguous(), "ivon_fast: ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == dtype, "ivon_fast: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
}

void check_common(const at::Tensor& param, int64_t offset) {
  TORCH_CHECK(param.device().is_cpu() || param.device().is_cuda(),
              "ivon_fast: tensors must be on cpu or cuda, got ", param.device());
  TORCH_CHECK(param.is_contiguous(), "ivon_fast: param must be contiguous");
  TORCH_CHECK(offset >= 0, "ivon_fast: offset must be >= 0, got ", offset);
  TORCH_CHECK(offset <= INT64_MAX - param.numel(), "ivon_fast: offset + numel overflows int64");
}

bool parse_hess_approx(c10::string_view hess_approx) {
  if (hess_approx == "price") return true;
  if (hess_approx == "gradsq") return false;
  TORCH_CHECK(false, "ivon_fast: hess_approx must be 'price' or 'gradsq', got '",
              std::string(hess_approx.data(), hess_approx.size()), "'");
}

float* f32(const at::Tensor& t) { return t.data_ptr<float>(); }

// A momentum or hess tensor: float32, or bfloat16 (IVON's state_dtype; Note [bf16 state] in
// ivon_math.h). Returns whether it is bf16; `bf16_like` (an update's momentum) fixes the dtype
// the hess must have too.
bool check_state(const at::Tensor& t, const char* name, const at::Tensor& like,
                 const char* like_name, const at::Tensor* same_dtype_as = nullptr) {
  TORCH_CHECK(t.defined(), "ivon_fast: ", name, " is undefined");
  const at::ScalarType dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "ivon_fast: ", name,
              " must be float32 or bfloat16 (the state dtype), got ", dtype);
  if (same_dtype_as != nullptr) {
    TORCH_CHECK(dtype == same_dtype_as->scalar_type(), "ivon_fast: momentum and hess must have "
                "the same dtype, got ", same_dtype_as->scalar_type(), " and ", dtype);
  }
  check_tensor(t, name, like, like_name, dtype);
  return dtype == at::kBFloat16;
}

// An optional device scalar of update (Note [device scalars of an update] in ivon_math.h): one
// float32 element on the params' device, or absent (nullptr). Only its pointer is taken; the
// kernel reads the value, so the host never synchronizes with the device here.
const float* device_scalar(const std::optional<at::Tensor>& t, const char* name,
                           const at::Tensor& param) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->numel() == 1, "ivon_fast: ", name, " must be a tensor of 1 element, got ",
              t->numel(), " elements");
  TORCH_CHECK(t->scalar_type() == at::kFloat, "ivon_fast: ", name, " must be float32, got ",
              t->scalar_type());
  TORCH_CHECK(t->device() == param.device(), "ivon_fast: ", name,
              " must be on the params' device ", param.device(), ", got ", t->device());
  return t->data_ptr<float>();
}

// The optional device draws of an op (capturable steps): `count` int64 elements on the params'
// device (1 for sample / accumulate: the draw; 2 for update: draw, next_draw), holding the uint64
// draw numbers' bits. Only the pointer is taken; the kernels read the values.
const int64_t* device_draws_of(const std::optional<at::Tensor>& t, int64_t count,
                               const at::Tensor& param) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->numel() == count, "ivon_fast: device_draws must be a tensor of ", count,
              " element(s), got ", t->numel(), " elements");
  TORCH_CHECK(t->scalar_type() == at::kLong, "ivon_fast: device_draws must be int64, got ",
              t->scalar_type());
  TORCH_CHECK(t->is_contiguous(), "ivon_fast: device_draws must be contiguous");
  TORCH_CHECK(t->device() == param.device(), "ivon_fast: device_draws must be on the params' "
              "device ", param.device(), ", got ", t->device());
  return t->data_ptr<int64_t>();
}

// An optional per-element prior input (Note [per-element prior] in ivon_math.h): a state tensor
// of the segment (float32, the segment's length, contiguous, on the params' device), or absent
// (nullptr: the kernel instance that runs then never reads it).
const float* prior_input(const std::optional<at::Tensor>& t, const char* name,
                         const at::Tensor& like, const char* like_name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  check_tensor(*t, name, like, like_name, at::kFloat);
  return t->data_ptr<float>();
}

// What every op shares: the segment (its length, dtype and global offset), the noise key and
// draw, and the two hyperparameters of the noise scale.
OpArgs segment_args(const at::Tensor& lead, int64_t offset, int64_t seed, int64_t draw,
                    double ess, double weight_decay) {
  check_common(lead, offset);
  OpArgs a;
  a.ptype = param_type(lead);
  a.n = lead.numel();
  a.offset = offset;
  a.seed = as_u64(seed);
  a.draw = as_u64(draw);
  a.s.ess = static_cast<float>(ess);
  a.s.wd = static_cast<float>(weight_decay);
  return a;
}

enum class Op { kSample, kAccumulate, kUpdate };

#if defined(IVON_WITH_CUDA) || defined(IVON_CUDA_ON_CPU)
void launch_cuda(Op op, const OpArgs& a, void* stream) {
  const char* err = op == Op::kSample       ? cuda_sample(a, stream)
                    : op == Op::kAccumulate ? cuda_accumulate(a, stream)
                                            : cuda_update(a, stream);
  TORCH_CHECK(err == nullptr, "ivon_fast: CUDA kernel launch failed: ", err);
}
#endif

void launch(Op op, const OpArgs& a, const at::Tensor& param) {
  if (a.n == 0) return;
#if defined(IVON_CUDA_ON_CPU)
  // the test build (Note [the CUDA source on the CPU] in cuda_on_cpu.h): CPU tensors go to the
  // CUDA kernels, compiled as host code; there is no stream
  (void)param;
  launch_cuda(op, a, nullptr);
#else
  if (param.is_cuda()) {
#ifdef IVON_WITH_CUDA
    c10::cuda::CUDAGuard guard(param.device());
    launch_cuda(op, a, c10::cuda::getCurrentCUDAStream(param.device().index()).stream());
#else
    TORCH_CHECK(false, "ivon_fast: the extension was built without CUDA");
#endif
    return;
  }
  switch (op) {
    case Op::kSample: return cpu_sample(a);
    case Op::kAccumulate: return cpu_accumulate(a);
    case Op::kUpdate: return cpu_update(a);
  }
#endif
}

void sample(const at::Tensor& param, const at::Tensor& mean, const at::Tensor& hess, int64_t seed,
            int64_t draw, int64_t offset, double ess, double weight_decay,
            const std::optional<at::Tensor>& device_draws,
            const std::optional<at::Tensor>& prior_precision) {
  OpArgs a = segment_args(param, offset, seed, draw, ess, weight_decay);
  a.device_draws = device_draws_of(device_draws, 1, param);
  check_tensor(mean, "mean", param, "param", at::kFloat);
  a.bf16_state = check_state(hess, "hess", param, "param");
  a.prior_precision = prior_input(prior_precision, "prior_precision", param, "param");
  a.param = param.data_ptr();
  a.mean = f32(mean);
  a.hess = hess.data_ptr();
  launch(Op::kSample, a, param);
}

void accumulate(const at::Tensor& grad, const at::Tensor& hess, const at::Tensor& avg_grad,
                const at::Tensor& avg_hess_term, int64_t seed, int64_t draw, int64_t offset,
                int64_t count, double ess, double weight_decay, c10::string_view hess_approx,
                const std::optional<at::Tensor>& device_draws,
                const std::optional<at::Tensor>& prior_precision) {
  OpArgs a = segment_args(grad, offset, seed, draw, ess, weight_decay);
  a.device_draws = device_draws_of(device_draws, 1, grad);
  a.bf16_state = check_state(hess, "hess", grad, "grad");
  check_tensor(avg_grad, "avg_grad", grad, "grad", at::kFloat);
  check_tensor(avg_hess_term, "avg_hess_term", grad, "grad", at::kFloat);
  // checked for 'gradsq' too, whose kernels do not read it (no noise in its hess term)
  a.prior_precision = prior_input(prior_precision, "prior_precision", grad, "grad");
  TORCH_CHECK(count >= 1, "ivon_fast: count must be >= 1, got ", count);
  a.price = parse_hess_approx(hess_approx);
  a.first = count == 1;
  a.grad = grad.data_ptr();
  a.hess = hess.data_ptr();
  a.avg_grad = f32(avg_grad);
  a.avg_hess_term = f32(avg_hess_term);
  a.s.count = static_cast<float>(count);
  launch(Op::kAccumulate, a, grad);
}

void update(const at::Tensor& param, const std::optional<at::Tensor>& grad,
            const at::Tensor& mean, const at::Tensor& momentum, const at::Tensor& hess,
            const std::optional<at::Tensor>& avg_grad,
            const std::optional<at::Tensor>& avg_hess_term, int64_t seed, int64_t draw,
            std::optional<int64_t> next_draw, int64_t offset, int64_t count,
            c10::string_view hess_approx, double lr, double ess, double weight_decay,
            double beta1, double one_minus_beta1, double beta2, double one_minus_beta2,
            double hess_coef, double clip_radius, double debias,
            const std::optional<at::Tensor>& grad_scale,
            const std::optional<at::Tensor>& found_inf,
            const std::optional<at::Tensor>& device_lr,
            const std::optional<at::Tensor>& device_debias,
            const std::optional<at::Tensor>& device_draws,
            const std::optional<at::Tensor>& prior_mean,
            const std::optional<at::Tensor>& prior_precision, int64_t round_draw) {
  OpArgs a = segment_args(param, offset, seed, draw, ess, weight_decay);
  a.device_draws = device_draws_of(device_draws, 2, param);
  check_tensor(mean, "mean", param, "param", at::kFloat);
  a.bf16_state = check_state(momentum, "momentum", param, "param");
  check_state(hess, "hess", param, "param", &momentum);
  // the rounding draw of bf16 state (docs/DESIGN.md section 16); ignored for float32 state
  a.round_draw = kRoundDrawBase + as_u64(round_draw);
  a.prior_mean = prior_input(prior_mean, "prior_mean", param, "param");
  a.prior_precision = prior_input(prior_precision, "prior_precision", param, "param");
  TORCH_CHECK(count >= 1, "ivon_fast: count must be >= 1, got ", count);
  const bool has_grad = grad.has_value() && grad->defined();
  a.mode = !has_grad ? GradMode::kAvgOnly : count == 1 ? GradMode::kGradOnly : GradMode::kGradAvg;
  if (has_grad) {
    check_tensor(*grad, "grad", param, "param", param.scalar_type());
    a.grad = grad->data_ptr();
  }
  if (a.mode != GradMode::kGradOnly) {
    const char* why = has_grad ? " (count > 1 folds grad into the averages)"
                               : " (grad=None: the averages hold all samples)";
    TORCH_CHECK(avg_grad.has_value() && avg_grad->defined(), "ivon_fast: avg_grad is required",
                why);
    TORCH_CHECK(avg_hess_term.has_value() && avg_hess_term->defined(),
                "ivon_fast: avg_hess_term is required", why);
    check_tensor(*avg_grad, "avg_grad", param, "param", at::kFloat);
    check_tensor(*avg_hess_term, "avg_hess_term", param, "param", at::kFloat);
    a.avg_grad = f32(*avg_grad);
    a.avg_hess_term = f32(*avg_hess_term);
  }
  a.price = parse_hess_approx(hess_approx);
  a.has_next_draw = next_draw.has_value();
  a.next_draw = as_u64(next_draw.value_or(0));
  a.param = param.data_ptr();
  a.mean = f32(mean);
  a.momentum = momentum.data_ptr();
  a.hess = hess.data_ptr();
  // the combinations arrive formed in double by ivon_fast/scalars.py (as ivon-opt's Python forms
  // them), so every backend rounds the same doubles; each is rounded to float once, here
  a.s.beta1 = static_cast<float>(beta1);
  a.s.one_minus_beta1 = static_cast<float>(one_minus_beta1);
  a.s.beta2 = static_cast<float>(beta2);
  a.s.one_minus_beta2 = static_cast<float>(one_minus_beta2);
  a.s.hess_coef = static_cast<float>(hess_coef);
  a.s.lr = static_cast<float>(lr);
  a.s.debias = static_cast<float>(debias);
  a.s.clip = static_cast<float>(clip_radius);
  a.s.count = static_cast<float>(count);
  a.grad_scale = device_scalar(grad_scale, "grad_scale", param);
  a.found_inf = device_scalar(found_inf, "found_inf", param);
  a.device_lr = device_scalar(device_lr, "device_lr", param);
  a.device_debias = device_scalar(device_debias, "device_debias", param);
  launch(Op::kUpdate, a, param);
}

std::string cpu_isa() { return cpu_isa_name(); }
bool set_cpu_isa(c10::string_view name) {
  return cpu_set_isa(std::string(name.data(), name.size()).c_str());
}
bool built_with_cuda() {
#ifdef IVON_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

// The ops' library: torch.ops.ivon_fast. The test build of the CUDA source on the CPU compiles
// this file with IVON_OPS_LIBRARY=ivon_fast_cuda_on_cpu, so both can live in one process and its
// ops get their OpArgs from the code above, the same as the extension's.
#ifndef IVON_OPS_LIBRARY
#define IVON_OPS_LIBRARY ivon_fast
#endif
// (one more macro level, so that IVON_OPS_LIBRARY is expanded before TORCH_LIBRARY pastes it)
#define IVON_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define IVON_TORCH_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

IVON_TORCH_LIBRARY(IVON_OPS_LIBRARY, m) {
  m.def(
      "sample(Tensor(a!) param, Tensor mean, Tensor hess, *, int seed, int draw, int offset, "
      "float ess, float weight_decay, Tensor? device_draws=None, "
      "Tensor? prior_precision=None) -> ()");
  m.def(
      "accumulate(Tensor grad, Tensor hess, Tensor(a!) avg_grad, Tensor(b!) avg_hess_term, *, "
      "int seed, int draw, int offset, int count, float ess, float weight_decay, "
      "str hess_approx, Tensor? device_draws=None, Tensor? prior_precision=None) -> ()");
  m.def(
      "update(Tensor(a!) param, Tensor? grad, Tensor(b!) mean, Tensor(c!) momentum, "
      "Tensor(d!) hess, Tensor? avg_grad, Tensor? avg_hess_term, *, int seed, int draw, "
      "int? next_draw, int offset, int count, str hess_approx, float lr, float ess, "
      "float weight_decay, float beta1, float one_minus_beta1, float beta2, "
      "float one_minus_beta2, float hess_coef, float clip_radius, float debias, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? device_lr=None, "
      "Tensor? device_debias=None, Tensor? device_draws=None, Tensor? prior_mean=None, "
      "Tensor? prior_precision=None, int round_draw=0) -> ()");
  // introspection (no tensor arguments: catch-all kernels)
  m.def("_cpu_isa", &cpu_isa);
  m.def("_set_cpu_isa", &set_cpu_isa);
  m.def("_built_with_cuda", &built_with_cuda);
}

IVON_TORCH_LIBRARY_IMPL(IVON_OPS_LIBRARY, CPU, m) {
  m.impl("sample", &sample);
  m.impl("accumulate", &accumulate);
  m.impl("update", &update);
}

#ifdef IVON_WITH_CUDA
IVON_TORCH_LIBRARY_IMPL(IVON_OPS_LIBRARY, CUDA, m) {
  m.impl("sample", &sample);
  m.impl("accumulate", &accumulate);
  m.impl("update", &update);
}
#endif

}  // namespace ivon_fast

// The Python module ivon_fast._C: importing it runs the registrations above.
static struct PyModuleDef ivon_fast_module = {
    PyModuleDef_HEAD_INIT, "_C", "ivon_fast compiled ops, registered as torch.ops.ivon_fast.*",
    -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&ivon_fast_module); }
