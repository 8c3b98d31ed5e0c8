"""Low-precision values on every kernel backend: bf16 momentum / hess state (docs/DESIGN.md
section 16; the checks are in tests/state_checks.py) and the rounding of bf16 / fp16 params.

Part of the kernel suite (tests/test_kernels.py says how it is organized; the comparisons of bf16
state with the reference for every update instance are its test_update_every_instance, whose
table crosses every instance flag with the state dtype). Here: the properties every backend, the
reference included, must have. The long grids: ``--nightly`` (see tests/test_kernels.py).
"""
import pytest
import torch

from ivon_fast import reference

import kernel_cases as kc
from covering import cover, label
from kernel_backends import ALL
from kernel_cases import EVAL_DRAW, assert_close, same_bits
from kernel_checks import (PRIOR_SEED, assert_low_precision_rounding, prior_inputs, prior_state,
                           run_prior_op)
from state_checks import (OFFSET, ROUND_DRAW, _ordered, assert_bits_matter, bf16_state,
                          check_device_draws, check_float32_state_ignores_round_draw,
                          check_rounding_is_unbiased, widened)

# the interpreter's numpy warns about skipped steps' NaN arithmetic and the probes' overflows
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")

WIDENED_ROWS = cover({"ptype": kc.PARAM_TYPES, "hess_approx": ["price", "gradsq"],
                      "prior_precision": [False, True], "count": [1, 2]})


@pytest.mark.parametrize("backend", ALL)
def test_bf16_hess_is_read_widened(backend):
    """sample and accumulate read bf16 hess widened to fp32 (exactly): the bits of the same op
    with the fp32 copy of the same values; the hess is never written."""
    device = backend.device
    for row in WIDENED_ROWS:
        n = 37
        state = bf16_state(prior_state(n, kc.DTYPES[row["ptype"]], device, row["hess_approx"]))
        priors = prior_inputs("precision" if row["prior_precision"] else None, n, device)
        for op, outputs, kw in (
                ("sample", ("param",), dict(offset=OFFSET)),
                ("accumulate", ("avg_grad", "avg_hess_term"),
                 dict(hess_approx=row["hess_approx"], count=row["count"], offset=OFFSET))):
            got = run_prior_op(backend.module, op, state, priors, **kw)
            same_values = run_prior_op(backend.module, op, widened(state), priors, **kw)
            for key in outputs:
                assert same_bits(got[key], same_values[key]), (label(row), op, key)
            assert same_bits(got["hess"], state["hess"]), (label(row), op)


DEVICE_DRAW_ROWS = cover({"found": [0.0, 1.0], "next_draw": [None, 7],
                          "round_draw": [21, EVAL_DRAW]})


@pytest.mark.parametrize("backend", ALL)
def test_bf16_state_rounds_with_the_device_draw(backend):
    """With device_draws, device_draws[1] is bf16 state's rounding index (with or without a
    next sample; EVAL_DRAW: the sum with 2^62 wraps as an int64 sum does) and the host's
    round_draw is ignored: the reference's update with that index on the host (for the
    reference itself: its host path); a skipped step keeps every state tensor."""
    for row in DEVICE_DRAW_ROWS:
        try:
            check_device_draws(backend.module, backend.device, torch.bfloat16, assert_close,
                               **row)
        except AssertionError as error:
            raise AssertionError(f"{label(row)}: {error}") from error


@pytest.mark.parametrize("backend", ALL)
def test_bf16_state_rounding_is_unbiased(backend):
    """Over 16 rounding indices an element between two bf16 values rounds up with probability
    low16 / 2^16 (within 5 binomial standard deviations, also for p < 1/2 and p >= 1/2 apart,
    which round to nearest fails)."""
    check_rounding_is_unbiased(backend.module, backend.device)


@pytest.mark.parametrize("backend", ALL)
def test_float32_state_ignores_round_draw(backend):
    """fp32 momentum / hess: round_draw (and, without a next sample, device_draws[1]) changes
    no bit of any output."""
    check_float32_state_ignores_round_draw(backend.module, backend.device, torch.bfloat16)


def test_the_bf16_state_comparison_sees_wrong_rounding_bits():
    """The suite's comparison of bf16 state (one ulp everywhere, equal on 99%) can tell the
    reference's rounding from wrong ones: the bits of the next rounding index, the halves of
    the bits swapped, round to nearest each differ on over 10% of the elements; and the
    update moved momentum and hess beyond a rounding."""
    n = 4097
    for hess_approx in ("price", "gradsq"):
        state = bf16_state(prior_state(n, torch.float32, "cpu", hess_approx))
        kw = dict(offset=OFFSET, count=3, next_draw=7, hess_approx=hess_approx)
        want = run_prior_op(reference, "update", state, {}, round_draw=ROUND_DRAW, **kw)
        exact = run_prior_op(reference, "update", widened(state), {}, **kw)
        rounding = reference.rounding_bits(PRIOR_SEED, ROUND_DRAW, OFFSET, n)
        following = reference.rounding_bits(PRIOR_SEED, ROUND_DRAW + 1, OFFSET, n)
        for key, right, swapped in (("momentum", rounding & 0xFFFF, rounding >> 16),
                                    ("hess", rounding >> 16, rounding & 0xFFFF)):
            moved = (_ordered(want[key]) - _ordered(state[key])).abs().gt(1)
            assert moved.float().mean() > 0.5, key
            assert torch.equal(reference.stochastic_round_bf16(exact[key], right), want[key])
            for wrong in (swapped, following & 0xFFFF, following >> 16):
                assert_bits_matter(want[key], reference.stochastic_round_bf16(exact[key], wrong),
                                   key)
            assert_bits_matter(want[key], exact[key].to(torch.bfloat16), key)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("op", ["sample", "update"])
def test_low_precision_stores_round_to_nearest_even(backend, op, rounding_probe):
    """A bf16 / fp16 param receives exactly torch's rounding (to nearest, ties to even) of the
    fp32 value the same kernel writes into an fp32 param: halfway cases, fp16 subnormals,
    overflow edges, inf and NaN. (The comparison with the reference cannot show this: there a
    one-ulp tolerance absorbs fp32 ulps of the noise.)"""
    for dtype in (torch.bfloat16, torch.float16):
        assert_low_precision_rounding(backend.module, backend.device, dtype, op,
                                      rounding_probe.to(backend.device))
