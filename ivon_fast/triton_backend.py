"""Triton backend: the op contract of ``ivon_fast.reference`` as one fused kernel per op call.

``sample``, ``accumulate`` and ``update`` take exactly the arguments of the reference ops (the
reference-only ``eps`` / ``next_eps`` only as None), check them against the rules every backend
shares (``ivon_fast._contract``), and give the same results element by element with the
same noise (docs/DESIGN.md section 3), which the kernels regenerate from Philox instead of storing it.
``update`` takes its hyperparameters as one ``ivon_fast.scalars.StepScalars``, and the rounding
index ``round_draw`` of low-precision state.

Layout of this file, one section per kernel family, each kernel next to its formula:
  tuning knobs and availability; shared device helpers (the tile, the noise); sample;
  accumulate; update; host-side launching and argument handling.

Conventions shared by all kernels:
- params are fp32 / bf16 / fp16 (grads have the param's dtype), math is fp32. State is fp32,
  except that momentum and hess may both be bf16 (``IVON(state_dtype=torch.bfloat16)``,
  docs/DESIGN.md section 16): every op widens them on load (exact) and computes as with fp32
  state, and ``update`` stores the new momentum and hess by stochastic rounding with Philox bits
  of their own draw (``_rounding_bits``). Whether the state is bf16 is the momentum pointer's
  element type, which Triton knows when it compiles: fp32 state compiles to a kernel without
  any of it (no rounding bits, no extra load), and the host's ``round_draw`` is then unused.
- Hyperparameters and step-dependent scalars are runtime arguments (never ``tl.constexpr``), so a
  new lr or step never recompiles. ``update``'s optional device scalars (``grad_scale``,
  ``found_inf``, ``device_lr``, ``device_debias``; docs/DESIGN.md section 11) are pointers the
  kernel loads from, with one constexpr flag each saying whether it was given: an absent one
  costs nothing, and a new value in the tensor never recompiles. Every op's optional
  ``device_draws`` (int64 draw numbers, capturable steps) is passed the same way, and so are the
  optional per-element prior inputs ``prior_precision`` (every op) and ``prior_mean`` (update),
  flat fp32 tensors of the segment: a constexpr flag each, so an absent one is neither loaded
  nor tested per element. Scalar combinations (1 - beta1, 0.5 (1 - beta2)^2) come
  formed in double from ``StepScalars`` and are rounded once to fp32, as torch does with Python
  scalars in the reference.
- Offsets, indices and lengths are int64, so segments may exceed 2^31 elements.
- Every launch goes through ``_launch``: it runs under the params' device (Triton launches on the
  current stream of the *current* device) and turns off FMA contraction, as the C++ build does.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

from . import _contract
from .reference import ROUND_DRAW_BASE
from .scalars import StepScalars

try:
    import triton
    import triton.language as tl
    _IMPORT_ERROR = None
except ImportError as error:  # the module stays importable so unavailable_reason can explain
    _IMPORT_ERROR = f"triton could not be imported: {error}"

    class _NoTriton:
        """Stands in for triton so the kernels below can be defined; they are never launched."""
        constexpr = None

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton()

__all__ = ["sample", "accumulate", "update", "unavailable_reason", "BLOCK", "NUM_WARPS"]

# ------------------------------------------------------------------------------------------------
# Tuning knobs. Module-level defaults, overridden at call time by IVON_TRITON_BLOCK /
# IVON_TRITON_WARPS / IVON_TRITON_PROGRAMS so a GPU benchmark can sweep them without reimporting.
# ------------------------------------------------------------------------------------------------
# Four elements per thread measured best (one Philox quad each, 16-byte fp32 accesses): on an
# H200 at 64M fp32 params the mc = 1 update with resampling ran at 0.99x fused AdamW with
# 1024 / 8, against 1.13x with 1024 / 4 and 1.22x with 2048 / 8.
BLOCK = 1024
NUM_WARPS = 8
# The interpreter pays per program, not per element: big blocks make CPU tests fast.
INTERPRETER_BLOCK = 16384
# Note [tiles of a launch]: a program runs its tiles in a grid-stride loop (tiles pid, pid +
# programs, ...), so what a program sets up once (the device scalars' loads, the Philox key
# schedule, the arguments' addresses) is paid once per program, not once per tile: with one
# tile per program that setup was about 9 of the drop-in update's SASS instructions per element
# (bench/results/machine_code_2026-12-07_triton-own-noise.md). A launch has at most
# PROGRAMS_PER_SM programs per multiprocessor, enough to fill every SM whatever a kernel's
# registers (of 256 threads, 6 fit at sample's 40 registers, 4 at the update's 64; the others
# start as those finish). IVON_TRITON_PROGRAMS overrides the cap (a GPU run can compare it with
# one tile per program: a cap above the tile count); the interpreter gives each tile its own
# program.
PROGRAMS_PER_SM = 8

# Triton compiles a separate variant, with the value folded in as a Python int, for integer
# arguments equal to 1; for tile counts, seeds, draws and quad numbers that is only
# recompilation.
_NOT_SPECIALIZED = ["tiles", "quad_base", "seed", "draw", "next_draw", "round_draw"]

# Whether the kernels were defined for the interpreter (decided by triton when @triton.jit runs).
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

def unavailable_reason(device) -> str | None:
    """None when the Triton backend can run on ``device``, else why it cannot."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    device = torch.device(device)
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return ("the Triton backend runs on CUDA tensors, or on CPU tensors only under the "
                    "Triton interpreter (TRITON_INTERPRET=1)")
        if not _INTERPRETED:
            return ("TRITON_INTERPRET=1 was set after ivon_fast.triton_backend was imported; "
                    "set it before the import so the kernels are defined for the interpreter")
        return None
    return f"the Triton backend runs on CUDA tensors, got {device}"


def _max_programs(device: torch.device) -> int | None:
    """The most programs of a launch (Note [tiles of a launch]): IVON_TRITON_PROGRAMS, else
    PROGRAMS_PER_SM per multiprocessor of a GPU; None (no cap, a program per tile) for the
    interpreter."""
    setting = os.environ.get("IVON_TRITON_PROGRAMS")
    if setting is not None:
        if not setting.isdigit() or int(setting) < 1:
            raise ValueError(f"IVON_TRITON_PROGRAMS must be an integer >= 1, got {setting!r}")
        return int(setting)
    if device.type != "cuda":
        return None
    return PROGRAMS_PER_SM * _multiprocessors(device.index if device.index is not None
                                              else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _launch_config(device: torch.device) -> tuple[int, int]:
    default = INTERPRETER_BLOCK if device.type == "cpu" else BLOCK
    block = int(os.environ.get("IVON_TRITON_BLOCK", default))
    warps = int(os.environ.get("IVON_TRITON_WARPS", NUM_WARPS))
    # a tile is block // 4 whole quads and tl.arange needs powers of two
    if block < 4 or block & (block - 1):
        raise ValueError(f"IVON_TRITON_BLOCK must be a power of two >= 4, got {block}")
    if warps < 1 or warps & (warps - 1):
        raise ValueError(f"IVON_TRITON_WARPS must be a power of two, got {warps}")
    return block, warps


# ------------------------------------------------------------------------------------------------
# Shared device helpers
# ------------------------------------------------------------------------------------------------
# Note [segments from their quad]: a segment that starts mid-quad (LEAD = offset & 3 != 0) is
# handled from its quad's first element, LEAD elements before it, so that tiles start on global
# quads (one Philox call per 4 neighbouring elements). Its pointers either point at the segment
# (ORIGIN False) and the tiles start LEAD elements before them, unaligned for every tile and so
# never vectorized; or (ORIGIN True) the host handed the kernel views that start LEAD elements
# earlier, at the quad, which the layout makes room for and puts on 16-byte boundaries (Note
# [quads in the buffers] in _bucket): the tiles then start at the pointers, aligned, and only
# the first tile masks the LEAD elements off. Same addresses, same quads, same bits either way.
@triton.jit
def _tile(tile, quad_base, n, BLOCK: tl.constexpr, LEAD: tl.constexpr, ORIGIN: tl.constexpr):
    """Tile ``tile``'s BLOCK pointer positions k, the BLOCK // 4 global quads they cover, whether
    the tile lies inside the segment, and which lanes do (for the masked tiles).

    Position k has global index i = 4 * quad_base + k (ORIGIN: the pointers point at the
    segment's quad) or 4 * quad_base + LEAD + k (the pointers point at the segment); see Note
    [segments from their quad]. ``full`` tiles run without masks, which lets the compiler
    vectorize the loads for any n (masks by ``k < n`` only vectorize when n is known to be a
    multiple of 16).
    """
    # int64: tile * BLOCK and LEAD + n pass 2^31 in segments near 2^31 elements (the loop counts
    # in int32, the interpreter's in Python ints; n is int32 when it fits)
    tile, n = tl.cast(tile, tl.int64), tl.cast(n, tl.int64)
    first = LEAD if ORIGIN else 0  # the position of the segment's first element
    start = tile * BLOCK + first - LEAD
    k = start + tl.arange(0, BLOCK)
    quad = quad_base + tile * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
    full = (start >= first) & (start + BLOCK <= first + n)
    return k, quad, full, (k >= first) & (k < first + n)


@triton.jit
def _load(ptr, k, inside, other, MASKED: tl.constexpr):
    """ptr[k] as fp32; positions outside the segment read ``other`` (MASKED tiles only)."""
    if MASKED:
        return tl.load(ptr + k, mask=inside, other=other).to(tl.float32)
    else:
        return tl.load(ptr + k).to(tl.float32)


@triton.jit
def _bf16_round_to_nearest_even(value):
    """fp32 -> bf16 rounded to nearest even, NaN -> the quiet NaN 0x7FC0 (torch's conversion).

    Done on the bits rather than by ``.to(tl.bfloat16)``: the Triton interpreter (3.8) truncates
    that cast, so the CPU tests would check a rounding the GPU does not do. These integer ops
    round the same everywhere, as ``from_float<BF16>`` in csrc/ivon_math.h does.
    """
    bits = value.to(tl.uint32, bitcast=True)
    # adding 0x7FFF plus the lowest kept bit carries into the kept bits above the halfway point,
    # and at exactly halfway only when the kept value is odd
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(value != value, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _write(ptr, k, inside, value, MASKED: tl.constexpr):
    """ptr[k] <- value, already in the pointer's dtype."""
    if MASKED:
        tl.store(ptr + k, value, mask=inside)
    else:
        tl.store(ptr + k, value)


@triton.jit
def _store(ptr, k, inside, value, MASKED: tl.constexpr):
    """ptr[k] <- value, rounded to the pointer's dtype (round to nearest even, as torch)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        value = _bf16_round_to_nearest_even(value)
    else:
        value = value.to(ptr.dtype.element_ty)
    _write(ptr, k, inside, value, MASKED)


@triton.jit
def _bf16_round_stochastic(value, random16):
    """fp32 -> bf16 rounded up or down at random, unbiased: E[result] = value (docs/DESIGN.md
    section 16; ``stochastic_round_bf16`` in ivon_fast.reference is the spec).

        bf16 bits = (bits32(value) + random16) >> 16,   random16 uniform in [0, 2^16)
        NaN -> (bits32(value) >> 16) | 0x40 (quiet, sign and payload kept)

    The carry rounds the magnitude up exactly when random16 >= 2^16 - low16(value), i.e. with
    probability low16 / 2^16; a bf16 value (low16 = 0) rounds to itself, inf stays inf. On the
    bits, like ``_bf16_round_to_nearest_even`` and for the same reason (the interpreter's casts).
    The uint32 sum overflows only for NaNs (every bit pattern above -inf's 0xFF800000), whose
    sum is not used.
    """
    bits = value.to(tl.uint32, bitcast=True)
    rounded = (bits + random16) >> 16
    rounded = tl.where(value != value, (bits >> 16) | 0x40, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _uniform(x):
    """uint32 -> [0, 1): the bits read as int32, negatives folded (x < 0 -> -x - 1), scaled."""
    s = x.to(tl.int32, bitcast=True)
    s = tl.where(s < 0, -s - 1, s)
    return s.to(tl.float32) * 4.6566127342e-10


# Note [Philox's wide multiply]: each Philox round needs the high and the low word of two 32 x 32
# -> 64-bit products. ``tl.philox`` writes them as mul.hi.u32 and mul.lo.u32, which ptxas keeps as
# two instructions; one mul.wide.u32 gives both (IMAD.WIDE.U32 on sm_90). Written as a uint64
# product in Triton, LLVM widens the rounds' xors to 64 bits and multiplies in 64 bits (the
# sample kernel grew by 3 SASS instructions per element). So the GPU build says mul.wide.u32 in
# one line of inline PTX (8 SASS instructions per element fewer in the drop-in update, 5 in
# sample and accumulate); the interpreter, which runs no PTX, computes the same two words as
# ``tl.philox`` does. Integer arithmetic: the same bits either way, which the known answers and
# the reference's words check (tests/test_kernels_builds.py).
if _INTERPRETED:
    def _mulhilo(m: tl.constexpr, x):
        """(hi32, lo32) of the 64-bit product m * x of uint32 (Note [Philox's wide multiply]).
        A plain function: the interpreter runs a kernel as Python, and a call of a jitted
        helper costs it more than the two multiplies (20 calls per Philox)."""
        return tl.math.umulhi(x, m), tl.mul(x, m, sanitize_overflow=False)
else:
    @triton.jit
    def _mulhilo(m: tl.constexpr, x):
        """(hi32, lo32) of the 64-bit product m * x of uint32 (Note [Philox's wide multiply])."""
        return tl.inline_asm_elementwise(
            "{ .reg .b64 t; mul.wide.u32 t, $2, $3; mov.b64 {$1, $0}, t; }", "=r,=r,r,r",
            [x, tl.full(x.shape, m, tl.uint32)], dtype=(tl.uint32, tl.uint32), is_pure=True,
            pack=1)


@triton.jit
def _philox(seed, draw, quad):
    """Philox4x32-10 with key = seed and counter (lo32(quad), hi32(quad), lo32(draw), hi32(draw)):
    Random123's rounds, as ``tl.philox`` computes them (docs/DESIGN.md section 3).

        per round: (c0, c1, c2, c3) <- (hi(B c2) ^ c1 ^ k0, lo(B c2), hi(A c0) ^ c3 ^ k1, lo(A c0))
                   (k0, k1) += (0x9E3779B9, 0xBB67AE85)
        A = 0xD2511F53, B = 0xCD9E8D57

    ``seed``, ``draw`` and ``quad`` are int64 holding uint64 bits (an int32 scalar argument
    sign-extends to the same bits); an arithmetic shift then a truncation gives hi32 for negative
    values too. The key schedule depends on the seed alone: the compiler computes it once per
    program on the uniform datapath.
    """
    seed = seed.to(tl.int64)
    draw = draw.to(tl.int64)
    k0, k1 = seed.to(tl.uint32), (seed >> 32).to(tl.uint32)
    c0, c1 = quad.to(tl.uint32), (quad >> 32).to(tl.uint32)
    c2, c3 = draw.to(tl.uint32), (draw >> 32).to(tl.uint32)
    for _ in tl.static_range(10):
        hi0, lo0 = _mulhilo(0xD2511F53, c0)
        hi1, lo1 = _mulhilo(0xCD9E8D57, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
    return c0, c1, c2, c3


# Note [the noise's own functions in Triton]: Box-Muller's log, sin and cos are the C++ / CUDA
# build's own polynomials (csrc/ivon_math.h, Note [own transcendental functions]), written again
# here op for op, each multiply-add an explicit tl.fma (called directly: under the interpreter a
# call of a jitted helper costs more than the fma). libdevice's logf / sinf / cosf (what tl.log,
# tl.sin and tl.cos lower to) were about 20 SASS instructions per element more in the drop-in
# update, and differ from the CPU by an ulp; with these the Triton kernels' noise is the C++ and
# CUDA kernels' noise, bit for bit (tests/test_kernels_builds.py compares them). On the GPU
# ``tl.fma`` is one fma.rn.f32; the Triton interpreter (3.8) computes it as a rounded product
# plus a rounded sum, so in interpreted runs this module replaces the interpreter's fma with one
# rounded once (``_fma_rounded_once``, for every interpreted kernel of the process: the GPU's
# semantics, which only makes the interpreter more faithful).
if _INTERPRETED:  # Note [the noise's own functions in Triton]
    import numpy as np  # the interpreter's own dependency
    from triton.runtime import interpreter as _interpreter

    def _fma_rounded_once(builder, x, y, z):
        """The interpreter's fma of fp32 operands rounded once, from float64: the product is
        exact there, the sum is rounded to odd (its error by TwoSum; an inexact sum with an
        even last bit moves one ulp toward the error), and the float32 of a round-to-odd double
        is the correctly rounded result (53 >= 24 + 2 bits). Other dtypes: the interpreter's."""
        if z.dtype.scalar != tl.float32:
            return _INTERPRETER_FMA(builder, x, y, z)
        a, b, c = (np.asarray(h.data, dtype=np.float64) for h in (x, y, z))
        product = a * b
        total = product + c
        c_part = total - product
        error = (product - (total - c_part)) + (c - c_part)
        bits = np.asarray(total).view(np.int64)
        nudge = np.where((error > 0.0) == (total > 0.0), 1, -1)
        bits = np.where((error != 0.0) & ((bits & 1) == 0), bits + nudge, bits)
        return _interpreter.TensorHandle(bits.view(np.float64).astype(np.float32),
                                         z.dtype.scalar)

    # the interpreter's own, also when this module is imported again (a reload)
    _INTERPRETER_FMA = getattr(_interpreter.InterpreterBuilder.create_fma, "replaced",
                               _interpreter.InterpreterBuilder.create_fma)
    _fma_rounded_once.replaced = _INTERPRETER_FMA
    _interpreter.InterpreterBuilder.create_fma = _fma_rounded_once


@triton.jit
def _log_pos(x):
    """Natural log for x in [1e-7, 1]: ``log_pos`` of csrc/ivon_math.h.

        x = 2^e m, m in [sqrt(1/2), sqrt(2)),  f = m - 1,
        log x = e ln2_hi + (f + (e ln2_lo + f^3 P(f) - f^2 / 2))
    """
    ix = x.to(tl.uint32, bitcast=True) - 0x3F3504F3
    e = ix.to(tl.int32, bitcast=True) >> 23
    f = ((ix & 0x007FFFFF) + 0x3F3504F3).to(tl.float32, bitcast=True) - 1.0
    ef = e.to(tl.float32)
    p = tl.fma(0.07150298357009888, f, -0.11570992320775986)
    p = tl.fma(p, f, 0.11661184579133987)
    p = tl.fma(p, f, -0.12411069869995117)
    p = tl.fma(p, f, 0.14249978959560394)
    p = tl.fma(p, f, -0.1666848063468933)
    p = tl.fma(p, f, 0.20000705122947693)
    p = tl.fma(p, f, -0.24999989569187164)
    p = tl.fma(p, f, 0.3333333134651184)
    f2 = f * f
    tail = tl.fma(f2 * f, p, ef * 1.428606765330187e-06)
    tail = tl.fma(-0.5, f2, tail)
    return tl.fma(ef, 0.693145751953125, f + tail)


@triton.jit
def _sincos_angle(theta):
    """(sin, cos) of theta in [0, 2 pi + a few ulp]: ``sincos_angle`` of csrc/ivon_math.h.

        q = nearest quadrant of theta, r = theta - q pi/2 (pi/2 in three parts),
        sin r = r + r^3 S(r^2),  cos r = 1 - r^2/2 + r^4 C(r^2),  rotated by q
    """
    shifted = theta * 0.6366197466850281 + 12582912.0  # + 1.5 * 2^23 rounds to an integer
    q = shifted.to(tl.uint32, bitcast=True) - 0x4B400000
    k = shifted - 12582912.0
    r = tl.fma(-k, 1.5707963705062866, theta)
    r = tl.fma(-k, -4.371138828673793e-08, r)
    r = tl.fma(-k, -1.7763568394002505e-15, r)
    z = r * r
    sp = tl.fma(2.724946625676239e-06, z, -0.00019840081222355366)
    sp = tl.fma(sp, z, 0.008333331905305386)
    sp = tl.fma(sp, z, -0.1666666716337204)
    sin_r = tl.fma(z * r, sp, r)
    cp = tl.fma(-2.7299731186758436e-07, z, 2.4800587198114954e-05)
    cp = tl.fma(cp, z, -0.00138888880610466)
    cp = tl.fma(cp, z, 0.0416666679084301)
    cos_r = tl.fma(z * z, cp, tl.fma(-0.5, z, 1.0))
    swap = (q & 1) != 0
    sin_bits = tl.where(swap, cos_r, sin_r).to(tl.uint32, bitcast=True) ^ ((q & 2) << 30)
    cos_bits = tl.where(swap, sin_r, cos_r).to(tl.uint32, bitcast=True) ^ (((q + 1) & 2) << 30)
    return sin_bits.to(tl.float32, bitcast=True), cos_bits.to(tl.float32, bitcast=True)


@triton.jit
def _box_muller(a, b):
    """BM(a, b) = sqrt(-2 ln max(a, 1e-7)) * (cos 2 pi b, sin 2 pi b), exact sqrt"""
    # a float max where the C++ takes an integer max of the bits: the same for a >= 0, never NaN
    radius = tl.sqrt_rn(-2.0 * _log_pos(tl.maximum(a, 1e-7)))
    sin, cos = _sincos_angle(6.283185307179586 * b)
    return radius * cos, radius * sin


@triton.jit
def _normal(seed, draw, quad):
    """eps of docs/DESIGN.md section 3 for 4 * len(quad) elements: eps[i] = n_(i & 3) of quad i >> 2.

        (x0..x3) = _philox(seed, draw, quad)
        (n0, n1) = BM(u(x0), u(x1)),  (n2, n3) = BM(u(x2), u(x3))

    One Philox call serves the four lanes of a quad, so the RNG stays cheap next to the memory
    traffic.
    """
    x0, x1, x2, x3 = _philox(seed, draw, quad)
    n0, n1 = _box_muller(_uniform(x0), _uniform(x1))
    n2, n3 = _box_muller(_uniform(x2), _uniform(x3))
    # interleave in registers: x[q, j, l] = n_(2 j + l), whose row-major order is the 1-D tile
    quads = tl.join(tl.join(n0, n2), tl.join(n1, n3))
    return tl.reshape(quads, [4 * quad.shape[0]])


@triton.jit
def _rounding_bits(seed, round_draw, quad):
    """The 32 random bits of each element's stochastic rounding (docs/DESIGN.md section 16), for
    4 * len(quad) elements: element i takes output (i & 3) of quad i >> 2's

        (x0..x3) = _philox(seed, round_draw, quad),   round_draw = ROUND_DRAW_BASE + R

    a draw of its own (R is the update's rounding index; training draws, and so R, stay below
    2^62, evaluation draws start at 2^63), so the bits never repeat the noise's. The low 16 bits round the momentum, the high 16 the hess. Interleaved
    into the 1-D tile as ``_normal`` interleaves its normals.
    """
    x0, x1, x2, x3 = _philox(seed, round_draw, quad)
    quads = tl.join(tl.join(x0, x2), tl.join(x1, x3))
    return tl.reshape(quads, [4 * quad.shape[0]])


@triton.jit
def _sigma_noise(eps, hess, ess, delta):
    """noise = eps / sqrt(ess * (hess + delta)), as ivon-opt writes it (true division and sqrt);
    delta is the weight decay or the element's prior precision (see ``_delta``)."""
    return tl.div_rn(eps, tl.sqrt_rn(ess * (hess + delta)))


@triton.jit
def _delta(prior_precision_ptr, k, inside, weight_decay, HAS_PRIOR_PRECISION: tl.constexpr,
           MASKED: tl.constexpr):
    """The delta of every per-element use (ivon_fast.reference's module docstring): the prior
    precision of the element when the op got one, else the group's weight decay. Written into
    the same expressions in place of the scalar, so both round as the reference does."""
    if HAS_PRIOR_PRECISION:
        return _load(prior_precision_ptr, k, inside, 0.0, MASKED)
    else:
        return weight_decay


# ------------------------------------------------------------------------------------------------
# sample
# ------------------------------------------------------------------------------------------------
@triton.jit
def _sample_tile(param_ptr, mean_ptr, hess_ptr, prior_precision_ptr, k, inside, quad, seed, draw,
                 ess, weight_decay, HAS_PRIOR_PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """param <- mean + eps(seed, draw, i) / sqrt(ess * (hess + delta))"""
    mean = _load(mean_ptr, k, inside, 0.0, MASKED)
    hess = _load(hess_ptr, k, inside, 1.0, MASKED)
    delta = _delta(prior_precision_ptr, k, inside, weight_decay, HAS_PRIOR_PRECISION, MASKED)
    eps = _normal(seed, draw, quad)
    _store(param_ptr, k, inside, mean + _sigma_noise(eps, hess, ess, delta), MASKED)


@triton.jit(do_not_specialize=_NOT_SPECIALIZED[:4])
def _sample_kernel(param_ptr, mean_ptr, hess_ptr, prior_precision_ptr, device_draws_ptr, n,
                   quad_base, seed, draw, ess, weight_decay, tiles,
                   HAS_DEVICE_DRAWS: tl.constexpr, HAS_PRIOR_PRECISION: tl.constexpr,
                   LEAD: tl.constexpr, ORIGIN: tl.constexpr, BLOCK: tl.constexpr):
    if HAS_DEVICE_DRAWS:  # the draw number on the device (capturable steps)
        draw = tl.load(device_draws_ptr)
    for tile in range(tl.program_id(0), tiles, tl.num_programs(0)):
        k, quad, full, inside = _tile(tile, quad_base, n, BLOCK, LEAD, ORIGIN)
        if full:
            _sample_tile(param_ptr, mean_ptr, hess_ptr, prior_precision_ptr, k, inside, quad, seed,
                         draw, ess, weight_decay, HAS_PRIOR_PRECISION, MASKED=False)
        else:
            _sample_tile(param_ptr, mean_ptr, hess_ptr, prior_precision_ptr, k, inside, quad, seed,
                         draw, ess, weight_decay, HAS_PRIOR_PRECISION, MASKED=True)


def sample(param, mean, hess, *, seed=0, draw=0, offset=0, ess, weight_decay, eps=None,
           device_draws=None, prior_precision=None):
    """Reference ``sample`` (see ivon_fast.reference) in one kernel launch."""
    _contract.sample(param, mean, hess, seed=seed, draw=draw, offset=offset,
                     device_draws=device_draws, prior_precision=prior_precision, eps=eps)
    n, offset = param.numel(), int(offset)
    if n == 0:
        return
    _launch(_sample_kernel, param.device, n, offset,
            [param, mean, hess, mean if prior_precision is None else prior_precision],
            mean if device_draws is None else device_draws, n, offset >> 2,
            _u64_bits(seed, "seed"), _u64_bits(draw, "draw"), float(ess), float(weight_decay),
            HAS_DEVICE_DRAWS=device_draws is not None,
            HAS_PRIOR_PRECISION=prior_precision is not None)


# ------------------------------------------------------------------------------------------------
# accumulate
# ------------------------------------------------------------------------------------------------
@triton.jit
def _hess_term(grad, hess, eps, ess, delta, PRICE: tl.constexpr):
    """price: noise * grad (noise of the sample the grad was taken at);  gradsq: grad^2"""
    if PRICE:
        return _sigma_noise(eps, hess, ess, delta) * grad
    else:
        return grad * grad


@triton.jit
def _unscaled(value, scale, SCALED: tl.constexpr):
    """value / grad_scale (a true division, as the reference) when the op got a grad_scale."""
    if SCALED:
        value = tl.div_rn(value, scale)
    return value


@triton.jit
def _averages(avg_grad_ptr, avg_hess_term_ptr, k, inside, scale, PRICE: tl.constexpr,
              SCALED: tl.constexpr, MASKED: tl.constexpr):
    """The running averages as stored, or (SCALED) divided by the grad scale: avg_grad once, the
    hess term once for price (noise * grad) and twice for gradsq (grad^2 is scaled twice)."""
    avg_grad = _unscaled(_load(avg_grad_ptr, k, inside, 0.0, MASKED), scale, SCALED)
    avg_term = _unscaled(_load(avg_hess_term_ptr, k, inside, 0.0, MASKED), scale, SCALED)
    if not PRICE:
        avg_term = _unscaled(avg_term, scale, SCALED)
    return avg_grad, avg_term


@triton.jit
def _running_means(grad, term, avg_grad_ptr, avg_hess_term_ptr, k, inside, count, scale,
                   FIRST: tl.constexpr, PRICE: tl.constexpr, SCALED: tl.constexpr,
                   MASKED: tl.constexpr):
    """avg <- new if count == 1 else avg + (new - avg) / count, for (grad, hess term); the
    averages read are unscaled as ``_averages`` says"""
    if not FIRST:  # the first sample overwrites, so stale averages are never read
        avg_grad, avg_term = _averages(avg_grad_ptr, avg_hess_term_ptr, k, inside, scale, PRICE,
                                       SCALED, MASKED)
        grad = avg_grad + tl.div_rn(grad - avg_grad, count)
        term = avg_term + tl.div_rn(term - avg_term, count)
    return grad, term


@triton.jit
def _accumulate_tile(grad_ptr, hess_ptr, avg_grad_ptr, avg_hess_term_ptr, prior_precision_ptr, k,
                     inside, quad, seed, draw, count, ess, weight_decay, FIRST: tl.constexpr,
                     PRICE: tl.constexpr, HAS_PRIOR_PRECISION: tl.constexpr,
                     MASKED: tl.constexpr):
    """avg_grad, avg_hess_term <- running means with new = grad, hess_term(grad)"""
    grad = _load(grad_ptr, k, inside, 0.0, MASKED)
    hess = _load(hess_ptr, k, inside, 1.0, MASKED)
    eps = 0.0
    delta = weight_decay
    if PRICE:  # gradsq needs no noise (nor its delta): skip the Philox work entirely
        eps = _normal(seed, draw, quad)
        delta = _delta(prior_precision_ptr, k, inside, weight_decay, HAS_PRIOR_PRECISION, MASKED)
    grad, term = _running_means(grad, _hess_term(grad, hess, eps, ess, delta, PRICE),
                                avg_grad_ptr, avg_hess_term_ptr, k, inside, count, 1.0, FIRST,
                                PRICE, SCALED=False, MASKED=MASKED)
    _store(avg_grad_ptr, k, inside, grad, MASKED)
    _store(avg_hess_term_ptr, k, inside, term, MASKED)


@triton.jit(do_not_specialize=_NOT_SPECIALIZED[:4])
def _accumulate_kernel(grad_ptr, hess_ptr, avg_grad_ptr, avg_hess_term_ptr, prior_precision_ptr,
                       device_draws_ptr, n, quad_base, seed, draw, count, ess, weight_decay,
                       tiles, FIRST: tl.constexpr, PRICE: tl.constexpr,
                       HAS_DEVICE_DRAWS: tl.constexpr, HAS_PRIOR_PRECISION: tl.constexpr,
                       LEAD: tl.constexpr, ORIGIN: tl.constexpr, BLOCK: tl.constexpr):
    if HAS_DEVICE_DRAWS:  # the draw number on the device (capturable steps)
        draw = tl.load(device_draws_ptr)
    for tile in range(tl.program_id(0), tiles, tl.num_programs(0)):
        k, quad, full, inside = _tile(tile, quad_base, n, BLOCK, LEAD, ORIGIN)
        if full:
            _accumulate_tile(grad_ptr, hess_ptr, avg_grad_ptr, avg_hess_term_ptr,
                             prior_precision_ptr, k, inside, quad, seed, draw, count, ess,
                             weight_decay, FIRST, PRICE, HAS_PRIOR_PRECISION, MASKED=False)
        else:
            _accumulate_tile(grad_ptr, hess_ptr, avg_grad_ptr, avg_hess_term_ptr,
                             prior_precision_ptr, k, inside, quad, seed, draw, count, ess,
                             weight_decay, FIRST, PRICE, HAS_PRIOR_PRECISION, MASKED=True)


def accumulate(grad, hess, avg_grad, avg_hess_term, *, seed=0, draw=0, offset=0, count, ess,
               weight_decay, hess_approx, eps=None, device_draws=None, prior_precision=None):
    """Reference ``accumulate`` (see ivon_fast.reference) in one kernel launch."""
    _contract.accumulate(grad, hess, avg_grad, avg_hess_term, seed=seed, draw=draw,
                         offset=offset, count=count, hess_approx=hess_approx,
                         device_draws=device_draws, prior_precision=prior_precision, eps=eps)
    n, offset, count, price = grad.numel(), int(offset), int(count), hess_approx == "price"
    if n == 0:
        return
    # 'gradsq' never reads the prior precision (its hess term has no noise): one variant fewer
    has_prior_precision = price and prior_precision is not None
    _launch(_accumulate_kernel, hess.device, n, offset,
            [grad, hess, avg_grad, avg_hess_term, prior_precision if has_prior_precision else hess],
            hess if device_draws is None else device_draws, n, offset >> 2,
            _u64_bits(seed, "seed"), _u64_bits(draw, "draw"), float(count), float(ess),
            float(weight_decay), FIRST=count == 1, PRICE=price,
            HAS_DEVICE_DRAWS=device_draws is not None, HAS_PRIOR_PRECISION=has_prior_precision)


# ------------------------------------------------------------------------------------------------
# update
# ------------------------------------------------------------------------------------------------
@triton.jit
def _debiased(momentum, debias):
    """momentum / debias, a true division, skipped where debias is exactly 1 (no debiasing,
    and every step after about 165 with beta1 = 0.9): x / 1 is x (NaN stays NaN), so the bits
    are the division's. A uniform branch on the launch's scalar, not a recompile."""
    if debias != 1.0:
        momentum = tl.div_rn(momentum, debias)
    return momentum


@triton.jit
def _new_moments(grad_mean, hess_term, momentum, hess, delta, ess, beta1, one_minus_beta1, beta2,
                 one_minus_beta2, hess_coef, PRICE: tl.constexpr):
    """The new momentum and hess (``new_moments`` of csrc/ivon_math.h), as _update_tile's
    docstring writes them."""
    new_momentum = beta1 * momentum + one_minus_beta1 * grad_mean
    if PRICE:
        nll_hess = (hess_term * (hess + delta)) * ess
    else:
        nll_hess = hess_term * ess
    diff = hess - nll_hess
    new_hess = ((beta2 * hess + one_minus_beta2 * nll_hess)
                + tl.div_rn(hess_coef * (diff * diff), hess + delta))
    return new_momentum, new_hess


@triton.jit
def _new_mean(mean, new_momentum, new_hess, delta, lr, clip_radius, debias, prior_mean_ptr, k,
              inside, HAS_PRIOR_MEAN: tl.constexpr, MASKED: tl.constexpr):
    """The new mean (``new_mean`` of csrc/ivon_math.h), as _update_tile's docstring writes it."""
    if HAS_PRIOR_MEAN:  # the pull toward the prior's mean
        prior_term = delta * (mean - _load(prior_mean_ptr, k, inside, 0.0, MASKED))
    else:  # toward 0: ivon-opt's weight decay
        prior_term = delta * mean
    step = tl.div_rn(_debiased(new_momentum, debias) + prior_term, new_hess + delta)
    # NaN stays NaN, as in torch.clip (tl.minimum / tl.maximum would drop it)
    return mean - lr * tl.clamp(step, -clip_radius, clip_radius,
                                propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _store_state(momentum_ptr, hess_ptr, k, inside, quad, seed, round_draw, momentum, hess,
                 MASKED: tl.constexpr):
    """Stores the new momentum and hess, fp32 or (bf16 state) by stochastic rounding with the
    element's _rounding_bits(seed, round_draw); returns the hess as stored, in fp32."""
    if momentum_ptr.dtype.element_ty == tl.bfloat16:  # known at compile time
        # stochastic rounding, unbiased where round to nearest would lose every increment below
        # half an ulp (the hess's (1 - b2)(f - h) for b2 near 1)
        random = _rounding_bits(seed, round_draw, quad)
        stored_hess = _bf16_round_stochastic(hess, random >> 16)
        _write(momentum_ptr, k, inside, _bf16_round_stochastic(momentum, random & 0xFFFF),
               MASKED)
        _write(hess_ptr, k, inside, stored_hess, MASKED)
        hess = stored_hess.to(tl.float32)
    else:
        _store(momentum_ptr, k, inside, momentum, MASKED)
        _store(hess_ptr, k, inside, hess, MASKED)
    return hess


@triton.jit
def _update_tile(arrays, scalars, k, inside, quad, HAS_GRAD: tl.constexpr, FIRST: tl.constexpr,
                 PRICE: tl.constexpr, RESAMPLE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                 HAS_PRIOR_MEAN: tl.constexpr, HAS_PRIOR_PRECISION: tl.constexpr,
                 MASKED: tl.constexpr):
    """The update of docs/DESIGN.md section 2, op for op as the reference (``arrays``: the
    kernel's nine segment pointers, ``scalars``: the step's, as ``_update_kernel`` packs them):

        gbar, tbar = the averages, with the grad of the last sample folded in when HAS_GRAD
                     (grad and averages divided by the grad scale first when HAS_GRAD_SCALE)
        d = wd, or (HAS_PRIOR_PRECISION) the element's prior precision
        g <- b1 g + (1 - b1) gbar
        f <- (tbar (h + d)) ess  [price]      f <- tbar ess  [gradsq]
        h <- (b2 h + (1 - b2) f) + (hess_coef (h - f)^2) / (h + d),  hess_coef = 0.5 (1 - b2)^2
        m <- m - lr clip((g / debias + d m) / (h + d), -rho, rho)        (new g and h)
             (HAS_PRIOR_MEAN: d (m - mu0) in place of d m)
        bf16 state only: g, h stored as SR(g, low16(r)), SR(h, high16(r)), r = the element's
                         _rounding_bits(seed, round_draw); m above used the unrounded g and h
        param <- m, or (RESAMPLE) m + eps(next_draw) / sqrt(ess (h + d))   (new m, stored h)

    g and h are read as stored (bf16 state widened, exactly) and computed in fp32 throughout.
    """
    (param_ptr, grad_ptr, mean_ptr, momentum_ptr, hess_ptr, avg_grad_ptr, avg_hess_term_ptr,
     prior_mean_ptr, prior_precision_ptr) = arrays
    (seed, draw, next_draw, round_draw, count, lr, ess, weight_decay, beta1, one_minus_beta1,
     beta2, one_minus_beta2, hess_coef, clip_radius, debias, scale) = scalars
    mean = _load(mean_ptr, k, inside, 0.0, MASKED)
    momentum = _load(momentum_ptr, k, inside, 0.0, MASKED)
    hess = _load(hess_ptr, k, inside, 1.0, MASKED)
    delta = _delta(prior_precision_ptr, k, inside, weight_decay, HAS_PRIOR_PRECISION, MASKED)
    if HAS_GRAD:
        grad = _unscaled(_load(grad_ptr, k, inside, 0.0, MASKED), scale, HAS_GRAD_SCALE)
        eps = 0.0
        if PRICE:  # price needs the noise of the sample the grad was taken at (old hess)
            eps = _normal(seed, draw, quad)
        # FIRST (count == 1) reads no averages at all
        grad_mean, hess_term = _running_means(
            grad, _hess_term(grad, hess, eps, ess, delta, PRICE), avg_grad_ptr,
            avg_hess_term_ptr, k, inside, count, scale, FIRST, PRICE, HAS_GRAD_SCALE, MASKED)
    else:
        grad_mean, hess_term = _averages(avg_grad_ptr, avg_hess_term_ptr, k, inside, scale, PRICE,
                                         HAS_GRAD_SCALE, MASKED)

    new_momentum, new_hess = _new_moments(grad_mean, hess_term, momentum, hess, delta, ess,
                                          beta1, one_minus_beta1, beta2, one_minus_beta2,
                                          hess_coef, PRICE)
    new_mean = _new_mean(mean, new_momentum, new_hess, delta, lr, clip_radius, debias,
                         prior_mean_ptr, k, inside, HAS_PRIOR_MEAN, MASKED)
    # the next sample is drawn around the hess as stored, as a later sample op would draw it
    new_hess = _store_state(momentum_ptr, hess_ptr, k, inside, quad, seed, round_draw,
                            new_momentum, new_hess, MASKED)
    _store(mean_ptr, k, inside, new_mean, MASKED)
    if RESAMPLE:  # write the next sample now: saves a separate sample pass over m and h
        new_mean = new_mean + _sigma_noise(_normal(seed, next_draw, quad), new_hess, ess, delta)
    _store(param_ptr, k, inside, new_mean, MASKED)


# Note [a skipped step]: where found_inf is nonzero (or NaN) the update keeps momentum, hess
# and mean, and writes the param as it would after any update: the mean, or with a next sample
# the next draw's sample around the mean and hess, which is what ``sample`` writes. The kernel
# tests the flag once per tile, a uniform branch, instead of selecting between old and new
# values per element (3 SASS instructions per element of every step that is not skipped). The
# old momentum, hess and mean need no store: they are the values already there (bf16 state
# too, which would round to itself). The skipped tile always runs masked: skipped steps are
# rare, and one variant keeps the kernel smaller.
@triton.jit
def _skipped_tile(param_ptr, mean_ptr, hess_ptr, prior_precision_ptr, k, inside, quad, seed,
                  next_draw, ess, weight_decay, RESAMPLE: tl.constexpr,
                  HAS_PRIOR_PRECISION: tl.constexpr):
    """param <- m, or (RESAMPLE) m + eps(next_draw) / sqrt(ess (h + d)); g, h and m kept"""
    if RESAMPLE:
        _sample_tile(param_ptr, mean_ptr, hess_ptr, prior_precision_ptr, k, inside, quad, seed,
                     next_draw, ess, weight_decay, HAS_PRIOR_PRECISION, MASKED=True)
    else:
        _store(param_ptr, k, inside, _load(mean_ptr, k, inside, 0.0, True), True)


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _update_kernel(param_ptr, grad_ptr, mean_ptr, momentum_ptr, hess_ptr, avg_grad_ptr,
                   avg_hess_term_ptr, prior_mean_ptr, prior_precision_ptr, grad_scale_ptr,
                   found_inf_ptr, device_lr_ptr, device_debias_ptr, device_draws_ptr, n,
                   quad_base, seed, draw, next_draw, round_draw, count, lr, ess,
                   weight_decay, beta1, one_minus_beta1, beta2, one_minus_beta2, hess_coef,
                   clip_radius, debias, tiles, HAS_GRAD: tl.constexpr, FIRST: tl.constexpr,
                   PRICE: tl.constexpr, RESAMPLE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                   HAS_FOUND_INF: tl.constexpr, HAS_DEVICE_LR: tl.constexpr,
                   HAS_DEVICE_DEBIAS: tl.constexpr, HAS_DEVICE_DRAWS: tl.constexpr,
                   HAS_PRIOR_MEAN: tl.constexpr, HAS_PRIOR_PRECISION: tl.constexpr,
                   LEAD: tl.constexpr, ORIGIN: tl.constexpr, BLOCK: tl.constexpr):
    # the device scalars (1-element fp32 tensors), read here, never on the host; an absent one
    # costs nothing (its flag is off and its pointer is never touched)
    scale = 1.0
    if HAS_GRAD_SCALE:
        scale = tl.load(grad_scale_ptr)
    skip = False
    if HAS_FOUND_INF:
        skip = tl.load(found_inf_ptr) != 0.0  # NaN != 0: a NaN also skips, as the reference
    if HAS_DEVICE_LR:
        lr = tl.load(device_lr_ptr)
    if HAS_DEVICE_DEBIAS:
        debias = tl.load(device_debias_ptr)
    if HAS_DEVICE_DRAWS:  # the draw numbers on the device (int64: draw, next_draw)
        draw = tl.load(device_draws_ptr)
        if RESAMPLE:
            next_draw = tl.load(device_draws_ptr + 1)
        if momentum_ptr.dtype.element_ty == tl.bfloat16:
            # the rounding index is draws[1], also without RESAMPLE; the host passed the bare
            # ROUND_DRAW_BASE (int64 sums wrap, as uint64 sums do)
            round_draw = round_draw + tl.load(device_draws_ptr + 1)
    # the full tile's and the masked tile's update differ only in MASKED, a constexpr
    arrays = (param_ptr, grad_ptr, mean_ptr, momentum_ptr, hess_ptr, avg_grad_ptr,
              avg_hess_term_ptr, prior_mean_ptr, prior_precision_ptr)
    scalars = (seed, draw, next_draw, round_draw, count, lr, ess, weight_decay, beta1,
            one_minus_beta1, beta2, one_minus_beta2, hess_coef, clip_radius, debias, scale)
    for tile in range(tl.program_id(0), tiles, tl.num_programs(0)):
        k, quad, full, inside = _tile(tile, quad_base, n, BLOCK, LEAD, ORIGIN)
        if skip:  # uniform: every program takes the same side (Note [a skipped step])
            _skipped_tile(param_ptr, mean_ptr, hess_ptr, prior_precision_ptr, k, inside, quad,
                          seed, next_draw, ess, weight_decay, RESAMPLE, HAS_PRIOR_PRECISION)
        elif full:
            _update_tile(arrays, scalars, k, inside, quad, HAS_GRAD, FIRST, PRICE, RESAMPLE,
                         HAS_GRAD_SCALE, HAS_PRIOR_MEAN, HAS_PRIOR_PRECISION, MASKED=False)
        else:
            _update_tile(arrays, scalars, k, inside, quad, HAS_GRAD, FIRST, PRICE, RESAMPLE,
                         HAS_GRAD_SCALE, HAS_PRIOR_MEAN, HAS_PRIOR_PRECISION, MASKED=True)


def update(param, grad, mean, momentum, hess, avg_grad, avg_hess_term, *, seed=0, draw=0,
           next_draw=None, offset=0, count, hess_approx, scalars: StepScalars, eps=None,
           next_eps=None, grad_scale=None, found_inf=None, device_lr=None, device_debias=None,
           device_draws=None, prior_mean=None, prior_precision=None, round_draw=0):
    """Reference ``update`` (see ivon_fast.reference) in one kernel launch.

    With ``grad`` given and count == 1 the averages are neither read, written nor checked (they
    may be None); with ``grad=None`` they must hold all ``count`` samples. ``grad_scale``,
    ``found_inf``, ``device_lr`` and ``device_debias`` are 1-element float32 tensors on the
    params' device (or None); the kernel reads them, the host never does. ``prior_mean`` and
    ``prior_precision`` are fp32 tensors of the segment (or None). ``momentum`` and ``hess``
    are both fp32 or both bf16; bf16 state is stored by stochastic rounding with the bits of the
    rounding index ``round_draw`` (with ``device_draws``: ``device_draws[1]``, read by the
    kernel; the host's value is then ignored). fp32 state ignores ``round_draw``.
    """
    device_scalars = dict(grad_scale=grad_scale, found_inf=found_inf, device_lr=device_lr,
                          device_debias=device_debias)
    _contract.update(param, grad, mean, momentum, hess, avg_grad, avg_hess_term, seed=seed,
                     draw=draw, next_draw=next_draw, offset=offset, count=count,
                     hess_approx=hess_approx, round_draw=round_draw, device_draws=device_draws,
                     prior_mean=prior_mean, prior_precision=prior_precision, eps=eps,
                     next_eps=next_eps, **device_scalars)
    n, offset, count, price = param.numel(), int(offset), int(count), hess_approx == "price"
    first = grad is not None and count == 1
    if n == 0:
        return
    s = scalars
    # unused pointers still need a tensor: hand the kernel one it never touches
    segment = [param, hess if grad is None else grad, mean, momentum, hess,
               hess if first else avg_grad, hess if first else avg_hess_term]
    segment += [mean if prior is None else prior for prior in (prior_mean, prior_precision)]
    pointers = [mean if tensor is None else tensor for tensor in device_scalars.values()]
    pointers.append(hess if device_draws is None else device_draws)
    # the Philox draw of the rounding bits; with device draws the kernel adds draws[1] to it
    rounding = _rounding_draw(0 if device_draws is not None else round_draw)
    _launch(_update_kernel, param.device, n, offset, segment, *pointers, n, offset >> 2,
            _u64_bits(seed, "seed"), _u64_bits(draw, "draw"),
            _u64_bits(0 if next_draw is None else next_draw, "next_draw"), rounding, float(count),
            s.lr, s.ess, s.weight_decay, s.beta1, s.one_minus_beta1, s.beta2, s.one_minus_beta2,
            s.hess_coef, s.clip_radius, s.debias, HAS_GRAD=grad is not None, FIRST=first,
            PRICE=price, RESAMPLE=next_draw is not None, HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None, HAS_DEVICE_LR=device_lr is not None,
            HAS_DEVICE_DEBIAS=device_debias is not None,
            HAS_DEVICE_DRAWS=device_draws is not None, HAS_PRIOR_MEAN=prior_mean is not None,
            HAS_PRIOR_PRECISION=prior_precision is not None)


# ------------------------------------------------------------------------------------------------
# Host-side launching and argument handling
# ------------------------------------------------------------------------------------------------
def _u64_bits(value: int, name: str) -> int:
    """A uint64 as the int64 with the same bits: triton types larger Python ints as uint64, and
    one signed type keeps the kernel signature (and its compiled variants) the same for all."""
    return _contract.int64_bits(_contract.uint64(_contract.raise_check, value, name))


def _rounding_draw(round_draw: int) -> int:
    """The Philox draw of an update's rounding bits, ROUND_DRAW_BASE + round_draw, as int64 bits
    (see ``_u64_bits``); mod 2^64, as the kernel's sum with a device draw and the reference's
    int64 sum wrap."""
    return _u64_bits((ROUND_DRAW_BASE + _u64_bits(round_draw, "round_draw")) % (1 << 64),
                     "the rounding draw")


def _launch(kernel, device: torch.device, n: int, offset: int, segment: list, *args,
            **flags) -> None:
    """One launch of ``kernel`` over a segment of n elements at global ``offset``: ``segment``
    holds its tensors of the segment (the kernel's first pointers), ``args`` the other
    arguments.

    ``flags`` are the kernel's constexpr flags; the tile count (``tiles``), LEAD, ORIGIN
    (``_from_quad``), BLOCK and the launch options are added here, and the grid (Note [tiles of
    a launch]). FMA contraction is off (``enable_fp_fusion=False``), as in the C++ build, so
    each multiply and add rounds like torch's elementwise ops, and the kernels give the C++
    kernels' bits (the interpreter ignores the option: numpy never contracts).
    """
    block, warps = _launch_config(device)
    lead = offset & 3
    widened = _from_quad(segment, lead)
    tiles = triton.cdiv(n + lead, block)  # Python ints: no overflow near 2^31 elements
    with _on_device(device):
        cap = _max_programs(device)
        kernel[(tiles if cap is None else min(tiles, cap),)](
            *(segment if widened is None else widened), *args, tiles=tiles, **flags, LEAD=lead,
            ORIGIN=widened is not None, BLOCK=block, num_warps=warps, enable_fp_fusion=False)


def _from_quad(segment: list, lead: int):
    """The segment's tensors widened to start ``lead`` elements earlier, at the first element of
    the segment's quad (Note [segments from their quad]), where every one of them has that room
    in its storage (the layout's buffers do: Note [quads in the buffers] in _bucket); else
    None, and the kernel runs from the segment's own pointers. None when lead is 0 too: the
    segment already starts at its quad."""
    if lead == 0 or any(t.storage_offset() < lead for t in segment):
        return None
    return [t.as_strided((t.numel() + lead,), (1,), t.storage_offset() - lead) for t in segment]


def _on_device(device: torch.device):
    """Make ``device`` current for a launch: Triton compiles for and launches on the current
    stream of the current CUDA device, whatever device the tensors are on. Skipped (no device
    switch) when it already is current, and for CPU tensors under the interpreter."""
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)
