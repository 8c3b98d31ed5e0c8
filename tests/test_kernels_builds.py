"""What concerns one backend's build, launch or device rather than the op contract (which
tests/test_kernels.py checks on every backend):

- Triton: Philox, stochastic rounding and the fma probed inside a kernel, the PTX for sm_90
  without contracted FMAs, every launch turning contraction off, the launch knobs
  IVON_TRITON_BLOCK / IVON_TRITON_WARPS / IVON_TRITON_PROGRAMS, hyperparameters and device
  scalars as runtime values (no recompiles), the C++ CPU kernel's bits.
- The C++ extension: every CPU instruction-set build gives the same bits (set_cpu_isa), the ops'
  registration and schema, torch.compile with the fake kernels matching eager.
- GPU only (marked gpu): the current stream and device, the CUDA kernels bit for bit with the CPU
  kernels, Triton on the GPU against the C++ CPU kernel (bit for bit, both).

Part of the kernel suite (tests/test_kernels.py says how it is organized).
"""
import contextlib
import os
import re
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

from ivon_fast import cpp_backend as cpp
from ivon_fast import reference
from ivon_fast import triton_backend as tb
from ivon_fast.scalars import StepScalars

import kernel_cases as kc
from kernel_backends import BY_NAME, backend_params
from kernel_cases import BIG_SEED, EVAL_DRAW, assert_close
from kernel_checks import (PRIOR_OUTPUTS, PRIOR_SCALARS, assert_low_precision_rounding, one,
                           prior_inputs, prior_state, run_prior_op)
from state_checks import bf16_state

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

_TRITON_REASON = BY_NAME["triton"].unavailable_reason()
_CPP_REASON = cpp.unavailable_reason("cpu")
TRITON = [pytest.mark.triton, pytest.mark.skipif(_TRITON_REASON is not None,
                                                 reason=str(_TRITON_REASON))]
CPP = [pytest.mark.cpp, pytest.mark.skipif(_CPP_REASON is not None, reason=str(_CPP_REASON))]
TRITON_DEVICE = BY_NAME["triton"].device


def marked(marks):
    """A decorator applying the marks ``marks`` (TRITON, CPP, or both)."""
    def decorate(test):
        for mark in reversed(marks):
            test = mark(test)
        return test
    return decorate
HYPER = dict(ess=40.0, weight_decay=1e-3)


def make_state(n, device, seed=0):
    """mean, momentum, hess, avg_grad, avg_hess_term (fp32)."""
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, generator=gen)
    momentum = 0.1 * torch.randn(n, generator=gen)
    hess = 0.5 + torch.rand(n, generator=gen)
    avg_grad = torch.randn(n, generator=gen)
    avg_term = 0.1 * torch.randn(n, generator=gen)
    return [t.to(device) for t in (mean, momentum, hess, avg_grad, avg_term)]


def make_grad(n, dtype, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen).to(device=device, dtype=dtype)


def clones(tensors):
    return [None if t is None else t.clone() for t in tensors]


def update_scalars(clip_radius, **hyper):
    return StepScalars.of(lr=0.05, beta1=0.9, beta2=0.99, clip_radius=clip_radius,
                          debias=1 - 0.9 ** 3, **(hyper or HYPER))


# =============================================================================================
# Triton
# =============================================================================================
if triton is not None:
    @triton.jit
    def _philox_probe(out_ptr, seed, draw, quad_base, QUADS: tl.constexpr):
        """Stores the four raw Philox outputs (int64 holding uint32) of quads quad_base + q."""
        q = tl.arange(0, QUADS)
        x0, x1, x2, x3 = tb._philox(seed, draw, quad_base + q.to(tl.int64))
        tl.store(out_ptr + 4 * q + 0, x0.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + 4 * q + 1, x1.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + 4 * q + 2, x2.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + 4 * q + 3, x3.to(tl.int64) & 0xFFFFFFFF)

    @triton.jit
    def _stochastic_rounding_probe(out_ptr, value_ptr, random16_ptr, N: tl.constexpr):
        """out <- the kernels' stochastic rounding of value with random16 (uint32 < 2^16)."""
        k = tl.arange(0, N)
        rounded = tb._bf16_round_stochastic(tl.load(value_ptr + k), tl.load(random16_ptr + k))
        tl.store(out_ptr + k, rounded)

    @triton.jit
    def _tile_probe(out_ptr, tile, quad_base, n, LEAD: tl.constexpr, ORIGIN: tl.constexpr,
                    BLOCK: tl.constexpr):
        """out <- tile ``tile``'s positions k where inside the segment, else -1; then full."""
        k, quad, full, inside = tb._tile(tile, quad_base, n, BLOCK, LEAD, ORIGIN)
        tl.store(out_ptr + tl.arange(0, BLOCK), tl.where(inside, k, -1))
        tl.store(out_ptr + BLOCK, full.to(tl.int64))

    @triton.jit
    def _fma_probe(out_ptr, a_ptr, b_ptr, c_ptr, N: tl.constexpr):
        """out <- the kernels' fma(a, b, c) (fp32)."""
        k = tl.arange(0, N)
        tl.store(out_ptr + k, tl.fma(tl.load(a_ptr + k), tl.load(b_ptr + k),
                                     tl.load(c_ptr + k)))


def _probe(seed, draw, quad, quads, device):
    out = torch.zeros(4 * quads, dtype=torch.int64, device=device)
    _philox_probe[(1,)](out, tb._u64_bits(seed, "seed"), tb._u64_bits(draw, "draw"),
                        tb._u64_bits(quad, "quad"), QUADS=quads)
    return out.view(quads, 4).cpu()


@marked(TRITON)
def test_triton_philox_known_answers():
    """Random123's published answers (docs/DESIGN.md section 3) from the kernels' Philox:
    counter (c0 c1 c2 c3), key (k0 k1)."""
    cases = [  # (quad = c1:c0, draw = c3:c2, seed = k1:k0) -> outputs
        (0, 0, 0, [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ((1 << 64) - 1, (1 << 64) - 1, (1 << 64) - 1,
         [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        (0x85A308D3243F6A88, 0x0370734413198A2E, 0x299F31D0A4093822,
         [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
    ]
    for quad, draw, seed, expected in cases:
        assert _probe(seed, draw, quad, 1, TRITON_DEVICE)[0].tolist() == expected


@marked(TRITON)
def test_triton_philox_integers_match_reference():
    """The kernels' Philox words equal the reference's for 64 quads from several counters (the
    second crosses a 2^32 boundary of the quad counter), seeds and draws above 2^63."""
    for seed, draw, quad in [(0, 0, 0), (12345, 7, (1 << 32) - 3),
                             (BIG_SEED, EVAL_DRAW, (1 << 40) + 5),
                             ((1 << 64) - 1, (1 << 64) - 1, (1 << 62) + 1), (1 << 63, 1 << 32, 1)]:
        got = _probe(seed, draw, quad, 64, TRITON_DEVICE)
        q = torch.arange(quad, quad + 64, dtype=torch.int64)
        expected = reference.philox4x32_10(q & 0xFFFFFFFF, q >> 32, draw & 0xFFFFFFFF,
                                           draw >> 32, seed & 0xFFFFFFFF, seed >> 32)
        assert torch.equal(got, torch.stack(expected, dim=1)), (seed, draw, quad)


@marked(TRITON)
# the interpreter's numpy warns about the probe's NaN comparisons
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_triton_stochastic_rounding_bits(rounding_probe):
    """The kernels' stochastic rounding is reference.stochastic_round_bf16 bit for bit: halfway
    cases, overflow edges, infs, NaNs (also signalling ones, whose kept bits alone would read
    as inf), with the random bits at their extremes and in between."""
    device = TRITON_DEVICE
    signalling = torch.tensor([0x7F800001, 0xFF800001 - (1 << 32), 0x7FBFFFFF, 0x7F80FFFF],
                              dtype=torch.int32).view(torch.float32)
    values = torch.cat([rounding_probe, signalling])
    random16 = torch.tensor([0, 1, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF], dtype=torch.int64)
    random16 = torch.cat([random16, torch.randint(0, 1 << 16, (10,),
                                                  generator=torch.Generator().manual_seed(2))])
    last = len(signalling) * len(random16)  # the signalling NaNs' elements come last
    values, random16 = (values[:, None].expand(-1, len(random16)).reshape(-1),
                        random16[None, :].expand(len(values), -1).reshape(-1))
    size = 1 << (len(values) - 1).bit_length()  # tl.arange wants a power of two
    padded = torch.zeros(size, dtype=torch.float32)
    padded[:len(values)] = values
    bits = torch.zeros(size, dtype=torch.int32)
    bits[:len(values)] = random16.to(torch.int32)
    out = torch.empty(size, dtype=torch.bfloat16, device=device)
    _stochastic_rounding_probe[(1,)](out, padded.to(device), bits.view(torch.uint32).to(device),
                                     N=size)
    expected = reference.stochastic_round_bf16(values, random16)
    assert torch.equal(out[:len(values)].cpu().view(torch.int16), expected.view(torch.int16))
    assert bool(expected[-last:].isnan().all())  # the signalling NaNs stay NaN


def _rounded_to_fp32(exact: Fraction) -> float:
    """The fp32 nearest to the rational ``exact``, ties to even (normal range)."""
    guess = np.float32(float(exact))
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess,
                  np.nextafter(guess, np.float32(np.inf))]
    return min(candidates, key=lambda f: (abs(Fraction(float(f)) - exact),
                                          int(np.array(f).view(np.int32)) & 1))


@marked(TRITON)
def test_triton_fma_rounds_once():
    """``tl.fma`` (under the interpreter, as Note [the noise's own functions in Triton] makes it)
    is a * b + c rounded once, as the GPU's fma.rn.f32 and the C++ build's fmaf: cases where
    rounding the product first, or the sum first to double and then to float, gives another
    float (the first three), and random operands of mixed scales, against the exact rational
    result."""
    u = 2.0 ** -23
    cases = [(1 + u, 1 - u / 2, 2.0 ** -47 * (1 + u)),     # exact 1 + 2^-24 + 2^-70: rounds up
             (1 + u, 1 - u / 2, -(2.0 ** -47) * (1 + u)),  # its mirror: 1 + 2^-24 - 2^-70, down
             (-(1 + u), 1 - u / 2, -(2.0 ** -47) * (1 + u)),
             (3.0, 1 / 3.0, -1.0)]
    gen = np.random.default_rng(7)
    a, b, c = (gen.standard_normal(120) * 2.0 ** gen.integers(-20, 20, 120) for _ in range(3))
    cases += list(zip(a, b, c))
    a, b, c = (torch.tensor([case[i] for case in cases], dtype=torch.float32) for i in range(3))
    size = 1 << (len(cases) - 1).bit_length()
    operands = [torch.ones(size) for _ in range(3)]
    for padded, values in zip(operands, (a, b, c)):
        padded[:len(cases)] = values
    out = torch.empty(size, device=TRITON_DEVICE)
    _fma_probe[(1,)](out, *(t.to(TRITON_DEVICE) for t in operands), N=size)
    expected = [_rounded_to_fp32(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z)))
                for x, y, z in zip(a, b, c)]
    assert out[:len(cases)].cpu().tolist() == [float(e) for e in expected]
    assert out[0].item() == 1 + u and out[1].item() == 1.0


@marked(TRITON)
def test_triton_tiles_near_2_to_the_31():
    """A segment of 2^31 - 1 elements (an int32 length) starting mid-quad: its last tile holds
    the segment's last positions and is partial, the tile before it is full; nothing overflows
    int32 (Note [segments from their quad])."""
    n, lead, block = (1 << 31) - 1, 3, 16
    last = triton.cdiv(n + lead, block) - 1
    out = torch.empty(block + 1, dtype=torch.int64, device=TRITON_DEVICE)
    for tile, full in ((last - 1, 1), (last, 0)):
        _tile_probe[(1,)](out, tile, 0, n, LEAD=lead, ORIGIN=True, BLOCK=block)
        k = torch.arange(tile * block, (tile + 1) * block)
        expected = torch.where(k < lead + n, k, -1)
        assert torch.equal(out[:block].cpu(), expected), tile
        assert out[block].item() == full


def _placed_update(ops, device, bf16_state: bool, found_inf: float) -> list:
    """param, mean, momentum, hess after one drop-in update of a segment at offset 4099 in a
    buffer with room before it (so Triton runs it from its quad: ORIGIN), with the finite
    check's flag ``found_inf``."""
    n, state_dtype = 333, torch.bfloat16 if bf16_state else torch.float32
    mean, momentum, hess, _, _ = make_state(n, device)
    tensors = [_in_a_buffer(t, before=3) for t in
               (torch.zeros(n, device=device), make_grad(n, torch.float32, device), mean,
                momentum.to(state_dtype), hess.to(state_dtype))]
    ops.update(*tensors, None, None, seed=BIG_SEED, offset=4099, draw=2, next_draw=3, count=1,
               hess_approx="price", scalars=update_scalars(0.1), round_draw=4,
               found_inf=one(found_inf, device))
    return [t.float() for t in (tensors[0], *tensors[2:])]


@marked(TRITON + CPP)
def test_triton_is_the_cpu_kernel_bit_for_bit(monkeypatch):
    """The Triton kernels draw their noise with the C++ kernels' own functions (Note [the
    noise's own functions in Triton]) and compute every op as they do, neither contracting:
    whole trajectories of both loops (sample, accumulate, update with a next sample) give the
    same bits, for each param dtype and for bf16 state, with several tiles per program (Note
    [tiles of a launch]) and segments that start mid-quad; and the noise itself over a million
    elements (a sample with sigma 1)."""
    from test_kernels import trajectory
    monkeypatch.setenv("IVON_TRITON_BLOCK", "128")  # 3 or 4 tiles: 2 on a program
    monkeypatch.setenv("IVON_TRITON_PROGRAMS", "2")
    for dtype, n, offset, mc, hess_approx in [(torch.float32, 401, 4099, 1, "price"),
                                              (torch.bfloat16, 333, 2, 3, "price"),
                                              (torch.float16, 263, 0, 2, "gradsq")]:
        got = trajectory(tb, TRITON_DEVICE, dtype, n, offset, mc, hess_approx, 3)
        expected = trajectory(cpp, "cpu", dtype, n, offset, mc, hess_approx, 3)
        for name, a, e in zip(("param", "mean", "momentum", "hess"), got, expected):
            assert torch.equal(a.cpu(), e), (dtype, name)
    for bf16, skip in ((False, 0.0), (False, 1.0), (True, 1.0)):  # several tiles, from the quad
        outputs = [_placed_update(ops, device, bf16, skip)
                   for ops, device in ((tb, TRITON_DEVICE), (cpp, "cpu"))]
        for a, e in zip(*outputs):
            assert torch.equal(a.cpu(), e), (bf16, skip)
    monkeypatch.delenv("IVON_TRITON_BLOCK")
    monkeypatch.delenv("IVON_TRITON_PROGRAMS")
    n = (1 << 20) + 3
    noise = {}
    for ops, device in ((tb, TRITON_DEVICE), (cpp, "cpu")):
        param = torch.empty(n, device=device)
        ops.sample(param, torch.zeros(n, device=device), torch.ones(n, device=device),
                   seed=BIG_SEED, draw=5, offset=1, ess=1.0, weight_decay=0.0)
        noise[device] = param.cpu()
    assert torch.equal(noise[TRITON_DEVICE], noise["cpu"])
    assert 0.99 < noise["cpu"].std().item() < 1.01


@pytest.mark.skipif(triton is None, reason="triton could not be imported")
@pytest.mark.triton
def test_triton_unavailable_reason(monkeypatch):
    """CUDA tensors are fine; meta tensors are not; CPU tensors need the interpreter."""
    assert tb.unavailable_reason(torch.device("cuda")) is None
    assert isinstance(tb.unavailable_reason(torch.device("meta")), str)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in tb.unavailable_reason(torch.device("cpu"))


@marked(TRITON)
def test_triton_bad_launch_knobs_rejected(monkeypatch):
    """IVON_TRITON_BLOCK must be a power of two >= 4, IVON_TRITON_WARPS a power of two and
    IVON_TRITON_PROGRAMS an integer >= 1."""
    for knob, value, message in [("IVON_TRITON_BLOCK", "48", "power of two"),
                                 ("IVON_TRITON_BLOCK", "2", "power of two"),
                                 ("IVON_TRITON_WARPS", "3", "power of two"),
                                 ("IVON_TRITON_PROGRAMS", "0", "integer >= 1"),
                                 ("IVON_TRITON_PROGRAMS", "two", "integer >= 1")]:
        with monkeypatch.context() as patch:
            patch.setenv(knob, value)
            with pytest.raises(ValueError, match=f"{knob} must be .*{message}"):
                tb.sample(torch.zeros(8, device=TRITON_DEVICE),
                          torch.zeros(8, device=TRITON_DEVICE),
                          torch.ones(8, device=TRITON_DEVICE), ess=1.0, weight_decay=0.0)


@pytest.mark.skipif(triton is None, reason="triton could not be imported")
@pytest.mark.triton
def test_triton_hyperparameters_are_runtime_arguments():
    """Changing lr or the step must not recompile: only the UPPERCASE flags are constexpr."""
    for kernel in ("_sample_kernel", "_accumulate_kernel", "_update_kernel"):
        fn = getattr(tb, kernel).fn
        constexprs = {name for name, ann in fn.__annotations__.items()
                      if "constexpr" in str(ann)}
        assert constexprs == {name for name in fn.__code__.co_varnames[:fn.__code__.co_argcount]
                              if name.isupper()}, kernel
        assert "BLOCK" in constexprs and "LEAD" in constexprs, kernel


ROOM = 4  # sentinel elements on each side of a segment placed in a buffer


def _in_a_buffer(tensor, before=ROOM):
    """A copy of ``tensor`` in the middle of a buffer of NaN sentinels: ``before`` elements
    before it (as the layout's pads and neighbours give a segment; Note [quads in the buffers])
    and ROOM after."""
    buffer = torch.full((tensor.numel() + before + ROOM,), float("nan"), dtype=tensor.dtype,
                        device=tensor.device)
    if not tensor.is_floating_point():
        buffer.fill_(-7)
    buffer[before:before + tensor.numel()] = tensor
    return buffer[before:before + tensor.numel()]


def _rows_from_mid_quad(op):
    rows = {"sample": kc.sample_rows, "accumulate": kc.accumulate_rows,
            "update": kc.update_rows}[op]()
    return [row for row in rows if kc.segment(row)[1] & 3]


@marked(TRITON)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                            "ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("op", ["sample", "accumulate", "update"])
def test_triton_segments_from_their_quad(monkeypatch, op):
    """A segment that starts mid-quad with room before it in its buffers runs from its quad's
    first element (ORIGIN, Note [segments from their quad] in triton_backend): the bits of the
    same op on tensors of their own (which run from the segment's pointers), and the elements
    around the segment untouched."""
    launches = _record_launches(monkeypatch)
    for row in _rows_from_mid_quad(op):
        tensors, kw, dev = kc.op_inputs(op, row, TRITON_DEVICE)
        with kc.launch_block(BY_NAME["triton"], row):
            own = kc.call(tb, op, tensors, kw, dev)
            del launches[:]
            placed = kc.call(tb, op, tensors, kw, dev, copy=_in_a_buffer)
        assert [flags["ORIGIN"] for _, _, flags in launches] == [True], kc.label(row)
        for name, value in placed.items():
            if value is None:
                continue
            assert kc.same_bits(value, own[name]), f"{kc.label(row)}: {name}"
            whole = torch.as_strided(value, (value.numel() + 2 * ROOM,), (1,),
                                     value.storage_offset() - ROOM)
            outside = torch.cat([whole[:ROOM], whole[-ROOM:]])
            sentinel = float("nan") if value.is_floating_point() else -7
            assert kc.same_bits(outside, torch.full_like(outside, sentinel)), name


def _record_launches(monkeypatch, run_kernels=True):
    """(kernel name, args, kwargs) of every kernel launch from here on."""
    launches = []
    for name in ("_sample_kernel", "_accumulate_kernel", "_update_kernel"):
        kernel = getattr(tb, name)

        def spy(*args, grid, warmup, _run=kernel.run, _name=name, **kwargs):
            launches.append((_name, args, kwargs))
            return _run(*args, grid=grid, warmup=warmup, **kwargs) if run_kernels else None

        monkeypatch.setattr(kernel, "run", spy)
    return launches


@marked(TRITON)
def test_triton_device_scalar_values_do_not_recompile(monkeypatch):
    """The kernel reads device_lr / found_inf / grad_scale / device_debias through pointers: a
    new value in the same tensors (as a CUDA graph replay or a GradScaler update writes it)
    launches with exactly the same arguments, so the same compiled kernel, and changes the
    result."""
    n, device = 37, TRITON_DEVICE
    state = make_state(n, device)
    grad, param = make_grad(n, torch.float32, device), torch.zeros(n, device=device)
    dev = dict(grad_scale=one(2.0, device), found_inf=one(0.0, device),
               device_lr=one(0.05, device), device_debias=one(0.3, device))
    kernel = tb._update_kernel
    compiled_before = (len(kernel.device_caches[torch.cuda.current_device()][0])
                       if device == "cuda" else None)
    launches = _record_launches(monkeypatch)
    results = []
    for lr, found in [(0.05, 0.0), (0.2, 0.0), (0.2, 1.0)]:
        dev["device_lr"].fill_(lr)
        dev["found_inf"].fill_(found)
        p, st = param.clone(), clones(state)
        tb.update(p, grad, *st, seed=BIG_SEED, draw=6, next_draw=9, offset=4099, count=1,
                  hess_approx="price", scalars=update_scalars(0.1), **dev)
        results.append(st)
    assert len(launches) == 3
    for _, args, kwargs in launches[1:]:
        assert kwargs == launches[0][2]
        assert len(args) == len(launches[0][1])
        for a, b in zip(args, launches[0][1]):
            if isinstance(a, torch.Tensor) and any(a is t for t in dev.values()):
                assert a is b  # the same device scalar tensors
            elif not isinstance(a, torch.Tensor):
                assert a == b
    assert not torch.equal(results[0][0], results[1][0])   # the new lr was used
    assert torch.equal(results[2][0], state[0])            # the step was skipped
    if device == "cuda":
        assert len(kernel.device_caches[torch.cuda.current_device()][0]) <= compiled_before + 1


def _launch_every_op(device, dtype=torch.float32, bf16_state=True):
    n = 37
    mean, momentum, hess, avg_grad, avg_term = make_state(n, device)
    grad, param = make_grad(n, dtype, device), torch.empty(n, dtype=dtype, device=device)
    common = dict(seed=BIG_SEED, offset=3, **HYPER)
    tb.sample(param, mean, hess, draw=1, **common)
    tb.accumulate(grad, hess, avg_grad, avg_term, draw=1, count=1, hess_approx="price", **common)
    tb.update(param, grad, mean, momentum, hess, avg_grad, avg_term, seed=BIG_SEED, offset=3,
              draw=2, next_draw=3, count=2, hess_approx="price", scalars=update_scalars(0.1))
    # with every device scalar (their loads, the unscaling and the skip compile for the GPU too)
    tb.update(param, grad, mean, momentum, hess, avg_grad, avg_term, seed=BIG_SEED, offset=3,
              draw=2, next_draw=3, count=2, hess_approx="gradsq", scalars=update_scalars(0.1),
              grad_scale=one(3.0, device), found_inf=one(0.0, device),
              device_lr=one(0.1, device), device_debias=one(0.5, device),
              device_draws=torch.tensor([2, 3], dtype=torch.int64, device=device))
    # with the prior inputs (their loads and the prior terms compile for the GPU too)
    precision = 0.1 * hess
    tb.sample(param, mean, hess, draw=1, prior_precision=precision, **common)
    tb.accumulate(grad, hess, avg_grad, avg_term, draw=1, count=2, hess_approx="price",
                  prior_precision=precision, **common)
    tb.update(param, grad, mean, momentum, hess, avg_grad, avg_term, seed=BIG_SEED, offset=3,
              draw=2, next_draw=3, count=2, hess_approx="price", scalars=update_scalars(0.1),
              prior_mean=0.5 * mean, prior_precision=precision)
    # a segment of a padded bucket, run from its quad (ORIGIN; Note [segments from their quad])
    placed = [_in_a_buffer(t, before=3) for t in (param, grad, mean, momentum, hess)]
    tb.update(*placed, None, None, seed=BIG_SEED, offset=3, draw=2, next_draw=3, count=1,
              hess_approx="price", scalars=update_scalars(0.1))
    if not bf16_state:
        return
    # bf16 momentum / hess (the widening loads, the rounding bits, the stochastic rounding)
    momentum16, hess16 = momentum.to(torch.bfloat16), hess.to(torch.bfloat16)
    tb.sample(param, mean, hess16, draw=1, **common)
    tb.accumulate(grad, hess16, avg_grad, avg_term, draw=1, count=2, hess_approx="price",
                  **common)
    tb.update(param, grad, mean, momentum16, hess16, avg_grad, avg_term, seed=BIG_SEED,
              offset=3, draw=2, next_draw=3, count=2, hess_approx="price",
              scalars=update_scalars(0.1), found_inf=one(0.0, device), round_draw=4,
              device_draws=torch.tensor([2, 3], dtype=torch.int64, device=device))
    # without noise ('gradsq', no next sample): Philox only for bf16 state's rounding bits
    for state in ((momentum, hess), (momentum16, hess16)):
        tb.update(param, grad, mean, *state, avg_grad, avg_term, seed=BIG_SEED, offset=3, draw=2,
                  count=2, hess_approx="gradsq", scalars=update_scalars(0.1), round_draw=4)


@marked(TRITON)
def test_triton_every_launch_turns_fp_contraction_off(monkeypatch):
    """Every op's launch passes enable_fp_fusion=False (docs/DESIGN.md section 7's tolerances
    assume torch's rounding of each multiply and add)."""
    launches = _record_launches(monkeypatch)
    _launch_every_op(TRITON_DEVICE)
    ops = ["_sample_kernel", "_accumulate_kernel", "_update_kernel"]
    assert [name for name, _, _ in launches] == (ops + ["_update_kernel"] + ops
                                                 + ["_update_kernel"] + ops
                                                 + ["_update_kernel"] * 2)
    for name, _, kwargs in launches:
        assert kwargs.get("enable_fp_fusion") is False, name
    assert [kwargs["ORIGIN"] for _, _, kwargs in launches].count(True) == 1  # the placed one


def compile_launches_for_sm90():
    """Compile every launch of the ops, with its exact arguments and options, for an sm_90 target
    (no GPU needed) and check the PTX: the options are ones the launcher accepts, and no multiply
    and add were contracted into an fma. Runs in a subprocess without the interpreter (see
    test_triton_gpu_code_has_no_contracted_fma)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    class _Patch:  # what monkeypatch.setattr needs, outside pytest
        def setattr(self, obj, name, value):
            setattr(obj, name, value)

    launches = _record_launches(_Patch(), run_kernels=False)
    for dtype in (torch.float32, torch.bfloat16):  # bf16 state once: compiles cost
        _launch_every_op("cpu", dtype, bf16_state=dtype == torch.bfloat16)
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    type_names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                  torch.int64: "i64"}

    def asm_of(kernel, values, options):
        signature, constexprs = {}, {}
        for index, param in enumerate(kernel.params):
            value = values[param.name]
            if param.is_constexpr:
                signature[param.name], constexprs[(index,)] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[param.name] = "*" + type_names[value.dtype]
            else:
                signature[param.name] = "i64" if isinstance(value, int) else "fp32"
        source = ASTSource(kernel, signature, constexprs)
        return triton.compile(source, target=target, options=options).asm

    def contracted(asm) -> int:
        """fma.rn.f32 in the PTX beyond the explicit ones: the noise's polynomials call
        llvm.fma in the LLVM IR (Note [the noise's own functions in Triton]), one lane each;
        contraction happens after it, in the NVPTX backend. A count: a contraction could hide
        only behind an explicit fma that LLVM folded away, which it does for an fma of
        constants alone, and every fma of the polynomials has a variable operand."""
        lanes = {"f32": 1, "v2f32": 2, "v4f32": 4}
        explicit = sum(lanes[t] for t in re.findall(r"call [^\n]*@llvm\.fma\.(\w+)\(",
                                                    asm["llir"]))
        return len(re.findall(r"\bfma\.rn\.f32\b", asm["ptx"])) - explicit

    checked_philox = set()
    for name, args, kwargs in launches:
        kernel = getattr(tb, name)
        values = dict(zip(kernel.arg_names, args))
        values.update({k: v for k, v in kwargs.items() if k in kernel.arg_names})
        options = {k: v for k, v in kwargs.items() if k not in kernel.arg_names}
        # the launcher raises for any keyword that is neither an argument nor a backend option
        assert set(options) <= set(backend.parse_options(options).__dict__), options
        asm = asm_of(kernel, values, options)
        assert contracted(asm) == 0, name
        ptx = asm["ptx"]
        if name == "_update_kernel" and not (values["PRICE"] or values["RESAMPLE"]):
            # no noise: Philox (its wide multiplies, Note [Philox's wide multiply] in
            # triton_backend) runs only for bf16 state's rounding bits; fp32 state compiles to
            # the kernel it was before bf16 state existed
            bf16_state = values["momentum_ptr"].dtype == torch.bfloat16
            assert bool(re.search(r"\bmul\.wide\.u32 t,", ptx)) == bf16_state, values
            checked_philox.add(bf16_state)
        if name == "_update_kernel":  # with contraction the update has more: the check can fail
            assert contracted(asm_of(kernel, values, dict(options, enable_fp_fusion=True))) > 0
    assert checked_philox == {False, True}


@pytest.mark.skipif(triton is None, reason="triton could not be imported")
@pytest.mark.triton
def test_triton_gpu_code_has_no_contracted_fma():
    """The launches as the GPU compiles them, checked on any machine (see
    compile_launches_for_sm90)."""
    from triton.backends import backends
    if "nvidia" not in backends:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["IVON_TRITON_BLOCK"] = str(tb.BLOCK)  # the GPU's tile (the CPU's compiles for minutes)
    module = os.path.splitext(os.path.basename(__file__))[0]
    result = subprocess.run(
        [sys.executable, "-c", f"import {module}; {module}.compile_launches_for_sm90()"],
        cwd=os.path.dirname(os.path.abspath(__file__)), env=env, capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


# =============================================================================================
# GPU only: streams and devices (Triton and the CUDA kernels), CUDA against the CPU kernels
# =============================================================================================
GPU_BACKENDS = backend_params(only=lambda b: b.name in ("triton", "cuda"))


def _update_kwargs():
    return dict(seed=BIG_SEED, draw=4, next_draw=5, offset=3, count=1, hess_approx="price",
                scalars=update_scalars(0.5))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_update_runs_on_the_current_stream(backend):
    """Work queued on a side stream before the update is visible to it: a launch on any other
    stream would overtake the copies below (the side stream sleeps first) and read zeros."""
    n = 1 << 20
    state, grad = make_state(n, "cuda"), make_grad(n, torch.float32, "cuda")
    expected_param = torch.empty(n, device="cuda")
    expected = clones(state)
    backend.module.update(expected_param, grad, *expected, **_update_kwargs())
    got_param = torch.zeros(n, device="cuda")
    got = [torch.zeros_like(t) for t in state]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        for destination, source in zip(got, state):
            destination.copy_(source)
        backend.module.update(got_param, grad, *got, **_update_kwargs())
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got_param, expected_param)
    for a, e in zip(got, expected):
        assert torch.equal(a, e)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_update_on_a_device_that_is_not_current(backend):
    """Tensors on cuda:1 while cuda:0 is current: the launch goes to the tensors' device and
    leaves the current device as it was."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    device = "cuda:1"
    state, grad = make_state(4097, device), make_grad(4097, torch.float32, device)
    got_param, expected_param = torch.empty(4097, device=device), torch.empty(4097, device=device)
    got, expected = clones(state), clones(state)
    with torch.cuda.device(0):
        backend.module.update(got_param, grad, *got, **_update_kwargs())
        assert torch.cuda.current_device() == 0
    reference.update(expected_param, grad, *expected, **_update_kwargs())
    assert_close(got_param, expected_param)
    for a, e in zip(got, expected):
        assert_close(a, e)


@pytest.mark.gpu
@marked(TRITON + CPP)
def test_triton_gpu_trajectory_matches_the_cpu_kernel():
    """Triton on the GPU against the C++ kernel on the CPU, bit for bit, after several steps
    (test_triton_is_the_cpu_kernel_bit_for_bit says why): two compilers, two devices, neither
    contracting, the noise's polynomials fused as written (one fma.rn.f32 each)."""
    from test_kernels import trajectory
    n, offset, steps = 30_001, 4099, 6
    for mc, hess_approx in [(1, "price"), (3, "price"), (2, "gradsq")]:
        got = trajectory(tb, "cuda", torch.float32, n, offset, mc, hess_approx, steps)
        expected = trajectory(cpp, "cpu", torch.float32, n, offset, mc, hess_approx, steps)
        for name, a, e in zip(("param", "mean", "momentum", "hess"), got, expected):
            assert torch.equal(a.cpu(), e), (mc, name, (a.cpu() - e).abs().max().item())


def _skip_without_cuda_kernels():
    reason = cpp.unavailable_reason("cuda")
    if reason is not None and os.environ.get("IVON_FAST_EXPECT_CUDA") != "1":
        pytest.skip(reason)


def _state(n, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(scale=1.0):
        return (torch.randn(n, generator=gen) * scale).to(device)

    return dict(param=torch.zeros(n, dtype=dtype, device=device), grad=rnd().to(dtype),
                mean=rnd(), momentum=rnd(0.1),
                hess=(torch.rand(n, generator=gen) * 0.5 + 0.05).to(device), avg_grad=rnd(),
                avg_hess_term=rnd(0.05))


def _clone(state):
    return {k: v.clone() for k, v in state.items()}


def _cpp_scalars(clip_radius, debias=1 - 0.9 ** 3):
    return StepScalars.of(lr=0.05, ess=30.0, weight_decay=1e-3, beta1=0.9, beta2=0.95,
                          clip_radius=clip_radius, debias=debias)


def _cpp_update(st, *, grad=True, count, hess_approx, next_draw=12, offset=4099, clip=0.02,
                debias=1 - 0.9 ** 3, **device_scalars):
    cpp.update(st["param"], st["grad"] if grad else None, st["mean"], st["momentum"],
               st["hess"], st["avg_grad"], st["avg_hess_term"], seed=5, draw=11,
               next_draw=next_draw, offset=offset, count=count, hess_approx=hess_approx,
               scalars=_cpp_scalars(clip, debias), **device_scalars)


@pytest.mark.gpu
@pytest.mark.cpp
def test_cuda_matches_cpu_kernels_bitwise():
    """The CUDA and CPU kernels run the same ivon_math.h code without FMA contraction: the same
    bits for every param dtype and segment alignment (update, then accumulate), with each
    prior, and with bf16 state (update, accumulate, sample)."""
    _skip_without_cuda_kernels()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for offset in (0, 3):
            results = {}
            for device in ("cpu", "cuda"):
                st = _state(100_003, dtype, device, seed=9)
                _cpp_update(st, count=3, hess_approx="price", next_draw=EVAL_DRAW, offset=offset)
                cpp.accumulate(st["grad"], st["hess"], st["avg_grad"], st["avg_hess_term"],
                               seed=1, draw=2, offset=offset, count=2, ess=3.0, weight_decay=0.1,
                               hess_approx="price")
                results[device] = {k: v.cpu() for k, v in st.items()}
            for key in ("mean", "momentum", "hess", "param", "avg_grad", "avg_hess_term"):
                assert torch.equal(results["cuda"][key], results["cpu"][key]), (dtype, offset, key)
    for dtype in (torch.float32, torch.bfloat16):
        for prior in ("mean", "precision", "both"):
            results = {}
            for device in ("cpu", "cuda"):
                state, priors = prior_state(100_003, dtype, device), prior_inputs(prior, 100_003,
                                                                                  device)
                upd = run_prior_op(cpp, "update", state, priors, count=3, next_draw=EVAL_DRAW,
                                   offset=3)
                precision = {k: v for k, v in priors.items() if k == "prior_precision"}
                acc = run_prior_op(cpp, "accumulate", state, precision, count=2, offset=3)
                smp = run_prior_op(cpp, "sample", state, precision, offset=3)
                results[device] = [upd[k].cpu() for k in PRIOR_OUTPUTS["update"]] + [
                    acc["avg_grad"].cpu(), acc["avg_hess_term"].cpu(), smp["param"].cpu()]
            for a, b in zip(results["cuda"], results["cpu"]):
                assert torch.equal(a, b), (dtype, prior)
        results = {}
        for device in ("cpu", "cuda"):
            state = bf16_state(prior_state(100_003, dtype, device))
            upd = run_prior_op(cpp, "update", state, {}, count=3, next_draw=EVAL_DRAW, offset=4,
                               round_draw=9)
            acc = run_prior_op(cpp, "accumulate", state, {}, count=2, offset=3)
            smp = run_prior_op(cpp, "sample", state, {}, offset=3)
            results[device] = [upd[k].cpu() for k in PRIOR_OUTPUTS["update"]] + [
                acc["avg_hess_term"].cpu(), smp["param"].cpu()]
        for a, b in zip(results["cuda"], results["cpu"]):
            assert torch.equal(a, b), (dtype, "bf16 state")


# =============================================================================================
# The C++ extension: CPU instruction-set builds, registration, torch.compile
# =============================================================================================
HIGH_OFFSETS = [(1 << 34) + 3, (1 << 34) - 4093, (1 << 62) + 1]


def _each_cpu_isa():
    """Each CPU kernel build this CPU can run, made the one in use while the loop body runs (the
    automatic choice is restored before the next and after the last, also after a failure)."""
    with contextlib.ExitStack() as restore:
        restore.callback(cpp.set_cpu_isa, "")
        for isa in ("avx512", "avx2", "generic"):
            try:
                cpp.set_cpu_isa(isa)
            except ValueError:
                continue
            yield isa


@pytest.fixture(params=[pytest.param(isa, marks=CPP) for isa in ("avx512", "avx2", "generic")])
def cpu_isa(request):
    """Runs the test with one CPU kernel build (skipped when this CPU cannot run it)."""
    try:
        cpp.set_cpu_isa(request.param)
    except ValueError:
        pytest.skip(f"this CPU cannot run the {request.param} build")
    yield request.param
    cpp.set_cpu_isa("")


def test_every_cpu_build_uses_the_whole_noise_counter(cpu_isa):
    """Noise (sample) and the fused update at global offsets beyond 2^34 elements (across the
    carry, beyond 2^62) equal the reference: each build's Philox gets the high 32 bits of
    i >> 2."""
    n = 4097
    for offset in HIGH_OFFSETS:
        param = torch.empty(n)
        cpp.sample(param, torch.zeros(n), torch.ones(n), seed=BIG_SEED, draw=EVAL_DRAW,
                   offset=offset, ess=1.0, weight_decay=0.0)
        torch.testing.assert_close(param, reference.philox_normal(BIG_SEED, EVAL_DRAW, offset,
                                                                  n), rtol=2e-6, atol=2e-6)
        got = _state(n, torch.float32, "cpu", seed=12)
        want = _clone(got)
        kw = dict(seed=BIG_SEED, draw=EVAL_DRAW, next_draw=9, offset=offset, count=3,
                  hess_approx="price", scalars=_cpp_scalars(float("inf")))
        for backend, st in ((cpp, got), (reference, want)):
            backend.update(st["param"], st["grad"], st["mean"], st["momentum"], st["hess"],
                           st["avg_grad"], st["avg_hess_term"], **kw)
        for key in ("mean", "momentum", "hess", "param"):
            assert_close(got[key], want[key], msg=f"{offset} {key}")


def test_every_cpu_build_rounds_to_nearest_even(cpu_isa, rounding_probe):
    """Each build's bf16 / fp16 stores of sample and update are torch's rounding of its fp32
    values (ties to even, subnormals, overflow, inf, NaN)."""
    for dtype in (torch.bfloat16, torch.float16):
        for op in ("sample", "update"):
            assert_low_precision_rounding(cpp, "cpu", dtype, op, rounding_probe)


@marked(CPP)
def test_cpu_isa_builds_agree_bitwise():
    """Every instruction-set build the CPU supports gives the same bits as the portable one:
    bf16 params, every device scalar, a skipped step with fp16 params, each prior input alone
    and both (Note [prior flags]), bf16 state with and without a skip, several threads, and the
    drop-in step with a debias of 1 (AVX-512 skips that division in its pipelined blocks: Note
    [debias of one]; on a CPU without AVX-512 that part compares the portable build with
    itself)."""
    results = {}
    for isa in _each_cpu_isa():
        out = {}
        st = _state(70_001, torch.bfloat16, "cpu", seed=6)
        _cpp_update(st, count=3, hess_approx="price", next_draw=EVAL_DRAW, offset=1)
        out.update({f"plain_{k}": v for k, v in st.items()})
        for count in (1, 3):
            unbiased = _state(70_001, torch.float32, "cpu", seed=7)
            _cpp_update(unbiased, count=count, hess_approx="price", offset=1, debias=1.0)
            out.update({f"debias_one_{count}_{k}": v for k, v in unbiased.items()})
        scaled = _state(70_001, torch.float32, "cpu", seed=6)
        _cpp_update(scaled, count=3, hess_approx="gradsq", offset=1, clip=float("inf"),
                    grad_scale=one(3.0, "cpu"), device_lr=one(0.1, "cpu"),
                    device_debias=one(0.3, "cpu"), found_inf=one(0.0, "cpu"))
        out.update({f"scaled_{k}": v for k, v in scaled.items()})
        skipped = _state(70_001, torch.float16, "cpu", seed=6)
        _cpp_update(skipped, grad=False, count=3, hess_approx="price", offset=1,
                    found_inf=one(1.0, "cpu"))
        out.update({f"skipped_{k}": v for k, v in skipped.items()})
        for prior, dtype in (("mean", torch.float16), ("precision", torch.float32),
                             ("both", torch.bfloat16)):
            state = prior_state(70_001, dtype, "cpu")
            inputs = prior_inputs(prior, 70_001, "cpu")
            upd = run_prior_op(cpp, "update", state, inputs, count=3, next_draw=EVAL_DRAW,
                               offset=1)
            out.update({f"{prior}_{k}": upd[k] for k in PRIOR_OUTPUTS["update"]})
            if prior != "mean":
                precision = dict(prior_precision=inputs["prior_precision"])
                acc = run_prior_op(cpp, "accumulate", state, precision, count=2, offset=1)
                smp = run_prior_op(cpp, "sample", state, precision, offset=1)
                out.update({f"{prior}_avg_hess_term": acc["avg_hess_term"],
                            f"{prior}_sample": smp["param"]})
        for hess_approx in ("price", "gradsq"):
            state = bf16_state(prior_state(70_001, torch.bfloat16, "cpu", hess_approx))
            upd = run_prior_op(cpp, "update", state, {}, count=3, next_draw=EVAL_DRAW, offset=1,
                               round_draw=5, hess_approx=hess_approx)
            skip = run_prior_op(cpp, "update", state, {}, next_draw=EVAL_DRAW, offset=1,
                                found_inf=one(1.0, "cpu"), hess_approx=hess_approx)
            out.update({f"bf16_{hess_approx}_{k}": upd[k] for k in PRIOR_OUTPUTS["update"]})
            out[f"bf16_{hess_approx}_skipped_param"] = skip["param"]
        results[isa] = out
    assert "generic" in results
    for isa, out in results.items():
        for key, value in out.items():
            assert torch.equal(value, results["generic"][key]), (isa, key)


@pytest.mark.cpp
def test_cuda_kernels_registered():
    """With IVON_FAST_EXPECT_CUDA=1 (CI) the build holds the CUDA kernels of every op."""
    if os.environ.get("IVON_FAST_EXPECT_CUDA") != "1":
        pytest.skip("set IVON_FAST_EXPECT_CUDA=1 when the build must contain the CUDA kernels")
    for op in ("sample", "accumulate", "update"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ivon_fast::{op}", "CUDA")
    assert cpp.unavailable_reason("cuda") is None


@marked(CPP)
def test_cpu_kernels_registered_with_schema():
    """The ops are registered for CPU with their schema: mutated tensors annotated, the
    host-combined scalars, and the optional device scalars, draws and priors as keywords."""
    for op in ("sample", "accumulate", "update"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ivon_fast::{op}", "CPU")
    schema = str(torch.ops.ivon_fast.update.default._schema)
    assert ("Tensor(a!) param" in schema and "Tensor(d!) hess" in schema
            and "int? next_draw" in schema)
    # the host-combined scalars come in formed (ivon_fast/scalars.py), not as beta2 alone
    assert "float one_minus_beta1" in schema and "float hess_coef" in schema
    # update's device scalars: optional keywords, so callers without them keep working
    for name in ("grad_scale", "found_inf", "device_lr", "device_debias"):
        assert f"Tensor? {name}=None" in schema, name
    # the per-element prior: optional keywords too; only update reads a prior mean
    assert "Tensor? prior_mean=None" in schema and "Tensor? prior_precision=None" in schema
    for op in ("sample", "accumulate"):
        op_schema = str(getattr(torch.ops.ivon_fast, op).default._schema)
        assert "Tensor? prior_precision=None" in op_schema and "prior_mean" not in op_schema


@marked(CPP)
def test_cpp_unavailable_reason():
    """CPU tensors are fine, meta tensors are refused with the reason."""
    assert cpp.unavailable_reason("cpu") is None
    assert "meta" in cpp.unavailable_reason("meta")


def _compiled_matches_eager(step, make_inputs, keys, calls=((),)):
    """``step`` traced by torch.compile (fullgraph, aot_eager: the fake kernels) gives eager's
    outputs and writes eager's bits, for each extra argument tuple in ``calls``."""
    torch._dynamo.reset()
    compiled_step = torch.compile(step, fullgraph=True, backend="aot_eager")
    for extra in calls:
        eager = make_inputs()
        compiled = _clone(eager)
        out_eager = step(eager, *extra)
        out_compiled = compiled_step(compiled, *extra)
        torch.testing.assert_close(out_compiled, out_eager, rtol=0, atol=0)
        for key in keys:
            assert torch.equal(compiled[key], eager[key]), (extra, key)


@marked(CPP)
def test_torch_compile_matches_eager():
    """update and sample traced by torch.compile with the fake kernels give eager's bits."""
    scalars = _cpp_scalars(0.02, debias=0.1)

    def step(st):
        cpp.update(st["param"], st["grad"], st["mean"], st["momentum"], st["hess"], None, None,
                   seed=BIG_SEED, draw=4, next_draw=5, offset=2, count=1,
                   hess_approx="price", scalars=scalars)
        cpp.sample(st["grad"].view(-1), st["mean"], st["hess"], seed=3, draw=EVAL_DRAW,
                   offset=2, ess=30.0, weight_decay=1e-3)
        return st["param"] * 2.0

    _compiled_matches_eager(step, lambda: _state(1003, torch.float32, "cpu", seed=8),
                            ("param", "grad", "mean", "momentum", "hess"))


@marked(CPP)
def test_torch_compile_with_device_scalars_matches_eager():
    """The fake kernel takes the device scalars; a traced step reads their values at run time
    (a taken and a skipped step through the same graph)."""
    def step(st, found):
        dev = dict(grad_scale=one(3.0, "cpu"), found_inf=found, device_lr=one(0.3, "cpu"),
                   device_debias=one(0.2, "cpu"))
        cpp.update(st["param"], st["grad"], st["mean"], st["momentum"], st["hess"], None, None,
                   seed=BIG_SEED, draw=4, next_draw=5, offset=2, count=1,
                   hess_approx="price", scalars=_cpp_scalars(0.02, debias=0.1), **dev)
        return st["param"] * 2.0

    _compiled_matches_eager(step, lambda: _state(1003, torch.float32, "cpu", seed=8),
                            ("param", "mean", "momentum", "hess"),
                            calls=[(one(0.0, "cpu"),), (one(1.0, "cpu"),)])


@marked(CPP)
def test_torch_compile_with_priors_matches_eager():
    """The fake kernels take the prior inputs; a traced step passes them to the kernels."""
    priors = prior_inputs("both", 1003, "cpu")

    def step(st):
        cpp.sample(st["param"], st["mean"], st["hess"], seed=3, draw=1, offset=2, ess=30.0,
                   weight_decay=1e-3, prior_precision=priors["prior_precision"])
        cpp.accumulate(st["grad"], st["hess"], st["avg_grad"], st["avg_hess_term"], seed=3,
                       draw=1, offset=2, count=1, ess=30.0, weight_decay=1e-3,
                       hess_approx="price", prior_precision=priors["prior_precision"])
        cpp.update(st["param"], st["grad"], st["mean"], st["momentum"], st["hess"],
                   st["avg_grad"], st["avg_hess_term"], seed=3, draw=2, next_draw=3, offset=2,
                   count=2, hess_approx="price", scalars=PRIOR_SCALARS, **priors)
        return st["param"] * 2.0

    _compiled_matches_eager(step, lambda: prior_state(1003, torch.float32, "cpu"),
                            ("param", "mean", "momentum", "hess", "avg_grad", "avg_hess_term"))
