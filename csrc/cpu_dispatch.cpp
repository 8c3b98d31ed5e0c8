// cpu_dispatch.cpp: runs a CPU kernel over a segment: picks the instruction-set build once (at run
// time, from what the CPU supports) and splits the segment's quads over threads.
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "cpu_isa_table.h"
#include "kernel_args.h"

namespace ivon_fast {
namespace {

const CpuIsaTable* best_isa() {
#if IVON_HAVE_X86_ISAS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
    return &cpu_isa_avx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &cpu_isa_avx2;
#endif
  return &cpu_isa_generic;
}

// The selectable builds, best first; a name is usable when it is the best one or below it.
const CpuIsaTable* const kIsas[] = {
#if IVON_HAVE_X86_ISAS
    &cpu_isa_avx512, &cpu_isa_avx2,
#endif
    &cpu_isa_generic};

std::atomic<const CpuIsaTable*> g_isa{nullptr};

const CpuIsaTable* isa() {
  const CpuIsaTable* t = g_isa.load(std::memory_order_acquire);
  if (t == nullptr) {
    t = best_isa();
    // IVON_FAST_CPU_ISA=avx2|generic forces a lower build (for tests and comparisons)
    if (const char* env = std::getenv("IVON_FAST_CPU_ISA")) {
      if (*env != '\0' && cpu_set_isa(env)) return g_isa.load(std::memory_order_acquire);
    }
    g_isa.store(t, std::memory_order_release);
  }
  return t;
}

// Note [thread split over quads]: threads get whole quads (never split a Philox call) and at
// least kGrainQuads of them, so small segments run inline without waking the pool.
constexpr int64_t kGrainQuads = 8192;

void run(const OpArgs& a, CpuRangeFn CpuIsaTable::*which) {
  if (a.n == 0) return;
  const int64_t q_begin = a.offset >> 2;
  const int64_t q_end = ((a.offset + a.n - 1) >> 2) + 1;
  const CpuRangeFn fn = isa()->*which;
  at::parallel_for(q_begin, q_end, kGrainQuads, [&](int64_t b, int64_t e) { fn(a, b, e); });
}

}  // namespace

const char* cpu_isa_name() { return isa()->name; }

bool cpu_set_isa(const char* name) {
  const CpuIsaTable* best = best_isa();
  if (name == nullptr || *name == '\0') {
    g_isa.store(best, std::memory_order_release);
    return true;
  }
  bool usable = false;
  for (const CpuIsaTable* t : kIsas) {
    usable = usable || t == best;
    if (usable && std::strcmp(t->name, name) == 0) {
      g_isa.store(t, std::memory_order_release);
      return true;
    }
  }
  return false;
}

void cpu_sample(const OpArgs& a) { run(a, &CpuIsaTable::sample); }
void cpu_accumulate(const OpArgs& a) { run(a, &CpuIsaTable::accumulate); }
void cpu_update(const OpArgs& a) { run(a, &CpuIsaTable::update); }

}  // namespace ivon_fast
