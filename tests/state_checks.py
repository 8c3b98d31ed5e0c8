"""Checks of bf16 momentum / hess state (docs/DESIGN.md section 16) shared by the kernel backends'
tests (test_triton; test_cpp can call them the same way).

Every function takes the backend module, the device and, where it compares with the reference,
the test file's ``assert_close(actual, expected, dtype)`` (its per-dtype tolerance for the mean
and the param). The expectations come from ``ivon_fast.reference``, which is the spec, or from the
definition of stochastic rounding itself (``check_rounding_is_unbiased``).

How bf16 state is compared: the fp32 values a kernel rounds may differ from the reference's by
an fp32 ulp (the noise's transcendental functions), and such a difference changes the stochastic
rounding only when the random bits sit at the boundary (about 2^-16 per fp32 ulp). So momentum
and hess must be within one bf16 ulp everywhere and equal on at least 99% of the elements; a
wrong stream of random bits (another draw, the halves swapped, round to nearest) differs on
about a third of the values that are not bf16 values, which each check confirms it can see.
"""
from __future__ import annotations

import torch

from ivon_fast import reference

from kernel_checks import (PRIOR_DRAW, PRIOR_SEED, device_draws, one, prior_inputs,
                           prior_state, run_prior_op)

BF16 = torch.bfloat16
STATE_KEYS = ("mean", "momentum", "hess", "avg_grad", "avg_hess_term")
ROUND_DRAW = 13  # the update's rounding index in these checks: neither its draw nor next draw
OFFSET = 4099    # not a multiple of 4: the segment starts mid-quad


def bf16_state(state):
    """A copy of a ``prior_state`` with momentum and hess in bf16 (rounded to nearest)."""
    state = dict(state)
    state["momentum"], state["hess"] = state["momentum"].to(BF16), state["hess"].to(BF16)
    return state


def widened(state):
    """A copy with momentum and hess widened to fp32 (exact): the same values, fp32 state."""
    state = dict(state)
    state["momentum"], state["hess"] = state["momentum"].float(), state["hess"].float()
    return state


def _ordered(values: torch.Tensor) -> torch.Tensor:
    """bf16 values as integers in value order, one apart for neighbours (+0 and -0 both 0)."""
    raw = values.view(torch.int16).to(torch.int32)
    magnitude = raw & 0x7FFF
    return torch.where(raw < 0, -magnitude, magnitude)


def assert_rounded_alike(got: torch.Tensor, want: torch.Tensor, name: str) -> torch.Tensor:
    """bf16 ``got`` within one ulp of ``want`` everywhere and equal on >= 99% of the elements;
    returns where they are equal."""
    assert got.dtype == want.dtype == BF16, (name, got.dtype, want.dtype)
    got, want = got.cpu(), want.cpu()
    apart = (_ordered(got) - _ordered(want)).abs()
    assert apart.max().item() <= 1, f"{name}: {apart.max().item()} bf16 ulps apart"
    equal = apart == 0
    assert equal.float().mean().item() >= 0.99, (
        f"{name}: only {equal.float().mean().item():.4f} of the elements equal")
    return equal


def assert_bits_matter(want: torch.Tensor, other: torch.Tensor, name: str) -> None:
    """The same values rounded with other bits differ on over 10% of the elements: the 99%
    criterion of ``assert_rounded_alike`` can tell the right bits from wrong ones."""
    differ = (want.cpu().view(torch.int16) != other.cpu().view(torch.int16)).float().mean()
    assert differ.item() > 0.1, f"{name}: other bits change only {differ.item():.4f}"


def _compare(got, want, assert_close, param_dtype):
    """Mean within fp32's tolerance, momentum and hess rounded alike, the param within its
    dtype's tolerance where the stored hess (which the next sample is drawn around) agrees."""
    assert_close(got["mean"], want["mean"], torch.float32)
    assert_rounded_alike(got["momentum"], want["momentum"], "momentum")
    same_hess = assert_rounded_alike(got["hess"], want["hess"], "hess").to(got["param"].device)
    assert_close(got["param"][same_hess].float(), want["param"][same_hess].float(), param_dtype)


def check_update_against_reference(backend, device, dtype, assert_close, *, prior=None,
                                   n=4097, offset=OFFSET, **kw):
    """``backend.update`` with bf16 state against the reference with the same ``round_draw``
    (``kw``: hess_approx, grad, count, next_draw as ``run_prior_op`` takes them; ``prior``: a key
    of kernel_checks.PRIORS or None). Also: momentum and hess moved, and the wrong roundings of
    the same fp32 values (the bits of the next round_draw, the halves of the bits swapped,
    round to nearest) would have been seen."""
    state = bf16_state(prior_state(n, dtype, device, kw.get("hess_approx", "price")))
    priors = prior_inputs(prior, n, device)
    got = run_prior_op(backend, "update", state, priors, offset=offset, round_draw=ROUND_DRAW,
                       **kw)
    want = run_prior_op(reference, "update", state, priors, offset=offset,
                        round_draw=ROUND_DRAW, **kw)
    for key in ("momentum", "hess"):
        assert got[key].dtype == BF16, key
    _compare(got, want, assert_close, dtype)
    if n < 100:  # too few elements for the fractions below
        return got
    for key in ("momentum", "hess"):  # the update changed them beyond a rounding
        assert (_ordered(want[key]) - _ordered(state[key])).abs().gt(1).float().mean() > 0.5, key
    # the unrounded fp32 values (fp32 state holding the same values) and the element's bits
    exact = run_prior_op(reference, "update", widened(state), priors, offset=offset, **kw)
    bits = reference.rounding_bits(PRIOR_SEED, ROUND_DRAW, offset, n, device)
    next_bits = reference.rounding_bits(PRIOR_SEED, ROUND_DRAW + 1, offset, n, device)
    for key, right, swapped in (("momentum", bits & 0xFFFF, bits >> 16),
                                ("hess", bits >> 16, bits & 0xFFFF)):
        assert torch.equal(reference.stochastic_round_bf16(exact[key], right), want[key]), key
        for wrong in (swapped, next_bits & 0xFFFF, next_bits >> 16):
            assert_bits_matter(want[key], reference.stochastic_round_bf16(exact[key], wrong), key)
        assert_bits_matter(want[key], exact[key].to(BF16), key)  # round to nearest
    return got


def check_sample_and_accumulate(backend, device, dtype, assert_close, *, prior_precision=False,
                                hess_approx="price", count=2, n=4097, offset=OFFSET):
    """sample and accumulate read bf16 hess widened: the backend's own result with the fp32
    copy of the same values, bit for bit, and the reference's within tolerance."""
    state = bf16_state(prior_state(n, dtype, device, hess_approx))
    priors = prior_inputs("precision" if prior_precision else None, n, device)
    for op, outputs, op_kw in (
            ("sample", ("param",), dict(offset=offset)),
            ("accumulate", ("avg_grad", "avg_hess_term"),
             dict(hess_approx=hess_approx, count=count, offset=offset))):
        got = run_prior_op(backend, op, state, priors, **op_kw)
        same_values = run_prior_op(backend, op, widened(state), priors, **op_kw)
        want = run_prior_op(reference, op, state, priors, **op_kw)
        for key in outputs:
            assert torch.equal(got[key], same_values[key]), (op, key)
            assert_close(got[key].float(), want[key].float(),
                         got[key].dtype if key == "param" else torch.float32)
        assert torch.equal(got["hess"], state["hess"])  # read, never written


def check_device_draws(backend, device, dtype, assert_close, *, found, next_draw, round_draw,
                       n=4097, offset=OFFSET):
    """With ``device_draws`` = [PRIOR_DRAW, round_draw] the rounding index is
    device_draws[1] (with or without a next sample) and the host's ``round_draw`` is ignored:
    the reference's update with that index given on the host. With grad_scale; a skipped step
    (``found``) keeps mean, momentum, hess and the averages bit for bit."""
    state = bf16_state(prior_state(n, dtype, device))
    dev = dict(grad_scale=one(3.0, device), found_inf=one(found, device))
    kw = dict(count=3, offset=offset)
    on_device = device_draws([PRIOR_DRAW, round_draw], device)
    got = run_prior_op(backend, "update", state, {}, next_draw=next_draw, round_draw=999,
                       device_draws=on_device, **dev, **kw)
    want = run_prior_op(reference, "update", state, {},
                        next_draw=None if next_draw is None else round_draw,
                        round_draw=round_draw, **dev, **kw)
    _compare(got, want, assert_close, dtype)
    if found:
        for key in STATE_KEYS:
            assert torch.equal(got[key], state[key]), key
        return
    host = run_prior_op(reference, "update", state, {},
                        next_draw=None if next_draw is None else round_draw, round_draw=999,
                        **dev, **kw)
    assert_bits_matter(want["hess"], host["hess"], "hess")  # the host's 999 would be seen


def check_rounding_is_unbiased(backend, device, *, draws=16, n=4097, offset=OFFSET):
    """The kernel's rounding is unbiased: over ``draws`` rounding indices, an element whose fp32
    value x lies between the bf16 neighbours down and up (|down| < |x| < |up|) is stored as
    up with probability p = low16(bits(x)) / 2^16 and as down otherwise. The fp32 values are the
    backend's own fp32-state update of the same (bf16-exact) values; the count of ups must
    match draws * sum(p) within 5 binomial standard deviations, over all elements and separately
    for p < 1/2 and p >= 1/2 (round to nearest would be unbiased over both together)."""
    state = bf16_state(prior_state(n, torch.float32, device, seed=40))
    exact = run_prior_op(backend, "update", widened(state), {}, offset=offset)
    ups = {key: torch.zeros(n, dtype=torch.float64) for key in ("momentum", "hess")}
    for round_draw in range(draws):
        got = run_prior_op(backend, "update", state, {}, offset=offset, round_draw=round_draw)
        for key in ups:
            raw = exact[key].cpu().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
            down = raw >> 16
            stored = got[key].cpu().view(torch.int16).to(torch.int64) & 0xFFFF
            assert bool(((stored == down) | (stored == down + 1)).all()), key
            ups[key] += (stored == down + 1).double()
    for key, count in ups.items():
        raw = exact[key].cpu().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        p = (raw & 0xFFFF).double() / 65536.0
        assert (p > 0).float().mean() > 0.99, key  # the values lie between bf16 neighbours
        for part in (p >= 0, p < 0.5, p >= 0.5):
            expected = draws * p[part].sum()
            spread = (draws * (p[part] * (1 - p[part])).sum()).sqrt()
            excess = (count[part].sum() - expected).abs()
            assert excess <= 5 * spread + 1, (key, excess.item(), spread.item())


def check_float32_state_ignores_round_draw(backend, device, dtype):
    """fp32 momentum / hess: ``round_draw`` (and, without a next sample, device_draws[1])
    changes no bit of any output."""
    n = 4097
    state = prior_state(n, dtype, device)
    for next_draw in (None, 7):
        a = run_prior_op(backend, "update", state, {}, next_draw=next_draw, round_draw=0)
        b = run_prior_op(backend, "update", state, {}, next_draw=next_draw, round_draw=12345)
        for key in ("param",) + STATE_KEYS:
            assert torch.equal(a[key], b[key]), (next_draw, key)
    a = run_prior_op(backend, "update", state, {}, device_draws=device_draws([PRIOR_DRAW, 3],
                                                                             device))
    b = run_prior_op(backend, "update", state, {}, device_draws=device_draws([PRIOR_DRAW, 4],
                                                                             device))
    for key in ("param",) + STATE_KEYS:
        assert torch.equal(a[key], b[key]), key


def check_rejects_mixed_state_dtypes(backend, device):
    """momentum and hess are both fp32 or both bf16; the mean and the averages stay fp32."""
    state = prior_state(8, torch.float32, device)
    cases = [dict(momentum=state["momentum"].to(BF16)), dict(hess=state["hess"].to(BF16)),
             dict(momentum=state["momentum"].half(), hess=state["hess"].half()),
             dict(mean=state["mean"].to(BF16), momentum=state["momentum"].to(BF16),
                  hess=state["hess"].to(BF16))]
    for case in cases:
        try:
            run_prior_op(backend, "update", {**state, **case}, {}, offset=0)
        except (TypeError, ValueError, RuntimeError):
            continue
        raise AssertionError(f"update accepted {({k: v.dtype for k, v in case.items()})}")
    for op in ("sample", "accumulate"):
        try:
            run_prior_op(backend, op, {**state, "hess": state["hess"].half()}, {}, offset=0)
        except (TypeError, ValueError, RuntimeError):
            continue
        raise AssertionError(f"{op} accepted an fp16 hess")

