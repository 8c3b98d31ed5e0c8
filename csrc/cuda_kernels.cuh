// cuda_kernels.cuh: the CUDA kernels, included by the CUDA translation units (cuda_ops.cu: sample,
// accumulate and the update's dispatch; cuda_update_<param type>.cu: the update's instances for
// one param type each, so that a MAX_JOBS build compiles them in parallel). One thread handles
// one quad (the four elements that share a Philox call, docs/DESIGN.md section 3) per iteration
// of a grid-stride loop; the math is the shared scalar code of ivon_math.h, so the CPU tests
// exercise it.
//
// Note [vector loads]: a quad is one 16-byte load / store of float arrays (8 bytes for bf16 /
// fp16 params and grads, and for bf16 state) when every pointer is aligned so that the quad's
// elements share one such word: element k of the segment (global index offset + k) must sit
// (offset + k) % 4 elements past an aligned word. A segment at a quad boundary (offset % 4 == 0)
// with aligned buffers has it, and the optimizer's buckets give it to every segment (Note [quads
// in the buffers] in ivon_fast/_bucket.py). The quads entirely inside the segment then run
// in the vector loop, without bounds checks; the partial first and last quads (at most one each),
// and every quad of a segment whose pointers do not line up, run in a second loop with
// bounds-checked scalar accesses (Note [the quads of a launch]). The results are identical.
//
// Note [CUDA run-time flags]: the template flags of a kernel are those whose code the SASS
// count shows to be worth an instance of its own (bench/results/cuda_diet_2026-12-07.md): the
// param type, and for the update 'price' and the GradMode (as run-time flags each would cost 3
// to 6 instructions per element) and the next sample (which tells the drop-in loop's update from
// the official loop's: each loop's hot path is an instance of its own, measured and gated as it
// runs; as a run-time flag it would cost 0.25 to 1 instruction per element and save 18 of the
// 36 update instances); for accumulate 'price' and the first sample. The rare features are
// uniform run-time flags, the same for every thread of a launch, so their branches never diverge
// and cost a few instructions per quad: the prior precision and prior mean (Note [per-element
// prior] in ivon_math.h), the grad scale and bf16 state (Note [loop variants]), a debias
// factor of exactly 1 (Note [debias of one]), the clip (Note [clip of inf]) and a skipped step.
// The CPU kernels keep all of them as template flags (dispatch_flags.h), which keeps their loops
// vectorized; the CUDA dispatch passes only the CUDA kernels' flags.
#pragma once

#if defined(IVON_CUDA_ON_CPU)
#include "cuda_on_cpu.h"  // the CPU run of this file (Note [the CUDA source on the CPU])
#else
#include <cuda_runtime.h>
// Note [launches]: every launch goes through IVON_LAUNCH so the CPU run can replace the
// <<< >>> syntax; the kernel comes last because its template arguments hold commas
#define IVON_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<grid, block, 0, stream>>>
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>

#define IVON_MATH_NS cuda_math
#include "dispatch_flags.h"
#include "ivon_math.h"
#include "kernel_args.h"

namespace ivon_fast {

// The update of one param type (cuda_update_<type>.cu each); cuda_update picks one.
const char* cuda_update_of(float, const OpArgs& a, void* stream);
const char* cuda_update_of(cuda_math::BF16, const OpArgs& a, void* stream);
const char* cuda_update_of(cuda_math::F16, const OpArgs& a, void* stream);

namespace {

using namespace cuda_math;

constexpr int kThreads = 256;

// Note [loop variants]: each kernel holds its loop of aligned quads three times: kAny for
// launches with any of the rare inputs (a prior input, a grad scale), which tests them and the
// state's type per quad, and kFloatState / kBf16State for launches without them, where they cost
// nothing; the state's type and the absence of the rare inputs are decided once per thread (a
// uniform branch: it never diverges). One loop that served every launch would cost all of them:
// the compiler predicates short branches instead of jumping over them, so the bf16 state loads
// are issued, predicated off, beside the float32 ones (14 instructions per quad), and the
// prior inputs' likewise. The bounds-checked loop has one variant, kAny.
enum class Loop { kAny, kFloatState, kBf16State };

// Note [the quads of a launch]: the host splits a segment's quads into those of the vector
// loop, vec_lo + [0, vec_n), and the rest, handled by bounds-checked scalar accesses: the first
// n_head of them from head on, the others from tail on. With aligned pointers that is at most the
// partial first quad and the partial last one; otherwise every quad (vec_n = 0).
struct Quads {
  int64_t vec_lo, vec_n;
  int64_t head, n_head, tail, n_scalar;
};

// What a kernel gets: the op's arguments, the same with every array moved to the launch's first
// vector quad (Note [32-bit indices in the vector loop]), the seed's Philox key schedule (formed
// once on the host, Note [Philox key schedule] in ivon_math.h) and the quads.
struct Launch {
  OpArgs a, vec;
  PhiloxKeys key;
  Quads quads;
};

// ---- four-element loads and stores: VEC one aligned access (Note [vector loads]), else one
// bounds-checked access per element (the four local indices k0 .. k0 + 3 may leave [0, n)) ----

__device__ __forceinline__ bool inside(int64_t k, int64_t n) { return k >= 0 && k < n; }

template <bool VEC>
__device__ __forceinline__ void load4(const float* p, int64_t k0, int64_t n, float v[4]) {
  if (VEC) {
    const float4 t = *reinterpret_cast<const float4*>(p + k0);
    v[0] = t.x, v[1] = t.y, v[2] = t.z, v[3] = t.w;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = inside(k0 + j, n) ? p[k0 + j] : 0.0f;
  }
}

template <bool VEC>
__device__ __forceinline__ void store4(float* p, int64_t k0, int64_t n, const float v[4]) {
  if (VEC) {
    *reinterpret_cast<float4*>(p + k0) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (inside(k0 + j, n)) p[k0 + j] = v[j];
  }
}

// four 16-bit words: one 8-byte access
template <bool VEC>
__device__ __forceinline__ void load_bits4(const uint16_t* p, int64_t k0, int64_t n,
                                           uint16_t b[4]) {
  if (VEC) {
    const uint2 t = *reinterpret_cast<const uint2*>(p + k0);
    b[0] = uint16_t(t.x), b[1] = uint16_t(t.x >> 16), b[2] = uint16_t(t.y);
    b[3] = uint16_t(t.y >> 16);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) b[j] = inside(k0 + j, n) ? p[k0 + j] : uint16_t(0);
  }
}

template <bool VEC>
__device__ __forceinline__ void store_bits4(uint16_t* p, int64_t k0, int64_t n,
                                            const uint16_t b[4]) {
  if (VEC) {
    *reinterpret_cast<uint2*>(p + k0) = make_uint2(uint32_t(b[0]) | (uint32_t(b[1]) << 16),
                                                   uint32_t(b[2]) | (uint32_t(b[3]) << 16));
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (inside(k0 + j, n)) p[k0 + j] = b[j];
  }
}

template <bool VEC, typename H>  // BF16 or F16 params and grads
__device__ __forceinline__ void load4(const H* p, int64_t k0, int64_t n, float v[4]) {
  uint16_t b[4];
  load_bits4<VEC>(reinterpret_cast<const uint16_t*>(p), k0, n, b);
#pragma unroll
  for (int j = 0; j < 4; ++j) v[j] = to_float(H{b[j]});
}

template <bool VEC, typename H>
__device__ __forceinline__ void store4(H* p, int64_t k0, int64_t n, const float v[4]) {
  uint16_t b[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) b[j] = from_float<H>(v[j]).bits;
  store_bits4<VEC>(reinterpret_cast<uint16_t*>(p), k0, n, b);
}

// whether the loop variant L has bf16 state (kAny: the launch says)
template <Loop L>
__device__ __forceinline__ bool bf16_state(const OpArgs& a) {
  return L == Loop::kBf16State || (L == Loop::kAny && a.bf16_state);
}

// momentum / hess: float32 or bf16 state (Note [bf16 state] in ivon_math.h), a run-time flag
// (Note [CUDA run-time flags]) or the loop's (Note [loop variants])
template <bool VEC, Loop L = Loop::kAny>
__device__ __forceinline__ void load_state4(const OpArgs& a, const void* p, int64_t k0,
                                            float v[4]) {
  if (bf16_state<L>(a)) {
    load4<VEC>(static_cast<const BF16*>(p), k0, a.n, v);
  } else {
    load4<VEC>(static_cast<const float*>(p), k0, a.n, v);
  }
}

// bf16 state: four values stored by stochastic rounding with the 16-bit halves (`high` or low)
// of the quad's Philox words; each value is replaced by the stored one, widened
template <bool VEC>
__device__ __forceinline__ void store_rounded4(void* p, int64_t k0, int64_t n,
                                               const uint32_t words[4], bool high, float v[4]) {
  uint16_t b[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    b[j] = stochastic_round_bf16(v[j], high ? words[j] >> 16 : words[j] & 0xffffu);
    v[j] = bf16_bits_to_float(b[j]);
  }
  store_bits4<VEC>(static_cast<uint16_t*>(p), k0, n, b);
}

// The four elements' delta (Note [per-element prior] in ivon_math.h): the prior precision when
// the op got one, else the scalar weight decay.
template <bool VEC, Loop L = Loop::kAny>
__device__ __forceinline__ void load_delta(const OpArgs& a, int64_t k0, const Scalars& s,
                                           float d[4]) {
  if (L == Loop::kAny && a.prior_precision != nullptr) {
    load4<VEC>(a.prior_precision, k0, a.n, d);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) d[j] = s.wd;
  }
}

__device__ __forceinline__ void normals(const PhiloxKeys& key, uint64_t draw, int64_t q,
                                        float e[4]) {
  const F32x4 n = normals4(key, draw, uint64_t(q));
  e[0] = n.v0, e[1] = n.v1, e[2] = n.v2, e[3] = n.v3;
}

// ---- the loops over a launch's quads (Note [the quads of a launch]) ----

#define IVON_GRID_STRIDE(i, count)                                                  \
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (count);     \
       i += int64_t(gridDim.x) * blockDim.x)

// Note [32-bit indices in the vector loop]: the vector loop indexes its quads from the first one
// of the launch with 32-bit integers, and the arrays through pointers moved to that quad by the
// host (Launch::vec; moved in the kernel, the compiler folds the move back into every access),
// so an address is one 32 x 32 + 64-bit multiply-add (a 64-bit index costs two adds per array),
// and the loop's count one add and one compare. The host keeps a launch's vector quads below
// kMaxVectorQuads (launches a longer segment in parts), so 4 * i never wraps.
constexpr int64_t kMaxVectorQuads = int64_t(1) << 30;

// body(args, q, k0) for every quad q of the vector loop: args are the op's arguments moved to the
// launch's first vector quad, k0 the quad's first element's index there (Note [32-bit indices in
// the vector loop])
template <typename Body>
__device__ __forceinline__ void vector_loop(const Launch& l, Body&& body) {
  const uint32_t n = uint32_t(l.quads.vec_n), stride = gridDim.x * blockDim.x;
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    body(l.vec, l.quads.vec_lo + i, int64_t(4 * i));
  }
}

// vector_loop with body(loop, args, q, k0), `loop` the variant (Note [loop variants]) as a
// compile-time constant: kAny when the launch has a rare input (`rare`), else the one of its
// state's type; `reads_state` false: one variant (the kernel reads no state, and no rare input)
template <typename Body>
__device__ __forceinline__ void vector_loops(const Launch& l, bool reads_state, bool rare,
                                             Body&& body) {
  using Any = std::integral_constant<Loop, Loop::kAny>;
  using Float = std::integral_constant<Loop, Loop::kFloatState>;
  using Bf16 = std::integral_constant<Loop, Loop::kBf16State>;
  if (!reads_state || !(rare || l.a.bf16_state)) {
    vector_loop(l, [&](const OpArgs& a, int64_t q, int64_t k0) { body(Float{}, a, q, k0); });
  } else if (rare) {
    vector_loop(l, [&](const OpArgs& a, int64_t q, int64_t k0) { body(Any{}, a, q, k0); });
  } else {
    vector_loop(l, [&](const OpArgs& a, int64_t q, int64_t k0) { body(Bf16{}, a, q, k0); });
  }
}

// body(args, q, k0) for every quad of the bounds-checked loop (k0: the local index)
template <typename Body>
__device__ __forceinline__ void scalar_loop(const Launch& l, Body&& body) {
  const Quads& qs = l.quads;
  IVON_GRID_STRIDE(i, qs.n_scalar) {
    const int64_t q = i < qs.n_head ? qs.head + i : qs.tail + (i - qs.n_head);
    body(l.a, q, 4 * q - l.a.offset);
  }
}

// ---- sample and accumulate ----

template <typename PT, bool VEC, Loop L>
__device__ __forceinline__ void sample_quad(const Launch& l, const OpArgs& a, uint64_t draw,
                                            int64_t q, int64_t k0) {
  float m[4], h[4], dl[4], e[4], out[4];
  load4<VEC>(a.mean, k0, a.n, m);
  load_state4<VEC, L>(a, a.hess, k0, h);
  load_delta<VEC, L>(a, k0, a.s, dl);
  normals(l.key, draw, q, e);
#pragma unroll
  for (int j = 0; j < 4; ++j) out[j] = m[j] + noise_of(e[j], h[j], dl[j], a.s);
  store4<VEC>(static_cast<PT*>(a.param), k0, a.n, out);
}

template <typename PT>
__global__ void __launch_bounds__(kThreads) sample_kernel(const Launch l) {
  const uint64_t draw = read_draws(l.a).draw;  // once per thread
  const bool rare = l.a.prior_precision != nullptr;
  vector_loops(l, true, rare, [&](auto loop, const OpArgs& a, int64_t q, int64_t k0) {
    sample_quad<PT, true, decltype(loop)::value>(l, a, draw, q, k0);
  });
  scalar_loop(l, [&](const OpArgs& a, int64_t q, int64_t k0) {
    sample_quad<PT, false, Loop::kAny>(l, a, draw, q, k0);
  });
}

template <typename PT, bool PRICE, bool FIRST, bool VEC, Loop L>
__device__ __forceinline__ void accumulate_quad(const Launch& l, const OpArgs& a, uint64_t draw,
                                                int64_t q, int64_t k0) {
  float g[4], h[4], dl[4], e[4], ag[4] = {0, 0, 0, 0}, ah[4] = {0, 0, 0, 0};
  load4<VEC>(static_cast<const PT*>(a.grad), k0, a.n, g);
  if (PRICE) {
    load_state4<VEC, L>(a, a.hess, k0, h);
    load_delta<VEC, L>(a, k0, a.s, dl);
    normals(l.key, draw, q, e);
  }
  if (!FIRST) {
    load4<VEC>(a.avg_grad, k0, a.n, ag);
    load4<VEC>(a.avg_hess_term, k0, a.n, ah);
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float noise = PRICE ? noise_of(e[j], h[j], dl[j], a.s) : 0.0f;
    const float ht = hess_term_of<PRICE>(g[j], noise);
    ag[j] = running_mean<FIRST>(ag[j], g[j], a.s);
    ah[j] = running_mean<FIRST>(ah[j], ht, a.s);
  }
  store4<VEC>(a.avg_grad, k0, a.n, ag);
  store4<VEC>(a.avg_hess_term, k0, a.n, ah);
}

// 'gradsq' reads neither the hess nor the prior precision: one vector loop
template <typename PT, bool PRICE, bool FIRST>
__global__ void __launch_bounds__(kThreads) accumulate_kernel(const Launch l) {
  const uint64_t draw = read_draws(l.a).draw;  // once per thread
  const bool rare = l.a.prior_precision != nullptr;
  vector_loops(l, PRICE, rare, [&](auto loop, const OpArgs& a, int64_t q, int64_t k0) {
    accumulate_quad<PT, PRICE, FIRST, true, decltype(loop)::value>(l, a, draw, q, k0);
  });
  scalar_loop(l, [&](const OpArgs& a, int64_t q, int64_t k0) {
    accumulate_quad<PT, PRICE, FIRST, false, Loop::kAny>(l, a, draw, q, k0);
  });
}

// ---- update ----

// What every thread of an update reads once (Note [device scalars of an update] in ivon_math.h)
// and the run-time flags it tests (Note [CUDA run-time flags]); `rare`: a rare input (Note [loop
// variants]).
struct UpdateConsts {
  DeviceScalars d;
  Draws draws;
  bool scaled, debias_one, clips, rare;
};

__device__ __forceinline__ UpdateConsts update_consts(const OpArgs& a) {
  const DeviceScalars d = read_device_scalars(a);
  const bool scaled = a.grad_scale != nullptr;
  const bool rare = scaled || a.prior_precision != nullptr || a.prior_mean != nullptr;
  return {d, read_draws(a, /*stores_state=*/true), scaled, d.s.debias == 1.0f,
          !(d.s.clip == INFINITY), rare};
}

// One quad's update inputs: mean, hess (old), delta, momentum (old), the prior mean (0 when the
// op has none: mean - 0 is mean, bit for bit), the pending grad and its noise, the averages.
struct UpdateIn {
  float m[4], h[4], dl[4], mom[4], mu0[4], g[4], e[4], ag[4], ah[4];
};

template <typename PT, bool PRICE, GradMode MODE, bool VEC, Loop L>
__device__ __forceinline__ void load_update(const Launch& l, const OpArgs& a,
                                            const UpdateConsts& c, int64_t q, int64_t k0,
                                            UpdateIn& u) {
  load4<VEC>(a.mean, k0, a.n, u.m);
  load_state4<VEC, L>(a, a.hess, k0, u.h);
  load_delta<VEC, L>(a, k0, c.d.s, u.dl);
  load_state4<VEC, L>(a, a.momentum, k0, u.mom);
#pragma unroll
  for (int j = 0; j < 4; ++j) u.mu0[j] = u.g[j] = u.e[j] = u.ag[j] = u.ah[j] = 0.0f;
  if (L == Loop::kAny && a.prior_mean != nullptr) load4<VEC>(a.prior_mean, k0, a.n, u.mu0);
  if (MODE != GradMode::kAvgOnly) {
    load4<VEC>(static_cast<const PT*>(a.grad), k0, a.n, u.g);
    if (PRICE) normals(l.key, c.draws.draw, q, u.e);
  }
  if (MODE != GradMode::kGradOnly) {
    load4<VEC>(a.avg_grad, k0, a.n, u.ag);
    load4<VEC>(a.avg_hess_term, k0, a.n, u.ah);
  }
}

// The new momentum and hess of the quad, over the old ones in u (the shared math of ivon_math.h,
// the grad scale's divisions under a uniform flag)
template <bool PRICE, GradMode MODE, Loop L>
__device__ __forceinline__ void update_moments(const UpdateConsts& c, UpdateIn& u) {
  const Scalars& s = c.d.s;
  if (L == Loop::kAny && c.scaled) {
#pragma unroll
    for (int j = 0; j < 4; ++j) unscale_grads<PRICE, MODE>(u.g[j], u.ag[j], u.ah[j], s);
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    float gm, ht;
    grad_statistics<PRICE, MODE, false>(u.g[j], u.e[j], u.h[j], u.dl[j], u.ag[j], u.ah[j], s,
                                        gm, ht);
    new_moments<PRICE>(gm, ht, u.dl[j], u.mom[j], u.h[j], s);
  }
}

// The new mean of the quad, over the old one in u, from the new momentum (stored already: it is
// divided by the debias factor in place) and hess; the debias division and the clip under
// uniform flags (Note [debias of one], Note [clip of inf] in ivon_math.h)
template <Loop L>
__device__ __forceinline__ void update_mean(const UpdateConsts& c, UpdateIn& u) {
  const Scalars& s = c.d.s;
  if (!c.debias_one) {
#pragma unroll
    for (int j = 0; j < 4; ++j) u.mom[j] = debiased(u.mom[j], s);
  }
  float step[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    step[j] = preconditioned_step<L == Loop::kAny>(u.m[j], u.mom[j], u.h[j], u.dl[j], u.mu0[j],
                                                   s);
  }
  if (c.clips) {
#pragma unroll
    for (int j = 0; j < 4; ++j) step[j] = clipped(step[j], s);
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) u.m[j] = mean_after(u.m[j], step[j], s);
}

// momentum and hess stored: float32, or bf16 by stochastic rounding; `h_stored` gets the stored
// hess, widened (the next sample is drawn around it)
template <bool VEC, Loop L>
__device__ __forceinline__ void store_state(const Launch& l, const OpArgs& a,
                                            const UpdateConsts& c, int64_t q, int64_t k0,
                                            const UpdateIn& u, float h_stored[4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) h_stored[j] = u.h[j];
  if (bf16_state<L>(a)) {
    const uint64_t r = c.draws.round_draw;
    const U32x4 x = philox4x32_10(uint32_t(q), uint32_t(uint64_t(q) >> 32), uint32_t(r),
                                  uint32_t(r >> 32), l.key);
    const uint32_t words[4] = {x.x0, x.x1, x.x2, x.x3};
    float mom[4] = {u.mom[0], u.mom[1], u.mom[2], u.mom[3]};
    store_rounded4<VEC>(a.momentum, k0, a.n, words, /*high=*/false, mom);
    store_rounded4<VEC>(a.hess, k0, a.n, words, /*high=*/true, h_stored);
  } else {
    store4<VEC>(static_cast<float*>(a.momentum), k0, a.n, u.mom);
    store4<VEC>(static_cast<float*>(a.hess), k0, a.n, u.h);
  }
}

// the param: the mean, or (NEXT) the sample of next_draw around mean and hess
template <typename PT, bool NEXT, bool VEC>
__device__ __forceinline__ void store_param(const Launch& l, const OpArgs& a, const Scalars& s,
                                            uint64_t next_draw, int64_t q, int64_t k0,
                                            const float m[4], const float h[4],
                                            const float dl[4]) {
  float e[4] = {0, 0, 0, 0}, out[4];
  if (NEXT) normals(l.key, next_draw, q, e);
#pragma unroll
  for (int j = 0; j < 4; ++j) out[j] = param_value<NEXT>(m[j], h[j], dl[j], e[j], s);
  store4<VEC>(static_cast<PT*>(a.param), k0, a.n, out);
}

template <typename PT, bool PRICE, GradMode MODE, bool NEXT, bool VEC, Loop L>
__device__ __forceinline__ void update_quad(const Launch& l, const OpArgs& a,
                                            const UpdateConsts& c, int64_t q, int64_t k0) {
  UpdateIn u;
  float h_stored[4];
  load_update<PT, PRICE, MODE, VEC, L>(l, a, c, q, k0, u);
  update_moments<PRICE, MODE, L>(c, u);
  store_state<VEC, L>(l, a, c, q, k0, u, h_stored);
  update_mean<L>(c, u);  // the mean from the unrounded momentum and hess
  store4<VEC>(a.mean, k0, a.n, u.m);
  store_param<PT, NEXT, VEC>(l, a, c.d.s, c.draws.next_draw, q, k0, u.m, h_stored, u.dl);
}

// A skipped step (found_inf nonzero, uniform over the grid): mean, momentum and hess keep their
// values (not even rewritten); the param gets the mean, or the next sample around it. Rare, so
// every quad takes the bounds-checked path (no vector instance of its own).
template <typename PT, bool NEXT>
__device__ __forceinline__ void skipped_quad(const Launch& l, const UpdateConsts& c, int64_t q) {
  const OpArgs& a = l.a;
  const int64_t k0 = 4 * q - a.offset;
  float m[4], h[4], dl[4];
  load4<false>(a.mean, k0, a.n, m);
  load_state4<false>(a, a.hess, k0, h);
  load_delta<false>(a, k0, c.d.s, dl);
  store_param<PT, NEXT, false>(l, a, c.d.s, c.draws.next_draw, q, k0, m, h, dl);
}

template <typename PT, bool NEXT>
__device__ __forceinline__ void skipped_update(const Launch& l, const UpdateConsts& c) {
  IVON_GRID_STRIDE(i, l.quads.vec_n) skipped_quad<PT, NEXT>(l, c, l.quads.vec_lo + i);
  scalar_loop(l, [&](const OpArgs&, int64_t q, int64_t) { skipped_quad<PT, NEXT>(l, c, q); });
}

// At least 3 blocks per SM (at most 85 registers): without the bound ptxas gave some instances
// 80 registers and still spilled a value; with 4 (64 registers) the official loop's kGradAvg
// spilled; with 3 none does, on sm_80 and sm_90 (bench.machine_code reports it)
template <typename PT, bool PRICE, GradMode MODE, bool NEXT>
__global__ void __launch_bounds__(kThreads, 3) update_kernel(const Launch l) {
  const UpdateConsts c = update_consts(l.a);  // once per thread
  if (c.d.skip) return skipped_update<PT, NEXT>(l, c);
  vector_loops(l, true, c.rare, [&](auto loop, const OpArgs& a, int64_t q, int64_t k0) {
    update_quad<PT, PRICE, MODE, NEXT, true, decltype(loop)::value>(l, a, c, q, k0);
  });
  scalar_loop(l, [&](const OpArgs& a, int64_t q, int64_t k0) {
    update_quad<PT, PRICE, MODE, NEXT, false, Loop::kAny>(l, a, c, q, k0);
  });
}

// ---- host side ----

// p + k0 aligned to `bytes` (four elements) for every quad's first element k0 = 4q - offset
inline bool lines_up(const void* p, int64_t elem_bytes, int64_t offset) {
  const uintptr_t lead = uintptr_t(offset & 3) * uintptr_t(elem_bytes);
  return p == nullptr || (reinterpret_cast<uintptr_t>(p) - lead) % uintptr_t(4 * elem_bytes) == 0;
}

// the vector path (Note [vector loads]): every pointer lines up with the global quads
inline bool vector_ok(const OpArgs& a) {
  const int64_t pb = a.ptype == ParamType::kFloat ? 4 : 2, sb = a.bf16_state ? 2 : 4;
  const int64_t o = a.offset;
  return lines_up(a.param, pb, o) && lines_up(a.grad, pb, o) && lines_up(a.mean, 4, o) &&
         lines_up(a.momentum, sb, o) && lines_up(a.hess, sb, o) && lines_up(a.avg_grad, 4, o) &&
         lines_up(a.avg_hess_term, 4, o) && lines_up(a.prior_precision, 4, o) &&
         lines_up(a.prior_mean, 4, o);
}

// Note [the quads of a launch]
inline Quads quads_of(const OpArgs& a) {
  const int64_t first = a.offset >> 2, end = ((a.offset + a.n - 1) >> 2) + 1;
  const int64_t lo = (a.offset + 3) >> 2, hi = (a.offset + a.n) >> 2;  // whole quads inside
  if (!vector_ok(a) || lo >= hi) return {first, 0, first, end - first, end, end - first};
  const int64_t n_head = lo - first;
  return {lo, hi - lo, first, n_head, hi, n_head + (end - hi)};
}

template <typename T>
inline T* moved_by(T* p, int64_t k, int64_t elem_bytes) {
  using Byte = typename std::conditional<std::is_const<T>::value, const char, char>::type;
  return p == nullptr ? p : reinterpret_cast<T*>(reinterpret_cast<Byte*>(p) + k * elem_bytes);
}

// the op's arguments with every array moved by k elements (absent ones stay null)
inline OpArgs moved_args(const OpArgs& a, int64_t k) {
  const int64_t pb = a.ptype == ParamType::kFloat ? 4 : 2, sb = a.bf16_state ? 2 : 4;
  OpArgs t = a;
  t.param = moved_by(a.param, k, pb);
  t.grad = moved_by(a.grad, k, pb);
  t.mean = moved_by(a.mean, k, 4);
  t.momentum = moved_by(a.momentum, k, sb);
  t.hess = moved_by(a.hess, k, sb);
  t.avg_grad = moved_by(a.avg_grad, k, 4);
  t.avg_hess_term = moved_by(a.avg_hess_term, k, 4);
  t.prior_precision = moved_by(a.prior_precision, k, 4);
  t.prior_mean = moved_by(a.prior_mean, k, 4);
  return t;
}

// launch(l) for each part of the op (Note [32-bit indices in the vector loop]): the vector
// quads in parts of at most kMaxVectorQuads (one part below 4G elements), the bounds-checked
// quads with the first part
template <typename F>
inline void for_each_part(const OpArgs& a, F&& launch) {
  Launch l{a, a, philox_keys(a.seed), quads_of(a)};
  const Quads all = l.quads;
  int64_t done = 0;
  do {
    l.quads.vec_lo = all.vec_lo + done;
    l.quads.vec_n = std::min(all.vec_n - done, kMaxVectorQuads);
    l.quads.n_scalar = done == 0 ? all.n_scalar : 0;
    // only for a vector loop that runs: the arrays' first vector quad is inside them
    l.vec = l.quads.vec_n > 0 ? moved_args(a, 4 * l.quads.vec_lo - a.offset) : a;
    launch(l);
    done += l.quads.vec_n;
  } while (done < all.vec_n);
}

// enough blocks to fill the GPU a few times over; the grid-stride loop covers the rest
inline int grid_for(const Quads& qs) {
  static int sms[64] = {0};
  int dev = 0;
  cudaGetDevice(&dev);
  int& n_sm = sms[dev & 63];
  if (n_sm == 0) cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, dev);
  const int64_t nq = std::max(qs.vec_n, qs.n_scalar);
  const int64_t want = (nq + kThreads - 1) / kThreads;
  return int(std::max<int64_t>(1, std::min<int64_t>(want, int64_t(std::max(n_sm, 1)) * 8)));
}

inline const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// The update of param type PT (each cuda_update_<type>.cu instantiates one)
template <typename PT>
const char* launch_update(const OpArgs& a, void* stream) {
  dispatch_update_cuda(a, [&](auto price, auto mode, auto next) {
    for_each_part(a, [&](const Launch& l) {
      IVON_LAUNCH(grid_for(l.quads), kThreads, static_cast<cudaStream_t>(stream),
                  update_kernel<PT, decltype(price)::value, decltype(mode)::value,
                                decltype(next)::value>)
      (l);
    });
  });
  return last_error();
}

}  // namespace
}  // namespace ivon_fast
