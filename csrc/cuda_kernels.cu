// cuda_kernels.cu: the CUDA kernels. One thread handles one quad (the four elements that share a
// Philox call, docs/DESIGN.md section 3) per iteration of a grid-stride loop; the math is the shared
// scalar code of ivon_math.h, so the CPU tests exercise it.
//
// Note [vector loads]: when the segment starts on a quad boundary (offset % 4 == 0) and every
// pointer is aligned to four elements, a quad is one 16-byte load / store of float state (8 bytes
// for bf16 / fp16 params and grads, and for bf16 state). Otherwise (or for the segment's partial first / last quad)
// the thread falls back to bounds-checked scalar accesses; the results are identical.
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

#define IVON_MATH_NS cuda_math
#include "dispatch_flags.h"
#include "ivon_math.h"
#include "kernel_args.h"

namespace ivon_fast {
namespace {

using namespace cuda_math;

constexpr int kThreads = 256;

// ---- four-element loads and stores (see Note [vector loads]) ----

__device__ __forceinline__ void load4(const float* p, int64_t k0, bool vec, int64_t n, float v[4]) {
  if (vec) {
    const float4 t = *reinterpret_cast<const float4*>(p + k0);
    v[0] = t.x, v[1] = t.y, v[2] = t.z, v[3] = t.w;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = (k0 + j >= 0 && k0 + j < n) ? p[k0 + j] : 0.0f;
  }
}

__device__ __forceinline__ void store4(float* p, int64_t k0, bool vec, int64_t n, const float v[4]) {
  if (vec) {
    *reinterpret_cast<float4*>(p + k0) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (k0 + j >= 0 && k0 + j < n) p[k0 + j] = v[j];
  }
}

template <typename H>  // BF16 or F16: 4 x 16 bits = one 8-byte access
__device__ __forceinline__ void load4(const H* p, int64_t k0, bool vec, int64_t n, float v[4]) {
  if (vec) {
    const uint2 t = *reinterpret_cast<const uint2*>(p + k0);
    v[0] = to_float(H{uint16_t(t.x)});
    v[1] = to_float(H{uint16_t(t.x >> 16)});
    v[2] = to_float(H{uint16_t(t.y)});
    v[3] = to_float(H{uint16_t(t.y >> 16)});
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = (k0 + j >= 0 && k0 + j < n) ? to_float(p[k0 + j]) : 0.0f;
  }
}

template <typename H>
__device__ __forceinline__ void store4(H* p, int64_t k0, bool vec, int64_t n, const float v[4]) {
  if (vec) {
    uint2 t;
    t.x = uint32_t(from_float<H>(v[0]).bits) | (uint32_t(from_float<H>(v[1]).bits) << 16);
    t.y = uint32_t(from_float<H>(v[2]).bits) | (uint32_t(from_float<H>(v[3]).bits) << 16);
    *reinterpret_cast<uint2*>(p + k0) = t;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (k0 + j >= 0 && k0 + j < n) p[k0 + j] = from_float<H>(v[j]);
  }
}

// momentum / hess: float32 or bf16 state (Note [bf16 state] in ivon_math.h). bf16_state is the
// same for every thread of a launch, so this branch never diverges; it is a run-time flag, not
// a template one, so that bf16 state does not double the update kernel's instances.
__device__ __forceinline__ void load_state4(const OpArgs& a, const void* p, int64_t k0, bool vec,
                                            float v[4]) {
  if (a.bf16_state) {
    load4(static_cast<const BF16*>(p), k0, vec, a.n, v);
  } else {
    load4(static_cast<const float*>(p), k0, vec, a.n, v);
  }
}

// bf16 state: four values stored by stochastic rounding with the 16-bit halves (`high` or low)
// of the quad's Philox words; each value is replaced by the stored one, widened
__device__ __forceinline__ void store_rounded4(void* p, int64_t k0, bool vec, int64_t n,
                                               const uint32_t words[4], bool high, float v[4]) {
  uint16_t b[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    b[j] = stochastic_round_bf16(v[j], high ? words[j] >> 16 : words[j] & 0xffffu);
    v[j] = bf16_bits_to_float(b[j]);
  }
  uint16_t* out = static_cast<uint16_t*>(p);
  if (vec) {
    *reinterpret_cast<uint2*>(out + k0) =
        make_uint2(uint32_t(b[0]) | (uint32_t(b[1]) << 16), uint32_t(b[2]) | (uint32_t(b[3]) << 16));
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (k0 + j >= 0 && k0 + j < n) out[k0 + j] = b[j];
  }
}

__device__ __forceinline__ void normals(uint64_t seed, uint64_t draw, int64_t q, float e[4]) {
  const F32x4 n = normals4(seed, draw, uint64_t(q));
  e[0] = n.v0, e[1] = n.v1, e[2] = n.v2, e[3] = n.v3;
}

// The quad of iteration i, its first local index and whether it is one aligned vector access.
struct Quad {
  int64_t q, k0;
  bool vec;
};

__device__ __forceinline__ Quad quad_of(const OpArgs& a, int64_t i, bool aligned) {
  const int64_t q = (a.offset >> 2) + i;
  const int64_t k0 = 4 * q - a.offset;
  return {q, k0, aligned && k0 >= 0 && k0 + 4 <= a.n};
}

#define IVON_GRID_STRIDE(i, nq)                                                     \
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (nq);        \
       i += int64_t(gridDim.x) * blockDim.x)

// The four elements' delta (Note [per-element prior] in ivon_math.h): the prior precision when
// the instance has one (PREC, a template flag: an absent prior is neither loaded nor tested),
// else the scalar weight decay.
template <bool PREC>
__device__ __forceinline__ void load_delta(const OpArgs& a, const Quad& t, const Scalars& s,
                                           float d[4]) {
  if (PREC) {
    load4(a.prior_precision, t.k0, t.vec, a.n, d);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) d[j] = s.wd;
  }
}

template <typename PT, bool PREC>
__global__ void __launch_bounds__(kThreads)
    sample_kernel(const OpArgs a, int64_t nq, bool aligned) {
  const uint64_t draw = read_draws(a).draw;  // once per thread
  IVON_GRID_STRIDE(i, nq) {
    const Quad t = quad_of(a, i, aligned);
    float m[4], h[4], dl[4], e[4], out[4];
    load4(a.mean, t.k0, t.vec, a.n, m);
    load_state4(a, a.hess, t.k0, t.vec, h);
    load_delta<PREC>(a, t, a.s, dl);
    normals(a.seed, draw, t.q, e);
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = m[j] + noise_of(e[j], h[j], dl[j], a.s);
    store4(static_cast<PT*>(a.param), t.k0, t.vec, a.n, out);
  }
}

template <typename PT, bool PRICE, bool FIRST, bool PREC>
__global__ void __launch_bounds__(kThreads)
    accumulate_kernel(const OpArgs a, int64_t nq, bool aligned) {
  const uint64_t draw = read_draws(a).draw;  // once per thread
  IVON_GRID_STRIDE(i, nq) {
    const Quad t = quad_of(a, i, aligned);
    float g[4], h[4], dl[4], e[4], ag[4] = {0, 0, 0, 0}, ah[4] = {0, 0, 0, 0};
    load4(static_cast<const PT*>(a.grad), t.k0, t.vec, a.n, g);
    if (PRICE) {
      load_state4(a, a.hess, t.k0, t.vec, h);
      load_delta<PREC>(a, t, a.s, dl);
      normals(a.seed, draw, t.q, e);
    }
    if (!FIRST) {
      load4(a.avg_grad, t.k0, t.vec, a.n, ag);
      load4(a.avg_hess_term, t.k0, t.vec, a.n, ah);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float noise = PRICE ? noise_of(e[j], h[j], dl[j], a.s) : 0.0f;
      const float ht = hess_term_of<PRICE>(g[j], noise);
      ag[j] = running_mean<FIRST>(ag[j], g[j], a.s);
      ah[j] = running_mean<FIRST>(ah[j], ht, a.s);
    }
    store4(a.avg_grad, t.k0, t.vec, a.n, ag);
    store4(a.avg_hess_term, t.k0, t.vec, a.n, ah);
  }
}

template <typename PT, bool PRICE, GradMode MODE, bool NEXT, bool SCALED, bool PREC, bool PMEAN>
__global__ void __launch_bounds__(kThreads)
    update_kernel(const OpArgs a, int64_t nq, bool aligned) {
  // the device scalars, once per thread (Note [device scalars of an update] in ivon_math.h); a
  // skipped step is uniform over the grid, so the branch below never diverges
  const DeviceScalars d = read_device_scalars(a);
  const Draws draws = read_draws(a, /*stores_state=*/true);
  const Scalars& s = d.s;
  IVON_GRID_STRIDE(i, nq) {
    const Quad t = quad_of(a, i, aligned);
    float m[4], h[4], dl[4];
    load4(a.mean, t.k0, t.vec, a.n, m);
    load_state4(a, a.hess, t.k0, t.vec, h);
    load_delta<PREC>(a, t, s, dl);
    if (!d.skip) {  // skipped: mean, momentum and hess keep their values (not even rewritten)
      float mom[4], gm[4], ht[4];
      float g[4] = {0, 0, 0, 0}, e[4] = {0, 0, 0, 0}, ag[4] = {0, 0, 0, 0}, ah[4] = {0, 0, 0, 0};
      float mu0[4] = {0, 0, 0, 0};
      load_state4(a, a.momentum, t.k0, t.vec, mom);
      if (PMEAN) load4(a.prior_mean, t.k0, t.vec, a.n, mu0);
      if (MODE != GradMode::kAvgOnly) {
        load4(static_cast<const PT*>(a.grad), t.k0, t.vec, a.n, g);
        if (PRICE) normals(a.seed, draws.draw, t.q, e);
      }
      if (MODE != GradMode::kGradOnly) {
        load4(a.avg_grad, t.k0, t.vec, a.n, ag);
        load4(a.avg_hess_term, t.k0, t.vec, a.n, ah);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        grad_statistics<PRICE, MODE, SCALED>(g[j], e[j], h[j], dl[j], ag[j], ah[j], s, gm[j],
                                             ht[j]);
        update_state<PRICE, PMEAN>(gm[j], ht[j], dl[j], mu0[j], m[j], mom[j], h[j], s);
      }
      store4(a.mean, t.k0, t.vec, a.n, m);
      if (a.bf16_state) {  // the next sample below is drawn around the rounded hess
        const U32x4 x = philox4x32_10(uint32_t(t.q), uint32_t(uint64_t(t.q) >> 32),
                                      uint32_t(draws.round_draw),
                                      uint32_t(draws.round_draw >> 32), uint32_t(a.seed),
                                      uint32_t(a.seed >> 32));
        const uint32_t words[4] = {x.x0, x.x1, x.x2, x.x3};
        store_rounded4(a.momentum, t.k0, t.vec, a.n, words, /*high=*/false, mom);
        store_rounded4(a.hess, t.k0, t.vec, a.n, words, /*high=*/true, h);
      } else {
        store4(static_cast<float*>(a.momentum), t.k0, t.vec, a.n, mom);
        store4(static_cast<float*>(a.hess), t.k0, t.vec, a.n, h);
      }
    }
    float e_next[4] = {0, 0, 0, 0}, out[4];
    if (NEXT) normals(a.seed, draws.next_draw, t.q, e_next);
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = param_value<NEXT>(m[j], h[j], dl[j], e_next[j], s);
    store4(static_cast<PT*>(a.param), t.k0, t.vec, a.n, out);
  }
}

// ---- host side ----

int64_t num_quads(const OpArgs& a) { return ((a.offset + a.n - 1) >> 2) - (a.offset >> 2) + 1; }

bool aligned_to(const void* p, int64_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % uintptr_t(bytes) == 0;
}

// the vector path: quad-aligned segment start and every pointer aligned to four elements
bool vector_ok(const OpArgs& a) {
  const int64_t pbytes = a.ptype == ParamType::kFloat ? 16 : 8;
  const int64_t sbytes = a.bf16_state ? 8 : 16;
  return a.offset % 4 == 0 && aligned_to(a.param, pbytes) && aligned_to(a.grad, pbytes) &&
         aligned_to(a.mean, 16) && aligned_to(a.momentum, sbytes) && aligned_to(a.hess, sbytes) &&
         aligned_to(a.avg_grad, 16) && aligned_to(a.avg_hess_term, 16) &&
         aligned_to(a.prior_precision, 16) && aligned_to(a.prior_mean, 16);
}

// enough blocks to fill the GPU a few times over; the grid-stride loop covers the rest
int grid_for(int64_t nq) {
  static int sms[64] = {0};
  int dev = 0;
  cudaGetDevice(&dev);
  int& n_sm = sms[dev & 63];
  if (n_sm == 0) cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, dev);
  const int64_t want = (nq + kThreads - 1) / kThreads;
  return int(std::max<int64_t>(1, std::min<int64_t>(want, int64_t(std::max(n_sm, 1)) * 8)));
}

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* cuda_sample(const OpArgs& a, void* stream) {
  const auto st = static_cast<cudaStream_t>(stream);
  const int64_t nq = num_quads(a);
  const bool al = vector_ok(a);
  dispatch_sample(a, [&](auto pt, auto prec) {
    IVON_LAUNCH(grid_for(nq), kThreads, st, sample_kernel<decltype(pt), decltype(prec)::value>)
    (a, nq, al);
  });
  return last_error();
}

const char* cuda_accumulate(const OpArgs& a, void* stream) {
  const auto st = static_cast<cudaStream_t>(stream);
  const int64_t nq = num_quads(a);
  const bool al = vector_ok(a);
  dispatch_accumulate(a, [&](auto pt, auto price, auto first, auto prec) {
    IVON_LAUNCH(grid_for(nq), kThreads, st,
                accumulate_kernel<decltype(pt), decltype(price)::value, decltype(first)::value,
                                  decltype(prec)::value>)
    (a, nq, al);
  });
  return last_error();
}

const char* cuda_update(const OpArgs& a, void* stream) {
  const auto st = static_cast<cudaStream_t>(stream);
  const int64_t nq = num_quads(a);
  const bool al = vector_ok(a);
  dispatch_update(a, [&](auto pt, auto price, auto mode, auto next, auto scaled, auto prec,
                         auto pmean) {
    IVON_LAUNCH(grid_for(nq), kThreads, st,
                update_kernel<decltype(pt), decltype(price)::value, decltype(mode)::value,
                              decltype(next)::value, decltype(scaled)::value,
                              decltype(prec)::value, decltype(pmean)::value>)
    (a, nq, al);
  });
  return last_error();
}

}  // namespace ivon_fast
