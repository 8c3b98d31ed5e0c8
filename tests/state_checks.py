"""Checks of bf16 momentum / hess state (docs/DESIGN.md section 16) shared by the kernel suite
(tests/test_kernels*.py).

Every function takes the backend module, the device and, where it compares with the reference,
the test file's ``assert_close(actual, expected, dtype)`` (its per-dtype tolerance for the mean
and the param). The expectations come from ``ivon_fast.reference``, which is the spec, or from the
definition of stochastic rounding itself (``check_rounding_is_unbiased``).

How bf16 state is compared: the fp32 values a kernel rounds may differ from the reference's by
an fp32 ulp (the noise's transcendental functions), and such a difference changes the stochastic
rounding only when the random bits sit at the boundary (about 2^-16 per fp32 ulp). So momentum
and hess must be within one bf16 ulp everywhere and equal on at least 99% of the elements; a
wrong stream of random bits (another draw, the halves swapped, round to nearest) differs on
about a third of the values that are not bf16 values, which the suite confirms it can see
(test_kernels_state.py's test_the_bf16_state_comparison_sees_wrong_rounding_bits).
"""
from __future__ import annotations

import torch

from ivon_fast import reference

from kernel_checks import PRIOR_DRAW, device_draws, one, prior_state, run_prior_op

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
