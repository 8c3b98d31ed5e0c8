"""Priors (docs/DESIGN.md section 14): ``prior_mean`` (None, 'init', tensors) and a per-element
``prior_precision``, through the optimizer on every backend.

Expectations: a step computed by hand in float64 from the update's formulas with the noise
regenerated from the spec (``reference.philox_normal``); the params' values at construction;
``Posterior`` arithmetic by hand; the reference backend's trajectory for the kernel backends.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from ivon_fast import IVON, Posterior, backends, reference

ESS, H0, WD, LR, B1, B2 = 50.0, 0.5, 1e-2, 0.1, 0.9, 0.99
SEED = 77


class Quadratic(nn.Module):
    """L = 0.5 sum a (w - c)^2 over two params: the gradient a (w - c) is known by hand."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.w = nn.Parameter(torch.randn(7, generator=gen))
        self.v = nn.Parameter(torch.randn(2, 3, generator=gen))
        self.a = [torch.rand(7, generator=gen) + 0.5, torch.rand(2, 3, generator=gen) + 0.5]
        self.c = [torch.randn(7, generator=gen), torch.randn(2, 3, generator=gen)]

    def loss(self):
        return sum(0.5 * (a * (p - c) ** 2).sum()
                   for p, a, c in zip((self.w, self.v), self.a, self.c))


def train_quadratic(model, opt, steps, dropin, mc=2):
    """``steps`` steps on the quadratic: the drop-in loop, or the official one with ``mc``
    samples per step."""
    for _ in range(steps):
        if dropin:
            model.loss().backward()
            opt.step()
            opt.zero_grad()
        else:
            for _ in range(mc):
                with opt.sampled_params(train=True):
                    opt.zero_grad()
                    model.loss().backward()
            opt.step()


def _priors(kind, model):
    gen = torch.Generator().manual_seed(11)
    means = [torch.randn(p.shape, generator=gen) for p in model.parameters()]
    precisions = [torch.rand(p.shape, generator=gen) * 0.2 + 1e-3 for p in model.parameters()]
    return {"mean": dict(prior_mean=means), "precision": dict(prior_precision=precisions),
            "both": dict(prior_mean=means, prior_precision=precisions),
            "init": dict(prior_mean="init"),
            "init+precision": dict(prior_mean="init", prior_precision=precisions)}[kind]


def _optimizer(model, backend="reference", dropin=False, mc_samples=1, **priors):
    return IVON(model.parameters(), lr=LR, ess=ESS, hess_init=H0, beta1=B1, beta2=B2,
                weight_decay=WD, backend=backend, seed=SEED, resample_on_step=dropin,
                mc_samples=mc_samples, **priors)


def _by_hand(m0, prior_mu, delta, a, c, offset, draw, h0=H0):
    """One IVON step from mean m0 (momentum 0, hess h0), float64, 'price', one sample."""
    m0, prior_mu, a, c = (t.double().reshape(-1) for t in (m0, prior_mu, a, c))
    delta = (delta.double().reshape(-1) if isinstance(delta, torch.Tensor)
             else torch.full_like(m0, delta))
    eps = reference.philox_normal(SEED, draw, offset, m0.numel()).double()
    noise = eps / (ESS * (h0 + delta)).sqrt()
    grad = a * (m0 + noise - c)
    momentum = (1 - B1) * grad
    nll = (noise * grad * (h0 + delta)) * ESS
    hess = B2 * h0 + (1 - B2) * nll + 0.5 * (1 - B2) ** 2 * (h0 - nll) ** 2 / (h0 + delta)
    step = (momentum / (1 - B1) + delta * (m0 - prior_mu)) / (hess + delta)
    return m0 - LR * (H0 + WD) * step, hess


@pytest.mark.parametrize("kind", ["mean", "precision", "both", "init", "init+precision"])
@pytest.mark.parametrize("dropin", [False, True], ids=["official", "dropin"])
def test_one_step_by_hand(kind, dropin):
    model = Quadratic()
    init = [p.detach().clone() for p in model.parameters()]
    priors = _priors(kind, model)
    opt = _optimizer(model, dropin=dropin, **priors)
    if dropin:
        model.loss().backward()
        opt.step()
    else:
        with opt.sampled_params(train=True):
            model.loss().backward()
        opt.step()
    offset = 0
    for index, param in enumerate(model.parameters()):
        mu = priors.get("prior_mean", None)
        mu = init[index] if mu == "init" else (torch.zeros_like(param) if mu is None else mu[index])
        delta = priors["prior_precision"][index] if "prior_precision" in priors else WD
        mean, hess = _by_hand(init[index], mu, delta, model.a[index], model.c[index], offset, 0)
        state = opt.state[param]
        torch.testing.assert_close(state["mean"].double().reshape(-1), mean, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(state["hess"].double().reshape(-1), hess, rtol=2e-5, atol=1e-6)
        if dropin:  # the next sample, drawn around the new mean with the per-element delta
            eps = reference.philox_normal(SEED, 1, offset, param.numel()).double()
            sample = mean + eps / (ESS * (hess + (delta.double().reshape(-1)
                                                  if isinstance(delta, torch.Tensor)
                                                  else delta))).sqrt()
            torch.testing.assert_close(param.detach().double().reshape(-1), sample, rtol=2e-5,
                                       atol=1e-6)
        offset += param.numel()


def test_the_sample_uses_the_per_element_precision():
    model = Quadratic()
    precisions = _priors("precision", model)["prior_precision"]
    opt = _optimizer(model, prior_precision=precisions)
    offset = 0
    with opt.sampled_params(train=True):
        for param, delta in zip(model.parameters(), precisions):
            mean = opt.state[param]["mean"].double().reshape(-1)
            eps = reference.philox_normal(SEED, 0, offset, param.numel()).double()
            expected = mean + eps / (ESS * (H0 + delta.double().reshape(-1))).sqrt()
            torch.testing.assert_close(param.detach().double().reshape(-1), expected, rtol=1e-5,
                                       atol=1e-7)
            offset += param.numel()
        model.loss().backward()


def test_no_prior_is_bitwise_the_zero_mean_prior_of_weight_decay():
    """prior_mean = zeros and prior_precision = weight_decay everywhere is the default prior;
    the default itself reads neither."""
    runs = []
    for priors in ({}, {"prior_mean": "zeros", "prior_precision": "wd"}):
        model = Quadratic()
        if priors:
            priors = {"prior_mean": [torch.zeros_like(p) for p in model.parameters()],
                      "prior_precision": [torch.full_like(p, WD) for p in model.parameters()]}
        opt = _optimizer(model, dropin=True, **priors)
        for _ in range(3):
            model.loss().backward()
            opt.step()
            opt.zero_grad()
        runs.append([opt.state[p]["mean"].clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_init_prior_mean_pulls_toward_the_initial_values():
    """With a zero gradient the step is delta (m - mu) / (h + delta): 'init' keeps the mean where
    it started, the default prior decays it toward 0."""
    stays, decays = Quadratic(), Quadratic()
    start = [p.detach().clone() for p in stays.parameters()]
    opt_stays = _optimizer(stays, prior_mean="init", prior_precision=[
        torch.full_like(p, 1.0) for p in stays.parameters()])
    opt_decays = _optimizer(decays, prior_precision=[torch.full_like(p, 1.0)
                                                     for p in decays.parameters()])
    for opt in (opt_stays, opt_decays):
        for _ in range(5):
            opt.zero_grad()  # zero gradient: only the prior acts
            with opt.sampled_params(train=True):
                pass
            opt.step()
    for p, s in zip(stays.parameters(), start):
        torch.testing.assert_close(p.detach(), s, rtol=0, atol=1e-6)
    for p, s in zip(decays.parameters(), start):
        assert float(p.detach().abs().sum()) < 0.9 * float(s.abs().sum())


def test_posterior_std_uses_the_prior_precision_and_as_prior_round_trips():
    model = Quadratic()
    precisions = _priors("precision", model)["prior_precision"]
    opt = _optimizer(model, prior_precision=precisions)
    for _ in range(2):
        with opt.sampled_params(train=True):
            opt.zero_grad()
            model.loss().backward()
        opt.step()
    posterior = opt.posterior(model)
    for param, std, delta in zip(model.parameters(), posterior.std, precisions):
        expected = 1.0 / (ESS * (opt.state[param]["hess"].double() + delta.double())).sqrt()
        torch.testing.assert_close(std.double(), expected, rtol=1e-6, atol=0)
    prior = posterior.as_prior(ess=200.0)  # by name
    for name, mean, std in zip(posterior.names, posterior.mean, posterior.std):
        assert torch.equal(prior["prior_mean"][name], mean)
        torch.testing.assert_close(prior["prior_precision"][name].double(),
                                   1.0 / (200.0 * std.double() ** 2), rtol=1e-6, atol=0)
    # the next task starts from this posterior as its prior: at its first sample its noise
    # scale is 1 / sqrt(ess (h0 + delta)) with delta the old posterior's precision
    next_model = Quadratic()
    next_opt = IVON(next_model.named_parameters(), lr=LR, ess=200.0, hess_init=H0,
                    backend="reference", seed=SEED, **prior)
    start = next_opt.posterior()
    for std, precision in zip(start.std, prior["prior_precision"].values()):
        torch.testing.assert_close(std.double(), 1 / (200.0 * (H0 + precision.double())).sqrt(),
                                   rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="Invalid ess"):
        posterior.as_prior(ess=0)
    frozen = Posterior(mean=[torch.zeros(2)], std=[torch.tensor([1.0, 0.0])])
    with pytest.raises(ValueError, match="param 0 has a std <= 0"):
        frozen.as_prior(ess=1.0)


def test_constructor_lists_cover_the_groups_in_order_and_a_group_option_wins():
    model = Quadratic()
    means = [torch.full_like(p, 2.0) for p in model.parameters()]
    own = torch.full_like(model.v, -1.0)
    opt = IVON([{"params": [model.w]}, {"params": [model.v], "prior_mean": [own]}], lr=LR,
               ess=ESS, backend="reference", prior_mean=means[:1])
    assert torch.equal(opt.state[model.w]["prior_mean"], means[0])
    assert torch.equal(opt.state[model.v]["prior_mean"], own)
    assert [g["prior_mean"] for g in opt.param_groups] == ["given", "given"]
    opt.add_param_group({"params": [nn.Parameter(torch.ones(3))]})  # later groups: no prior
    assert opt.param_groups[2]["prior_mean"] is None
    assert "prior_mean" not in opt.state[opt.param_groups[2]["params"][0]]
    with pytest.raises(ValueError, match="Invalid prior_mean: 1 tensors for the 2 params"):
        IVON(model.parameters(), lr=LR, ess=ESS, prior_mean=means[:1])


@pytest.mark.parametrize("bad, match", [
    (dict(prior_mean="zeros"), "Invalid prior_mean: 'zeros'"),
    (dict(prior_precision="init"), "Invalid prior_precision: 'init'"),
    (dict(prior_mean=[torch.zeros(7), torch.zeros(3, 2)]), r"item 1 has shape \(3, 2\)"),
    (dict(prior_precision=[torch.ones(7), -torch.ones(2, 3)]), "item 1 holds negative"),
    (dict(prior_precision=[torch.ones(7), torch.full((2, 3), float("nan"))]), "inf or NaN"),
    (dict(prior_mean=[torch.zeros(7, dtype=torch.int64), torch.zeros(2, 3)]), "floating-point"),
])
def test_bad_priors_are_refused_before_anything_moves(bad, match):
    model = Quadratic()
    before = [(p, p.data_ptr(), p.detach().clone()) for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        _optimizer(model, **bad)
    assert all(p.data_ptr() == ptr and torch.equal(p, value) for p, ptr, value in before)


@pytest.mark.parametrize("dropin", [False, True], ids=["official", "dropin"])
def test_state_dict_keeps_the_prior_and_refuses_a_mismatch(dropin):
    def run(model, opt, steps):
        train_quadratic(model, opt, steps, dropin, mc=1)

    model_a = Quadratic()
    priors = _priors("both", model_a)
    opt_a = _optimizer(model_a, dropin=dropin, **priors)
    run(model_a, opt_a, 2)
    checkpoint = copy.deepcopy({"model": model_a.state_dict(), "opt": opt_a.state_dict()})
    run(model_a, opt_a, 2)
    # built with other prior values: the saved ones are loaded
    model_b = Quadratic()
    other = {name: [torch.zeros_like(t) + 0.5 for t in tensors] for name, tensors in priors.items()}
    opt_b = _optimizer(model_b, dropin=dropin, **other)
    model_b.load_state_dict(checkpoint["model"])
    opt_b.load_state_dict(checkpoint["opt"])
    run(model_b, opt_b, 2)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)
        for key in ("mean", "hess", "prior_mean", "prior_precision"):
            assert torch.equal(opt_a.state[pa][key], opt_b.state[pb][key])
    with pytest.raises(ValueError, match="has a 'prior_mean' for parameter 0, but this"):
        _optimizer(Quadratic(), dropin=dropin).load_state_dict(checkpoint["opt"])
    with pytest.raises(ValueError, match="'prior_precision' of parameter 0 is missing"):
        _optimizer(Quadratic(), dropin=dropin, prior_mean="init",
                   prior_precision=priors["prior_precision"]).load_state_dict(
            _optimizer(Quadratic(), dropin=dropin, prior_mean="init").state_dict())


def test_prior_tensors_for_meta_params_are_refused():
    """An optimizer over meta params refuses every call (build it after materializing: tests
    of the meta device in test_user_paths); prior tensors for them are refused at once."""
    with torch.device("meta"):
        meta_model = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="meta device"):
        IVON(meta_model.parameters(), lr=LR, ess=ESS,
             prior_mean=[torch.zeros(3, 4), torch.zeros(3)])


def test_moved_params_keep_their_prior():
    model = Quadratic()
    priors = _priors("both", model)
    opt = _optimizer(model, **priors)
    model.double()
    opt.posterior()
    for param, mu, delta in zip(model.parameters(), priors["prior_mean"],
                                priors["prior_precision"]):
        assert opt.state[param]["prior_mean"].dtype == torch.float64
        assert torch.equal(opt.state[param]["prior_mean"], mu.double())
        assert torch.equal(opt.state[param]["prior_precision"], delta.double())


def _kernel_backends():
    return [name for name in ("cpu", "triton")
            if backends.unavailable_reason(name, torch.device("cpu")) is None]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropin", [False, True], ids=["official", "dropin"])
def test_kernel_backends_follow_the_reference_with_priors(backend, dtype, dropin):
    if backend not in _kernel_backends():
        pytest.skip(f"backend {backend} not available here")
    runs = []
    for name in ("reference", backend):
        model = Quadratic().to(dtype)
        model.a = [a.to(dtype) for a in model.a]
        model.c = [c.to(dtype) for c in model.c]
        opt = _optimizer(model, backend=name, dropin=dropin, mc_samples=1 if dropin else 2,
                         **_priors("both", model))
        train_quadratic(model, opt, 4, dropin)
        runs.append([opt.state[p]["mean"].clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_as_prior_aligns_by_name_and_refuses_an_unverifiable_order():
    """A named posterior's prior goes to each param by name, whatever the new optimizer's
    param order; an optimizer without names cannot take it; an unnamed posterior's prior fits
    only the params it was built from, in their order."""
    model = Quadratic()
    opt = _optimizer(model)
    with opt.sampled_params(train=True):
        opt.zero_grad()
        model.loss().backward()
    opt.step()
    prior = opt.posterior(model).as_prior(ess=ESS)
    reordered = IVON(list(model.named_parameters())[::-1], lr=LR, ess=ESS, backend="reference",
                     **prior)
    for name, param in model.named_parameters():
        assert torch.equal(reordered.state[param]["prior_mean"], prior["prior_mean"][name])
    with pytest.raises(ValueError, match="pass model.named_parameters"):
        IVON(model.parameters(), lr=LR, ess=ESS, backend="reference", **prior)
    unnamed = opt.posterior().as_prior(ess=ESS)
    IVON(model.parameters(), lr=LR, ess=ESS, backend="reference", **unnamed)  # its own params
    with pytest.raises(ValueError, match="param 0 is not this optimizer's param 0"):
        IVON(list(model.parameters())[::-1], lr=LR, ess=ESS, backend="reference", **unnamed)
    with pytest.raises(ValueError, match="not built from live params"):
        Posterior(mean=[torch.zeros(2)], std=[torch.ones(2)]).as_prior(ess=1.0)
