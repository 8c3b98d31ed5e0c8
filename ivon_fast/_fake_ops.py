"""Fake (meta) kernels of the compiled ops, so torch.compile can trace a step that calls them.

The ops only mutate their annotated arguments in place and return nothing, so the fake kernels
have nothing to compute: the shapes, dtypes and devices of the outputs are those of the inputs.
Imported by ivon_fast.cpp_backend once ivon_fast._C (which defines the ops) has been loaded.
"""
from __future__ import annotations

import torch


@torch.library.register_fake("ivon_fast::sample")
def _sample_fake(param, mean, hess, *, seed, draw, offset, ess, weight_decay):
    return None


@torch.library.register_fake("ivon_fast::accumulate")
def _accumulate_fake(grad, hess, avg_grad, avg_hess_term, *, seed, draw, offset, count, ess,
                     weight_decay, hess_approx):
    return None


@torch.library.register_fake("ivon_fast::update")
def _update_fake(param, grad, mean, momentum, hess, avg_grad, avg_hess_term, *, seed, draw,
                 next_draw, offset, count, hess_approx, lr, ess, weight_decay, beta1,
                 one_minus_beta1, beta2, one_minus_beta2, hess_coef, clip_radius, debias):
    return None
