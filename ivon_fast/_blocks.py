"""The ``sampled_params()`` block: what entering and leaving it does to the state machine.

Note [the pending sample] in ``optimizer``: a training block folds the pending sample in (if
any) and draws its own, which it leaves pending on exit, folding it at once when more samples of
the step are expected; an evaluation block draws from the evaluation stream and forgets its
sample; a block inside accelerate's gradient accumulation takes the pending sample again (Note
[gradient accumulation]). Any failure leaves params and optimizer as the block found them
(``discard_sample``). ``IVON._enter_sample`` and friends call these (Dynamo-disabled, no_grad).
"""
from __future__ import annotations

import warnings

from . import _op_loop, _user_writes
from ._messages import (ACCUMULATION_WITH_SAMPLES, CLEARED_MESSAGE, EXTRA_SAMPLE_WARNING,
                        OFFICIAL_LOOP_ONLY, WRITTEN_INSIDE_SAMPLE)
from ._wrappers import accelerate_skips_the_step


def enter_sample(opt, train: bool) -> tuple:
    """(the block's kind: 'train', 'eval', or 'again' (Note [gradient accumulation]), its
    draw), with the sample in the params."""
    opt._check_not_in_context("sampled_params()")
    if train and opt.resample_on_step:
        raise RuntimeError(OFFICIAL_LOOP_ONLY)
    _user_writes.prepare(opt)
    if train and opt._accumulating:
        kind, draw = "again", opt._pending_draw
    elif train:
        _fold_pending_before_another(opt)
        kind, draw = "train", opt._draws.take_train()
        opt._live.record(opt.param_groups)
    else:
        kind, draw = "eval", opt._draws.take_eval()
    try:
        _op_loop.sample(opt, draw)
    except BaseException:
        discard_sample(opt, kind, draw)
        raise
    opt._layout.mark_seen()
    return kind, draw


def _fold_pending_before_another(opt) -> None:
    """A training sample is taken while one is pending: fold the pending one in, if its
    gradient is still there; one beyond mc_samples is averaged in too, with a warning."""
    if opt._pending_draw is None:
        return
    if opt._pending_grads is not None and opt._pending_grads != opt._layout.grad_versions():
        raise RuntimeError(CLEARED_MESSAGE.format(mc=opt.mc_samples))
    if opt._count + 1 >= opt.mc_samples:
        warnings.warn(EXTRA_SAMPLE_WARNING.format(
            taken=opt._count + 2, mc=opt.mc_samples), UserWarning, stacklevel=6)
    opt._fold_pending()


def exit_sample(opt, kind: str, draw: int) -> None:
    """Leave a block normally: a training sample becomes pending (and is folded in at once when
    more samples of the step are expected), an evaluation sample is forgotten."""
    if opt._layout.forget_writes():
        discard_sample(opt, kind, draw)
        raise RuntimeError(WRITTEN_INSIDE_SAMPLE)
    if kind == "eval":
        opt._noise.forget(draw)
    else:
        opt._pending_draw = draw
        opt._pending_grads = opt._layout.grad_versions()
        opt._accumulating = accelerate_skips_the_step()
        if opt._accumulating and opt.mc_samples > 1:
            discard_sample(opt, kind, draw)
            raise RuntimeError(ACCUMULATION_WITH_SAMPLES.format(mc=opt.mc_samples))
        if not opt._accumulating and opt._count + 1 < opt.mc_samples:
            try:
                opt._fold_pending()  # a later sample's zero_grad could clear this gradient
            except BaseException:  # e.g. out of memory: the sample does not count
                discard_sample(opt, kind, draw)
                raise
    opt._layout.sync_requires_grad()
    opt._write_resting_params()
    opt._layout.mark_seen()


def discard_sample(opt, kind: str, draw: int) -> None:
    """Undo a sample that does not count: the params get back what they held before (a
    block that took the pending sample again leaves it pending)."""
    if kind == "train":
        opt._pending_draw = opt._pending_grads = None
        opt._accumulating = False
        opt._draws.untake_train()
    elif kind == "eval":
        opt._draws.untake_eval()
    if kind != "again":
        opt._noise.forget(draw)
    opt._layout.forget_writes()
    opt._layout.sync_requires_grad()
    opt._write_resting_params()
    opt._layout.mark_seen()
