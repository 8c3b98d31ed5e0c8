"""Fake (meta) kernels of the compiled ops, so torch.compile can trace a step that calls them.

The ops only mutate their annotated arguments in place and return nothing, so the fake kernels
have nothing to compute: the shapes, dtypes and devices of the outputs are those of the inputs.
The one thing they check is what the device kernels could not see in a traced graph, or in a
call that mixes a meta tensor in (it dispatches here, not to the CPU / CUDA kernel): update's
optional device scalars and the optional prior inputs, with the messages of csrc/ops.cpp.
Imported by ivon_fast.cpp_backend once ivon_fast._C (which defines the ops) has been loaded.
"""
from __future__ import annotations

import torch


def _check_device_scalar(tensor, name: str, param: torch.Tensor) -> None:
    """As device_scalar in csrc/ops.cpp: None, or 1 float32 element on the params' device."""
    if tensor is None:
        return
    torch._check(tensor.numel() == 1, lambda: f"ivon_fast: {name} must be a tensor of 1 element, "
                 f"got {tensor.numel()} elements")
    torch._check(tensor.dtype == torch.float32,
                 lambda: f"ivon_fast: {name} must be float32, got {tensor.dtype}")
    torch._check(tensor.device == param.device, lambda: f"ivon_fast: {name} must be on the "
                 f"params' device {param.device}, got {tensor.device}")


def _check_device_draws(tensor, count: int, param: torch.Tensor) -> None:
    """As device_draws_of in csrc/ops.cpp: None, or ``count`` int64 elements on the params'
    device."""
    if tensor is None:
        return
    torch._check(tensor.numel() == count, lambda: f"ivon_fast: device_draws must be a tensor of "
                 f"{count} element(s), got {tensor.numel()} elements")
    torch._check(tensor.dtype == torch.int64,
                 lambda: f"ivon_fast: device_draws must be int64, got {tensor.dtype}")
    torch._check(tensor.device == param.device, lambda: f"ivon_fast: device_draws must be on "
                 f"the params' device {param.device}, got {tensor.device}")


def _check_prior(tensor, name: str, like: torch.Tensor, like_name: str) -> None:
    """As prior_input in csrc/ops.cpp: None, or a contiguous float32 tensor of the segment's
    length on the params' device."""
    if tensor is None:
        return
    torch._check(tensor.device == like.device, lambda: f"ivon_fast: {name} is on "
                 f"{tensor.device} but {like_name} is on {like.device}")
    torch._check(tensor.numel() == like.numel(), lambda: f"ivon_fast: {name} has "
                 f"{tensor.numel()} elements but {like_name} has {like.numel()}")
    torch._check(tensor.is_contiguous(), lambda: f"ivon_fast: {name} must be contiguous")
    torch._check(tensor.dtype == torch.float32,
                 lambda: f"ivon_fast: {name} must be Float, got {tensor.dtype}")


@torch.library.register_fake("ivon_fast::sample")
def _sample_fake(param, mean, hess, *, seed, draw, offset, ess, weight_decay,
                 device_draws=None, prior_precision=None):
    _check_device_draws(device_draws, 1, param)
    _check_prior(prior_precision, "prior_precision", param, "param")
    return None


@torch.library.register_fake("ivon_fast::accumulate")
def _accumulate_fake(grad, hess, avg_grad, avg_hess_term, *, seed, draw, offset, count, ess,
                     weight_decay, hess_approx, device_draws=None, prior_precision=None):
    _check_device_draws(device_draws, 1, grad)
    _check_prior(prior_precision, "prior_precision", grad, "grad")
    return None


@torch.library.register_fake("ivon_fast::update")
def _update_fake(param, grad, mean, momentum, hess, avg_grad, avg_hess_term, *, seed, draw,
                 next_draw, offset, count, hess_approx, lr, ess, weight_decay, beta1,
                 one_minus_beta1, beta2, one_minus_beta2, hess_coef, clip_radius, debias,
                 grad_scale=None, found_inf=None, device_lr=None, device_debias=None,
                 device_draws=None, prior_mean=None, prior_precision=None, round_draw=0):
    _check_device_draws(device_draws, 2, param)
    _check_prior(prior_mean, "prior_mean", param, "param")
    _check_prior(prior_precision, "prior_precision", param, "param")
    for name, tensor in (("grad_scale", grad_scale), ("found_inf", found_inf),
                         ("device_lr", device_lr), ("device_debias", device_debias)):
        _check_device_scalar(tensor, name, param)
    return None
