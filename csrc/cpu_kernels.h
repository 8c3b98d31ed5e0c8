// cpu_kernels.h: the CPU kernels, written as plain loops over the shared element math of
// ivon_math.h and compiled once per instruction set (cpu_isa_*.cpp define IVON_MATH_NS and a
// `#pragma GCC target` before including this file). The vectorizer turns the loops into AVX2 /
// AVX-512 code; the functions here only process a range of quads, the threading lives in
// cpu_dispatch.cpp (the only CPU TU that sees ATen).
//
// Note [block structure of the CPU kernels]: a loop that makes a Philox call per quad and then
// updates four elements does not vectorize well (stride-4 accesses, a loop-carried quad). So each
// range is cut into blocks of kBlockQuads quads: the block's normals are made into a small
// buffer (vectorized across quads: Philox, the uniform conversion and Box-Muller are branch-free;
// Note [noise in chunks of 8 quads]), and the element loop reads the noise from that L1-resident
// buffer (vectorized across elements). A block's noise is made while the block before it runs
// its element loop (Note [software pipeline of the noise]). Block boundaries are quad-aligned,
// so a segment offset that is not a multiple of 4 just starts the first block's element loop a
// few normals into the buffer.
//
// Note [CPU cost of the fused step]: measured on a 2-core AVX-512 (Zen 4) VM, 10M fp32 elements,
// one core, the fused update (price, next sample) is compute-bound: cache-resident data is only
// about 5% faster than DRAM. Per element it runs 5 IEEE divisions and 3 square roots (the
// reference's op-for-op formulas plus one sqrt per Box-Muller pair): about 1.1 ns of the divide /
// sqrt unit alone (a 16-lane division occupies it 6 cycles, a square root 10), about as long as
// the memory stream. The noise of its two draws alone takes about 1.5 ns, bound by the
// multiply / FMA pipes (Philox's multiplies and Box-Muller's polynomials share them); both
// overlap only in part (about 2.5 ns together, 2.8 one after the other). Rewriting divisions as
// reciprocal multiplies would be faster but gives up the reference's rounding and the bit
// equality of the CPU and CUDA kernels.
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

// Note [noise in chunks of 8 quads]: the noise is made in chunks of 8 quads (32 normals or Philox
// words of one draw) with G chunks at a time (normals_chunks, words_chunks): in the vector
// builds one Philox call per quad (8 lanes: one AVX-512 vector, two AVX2 vectors), one
// Box-Muller per pair of words (16 pairs per chunk: one AVX-512 vector), and a transpose of the
// quad-major results into element order (interleave8). Such a group of chunks is short and
// straight-line, so a loop can interleave it with other work (Note [software pipeline of the
// noise]); a block's noise is a loop of groups. The Philox key schedule depends only on the
// seed and is formed once per range (PhiloxKey). The portable build makes each quad with the
// scalar normals4 / philox4x32_10 of ivon_math.h, the CUDA kernels' own functions.

#if defined(IVON_CPU_AVX512) || defined(IVON_CPU_AVX2)
// Note [Philox with intrinsics]: GCC vectorizes the scalar Philox of ivon_math.h over 32-bit
// lanes, which needs even/odd shuffles around every 32x32->64 multiply; Philox then costs more
// than the whole update. Here each 64-bit lane holds one 32-bit Philox word: vpmuludq reads only
// the low halves, so the products need no shuffle (the garbage left in the upper halves is never
// read), and the three-way xor is one vpternlog on AVX-512. Integer arithmetic: the outputs equal
// the scalar Philox bit for bit (tests compare these builds with the portable one).
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
  // the low words of x's lanes, then of y's, in one store (Note [store forwarding])
  static void store_lo32x2(uint32_t* p, V x, V y) {
    const V even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    _mm512_storeu_si512(p, _mm512_permutex2var_epi32(x, even, y));
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
  // the low words of x's lanes, then of y's, in one store (Note [store forwarding])
  static void store_lo32x2(uint32_t* p, V x, V y) {
    const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    const __m256i lo = _mm256_permutevar8x32_epi32(x, even);
    const __m256i hi = _mm256_permutevar8x32_epi32(y, even);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute2x128_si256(lo, hi, 0x20));
  }
};
#endif

// the round keys of a seed, broadcast
struct PhiloxKey {
  PhiloxVec::V k0[10], k1[10];
};

static inline PhiloxKey philox_key(uint64_t seed) {
  PhiloxKey key;
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    key.k0[r] = PhiloxVec::set1(k0);
    key.k1[r] = PhiloxVec::set1(k1);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return key;
}

constexpr int kPhiloxVecs = 8 / PhiloxVec::kLanes;  // vectors per chunk of 8 quads

// The Philox words of G chunks: chunk g is quads q0[g] .. q0[g] + 7 at draw[g]; its words 0 (at
// L) and 2 (at 8 + L) of quad q0[g] + L go to a + 16 g, words 1 and 3 to b + 16 g (the layout
// of interleave8). The G * kPhiloxVecs vectors run round by round, interleaved: independent
// multiply chains in flight (at most 4 vectors: 16 state registers; AVX2 has 16 in all).
template <int G>
static inline __attribute__((always_inline)) void philox_in_flight(
    const PhiloxKey& key, const uint64_t* draw, const int64_t* q0, uint32_t* __restrict a,
    uint32_t* __restrict b) {
  using P = PhiloxVec;
  using V = P::V;
  constexpr int kVecs = G * kPhiloxVecs;
  static_assert(kVecs <= 4, "more vectors in flight than registers");
  const V m0 = P::set1(0xD2511F53u), m1 = P::set1(0xCD9E8D57u);
  V c0[kVecs], c1[kVecs], c2[kVecs], c3[kVecs];
  for (int v = 0; v < kVecs; ++v) {
    const int g = v / kPhiloxVecs;
    const V q = P::add(P::set1(uint64_t(q0[g] + P::kLanes * (v % kPhiloxVecs))), P::lanes());
    c0[v] = q;
    c1[v] = P::hi(q);
    c2[v] = P::set1(uint32_t(draw[g]));
    c3[v] = P::set1(uint32_t(draw[g] >> 32));
  }
#pragma GCC unroll 10
  for (int r = 0; r < 10; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) {
      const V p0 = P::mul(c0[v], m0);
      const V p1 = P::mul(c2[v], m1);
      c0[v] = P::xor3(P::hi(p1), c1[v], key.k0[r]);
      c2[v] = P::xor3(P::hi(p0), c3[v], key.k1[r]);
      c1[v] = p1;
      c3[v] = p0;
    }
  }
  // Note [store forwarding]: a vector load that spans two smaller stores cannot take its data
  // from the store buffer and waits until they reach the cache; issued right after the stores,
  // as the Box-Muller loop's are, that stall cost more than Philox itself. So each 8-word half
  // row of a chunk is written by stores exactly as wide as the loads that read it: one AVX-512
  // store per row, or one AVX2 store per half row, each combining two vectors' low words.
  for (int g = 0; g < G; ++g) {
    const int v = g * kPhiloxVecs, w = v + kPhiloxVecs - 1;
    uint32_t* ag = a + 16 * g;
    uint32_t* bg = b + 16 * g;
    if constexpr (kPhiloxVecs == 1) {
      P::store_lo32x2(ag, c0[v], c2[v]);
      P::store_lo32x2(bg, c1[v], c3[v]);
    } else {
      P::store_lo32x2(ag, c0[v], c0[w]);
      P::store_lo32x2(ag + 8, c2[v], c2[w]);
      P::store_lo32x2(bg, c1[v], c1[w]);
      P::store_lo32x2(bg + 8, c3[v], c3[w]);
    }
  }
}

// philox_in_flight over G chunks, 4 vectors at a time
template <int G>
static inline __attribute__((always_inline)) void philox_chunks(
    const PhiloxKey& key, const uint64_t* draw, const int64_t* q0, uint32_t* __restrict a,
    uint32_t* __restrict b) {
  constexpr int kInFlight = 4 / kPhiloxVecs < G ? 4 / kPhiloxVecs : G;
  static_assert(G % kInFlight == 0, "whole groups of chunks");
  for (int g = 0; g < G; g += kInFlight) {
    philox_in_flight<kInFlight>(key, draw + g, q0 + g, a + 16 * g, b + 16 * g);
  }
}

// out[4 L + i] = a[L], b[L], a[8 + L], b[8 + L] for i = 0 .. 3: the words (or normals) of a
// chunk from philox_chunks' layout into element order. GCC makes single-lane inserts of the
// plain loop on AVX2, so this transposes with shuffles; T (float or uint32_t) moves through
// float intrinsics, whose accesses may alias any type.
template <typename T>
static inline void interleave8(const T* __restrict a, const T* __restrict b, T* __restrict out) {
  static_assert(sizeof(T) == 4, "32-bit lanes");
  const float* fa = reinterpret_cast<const float*>(a);
  const float* fb = reinterpret_cast<const float*>(b);
  float* fo = reinterpret_cast<float*>(out);
#if defined(IVON_CPU_AVX512)
  const __m512 va = _mm512_load_ps(fa), vb = _mm512_load_ps(fb);  // vb is lanes 16 .. 31
  const __m512i lo = _mm512_setr_epi32(0, 16, 8, 24, 1, 17, 9, 25, 2, 18, 10, 26, 3, 19, 11, 27);
  const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(4));
  _mm512_storeu_ps(fo, _mm512_permutex2var_ps(va, lo, vb));
  _mm512_storeu_ps(fo + 16, _mm512_permutex2var_ps(va, hi, vb));
#else
  const __m256 a0 = _mm256_load_ps(fa), a1 = _mm256_load_ps(fa + 8);
  const __m256 b0 = _mm256_load_ps(fb), b1 = _mm256_load_ps(fb + 8);
  // per 128-bit half (quads L and L + 4): t0 = a, b of quads 0, 1; t1 of 2, 3; t2, t3 the same
  // of c = a + 8, d = b + 8; then qXY = a, b, c, d of quad X | of quad Y
  const __m256 t0 = _mm256_unpacklo_ps(a0, b0), t1 = _mm256_unpackhi_ps(a0, b0);
  const __m256 t2 = _mm256_unpacklo_ps(a1, b1), t3 = _mm256_unpackhi_ps(a1, b1);
  const __m256d d0 = _mm256_castps_pd(t0), d1 = _mm256_castps_pd(t1);
  const __m256d d2 = _mm256_castps_pd(t2), d3 = _mm256_castps_pd(t3);
  const __m256 q04 = _mm256_castpd_ps(_mm256_unpacklo_pd(d0, d2));
  const __m256 q15 = _mm256_castpd_ps(_mm256_unpackhi_pd(d0, d2));
  const __m256 q26 = _mm256_castpd_ps(_mm256_unpacklo_pd(d1, d3));
  const __m256 q37 = _mm256_castpd_ps(_mm256_unpackhi_pd(d1, d3));
  _mm256_storeu_ps(fo, _mm256_permute2f128_ps(q04, q15, 0x20));
  _mm256_storeu_ps(fo + 8, _mm256_permute2f128_ps(q26, q37, 0x20));
  _mm256_storeu_ps(fo + 16, _mm256_permute2f128_ps(q04, q15, 0x31));
  _mm256_storeu_ps(fo + 24, _mm256_permute2f128_ps(q26, q37, 0x31));
#endif
}

// out[g][j] = the normal of global index 4 * q0[g] + j at draw[g], for j < 32, g < G.
template <int G>
static inline __attribute__((always_inline)) void normals_chunks(
    const PhiloxKey& key, const uint64_t* draw, const int64_t* q0, float* const* out) {
  alignas(64) uint32_t a[16 * G], b[16 * G];
  alignas(64) float na[16 * G], nb[16 * G];
  philox_chunks<G>(key, draw, q0, a, b);
  for (int p = 0; p < 16 * G; ++p) {
    box_muller(uint_to_uniform(a[p]), uint_to_uniform(b[p]), &na[p], &nb[p]);
  }
  for (int g = 0; g < G; ++g) interleave8(na + 16 * g, nb + 16 * g, out[g]);
}

// out[g][j] = the Philox word of global index 4 * q0[g] + j at draw[g], for j < 32, g < G.
template <int G>
static inline void words_chunks(const PhiloxKey& key, const uint64_t* draw, const int64_t* q0,
                                uint32_t* const* out) {
  alignas(64) uint32_t a[16 * G], b[16 * G];
  philox_chunks<G>(key, draw, q0, a, b);
  for (int g = 0; g < G; ++g) interleave8(a + 16 * g, b + 16 * g, out[g]);
}
#else
struct PhiloxKey {
  uint64_t seed;
};

static inline PhiloxKey philox_key(uint64_t seed) { return {seed}; }

template <int G>
static inline void normals_chunks(const PhiloxKey& key, const uint64_t* draw, const int64_t* q0,
                                  float* const* out) {
  for (int g = 0; g < G; ++g) {
    for (int l = 0; l < 8; ++l) {
      const F32x4 n = normals4(key.seed, draw[g], uint64_t(q0[g] + l));
      float* o = out[g] + 4 * l;
      o[0] = n.v0, o[1] = n.v1, o[2] = n.v2, o[3] = n.v3;
    }
  }
}

template <int G>
static inline void words_chunks(const PhiloxKey& key, const uint64_t* draw, const int64_t* q0,
                                uint32_t* const* out) {
  for (int g = 0; g < G; ++g) {
    for (int l = 0; l < 8; ++l) {
      const uint64_t quad = uint64_t(q0[g] + l);
      const U32x4 x = philox4x32_10(uint32_t(quad), uint32_t(quad >> 32), uint32_t(draw[g]),
                                    uint32_t(draw[g] >> 32), uint32_t(key.seed),
                                    uint32_t(key.seed >> 32));
      uint32_t* o = out[g] + 4 * l;
      o[0] = x.x0, o[1] = x.x1, o[2] = x.x2, o[3] = x.x3;
    }
  }
}
#endif

constexpr int kFillChunks = 4;  // chunks per group of fill_normals / fill_words

// out[j] = the value of global index 4 * q0 + j at `draw`, for nq <= kBlockQuads quads (rounded
// up to whole groups of chunks: the buffers hold a whole block), made by chunks(draws, qs, outs),
// one group of kFillChunks chunks at a time. The chunks lambdas below are always_inline: as a
// call, the pipelined update lost its Philox multipliers' registers (a memory operand per
// multiply) and ran about 3% slower.
template <typename T, typename Chunks>
static inline __attribute__((always_inline)) void fill_block(uint64_t draw, int64_t q0,
                                                             int64_t nq, T* __restrict out,
                                                             Chunks&& chunks) {
  static_assert(kBlockQuads % (8 * kFillChunks) == 0, "fill_block writes whole groups");
  for (int64_t j = 0; j < nq; j += 8 * kFillChunks) {
    uint64_t draws[kFillChunks];
    int64_t qs[kFillChunks];
    T* outs[kFillChunks];
    for (int g = 0; g < kFillChunks; ++g) {
      draws[g] = draw, qs[g] = q0 + j + 8 * g, outs[g] = out + 4 * (j + 8 * g);
    }
    chunks(draws, qs, outs);
  }
}

// eps[j] = the normal of global index 4 * q0 + j
static inline void fill_normals(const PhiloxKey& key, uint64_t draw, int64_t q0, int64_t nq,
                                float* __restrict eps) {
  fill_block(draw, q0, nq, eps,
             [&](const uint64_t* d, const int64_t* q, float* const* o)
                 __attribute__((always_inline)) { normals_chunks<kFillChunks>(key, d, q, o); });
}

// bits[j] = the Philox word of global index 4 * q0 + j (the random bits of stochastic rounding,
// Note [bf16 state] in ivon_math.h)
static inline void fill_words(const PhiloxKey& key, uint64_t draw, int64_t q0, int64_t nq,
                              uint32_t* __restrict bits) {
  fill_block(draw, q0, nq, bits,
             [&](const uint64_t* d, const int64_t* q, uint32_t* const* o)
                 __attribute__((always_inline)) { words_chunks<kFillChunks>(key, d, q, o); });
}

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

// Note [rare inputs of an update]: a grad scale, a prior precision and a prior mean are rare
// inputs, so the CPU update has one instance per common flag combination that reads none of them
// (no load, no division) and one (RARE) that reads all three, with neutral values for those the
// op was not given, values that change no bit: a grad scale of 1 (x / 1.0f is x; the default of
// Scalars::grad_scale, scalars.h), the weight decay as every element's prior precision (what
// delta is without one) and a prior mean of +0 (m - 0.0f is m, -0 included). Merging the 7
// combinations of the three into one instance cuts the CPU update from 288 to 72 instances per
// instruction set, which is most of the extension's build time (Note [where the noise is
// pipelined]). An op with a rare input pays: the L1 loads of the neutral values, a division by 1
// per grad value it reads (two for 'gradsq''s average), and it runs without the noise pipeline
// and its skip of a debias of 1. (x / 1.0f is x in IEEE arithmetic, the kernels' mode.)
struct RareArrays {
  const float* precision;  // the prior precision, indexed by the local k
  const float* mean;       // the prior mean
};

template <bool RARE>
class RareInputs {
 public:
  RareInputs(const OpArgs& a, float wd) : given_{a.prior_precision, a.prior_mean} {
    if constexpr (RARE) {
      if (given_.precision == nullptr) std::fill_n(wd_, kElems, wd);
      if (given_.mean == nullptr) std::fill_n(zero_, kElems, 0.0f);
    }
  }

  // the arrays of the block r: an input the op was given, else the neutral values (indexed like
  // the noise buffers); nothing for an instance that is not RARE (it reads neither)
  RareArrays at(BlockRange r) const {
    if constexpr (!RARE) return {nullptr, nullptr};
    return {given_.precision != nullptr ? given_.precision : wd_ + r.shift,
            given_.mean != nullptr ? given_.mean : zero_ + r.shift};
  }

 private:
  static constexpr int64_t kElems = RARE ? 4 * kBlockQuads : 1;
  RareArrays given_;
  alignas(64) float wd_[kElems];
  alignas(64) float zero_[kElems];
};

// Note [bf16 state on the CPU]: the float32-state loops below run unchanged on bf16 state: a
// block's momentum and hess are first widened into float32 buffers (L1-resident, indexed like
// the noise buffers), the loop reads and writes those, and the new values are then rounded into
// the bf16 arrays (Note [bf16 state] in ivon_math.h). So bf16 state adds no instances of the
// update loop, only these short vectorized passes. An update with a next sample runs the loop
// without it and draws the sample in the rounding pass, around the rounded hess.

// The element's delta (Note [per-element prior] in ivon_math.h): the prior precision when the
// instance has one (PREC), else the scalar weight decay; PREC is a template flag, so the loops
// below neither load nor branch on an absent prior.
template <bool PREC>
static inline float delta_at(const float* __restrict prec, int64_t k, const Scalars& s) {
  return PREC ? prec[k] : s.wd;
}

// A state array (momentum or hess) of the elements k0 .. k0 + count - 1 as float32 values
// indexed by the local k: the array itself (float32 state), or `buffer` filled with its widened
// bf16 values (BF16: a compile-time a.bf16_state).
template <bool BF16>
static inline float* state_elems(void* state, int64_t k0, int64_t count,
                                 float* __restrict buffer) {
  if (!BF16) return static_cast<float*>(state);
  const uint16_t* __restrict bits = static_cast<const uint16_t*>(state) + k0;
  for (int64_t i = 0; i < count; ++i) buffer[i] = bf16_bits_to_float(bits[i]);
  return buffer - k0;
}

// A block's state array (momentum or hess) as float32 values indexed by the local k: the array
// itself (float32 state), or `buffer` filled with its widened bf16 values at the block's
// positions (k + r.shift, like the noise buffers).
static inline float* state_block(const OpArgs& a, void* state, BlockRange r,
                                 float* __restrict buffer) {
  if (!a.bf16_state) return static_cast<float*>(state);
  return state_elems<true>(state, r.k_lo, r.k_hi - r.k_lo, buffer + r.shift + r.k_lo);
}

// The sample of the elements k0 .. k0 + n - 1 (n: the compile-time N when N > 0, else `count`);
// hess and e (the normals) are indexed by the local k, like every array of the element loops.
template <typename PT, bool PREC, int64_t N = 0>
static inline __attribute__((always_inline)) void sample_elems(const OpArgs& a, int64_t k0,
                                                               int64_t count,
                                                               const float* __restrict hess,
                                                               const float* __restrict e) {
  RawT<PT>* __restrict param = static_cast<RawT<PT>*>(a.param);
  const float* __restrict mean = a.mean;
  const float* __restrict prec = a.prior_precision;
  const Scalars s = a.s;
  const int64_t n = N > 0 ? N : count;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = k0 + i;
    param[k] = float_to_raw<PT>(mean[k] + noise_of(e[k], hess[k], delta_at<PREC>(prec, k, s), s));
  }
}

template <typename PT, bool PRICE, bool FIRST, bool PREC, int64_t N = 0>
static inline __attribute__((always_inline)) void accumulate_elems(
    const OpArgs& a, int64_t k0, int64_t count, const float* __restrict hess,
    const float* __restrict e) {
  const RawT<PT>* __restrict grad = static_cast<const RawT<PT>*>(a.grad);
  const float* __restrict prec = a.prior_precision;
  float* __restrict avg_grad = a.avg_grad;
  float* __restrict avg_ht = a.avg_hess_term;
  const Scalars s = a.s;
  const int64_t n = N > 0 ? N : count;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = k0 + i;
    const float g = raw_to_float<PT>(grad[k]);
    const float noise = PRICE ? noise_of(e[k], hess[k], delta_at<PREC>(prec, k, s), s) : 0.0f;
    avg_grad[k] = running_mean<FIRST>(avg_grad[k], g, s);
    avg_ht[k] = running_mean<FIRST>(avg_ht[k], hess_term_of<PRICE>(g, noise), s);
  }
}

// The update of the elements k0 .. k0 + n - 1 (as sample_elems); `scalars` holds the device
// scalars' values (read once per range by update_range_t); `momentum` and `hess` are the float32
// state (state_block); `rare` the rare inputs of a RARE instance (Note [rare inputs of an update]);
// DEBIAS_ONE: scalars.debias is exactly 1.0f (Note [debias of one] in ivon_math.h).
template <typename PT, bool PRICE, GradMode MODE, bool NEXT, bool RARE, bool DEBIAS_ONE = false,
          int64_t N = 0>
static inline __attribute__((always_inline)) void update_elems(
    const OpArgs& a, const Scalars& scalars, int64_t k0, int64_t count,
    float* __restrict momentum, float* __restrict hess, const float* __restrict e,
    const float* __restrict e_next, RareArrays rare) {
  RawT<PT>* __restrict param = static_cast<RawT<PT>*>(a.param);
  const RawT<PT>* __restrict grad = static_cast<const RawT<PT>*>(a.grad);
  float* __restrict mean = a.mean;
  const float* __restrict avg_grad = a.avg_grad;
  const float* __restrict avg_ht = a.avg_hess_term;
  const float* __restrict prec = rare.precision;
  const float* __restrict prior_mean = rare.mean;
  const Scalars s = scalars;  // a local copy: provably not aliased by the stores below
  const int64_t n = N > 0 ? N : count;
  // Note [vectorizing the update]: GCC does not use the __restrict of these local pointers, so
  // it can vectorize only behind run-time overlap checks of every pair of arrays, and gives up
  // beyond its limit of such checks (10): the averages (kGradAvg, kAvgOnly) or a prior input
  // left the loop scalar. The arrays of a segment never overlap one another (an element's
  // reads and writes stay within iteration k), which ivdep asserts.
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = k0 + i;
    float m = mean[k], mom = momentum[k], h = hess[k];
    const float delta = delta_at<RARE>(prec, k, s);
    const float mu0 = RARE ? prior_mean[k] : 0.0f;
    // only what the mode reads is loaded: grad is null for kAvgOnly, the averages for kGradOnly
    const float g = MODE == GradMode::kAvgOnly ? 0.0f : raw_to_float<PT>(grad[k]);
    const float ag = MODE == GradMode::kGradOnly ? 0.0f : avg_grad[k];
    const float at = MODE == GradMode::kGradOnly ? 0.0f : avg_ht[k];
    const float ek = PRICE && MODE != GradMode::kAvgOnly ? e[k] : 0.0f;
    float grad_mean, hess_term;
    grad_statistics<PRICE, MODE, RARE>(g, ek, h, delta, ag, at, s, grad_mean, hess_term);
    update_state<PRICE, RARE, DEBIAS_ONE>(grad_mean, hess_term, delta, mu0, m, mom, h, s);
    mean[k] = m;
    momentum[k] = mom;
    hess[k] = h;
    param[k] = float_to_raw<PT>(param_value<NEXT>(m, h, delta, NEXT ? e_next[k] : 0.0f, s));
  }
}

// bf16 state (Note [bf16 state on the CPU]): the block's new float32 momentum and hess (in the
// buffers) rounded into the bf16 arrays with the Philox words `words`; with NEXT the param gets
// the sample of next_draw around the mean and the rounded hess.
template <typename PT, bool NEXT, bool RARE>
static void round_state_block(const OpArgs& a, const Scalars& s, BlockRange r,
                              const float* __restrict momentum, const float* __restrict hess,
                              const uint32_t* __restrict words,
                              const float* __restrict eps_next, RareArrays rare) {
  uint16_t* __restrict momentum_bits = static_cast<uint16_t*>(a.momentum);
  uint16_t* __restrict hess_bits = static_cast<uint16_t*>(a.hess);
  RawT<PT>* __restrict param = static_cast<RawT<PT>*>(a.param);
  const float* __restrict mean = a.mean;
  const float* __restrict prec = rare.precision;
  const uint32_t* __restrict w = words + r.shift;
  const float* __restrict e_next = eps_next + r.shift;
#pragma GCC ivdep
  for (int64_t k = r.k_lo; k < r.k_hi; ++k) {
    momentum_bits[k] = stochastic_round_bf16(momentum[k], w[k] & 0xffffu);
    const uint16_t h = stochastic_round_bf16(hess[k], w[k] >> 16);
    hess_bits[k] = h;
    if (NEXT) {
      param[k] = float_to_raw<PT>(
          param_value<true>(mean[k], bf16_bits_to_float(h), delta_at<RARE>(prec, k, s),
                            e_next[k], s));
    }
  }
}

// A skipped update (found_inf nonzero, Note [device scalars of an update]): mean, momentum and
// hess are neither read nor written beyond what the param needs; param <- the mean, or the sample
// of next_draw around the mean and hess. Not a hot path.
template <typename PT, bool NEXT, bool RARE>
static void skipped_update_range_t(const OpArgs& a, const Scalars& s, uint64_t next_draw,
                                   int64_t q_begin, int64_t q_end, const RareInputs<RARE>& rare) {
  alignas(64) float eps_next[4 * kBlockQuads];
  alignas(64) float hess_buffer[4 * kBlockQuads];
  RawT<PT>* __restrict param = static_cast<RawT<PT>*>(a.param);
  const float* __restrict mean = a.mean;
  const PhiloxKey key = philox_key(a.seed);
  for (int64_t qb = q_begin; qb < q_end; qb += kBlockQuads) {
    const int64_t qe = std::min(qb + kBlockQuads, q_end);
    if (NEXT) fill_normals(key, next_draw, qb, qe - qb, eps_next);
    const BlockRange r = block_range(a, qb, qe);
    const float* __restrict hess = NEXT ? state_block(a, a.hess, r, hess_buffer) : nullptr;
    const float* __restrict e_next = eps_next + r.shift;
    const float* __restrict prec = rare.at(r).precision;
    for (int64_t k = r.k_lo; k < r.k_hi; ++k) {
      param[k] = float_to_raw<PT>(param_value<NEXT>(
          mean[k], NEXT ? hess[k] : 0.0f, NEXT ? delta_at<RARE>(prec, k, s) : 0.0f,
          NEXT ? e_next[k] : 0.0f, s));
    }
  }
}

// Note [prefetch during the noise]: a block that first computes its normals (no memory traffic)
// and then streams its elements (the bf16-state update, a block cut by the range) leaves the
// memory system idle during the first phase, and the hardware prefetchers only restart on the
// second phase's misses. So each block prefetches the elements of the block kPrefetchBlocks
// ahead before computing its noise: the loads then overlap with the Philox / Box-Muller work.
// Whole blocks of the software pipeline stream their elements evenly; there the prefetch
// measured neither faster nor slower, and it stays for the others.
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

// Note [software pipeline of the noise]: an element loop alone is bound by its IEEE divisions
// and square roots (the drop-in step: 5 and 2 per element, Note [CPU cost of the fused step]),
// the noise by the multiply / FMA pipes (Philox's 32x32 multiplies, Box-Muller's polynomials).
// The core can run both at once, but only what is in its out-of-order window at the same time,
// a few hundred instructions: a block that made all its noise first (thousands of instructions)
// and then ran its element loop took the sum of the two times. So each whole block makes the
// noise of the NEXT block in pieces, interleaved with its own element loop: a piece is the noise
// of kPieceQuads quads of the next block for each draw the op reads (Note [noise in chunks of 8
// quads]; 4 chunks for the drop-in step) followed by the loop over kPieceQuads quads of this
// block, 64 elements, all one basic block. The noise buffers alternate between blocks; the first
// block's noise is made before the loop, and a block cut by the range or the segment (the first
// and the last) and the range's last block make the next block's noise whole (if any) and then
// run their loop. Each element gets the same operations in the same order: the bits do not
// change. Measured on a 2-core AVX-512 (Zen 4) VM, 10M fp32 elements, one core: the drop-in step
// from 2.8 to about 2.5 ns per element, sample about 10% faster; 16 quads per piece beat 8 (too
// few noise chains in flight) and 32 (spills), and finer interleaving (one noise chunk per update
// vector) was slower.
//
// Note [where the noise is pipelined]: the pipeline doubles the compile time of an instance (its
// pieces are one unrolled basic block each), and the CPU kernels have hundreds of instances per
// instruction set. So it is built only where it pays: in the AVX-512 build (the AVX2 build
// measured no gain: its noise alone keeps the pipes busy) and for the instances without a rare
// input (a grad scale, a prior precision or a prior mean; Note [prior flags]), which run one
// block after the other as before. That keeps the whole extension's build within 3 minutes on 2
// cores.
constexpr int64_t kPieceQuads = 16;
#if defined(IVON_CPU_AVX512)
constexpr bool kPipelineIsa = true;
#else
constexpr bool kPipelineIsa = false;
#endif

// The pieces of a whole block at local index k0: piece(k, e) for each piece's elements from the
// local k, after the same piece of the next block's noise, quads q_next .., into ne.
template <int D, typename Piece>
static inline __attribute__((always_inline)) void whole_block(
    const PhiloxKey& key, const uint64_t* draw, int64_t k0, int64_t q_next,
    const float* const* e, float* const* ne, Piece& piece) {
  constexpr int kChunks = D * int(kPieceQuads / 8);
  for (int64_t j = 0; j < kBlockQuads; j += kPieceQuads) {
    if constexpr (kChunks > 0) {
      uint64_t dr[kChunks];
      int64_t qs[kChunks];
      float* outs[kChunks];
      for (int c = 0; c < kChunks; ++c) {
        const int64_t h = j + 8 * (c / D);
        dr[c] = draw[c % D], qs[c] = q_next + h, outs[c] = ne[c % D] + 4 * h;
      }
      normals_chunks<kChunks>(key, dr, qs, outs);
    }
    piece(k0 + 4 * j, e);
  }
}

// An op over the blocks of quads [q_begin, q_end) of a segment with the normals of D draws
// (draw[0 .. D)) made one block ahead. Per block: before(qb); then, with PIPELINE (Note
// [software pipeline of the noise]) and a whole block that is not the range's last, piece(k, e)
// per piece; else cut(r, e) over the block's elements. e[d] holds draw d's normals of the
// block, indexed by the local k.
template <bool PIPELINE, int D, typename Before, typename Piece, typename Cut>
static inline __attribute__((always_inline)) void noise_ahead_blocks(
    const OpArgs& a, const PhiloxKey& key, const uint64_t* draw, int64_t q_begin, int64_t q_end,
    Before&& before, Piece&& piece, Cut&& cut) {
  static_assert(kBlockQuads % kPieceQuads == 0 && kPieceQuads % 8 == 0, "whole chunks");
  constexpr int kBuffers = D > 0 ? D : 1;
  alignas(64) float eps[2][kBuffers][4 * kBlockQuads];
  const int64_t nq0 = std::min(kBlockQuads, q_end - q_begin);
  for (int d = 0; d < D; ++d) fill_normals(key, draw[d], q_begin, nq0, eps[0][d]);
  int cur = 0;
  for (int64_t qb = q_begin; qb < q_end; qb += kBlockQuads, cur ^= 1) {
    const int64_t qe = std::min(qb + kBlockQuads, q_end);
    const BlockRange r = block_range(a, qb, qe);
    before(qb);
    const float* e[kBuffers];
    float* ne[kBuffers];
    for (int d = 0; d < kBuffers; ++d) e[d] = eps[cur][d] + r.shift, ne[d] = eps[cur ^ 1][d];
    const bool last = qe == q_end;
    if constexpr (PIPELINE) {
      if (!last && r.k_lo + r.shift == 0 && r.k_hi + r.shift == 4 * kBlockQuads) {  // whole
        whole_block<D>(key, draw, r.k_lo, qe, e, ne, piece);
        continue;
      }
    }
    for (int d = 0; d < D && !last; ++d) {
      fill_normals(key, draw[d], qe, std::min(kBlockQuads, q_end - qe), ne[d]);
    }
    cut(r, e);
  }
}

// ---- range functions: quads [q_begin, q_end) of the segment, one thread ----

template <typename PT, bool PREC, bool BF16>
static void sample_range_state(const OpArgs& a, uint64_t draw, int64_t q_begin, int64_t q_end) {
  constexpr int64_t kPiece = 4 * kPieceQuads;
  alignas(64) float hess_buffer[4 * kBlockQuads];
  const auto before = [&](int64_t qb) {  // Note [prefetch during the noise]
    const int64_t pq = qb + kPrefetchBlocks * kBlockQuads;
    if (pq >= q_end) return;
    const BlockRange r = block_range(a, pq, std::min(pq + kBlockQuads, q_end));
    prefetch_elems(a.mean, r.k_lo, r.k_hi);
    prefetch_state(a, a.hess, r);
    prefetch_elems(static_cast<const RawT<PT>*>(a.param), r.k_lo, r.k_hi);
    if (PREC) prefetch_elems(a.prior_precision, r.k_lo, r.k_hi);
  };
  const auto piece = [&](int64_t k, const float* const* e) {
    const float* hess = state_elems<BF16>(a.hess, k, kPiece, hess_buffer);
    sample_elems<PT, PREC, kPiece>(a, k, 0, hess, e[0]);
  };
  const auto cut = [&](BlockRange r, const float* const* e) {
    const int64_t n = r.k_hi - r.k_lo;
    sample_elems<PT, PREC>(a, r.k_lo, n, state_elems<BF16>(a.hess, r.k_lo, n, hess_buffer), e[0]);
  };
  noise_ahead_blocks<kPipelineIsa && !PREC, 1>(a, philox_key(a.seed), &draw, q_begin, q_end,
                                                before, piece, cut);
}

template <typename PT, bool PREC>
static void sample_range_t(const OpArgs& a, int64_t q_begin, int64_t q_end) {
  const uint64_t draw = read_draws(a).draw;  // once per range
  if (a.bf16_state) return sample_range_state<PT, PREC, true>(a, draw, q_begin, q_end);
  sample_range_state<PT, PREC, false>(a, draw, q_begin, q_end);
}

template <typename PT, bool PRICE, bool FIRST, bool PREC, bool BF16>
static void accumulate_range_state(const OpArgs& a, uint64_t draw, int64_t q_begin,
                                   int64_t q_end) {
  constexpr int64_t kPiece = 4 * kPieceQuads;
  alignas(64) float hess_buffer[4 * kBlockQuads];
  // gradsq's accumulate reads neither noise nor hess
  const auto hess_of = [&](int64_t k0, int64_t n) {
    return PRICE ? state_elems<BF16>(a.hess, k0, n, hess_buffer) : nullptr;
  };
  const auto piece = [&](int64_t k, const float* const* e) {
    accumulate_elems<PT, PRICE, FIRST, PREC, kPiece>(a, k, 0, hess_of(k, kPiece), e[0]);
  };
  const auto cut = [&](BlockRange r, const float* const* e) {
    const int64_t n = r.k_hi - r.k_lo;
    accumulate_elems<PT, PRICE, FIRST, PREC>(a, r.k_lo, n, hess_of(r.k_lo, n), e[0]);
  };
  noise_ahead_blocks<kPipelineIsa && !PREC, PRICE ? 1 : 0>(a, philox_key(a.seed), &draw, q_begin,
                                                            q_end, [](int64_t) {}, piece, cut);
}

template <typename PT, bool PRICE, bool FIRST, bool PREC>
static void accumulate_range_t(const OpArgs& a, int64_t q_begin, int64_t q_end) {
  const uint64_t draw = read_draws(a).draw;  // once per range
  if (a.bf16_state) {
    return accumulate_range_state<PT, PRICE, FIRST, PREC, true>(a, draw, q_begin, q_end);
  }
  accumulate_range_state<PT, PRICE, FIRST, PREC, false>(a, draw, q_begin, q_end);
}

template <typename PT, GradMode MODE, bool RARE>
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
  if (RARE) {
    prefetch_elems(a.prior_precision, r.k_lo, r.k_hi);
    prefetch_elems(a.prior_mean, r.k_lo, r.k_hi);
  }
}

// float32 state: Note [software pipeline of the noise], over the draws the instance reads
template <typename PT, bool PRICE, GradMode MODE, bool NEXT, bool RARE>
static void update_range_f32(const OpArgs& a, const Scalars& s, const Draws& draws,
                             int64_t q_begin, int64_t q_end, const RareInputs<RARE>& rare) {
  constexpr bool EPS = PRICE && MODE != GradMode::kAvgOnly;  // price's noise * grad needs it
  constexpr int D = int(EPS) + int(NEXT);
  constexpr int kNext = D > 0 ? D - 1 : 0;  // e[kNext]: next_draw's normals (NEXT)
  const uint64_t draw[2] = {EPS ? draws.draw : draws.next_draw, draws.next_draw};
  float* momentum = static_cast<float*>(a.momentum);
  float* hess = static_cast<float*>(a.hess);
  const auto before = [&](int64_t qb) { prefetch_update_block<PT, MODE, RARE>(a, qb, q_end); };
  // Note [where the noise is pipelined]: only without RARE, so piece reads no rare input
  constexpr bool kPipeline = kPipelineIsa && !RARE;
  // Note [debias of one] in ivon_math.h: from about step 165 on (and without debiasing) one of
  // the element's five divisions goes; tested per piece, a branch the predictor always gets right
  const bool debias_one = s.debias == 1.0f;
  const auto piece = [&](int64_t k, const float* const* e) {
    with_bool(debias_one, [&](auto one) {
      update_elems<PT, PRICE, MODE, NEXT, false, decltype(one)::value, 4 * kPieceQuads>(
          a, s, k, 0, momentum, hess, e[0], e[kNext], RareArrays{});
    });
  };
  const auto cut = [&](BlockRange r, const float* const* e) {
    update_elems<PT, PRICE, MODE, NEXT, RARE>(a, s, r.k_lo, r.k_hi - r.k_lo, momentum, hess, e[0],
                                              e[kNext], rare.at(r));
  };
  noise_ahead_blocks<kPipeline, D>(a, philox_key(a.seed), draw, q_begin, q_end, before, piece,
                                   cut);
}

// bf16 state (Note [bf16 state on the CPU]): per block, the noise, the widened state, the
// update and the rounding pass, one after the other.
template <typename PT, bool PRICE, GradMode MODE, bool NEXT, bool RARE>
static void update_range_bf16(const OpArgs& a, const Scalars& s, const Draws& draws,
                              int64_t q_begin, int64_t q_end, const RareInputs<RARE>& rare) {
  const PhiloxKey key = philox_key(a.seed);
  alignas(64) float eps[4 * kBlockQuads];
  alignas(64) float eps_next[4 * kBlockQuads];
  alignas(64) float momentum_buffer[4 * kBlockQuads], hess_buffer[4 * kBlockQuads];
  alignas(64) uint32_t words[4 * kBlockQuads];
  for (int64_t qb = q_begin; qb < q_end; qb += kBlockQuads) {
    const int64_t qe = std::min(qb + kBlockQuads, q_end);
    const BlockRange r = block_range(a, qb, qe);
    prefetch_update_block<PT, MODE, RARE>(a, qb, q_end);
    // the noise of `draw` is needed only to form price's noise * grad
    if (PRICE && MODE != GradMode::kAvgOnly) fill_normals(key, draws.draw, qb, qe - qb, eps);
    if (NEXT) fill_normals(key, draws.next_draw, qb, qe - qb, eps_next);
    float* momentum = state_block(a, a.momentum, r, momentum_buffer);
    float* hess = state_block(a, a.hess, r, hess_buffer);
    // the param gets the mean here, the next sample in the rounding pass
    update_elems<PT, PRICE, MODE, false, RARE>(a, s, r.k_lo, r.k_hi - r.k_lo, momentum, hess,
                                               eps + r.shift, eps_next + r.shift, rare.at(r));
    fill_words(key, draws.round_draw, qb, qe - qb, words);
    round_state_block<PT, NEXT, RARE>(a, s, r, momentum, hess, words, eps_next, rare.at(r));
  }
}

template <typename PT, bool PRICE, GradMode MODE, bool NEXT, bool RARE>
static void update_range_t(const OpArgs& a, int64_t q_begin, int64_t q_end) {
  // the device scalars, once per range (Note [device scalars of an update] in ivon_math.h)
  const DeviceScalars d = read_device_scalars(a);
  const Draws draws = read_draws(a, /*stores_state=*/true);
  const RareInputs<RARE> rare(a, d.s.wd);
  if (d.skip) {
    return skipped_update_range_t<PT, NEXT, RARE>(a, d.s, draws.next_draw, q_begin, q_end, rare);
  }
  if (a.bf16_state) {
    return update_range_bf16<PT, PRICE, MODE, NEXT, RARE>(a, d.s, draws, q_begin, q_end, rare);
  }
  update_range_f32<PT, PRICE, MODE, NEXT, RARE>(a, d.s, draws, q_begin, q_end, rare);
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
  dispatch_update(a, [&](auto pt, auto price, auto mode, auto next, auto rare) {
    update_range_t<decltype(pt), decltype(price)::value, decltype(mode)::value,
                   decltype(next)::value, decltype(rare)::value>(a, qb, qe);
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
