"""Checks shared by the kernel backends' tests (test_cpp, test_triton)."""
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
