"""The op loop: every op of the contract (``reference``) over every segment of the layout, with its
arguments: the noise's scalars and key, the draws, the group's prior, and an update's AMP and
device inputs (docs/DESIGN.md sections 5, 11 and 13).

The optimizer (``optimizer``) decides WHEN an op runs (its state machine: which sample is pending,
how many are folded in); the functions here run it. They take the optimizer as their first
argument and read its parts (layout, noise, draws, step count, options); they change the
optimizer's state only through those parts, never its state machine.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from . import _sharded, backends
from .reference import EVAL_DRAW_BASE
from .scalars import StepScalars, device_lr_tensor, to_device


class LiveScalars:
    """ess and weight_decay that scale a draw's noise: for the live training draw, the values it
    was sampled with (a scheduler may change them before its gradient is used; ivon-opt keeps
    the noise it drew), else the group's current ones."""

    def __init__(self):
        self._values: list = []  # per group, the live training draw's

    @staticmethod
    def of_group(group: dict) -> dict:
        """The hyperparameters that scale a group's noise."""
        return dict(ess=float(group["ess"]), weight_decay=float(group["weight_decay"]))

    def record(self, param_groups: list) -> None:
        """The next training sample is drawn now: remember its noise scalars."""
        self._values = [self.of_group(group) for group in param_groups]

    def changed(self, param_groups: list) -> bool:
        return any(live != self.of_group(group) for live, group in zip(self._values, param_groups))

    def of_draw(self, param_groups: list, bucket, draw) -> dict:
        if draw is not None and draw < EVAL_DRAW_BASE and bucket.group_index < len(self._values):
            return self._values[bucket.group_index]
        return self.of_group(param_groups[bucket.group_index])


def noise_scalars(opt, bucket, draw) -> dict:
    return opt._live.of_draw(opt.param_groups, bucket, draw)


def sample_segment(opt, out: torch.Tensor, bucket, seg, draw) -> None:
    """``out`` <- the sample of ``draw`` over one segment."""
    s = seg.slice
    backends.get(bucket.backend).sample(
        out, bucket.mean[s], bucket.hess[s], seed=opt._noise.key(),
        **opt._draws.op_kwargs(draw, bucket.device), offset=seg.offset,
        **noise_scalars(opt, bucket, draw), **bucket.prior_inputs(s),
        **opt._noise.op_kwargs("eps", draw, bucket, seg))


def sample(opt, draw: int, buckets=None) -> None:
    """The params <- the sample of ``draw`` (of ``buckets``, default all)."""
    for bucket, seg in opt._layout.segments(buckets):
        sample_segment(opt, bucket.param_flat[seg.slice], bucket, seg, draw)
    opt._layout.publish(buckets)


def accumulate(opt, draw: int, count: int) -> None:
    """Fold the gradient of sample ``draw``, number ``count`` of the step, into the running
    averages."""
    opt._layout.gather_grads()
    key = opt._noise.key()
    for bucket, seg in opt._layout.segments():
        bucket.ensure_averages()
        s = seg.slice
        backends.get(bucket.backend).accumulate(
            bucket.grad_flat[s], bucket.hess[s], bucket.avg_grad[s], bucket.avg_hess_term[s],
            seed=key, **opt._draws.op_kwargs(draw, bucket.device), offset=seg.offset,
            count=count, hess_approx=opt.hess_approx, **bucket.prior_inputs(s),
            **noise_scalars(opt, bucket, draw), **opt._noise.op_kwargs("eps", draw, bucket, seg))
    opt._noise.forget(draw)


def average_across_ranks(opt) -> None:
    """sync=True: every rank is one sample; average the ranks' sample averages."""
    world_size = dist.get_world_size()
    for bucket in opt._layout.buckets:
        bucket.ensure_averages()
        for average in (bucket.avg_grad, bucket.avg_hess_term):
            dist.all_reduce(average)
            average.div_(world_size)


def update(opt, draw: Optional[int], folded: int, next_draw: Optional[int],
           grads_bound: bool) -> None:
    """The update from the ``folded`` samples' averages and the pending sample ``draw`` (None:
    none); params <- mean, or the sample of ``next_draw``. ``grads_bound``: the caller has just
    seen every grad bound to its flat view."""
    with_grad = draw is not None
    if with_grad and not grads_bound:
        opt._layout.gather_grads()
    grad_scale, found_inf = amp_inputs(opt, with_grad, folded)
    on_device = found_inf is not None or opt._steps.on_device  # capturable: pinned there
    scalars = _step_scalars(opt, on_device)
    key = opt._noise.key()
    device_inputs: dict = {}  # per (group, device, state dtype): the kernels' device tensors
    for bucket, seg in opt._layout.segments():
        where = (bucket.group_index, bucket.device, bucket.mean.dtype)
        if where not in device_inputs:
            device_inputs[where] = _device_inputs(opt, bucket, grad_scale, found_inf, on_device)
        _update_segment(opt, bucket, seg, key, (draw, folded, next_draw),
                        scalars[bucket.group_index], device_inputs[where])
    opt._layout.publish()
    if next_draw is not None:
        opt._draws.advance_device()  # capturable: the next sample is now the pending one
    opt._steps.settle(found_inf)
    opt._noise.forget(draw)


def _step_scalars(opt, on_device: bool) -> list:
    """Each group's ``StepScalars`` of this update; the step count advances here."""
    if on_device:
        opt._steps.advance_on_device(opt._layout.buckets[0].device)
    step = None if on_device else opt._steps.advance_on_host()
    # capturable: the lr is the group's device tensor (device_lr), the host's a constant 0
    return [StepScalars.for_group({**group, "lr": 0.0} if opt.capturable else group, step,
                                  rescale_lr=opt.rescale_lr, debias=opt.debias)
            for group in opt.param_groups]


def _update_segment(opt, bucket, seg, key: int, samples: tuple, scalars: StepScalars,
                    device_inputs: dict) -> None:
    """One segment's update; ``samples``: (the pending draw, the number folded, the next draw)."""
    draw, folded, next_draw = samples
    s = seg.slice
    with_grad = draw is not None
    averages = (bucket.avg_grad[s], bucket.avg_hess_term[s]) if folded > 0 else (None, None)
    draws = opt._draws.op_kwargs(draw, bucket.device, update=True, next_draw=next_draw)
    # one more than the step's last training draw: grows with every update
    round_draw = opt._draws.next_train if next_draw is None else next_draw
    # low-precision state rounds with this update's index (docs/DESIGN.md section 16);
    # capturable: the device's draws[1] is that index (Note [capturable steps] in _draws)
    rounding = ({"round_draw": 0 if "device_draws" in draws else round_draw}
                if bucket.momentum.dtype != bucket.mean.dtype else {})
    backends.get(bucket.backend).update(
        bucket.param_flat[s], bucket.grad_flat[s] if with_grad else None, bucket.mean[s],
        bucket.momentum[s], bucket.hess[s], *averages,
        scalars=scalars, seed=key, **draws, offset=seg.offset,
        count=folded + (1 if with_grad else 0), hess_approx=opt.hess_approx, **device_inputs,
        **bucket.prior_inputs(s, update=True), **rounding,
        **opt._noise.op_kwargs("eps", draw, bucket, seg),
        **opt._noise.op_kwargs("next_eps", next_draw, bucket, seg))


def amp_inputs(opt, with_grad: bool, folded: int) -> tuple:
    """(grad_scale, found_inf) of this step, as device tensors or None.

    ``grad_scale`` and the GradScaler's ``found_inf`` are the attributes its fused path sets
    during ``scaler.step(optimizer)``. The optimizer adds its own check of what the scaler did
    not check: the gradients (without a scaler, with ``skip_nonfinite``) and the ``folded``
    sample averages (with ``skip_nonfinite`` or a scaler). ``found_inf`` is then 0 or NaN plus
    the scaler's flag: the kernels skip the step where it is nonzero, and nothing here waits for
    the device.
    """
    grad_scale = getattr(opt, "grad_scale", None)
    scaler_found_inf = getattr(opt, "found_inf", None)
    if scaler_found_inf is None and not opt.skip_nonfinite:
        return grad_scale, None
    home = opt._layout.buckets[0].device
    found_inf = torch.zeros(1, dtype=torch.float32, device=home)
    if scaler_found_inf is not None:
        found_inf.add_(to_device(torch.as_tensor(scaler_found_inf, dtype=torch.float32),
                                 home).reshape(1))
    check_grads = with_grad and scaler_found_inf is None
    # a scaler is there to catch overflows: the folded samples it never saw are always checked
    check_averages = folded > 0 and (opt.skip_nonfinite or scaler_found_inf is not None)
    if check_grads or check_averages:
        _check_finite(opt._layout, found_inf, check_grads, check_averages)
    _sharded.agree_on_skip(opt._layout.buckets, found_inf)
    return grad_scale, found_inf


def _check_finite(layout, found_inf: torch.Tensor, grads: bool, averages: bool) -> None:
    """``found_inf`` += NaN where what the update reads (the trainable segments: a frozen param's
    stale gradient must not skip every later step) holds an inf or NaN."""
    home = found_inf.device
    zero = torch.zeros((), dtype=torch.float32, device=home)
    for bucket, seg in layout.segments():
        if seg.stop == seg.start:
            continue
        checked = [bucket.grad_flat] if grads else []
        if averages:
            checked += [bucket.avg_grad, bucket.avg_hess_term]
        for values in checked:
            # x * 0 is 0 for finite x and NaN for inf or NaN: no overflow, no sync
            for extreme in torch.aminmax(values[seg.slice]):
                found_inf.addcmul_(to_device(extreme, home), zero)


def _device_inputs(opt, bucket, grad_scale, found_inf, on_device: bool) -> dict:
    """The optional device tensors of a bucket's update (ivon_fast.reference.update)."""
    inputs = {}
    device = bucket.device
    if grad_scale is not None:
        inputs["grad_scale"] = to_device(grad_scale, device)
    if found_inf is not None:
        inputs["found_inf"] = to_device(found_inf, device)
    if opt.capturable:
        inputs["device_lr"] = _lr_on_device(opt, bucket)
    if on_device and opt.debias:
        debias = opt._steps.debias_on_device(
            opt.param_groups[bucket.group_index]["beta1"], bucket.mean.dtype)
        inputs["device_debias"] = to_device(debias, device)
    return inputs


def _lr_on_device(opt, bucket) -> torch.Tensor:
    """The effective lr of a bucket's group, formed on the device from the group's lr tensor in
    double (as ``StepScalars.for_group`` on the host), rounded to the state dtype."""
    group = opt.param_groups[bucket.group_index]
    lr = group["lr"]
    if not isinstance(lr, torch.Tensor):  # a float written into the group since: on device
        lr = group["lr"] = device_lr_tensor(lr, group["params"])
    lr = to_device(lr, bucket.device).to(torch.float64).reshape(1)
    if opt.rescale_lr:
        lr = lr * (float(group["hess_init"]) + float(group["weight_decay"]))
    return lr.to(bucket.mean.dtype)
