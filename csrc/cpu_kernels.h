// cpu_kernels.h: the CPU kernels, written as plain loops over the shared element math of
// ivon_math.h and compiled once per instruction set (cpu_isa_*.cpp define IVON_MATH_NS and a
// `#pragma GCC target` before including this file). The vectorizer turns the loops into AVX2 /
// AVX-512 code; the functions here only process a range of quads, the threading lives in
// cpu_dispatch.cpp (the only CPU TU that sees ATen).
//
// Note [block structure of the CPU kernels]: a loop that makes a Philox call per quad and then
// updates four elements does not vectorize well (stride-4 accesses, a loop-carried quad). So each
// range is cut into blocks of kBlockQuads quads: one loop fills a small buffer with the block's
// normals (vectorized across quads: Philox, the uniform conversion and Box-Muller are branch-free),
// a second loop does the element update reading the noise from that L1-resident buffer (vectorized
// across elements). Block boundaries are quad-aligned, so a segment offset that is not a multiple
// of 4 just starts the first block's element loop a few normals into the buffer.
//
// Note [CPU cost of the fused step]: measured on a 2-core AVX-512 host (10M fp32 elements), the
// fused update (price, next sample) is compute-bound: it takes the same time on cache-resident
// data as from DRAM. Per element it runs 5 IEEE divisions and 3 square roots (the reference's
// op-for-op formulas plus one sqrt per Box-Muller pair), which keep the divide / sqrt unit busy
// for about as long as the whole memory stream; Box-Muller costs about twice Philox. Rewriting
// divisions as reciprocal multiplies would be faster but gives up the reference's rounding and
// the bit equality of the CPU and CUDA kernels.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(IVON_CPU_AVX512) || defined(IVON_CPU_AVX2)
#include <immintrin.h>
#endif

#include "dispatch_flags.h"
#include "ivon_math.h"
#include "kernel_args.h"

namespace ivon_fast {
namespace IVON_MATH_NS {

constexpr int64_t kBlockQuads = 64;  // 256 normals = 1 KiB per buffer: L1-resident (64 measured best)

// eps[4 j + k] = nk[j]: the four values (normals, Philox words) of quad j, in element order
template <typename T>
static inline void interleave_quads(const T* __restrict n0, const T* __restrict n1,
                                    const T* __restrict n2, const T* __restrict n3, int64_t nq,
                                    T* __restrict eps) {
  for (int64_t j = 0; j < nq; ++j) {
    eps[4 * j + 0] = n0[j];
    eps[4 * j + 1] = n1[j];
    eps[4 * j + 2] = n2[j];
    eps[4 * j + 3] = n3[j];
  }
}

#if defined(IVON_CPU_AVX512) || defined(IVON_CPU_AVX2)
// Note [Philox with intrinsics]: GCC vectorizes the scalar Philox of ivon_math.h over 32-bit
// lanes, which needs even/odd shuffles around every 32x32->64 multiply; Philox then costs more
// than the whole update. Here each 64-bit lane holds one 32-bit Philox word: vpmuludq reads only
// the low halves, so the products need no shuffle (the garbage left in the upper halves is never
// read), and the three-way xor is one vpternlog on AVX-512. Four independent vectors are in flight
// to hide the multiply latency. Integer arithmetic: the outputs equal the scalar Philox bit for
// bit (tests compare these builds with the portable one).
#if defined(IVON_CPU_AVX512)
struct PhiloxVec {
  using V = __m512i;
  static constexpr int kLanes = 8;
  static V set1(uint64_t x) { return _mm512_set1_epi64(int64_t(x)); }
  static V lanes() { return _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7); }
  static V add(V a, V b) { return _mm512_add_epi64(a, b); }
  static V mul(V a, V b) { return _mm512_mul_epu32(a, b); }
  static V hi(V a) { return _mm512_srli_epi64(a, 32); }
  static V xor3(V a, V b, V c) { return _mm512_ternarylogic_epi64(a, b, c, 0x96); }
  static void store_lo32(uint32_t* p, V a) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi64_epi32(a));
  }
};
#else
struct PhiloxVec {
  using V = __m256i;
  static constexpr int kLanes = 4;
  static V set1(uint64_t x) { return _mm256_set1_epi64x(int64_t(x)); }
  static V lanes() { return _mm256_setr_epi64x(0, 1, 2, 3); }
  static V add(V a, V b) { return _mm256_add_epi64(a, b); }
  static V mul(V a, V b) { return _mm256_mul_epu32(a, b); }
  static V hi(V a) { return _mm256_srli_epi64(a, 32); }
  static V xor3(V a, V b, V c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
  static void store_lo32(uint32_t* p, V a) {
    const __m256i even = _mm256_permutevar8x32_epi32(a, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(even));
  }
};
#endif

constexpr int kPhiloxVecs = 4;
constexpr int64_t kPhiloxStep = PhiloxVec::kLanes * kPhiloxVecs;  // quads per iteration

static inline void philox_words(uint64_t seed, uint64_t draw, int64_t q0, int64_t nq,
                                uint32_t* __restrict x0, uint32_t* __restrict x1,
                                uint32_t* __restrict x2, uint32_t* __restrict x3) {
  using P = PhiloxVec;
  using V = P::V;
  const V m0 = P::set1(0xD2511F53u), m1 = P::set1(0xCD9E8D57u);
  const V lane = P::lanes();
  const V draw_lo = P::set1(uint32_t(draw)), draw_hi = P::set1(uint32_t(draw >> 32));
  V key0[10], key1[10];
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    key0[r] = P::set1(k0);
    key1[r] = P::set1(k1);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  // nq is rounded up to whole iterations: the buffers have room (see fill_normals)
  for (int64_t j = 0; j < nq; j += kPhiloxStep) {
    V c0[kPhiloxVecs], c1[kPhiloxVecs], c2[kPhiloxVecs], c3[kPhiloxVecs];
    for (int v = 0; v < kPhiloxVecs; ++v) {
      const V q = P::add(P::set1(uint64_t(q0 + j + P::kLanes * v)), lane);
      c0[v] = q;
      c1[v] = P::hi(q);
      c2[v] = draw_lo;
      c3[v] = draw_hi;
    }
#pragma GCC unroll 10
    for (int r = 0; r < 10; ++r) {
#pragma GCC unroll 4
      for (int v = 0; v < kPhiloxVecs; ++v) {
        const V p0 = P::mul(c0[v], m0);
        const V p1 = P::mul(c2[v], m1);
        c0[v] = P::xor3(P::hi(p1), c1[v], key0[r]);
        c2[v] = P::xor3(P::hi(p0), c3[v], key1[r]);
        c1[v] = p1;
        c3[v] = p0;
      }
    }
    for (int v = 0; v < kPhiloxVecs; ++v) {
      const int64_t at = j + P::kLanes * v;
      P::store_lo32(x0 + at, c0[v]);
      P::store_lo32(x1 + at, c1[v]);
      P::store_lo32(x2 + at, c2[v]);
      P::store_lo32(x3 + at, c3[v]);
    }
  }
}

// eps[j] = the normal of global index 4 * q0 + j, for nq quads.
static inline void fill_normals(uint64_t seed, uint64_t draw, int64_t q0, int64_t nq,
                                float* __restrict eps) {
  alignas(64) uint32_t x0[kBlockQuads], x1[kBlockQuads], x2[kBlockQuads], x3[kBlockQuads];
  alignas(64) float n0[kBlockQuads], n1[kBlockQuads], n2[kBlockQuads], n3[kBlockQuads];
  static_assert(kBlockQuads % kPhiloxStep == 0, "philox_words writes whole iterations");
  philox_words(seed, draw, q0, nq, x0, x1, x2, x3);
  for (int64_t j = 0; j < nq; ++j) {
    box_muller(uint_to_uniform(x0[j]), uint_to_uniform(x1[j]), &n0[j], &n1[j]);
    box_muller(uint_to_uniform(x2[j]), uint_to_uniform(x3[j]), &n2[j], &n3[j]);
  }
  interleave_quads(n0, n1, n2, n3, nq, eps);
}

// bits[j] = the Philox word of global index 4 * q0 + j at `draw`, for nq quads (the random bits
// of stochastic rounding, Note [bf16 state] in ivon_math.h).
static inline void fill_words(uint64_t seed, uint64_t draw, int64_t q0, int64_t nq,
                              uint32_t* __restrict bits) {
  alignas(64) uint32_t x0[kBlockQuads], x1[kBlockQuads], x2[kBlockQuads], x3[kBlockQuads];
  philox_words(seed, draw, q0, nq, x0, x1, x2, x3);
  interleave_quads(x0, x1, x2, x3, nq, bits);
}
#else
// eps[j] = the normal of global index 4 * q0 + j, for nq quads.
static inline void fill_normals(uint64_t seed, uint64_t draw, int64_t q0, int64_t nq,
                                float* __restrict eps) {
  float n0[kBlockQuads], n1[kBlockQuads], n2[kBlockQuads], n3[kBlockQuads];
  for (int64_t j = 0; j < nq; ++j) {
    const F32x4 n = normals4(seed, draw, uint64_t(q0 + j));
    n0[j] = n.v0;
    n1[j] = n.v1;
    n2[j] = n.v2;
    n3[j] = n.v3;
  }
  interleave_quads(n0, n1, n2, n3, nq, eps);
}

// bits[j] = the Philox word of global index 4 * q0 + j at `draw`, for nq quads (the random bits
// of stochastic rounding, Note [bf16 state] in ivon_math.h).
static inline void fill_words(uint64_t seed, uint64_t draw, int64_t q0, int64_t nq,
                              uint32_t* __restrict bits) {
  uint32_t x0[kBlockQuads], x1[kBlockQuads], x2[kBlockQuads], x3[kBlockQuads];
  for (int64_t j = 0; j < nq; ++j) {
    const uint64_t quad = uint64_t(q0 + j);
    const U32x4 x = philox4x32_10(uint32_t(quad), uint32_t(quad >> 32), uint32_t(draw),
                                  uint32_t(draw >> 32), uint32_t(seed), uint32_t(seed >> 32));
    x0[j] = x.x0, x1[j] = x.x1, x2[j] = x.x2, x3[j] = x.x3;
  }
  interleave_quads(x0, x1, x2, x3, nq, bits);
}
#endif

// Note [raw 16-bit storage]: bf16 / fp16 values are loaded and stored as uint16_t, not as the
// BF16 / F16 structs: GCC finds no vector type for a struct load and would leave the whole loop
// scalar.
template <typename PT>
struct RawOf {
  using type = uint16_t;
};
template <>
struct RawOf<float> {
  using type = float;
};
template <typename PT>
using RawT = typename RawOf<PT>::type;

template <typename PT>
static inline float raw_to_float(RawT<PT> r) {
  if constexpr (std::is_same_v<PT, float>) {
    return r;
  } else {
    return to_float(PT{r});
  }
}

template <typename PT>
static inline RawT<PT> float_to_raw(float f) {
  if constexpr (std::is_same_v<PT, float>) {
    return f;
  } else {
    return from_float<PT>(f).bits;
  }
}

// The local element range [k_lo, k_hi) of the quads [qb, qe) of a segment, and the shift that
// maps a local index k to its position k + shift in a buffer filled from quad qb.
struct BlockRange {
  int64_t k_lo, k_hi, shift;
};

static inline BlockRange block_range(const OpArgs& a, int64_t qb, int64_t qe) {
  const int64_t g_lo = std::max(4 * qb, a.offset);
  const int64_t g_hi = std::min(4 * qe, a.offset + a.n);
  return {g_lo - a.offset, g_hi - a.offset, a.offset - 4 * qb};
}

// Note [bf16 state on the CPU]: the float32-state loops below run unchanged on bf16 state: a
// block's momentum and hess are first widened into float32 buffers (L1-resident, indexed like
// the noise buffers), the loop reads and writes those, and the new values are then rounded into
// the bf16 arrays (Note [bf16 state] in ivon_math.h). So bf16 state adds no instances of the
// update loop, only these short vectorized passes. An update with a next sample runs the loop
// without it and draws the sample in the rounding pass, around the rounded hess.

// A block's state array (momentum or hess) as float32 values indexed by the local k: the array
// itself (float32 state), or `buffer` filled with its widened bf16 values.
static inline float* state_block(const OpArgs& a, void* state, BlockRange r,
                                 float* __restrict buffer) {
  if (!a.bf16_state) return static_cast<float*>(state);
  const uint16_t* __restrict bits = static_cast<const uint16_t*>(state);
  float* __restrict out = buffer + r.shift;
  for (int64_t k = r.k_lo; k < r.k_hi; ++k) out[k] = bf16_bits_to_float(bits[k]);
  return out;
}

// The element's delta (Note [per-element prior] in ivon_math.h): the prior precision when the
// instance has one (PREC), else the scalar weight decay; PREC is a template flag, so the loops
// below neither load nor branch on an absent prior.
template <bool PREC>
static inline float delta_at(const float* __restrict prec, int64_t k, const Scalars& s) {
  return PREC ? prec[k] : s.wd;
}

template <typename PT, bool PREC>
static void sample_block(const OpArgs& a, BlockRange r, const float* __restrict hess,
                         const float* __restrict eps) {
  RawT<PT>* __restrict param = static_cast<RawT<PT>*>(a.param);
  const float* __restrict mean = a.mean;
  const float* __restrict prec = a.prior_precision;
  const float* __restrict e = eps + r.shift;
  const Scalars s = a.s;
  for (int64_t k = r.k_lo; k < r.k_hi; ++k) {
    param[k] = float_to_raw<PT>(mean[k] + noise_of(e[k], hess[k], delta_at<PREC>(prec, k, s), s));
  }
}

template <typename PT, bool PRICE, bool FIRST, bool PREC>
static void accumulate_block(const OpArgs& a, BlockRange r, const float* __restrict hess,
                             const float* __restrict eps) {
  const RawT<PT>* __restrict grad = static_cast<const RawT<PT>*>(a.grad);
  const float* __restrict prec = a.prior_precision;
  float* __restrict avg_grad = a.avg_grad;
  float* __restrict avg_ht = a.avg_hess_term;
  const float* __restrict e = eps + r.shift;
  const Scalars s = a.s;
  for (int64_t k = r.k_lo; k < r.k_hi; ++k) {
    const float g = raw_to_float<PT>(grad[k]);
    const float noise = PRICE ? noise_of(e[k], hess[k], delta_at<PREC>(prec, k, s), s) : 0.0f;
    avg_grad[k] = running_mean<FIRST>(avg_grad[k], g, s);
    avg_ht[k] = running_mean<FIRST>(avg_ht[k], hess_term_of<PRICE>(g, noise), s);
  }
}

// The update of one block; `scalars` holds the device scalars' values (read once per range by
// update_range_t); `momentum` and `hess` are the float32 state (state_block).
template <typename PT, bool PRICE, GradMode MODE, bool NEXT, bool SCALED, bool PREC, bool PMEAN>
static void update_block(const OpArgs& a, const Scalars& scalars, BlockRange r,
                         float* __restrict momentum, float* __restrict hess,
                         const float* __restrict eps, const float* __restrict eps_next) {
  RawT<PT>* __restrict param = static_cast<RawT<PT>*>(a.param);
  const RawT<PT>* __restrict grad = static_cast<const RawT<PT>*>(a.grad);
  float* __restrict mean = a.mean;
  const float* __restrict avg_grad = a.avg_grad;
  const float* __restrict avg_ht = a.avg_hess_term;
  const float* __restrict prec = a.prior_precision;
  const float* __restrict prior_mean = a.prior_mean;
  const float* __restrict e = eps + r.shift;
  const float* __restrict e_next = eps_next + r.shift;
  const Scalars s = scalars;  // a local copy: provably not aliased by the stores below
  // Note [vectorizing the update]: GCC does not use the __restrict of these local pointers, so
  // it can vectorize only behind run-time overlap checks of every pair of arrays, and gives up
  // beyond its limit of such checks (10): the averages (kGradAvg, kAvgOnly) or a prior input
  // left the loop scalar. The arrays of a segment never overlap one another (an element's
  // reads and writes stay within iteration k), which ivdep asserts.
#pragma GCC ivdep
  for (int64_t k = r.k_lo; k < r.k_hi; ++k) {
    float m = mean[k], mom = momentum[k], h = hess[k];
    const float delta = delta_at<PREC>(prec, k, s);
    const float mu0 = PMEAN ? prior_mean[k] : 0.0f;
    // only what the mode reads is loaded: grad is null for kAvgOnly, the averages for kGradOnly
    const float g = MODE == GradMode::kAvgOnly ? 0.0f : raw_to_float<PT>(grad[k]);
    const float ag = MODE == GradMode::kGradOnly ? 0.0f : avg_grad[k];
    const float at = MODE == GradMode::kGradOnly ? 0.0f : avg_ht[k];
    const float ek = PRICE && MODE != GradMode::kAvgOnly ? e[k] : 0.0f;
    float grad_mean, hess_term;
    grad_statistics<PRICE, MODE, SCALED>(g, ek, h, delta, ag, at, s, grad_mean, hess_term);
    update_state<PRICE, PMEAN>(grad_mean, hess_term, delta, mu0, m, mom, h, s);
    mean[k] = m;
    momentum[k] = mom;
    hess[k] = h;
    param[k] = float_to_raw<PT>(param_value<NEXT>(m, h, delta, NEXT ? e_next[k] : 0.0f, s));
  }
}

// bf16 state (Note [bf16 state on the CPU]): the block's new float32 momentum and hess (in the
// buffers) rounded into the bf16 arrays with the Philox words `words`; with NEXT the param gets
// the sample of next_draw around the mean and the rounded hess.
template <typename PT, bool NEXT, bool PREC>
static void round_state_block(const OpArgs& a, const Scalars& s, BlockRange r,
                              const float* __restrict momentum, const float* __restrict hess,
                              const uint32_t* __restrict words,
                              const float* __restrict eps_next) {
  uint16_t* __restrict momentum_bits = static_cast<uint16_t*>(a.momentum);
  uint16_t* __restrict hess_bits = static_cast<uint16_t*>(a.hess);
  RawT<PT>* __restrict param = static_cast<RawT<PT>*>(a.param);
  const float* __restrict mean = a.mean;
  const float* __restrict prec = a.prior_precision;
  const uint32_t* __restrict w = words + r.shift;
  const float* __restrict e_next = eps_next + r.shift;
#pragma GCC ivdep
  for (int64_t k = r.k_lo; k < r.k_hi; ++k) {
    momentum_bits[k] = stochastic_round_bf16(momentum[k], w[k] & 0xffffu);
    const uint16_t h = stochastic_round_bf16(hess[k], w[k] >> 16);
    hess_bits[k] = h;
    if (NEXT) {
      param[k] = float_to_raw<PT>(
          param_value<true>(mean[k], bf16_bits_to_float(h), delta_at<PREC>(prec, k, s),
                            e_next[k], s));
    }
  }
}

// A skipped update (found_inf nonzero, Note [device scalars of an update]): mean, momentum and
// hess are neither read nor written beyond what the param needs; param <- the mean, or the sample
// of next_draw around the mean and hess. Not a hot path.
template <typename PT, bool NEXT, bool PREC>
static void skipped_update_range_t(const OpArgs& a, const Scalars& s, uint64_t next_draw,
                                   int64_t q_begin, int64_t q_end) {
  alignas(64) float eps_next[4 * kBlockQuads];
  alignas(64) float hess_buffer[4 * kBlockQuads];
  RawT<PT>* __restrict param = static_cast<RawT<PT>*>(a.param);
  const float* __restrict mean = a.mean;
  const float* __restrict prec = a.prior_precision;
  for (int64_t qb = q_begin; qb < q_end; qb += kBlockQuads) {
    const int64_t qe = std::min(qb + kBlockQuads, q_end);
    if (NEXT) fill_normals(a.seed, next_draw, qb, qe - qb, eps_next);
    const BlockRange r = block_range(a, qb, qe);
    const float* __restrict hess = NEXT ? state_block(a, a.hess, r, hess_buffer) : nullptr;
    const float* __restrict e_next = eps_next + r.shift;
    for (int64_t k = r.k_lo; k < r.k_hi; ++k) {
      param[k] = float_to_raw<PT>(param_value<NEXT>(
          mean[k], NEXT ? hess[k] : 0.0f, NEXT ? delta_at<PREC>(prec, k, s) : 0.0f,
          NEXT ? e_next[k] : 0.0f, s));
    }
  }
}

// Note [prefetch during the noise]: a block first computes its normals (no memory traffic), then
// streams its elements. Without help the memory system idles during the first phase, and the
// hardware prefetchers only restart on the second phase's misses. So each block prefetches the
// elements of the block kPrefetchBlocks ahead before computing its noise: the loads then overlap
// with the Philox / Box-Muller work.
constexpr int64_t kPrefetchBlocks = 2;

template <typename T>
static inline void prefetch_elems(const T* base, int64_t k_lo, int64_t k_hi) {
  if (base == nullptr || k_lo >= k_hi) return;
  const char* p = reinterpret_cast<const char*>(base + k_lo);
  const char* end = reinterpret_cast<const char*>(base + k_hi);
  for (; p < end; p += 64) __builtin_prefetch(p, 1, 3);
}

static inline void prefetch_state(const OpArgs& a, const void* state, BlockRange r) {
  if (a.bf16_state) {
    prefetch_elems(static_cast<const uint16_t*>(state), r.k_lo, r.k_hi);
  } else {
    prefetch_elems(static_cast<const float*>(state), r.k_lo, r.k_hi);
  }
}

// ---- range functions: quads [q_begin, q_end) of the segment, one thread ----

template <typename PT, bool PREC>
static void sample_range_t(const OpArgs& a, int64_t q_begin, int64_t q_end) {
  const uint64_t draw = read_draws(a).draw;  // once per range
  alignas(64) float eps[4 * kBlockQuads];
  alignas(64) float hess_buffer[4 * kBlockQuads];
  for (int64_t qb = q_begin; qb < q_end; qb += kBlockQuads) {
    const int64_t qe = std::min(qb + kBlockQuads, q_end);
    const int64_t pq = qb + kPrefetchBlocks * kBlockQuads;  // Note [prefetch during the noise]
    if (pq < q_end) {
      const BlockRange r = block_range(a, pq, std::min(pq + kBlockQuads, q_end));
      prefetch_elems(a.mean, r.k_lo, r.k_hi);
      prefetch_state(a, a.hess, r);
      prefetch_elems(static_cast<const RawT<PT>*>(a.param), r.k_lo, r.k_hi);
      if (PREC) prefetch_elems(a.prior_precision, r.k_lo, r.k_hi);
    }
    fill_normals(a.seed, draw, qb, qe - qb, eps);
    const BlockRange r = block_range(a, qb, qe);
    sample_block<PT, PREC>(a, r, state_block(a, a.hess, r, hess_buffer), eps);
  }
}

template <typename PT, bool PRICE, bool FIRST, bool PREC>
static void accumulate_range_t(const OpArgs& a, int64_t q_begin, int64_t q_end) {
  const uint64_t draw = read_draws(a).draw;  // once per range
  alignas(64) float eps[4 * kBlockQuads];
  alignas(64) float hess_buffer[4 * kBlockQuads];
  for (int64_t qb = q_begin; qb < q_end; qb += kBlockQuads) {
    const int64_t qe = std::min(qb + kBlockQuads, q_end);
    if (PRICE) fill_normals(a.seed, draw, qb, qe - qb, eps);
    const BlockRange r = block_range(a, qb, qe);
    // gradsq's accumulate never reads the hess
    const float* hess = PRICE ? state_block(a, a.hess, r, hess_buffer) : nullptr;
    accumulate_block<PT, PRICE, FIRST, PREC>(a, r, hess, eps);
  }
}

template <typename PT, GradMode MODE, bool PREC, bool PMEAN>
static inline void prefetch_update_block(const OpArgs& a, int64_t qb, int64_t q_end) {
  const int64_t pq = qb + kPrefetchBlocks * kBlockQuads;
  if (pq >= q_end) return;
  const BlockRange r = block_range(a, pq, std::min(pq + kBlockQuads, q_end));
  prefetch_elems(a.mean, r.k_lo, r.k_hi);
  prefetch_state(a, a.momentum, r);
  prefetch_state(a, a.hess, r);
  prefetch_elems(static_cast<const RawT<PT>*>(a.param), r.k_lo, r.k_hi);
  if (MODE != GradMode::kAvgOnly) prefetch_elems(static_cast<const RawT<PT>*>(a.grad), r.k_lo, r.k_hi);
  if (MODE != GradMode::kGradOnly) {
    prefetch_elems(a.avg_grad, r.k_lo, r.k_hi);
    prefetch_elems(a.avg_hess_term, r.k_lo, r.k_hi);
  }
  if (PREC) prefetch_elems(a.prior_precision, r.k_lo, r.k_hi);
  if (PMEAN) prefetch_elems(a.prior_mean, r.k_lo, r.k_hi);
}

template <typename PT, bool PRICE, GradMode MODE, bool NEXT, bool SCALED, bool PREC, bool PMEAN>
static void update_range_t(const OpArgs& a, int64_t q_begin, int64_t q_end) {
  // the device scalars, once per range (Note [device scalars of an update] in ivon_math.h)
  const DeviceScalars d = read_device_scalars(a);
  const Draws draws = read_draws(a, /*stores_state=*/true);
  if (d.skip) {
    return skipped_update_range_t<PT, NEXT, PREC>(a, d.s, draws.next_draw, q_begin, q_end);
  }
  alignas(64) float eps[4 * kBlockQuads];
  alignas(64) float eps_next[4 * kBlockQuads];
  alignas(64) float momentum_buffer[4 * kBlockQuads], hess_buffer[4 * kBlockQuads];
  alignas(64) uint32_t words[4 * kBlockQuads];
  for (int64_t qb = q_begin; qb < q_end; qb += kBlockQuads) {
    const int64_t qe = std::min(qb + kBlockQuads, q_end);
    const BlockRange r = block_range(a, qb, qe);
    prefetch_update_block<PT, MODE, PREC, PMEAN>(a, qb, q_end);
    // the noise of `draw` is needed only to form price's noise * grad
    if (PRICE && MODE != GradMode::kAvgOnly) fill_normals(a.seed, draws.draw, qb, qe - qb, eps);
    if (NEXT) fill_normals(a.seed, draws.next_draw, qb, qe - qb, eps_next);
    float* momentum = state_block(a, a.momentum, r, momentum_buffer);
    float* hess = state_block(a, a.hess, r, hess_buffer);
    if (!a.bf16_state) {
      update_block<PT, PRICE, MODE, NEXT, SCALED, PREC, PMEAN>(a, d.s, r, momentum, hess, eps,
                                                              eps_next);
      continue;
    }
    // Note [bf16 state on the CPU]: the param gets the mean here, the next sample below
    update_block<PT, PRICE, MODE, false, SCALED, PREC, PMEAN>(a, d.s, r, momentum, hess, eps,
                                                             eps_next);
    fill_words(a.seed, draws.round_draw, qb, qe - qb, words);
    round_state_block<PT, NEXT, PREC>(a, d.s, r, momentum, hess, words, eps_next);
  }
}

// ---- run-time flags -> template instances (once per range, outside the loops) ----

static void sample_range(const OpArgs& a, int64_t qb, int64_t qe) {
  dispatch_sample(a, [&](auto pt, auto prec) {
    sample_range_t<decltype(pt), decltype(prec)::value>(a, qb, qe);
  });
}
static void accumulate_range(const OpArgs& a, int64_t qb, int64_t qe) {
  dispatch_accumulate(a, [&](auto pt, auto price, auto first, auto prec) {
    accumulate_range_t<decltype(pt), decltype(price)::value, decltype(first)::value,
                       decltype(prec)::value>(a, qb, qe);
  });
}
static void update_range(const OpArgs& a, int64_t qb, int64_t qe) {
  dispatch_update(a, [&](auto pt, auto price, auto mode, auto next, auto scaled, auto prec,
                         auto pmean) {
    update_range_t<decltype(pt), decltype(price)::value, decltype(mode)::value,
                   decltype(next)::value, decltype(scaled)::value, decltype(prec)::value,
                   decltype(pmean)::value>(a, qb, qe);
  });
}

}  // namespace IVON_MATH_NS
}  // namespace ivon_fast

// Each ISA TU exports its three range functions in one table.
#include "cpu_isa_table.h"

#define IVON_DEFINE_ISA_TABLE(NAME)                                                  \
  namespace ivon_fast {                                                              \
  const CpuIsaTable cpu_isa_##NAME = {#NAME, IVON_MATH_NS::sample_range,            \
                                      IVON_MATH_NS::accumulate_range,               \
                                      IVON_MATH_NS::update_range};                  \
  }
