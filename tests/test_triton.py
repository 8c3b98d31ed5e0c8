"""The Triton backend against ivon_fast.reference, element by element with the same noise.

On CPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before anything defines a kernel); the tests marked gpu repeat the comparisons on CUDA tensors.
Every expectation comes from the reference (plain torch) or from published Philox answers, never
from the code under test; the one exception, the rounding of bf16 / fp16 stores, checks the
kernel's low-precision output against torch's rounding of its own fp32 output.
"""
import os
import re
import subprocess
import sys

import pytest
import torch

from ivon_fast import reference
from ivon_fast import triton_backend as tb
from ivon_fast.scalars import StepScalars

from kernel_checks import (PRIOR_OUTPUTS, assert_low_precision_rounding,
                           check_prior_against_reference, check_priors_in_a_skipped_step,
                           check_priors_with_device_inputs,
                           neutral_prior_is_the_weight_decay, one, prior_inputs, prior_state,
                           run_prior_op)
from state_checks import (check_device_draws, check_float32_state_ignores_round_draw,
                          check_rejects_mixed_state_dtypes, check_rounding_is_unbiased,
                          check_sample_and_accumulate, check_update_against_reference)

triton = pytest.importorskip("triton")
tl = triton.language

pytestmark = pytest.mark.triton

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        tb.unavailable_reason("cpu") is not None, reason=str(tb.unavailable_reason("cpu")))),
    pytest.param("cuda", marks=pytest.mark.gpu),
]

# (rtol, atol) for values written in each dtype. State is always fp32. fp32 allows a few ulps of
# the transcendental functions in the noise; bf16 / fp16 outputs may round one ulp differently
# when the fp32 values they are rounded from differ by an ulp.
TOLERANCE = {
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (8e-3, 1e-5),
    torch.float16: (1e-3, 1e-5),
}

BIG_SEED = (1 << 64) - 12345          # above 2^63: the top bit must survive the launch
EVAL_DRAW = reference.EVAL_DRAW_BASE + 17
HYPER = dict(ess=40.0, weight_decay=1e-3)


def assert_close(actual, expected, dtype=torch.float32):
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=False)


def make_state(n, device, seed=0):
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


# ---------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------
@triton.jit
def _philox_probe(out_ptr, seed, draw, quad_base, QUADS: tl.constexpr):
    """Stores the four raw Philox outputs (as int64 holding uint32) of quads quad_base + q."""
    q = tl.arange(0, QUADS)
    x0, x1, x2, x3 = tb._philox(seed, draw, quad_base + q.to(tl.int64))
    tl.store(out_ptr + 4 * q + 0, x0.to(tl.int64) & 0xFFFFFFFF)
    tl.store(out_ptr + 4 * q + 1, x1.to(tl.int64) & 0xFFFFFFFF)
    tl.store(out_ptr + 4 * q + 2, x2.to(tl.int64) & 0xFFFFFFFF)
    tl.store(out_ptr + 4 * q + 3, x3.to(tl.int64) & 0xFFFFFFFF)


def _probe(seed, draw, quad, quads, device):
    out = torch.zeros(4 * quads, dtype=torch.int64, device=device)
    _philox_probe[(1,)](out, tb._u64_bits(seed, "seed"), tb._u64_bits(draw, "draw"),
                        tb._u64_bits(quad, "quad"), QUADS=quads)
    return out.view(quads, 4).cpu()


@pytest.mark.parametrize("device", DEVICES)
def test_philox_known_answers(device):
    """Random123's published answers (docs/DESIGN.md section 3): counter (c0 c1 c2 c3), key (k0 k1)."""
    cases = [  # (quad = c1:c0, draw = c3:c2, seed = k1:k0) -> outputs
        (0, 0, 0, [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ((1 << 64) - 1, (1 << 64) - 1, (1 << 64) - 1,
         [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        (0x85A308D3243F6A88, 0x0370734413198A2E, 0x299F31D0A4093822,
         [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
    ]
    for quad, draw, seed, expected in cases:
        assert _probe(seed, draw, quad, 1, device)[0].tolist() == expected


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed,draw,quad", [
    (0, 0, 0), (12345, 7, (1 << 32) - 3), (BIG_SEED, EVAL_DRAW, (1 << 40) + 5),
    ((1 << 64) - 1, (1 << 64) - 1, (1 << 62) + 1), (1 << 63, 1 << 32, 1)])
def test_philox_integers_match_reference(device, seed, draw, quad):
    quads = 64  # crosses a 2^32 boundary of the quad counter for the second case
    got = _probe(seed, draw, quad, quads, device)
    q = torch.arange(quad, quad + quads, dtype=torch.int64)
    expected = reference.philox4x32_10(q & 0xFFFFFFFF, q >> 32, draw & 0xFFFFFFFF, draw >> 32,
                                       seed & 0xFFFFFFFF, seed >> 32)
    assert torch.equal(got, torch.stack(expected, dim=1))


@pytest.mark.parametrize("device", DEVICES)
# offsets from 2^34 put the high word of the quad counter (i >> 2) to work, also across its carry
@pytest.mark.parametrize("n,offset", [(1, 0), (3, 1), (5, 3), (6, 5), (4097, 2), (4097, 4099),
                                      (300_003, 1 << 33), (4097, (1 << 34) + 3),
                                      (4097, (1 << 34) - 4093)])
# 1 is in here because triton folds integer arguments equal to 1 into the compiled kernel
@pytest.mark.parametrize("seed,draw", [(0, 0), (1, 1), (BIG_SEED, EVAL_DRAW)])
def test_noise_matches_reference(device, n, offset, seed, draw):
    # mean 0, ess 1, hess 1, wd 0: sigma = 1 and the sample is the noise itself
    param = torch.full((n,), float("nan"), device=device)
    mean = torch.zeros(n, device=device)
    hess = torch.ones(n, device=device)
    tb.sample(param, mean, hess, seed=seed, draw=draw, offset=offset, ess=1.0, weight_decay=0.0)
    expected = reference.philox_normal(seed, draw, offset, n, device)
    assert_close(param, expected)
    if n > 1000:  # a standard normal, and other draws give other noise
        assert abs(param.mean().item()) < 0.1 and abs(param.std().item() - 1) < 0.1
        other = torch.empty_like(param)
        tb.sample(other, mean, hess, seed=seed, draw=draw + 1, offset=offset, ess=1.0,
                  weight_decay=0.0)
        assert (other - param).abs().mean() > 0.5


# ---------------------------------------------------------------------------------------------
# The ops, one at a time
# ---------------------------------------------------------------------------------------------
SEGMENTS = [(1, 0), (3, 2), (5, 1), (5, 3), (4097, 0), (4097, 3), (4097, 4099), (200_001, 1)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=[None, 64], ids=["block_default", "block_64"])
def block(request, monkeypatch):
    """Also run with tiny blocks, so that many programs (and tile edges) are exercised under the
    interpreter (on GPU the default block already makes many programs; compiles are the cost)."""
    if request.param is not None and request.getfixturevalue("device") == "cuda":
        pytest.skip("the default block covers many programs on GPU")
    if request.param is not None:
        monkeypatch.setenv("IVON_TRITON_BLOCK", str(request.param))
    return request.param


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,offset", SEGMENTS)
def test_sample(device, dtype, n, offset, block):
    if block is not None and n > 10_000:
        pytest.skip("tiny blocks on big segments are slow under the interpreter")
    mean, _, hess, _, _ = make_state(n, device)
    got = torch.zeros(n, dtype=dtype, device=device)
    expected = torch.zeros(n, dtype=dtype, device=device)
    kw = dict(seed=BIG_SEED, draw=EVAL_DRAW, offset=offset, **HYPER)
    tb.sample(got, mean, hess, **kw)
    reference.sample(expected, mean, hess, **kw)
    assert_close(got.float(), expected.float(), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,offset", SEGMENTS)
def test_accumulate(device, hess_approx, count, dtype, n, offset):
    _, _, hess, avg_grad, avg_term = make_state(n, device)
    grad = make_grad(n, dtype, device)
    got, expected = clones([avg_grad, avg_term]), clones([avg_grad, avg_term])
    kw = dict(seed=12345, draw=4, offset=offset, count=count, hess_approx=hess_approx, **HYPER)
    tb.accumulate(grad, hess, *got, **kw)
    reference.accumulate(grad, hess, *expected, **kw)
    for a, e in zip(got, expected):
        assert_close(a, e)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
def test_accumulate_of_the_first_sample_never_reads_the_averages(device, hess_approx):
    """count == 1 starts the running means afresh, whatever the averages held before (NaN here):
    the optimizer does not clear them between steps."""
    _, _, hess, avg_grad, avg_term = make_state(4097, device)
    grad = make_grad(4097, torch.float32, device)
    got = [torch.full_like(avg_grad, float("nan")), torch.full_like(avg_term, float("nan"))]
    expected = clones([avg_grad, avg_term])
    kw = dict(seed=12345, draw=4, offset=1, count=1, hess_approx=hess_approx, **HYPER)
    tb.accumulate(grad, hess, *got, **kw)
    reference.accumulate(grad, hess, *expected, **kw)
    for a, e in zip(got, expected):
        assert_close(a, e)


UPDATE_LR = 0.05


def update_scalars(clip_radius):
    return StepScalars.of(lr=UPDATE_LR, beta1=0.9, beta2=0.99, clip_radius=clip_radius,
                          debias=1 - 0.9 ** 3, **HYPER)


def _run_update(device, dtype, n, offset, *, with_grad, count, hess_approx, clip_radius,
                next_draw, avgs_none=False):
    state = make_state(n, device)
    grad = make_grad(n, dtype, device) if with_grad else None
    got_state, expected_state = clones(state), clones(state)
    if avgs_none:
        got_state[3] = got_state[4] = None
    got = torch.zeros(n, dtype=dtype, device=device)
    expected = torch.zeros(n, dtype=dtype, device=device)
    kw = dict(seed=BIG_SEED, draw=6, next_draw=next_draw, offset=offset, count=count,
              hess_approx=hess_approx, scalars=update_scalars(clip_radius))
    tb.update(got, grad, *got_state, **kw)
    reference.update(expected, grad, *expected_state, **kw)
    assert_close(got.float(), expected.float(), dtype)
    for a, e in zip(got_state, expected_state):
        if a is not None:  # mean, momentum, hess updated; averages left as they were
            assert_close(a, e)
    return got_state, expected_state


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("next_draw", [None, 7, EVAL_DRAW])
@pytest.mark.parametrize("clip_radius", [1e-3, float("inf")])
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
@pytest.mark.parametrize("with_grad,count", [(True, 1), (True, 3), (False, 1), (False, 3)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_update_flags(device, dtype, with_grad, count, hess_approx, clip_radius, next_draw):
    got, expected = _run_update(device, dtype, 4097, 4099, with_grad=with_grad, count=count,
                                hess_approx=hess_approx, clip_radius=clip_radius,
                                next_draw=next_draw)
    if clip_radius != float("inf"):  # the clip must actually bind somewhere
        step = (expected[0] - make_state(4097, device)[0]).abs()
        bound = UPDATE_LR * clip_radius
        assert ((step - bound).abs() < 1e-3 * bound).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,offset", SEGMENTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_segments(device, n, offset, dtype, block):
    if block is not None and n > 10_000:
        pytest.skip("tiny blocks on big segments are slow under the interpreter")
    _run_update(device, dtype, n, offset, with_grad=True, count=3, hess_approx="price",
                clip_radius=0.1, next_draw=9)


@pytest.mark.parametrize("device", DEVICES)
def test_update_count_one_needs_no_averages(device):
    _run_update(device, torch.float32, 4097, 1, with_grad=True, count=1, hess_approx="price",
                clip_radius=float("inf"), next_draw=3, avgs_none=True)


# ---------------------------------------------------------------------------------------------
# update's device scalars: grad_scale, found_inf, device_lr, device_debias (ivon_fast.reference)
# ---------------------------------------------------------------------------------------------
GRAD_MODES = [(True, 1), (True, 3), (False, 3)]  # (grad given, count): the three modes


def bits(tensor):
    """The tensor's bits as integers: equal bits compare equal, NaNs included."""
    return tensor.view({4: torch.int32, 2: torch.int16}[tensor.element_size()])


def scaled_inputs(n, dtype, device, scale, hess_approx):
    """The unscaled (grad, state), and (grad, state) as a GradScaler leaves them: grad and
    avg_grad times ``scale``, the hess-term average times scale ('price': noise * grad) or
    scale^2 ('gradsq': grad^2)."""
    mean, momentum, hess, avg_grad, avg_term = make_state(n, device, seed=5)
    if hess_approx == "gradsq":
        avg_term = avg_term.abs()
    grad = make_grad(n, dtype, device, seed=6)
    plain = (grad, [mean, momentum, hess, avg_grad, avg_term])
    term_scale = scale ** 2 if hess_approx == "gradsq" else scale
    scaled = ((grad.float() * scale).to(dtype),
              [mean, momentum, hess, avg_grad * scale, avg_term * term_scale])
    return plain, scaled


def run_update(backend, param, grad, state, *, count, hess_approx, next_draw=9, offset=4099,
               scalars=None, **device_scalars):
    """``backend.update`` on copies; returns (param, [mean, momentum, hess, avg_grad, avg_term])."""
    param, state = param.clone(), clones(state)
    backend.update(param, grad, *state, seed=BIG_SEED, draw=6, next_draw=next_draw,
                   offset=offset, count=count, hess_approx=hess_approx,
                   scalars=update_scalars(0.1) if scalars is None else scalars, **device_scalars)
    return param, state


def assert_update_close(got, expected, dtype):
    assert_close(got[0].float(), expected[0].float(), dtype)
    for a, e in zip(got[1][:3], expected[1][:3]):
        assert_close(a, e)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [1024.0, 3.0])
@pytest.mark.parametrize("grad_mode", GRAD_MODES)
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_update_grad_scale(device, dtype, hess_approx, grad_mode, scale):
    """The grad and the averages divided by grad_scale ('gradsq''s average twice), as the
    reference. fp32: the same bits as the update without grad_scale of the inputs divided by
    torch first (true divisions, not a reciprocal multiply; for a power of two, the unscaled
    inputs)."""
    with_grad, count = grad_mode
    n = 4097
    _, (grad, state) = scaled_inputs(n, dtype, device, scale, hess_approx)
    grad = grad if with_grad else None
    param = torch.zeros(n, dtype=dtype, device=device)
    kw = dict(count=count, hess_approx=hess_approx)
    got = run_update(tb, param, grad, state, grad_scale=one(scale, device), **kw)
    expected = run_update(reference, param, grad, state, grad_scale=one(scale, device), **kw)
    assert_update_close(got, expected, dtype)
    if dtype == torch.float32:
        mean, momentum, hess, avg_grad, avg_term = state
        avg_term = avg_term / scale
        if hess_approx == "gradsq":
            avg_term = avg_term / scale
        divided = run_update(tb, param, None if grad is None else grad / scale,
                             [mean, momentum, hess, avg_grad / scale, avg_term], **kw)
        assert torch.equal(got[0], divided[0])
        for a, e in zip(got[1][:3], divided[1][:3]):  # mean, momentum, hess
            assert torch.equal(a, e)
    ignored = run_update(tb, param, grad, state, **kw)  # the scale must matter
    assert not torch.allclose(ignored[1][2], got[1][2], rtol=1e-3, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("found", [1.0, float("nan"), float("-inf")])
@pytest.mark.parametrize("next_draw", [None, 7])
@pytest.mark.parametrize("grad_mode", GRAD_MODES)
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# the interpreter's numpy warns about the skipped step's inf and NaN arithmetic
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                            "ignore:overflow encountered:RuntimeWarning")
def test_update_found_inf_skips_the_step(device, dtype, hess_approx, grad_mode, next_draw,
                                         found):
    """A nonzero (or NaN) found_inf: mean, momentum, hess (and the averages) keep their bits, the
    param gets the old mean or the sample op's sample of next_draw around the old state; the
    non-finite grads never reach the state."""
    with_grad, count = grad_mode
    n = 4097
    state = make_state(n, device, seed=7)
    state[3][1::5] = float("nan")
    grad = make_grad(n, dtype, device) if with_grad else None
    if grad is not None:
        grad[::7] = float("inf")
    param = torch.zeros(n, dtype=dtype, device=device)
    kw = dict(count=count, hess_approx=hess_approx, next_draw=next_draw,
              found_inf=one(found, device), grad_scale=one(3.0, device))
    got = run_update(tb, param, grad, state, **kw)
    expected = run_update(reference, param, grad, state, **kw)
    for a, before in zip(got[1], state):
        assert torch.equal(bits(a), bits(before))
    if next_draw is None:
        assert torch.equal(got[0], state[0].to(dtype))
    else:
        sampled = torch.empty_like(param)
        tb.sample(sampled, state[0], state[2], seed=BIG_SEED, draw=next_draw, offset=4099,
                  **HYPER)
        assert torch.equal(got[0], sampled)
    assert_close(got[0].float(), expected[0].float(), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_mode", GRAD_MODES)
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
def test_update_found_inf_zero_takes_the_step(device, hess_approx, grad_mode):
    with_grad, count = grad_mode
    n = 4097
    state = make_state(n, device, seed=8)
    grad = make_grad(n, torch.float32, device) if with_grad else None
    param = torch.zeros(n, device=device)
    kw = dict(count=count, hess_approx=hess_approx)
    got = run_update(tb, param, grad, state, found_inf=one(0.0, device), **kw)
    plain = run_update(tb, param, grad, state, **kw)
    expected = run_update(reference, param, grad, state, found_inf=one(0.0, device), **kw)
    assert torch.equal(got[0], plain[0])
    for a, e in zip(got[1], plain[1]):
        assert torch.equal(a, e)
    assert_update_close(got, expected, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
def test_update_device_lr_and_debias(device, dtype, hess_approx):
    """device_lr / device_debias holding the scalars' values give the scalars' bits; other values
    give what scalars with those values give."""
    n = 4097
    state = make_state(n, device, seed=9)
    grad = make_grad(n, dtype, device)
    param = torch.zeros(n, dtype=dtype, device=device)
    kw = dict(count=3, hess_approx=hess_approx)

    def scalars(lr, debias):
        return StepScalars.of(lr=lr, beta1=0.9, beta2=0.99, clip_radius=float("inf"),
                              debias=debias, **HYPER)

    base = scalars(0.05, 0.271)
    runs = {
        "scalars": run_update(tb, param, grad, state, scalars=base, **kw),
        "device": run_update(tb, param, grad, state, scalars=base, device_lr=one(0.05, device),
                             device_debias=one(0.271, device), **kw),
        "other_scalars": run_update(tb, param, grad, state, scalars=scalars(0.2, 0.5), **kw),
        "other_device": run_update(tb, param, grad, state, scalars=base,
                                   device_lr=one(0.2, device), device_debias=one(0.5, device),
                                   **kw),
        "lr_scalars": run_update(tb, param, grad, state, scalars=scalars(0.2, 0.271), **kw),
        "lr_device": run_update(tb, param, grad, state, scalars=base,
                                device_lr=one(0.2, device), **kw),
        "debias_scalars": run_update(tb, param, grad, state, scalars=scalars(0.05, 0.5), **kw),
        "debias_device": run_update(tb, param, grad, state, scalars=base,
                                    device_debias=one(0.5, device), **kw),
    }
    for a, b in [("device", "scalars"), ("other_device", "other_scalars"),
                 ("lr_device", "lr_scalars"), ("debias_device", "debias_scalars")]:
        assert torch.equal(runs[a][0], runs[b][0]), a
        for x, y in zip(runs[a][1], runs[b][1]):
            assert torch.equal(x, y), a
    assert not torch.equal(runs["other_device"][1][0], runs["scalars"][1][0])
    expected = run_update(reference, param, grad, state, scalars=base,
                          device_lr=one(0.2, device), device_debias=one(0.5, device), **kw)
    assert_update_close(runs["other_device"], expected, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,offset", SEGMENTS)
@pytest.mark.parametrize("found", [0.0, 1.0])
def test_update_device_scalars_segments(device, n, offset, found, block):
    """All four together on every segment shape (partial tiles at both ends, many programs)."""
    if block is not None and n > 10_000:
        pytest.skip("tiny blocks on big segments are slow under the interpreter")
    state = make_state(n, device, seed=10)
    grad = make_grad(n, torch.bfloat16, device)
    param = torch.zeros(n, dtype=torch.bfloat16, device=device)
    kw = dict(count=3, hess_approx="price", offset=offset, next_draw=EVAL_DRAW,
              grad_scale=one(3.0, device), found_inf=one(found, device),
              device_lr=one(0.1, device), device_debias=one(0.4, device))
    got = run_update(tb, param, grad, state, **kw)
    expected = run_update(reference, param, grad, state, **kw)
    assert_update_close(got, expected, torch.bfloat16)
    if found:
        for a, before in zip(got[1], state):
            assert torch.equal(a, before)


@pytest.mark.parametrize("name", ["grad_scale", "found_inf", "device_lr", "device_debias"])
def test_update_device_scalars_validation(name):
    n = 8
    state = make_state(n, "cpu")
    grad, param = make_grad(n, torch.float32, "cpu"), torch.zeros(n)
    kw = dict(count=1, hess_approx="price")
    with pytest.raises(TypeError, match=f"{name} must be float32, got torch.float64"):
        run_update(tb, param, grad, state, **{name: torch.ones(1, dtype=torch.float64)}, **kw)
    with pytest.raises(ValueError, match=f"{name} must be a tensor of 1 element, got 2"):
        run_update(tb, param, grad, state, **{name: torch.ones(2)}, **kw)
    with pytest.raises(ValueError, match=f"{name} must be on the params' device cpu, got meta"):
        run_update(tb, param, grad, state, **{name: torch.ones(1, device="meta")}, **kw)
    with pytest.raises(TypeError, match=f"{name} must be a tensor or None"):
        run_update(tb, param, grad, state, **{name: 0.5}, **kw)


@pytest.mark.gpu
def test_update_rejects_cpu_device_scalars_for_cuda_params():
    state = make_state(8, "cuda")
    with pytest.raises(ValueError, match="found_inf must be on the params' device cuda"):
        run_update(tb, torch.zeros(8, device="cuda"), make_grad(8, torch.float32, "cuda"),
                   state, count=1, hess_approx="price", found_inf=torch.ones(1))


# ---------------------------------------------------------------------------------------------
# The per-element prior: prior_mean, prior_precision (ivon_fast.reference's module docstring)
# ---------------------------------------------------------------------------------------------
PRIOR_SEGMENTS = [(1, 0), (3, 2), (5, 1), (5, 3), (4097, 3), (4097, 4099), (70_001, 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,offset", PRIOR_SEGMENTS)
def test_sample_with_prior_precision(device, dtype, n, offset, block):
    if block is not None and n > 10_000:
        pytest.skip("tiny blocks on big segments are slow under the interpreter")
    check_prior_against_reference(tb, "sample", device, dtype, "precision", assert_close, n=n,
                                  offset=offset)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,offset", [(5, 3), (4097, 4099)])
def test_accumulate_with_prior_precision(device, hess_approx, count, dtype, n, offset):
    """'price''s noise uses the prior precision; 'gradsq' has no noise, so it cannot matter."""
    check_prior_against_reference(tb, "accumulate", device, dtype, "precision", assert_close,
                                  n=n, offset=offset, hess_approx=hess_approx, count=count,
                                  prior_matters=hess_approx == "price")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("next_draw", [None, 7])
@pytest.mark.parametrize("grad,count", GRAD_MODES)
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prior", ["mean", "precision", "both"])
def test_update_with_priors(device, prior, dtype, hess_approx, grad, count, next_draw):
    """Every flag combination with a prior against the reference. Where the reference draws no
    noise (no 'price' grad, no next sample) the interpreter's fp32 arithmetic is the
    reference's, op for op: the same bits."""
    kw = dict(hess_approx=hess_approx, grad=grad, count=count, next_draw=next_draw)
    got = check_prior_against_reference(tb, "update", device, dtype, prior, assert_close, **kw)
    if device == "cpu" and next_draw is None and not (hess_approx == "price" and grad):
        state = prior_state(4097, dtype, device, hess_approx)
        want = run_prior_op(reference, "update", state, prior_inputs(prior, 4097, device), **kw)
        for key in PRIOR_OUTPUTS["update"]:
            assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,offset", PRIOR_SEGMENTS)
@pytest.mark.parametrize("found", [0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# the interpreter's numpy warns about the skipped step's inf and NaN arithmetic
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_priors_with_device_scalars_and_draws(device, dtype, found, n, offset, block):
    """Both priors with every device scalar and the device draws, on every segment shape; a
    skipped step keeps the state and still samples with the prior precision. Sample and
    accumulate with the prior precision and the device draw."""
    if block is not None and n > 10_000:
        pytest.skip("tiny blocks on big segments are slow under the interpreter")
    check_priors_with_device_inputs(tb, device, dtype, n, offset, found, assert_close,
                                    eval_draw=EVAL_DRAW)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prior", ["mean", "precision", "both"])
@pytest.mark.parametrize("next_draw", [None, 7])
@pytest.mark.parametrize("grad,count", GRAD_MODES)
def test_priors_in_a_skipped_step(device, prior, next_draw, grad, count):
    check_priors_in_a_skipped_step(tb, device, prior, next_draw, grad, count)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
@pytest.mark.parametrize("grad,count", GRAD_MODES)
def test_a_neutral_prior_is_the_weight_decay_bit_for_bit(device, hess_approx, grad, count):
    """Precision weight_decay and mean 0 in every element: the variants with the prior inputs
    compute the bits of the variants without them (sample, accumulate, update)."""
    kw = dict(hess_approx=hess_approx, count=count)
    neutral_prior_is_the_weight_decay(tb, "update", device, torch.float32, grad=grad,
                                      next_draw=7, **kw)
    neutral_prior_is_the_weight_decay(tb, "accumulate", device, torch.bfloat16, **kw)
    neutral_prior_is_the_weight_decay(tb, "sample", device, torch.float16)


def test_prior_inputs_validation():
    st = prior_state(8, torch.float32, "cpu")
    for op, names in (("sample", ["prior_precision"]), ("accumulate", ["prior_precision"]),
                      ("update", ["prior_mean", "prior_precision"])):
        for name in names:
            with pytest.raises(ValueError, match=f"{name} has 7 elements but the segment has 8"):
                run_prior_op(tb, op, st, {name: torch.zeros(7)}, offset=0)
            with pytest.raises(TypeError, match=f"{name} must be float32 .the state dtype., "
                                                "got torch.float64"):
                run_prior_op(tb, op, st, {name: torch.zeros(8, dtype=torch.float64)}, offset=0)
            with pytest.raises(ValueError, match=f"{name} must be contiguous"):
                run_prior_op(tb, op, st, {name: torch.zeros(16)[::2]}, offset=0)
            with pytest.raises(ValueError, match=f"{name} must be on the params' device cpu, "
                                                 "got meta"):
                run_prior_op(tb, op, st, {name: torch.zeros(8, device="meta")}, offset=0)
            with pytest.raises(TypeError, match=f"{name} must be a tensor or None"):
                run_prior_op(tb, op, st, {name: 0.5}, offset=0)


# ---------------------------------------------------------------------------------------------
# bf16 momentum / hess (docs/DESIGN.md section 16; the checks are in state_checks.py)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("next_draw", [None, 7])
@pytest.mark.parametrize("grad,count", GRAD_MODES)
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_with_bf16_state(device, dtype, hess_approx, grad, count, next_draw):
    """Stored by stochastic rounding with the reference's bits (the same round_draw); the mean
    from the unrounded values, the next sample around the stored hess."""
    check_update_against_reference(tb, device, dtype, assert_close, hess_approx=hess_approx,
                                   grad=grad, count=count, next_draw=next_draw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,offset", [(1, 0), (3, 2), (5, 1), (5, 3), (4097, 3)])
def test_update_with_bf16_state_segments(device, n, offset, block):
    """Partial tiles at both ends, many programs: the rounding bits of each element's quad."""
    check_update_against_reference(tb, device, torch.bfloat16, assert_close, n=n,
                                   offset=offset, count=3, next_draw=EVAL_DRAW)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prior", ["mean", "precision", "both"])
@pytest.mark.parametrize("next_draw", [None, 7])
def test_update_with_bf16_state_and_priors(device, prior, next_draw):
    check_update_against_reference(tb, device, torch.float32, assert_close, prior=prior,
                                   count=3, next_draw=next_draw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hess_approx,prior_precision", [("price", False), ("price", True),
                                                         ("gradsq", False)])
def test_sample_and_accumulate_with_bf16_hess(device, dtype, hess_approx, prior_precision):
    check_sample_and_accumulate(tb, device, dtype, assert_close, hess_approx=hess_approx,
                                prior_precision=prior_precision)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("found", [0.0, 1.0])
@pytest.mark.parametrize("next_draw", [None, 7])
@pytest.mark.parametrize("round_draw", [21, EVAL_DRAW])
# the interpreter's numpy warns about the skipped step's inf and NaN arithmetic
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_bf16_state_rounds_with_the_device_draw(device, found, next_draw, round_draw):
    """device_draws[1] is the rounding index (with or without a next sample; EVAL_DRAW: the sum
    with 2^62 wraps as the reference's int64 sum does); the host's is ignored."""
    check_device_draws(tb, device, torch.bfloat16, assert_close, found=found,
                       next_draw=next_draw, round_draw=round_draw)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_state_rounding_is_unbiased(device):
    check_rounding_is_unbiased(tb, device)


@triton.jit
def _stochastic_rounding_probe(out_ptr, value_ptr, random16_ptr, N: tl.constexpr):
    """out <- the kernels' stochastic rounding of value with random16 (uint32 < 2^16)."""
    k = tl.arange(0, N)
    rounded = tb._bf16_round_stochastic(tl.load(value_ptr + k), tl.load(random16_ptr + k))
    tl.store(out_ptr + k, rounded)


@pytest.mark.parametrize("device", DEVICES)
# the interpreter's numpy warns about the probe's NaN comparisons
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_stochastic_rounding_bits(device, rounding_probe):
    """The kernels' rounding is reference.stochastic_round_bf16 bit for bit: halfway cases,
    overflow edges, infs, NaNs (also signalling ones, whose kept bits alone would read as inf),
    with the random bits at their extremes and in between."""
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


@pytest.mark.parametrize("device", DEVICES)
def test_float32_state_ignores_round_draw(device):
    check_float32_state_ignores_round_draw(tb, device, torch.bfloat16)


def test_state_dtype_validation():
    check_rejects_mixed_state_dtypes(tb, "cpu")
    st = prior_state(8, torch.float32, "cpu")
    with pytest.raises(TypeError, match="momentum and hess must have the same dtype, got "
                                        "torch.bfloat16 and torch.float32"):
        run_prior_op(tb, "update", {**st, "momentum": st["momentum"].to(torch.bfloat16)}, {},
                     offset=0)
    with pytest.raises(TypeError, match="momentum and hess in float32 or bfloat16 "
                                        ".state_dtype., got torch.float16"):
        run_prior_op(tb, "sample", {**st, "hess": st["hess"].half()}, {}, offset=0)
    with pytest.raises(TypeError, match="mean and the averages in float32, got torch.bfloat16"):
        run_prior_op(tb, "update", {**st, "avg_grad": st["avg_grad"].to(torch.bfloat16)}, {},
                     offset=0, count=2)
    with pytest.raises(ValueError, match="round_draw must be in"):
        run_prior_op(tb, "update", st, {}, offset=0, round_draw=-1)


# ---------------------------------------------------------------------------------------------
# Rounding of bf16 / fp16 params
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", ["sample", "update"])
# the interpreter's numpy warns about the probe's deliberate fp16 overflows and inf * 0
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
def test_low_precision_stores_round_to_nearest_even(device, dtype, op, rounding_probe):
    """A bf16 / fp16 param receives exactly torch's rounding (to nearest, ties to even) of the
    fp32 value the same kernel writes into an fp32 param. The comparison with the reference
    cannot show this: there a one-ulp tolerance must absorb fp32 ulps of the noise."""
    assert_low_precision_rounding(tb, device, dtype, op, rounding_probe.to(device))


# ---------------------------------------------------------------------------------------------
# A trajectory: the ops chained over several steps as the optimizer chains them
# ---------------------------------------------------------------------------------------------
def _loss_grad(theta, target):
    """The gradient of a quadratic with a sine term, so each step depends on the sample."""
    x = theta.float()
    return (x - target + 0.3 * torch.sin(3 * x)).to(theta.dtype)


def _trajectory(ops, device, dtype, n, offset, mc, hess_approx, steps):
    gen = torch.Generator().manual_seed(3)
    target = torch.randn(n, generator=gen).to(device)
    mean = (0.1 * torch.randn(n, generator=gen)).to(device)
    hess = torch.full((n,), 0.2, device=device)
    momentum = torch.zeros(n, device=device)
    avg_grad, avg_term = torch.zeros(n, device=device), torch.zeros(n, device=device)
    param = torch.zeros(n, dtype=dtype, device=device)
    hyper = dict(ess=50.0, weight_decay=1e-4)
    common = dict(seed=BIG_SEED, offset=offset, **hyper)
    clip_radius = 1e-3 if hess_approx == "price" else float("inf")
    draw = 0
    ops.sample(param, mean, hess, draw=draw, **common)
    for step in range(1, steps + 1):
        for s in range(1, mc):  # all but the last sample go through accumulate
            ops.accumulate(_loss_grad(param, target), hess, avg_grad, avg_term, draw=draw,
                           count=s, hess_approx=hess_approx, **common)
            draw += 1
            ops.sample(param, mean, hess, draw=draw, **common)
        last = step == steps
        scalars = StepScalars.for_group(
            dict(lr=0.1, hess_init=0.2, beta1=0.9, beta2=0.99999, clip_radius=clip_radius,
                 **hyper), step, rescale_lr=True, debias=True)
        ops.update(param, _loss_grad(param, target), mean, momentum, hess, avg_grad, avg_term,
                   draw=draw, next_draw=None if last else draw + 1, count=mc,
                   hess_approx=hess_approx, scalars=scalars, seed=BIG_SEED, offset=offset)
        draw += 1
    return param, mean, momentum, hess


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mc,hess_approx", [(1, "price"), (3, "price"), (2, "gradsq")])
def test_trajectory(device, dtype, mc, hess_approx):
    """The fp32 master state (mean, momentum, hess) follows the reference to the docs/DESIGN.md
    section 7 bound for every param dtype: both round the low-precision samples to nearest even
    from nearly the same fp32 values, so the grads they feed back agree too. The params are
    compared to one rounding step of their dtype."""
    n, offset, steps = 3001, 4099, 6
    got = _trajectory(tb, device, dtype, n, offset, mc, hess_approx, steps)
    expected = _trajectory(reference, device, dtype, n, offset, mc, hess_approx, steps)
    initial = _trajectory(reference, device, dtype, n, offset, mc, hess_approx, 0)
    for name, a, e, start in zip(("param", "mean", "momentum", "hess"), got, expected, initial):
        rtol, atol = TOLERANCE[dtype if name == "param" else torch.float32]
        torch.testing.assert_close(a.float(), e.float(), rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"{name}: {m}")
        # the bound must be far below what the steps changed (for most elements), or a stuck
        # state would pass
        moved = (e.float() - start.float()).abs()
        bound = atol + rtol * e.float().abs()
        assert (moved > 10 * bound).float().mean() > 0.5, name


# ---------------------------------------------------------------------------------------------
# Availability, knobs, kernel signatures
# ---------------------------------------------------------------------------------------------
def test_unavailable_reason(monkeypatch):
    assert tb.unavailable_reason(torch.device("cuda")) is None
    assert isinstance(tb.unavailable_reason(torch.device("meta")), str)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in tb.unavailable_reason(torch.device("cpu"))


@pytest.mark.parametrize("knob,value", [("IVON_TRITON_BLOCK", "48"), ("IVON_TRITON_BLOCK", "2"),
                                        ("IVON_TRITON_WARPS", "3")])
def test_bad_knobs_rejected(monkeypatch, knob, value):
    monkeypatch.setenv(knob, value)
    with pytest.raises(ValueError, match="power of two"):
        tb.sample(torch.zeros(8), torch.zeros(8), torch.ones(8), ess=1.0, weight_decay=0.0)


def test_rejects_fp64_and_bad_draws():
    x = torch.zeros(8, dtype=torch.float64)
    with pytest.raises(TypeError):
        tb.sample(x, x, x, ess=1.0, weight_decay=0.0)
    y = torch.zeros(8)
    with pytest.raises(ValueError):
        tb.sample(y, y, y + 1, draw=1 << 64, ess=1.0, weight_decay=0.0)


@pytest.mark.parametrize("kernel", ["_sample_kernel", "_accumulate_kernel", "_update_kernel"])
def test_hyperparameters_are_runtime_arguments(kernel):
    """Changing lr or the step must not recompile: only the UPPERCASE flags are constexpr."""
    fn = getattr(tb, kernel).fn
    constexprs = {name for name, ann in fn.__annotations__.items() if "constexpr" in str(ann)}
    assert constexprs == {name for name in fn.__code__.co_varnames[:fn.__code__.co_argcount]
                          if name.isupper()}
    assert "BLOCK" in constexprs and "LEAD" in constexprs


@pytest.mark.parametrize("device", DEVICES)
def test_device_scalar_values_do_not_recompile(device, monkeypatch):
    """The kernel reads device_lr / found_inf / grad_scale / device_debias through pointers: a new
    value in the same tensors (as a CUDA graph replay or a GradScaler update writes it) launches
    with exactly the same arguments, so the same compiled kernel, and changes the result."""
    n = 37
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
        results.append(run_update(tb, param, grad, state, count=1, hess_approx="price", **dev))
    assert len(launches) == 3
    for _, args, kwargs in launches[1:]:
        assert kwargs == launches[0][2]
        assert len(args) == len(launches[0][1])
        for a, b in zip(args, launches[0][1]):
            if isinstance(a, torch.Tensor) and any(a is t for t in dev.values()):
                assert a is b  # the same device scalar tensors
            elif not isinstance(a, torch.Tensor):
                assert a == b
    assert not torch.equal(results[0][1][0], results[1][1][0])   # the new lr was used
    assert torch.equal(results[2][1][0], state[0])                # the step was skipped
    if device == "cuda":
        assert len(kernel.device_caches[torch.cuda.current_device()][0]) <= compiled_before + 1


# ---------------------------------------------------------------------------------------------
# Launch options: no FMA contraction (docs/DESIGN.md section 7's tolerances assume torch's rounding)
# ---------------------------------------------------------------------------------------------
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


@pytest.mark.parametrize("device", DEVICES)
def test_every_launch_turns_fp_contraction_off(device, monkeypatch):
    launches = _record_launches(monkeypatch)
    _launch_every_op(device)
    ops = ["_sample_kernel", "_accumulate_kernel", "_update_kernel"]
    assert [name for name, _, _ in launches] == (ops + ["_update_kernel"] + ops + ops
                                                 + ["_update_kernel"] * 2)
    for name, _, kwargs in launches:
        assert kwargs.get("enable_fp_fusion") is False, name


def compile_launches_for_sm90():
    """Compile every launch of the ops, with its exact arguments and options, for an sm_90 target
    (no GPU needed) and check the PTX: the options are ones the launcher accepts, and no multiply
    and add were contracted into an fma. Runs in a subprocess without the interpreter (see
    test_gpu_code_has_no_contracted_fma)."""
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

    def ptx_of(kernel, values, options):
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
        return triton.compile(source, target=target, options=options).asm["ptx"]

    checked_philox = set()
    for name, args, kwargs in launches:
        kernel = getattr(tb, name)
        values = dict(zip(kernel.arg_names, args))
        values.update({k: v for k, v in kwargs.items() if k in kernel.arg_names})
        options = {k: v for k, v in kwargs.items() if k not in kernel.arg_names}
        # the launcher raises for any keyword that is neither an argument nor a backend option
        assert set(options) <= set(backend.parse_options(options).__dict__), options
        # contracted multiply-adds of the kernel's own arithmetic appear as fma.rn.f32; the
        # fmas libdevice's log / sin / cos write on purpose are fma.rn.ftz.f32
        ptx = ptx_of(kernel, values, options)
        assert not re.search(r"\bfma\.rn\.f32\b", ptx), name
        if name == "_update_kernel" and not (values["PRICE"] or values["RESAMPLE"]):
            # no noise: Philox (its mul.hi.u32) runs only for bf16 state's rounding bits; fp32
            # state compiles to the kernel it was before bf16 state existed
            bf16_state = values["momentum_ptr"].dtype == torch.bfloat16
            assert bool(re.search(r"\bmul\.hi\.u32\b", ptx)) == bf16_state, values
            checked_philox.add(bf16_state)
        if name == "_update_kernel":  # with contraction the update has fmas: the check can fail
            contracted = dict(options, enable_fp_fusion=True)
            assert re.search(r"\bfma\.rn\.f32\b", ptx_of(kernel, values, contracted))
    assert checked_philox == {False, True}


def test_gpu_code_has_no_contracted_fma():
    """The launches as the GPU compiles them, checked on any machine (see
    compile_launches_for_sm90)."""
    from triton.backends import backends
    if "nvidia" not in backends:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["IVON_TRITON_BLOCK"] = str(tb.BLOCK)  # the GPU's tile (the CPU's compiles for minutes)
    result = subprocess.run(
        [sys.executable, "-c", "import test_triton; test_triton.compile_launches_for_sm90()"],
        cwd=os.path.dirname(os.path.abspath(__file__)), env=env, capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


# ---------------------------------------------------------------------------------------------
# GPU only: streams, devices, and the C++ CPU kernels against Triton on the GPU
# ---------------------------------------------------------------------------------------------
def _update_kwargs():
    return dict(seed=BIG_SEED, draw=4, next_draw=5, offset=3, count=1, hess_approx="price",
                scalars=update_scalars(0.5))


@pytest.mark.gpu
def test_update_runs_on_the_current_stream():
    """Work queued on a side stream before the update is visible to it: a launch on any other
    stream would overtake the copies below (the side stream sleeps first) and read zeros."""
    n = 1 << 20
    state, grad = make_state(n, "cuda"), make_grad(n, torch.float32, "cuda")
    expected_param = torch.empty(n, device="cuda")
    expected = clones(state)
    tb.update(expected_param, grad, *expected, **_update_kwargs())
    got_param = torch.zeros(n, device="cuda")
    got = [torch.zeros_like(t) for t in state]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        for destination, source in zip(got, state):
            destination.copy_(source)
        tb.update(got_param, grad, *got, **_update_kwargs())
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got_param, expected_param)
    for a, e in zip(got, expected):
        assert torch.equal(a, e)


@pytest.mark.gpu
def test_update_on_a_device_that_is_not_current():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    device = "cuda:1"
    state, grad = make_state(4097, device), make_grad(4097, torch.float32, device)
    got_param, expected_param = torch.empty(4097, device=device), torch.empty(4097, device=device)
    got, expected = clones(state), clones(state)
    with torch.cuda.device(0):
        tb.update(got_param, grad, *got, **_update_kwargs())
        assert torch.cuda.current_device() == 0
    reference.update(expected_param, grad, *expected, **_update_kwargs())
    assert_close(got_param, expected_param)
    for a, e in zip(got, expected):
        assert_close(a, e)


@pytest.mark.gpu
@pytest.mark.parametrize("mc,hess_approx", [(1, "price"), (3, "price"), (2, "gradsq")])
def test_gpu_trajectory_matches_the_cpu_kernel(mc, hess_approx):
    """Triton on the GPU against the C++ kernel on the CPU, element by element, after several
    steps: two compilers, two devices, neither contracting, within docs/DESIGN.md section 7's 1e-5."""
    from ivon_fast import cpp_backend
    reason = cpp_backend.unavailable_reason("cpu")
    if reason is not None:
        pytest.skip(reason)
    n, offset, steps = 30_001, 4099, 6
    got = _trajectory(tb, "cuda", torch.float32, n, offset, mc, hess_approx, steps)
    expected = _trajectory(cpp_backend, "cpu", torch.float32, n, offset, mc, hess_approx, steps)
    for name, a, e in zip(("param", "mean", "momentum", "hess"), got, expected):
        torch.testing.assert_close(a.cpu(), e, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
