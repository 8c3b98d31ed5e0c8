"""Checks shared by the kernel backends' tests (test_cpp, test_triton)."""
from __future__ import annotations

import torch

from ivon_fast import reference
from ivon_fast.scalars import StepScalars


def assert_low_precision_rounding(backend, device, dtype, op, mean):
    """A bf16 / fp16 param receives exactly torch's rounding (to nearest, ties to even) of the
    fp32 value the same kernel writes into an fp32 param. ``backend`` is a backend module."""
    n = mean.numel()
    written = {}
    for param_dtype in (torch.float32, dtype):
        param = torch.empty(n, dtype=param_dtype, device=device)
        momentum, hess = torch.zeros(n, device=device), torch.ones(n, device=device)
        if op == "sample":  # sigma = 1e-19: the sample is the mean, except for tiny means
            backend.sample(param, mean, hess, seed=5, draw=3, offset=1, ess=1e38, weight_decay=0.0)
        else:  # lr = 0: the update writes the mean back as the param
            grad = torch.ones(n, dtype=param_dtype, device=device)
            backend.update(param, grad, mean.clone(), momentum, hess, None, None, seed=5, draw=3,
                           offset=1, count=1, hess_approx="gradsq",
                           scalars=StepScalars.of(lr=0.0, ess=1.0, weight_decay=0.0, beta1=0.9,
                                                  beta2=0.99))
        written[param_dtype] = param
    torch.testing.assert_close(written[dtype], written[torch.float32].to(dtype), rtol=0, atol=0,
                               equal_nan=True)


# ---- the per-element prior (ivon_fast.reference's module docstring) --------------------------

# the prior inputs of each case; sample and accumulate take only the precision
PRIORS = {"mean": ("prior_mean",), "precision": ("prior_precision",),
          "both": ("prior_mean", "prior_precision")}
# the outputs each op writes
PRIOR_OUTPUTS = {"sample": ("param",), "accumulate": ("avg_grad", "avg_hess_term"),
                 "update": ("mean", "momentum", "hess", "param")}
PRIOR_SEED, PRIOR_DRAW = (1 << 64) - 777, 11
# weight decay 0.05 and no clip: the prior mean's pull (delta * mu0 / (hess + delta)) moves the
# mean by about 1e-2 of its scale, far beyond the fp32 tolerance, and never hides in the clip
PRIOR_SCALARS = StepScalars.of(lr=0.05, ess=30.0, weight_decay=0.05, beta1=0.9, beta2=0.95,
                               debias=0.271)


def prior_state(n, dtype, device, hess_approx="price", seed=30):
    """Segment tensors for the prior tests (state fp32, param and grad in ``dtype``)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(scale=1.0):
        return (torch.randn(n, generator=gen) * scale).to(device)

    term = rnd(0.05)
    return dict(param=torch.zeros(n, dtype=dtype, device=device), grad=rnd().to(dtype),
                mean=rnd(), momentum=rnd(0.1),
                hess=(torch.rand(n, generator=gen) * 0.5 + 0.05).to(device), avg_grad=rnd(),
                avg_hess_term=term.abs() if hess_approx == "gradsq" else term)


def prior_inputs(prior, n, device, seed=31):
    """The named prior's tensors (fp32): means of the params' scale, precisions from 0 (no pull
    at all, every fifth element) to 0.6, the size of the hess, so sigma, the hess and the step
    all move far beyond the tolerances."""
    gen = torch.Generator().manual_seed(seed)
    inputs = {}
    names = PRIORS[prior] if prior is not None else ()
    if "prior_mean" in names:
        inputs["prior_mean"] = torch.randn(n, generator=gen).to(device)
    if "prior_precision" in names:
        precision = torch.rand(n, generator=gen) * 0.6
        precision[::5] = 0.0
        inputs["prior_precision"] = precision.to(device)
    return inputs


def run_prior_op(backend, op, state, priors, *, hess_approx="price", grad=True, count=1,
                 next_draw=None, offset=4099, scalars=PRIOR_SCALARS, **device):
    """``backend``'s op on a copy of ``state`` with the prior tensors ``priors`` (a dict that
    may be empty) and the device scalars / draws ``device``; returns the copy."""
    st = {k: v.clone() for k, v in state.items()}
    common = dict(seed=PRIOR_SEED, draw=PRIOR_DRAW, offset=offset, **device)
    if op == "sample":
        backend.sample(st["param"], st["mean"], st["hess"], ess=scalars.ess,
                       weight_decay=scalars.weight_decay, **common, **priors)
    elif op == "accumulate":
        backend.accumulate(st["grad"], st["hess"], st["avg_grad"], st["avg_hess_term"],
                           count=count, ess=scalars.ess, weight_decay=scalars.weight_decay,
                           hess_approx=hess_approx, **common, **priors)
    else:
        backend.update(st["param"], st["grad"] if grad else None, st["mean"], st["momentum"],
                       st["hess"], st["avg_grad"], st["avg_hess_term"], next_draw=next_draw,
                       count=count, hess_approx=hess_approx, scalars=scalars, **common,
                       **priors)
    return st


def check_prior_against_reference(backend, op, device, dtype, prior, assert_close, *,
                                  n=4097, prior_matters=True, **kw):
    """``backend`` against the reference with the prior ``prior`` (a key of PRIORS; only the
    precision for sample / accumulate), within ``assert_close(actual, expected, dtype)``, the
    test file's per-dtype tolerance. ``prior_matters``: the reference's result without the prior
    must differ beyond 100 times the fp32 tolerance (in some output), so a backend that dropped
    the prior (or one use of it) fails; False where it cannot matter ('gradsq' accumulate, a
    skipped step without a next sample), which the backend must then show too. Returns the
    backend's result."""
    state = prior_state(n, dtype, device, kw.get("hess_approx", "price"))
    priors = prior_inputs(prior, n, device)
    got = run_prior_op(backend, op, state, priors, **kw)
    want = run_prior_op(reference, op, state, priors, **kw)
    for key in PRIOR_OUTPUTS[op]:
        assert_close(got[key].float(), want[key].float(),
                     got[key].dtype if key == "param" else torch.float32)
    without = run_prior_op(reference, op, state, {}, **kw)
    moved = [not torch.allclose(want[key].float(), without[key].float(), rtol=1e-3, atol=1e-4)
             for key in PRIOR_OUTPUTS[op]]
    assert any(moved) == prior_matters, dict(zip(PRIOR_OUTPUTS[op], moved))
    return got


def neutral_prior_is_the_weight_decay(backend, op, device, dtype, **kw):
    """A prior of mean 0 and precision weight_decay everywhere (rounded to fp32, as the kernels
    round the scalar) is the prior of no prior argument: the same bits, in every output."""
    n = 4097
    state = prior_state(n, dtype, device, kw.get("hess_approx", "price"))
    wd = PRIOR_SCALARS.weight_decay
    neutral = dict(prior_precision=torch.full((n,), wd, dtype=torch.float32, device=device))
    if op == "update":
        neutral["prior_mean"] = torch.zeros(n, device=device)
    with_prior = run_prior_op(backend, op, state, neutral, **kw)
    without = run_prior_op(backend, op, state, {}, **kw)
    for key in PRIOR_OUTPUTS[op]:
        assert torch.equal(with_prior[key], without[key]), key


def check_priors_in_a_skipped_step(backend, device, prior, next_draw, grad, count):
    """found_inf: state bit for bit unchanged whatever the prior; the param is the old mean, or
    the sample op's sample around the old state with the same prior precision (same bits)."""
    n = 4097
    state = prior_state(n, torch.bfloat16, device)
    priors = prior_inputs(prior, n, device)
    got = run_prior_op(backend, "update", state, priors, grad=grad, count=count,
                       next_draw=next_draw, found_inf=one(1.0, device))
    for key in ("mean", "momentum", "hess", "avg_grad", "avg_hess_term"):
        assert torch.equal(got[key], state[key]), key
    if next_draw is None:
        assert torch.equal(got["param"], state["mean"].to(torch.bfloat16))
    else:
        sampled = torch.empty_like(state["param"])
        backend.sample(sampled, state["mean"], state["hess"], seed=PRIOR_SEED, draw=next_draw,
                       offset=4099, ess=PRIOR_SCALARS.ess,
                       weight_decay=PRIOR_SCALARS.weight_decay,
                       prior_precision=priors.get("prior_precision"))
        assert torch.equal(got["param"], sampled)


def one(value, device):
    """A 1-element float32 device scalar (grad_scale, found_inf, device_lr, device_debias)."""
    return torch.tensor([value], dtype=torch.float32, device=device)


def device_draws(values, device):
    """uint64 draw numbers as the int64 tensor that holds their bits."""
    return torch.tensor([v - (1 << 64) if v >= 1 << 63 else v for v in values],
                        dtype=torch.int64, device=device)


def check_priors_with_device_inputs(backend, device, dtype, n, offset, found, assert_close,
                                    eval_draw):
    """Both priors together with every device scalar and the device draws (the update's next
    draw and the one-draw ops' draw are ``eval_draw``); a skipped step (``found``) keeps the
    state, and its next sample still uses the prior precision. Sample and accumulate with the
    prior precision and the device draw."""
    inputs = dict(grad_scale=one(3.0, device), found_inf=one(found, device),
                  device_lr=one(0.1, device), device_debias=one(0.4, device),
                  device_draws=device_draws([5, eval_draw], device))
    got = check_prior_against_reference(backend, "update", device, dtype, "both", assert_close,
                                        n=n, offset=offset, count=3, next_draw=eval_draw,
                                        **inputs)
    if found:
        before = prior_state(n, dtype, device)
        for key in ("mean", "momentum", "hess"):
            assert torch.equal(got[key], before[key]), key
    one_draw = dict(device_draws=device_draws([eval_draw], device))
    check_prior_against_reference(backend, "sample", device, dtype, "precision", assert_close,
                                  n=n, offset=offset, **one_draw)
    check_prior_against_reference(backend, "accumulate", device, dtype, "precision",
                                  assert_close, n=n, offset=offset, count=2, **one_draw)
