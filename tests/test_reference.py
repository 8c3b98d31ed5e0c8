"""The reference noise (Philox4x32-10 + Box-Muller) and the reference ops."""
import math

import pytest
import torch

from ivon_fast import reference
from ivon_fast.scalars import StepScalars

# Random123's known answers for Philox4x32-10: (counter, key) -> output
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    outputs = reference.philox4x32_10(*[torch.tensor([c]) for c in counter], *key)
    assert tuple(int(o.item()) for o in outputs) == expected


def test_noise_of_an_element_does_not_depend_on_the_segment_it_is_drawn_in():
    whole = reference.philox_normal(99, 5, 0, 1003)
    for start, stop in [(0, 1), (1, 4), (3, 10), (5, 1003), (1001, 1003)]:
        assert torch.equal(reference.philox_normal(99, 5, start, stop - start), whole[start:stop])


def test_noise_uses_all_four_outputs_of_one_philox_call():
    x0, x1, x2, x3 = reference.philox4x32_10(torch.tensor([1]), torch.tensor([0]),
                                              torch.tensor([3]), torch.tensor([0]), 11, 0)
    u = [reference._uint32_to_uniform(x) for x in (x0, x1, x2, x3)]
    radius01 = math.sqrt(-2 * math.log(max(u[0].item(), 1e-7)))
    radius23 = math.sqrt(-2 * math.log(max(u[2].item(), 1e-7)))
    expected = [radius01 * math.cos(2 * math.pi * u[1].item()),
                radius01 * math.sin(2 * math.pi * u[1].item()),
                radius23 * math.cos(2 * math.pi * u[3].item()),
                radius23 * math.sin(2 * math.pi * u[3].item())]
    got = reference.philox_normal(11, 3, 4, 4)  # global indices 4..7 are quad 1
    assert torch.allclose(got.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5)


def test_noise_statistics():
    n = 1 << 20
    eps = reference.philox_normal(2024, 0, 0, n).double()
    assert abs(eps.mean().item()) < 5 / math.sqrt(n)
    assert abs(eps.var().item() - 1) < 5 * math.sqrt(2 / n)
    fourth = (eps ** 4).mean().item()  # normal kurtosis is 3
    assert abs(fourth - 3) < 0.05
    for lag in (1, 2, 3, 4):  # neighbours share a Philox call: they must still be uncorrelated
        corr = torch.corrcoef(torch.stack((eps[:-lag], eps[lag:])))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(n), lag
    next_draw = reference.philox_normal(2024, 1, 0, n).double()
    assert abs(torch.corrcoef(torch.stack((eps, next_draw)))[0, 1].item()) < 5 / math.sqrt(n)
    other_seed = reference.philox_normal(2025, 0, 0, n).double()
    assert abs(torch.corrcoef(torch.stack((eps, other_seed)))[0, 1].item()) < 5 / math.sqrt(n)
    evaluation = reference.philox_normal(2024, reference.EVAL_DRAW_BASE, 0, n).double()
    assert abs(torch.corrcoef(torch.stack((eps, evaluation)))[0, 1].item()) < 5 / math.sqrt(n)


def test_noise_accepts_64_bit_seeds_and_draws():
    seed, draw = 2**64 - 1, reference.EVAL_DRAW_BASE + 12345
    eps = reference.philox_normal(seed, draw, 2**40, 4)
    words = reference.philox4x32_10(torch.tensor([0]), torch.tensor([2**38 >> 32]),
                                    torch.tensor([draw & 0xFFFFFFFF]), torch.tensor([draw >> 32]),
                                    0xFFFFFFFF, 0xFFFFFFFF)
    u0, u1 = (reference._uint32_to_uniform(w).item() for w in words[:2])
    expected0 = math.sqrt(-2 * math.log(max(u0, 1e-7))) * math.cos(2 * math.pi * u1)
    assert abs(eps[0].item() - expected0) < 1e-5


def _update_inputs(dtype, n=257, seed=0):
    generator = torch.Generator().manual_seed(seed)
    make = lambda scale=1.0: (torch.randn(n, generator=generator) * scale).to(dtype)  # noqa: E731
    return dict(param=torch.empty(n, dtype=dtype), grad=make(), mean=make(),
                momentum=make(0.1), hess=make(0.1).abs() + 0.5)


def test_update_in_float64_matches_the_formula_written_out():
    """The update of docs/DESIGN.md section 2 written independently, in float64."""
    inputs = _update_inputs(torch.float64)
    mean0, mom0, hess0, grad = (inputs[k].clone() for k in ("mean", "momentum", "hess", "grad"))
    lr, ess, wd, b1, b2, radius, step = 0.1, 500.0, 1e-3, 0.9, 0.999, 0.02, 3
    eps = reference.philox_normal(5, 9, 17, 257).double()
    scalars = StepScalars.of(lr=lr, ess=ess, weight_decay=wd, beta1=b1, beta2=b2,
                             clip_radius=radius, debias=1 - b1 ** step)
    reference.update(inputs["param"], inputs["grad"], inputs["mean"], inputs["momentum"],
                     inputs["hess"], None, None, seed=5, draw=9, next_draw=None, offset=17,
                     count=1, hess_approx="price", scalars=scalars)
    noise = eps / torch.sqrt(ess * (hess0 + wd))
    g = b1 * mom0 + (1 - b1) * grad
    f = noise * grad * (hess0 + wd) * ess
    h = b2 * hess0 + (1 - b2) * f + 0.5 * (1 - b2) ** 2 * (hess0 - f) ** 2 / (hess0 + wd)
    m = mean0 - lr * torch.clamp((g / (1 - b1 ** step) + wd * mean0) / (h + wd), -radius, radius)
    torch.testing.assert_close(inputs["momentum"], g, rtol=1e-12, atol=0)
    torch.testing.assert_close(inputs["hess"], h, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(inputs["mean"], m, rtol=1e-12, atol=1e-15)
    assert torch.equal(inputs["param"], inputs["mean"])


def test_update_with_next_draw_writes_the_sample_of_the_new_state():
    inputs = _update_inputs(torch.float32)
    kwargs = dict(seed=3, offset=2, hess_approx="gradsq",
                  scalars=StepScalars.of(lr=0.01, ess=100.0, weight_decay=1e-4, beta1=0.9,
                                         beta2=0.99, debias=0.1))
    reference.update(inputs["param"], inputs["grad"], inputs["mean"], inputs["momentum"],
                     inputs["hess"], None, None, draw=0, next_draw=1, count=1, **kwargs)
    sigma = 1 / torch.sqrt(100.0 * (inputs["hess"] + 1e-4))
    expected = inputs["mean"] + reference.philox_normal(3, 1, 2, 257) * sigma
    torch.testing.assert_close(inputs["param"], expected, rtol=1e-6, atol=1e-6)


def test_accumulate_then_update_equals_averaging_by_hand():
    n, dtype = 101, torch.float64
    grads = [torch.randn(n, dtype=dtype) for _ in range(3)]
    hess = torch.rand(n, dtype=dtype) + 0.1
    avg_grad, avg_term = torch.zeros(n, dtype=dtype), torch.zeros(n, dtype=dtype)
    common = dict(seed=1, offset=3, ess=10.0, weight_decay=0.01, hess_approx="price")
    for count, (draw, grad) in enumerate(zip((4, 5), grads[:2]), start=1):
        reference.accumulate(grad, hess, avg_grad, avg_term, draw=draw, count=count, **common)
    noises = [reference.philox_normal(1, d, 3, n).double() / torch.sqrt(10.0 * (hess + 0.01))
              for d in (4, 5, 6)]
    torch.testing.assert_close(avg_grad, (grads[0] + grads[1]) / 2)
    torch.testing.assert_close(avg_term, (noises[0] * grads[0] + noises[1] * grads[1]) / 2)
    state = dict(param=torch.empty(n, dtype=dtype), mean=torch.zeros(n, dtype=dtype),
                 momentum=torch.zeros(n, dtype=dtype), hess=hess.clone())
    scalars = StepScalars.of(lr=1.0, ess=10.0, weight_decay=0.01, beta1=0.0, beta2=0.5)
    reference.update(state["param"], grads[2], state["mean"], state["momentum"], state["hess"],
                     avg_grad, avg_term, draw=6, next_draw=None, count=3, seed=1, offset=3,
                     hess_approx="price", scalars=scalars)
    torch.testing.assert_close(state["momentum"], sum(grads) / 3)
    # the third sample's noise * grad joins the average that drives the hess (price, beta2 0.5)
    nll_hess = sum(e * g for e, g in zip(noises, grads)) / 3 * (hess + 0.01) * 10.0
    expected_hess = 0.5 * hess + 0.5 * nll_hess + 0.125 * (hess - nll_hess) ** 2 / (hess + 0.01)
    torch.testing.assert_close(state["hess"], expected_hess)


# ---- update's device scalars: grad_scale, found_inf, device_lr, device_debias -----------------

_GRAD_MODES = [(True, 1), (True, 3), (False, 3)]  # (grad given, count)


def _device_scalar_inputs(dtype, hess_approx, n=301, seed=4):
    generator = torch.Generator().manual_seed(seed)
    make = lambda scale=1.0: (torch.randn(n, generator=generator) * scale).to(dtype)  # noqa: E731
    term = make(0.1)
    return dict(param=torch.empty(n, dtype=dtype), grad=make(), mean=make(),
                momentum=make(0.1), hess=make(0.1).abs() + 0.5, avg_grad=make(),
                avg_hess_term=term.abs() if hess_approx == "gradsq" else term)


def _reference_update(st, *, grad, count, hess_approx, next_draw=3, scalars=None, **device):
    st = {k: v.clone() for k, v in st.items()}
    scalars = scalars or StepScalars.of(lr=0.05, ess=30.0, weight_decay=1e-3, beta1=0.9,
                                        beta2=0.99, clip_radius=0.5, debias=0.19)
    reference.update(st["param"], st["grad"] if grad else None, st["mean"], st["momentum"],
                     st["hess"], st["avg_grad"], st["avg_hess_term"], seed=7, draw=2,
                     next_draw=next_draw, offset=5, count=count, hess_approx=hess_approx,
                     scalars=scalars, **device)
    return st


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
@pytest.mark.parametrize("grad,count", _GRAD_MODES)
def test_grad_scale_of_a_power_of_two_is_exact(dtype, hess_approx, grad, count):
    """Grads and averages multiplied by 2^k (the 'gradsq' average by 2^2k: it holds squares) and
    grad_scale = 2^k: bit for bit the update of the unscaled values."""
    plain = _device_scalar_inputs(dtype, hess_approx)
    scale = 2.0 ** 14
    scaled = dict(plain, grad=plain["grad"] * scale, avg_grad=plain["avg_grad"] * scale,
                  avg_hess_term=plain["avg_hess_term"] * (
                      scale ** 2 if hess_approx == "gradsq" else scale))
    kw = dict(grad=grad, count=count, hess_approx=hess_approx)
    want = _reference_update(plain, **kw)
    got = _reference_update(scaled, grad_scale=torch.tensor([scale], dtype=torch.float32), **kw)
    for key in ("mean", "momentum", "hess", "param"):
        assert torch.equal(got[key], want[key]), key
    # and the scale is not ignored
    ignored = _reference_update(scaled, **kw)
    assert not torch.equal(ignored["mean"], want["mean"])


@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
def test_grad_scale_divides_the_gradsq_average_twice(hess_approx):
    """With the averages only (grad=None) and a scale of 3, the hess term the update uses is
    avg / 3 (price) or avg / 3 / 3 (gradsq): the same update as the divided averages given."""
    st = _device_scalar_inputs(torch.float64, hess_approx)
    three = torch.tensor([3.0])
    got = _reference_update(st, grad=False, count=3, hess_approx=hess_approx, grad_scale=three)
    term = st["avg_hess_term"] / 3.0
    if hess_approx == "gradsq":
        term = term / 3.0
    want = _reference_update(dict(st, avg_grad=st["avg_grad"] / 3.0, avg_hess_term=term),
                             grad=False, count=3, hess_approx=hess_approx)
    for key in ("mean", "momentum", "hess", "param"):
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("found", [1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("next_draw", [None, 3])
@pytest.mark.parametrize("grad,count", _GRAD_MODES)
def test_found_inf_skips_the_step(found, next_draw, grad, count):
    st = _device_scalar_inputs(torch.float32, "price")
    st["grad"][::3] = float("inf")
    got = _reference_update(st, grad=grad, count=count, hess_approx="price",
                            next_draw=next_draw, found_inf=torch.tensor([found]))
    for key in ("mean", "momentum", "hess", "avg_grad", "avg_hess_term"):
        assert torch.equal(got[key], st[key]), key
    sample = torch.empty_like(st["param"])
    if next_draw is None:
        sample.copy_(st["mean"])
    else:
        reference.sample(sample, st["mean"], st["hess"], seed=7, draw=next_draw, offset=5,
                         ess=30.0, weight_decay=1e-3)
    assert torch.equal(got["param"], sample)


def test_found_inf_zero_takes_the_step():
    st = _device_scalar_inputs(torch.float32, "price")
    kw = dict(grad=True, count=3, hess_approx="price")
    got = _reference_update(st, found_inf=torch.tensor([0.0]), **kw)
    want = _reference_update(st, **kw)
    for key in ("mean", "momentum", "hess", "param"):
        assert torch.equal(got[key], want[key]), key
    assert not torch.equal(got["mean"], st["mean"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_device_lr_and_debias_equal_the_scalars(dtype):
    """Tensors in the state dtype holding lr and debias give the Python floats' bits."""
    st = _device_scalar_inputs(dtype, "price")
    kw = dict(grad=True, count=3, hess_approx="price")

    def scalars(lr, debias):
        return StepScalars.of(lr=lr, ess=30.0, weight_decay=1e-3, beta1=0.9, beta2=0.99,
                              clip_radius=0.5, debias=debias)

    base = scalars(0.05, 0.19)
    with_floats = _reference_update(st, scalars=scalars(0.3, 0.6), **kw)
    with_tensors = _reference_update(st, scalars=base, device_lr=torch.tensor([0.3], dtype=dtype),
                                     device_debias=torch.tensor([0.6], dtype=dtype), **kw)
    unchanged = _reference_update(st, scalars=base, **kw)
    for key in ("mean", "momentum", "hess", "param"):
        assert torch.equal(with_tensors[key], with_floats[key]), key
    assert not torch.equal(with_tensors["mean"], unchanged["mean"])


# ---- the per-element prior: prior_mean, prior_precision ----------------------------------------

def _prior_inputs(dtype, n, seed=40):
    generator = torch.Generator().manual_seed(seed)
    precision = torch.rand(n, generator=generator, dtype=torch.float64) * 0.6
    precision[::4] = 0.0  # no pull at all for some elements
    return dict(prior_mean=torch.randn(n, generator=generator, dtype=torch.float64).to(dtype),
                prior_precision=precision.to(dtype))


@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
def test_prior_ops_in_float64_match_one_element_computed_by_hand(hess_approx):
    """sample, accumulate and update with both prior inputs, against the formulas of the op
    contract written out for each element in Python floats (doubles): delta_i in place of the
    weight decay everywhere, delta_i (m - mu0_i) in the step."""
    n, offset, seed = 7, 5, 21
    lr, ess, wd, b1, b2, radius, debias = 0.1, 40.0, 1e-3, 0.9, 0.99, 0.3, 0.19
    st = _update_inputs(torch.float64, n=n, seed=8)
    avg_grad = torch.randn(n, dtype=torch.float64)
    avg_term = 0.1 * torch.randn(n, dtype=torch.float64)
    prior = _prior_inputs(torch.float64, n)
    sampled = torch.empty(n, dtype=torch.float64)
    reference.sample(sampled, st["mean"], st["hess"], seed=seed, draw=2, offset=offset, ess=ess,
                     weight_decay=wd, prior_precision=prior["prior_precision"])
    accumulated = [avg_grad.clone(), avg_term.clone()]
    reference.accumulate(st["grad"], st["hess"], *accumulated, seed=seed, draw=3, offset=offset,
                         count=2, ess=ess, weight_decay=wd, hess_approx=hess_approx,
                         prior_precision=prior["prior_precision"])
    after = {k: v.clone() for k, v in st.items()}
    scalars = StepScalars.of(lr=lr, ess=ess, weight_decay=wd, beta1=b1, beta2=b2,
                             clip_radius=radius, debias=debias)
    reference.update(after["param"], after["grad"], after["mean"], after["momentum"],
                     after["hess"], None, None, seed=seed, draw=3, next_draw=4, offset=offset,
                     count=1, hess_approx=hess_approx, scalars=scalars, **prior)
    eps = {d: reference.philox_normal(seed, d, offset, n).tolist() for d in (2, 3, 4)}
    for k in range(n):
        m, g0, h, gr = (st[key][k].item() for key in ("mean", "momentum", "hess", "grad"))
        mu, d = prior["prior_mean"][k].item(), prior["prior_precision"][k].item()
        # sample: m + eps / sqrt(ess (h + d))
        assert math.isclose(sampled[k].item(), m + eps[2][k] / math.sqrt(ess * (h + d)),
                            rel_tol=1e-12, abs_tol=1e-15)
        # accumulate, second sample: avg + (new - avg) / 2
        noise = eps[3][k] / math.sqrt(ess * (h + d))
        term = noise * gr if hess_approx == "price" else gr * gr
        for got, avg, new in ((accumulated[0], avg_grad, gr), (accumulated[1], avg_term, term)):
            assert math.isclose(got[k].item(), avg[k].item() + (new - avg[k].item()) / 2,
                                rel_tol=1e-12, abs_tol=1e-15)
        # update (count 1, the grad's own sample noise), then the sample of draw 4
        f = term * (h + d) * ess if hess_approx == "price" else term * ess
        g = b1 * g0 + (1 - b1) * gr
        h_new = b2 * h + (1 - b2) * f + 0.5 * (1 - b2) ** 2 * (h - f) ** 2 / (h + d)
        step = min(max((g / debias + d * (m - mu)) / (h_new + d), -radius), radius)
        m_new = m - lr * step
        for key, want in (("momentum", g), ("hess", h_new), ("mean", m_new),
                          ("param", m_new + eps[4][k] / math.sqrt(ess * (h_new + d)))):
            assert math.isclose(after[key][k].item(), want, rel_tol=1e-12, abs_tol=1e-15), key


def _todays_update(st, grad, count, hess_approx, s, next_draw, seed, draw, offset):
    """The update as the reference wrote it before the prior inputs existed (ivon-opt's
    arithmetic), for the check that None / None still computes it bit for bit."""
    mean, momentum, hess = st["mean"], st["momentum"], st["hess"]
    noise = reference.philox_normal(seed, draw, offset, mean.numel()).to(mean.dtype) / (
        s.ess * (hess + s.weight_decay)).sqrt()
    new_term = noise * grad if hess_approx == "price" else grad.square()
    grad_mean = grad if count == 1 else st["avg_grad"] + (grad - st["avg_grad"]) / count
    hess_term = new_term if count == 1 else (st["avg_hess_term"]
                                             + (new_term - st["avg_hess_term"]) / count)
    new_momentum = s.beta1 * momentum + s.one_minus_beta1 * grad_mean
    if hess_approx == "price":
        nll_hess = (hess_term * (hess + s.weight_decay)) * s.ess
    else:
        nll_hess = hess_term * s.ess
    new_hess = (s.beta2 * hess + s.one_minus_beta2 * nll_hess
                + s.hess_coef * (hess - nll_hess).square() / (hess + s.weight_decay))
    new_mean = mean - s.lr * torch.clip(
        (new_momentum / s.debias + s.weight_decay * mean) / (new_hess + s.weight_decay),
        min=-s.clip_radius, max=s.clip_radius)
    eps = reference.philox_normal(seed, next_draw, offset, mean.numel()).to(mean.dtype)
    return dict(momentum=new_momentum, hess=new_hess, mean=new_mean,
                param=new_mean + eps / (s.ess * (new_hess + s.weight_decay)).sqrt())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
@pytest.mark.parametrize("count", [1, 3])
def test_without_priors_the_update_is_todays_bit_for_bit(dtype, hess_approx, count):
    st = _device_scalar_inputs(dtype, hess_approx)
    scalars = StepScalars.of(lr=0.05, ess=30.0, weight_decay=1e-3, beta1=0.9, beta2=0.99,
                             clip_radius=0.5, debias=0.19)
    want = _todays_update(st, st["grad"], count, hess_approx, scalars, 3, 7, 2, 5)
    for priors in ({}, dict(prior_mean=None, prior_precision=None)):
        got = _reference_update(st, grad=True, count=count, hess_approx=hess_approx,
                                scalars=scalars, **priors)
        for key in ("mean", "momentum", "hess", "param"):
            assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
@pytest.mark.parametrize("grad,count", _GRAD_MODES)
def test_a_neutral_prior_is_the_weight_decay_bit_for_bit(dtype, hess_approx, grad, count):
    """Precision = weight_decay everywhere and mean 0 give the bits of no prior at all: the
    tensor enters the expressions exactly where the scalar did."""
    st = _device_scalar_inputs(dtype, hess_approx)
    wd = 1e-3
    neutral = dict(prior_mean=torch.zeros(301, dtype=dtype),
                   prior_precision=torch.full((301,), wd, dtype=dtype))
    kw = dict(grad=grad, count=count, hess_approx=hess_approx)
    got = _reference_update(st, **kw, **neutral)
    want = _reference_update(st, **kw)
    for key in ("mean", "momentum", "hess", "param"):
        assert torch.equal(got[key], want[key]), key
    sampled, plain = torch.empty(301, dtype=dtype), torch.empty(301, dtype=dtype)
    reference.sample(sampled, st["mean"], st["hess"], seed=1, draw=2, ess=30.0, weight_decay=wd,
                     prior_precision=neutral["prior_precision"])
    reference.sample(plain, st["mean"], st["hess"], seed=1, draw=2, ess=30.0, weight_decay=wd)
    assert torch.equal(sampled, plain)


@pytest.mark.parametrize("name", ["prior_mean", "prior_precision"])
@pytest.mark.parametrize("grad,count", _GRAD_MODES)
def test_each_prior_input_moves_the_update(name, grad, count):
    """Each input alone changes the step (and the precision the noise and hess): neither is
    dropped by any mode."""
    st = _device_scalar_inputs(torch.float64, "price")
    prior = _prior_inputs(torch.float64, 301)
    kw = dict(grad=grad, count=count, hess_approx="price")
    got = _reference_update(st, **kw, **{name: prior[name]})
    want = _reference_update(st, **kw)
    assert (got["mean"] - want["mean"]).abs().max() > 1e-4
    if name == "prior_precision":
        assert (got["hess"] - want["hess"]).abs().max() > 1e-6
    else:  # the mean's pull changes neither the hess nor the noise
        assert torch.equal(got["hess"], want["hess"])

