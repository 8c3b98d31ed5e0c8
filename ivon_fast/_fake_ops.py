"""Fake (meta) kernels of the compiled ops, so torch.compile can trace a step that calls them.

The ops only mutate their annotated arguments in place and return nothing, so the fake kernels
have nothing to compute: the shapes, dtypes and devices of the outputs are those of the inputs.
What they do is check the arguments as the C++ op would (the rules of ``ivon_fast._contract``
that csrc/ops.cpp states, with its messages), which a traced graph or a call that mixes a meta
tensor in (it dispatches here, not to the CPU / CUDA kernel) would not check otherwise. The
checks go through ``torch._check``, so symbolic sizes in a traced graph become assertions, not
guards. Imported by ivon_fast.cpp_backend once ivon_fast._C (which defines the ops) has been
loaded.
"""
from __future__ import annotations

import torch

from . import _contract

_check = _contract.torch_check


@torch.library.register_fake("ivon_fast::sample")
def _sample_fake(param, mean, hess, *, seed, draw, offset, ess, weight_decay,
                 device_draws=None, prior_precision=None):
    _contract.sample_tensors(_check, param, mean, hess, offset=offset,
                             device_draws=device_draws, prior_precision=prior_precision)
    return None


@torch.library.register_fake("ivon_fast::accumulate")
def _accumulate_fake(grad, hess, avg_grad, avg_hess_term, *, seed, draw, offset, count, ess,
                     weight_decay, hess_approx, device_draws=None, prior_precision=None):
    _contract.accumulate_tensors(_check, grad, hess, avg_grad, avg_hess_term, offset=offset,
                                 count=count, hess_approx=hess_approx,
                                 device_draws=device_draws, prior_precision=prior_precision)
    return None


@torch.library.register_fake("ivon_fast::update")
def _update_fake(param, grad, mean, momentum, hess, avg_grad, avg_hess_term, *, seed, draw,
                 next_draw, offset, count, hess_approx, lr, ess, weight_decay, beta1,
                 one_minus_beta1, beta2, one_minus_beta2, hess_coef, clip_radius, debias,
                 grad_scale=None, found_inf=None, device_lr=None, device_debias=None,
                 device_draws=None, prior_mean=None, prior_precision=None, round_draw=0):
    _contract.update_tensors(_check, param, grad, mean, momentum, hess, avg_grad, avg_hess_term,
                             offset=offset, count=count, hess_approx=hess_approx,
                             grad_scale=grad_scale, found_inf=found_inf, device_lr=device_lr,
                             device_debias=device_debias, device_draws=device_draws,
                             prior_mean=prior_mean, prior_precision=prior_precision)
    return None
