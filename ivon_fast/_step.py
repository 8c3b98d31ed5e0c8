"""``IVON.step()``: what it checks before an update, and ``step(closure)``.

A plain ``step()`` updates from the samples taken since the last step (Note [the pending sample]
in ``optimizer``); it refuses, before anything changes, a step that would silently use the wrong
gradients. ``step(closure)``: the closure zeroes the grads, computes the loss and calls backward
(torch.optim's convention); it is called ``mc_samples`` times, each time at a fresh training
sample, then the optimizer updates. Any failure inside (the closure's own exception included)
rolls the optimizer back to where the call found it: counters, draws, the sample averages and
what the params hold.
"""
from __future__ import annotations

import torch

from . import _op_loop, _user_writes
from ._checks import check_group_hyperparameters
from ._messages import NO_SAMPLE_MESSAGE, OVERWRITTEN_MESSAGE, UNSCALED_FOLDED_MESSAGE


def step(opt, closure):
    """``opt.step(closure)``: None, or with a closure the mean loss (None if a loss was)."""
    opt._check_not_in_context("step()")
    for group in opt.param_groups:  # a value written into param_groups since the last step
        check_group_hyperparameters(group, read_tensors=not opt.capturable)
    opt._betas.reconcile(opt.param_groups)
    if closure is not None:
        return _step_with_closure(opt, closure)
    grads_bound = _user_writes.prepare(opt)
    _check_ready(opt)
    if opt.resample_on_step and not opt._layout.gradient_arrived(grads_bound):
        return None  # Note [a step without a gradient] in _layout
    opt._finish_step(grads_bound)
    return None


def _check_ready(opt) -> None:
    """Refuse a plain step whose gradients are not those of the samples the state records."""
    if opt._grads_before_rewrite is not None:
        stale = opt._grads_before_rewrite == opt._layout.grad_versions()
        opt._grads_before_rewrite = None
        if stale:
            raise RuntimeError(OVERWRITTEN_MESSAGE)
    if opt.resample_on_step and opt.mc_samples > 1:
        raise RuntimeError(
            f"resample_on_step=True trains with one sample per plain step(); for "
            f"mc_samples={opt.mc_samples} pass a closure: optimizer.step(closure)")
    if opt._pending_draw is None and opt._count == 0:
        raise RuntimeError(NO_SAMPLE_MESSAGE)
    opt._check_pending_grads()
    if (getattr(opt, "found_inf", None) is not None
            and getattr(opt, "grad_scale", None) is None and opt._count > 0):
        raise RuntimeError(UNSCALED_FOLDED_MESSAGE.format(count=opt._count))


def _step_with_closure(opt, closure):
    _user_writes.prepare(opt)
    if not opt.resample_on_step and opt._pending_draw is not None:
        opt._fold_pending()  # a finished sample: folding it in changes nothing
    saved = _snapshot(opt)
    try:
        losses = _take_samples(opt, closure)
        if losses is None:  # a do-nothing closure: step on the samples taken before this call
            if not opt.resample_on_step:
                opt._noise.forget(opt._pending_draw)
                _roll_back(opt, saved)
            if opt._pending_draw is None and opt._count == 0:
                raise RuntimeError(NO_SAMPLE_MESSAGE)
            opt._finish_step()
            return None
        result = None if any(loss is None for loss in losses) else sum(losses) / len(losses)
        opt._finish_step()
    except BaseException:
        _roll_back(opt, saved)
        raise
    return result


def _take_samples(opt, closure):
    """Call the closure at each of the step's samples; returns the losses, or None when its
    first call computed nothing (PyTorch Lightning passes such a closure after a manual
    backward)."""
    losses = []
    for index in range(opt.mc_samples):
        if opt.resample_on_step:
            if index > 0:
                opt._fold_pending()
                opt._pending_draw = opt._draws.take_train()
                opt._live.record(opt.param_groups)
                _op_loop.sample(opt, opt._pending_draw)
            loss, computed = _call(opt, closure)
        else:
            with opt.sampled_params(train=True):
                loss, computed = _call(opt, closure)
        if index == 0 and not computed:
            return None
        losses.append(loss)
    return losses


def _call(opt, closure) -> tuple:
    """(the closure's loss, whether it computed anything: a loss or a change to the grads)."""
    before = opt._layout.grad_versions()
    with torch.enable_grad():
        loss = closure()
    return loss, loss is not None or opt._layout.grad_versions() != before


def _snapshot(opt) -> tuple:
    """What ``_roll_back`` puts back."""
    averages = ([(b.avg_grad.clone(), b.avg_hess_term.clone()) for b in opt._layout.buckets]
                if opt._count > 0 else None)
    return opt._count, opt._pending_draw, opt._draws.snapshot(), averages


def _roll_back(opt, saved: tuple) -> None:
    opt._count, opt._pending_draw, draws, averages = saved
    opt._draws.restore(draws)
    for bucket, (avg_grad, avg_hess_term) in zip(opt._layout.buckets, averages or ()):
        bucket.avg_grad.copy_(avg_grad)
        bucket.avg_hess_term.copy_(avg_hess_term)
    opt._write_resting_params()
    opt._layout.mark_seen()
