// cuda_on_cpu.cpp: the bookkeeping of the CPU run of the CUDA source (Note [the CUDA source on
// the CPU] in cuda_on_cpu.h) and its knobs for the tests, as extern "C" functions that
// tests/cuda_on_cpu_backend.py calls through ctypes. Part of the test build only
// (tests/cuda_on_cpu_build.py), never of the extension.
#include "cuda_on_cpu.h"

#include <cstdint>
#include <map>
#include <set>
#include <string>

#include "kernel_args.h"

namespace ivon_fast {
namespace cuda_on_cpu {
namespace {

// instance name -> launches (run, or in dry-run mode: could be launched)
std::map<std::string, long long> ran, reachable;
// "family<TAB>path<TAB>grid shape" of the launches run (describe_launch), and "instance<TAB>
// path<TAB>grid shape" of the last one
std::set<std::string> shapes;
std::string last;

// "... [with auto Kernel = ivon_fast::{anonymous}::update_kernel<float, ...>]" ->
// "update_kernel<float, ...>"
std::string short_name(const char* pretty) {
  std::string name = pretty;
  const std::string marker = "Kernel = ";
  const size_t start = name.find(marker);
  if (start != std::string::npos) name = name.substr(start + marker.size());
  if (!name.empty() && name.back() == ']') name.pop_back();
  const size_t scope = name.rfind("::", name.find('<'));
  return scope == std::string::npos ? name : name.substr(scope + 2);
}

std::string joined(const std::map<std::string, long long>& counts) {
  std::string out;
  for (const auto& [name, count] : counts) out += std::to_string(count) + "\t" + name + "\n";
  return out;
}

}  // namespace

void record_launch(const char* instance, const char* described) {
  const std::string name = short_name(instance);
  ++(dry_run ? reachable : ran)[name];
  if (dry_run) return;
  shapes.insert(name.substr(0, name.find('<')) + "\t" + described);
  last = name + "\t" + described;
}

const char* describe_shape(bool vector, int64_t quads, unsigned int grid, unsigned int block) {
  static const char* const kNames[2][3] = {
      {"scalar\tone block", "scalar\tmany blocks", "scalar\twraps"},
      {"vector\tone block", "vector\tmany blocks", "vector\twraps"}};
  const int shape = quads > int64_t(grid) * block ? 2 : grid == 1 ? 0 : 1;
  return kNames[vector ? 1 : 0][shape];
}

}  // namespace cuda_on_cpu

// ops.cpp's introspection of the CPU kernels, which this build does not have
const char* cpu_isa_name() { return "none (the CUDA source on the CPU)"; }
bool cpu_set_isa(const char*) { return false; }

}  // namespace ivon_fast

namespace {

using namespace ivon_fast;

// A dry launch of every op for one combination of the OpArgs inputs the dispatchers read.
void dry_launches(ParamType ptype, unsigned flags, GradMode mode) {
  alignas(16) static float data[4] = {0, 0, 0, 0};
  static const int64_t draws[2] = {0, 0};
  auto given = [&](int bit) { return (flags >> bit) & 1u; };
  OpArgs a;
  a.ptype = ptype;
  a.n = 4;
  a.mode = mode;
  a.bf16_state = given(0), a.price = given(1), a.first = given(2), a.has_next_draw = given(3);
  a.param = data, a.grad = data, a.mean = data, a.momentum = data, a.hess = data;
  a.avg_grad = data, a.avg_hess_term = data;
  a.grad_scale = given(4) ? data : nullptr;
  a.found_inf = given(5) ? data : nullptr;
  a.device_lr = given(6) ? data : nullptr;
  a.device_debias = given(7) ? data : nullptr;
  a.device_draws = given(8) ? draws : nullptr;
  a.prior_precision = given(9) ? data : nullptr;
  a.prior_mean = given(10) ? data : nullptr;
  cuda_sample(a, nullptr);
  cuda_accumulate(a, nullptr);
  cuda_update(a, nullptr);
}

}  // namespace

extern "C" {

// The SM count of the emulated GPU from now on (>= 1): the grid the next launches get
void ivon_cuda_on_cpu_set_sm_count(int count) {
  using namespace ivon_fast::cuda_on_cpu;
  for (int d = 0; d < num_devices; ++d) {
    if (sm_counts[d] == count) {
      current_device = d;
      return;
    }
  }
  if (num_devices == kMaxDevices) return;  // the tests choose a handful
  sm_counts[num_devices] = count;
  current_device = num_devices++;
}

// Every kernel instance the dispatchers can launch, one "count<TAB>name" line each: every op
// launched dry for every combination of the inputs the dispatchers read (the param type, the
// grad mode, every flag and every optional pointer of OpArgs), so the list is the dispatchers'
// own, not one written by hand
const char* ivon_cuda_on_cpu_reachable() {
  using namespace ivon_fast::cuda_on_cpu;
  static std::string out;
  reachable.clear();
  dry_run = true;
  for (ParamType ptype : {ParamType::kFloat, ParamType::kBFloat16, ParamType::kHalf})
    for (GradMode mode : {GradMode::kGradOnly, GradMode::kGradAvg, GradMode::kAvgOnly})
      for (unsigned flags = 0; flags < (1u << 11); ++flags) dry_launches(ptype, flags, mode);
  dry_run = false;
  out = joined(reachable);
  return out.c_str();
}

// The instances run so far, one "count<TAB>name" line each
const char* ivon_cuda_on_cpu_ran() {
  static std::string out;
  out = ivon_fast::cuda_on_cpu::joined(ivon_fast::cuda_on_cpu::ran);
  return out.c_str();
}

// The launch shapes run so far, one "family<TAB>vector or scalar<TAB>grid shape" line each
const char* ivon_cuda_on_cpu_shapes() {
  static std::string out;
  out.clear();
  for (const auto& line : ivon_fast::cuda_on_cpu::shapes) out += line + "\n";
  return out.c_str();
}

// The last launch run: "instance<TAB>vector or scalar<TAB>grid shape"
const char* ivon_cuda_on_cpu_last_launch() { return ivon_fast::cuda_on_cpu::last.c_str(); }

// Probes of the sanitizers themselves (tests/test_cuda_on_cpu.py): a read of p[i], and a
// float4 load at p, as the kernels' vector path makes it
float ivon_cuda_on_cpu_probe_read(const float* p, int64_t i) { return p[i]; }

float ivon_cuda_on_cpu_probe_float4(const float* p) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  return v.x + v.y + v.z + v.w;
}

}  // extern "C"
