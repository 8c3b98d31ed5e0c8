"""Catching up with what user code did to the params between optimizer calls.

Note [user writes to params] in ``_layout``: the elements that a write changed, compared with
what the optimizer had put there (the mean rounded to the params' dtype, or the pending sample),
become the new mean; the other elements keep their exact state, so a no-op ``clamp_`` after
``step()`` changes nothing and a bf16 model keeps its fp32 master mean. Right after
``load_state_dict`` a write is the model checkpoint's copy of what the params held (Note [what
the params hold] in ``_checkpoint``).
"""
from __future__ import annotations

import torch

from . import _op_loop
from ._bucket import Segment


def prepare(opt, params_hold_mean: bool = False) -> bool:
    """Catch up with what user code did to the params since the last optimizer call
    (``params_hold_mean``: inside ``mean_params()``, the params hold the mean).

    Returns whether user code changed nothing (then every grad is its flat view, too).
    """
    layout = opt._layout
    layout.check_materialized()
    if layout.unchanged():  # the common case: one cheap pass (Note [the per-step check])
        opt._params_from_checkpoint = False
        return True
    _rebuild_buckets(opt)
    layout.sync_requires_grad()
    written = [(b, i) for b, i in layout.written_params() if b.trainable[i]]
    from_checkpoint, opt._params_from_checkpoint = opt._params_from_checkpoint, False
    if not written:
        return False
    holds_sample = opt.resample_on_step and not params_hold_mean
    if not from_checkpoint:
        for bucket, index in written:
            _adopt_written(opt, bucket, index, holds_sample)
    elif holds_sample and any(_not_the_pending_sample(opt, bucket, index)
                              for bucket, index in written):
        # a model file holding other values than the pending sample (the mean, saved inside
        # mean_params()) was loaded after the optimizer: a gradient computed since was not
        # taken at the sample the state records (Note [what the params hold])
        opt._grads_before_rewrite = layout.grad_versions()
    if holds_sample or from_checkpoint:  # the params hold exactly what the state says
        opt._write_resting_params()
        layout.mark_seen()
    return False


def _rebuild_buckets(opt) -> None:
    """Buckets whose params moved (Note [moved params] in ``_layout``), or that params which
    train now join (Note [params that wait]), are rebuilt; the state follows."""
    layout, hess_init = opt._layout, [group["hess_init"] for group in opt.param_groups]
    moved = layout.follow_moves(hess_init)
    admitted = layout.admit_new_trainables(hess_init)
    if not (moved or admitted):
        return
    if opt._count > 0:  # mid-step: a param that joins takes part with zero past gradients
        for bucket in layout.buckets:
            bucket.ensure_averages()
    layout.state_views_into(opt.state)
    if moved:
        opt._write_resting_params()
    layout.mark_seen()


def _resting_values(opt, bucket, index: int, holds_sample: bool) -> torch.Tensor:
    """What the optimizer put into a param at rest: the pending sample, or the mean rounded to
    the param's dtype (flat)."""
    where = bucket.slice_of(index)
    if holds_sample:
        expected = torch.empty_like(bucket.param_flat[where])
        _op_loop.sample_segment(opt, expected, bucket,
                                Segment(where.start, where.stop, bucket.offsets[index]),
                                opt._pending_draw)
        return expected
    return bucket.mean[where].to(bucket.param_flat.dtype)


def _not_the_pending_sample(opt, bucket, index: int) -> bool:
    """Whether a param holds other values than the pending sample, beyond the rounding by which
    two backends' or devices' copies of one sample differ: an element counts as different when
    it is off by more than 8 ulps of the param's dtype and by more than 1e-3 posterior standard
    deviations (a mean and a sample differ by |eps| deviations)."""
    where = bucket.slice_of(index)
    current = bucket.param_flat[where].to(bucket.mean.dtype)
    expected = _resting_values(opt, bucket, index, True).to(bucket.mean.dtype)
    scalars = _op_loop.noise_scalars(opt, bucket, opt._pending_draw)
    delta = (bucket.prior_precision[where] if bucket.prior_precision is not None
             else scalars["weight_decay"])
    hess = bucket.hess[where].to(bucket.mean.dtype)
    deviations = (current - expected).abs() * (scalars["ess"] * (hess + delta)).sqrt()
    ulps = 8 * torch.finfo(bucket.param_flat.dtype).eps * torch.maximum(current.abs(),
                                                                         expected.abs())
    return bool(((deviations > 1e-3) & ((current - expected).abs() > ulps)).any())


def _adopt_written(opt, bucket, index: int, holds_sample: bool) -> None:
    where = bucket.slice_of(index)
    current, mean = bucket.param_flat[where], bucket.mean[where]
    expected = _resting_values(opt, bucket, index, holds_sample)
    mean.copy_(torch.where(current != expected, current.to(mean.dtype), mean))
