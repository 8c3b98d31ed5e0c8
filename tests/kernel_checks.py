"""Inputs and checks shared by the kernel suite (tests/test_kernels*.py)."""
from __future__ import annotations

import torch

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


def one(value, device):
    """A 1-element float32 device scalar (grad_scale, found_inf, device_lr, device_debias)."""
    return torch.tensor([value], dtype=torch.float32, device=device)


def device_draws(values, device):
    """uint64 draw numbers as the int64 tensor that holds their bits."""
    return torch.tensor([v - (1 << 64) if v >= 1 << 63 else v for v in values],
                        dtype=torch.int64, device=device)
