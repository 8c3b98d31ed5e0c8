// ivon_math.h: the IVON element math and the noise generator, shared by the CUDA and CPU kernels.
//
// Everything here is plain scalar code marked __host__ __device__, so the CPU kernels (which the
// CPU-only CI runs) execute exactly the arithmetic the CUDA kernels execute. It includes no torch
// header on purpose: the CPU kernels are compiled once per instruction set (see cpu_kernels.h),
// and code compiled with AVX-512 enabled must never leak into symbols the rest of the program links.
//
// Note [floating-point contraction]: the update is written op for op like ivon_fast.reference
// (which is op for op ivon-opt). The build turns automatic FMA contraction off (-ffp-contract=off
// for the host, --fmad=false for nvcc), so every multiply and add rounds like torch's elementwise
// kernels. The polynomials below use explicit fmaf, which is exact-by-design on both sides, so the
// CPU and CUDA kernels produce the same bits.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernel_args.h"
#include "scalars.h"

#if defined(__CUDACC__)
#define IVON_HD __host__ __device__ __forceinline__
#else
#define IVON_HD inline __attribute__((always_inline))
#endif

// Each CPU TU compiled for one instruction set puts this header in its own namespace, so the
// inline functions of the AVX-512 TU and of the baseline TU are different symbols (ODR-safe).
// Full unrolling of Philox's 10 rounds: the CPU vectorizer only handles straight-line loop bodies.
#if defined(__CUDACC__)
#define IVON_UNROLL _Pragma("unroll")
#elif defined(__clang__)
#define IVON_UNROLL _Pragma("clang loop unroll(full)")
#else
#define IVON_UNROLL _Pragma("GCC unroll 10")
#endif

#ifndef IVON_MATH_NS
#define IVON_MATH_NS ivon_math
#endif

namespace ivon_fast {
namespace IVON_MATH_NS {

IVON_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

IVON_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

IVON_HD float fma_(float a, float b, float c) { return fmaf(a, b, c); }

// ------------------------------------------------------------------------------------------------
// Philox4x32-10 (Random123), docs/DESIGN.md section 3.

struct U32x4 {
  uint32_t x0, x1, x2, x3;
};

// One of Philox's ten rounds with the round keys k0, k1.
IVON_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0,
                          uint32_t k1) {
  // the 64-bit product of two 32-bit words; compilers map this to mul.hi / vpmuludq
  const uint64_t p0 = uint64_t(0xD2511F53u) * c0;
  const uint64_t p1 = uint64_t(0xCD9E8D57u) * c2;
  const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
  const uint32_t hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
  c0 = hi1 ^ c1 ^ k0;
  c1 = lo1;
  c2 = hi0 ^ c3 ^ k1;
  c3 = lo0;
}

IVON_HD U32x4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                            uint32_t k1) {
IVON_UNROLL
  for (int round = 0; round < 10; ++round) {
    philox_round(c0, c1, c2, c3, k0, k1);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {c0, c1, c2, c3};
}

// Note [Philox key schedule]: the ten round keys depend on the seed alone, so a kernel that
// makes many Philox calls with one seed can form them once (the CUDA kernels: on the host, once
// per launch, into the launch's arguments, where the instructions read them as operands) instead
// of adding the two Weyl constants in every call (18 of each call's ~70 instructions).
struct PhiloxKeys {
  uint32_t k0[10], k1[10];
};

IVON_HD PhiloxKeys philox_keys(uint64_t seed) {
  PhiloxKeys key;
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    key.k0[round] = k0;
    key.k1[round] = k1;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return key;
}

// philox4x32_10 with the key schedule formed beforehand: the same function, the same words
IVON_HD U32x4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                            const PhiloxKeys& key) {
IVON_UNROLL
  for (int round = 0; round < 10; ++round) {
    philox_round(c0, c1, c2, c3, key.k0[round], key.k1[round]);
  }
  return {c0, c1, c2, c3};
}

// Triton's uint_to_uniform_float: the bits as int32, negatives folded with -x - 1 (== ~x, i.e.
// x ^ (x >> 31) with an arithmetic shift; branch-free), scaled into [0, 1].
IVON_HD float uint_to_uniform(uint32_t x) {
  const int32_t s = int32_t(x);
  const int32_t folded = s ^ (s >> 31);
  return float(folded) * 4.6566127342e-10f;
}

// ------------------------------------------------------------------------------------------------
// Note [own transcendental functions]: Box-Muller needs log, sin and cos per pair of outputs.
// Scalar libm calls would make the CPU kernel compute-bound, and device libraries differ between
// CPU and GPU. These are branch-free float polynomials (coefficients fitted for this file on the
// reduced ranges, ~1 ulp), written with explicit fmaf so a compiler vectorizes them and the CPU
// and CUDA builds agree bit for bit. Inputs are restricted to what Box-Muller feeds them.

// natural log for x in [1e-7, 1] (positive normal floats; the caller clamps).
IVON_HD float log_pos(float x) {
  // x = 2^e * m with m in [sqrt(1/2), sqrt(2)): shifting by the bits of sqrt(1/2) makes the
  // exponent field of (bits - bits(sqrt(1/2))) the e we want.
  const uint32_t ix = float_to_bits(x) - 0x3f3504f3u;
  const int32_t e = int32_t(ix) >> 23;
  const float m = bits_to_float((ix & 0x007fffffu) + 0x3f3504f3u);
  const float f = m - 1.0f;  // exact (Sterbenz)
  const float ef = float(e);
  // log1p(f) = f - f^2/2 + f^3 P(f),  f in [-0.2929, 0.4142]
  float p = 0.07150298357009888f;
  p = fma_(p, f, -0.11570992320775986f);
  p = fma_(p, f, 0.11661184579133987f);
  p = fma_(p, f, -0.12411069869995117f);
  p = fma_(p, f, 0.14249978959560394f);
  p = fma_(p, f, -0.1666848063468933f);
  p = fma_(p, f, 0.20000705122947693f);
  p = fma_(p, f, -0.24999989569187164f);
  p = fma_(p, f, 0.3333333134651184f);
  const float f2 = f * f;
  float tail = fma_(f2 * f, p, ef * 1.428606765330187e-06f);  // + e * ln2_lo
  tail = fma_(-0.5f, f2, tail);
  // ln2_hi has 16 significant bits, so e * ln2_hi is exact for |e| < 2^8
  return fma_(ef, 0.693145751953125f, f + tail);
}

// sin and cos of theta in [0, 2*pi + a few ulp] (Box-Muller's angle).
IVON_HD void sincos_angle(float theta, float* s_out, float* c_out) {
  // nearest quadrant by the round-to-integer magic constant 1.5 * 2^23 (branch-free, no rint)
  const float magic = 12582912.0f;
  const float shifted = theta * 0.6366197466850281f + magic;
  const uint32_t q = float_to_bits(shifted) - float_to_bits(magic);
  const float k = shifted - magic;
  // Cody-Waite reduction with pi/2 in three float parts; k <= 4 keeps k * part exact in the fma.
  float r = fma_(-k, 1.5707963705062866f, theta);
  r = fma_(-k, -4.371138828673793e-08f, r);
  r = fma_(-k, -1.7763568394002505e-15f, r);
  const float z = r * r;
  // sin r = r + r^3 S(z),  cos r = 1 - z/2 + z^2 C(z),  |r| <= pi/4
  float sp = 2.724946625676239e-06f;
  sp = fma_(sp, z, -0.00019840081222355366f);
  sp = fma_(sp, z, 0.008333331905305386f);
  sp = fma_(sp, z, -0.1666666716337204f);
  const float sin_r = fma_(z * r, sp, r);
  float cp = -2.7299731186758436e-07f;
  cp = fma_(cp, z, 2.4800587198114954e-05f);
  cp = fma_(cp, z, -0.00138888880610466f);
  cp = fma_(cp, z, 0.0416666679084301f);
  const float cos_r = fma_(z * z, cp, fma_(-0.5f, z, 1.0f));
  // quadrant q: (sin, cos) = (s, c), (c, -s), (-s, -c), (-c, s)
  const bool swap = (q & 1u) != 0;
  const float s = swap ? cos_r : sin_r;
  const float c = swap ? sin_r : cos_r;
  *s_out = bits_to_float(float_to_bits(s) ^ ((q & 2u) << 30));
  *c_out = bits_to_float(float_to_bits(c) ^ (((q + 1u) & 2u) << 30));
}

// Box-Muller on one pair of uniforms, as the reference writes it.
IVON_HD void box_muller(float a, float b, float* n0, float* n1) {
  // max(a, 1e-7) as an integer max of the bits (a >= 0, where float order is bit order): a float
  // select before the log kept GCC from if-converting, hence from vectorizing, this loop.
  const uint32_t ua = float_to_bits(a), umin = 0x33d6bf95u;  // bits of 1e-7f
  const float radius = sqrtf(-2.0f * log_pos(bits_to_float(ua > umin ? ua : umin)));
  const float theta = 6.283185307179586f * b;
  float s, c;
  sincos_angle(theta, &s, &c);
  *n0 = radius * c;
  *n1 = radius * s;
}

// The four standard normals of quad `quad` (global indices 4*quad .. 4*quad+3) for one draw.
struct F32x4 {
  float v0, v1, v2, v3;
};

// The normals of the quad's Philox words (x0, x1, x2, x3)
IVON_HD F32x4 normals_of_words(const U32x4& x) {
  F32x4 n;
  box_muller(uint_to_uniform(x.x0), uint_to_uniform(x.x1), &n.v0, &n.v1);
  box_muller(uint_to_uniform(x.x2), uint_to_uniform(x.x3), &n.v2, &n.v3);
  return n;
}

IVON_HD F32x4 normals4(uint64_t seed, uint64_t draw, uint64_t quad) {
  return normals_of_words(philox4x32_10(uint32_t(quad), uint32_t(quad >> 32), uint32_t(draw),
                                        uint32_t(draw >> 32), uint32_t(seed),
                                        uint32_t(seed >> 32)));
}

// normals4 with the seed's key schedule formed beforehand (Note [Philox key schedule])
IVON_HD F32x4 normals4(const PhiloxKeys& key, uint64_t draw, uint64_t quad) {
  return normals_of_words(philox4x32_10(uint32_t(quad), uint32_t(quad >> 32), uint32_t(draw),
                                        uint32_t(draw >> 32), key));
}

// ------------------------------------------------------------------------------------------------
// Parameter dtypes. Own bit-level conversions (round to nearest even, like torch's casts) so no
// c10 / cuda_fp16 header is needed and the CPU and GPU round identically.

struct BF16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};

IVON_HD float to_float(float x) { return x; }
IVON_HD float to_float(BF16 x) { return bits_to_float(uint32_t(x.bits) << 16); }
IVON_HD float to_float(F16 x) {
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  // normals and subnormals: place exponent+mantissa in the float field, then rescale the exponent
  // bias (15 -> 127) by a multiply by 2^112, which is exact (also for half subnormals)
  const float finite = bits_to_float(em << 13) * 5.192296858534828e+33f;
  const uint32_t special = (em << 13) | 0x7f800000u;  // inf / nan keep their payload
  const uint32_t mag = em >= 0x7c00u ? special : float_to_bits(finite);
  return bits_to_float(mag | sign);
}

template <typename T>
IVON_HD T from_float(float f);

template <>
IVON_HD float from_float<float>(float f) {
  return f;
}

template <>
IVON_HD BF16 from_float<BF16>(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return BF16{uint16_t(nan ? ((u >> 16) | 0x40u) : rounded)};
}

template <>
IVON_HD F16 from_float<F16>(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // normal halves: rebias the exponent (127 -> 15) and round the 13 dropped bits to nearest even
  const uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;  // 0xc8000000 = -112 << 23
  // subnormal halves (|f| < 2^-14): adding 0.5 rounds |f| to a multiple of 2^-24 (RNE); the
  // mantissa bits of the sum are then the half's bits (0x400 when it rounds up to the min normal)
  const uint32_t sub = float_to_bits(bits_to_float(a) + 0.5f) - 0x3f000000u;
  uint32_t h = a < 0x38800000u ? sub : normal;
  h = a >= 0x477ff000u ? 0x7c00u : h;   // rounds to >= 65520: inf
  h = a > 0x7f800000u ? 0x7e00u : h;    // nan
  return F16{uint16_t(h | sign)};
}

// Note [bf16 state]: with IVON(state_dtype=torch.bfloat16) the momentum and hess arrays hold bf16
// (OpArgs::bf16_state). Every op widens them to float32 (exact) and computes exactly what it
// computes with float32 state; the update stores its new momentum and hess by stochastic
// rounding: the 16 bits below bf16's mantissa plus 16 random bits, carried into the kept bits
// and truncated, which rounds the magnitude up with probability (x - down) / (up - down), so the
// stored value is x on average (docs/DESIGN.md section 16). The random bits of element i are
// Philox output (i & 3) at the update's rounding draw (OpArgs::round_draw, read by read_draws):
// the low 16 bits round the momentum, the high 16 the hess. The mean is formed from the
// unrounded values, and a next sample is drawn around the stored (rounded) hess, as a later
// sample op would draw it. A bf16 value rounds to itself, so a skipped step need not store.
IVON_HD uint16_t stochastic_round_bf16(float x, uint32_t random16) {
  const uint32_t u = float_to_bits(x);
  const uint32_t rounded = (u + random16) >> 16;  // no wrap: only NaN bits exceed 0xFFFF0000
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return uint16_t(nan ? ((u >> 16) | 0x40u) : rounded);  // a quiet NaN, as to_bf16 makes
}

IVON_HD float bf16_bits_to_float(uint16_t bits) { return bits_to_float(uint32_t(bits) << 16); }

// ------------------------------------------------------------------------------------------------
// The update (docs/DESIGN.md section 2), per element, in fp32.
//
// Note [per-element prior]: the ops may get a per-element prior (ivon_fast.reference's module
// docstring): a precision delta_i (OpArgs::prior_precision) that replaces the scalar weight decay
// s.wd in every per-element use, and (update) a mean mu0_i (OpArgs::prior_mean) that the step
// pulls toward instead of 0. The functions below take the element's delta as a value (s.wd or
// the element of prior_precision) and the mean term under a template flag, so the expressions
// are the reference's, in its association order, for either. Whether an input is read is decided
// by template flags of the kernels (dispatch_flags.h), never per element: an absent prior costs
// neither a load nor a branch, and with both absent every instance computes what it computed
// before the prior existed, bit for bit.

// noise = eps / sqrt(ess * (hess + delta)) (ivon-opt writes randn / (ess * (hess + wd)).sqrt());
// delta is s.wd or the element's prior precision (Note [per-element prior])
IVON_HD float noise_of(float eps, float hess, float delta, const ::ivon_fast::Scalars& s) {
  return eps / sqrtf(s.ess * (hess + delta));
}

// running mean: new if count == 1 else avg + (new - avg) / count
template <bool FIRST>
IVON_HD float running_mean(float avg, float x, const ::ivon_fast::Scalars& s) {
  return FIRST ? x : avg + (x - avg) / s.count;
}

template <bool PRICE>
IVON_HD float hess_term_of(float grad, float noise) {
  return PRICE ? noise * grad : grad * grad;
}

// ------------------------------------------------------------------------------------------------
// Note [device scalars of an update]: four optional 1-element float32 tensors on the params'
// device (docs/DESIGN.md section 11, ivon_fast.reference.update) reach the kernels as pointers
// (nullptr when absent), and only the kernels read them, so the host never waits for the device:
//   grad_scale   the grads and the averages were multiplied by it (torch.amp.GradScaler); they
//                are divided by it before use (true divisions, as the reference), 'gradsq''s
//                average of squared grads twice. Absent: no division (the CUDA kernels' run-time
//                flag, the CPU kernels' instances without a rare input; the CPU's RARE instance
//                divides by a neutral 1, Note [rare inputs of an update] in cpu_kernels.h).
//   found_inf    nonzero (NaN too): the step is skipped; mean, momentum and hess keep their
//                values and the param gets the mean, or the sample of next_draw around mean and
//                hess.
//   device_lr, device_debias   replace the host's lr and debias.
// read_device_scalars is called once per CPU range or CUDA thread, never per element, so absent
// scalars cost one null check per range / thread and present ones a load.

struct DeviceScalars {
  ::ivon_fast::Scalars s;  // the host's scalars; lr, debias, grad_scale read from the device
  bool skip;               // found_inf is given and nonzero
};

IVON_HD DeviceScalars read_device_scalars(const ::ivon_fast::OpArgs& a) {
  DeviceScalars d{a.s, false};
  if (a.device_lr != nullptr) d.s.lr = *a.device_lr;
  if (a.device_debias != nullptr) d.s.debias = *a.device_debias;
  if (a.grad_scale != nullptr) d.s.grad_scale = *a.grad_scale;
  // `!= 0` is true for NaN: a NaN found_inf skips the step, as the reference's `found_inf != 0`
  if (a.found_inf != nullptr) d.skip = *a.found_inf != 0.0f;
  return d;
}

// The draw numbers of an op: the host's (launch arguments), or the device's (device_draws, the
// uint64 bits of an int64 tensor that a captured CUDA graph advances between replays). Read once
// per CPU range or CUDA thread, like the device scalars; next_draw only when the op writes a
// next sample, so sample and accumulate read one element.
// The update's rounding draw of bf16 state (Note [bf16 state]; `stores_state`: the caller is an
// update) comes the same way: the host's, or device_draws[1] (the next training draw) plus
// kRoundDrawBase.
struct Draws {
  uint64_t draw, next_draw, round_draw;
};

IVON_HD Draws read_draws(const ::ivon_fast::OpArgs& a, bool stores_state = false) {
  if (a.device_draws == nullptr) return {a.draw, a.next_draw, a.round_draw};
  const bool rounds = stores_state && a.bf16_state;
  const bool reads_second = a.has_next_draw || rounds;
  const uint64_t second = reads_second ? uint64_t(a.device_draws[1]) : 0u;
  return {uint64_t(a.device_draws[0]), a.has_next_draw ? second : 0u,
          rounds ? ::ivon_fast::kRoundDrawBase + second : 0u};
}

// A gradient value divided TIMES times by the grad scale (as the scaler multiplied it); the
// identity when the op got no grad_scale (SCALED false).
template <bool SCALED, int TIMES>
IVON_HD float unscaled(float x, const ::ivon_fast::Scalars& s) {
  if (SCALED) {
    x = x / s.grad_scale;
    if (TIMES == 2) x = x / s.grad_scale;
  }
  return x;
}

// The pending grad g and the averages avg_grad, avg_term divided by the grad scale (as the
// scaler multiplied them; SCALED in grad_statistics): only what the GradMode reads, the hessian
// term average twice for 'gradsq' (it holds squared grads). The CUDA kernels call this under a
// run-time flag, once per quad (Note [CUDA run-time flags] in cuda_kernels.cuh).
template <bool PRICE, ::ivon_fast::GradMode MODE>
IVON_HD void unscale_grads(float& g, float& avg_grad, float& avg_term,
                           const ::ivon_fast::Scalars& s) {
  using ::ivon_fast::GradMode;
  if (MODE != GradMode::kAvgOnly) g = unscaled<true, 1>(g, s);
  if (MODE != GradMode::kGradOnly) {
    avg_grad = unscaled<true, 1>(avg_grad, s);
    avg_term = unscaled<true, PRICE ? 1 : 2>(avg_term, s);
  }
}

// The gradient mean and hessian term an update uses (GradMode in kernel_args.h), as the
// reference forms them: the pending grad g (its sample's noise eps; unused for kAvgOnly) folded
// into the averages avg_grad, avg_term of the first count - 1 samples (unused for kGradOnly), or
// the averages alone (kAvgOnly); everything unscaled first (SCALED). The hessian term average
// holds noise * grad ('price': scaled once) or grad^2 ('gradsq': scaled twice).
template <bool PRICE, ::ivon_fast::GradMode MODE, bool SCALED>
IVON_HD void grad_statistics(float g, float eps, float hess, float delta, float avg_grad,
                             float avg_term, const ::ivon_fast::Scalars& s, float& grad_mean,
                             float& hess_term) {
  using ::ivon_fast::GradMode;
  constexpr bool kFirst = MODE == GradMode::kGradOnly;
  if (SCALED) unscale_grads<PRICE, MODE>(g, avg_grad, avg_term, s);
  if (MODE == GradMode::kAvgOnly) {
    grad_mean = avg_grad;
    hess_term = avg_term;
    return;
  }
  const float noise = PRICE ? noise_of(eps, hess, delta, s) : 0.0f;
  const float ht = hess_term_of<PRICE>(g, noise);
  grad_mean = running_mean<kFirst>(kFirst ? 0.0f : avg_grad, g, s);
  hess_term = running_mean<kFirst>(kFirst ? 0.0f : avg_term, ht, s);
}

// What an update writes into the param: the mean, or (NEXT) the sample of next_draw around the
// mean and hess (eps_next its standard normal). After a skipped step these are the old values.
template <bool NEXT>
IVON_HD float param_value(float mean, float hess, float delta, float eps_next,
                          const ::ivon_fast::Scalars& s) {
  return NEXT ? mean + noise_of(eps_next, hess, delta, s) : mean;
}

// The update proper (update_state) in two halves, so that a kernel can skip the division by a
// debias factor of exactly 1 (Note [debias of one]) between them.
//
// The first half: the new momentum and hess from the (averaged) gradient and hessian term,
// written over the old ones. delta: s.wd or the element's prior precision.
template <bool PRICE>
IVON_HD void new_moments(float grad_mean, float hess_term, float delta, float& momentum,
                         float& hess, const ::ivon_fast::Scalars& s) {
  const float new_momentum = s.beta1 * momentum + s.one_minus_beta1 * grad_mean;
  const float hpd = hess + delta;
  const float nll_hess = PRICE ? (hess_term * hpd) * s.ess : hess_term * s.ess;
  const float diff = hess - nll_hess;
  momentum = new_momentum;
  hess = (s.beta2 * hess + s.one_minus_beta2 * nll_hess) + (s.hess_coef * (diff * diff)) / hpd;
}

// The momentum divided by the debias factor, as the step uses it.
//
// Note [debias of one]: from about step 165 on (beta1 = 0.9), and always without debiasing, the
// factor 1 - beta1^t is exactly 1.0f, and x / 1.0f is x for every float x (the quotient is
// representable, so the IEEE division is exact; a NaN stays a NaN, and the mean it reaches is NaN
// either way). A kernel may therefore skip this division when the factor is 1 without changing
// a bit; the CUDA kernels do, by a uniform test per quad (one of five divisions per element), and
// so do the CPU kernels' pipelined blocks, per piece of 64 elements (update_state's DEBIAS_ONE).
IVON_HD float debiased(float momentum, const ::ivon_fast::Scalars& s) {
  return momentum / s.debias;
}

// The second half, the new mean from the debiased new momentum and the new hess, in three steps:
// the preconditioned step, its clip and the move. PRIOR_MEAN: the step's prior term is
// delta * (mean - mu0) instead of ivon-opt's delta * mean (Note [per-element prior]).
template <bool PRIOR_MEAN>
IVON_HD float preconditioned_step(float mean, float debiased_momentum, float new_hess,
                                  float delta, float mu0, const ::ivon_fast::Scalars& s) {
  const float prior_term = PRIOR_MEAN ? delta * (mean - mu0) : delta * mean;
  return (debiased_momentum + prior_term) / (new_hess + delta);
}

// Note [clip of inf]: comparisons (not fminf/fmaxf), so a NaN propagates like torch.clip. With
// the default clip radius, +inf, both comparisons are false for every step (NaN too), so the
// clip is the identity, and a kernel may skip it (the CUDA kernels do, by a uniform test per quad).
IVON_HD float clipped(float step, const ::ivon_fast::Scalars& s) {
  step = step < -s.clip ? -s.clip : step;
  return step > s.clip ? s.clip : step;
}

IVON_HD float mean_after(float mean, float step, const ::ivon_fast::Scalars& s) {
  return mean - s.lr * step;
}

template <bool PRIOR_MEAN>
IVON_HD float new_mean(float mean, float debiased_momentum, float new_hess, float delta,
                       float mu0, const ::ivon_fast::Scalars& s) {
  const float step =
      preconditioned_step<PRIOR_MEAN>(mean, debiased_momentum, new_hess, delta, mu0, s);
  return mean_after(mean, clipped(step, s), s);
}

// The update proper, from the (averaged) gradient and hessian term: writes the new momentum,
// hess and mean. Same association order as the reference (see Note [floating-point contraction]).
// delta: s.wd or the element's prior precision; PRIOR_MEAN: as in new_mean; DEBIAS_ONE: the
// caller knows s.debias is exactly 1.0f, so the division by it is skipped (Note [debias of one]).
template <bool PRICE, bool PRIOR_MEAN, bool DEBIAS_ONE = false>
IVON_HD void update_state(float grad_mean, float hess_term, float delta, float mu0, float& mean,
                          float& momentum, float& hess, const ::ivon_fast::Scalars& s) {
  new_moments<PRICE>(grad_mean, hess_term, delta, momentum, hess, s);
  const float debiased_momentum = DEBIAS_ONE ? momentum : debiased(momentum, s);
  mean = new_mean<PRIOR_MEAN>(mean, debiased_momentum, hess, delta, mu0, s);
}

}  // namespace IVON_MATH_NS
}  // namespace ivon_fast
