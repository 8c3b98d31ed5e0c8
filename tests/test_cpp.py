"""The compiled C++/CUDA ops against ivon_fast.reference, element by element, with the same noise.

The reference regenerates the Philox noise of docs/DESIGN.md section 3 in torch code, so both sides
use the same eps; what remains are ulp-level differences of the transcendental functions, covered
by the per-dtype tolerances below. CUDA tests run the same comparisons on CUDA tensors.
"""
from __future__ import annotations

import contextlib
import itertools
import os

import pytest
import torch

from ivon_fast import cpp_backend as cpp
from ivon_fast import reference as ref
from ivon_fast.scalars import StepScalars

from kernel_checks import (PRIOR_OUTPUTS, PRIOR_SCALARS, assert_low_precision_rounding,
                           check_prior_against_reference, check_priors_in_a_skipped_step,
                           check_priors_with_device_inputs,
                           neutral_prior_is_the_weight_decay, one, prior_inputs, prior_state,
                           run_prior_op)
from state_checks import (bf16_state, check_device_draws, check_float32_state_ignores_round_draw,
                          check_rejects_mixed_state_dtypes, check_rounding_is_unbiased,
                          check_sample_and_accumulate, check_update_against_reference)

_REASON = cpp.unavailable_reason("cpu")
if _REASON is not None and (os.environ.get("IVON_FAST_EXPECT_EXT") == "1"
                            or os.environ.get("IVON_FAST_EXPECT_CUDA") == "1"):
    raise RuntimeError(f"the compiled extension is expected but unavailable: {_REASON}")

pytestmark = [pytest.mark.cpp, pytest.mark.skipif(_REASON is not None, reason=str(_REASON))]

# Tolerances per param dtype: the state (fp32) after one op, and the param written in its dtype.
# Low-precision params can land one rounding step apart when the fp32 values differ by an ulp.
STATE_TOL = dict(rtol=1e-5, atol=1e-6)
PARAM_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-5),   # one bf16 ulp (2^-7)
    torch.float16: dict(rtol=1e-3, atol=1e-5),    # one fp16 ulp (2^-10)
}
NOISE_TOL = dict(rtol=2e-6, atol=2e-6)  # |eps| <= 5.7; log / sin / cos within a few ulp

BIG_SEED = (1 << 64) - 12345            # a seed above 2^63
EVAL_DRAW = ref.EVAL_DRAW_BASE + 7      # an evaluation draw (bit 63 set)

HYPER = dict(lr=0.05, ess=30.0, weight_decay=1e-3, beta1=0.9, beta2=0.95)

DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]

# Global offsets from 2^34 elements (2^32 quads) put the high word of the noise counter to work;
# the second segment crosses its carry.
HIGH_OFFSETS = [(1 << 34) + 3, (1 << 34) - 4093, (1 << 62) + 1]


def _state(n, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(scale=1.0):
        return (torch.randn(n, generator=gen) * scale).to(device)

    return dict(
        param=torch.zeros(n, dtype=dtype, device=device),
        grad=rnd().to(dtype),
        mean=rnd(),
        momentum=rnd(0.1),
        hess=(torch.rand(n, generator=gen) * 0.5 + 0.05).to(device),
        avg_grad=rnd(),
        avg_hess_term=rnd(0.05),
    )


def _clone(state):
    return {k: v.clone() for k, v in state.items()}


def _assert_state(got, want, keys):
    for key in keys:
        tol = PARAM_TOL[got[key].dtype] if key in ("param", "grad") else STATE_TOL
        torch.testing.assert_close(got[key].float(), want[key].float(), **tol,
                                   msg=lambda m, key=key: f"{key}: {m}")


def _skip_without_cuda(device):
    if device == "cuda":
        reason = cpp.unavailable_reason("cuda")
        if reason is not None or not torch.cuda.is_available():
            pytest.skip(reason or "needs a CUDA device")


# ---- noise ----------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed,draw", [(0, 0), (123, 5), (BIG_SEED, EVAL_DRAW)])
@pytest.mark.parametrize("offset", [0, 1, 2, 3, 4099, *HIGH_OFFSETS])
def test_noise_equals_reference(device, seed, draw, offset):
    _skip_without_cuda(device)
    n = 4097
    param = torch.empty(n, device=device)
    # mean 0 and sigma 1 (ess = 1, hess = 1, wd = 0): the sample is eps itself
    cpp.sample(param, torch.zeros(n, device=device), torch.ones(n, device=device), seed=seed,
               draw=draw, offset=offset, ess=1.0, weight_decay=0.0)
    want = ref.philox_normal(seed, draw, offset, n, device)
    torch.testing.assert_close(param, want, **NOISE_TOL)
    assert 0.9 < param.std().item() < 1.1


def test_noise_moments_and_streams():
    n = 1 << 16
    out = {}
    for draw in (0, 1, EVAL_DRAW):
        p = torch.empty(n)
        cpp.sample(p, torch.zeros(n), torch.ones(n), seed=7, draw=draw, ess=1.0, weight_decay=0.0)
        out[draw] = p
    for p in out.values():
        assert abs(p.mean().item()) < 0.02 and abs(p.std().item() - 1) < 0.02
    assert not torch.equal(out[0], out[1]) and not torch.equal(out[0], out[EVAL_DRAW])


# ---- sample ---------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,offset", [(1, 0), (3, 1), (5, 2), (4097, 3), (4097, 4099),
                                      (300_001, 1)])
def test_sample(device, dtype, n, offset):
    _skip_without_cuda(device)
    got, want = _state(n, dtype, device), None
    want = _clone(got)
    kw = dict(seed=BIG_SEED, draw=3, offset=offset, ess=HYPER["ess"],
              weight_decay=HYPER["weight_decay"])
    cpp.sample(got["param"], got["mean"], got["hess"], **kw)
    ref.sample(want["param"], want["mean"], want["hess"], **kw)
    _assert_state(got, want, ["param"])


# ---- accumulate -----------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("n,offset", [(5, 3), (4097, 1)])
def test_accumulate(device, dtype, hess_approx, count, n, offset):
    _skip_without_cuda(device)
    got = _state(n, dtype, device, seed=1)
    want = _clone(got)
    kw = dict(seed=99, draw=EVAL_DRAW, offset=offset, count=count, ess=HYPER["ess"],
              weight_decay=HYPER["weight_decay"], hess_approx=hess_approx)
    cpp.accumulate(got["grad"], got["hess"], got["avg_grad"], got["avg_hess_term"], **kw)
    ref.accumulate(want["grad"], want["hess"], want["avg_grad"], want["avg_hess_term"], **kw)
    _assert_state(got, want, ["avg_grad", "avg_hess_term"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
def test_accumulate_of_the_first_sample_never_reads_the_averages(device, hess_approx):
    """count == 1 starts the running means afresh, whatever the averages held before (NaN here):
    the optimizer does not clear them between steps."""
    _skip_without_cuda(device)
    got = _state(4097, torch.float32, device, seed=1)
    want = _clone(got)
    got["avg_grad"].fill_(float("nan"))
    got["avg_hess_term"].fill_(float("nan"))
    kw = dict(seed=99, draw=3, offset=1, count=1, ess=HYPER["ess"],
              weight_decay=HYPER["weight_decay"], hess_approx=hess_approx)
    cpp.accumulate(got["grad"], got["hess"], got["avg_grad"], got["avg_hess_term"], **kw)
    ref.accumulate(want["grad"], want["hess"], want["avg_grad"], want["avg_hess_term"], **kw)
    _assert_state(got, want, ["avg_grad", "avg_hess_term"])


# ---- update ---------------------------------------------------------------------------------

def _scalars(clip_radius, debias=1 - 0.9 ** 3):
    return StepScalars.of(clip_radius=clip_radius, debias=debias, **HYPER)


def _run_update(backend, st, *, grad, count, hess_approx, clip_radius, next_draw, offset,
                seed=5, draw=11):
    backend.update(st["param"], st["grad"] if grad else None, st["mean"], st["momentum"],
                   st["hess"], st["avg_grad"], st["avg_hess_term"], seed=seed, draw=draw,
                   next_draw=next_draw, offset=offset, count=count, hess_approx=hess_approx,
                   scalars=_scalars(clip_radius))


_UPDATE_CASES = list(itertools.product(
    [torch.float32, torch.bfloat16, torch.float16],
    ["price", "gradsq"],
    [(True, 1), (True, 3), (False, 3)],        # (grad given, count)
    [None, 12],                                 # next_draw
    [0.02, float("inf")],                       # clip_radius
))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(_UPDATE_CASES)))
def test_update(device, case):
    _skip_without_cuda(device)
    dtype, hess_approx, grad_count, next_draw, clip = _UPDATE_CASES[case]
    n = 4097
    offset = 4096 + case % 4  # every segment alignment
    got = _state(n, dtype, device, seed=2)
    want = _clone(got)
    kw = dict(grad=grad_count[0], count=grad_count[1], hess_approx=hess_approx,
              clip_radius=clip, next_draw=next_draw, offset=offset)
    _run_update(cpp, got, **kw)
    _run_update(ref, want, **kw)
    _assert_state(got, want, ["mean", "momentum", "hess", "param"])
    if clip != float("inf"):  # the clip must have been active for this case to test it
        step = (want["mean"] - _state(n, dtype, device, seed=2)["mean"]).abs()
        assert abs(step.max().item() - HYPER["lr"] * clip) < 1e-3 * HYPER["lr"] * clip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 3, 5, 4097, 300_001])
@pytest.mark.parametrize("offset", [0, 1, 2, 3, 4099])
def test_update_sizes_offsets(device, n, offset):
    _skip_without_cuda(device)
    got = _state(n, torch.float32, device, seed=3)
    want = _clone(got)
    kw = dict(grad=True, count=1, hess_approx="price", clip_radius=float("inf"),
              next_draw=EVAL_DRAW, offset=offset, seed=BIG_SEED, draw=(1 << 63) + 1)
    _run_update(cpp, got, **kw)
    _run_update(ref, want, **kw)
    _assert_state(got, want, ["mean", "momentum", "hess", "param"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
@pytest.mark.parametrize("mc_samples", [1, 3])
def test_trajectory(device, hess_approx, mc_samples):
    """Several IVON iterations (sample, grads of a quadratic, accumulate, fused update)."""
    _skip_without_cuda(device)
    n, offset = 20_003, 6
    gen = torch.Generator().manual_seed(4)
    # a target far from the params keeps |grad| away from 0, where an ulp of noise difference
    # would be a large relative difference of the grad (the tolerance is about the kernels)
    target = (torch.randn(n, generator=gen) * 0.1 + 4.0).to(device)
    states = {}
    for name, backend in (("cpp", cpp), ("ref", ref)):
        st = _state(n, torch.float32, device, seed=4)
        st["hess"].fill_(0.1)
        st["momentum"].zero_()
        draw = 0
        backend.sample(st["param"], st["mean"], st["hess"], seed=77, draw=draw, offset=offset,
                       ess=HYPER["ess"], weight_decay=HYPER["weight_decay"])
        for step in range(1, 6):
            for s in range(1, mc_samples + 1):
                grad = 2.0 * (st["param"] - target) * (1 + 0.1 * torch.sin(st["param"]))
                common = dict(seed=77, draw=draw, offset=offset, count=s,
                              hess_approx=hess_approx)
                if s < mc_samples:
                    backend.accumulate(grad, st["hess"], st["avg_grad"], st["avg_hess_term"],
                                       ess=HYPER["ess"], weight_decay=HYPER["weight_decay"],
                                       **common)
                    draw += 1
                    backend.sample(st["param"], st["mean"], st["hess"], seed=77, draw=draw,
                                   offset=offset, ess=HYPER["ess"],
                                   weight_decay=HYPER["weight_decay"])
                else:
                    backend.update(st["param"], grad, st["mean"], st["momentum"], st["hess"],
                                   st["avg_grad"], st["avg_hess_term"], next_draw=draw + 1,
                                   scalars=_scalars(0.1, debias=1 - 0.9 ** step), **common)
                    draw += 1
        states[name] = st
    # 1e-5 relative, with an absolute floor of 1e-5 of the tensor's scale for elements near 0
    # (an ulp of eps in step k moves such an element by an ulp of the scale, not of itself)
    for key in ("mean", "momentum", "hess", "param"):
        scale = states["ref"][key].abs().max().item()
        torch.testing.assert_close(states["cpp"][key], states["ref"][key], rtol=1e-5,
                                   atol=1e-5 * scale,
                                   msg=lambda m, key=key: f"{key}: {m}")


# ---- update's device scalars: grad_scale, found_inf, device_lr, device_debias ------------------
# (ivon_fast.reference.update; Note [device scalars of an update] in csrc/ivon_math.h)

_GRAD_MODES = [(True, 1), (True, 3), (False, 3)]  # (grad given, count): the three GradModes


def _bits(tensor):
    """The tensor's bits as integers: equal bits compare equal, NaNs included."""
    return tensor.view({4: torch.int32, 2: torch.int16}[tensor.element_size()])


def _scaled_state(n, dtype, device, scale, hess_approx, seed=20):
    """A state whose grad and averages are those of _state multiplied by ``scale`` as a GradScaler
    would have them (the 'gradsq' average holds squares, so scale^2), and the unscaled original."""
    plain = _state(n, dtype, device, seed=seed)
    plain["avg_hess_term"] = plain["avg_hess_term"].abs() if hess_approx == "gradsq" else \
        plain["avg_hess_term"]
    scaled = _clone(plain)
    scaled["grad"] = (plain["grad"].float() * scale).to(dtype)
    scaled["avg_grad"] = plain["avg_grad"] * scale
    scaled["avg_hess_term"] = plain["avg_hess_term"] * (scale ** 2 if hess_approx == "gradsq"
                                                        else scale)
    return plain, scaled


def _update_with(backend, st, *, grad, count, hess_approx, next_draw=12, offset=4099,
                 scalars=None, **device_scalars):
    backend.update(st["param"], st["grad"] if grad else None, st["mean"], st["momentum"],
                   st["hess"], st["avg_grad"], st["avg_hess_term"], seed=5, draw=11,
                   next_draw=next_draw, offset=offset, count=count, hess_approx=hess_approx,
                   scalars=_scalars(0.02) if scalars is None else scalars, **device_scalars)


_SCALE_CASES = list(itertools.product(
    [torch.float32, torch.bfloat16, torch.float16], ["price", "gradsq"], _GRAD_MODES,
    [1024.0, 3.0]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(_SCALE_CASES)))
def test_update_grad_scale_equals_reference(device, case):
    """grad, averages and the 'gradsq' average (twice) divided by grad_scale, as the reference.
    fp32: the same bits as the update without grad_scale of the inputs divided by torch first
    (true divisions, not a reciprocal multiply; for a power of two, the unscaled inputs)."""
    _skip_without_cuda(device)
    dtype, hess_approx, (grad, count), scale = _SCALE_CASES[case]
    _, got = _scaled_state(4097, dtype, device, scale, hess_approx)
    start, want = _clone(got), _clone(got)
    kw = dict(grad=grad, count=count, hess_approx=hess_approx)
    _update_with(cpp, got, grad_scale=one(scale, device), **kw)
    _update_with(ref, want, grad_scale=one(scale, device), **kw)
    _assert_state(got, want, ["mean", "momentum", "hess", "param"])
    if dtype == torch.float32:
        term = start["avg_hess_term"] / scale
        divided = dict(start, grad=start["grad"] / scale, avg_grad=start["avg_grad"] / scale,
                       avg_hess_term=term / scale if hess_approx == "gradsq" else term)
        _update_with(cpp, divided, **kw)
        for key in ("mean", "momentum", "hess", "param"):
            assert torch.equal(got[key], divided[key]), key
    # the scale must matter: without it the state moves elsewhere
    ignored = _clone(start)
    _update_with(cpp, ignored, **kw)
    assert not torch.allclose(ignored["hess"], got["hess"], rtol=1e-3, atol=0)


_SKIP_CASES = list(itertools.product(
    [torch.float32, torch.bfloat16], ["price", "gradsq"], _GRAD_MODES, [None, 12]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("found", [1.0, float("nan"), float("-inf")])
@pytest.mark.parametrize("case", range(len(_SKIP_CASES)))
def test_update_found_inf_skips_the_step(device, found, case):
    """A nonzero (or NaN) found_inf: state bit for bit unchanged, param <- the old mean, or the
    sample of next_draw around the old mean and hess (the same bits as the sample op); the
    non-finite grads and averages are never let into the state."""
    _skip_without_cuda(device)
    dtype, hess_approx, (grad, count), next_draw = _SKIP_CASES[case]
    got = _state(4097, dtype, device, seed=21)
    got["grad"][::7] = float("inf")
    got["avg_grad"][1::5] = float("nan")
    before = _clone(got)
    want = _clone(got)
    kw = dict(grad=grad, count=count, hess_approx=hess_approx, next_draw=next_draw)
    _update_with(cpp, got, found_inf=one(found, device), grad_scale=one(3.0, device), **kw)
    _update_with(ref, want, found_inf=one(found, device), grad_scale=one(3.0, device), **kw)
    for key in ("mean", "momentum", "hess", "avg_grad", "avg_hess_term", "grad"):
        assert torch.equal(_bits(got[key]), _bits(before[key])), key
    if next_draw is None:
        assert torch.equal(got["param"], before["mean"].to(dtype))
    else:
        sampled = torch.empty_like(got["param"])
        cpp.sample(sampled, before["mean"], before["hess"], seed=5, draw=next_draw, offset=4099,
                   ess=HYPER["ess"], weight_decay=HYPER["weight_decay"])
        assert torch.equal(got["param"], sampled)
    _assert_state(got, want, ["param"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
@pytest.mark.parametrize("grad,count", _GRAD_MODES)
def test_update_found_inf_zero_takes_the_step(device, hess_approx, grad, count):
    """found_inf = 0 is the step without found_inf, bit for bit (and the reference's)."""
    _skip_without_cuda(device)
    got = _state(4097, torch.float32, device, seed=22)
    plain, want = _clone(got), _clone(got)
    kw = dict(grad=grad, count=count, hess_approx=hess_approx)
    _update_with(cpp, got, found_inf=one(0.0, device), **kw)
    _update_with(cpp, plain, **kw)
    _update_with(ref, want, found_inf=one(0.0, device), **kw)
    for key in ("mean", "momentum", "hess", "param"):
        assert torch.equal(got[key], plain[key]), key
    _assert_state(got, want, ["mean", "momentum", "hess", "param"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
def test_update_device_lr_and_debias(device, dtype, hess_approx):
    """device_lr / device_debias holding the scalars' values give the scalars' bits; other values
    give what the scalars with those values give (the kernel reads them, not the scalars)."""
    _skip_without_cuda(device)
    kw = dict(grad=True, count=3, hess_approx=hess_approx)
    base = _state(4097, dtype, device, seed=23)
    scalars = _scalars(float("inf"), debias=0.271)
    other = StepScalars.of(clip_radius=float("inf"), debias=0.5, **dict(HYPER, lr=0.2))
    runs = {}
    for name, step_scalars, device_scalars in [
            ("scalars", scalars, {}),
            ("device", scalars, dict(device_lr=one(scalars.lr, device),
                                     device_debias=one(scalars.debias, device))),
            ("other_scalars", other, {}),
            ("other_device", scalars, dict(device_lr=one(0.2, device),
                                           device_debias=one(0.5, device))),
            ("other_lr_only", StepScalars.of(clip_radius=float("inf"), debias=0.271,
                                             **dict(HYPER, lr=0.2)), {}),
            ("device_lr_only", scalars, dict(device_lr=one(0.2, device)))]:
        st = _clone(base)
        _update_with(cpp, st, scalars=step_scalars, **device_scalars, **kw)
        runs[name] = st
    for key in ("mean", "momentum", "hess", "param"):
        assert torch.equal(runs["device"][key], runs["scalars"][key]), key
        assert torch.equal(runs["other_device"][key], runs["other_scalars"][key]), key
        assert torch.equal(runs["device_lr_only"][key], runs["other_lr_only"][key]), key
    assert not torch.equal(runs["other_device"]["mean"], runs["scalars"]["mean"])
    want = _clone(base)
    _update_with(ref, want, scalars=scalars, device_lr=one(0.2, device),
                 device_debias=one(0.5, device), **kw)
    _assert_state(runs["other_device"], want, ["mean", "momentum", "hess", "param"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,offset", [(1, 0), (3, 1), (5, 2), (7, 3), (4097, 4099),
                                      (300_001, 1)])
@pytest.mark.parametrize("found", [0.0, 1.0])
def test_update_device_scalars_sizes_offsets(device, n, offset, found):
    """All four together, on odd segments (partial quads at both ends, several threads)."""
    _skip_without_cuda(device)
    got = _state(n, torch.bfloat16, device, seed=24)
    before, want = _clone(got), _clone(got)
    dev = dict(grad_scale=one(3.0, device), found_inf=one(found, device),
               device_lr=one(0.1, device), device_debias=one(0.4, device))
    kw = dict(grad=True, count=3, hess_approx="price", offset=offset, next_draw=EVAL_DRAW)
    _update_with(cpp, got, **dev, **kw)
    _update_with(ref, want, **dev, **kw)
    _assert_state(got, want, ["mean", "momentum", "hess", "param"])
    if found:
        for key in ("mean", "momentum", "hess"):
            assert torch.equal(got[key], before[key]), key


def test_update_device_scalars_validation():
    st = _state(8, torch.float32, "cpu")
    kw = dict(grad=True, count=1, hess_approx="price")
    for name in ("grad_scale", "found_inf", "device_lr", "device_debias"):
        with pytest.raises(RuntimeError, match=f"{name} must be float32, got Double"):
            _update_with(cpp, _clone(st), **{name: torch.ones(1, dtype=torch.float64)}, **kw)
        with pytest.raises(RuntimeError, match=f"{name} must be a tensor of 1 element, got 2"):
            _update_with(cpp, _clone(st), **{name: torch.ones(2)}, **kw)
        # a meta tensor dispatches the call to the fake kernel, which checks the same
        with pytest.raises(RuntimeError, match=f"{name} must be on the params' device cpu, "
                                               "got meta"):
            _update_with(cpp, _clone(st), **{name: torch.ones(1, device="meta")}, **kw)
        # the CPU kernel's own check of the device
        op = torch.ops.ivon_fast.update.default
        s = _scalars(1.0)
        with pytest.raises(RuntimeError, match=f"{name} must be on the params' device cpu"):
            op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), st["param"],
                          st["grad"], st["mean"], st["momentum"], st["hess"], None, None,
                          seed=0, draw=0, next_draw=None, offset=0, count=1,
                          hess_approx="price", lr=s.lr, ess=s.ess,
                          weight_decay=s.weight_decay, beta1=s.beta1,
                          one_minus_beta1=s.one_minus_beta1, beta2=s.beta2,
                          one_minus_beta2=s.one_minus_beta2, hess_coef=s.hess_coef,
                          clip_radius=s.clip_radius, debias=s.debias,
                          **{name: torch.ones(1, device="meta")})
    # a 0-d tensor is one element too
    _update_with(cpp, _clone(st), found_inf=torch.zeros(()), device_lr=torch.tensor(0.1), **kw)


@pytest.mark.gpu
def test_cuda_update_rejects_cpu_device_scalars():
    _skip_without_cuda("cuda")
    st = _state(8, torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="found_inf must be on the params' device cuda"):
        _update_with(cpp, st, grad=True, count=1, hess_approx="price", found_inf=torch.ones(1))


def test_torch_compile_with_device_scalars_matches_eager():
    """The fake kernel takes the new arguments; a traced step reads their values at run time."""
    n = 1003

    def step(st, dev):
        cpp.update(st["param"], st["grad"], st["mean"], st["momentum"], st["hess"], None, None,
                   seed=BIG_SEED, draw=4, next_draw=5, offset=2, count=1,
                   hess_approx="price", scalars=_scalars(0.02, debias=0.1), **dev)
        return st["param"] * 2.0

    torch._dynamo.reset()
    compiled_step = torch.compile(step, fullgraph=True, backend="aot_eager")
    for found in (0.0, 1.0):
        dev = dict(grad_scale=one(3.0, "cpu"), found_inf=one(found, "cpu"),
                   device_lr=one(0.3, "cpu"), device_debias=one(0.2, "cpu"))
        eager = _state(n, torch.float32, "cpu", seed=8)
        compiled = _clone(eager)
        out_eager = step(eager, dev)
        out_compiled = compiled_step(compiled, dev)
        torch.testing.assert_close(out_compiled, out_eager, rtol=0, atol=0)
        for key in ("param", "mean", "momentum", "hess"):
            assert torch.equal(compiled[key], eager[key]), key


# ---- the per-element prior: prior_mean, prior_precision (Note [per-element prior] in ivon_math.h)

def _close(actual, expected, dtype):
    torch.testing.assert_close(actual, expected, **PARAM_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,offset", [(1, 0), (3, 1), (7, 3), (4097, 4099), (70_001, 2)])
def test_sample_with_prior_precision(device, dtype, n, offset):
    _skip_without_cuda(device)
    check_prior_against_reference(cpp, "sample", device, dtype, "precision", _close, n=n,
                                  offset=offset)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("n,offset", [(5, 3), (4097, 1)])
def test_accumulate_with_prior_precision(device, dtype, hess_approx, count, n, offset):
    """'price''s noise uses the prior precision; 'gradsq' has no noise, so it cannot matter."""
    _skip_without_cuda(device)
    check_prior_against_reference(cpp, "accumulate", device, dtype, "precision", _close, n=n,
                                  offset=offset, hess_approx=hess_approx, count=count,
                                  prior_matters=hess_approx == "price")


_PRIOR_UPDATE_CASES = list(itertools.product(
    ["mean", "precision", "both"],
    [torch.float32, torch.bfloat16, torch.float16],
    ["price", "gradsq"],
    [(True, 1), (True, 3), (False, 3)],        # (grad given, count): the three GradModes
    [None, 12],                                 # next_draw
))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(_PRIOR_UPDATE_CASES)))
def test_update_with_priors(device, case):
    """Every instance with a prior against the reference. Where the reference draws no noise
    (no 'price' grad, no next sample) its fp32 arithmetic is the kernel's, op for op: the CPU
    kernel then gives its bits."""
    _skip_without_cuda(device)
    prior, dtype, hess_approx, (grad, count), next_draw = _PRIOR_UPDATE_CASES[case]
    kw = dict(hess_approx=hess_approx, grad=grad, count=count, next_draw=next_draw,
              offset=4096 + case % 4)
    got = check_prior_against_reference(cpp, "update", device, dtype, prior, _close, **kw)
    noise_free = not (hess_approx == "price" and grad) and next_draw is None
    if noise_free and device == "cpu":
        state = prior_state(4097, dtype, device, hess_approx)
        want = run_prior_op(ref, "update", state, prior_inputs(prior, 4097, device), **kw)
        for key in PRIOR_OUTPUTS["update"]:
            assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
# 70_001 elements: several threads' ranges (Note [thread split over quads] in cpu_dispatch.cpp)
@pytest.mark.parametrize("n,offset", [(1, 0), (3, 1), (5, 2), (7, 3), (4097, 4099),
                                      (70_001, 1)])
@pytest.mark.parametrize("found", [0.0, 1.0])
def test_priors_with_device_scalars_and_draws(device, dtype, n, offset, found):
    """Both priors together with every device scalar and the device draws, on odd segments
    (partial quads at both ends, several threads); sample and accumulate with the device draw.
    A skipped step keeps the state, and its next sample still uses the prior precision."""
    _skip_without_cuda(device)
    check_priors_with_device_inputs(cpp, device, dtype, n, offset, found, _close,
                                    eval_draw=(1 << 63) + 3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prior", ["mean", "precision", "both"])
@pytest.mark.parametrize("next_draw", [None, 12])
@pytest.mark.parametrize("grad,count", _GRAD_MODES)
def test_priors_in_a_skipped_step(device, prior, next_draw, grad, count):
    _skip_without_cuda(device)
    check_priors_in_a_skipped_step(cpp, device, prior, next_draw, grad, count)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
@pytest.mark.parametrize("grad,count", _GRAD_MODES)
def test_a_neutral_prior_is_the_weight_decay_bit_for_bit(device, dtype, hess_approx, grad,
                                                         count):
    """Precision weight_decay and mean 0 in every element: the instances with the prior inputs
    compute the bits of the instances without them (sample, accumulate, update)."""
    _skip_without_cuda(device)
    kw = dict(hess_approx=hess_approx, count=count)
    neutral_prior_is_the_weight_decay(cpp, "update", device, dtype, grad=grad, next_draw=12,
                                      **kw)
    neutral_prior_is_the_weight_decay(cpp, "accumulate", device, dtype, **kw)
    neutral_prior_is_the_weight_decay(cpp, "sample", device, dtype)


def test_prior_inputs_validation():
    st = prior_state(8, torch.float32, "cpu")
    kw = dict(grad=True, count=1, offset=0)
    for name in ("prior_mean", "prior_precision"):
        with pytest.raises(RuntimeError, match=f"{name} has 7 elements but param has 8"):
            run_prior_op(cpp, "update", st, {name: torch.zeros(7)}, **kw)
        with pytest.raises(RuntimeError, match=f"{name} must be Float, got Double"):
            run_prior_op(cpp, "update", st, {name: torch.zeros(8, dtype=torch.float64)}, **kw)
        with pytest.raises(RuntimeError, match=f"{name} must be contiguous"):
            run_prior_op(cpp, "update", st, {name: torch.zeros(16)[::2]}, **kw)
        # a meta tensor dispatches the call to the fake kernel, which checks the same
        with pytest.raises(RuntimeError, match=f"{name} is on meta but param is on cpu"):
            run_prior_op(cpp, "update", st, {name: torch.zeros(8, device="meta")}, **kw)
        # the CPU kernel's own check of the device
        s = PRIOR_SCALARS
        with pytest.raises(RuntimeError, match=f"{name} is on meta but param is on cpu"):
            torch.ops.ivon_fast.update.default.redispatch(
                torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), st["param"], st["grad"],
                st["mean"], st["momentum"], st["hess"], None, None, seed=0, draw=0,
                next_draw=None, offset=0, count=1, hess_approx="price", lr=s.lr, ess=s.ess,
                weight_decay=s.weight_decay, beta1=s.beta1, one_minus_beta1=s.one_minus_beta1,
                beta2=s.beta2, one_minus_beta2=s.one_minus_beta2, hess_coef=s.hess_coef,
                clip_radius=s.clip_radius, debias=s.debias,
                **{name: torch.zeros(8, device="meta")})
    for op in ("sample", "accumulate"):
        with pytest.raises(RuntimeError, match="prior_precision has 9 elements"):
            run_prior_op(cpp, op, st, {"prior_precision": torch.zeros(9)}, offset=0)
        with pytest.raises(RuntimeError, match="prior_precision must be Float, got Half"):
            run_prior_op(cpp, op, st, {"prior_precision": torch.zeros(8, dtype=torch.half)},
                         offset=0)
        with pytest.raises(RuntimeError, match="prior_precision is on meta"):
            run_prior_op(cpp, op, st, {"prior_precision": torch.zeros(8, device="meta")},
                         offset=0)
    # 'gradsq' does not read it, but a wrong one is still an error
    with pytest.raises(RuntimeError, match="prior_precision has 9 elements"):
        run_prior_op(cpp, "accumulate", st, {"prior_precision": torch.zeros(9)}, offset=0,
                     hess_approx="gradsq")


def test_torch_compile_with_priors_matches_eager():
    """The fake kernels take the prior inputs; a traced step passes them to the kernels."""
    n = 1003
    priors = prior_inputs("both", n, "cpu")

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

    eager = prior_state(n, torch.float32, "cpu")
    compiled = _clone(eager)
    out_eager = step(eager)
    torch._dynamo.reset()
    out_compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(compiled)
    torch.testing.assert_close(out_compiled, out_eager, rtol=0, atol=0)
    for key in ("param", "mean", "momentum", "hess", "avg_grad", "avg_hess_term"):
        assert torch.equal(compiled[key], eager[key]), key


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prior", ["mean", "precision", "both"])
def test_cuda_matches_cpu_kernels_bitwise_with_priors(dtype, prior):
    _skip_without_cuda("cuda")
    results = {}
    for device in ("cpu", "cuda"):
        state, priors = prior_state(100_003, dtype, device), prior_inputs(prior, 100_003, device)
        upd = run_prior_op(cpp, "update", state, priors, count=3, next_draw=EVAL_DRAW, offset=3)
        precision = {k: v for k, v in priors.items() if k == "prior_precision"}
        acc = run_prior_op(cpp, "accumulate", state, precision, count=2, offset=3)
        smp = run_prior_op(cpp, "sample", state, precision, offset=3)
        results[device] = [upd[k].cpu() for k in PRIOR_OUTPUTS["update"]] + [
            acc["avg_grad"].cpu(), acc["avg_hess_term"].cpu(), smp["param"].cpu()]
    for a, b in zip(results["cuda"], results["cpu"]):
        assert torch.equal(a, b)


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


# ---- bf16 momentum / hess (Note [bf16 state] in ivon_math.h; the checks are in state_checks.py)

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
@pytest.mark.parametrize("grad,count", [(True, 1), (True, 3), (False, 3)])
@pytest.mark.parametrize("next_draw", [None, 7])
def test_update_with_bf16_state(device, dtype, hess_approx, grad, count, next_draw):
    """Stored by stochastic rounding with the reference's bits (the same round_draw); the mean
    from the unrounded values, the next sample around the stored hess."""
    _skip_without_cuda(device)
    check_update_against_reference(cpp, device, dtype, _close, hess_approx=hess_approx,
                                   grad=grad, count=count, next_draw=next_draw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,offset", [(1, 0), (3, 2), (5, 1), (5, 3), (70_001, 3),
                                      (70_001, 4), (4097, HIGH_OFFSETS[2])])
def test_update_with_bf16_state_segments(device, n, offset):
    """Partial quads at both ends, blocks and threads (CPU), the vector path (CUDA, offset 4),
    a counter beyond 2^62 elements: the rounding bits of each element's quad."""
    _skip_without_cuda(device)
    check_update_against_reference(cpp, device, torch.bfloat16, _close, n=n, offset=offset,
                                   count=3, next_draw=EVAL_DRAW)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prior", ["mean", "precision", "both"])
@pytest.mark.parametrize("next_draw", [None, 7])
def test_update_with_bf16_state_and_priors(device, prior, next_draw):
    _skip_without_cuda(device)
    check_update_against_reference(cpp, device, torch.float32, _close, prior=prior, count=3,
                                   next_draw=next_draw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hess_approx,prior_precision", [("price", False), ("price", True),
                                                         ("gradsq", False)])
def test_sample_and_accumulate_with_bf16_hess(device, dtype, hess_approx, prior_precision):
    _skip_without_cuda(device)
    check_sample_and_accumulate(cpp, device, dtype, _close, hess_approx=hess_approx,
                                prior_precision=prior_precision)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("found", [0.0, 1.0])
@pytest.mark.parametrize("next_draw", [None, 7])
@pytest.mark.parametrize("round_draw", [21, EVAL_DRAW])
def test_bf16_state_rounds_with_the_device_draw(device, found, next_draw, round_draw):
    """device_draws[1] is the rounding index (with or without a next sample; EVAL_DRAW: the sum
    with 2^62 wraps as the reference's int64 sum does); the host's is ignored."""
    _skip_without_cuda(device)
    check_device_draws(cpp, device, torch.bfloat16, _close, found=found, next_draw=next_draw,
                       round_draw=round_draw)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_state_rounding_is_unbiased(device):
    _skip_without_cuda(device)
    check_rounding_is_unbiased(cpp, device)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_state_ignores_round_draw(device):
    _skip_without_cuda(device)
    check_float32_state_ignores_round_draw(cpp, device, torch.bfloat16)


def test_state_dtype_validation():
    check_rejects_mixed_state_dtypes(cpp, "cpu")
    st = prior_state(8, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="momentum and hess must have the same dtype, got "
                                           "BFloat16 and Float"):
        run_prior_op(cpp, "update", {**st, "momentum": st["momentum"].to(torch.bfloat16)}, {},
                     offset=0)
    with pytest.raises(RuntimeError, match=r"hess must be float32 or bfloat16 \(the state "
                                           r"dtype\), got Half"):
        run_prior_op(cpp, "sample", {**st, "hess": st["hess"].half()}, {}, offset=0)
    with pytest.raises(RuntimeError, match="avg_grad must be Float, got BFloat16"):
        run_prior_op(cpp, "update", {**st, "avg_grad": st["avg_grad"].to(torch.bfloat16)}, {},
                     offset=0, count=2)


@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
def test_every_cpu_build_rounds_bf16_state_alike(hess_approx):
    """The instruction-set builds give the same bits with bf16 state (their Philox words are
    vector code: tests/test_cpp's other build checks cover only the noise)."""
    results = {}
    for isa in _each_cpu_isa():
        state = bf16_state(prior_state(70_001, torch.bfloat16, "cpu", hess_approx))
        upd = run_prior_op(cpp, "update", state, {}, count=3, next_draw=EVAL_DRAW, offset=1,
                           round_draw=5, hess_approx=hess_approx)
        skipped = run_prior_op(cpp, "update", state, {}, next_draw=EVAL_DRAW, offset=1,
                               found_inf=one(1.0, "cpu"), hess_approx=hess_approx)
        results[isa] = [upd[k] for k in ("mean", "momentum", "hess", "param")] + [
            skipped["param"]]
    assert "generic" in results
    for isa, tensors in results.items():
        for a, b in zip(tensors, results["generic"]):
            assert torch.equal(a, b), isa


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu_kernels_bitwise_with_bf16_state(dtype):
    _skip_without_cuda("cuda")
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
        assert torch.equal(a, b)


# ---- every CPU instruction-set build: the counter's high word, rounding of bf16 / fp16 --------

@pytest.fixture(params=["avx512", "avx2", "generic"])
def cpu_isa(request):
    """Runs the test with one CPU kernel build (skipped when this CPU cannot run it)."""
    try:
        cpp.set_cpu_isa(request.param)
    except ValueError:
        pytest.skip(f"this CPU cannot run the {request.param} build")
    yield request.param
    cpp.set_cpu_isa("")


@pytest.mark.parametrize("offset", HIGH_OFFSETS)
def test_every_cpu_build_uses_the_whole_noise_counter(cpu_isa, offset):
    """Noise (sample) and the fused update at global offsets beyond 2^34 elements equal the
    reference: each build's Philox gets the high 32 bits of i >> 2."""
    n = 4097
    param = torch.empty(n)
    cpp.sample(param, torch.zeros(n), torch.ones(n), seed=BIG_SEED, draw=EVAL_DRAW,
               offset=offset, ess=1.0, weight_decay=0.0)
    torch.testing.assert_close(param, ref.philox_normal(BIG_SEED, EVAL_DRAW, offset, n),
                               **NOISE_TOL)
    got = _state(n, torch.float32, "cpu", seed=12)
    want = _clone(got)
    kw = dict(grad=True, count=3, hess_approx="price", clip_radius=float("inf"), next_draw=9,
              offset=offset, seed=BIG_SEED, draw=EVAL_DRAW)
    _run_update(cpp, got, **kw)
    _run_update(ref, want, **kw)
    _assert_state(got, want, ["mean", "momentum", "hess", "param"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", ["sample", "update"])
def test_every_cpu_build_rounds_to_nearest_even(cpu_isa, dtype, op, rounding_probe):
    assert_low_precision_rounding(cpp, "cpu", dtype, op, rounding_probe)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", ["sample", "update"])
def test_cuda_kernels_round_to_nearest_even(dtype, op, rounding_probe):
    _skip_without_cuda("cuda")
    assert_low_precision_rounding(cpp, "cuda", dtype, op, rounding_probe.cuda())


# ---- builds, dispatch, registration, compile -------------------------------------------------

def test_cpu_isa_builds_agree_bitwise():
    """Every instruction-set build the CPU supports gives the same bits as the portable one."""
    results = {}
    for isa in _each_cpu_isa():
        st = _state(70_001, torch.bfloat16, "cpu", seed=6)
        _run_update(cpp, st, grad=True, count=3, hess_approx="price", clip_radius=0.02,
                    next_draw=EVAL_DRAW, offset=1)
        scaled = _state(70_001, torch.float32, "cpu", seed=6)
        _update_with(cpp, scaled, grad=True, count=3, hess_approx="gradsq", offset=1,
                     grad_scale=one(3.0, "cpu"), device_lr=one(0.1, "cpu"),
                     device_debias=one(0.3, "cpu"), found_inf=one(0.0, "cpu"))
        skipped = _state(70_001, torch.float16, "cpu", seed=6)
        _update_with(cpp, skipped, grad=False, count=3, hess_approx="price", offset=1,
                     found_inf=one(1.0, "cpu"))
        # the instances with prior inputs, each alone and both (Note [prior flags])
        priors = {}
        for prior, dtype in (("mean", torch.float16), ("precision", torch.float32),
                             ("both", torch.bfloat16)):
            state = prior_state(70_001, dtype, "cpu")
            inputs = prior_inputs(prior, 70_001, "cpu")
            upd = run_prior_op(cpp, "update", state, inputs, count=3, next_draw=EVAL_DRAW,
                               offset=1)
            priors.update({f"{prior}_{k}": upd[k] for k in PRIOR_OUTPUTS["update"]})
            if prior != "mean":
                precision = dict(prior_precision=inputs["prior_precision"])
                acc = run_prior_op(cpp, "accumulate", state, precision, count=2, offset=1)
                smp = run_prior_op(cpp, "sample", state, precision, offset=1)
                priors.update({f"{prior}_avg_hess_term": acc["avg_hess_term"],
                               f"{prior}_sample": smp["param"]})
        results[isa] = {**st, **{f"scaled_{k}": v for k, v in scaled.items()},
                        **{f"skipped_{k}": v for k, v in skipped.items()}, **priors}
    assert "generic" in results
    for isa, st in results.items():
        for key in ("mean", "momentum", "hess", "param"):
            for prefix in ("", "scaled_", "skipped_"):
                assert torch.equal(st[prefix + key], results["generic"][prefix + key]), (isa, key)
        for key in (k for k in st if k.startswith(("mean_", "precision_", "both_"))):
            assert torch.equal(st[key], results["generic"][key]), (isa, key)


def test_input_validation():
    st = _state(8, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="hess has 7 elements"):
        cpp.sample(st["param"], st["mean"], st["hess"][:7], ess=1.0, weight_decay=0.0)
    with pytest.raises(RuntimeError, match="mean must be contiguous"):
        cpp.sample(torch.zeros(4), st["mean"][::2], st["hess"][:4], ess=1.0, weight_decay=0.0)
    with pytest.raises(RuntimeError, match=r"momentum must be float32 or bfloat16 \(the state "
                                           r"dtype\), got Double"):
        _run_update(cpp, dict(st, momentum=st["momentum"].double()), grad=True, count=1,
                    hess_approx="price", clip_radius=1.0, next_draw=None, offset=0)
    with pytest.raises(RuntimeError, match="avg_grad is required"):
        _run_update(cpp, dict(st, avg_grad=None), grad=False, count=2,
                    hess_approx="price", clip_radius=1.0, next_draw=None, offset=0)
    with pytest.raises(RuntimeError, match="hess_approx must be"):
        _run_update(cpp, st, grad=True, count=1, hess_approx="diag", clip_radius=1.0,
                    next_draw=None, offset=0)
    with pytest.raises(RuntimeError, match="param must be float32, bfloat16 or float16"):
        _run_update(cpp, dict(st, param=st["param"].double(), grad=st["grad"].double()),
                    grad=True, count=1, hess_approx="price", clip_radius=1.0, next_draw=None,
                    offset=0)


def test_cuda_kernels_registered():
    if os.environ.get("IVON_FAST_EXPECT_CUDA") != "1":
        pytest.skip("set IVON_FAST_EXPECT_CUDA=1 when the build must contain the CUDA kernels")
    for op in ("sample", "accumulate", "update"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ivon_fast::{op}", "CUDA")
    assert cpp.unavailable_reason("cuda") is None


def test_cpu_kernels_registered_with_schema():
    for op in ("sample", "accumulate", "update"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ivon_fast::{op}", "CPU")
    schema = str(torch.ops.ivon_fast.update.default._schema)
    assert "Tensor(a!) param" in schema and "Tensor(d!) hess" in schema and "int? next_draw" in schema
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


def test_torch_compile_matches_eager():
    n = 1003
    scalars = _scalars(0.02, debias=0.1)

    def step(st, draw):
        cpp.update(st["param"], st["grad"], st["mean"], st["momentum"], st["hess"], None, None,
                   seed=BIG_SEED, draw=draw, next_draw=draw + 1, offset=2, count=1,
                   hess_approx="price", scalars=scalars)
        cpp.sample(st["grad"].view(-1), st["mean"], st["hess"], seed=3, draw=EVAL_DRAW,
                   offset=2, ess=HYPER["ess"], weight_decay=HYPER["weight_decay"])
        return st["param"] * 2.0

    eager = _state(n, torch.float32, "cpu", seed=8)
    compiled = _clone(eager)
    out_eager = step(eager, 4)
    torch._dynamo.reset()
    out_compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(compiled, 4)
    torch.testing.assert_close(out_compiled, out_eager, rtol=0, atol=0)
    for key in ("param", "grad", "mean", "momentum", "hess"):
        assert torch.equal(compiled[key], eager[key]), key


def test_unavailable_reason():
    assert cpp.unavailable_reason("cpu") is None
    assert "meta" in cpp.unavailable_reason("meta")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offset", [0, 3])
def test_cuda_matches_cpu_kernels_bitwise(dtype, offset):
    """The CUDA and CPU kernels run the same ivon_math.h code without FMA contraction: same bits."""
    _skip_without_cuda("cuda")
    results = {}
    for device in ("cpu", "cuda"):
        st = _state(100_003, dtype, device, seed=9)
        _run_update(cpp, st, grad=True, count=3, hess_approx="price", clip_radius=0.02,
                    next_draw=EVAL_DRAW, offset=offset)
        cpp.accumulate(st["grad"], st["hess"], st["avg_grad"], st["avg_hess_term"], seed=1,
                       draw=2, offset=offset, count=2, ess=3.0, weight_decay=0.1,
                       hess_approx="price")
        results[device] = {k: v.cpu() for k, v in st.items()}
    for key in ("mean", "momentum", "hess", "param", "avg_grad", "avg_hess_term"):
        assert torch.equal(results["cuda"][key], results["cpu"][key]), key
