"""The flat layout: every param group's buckets (``_bucket``), in the global index order.

A bucket holds the params of one param group with one (device, dtype) in flat buffers
(``_bucket.Bucket``); sharded params (FSDP2 DTensors), whose storage FSDP owns, go to a
``_sharded.ShardedBucket``. The layout asks every bucket the same questions and never which kind
it is; it adds what spans buckets: the global flat index (each param's offset), the one "for each
segment" loop of the ops, and rebuilding buckets whose params moved.

This module also follows what user code does to the params between optimizer calls:

Note [user writes to params]: between optimizer calls the params hold the mean (or, in the drop-in
mode, a sample around it), but the mean itself lives in ``Bucket.mean``. When user code changes a
param in place (``model.load_state_dict``, ``p.copy_`` under no_grad) or rebinds ``p.data``, the
next optimizer call notices (the param's version counter, its storage pointer) and the caller
decides what the new values are (normally: the new mean). Writes through ``p.data.copy_`` cannot be
seen: ``p.data`` is a new tensor object with a version counter of its own.

Note [moved params]: ``model.to(device)``, ``.to(dtype)`` or ``.half()`` after the optimizer was
built rebind each ``p.data`` (and ``p.grad.data``) to a new tensor on the new device or dtype. The
layout then follows: it is rebuilt for the new (device, dtype), and the state moves with the
params (converted to the new state dtype). Building on the ``meta`` device and materializing with
``to_empty`` replaces the parameter objects instead (meta tensors cannot share storage with real
ones), so the optimizer cannot follow; every optimizer call then raises a clear error.
"""
from __future__ import annotations

from typing import Iterator

import torch

from ._bucket import PRIOR_STATE, Bucket
from ._sharded import ShardedBucket, is_sharded


class FlatLayout:
    """The buckets of all param groups, and what user code did to their params."""

    def __init__(self, backend_choice: str, low_precision: torch.dtype = torch.float32):
        self.backend_choice = backend_choice
        self.low_precision = low_precision  # IVON's state_dtype: momentum and hess
        self.buckets: list = []
        self.numel = 0  # elements in the global flat index space so far

    # -------------------------------------------------------------------------- construction

    def add_group(self, group_index: int, params: list, hess_init: float) -> list:
        """Move a param group's params into new buckets; returns them."""
        by_key: dict = {}
        group_start = self.numel
        for param in params:
            kind = ShardedBucket if is_sharded(param) else Bucket  # FSDP2 keeps its storage
            by_key.setdefault((param.device, param.dtype, kind), []).append((param, self.numel))
            self.numel += param.numel()  # a DTensor's numel is the unsharded param's
        new_buckets = [kind.build(group_index, group_start, device, dtype,
                                  [p for p, _ in members], [offset for _, offset in members],
                                  self.backend_choice, hess_init, self.low_precision)
                       for (device, dtype, kind), members in by_key.items()]
        self.buckets.extend(new_buckets)
        return new_buckets

    def state_views_into(self, state: dict) -> None:
        """``state[param]``: the param's state views by name (``Bucket.state_views``), for every
        param (the optimizer's ``state``, torch.optim's per-param dict)."""
        for bucket in self.buckets:
            for param, views in bucket.state_views():
                state[param] = views

    # -------------------------------------------------------------------------- the op loop

    def segments(self, buckets=None) -> Iterator[tuple]:
        """(bucket, segment) for every run of trainable params, in bucket order."""
        for bucket in self.buckets if buckets is None else buckets:
            for segment in bucket.segments():
                yield bucket, segment

    def restore(self) -> None:
        """Trainable params <- their mean."""
        for bucket, segment in self.segments():
            bucket.param_flat[segment.slice].copy_(bucket.mean[segment.slice])
        self.publish()

    def publish(self, buckets=None) -> None:
        """After the optimizer wrote ``param_flat``: the params hold the values."""
        for bucket in self.buckets if buckets is None else buckets:
            bucket.publish()

    def gather_grads(self) -> None:
        """Make the flat gradient buffers hold every trainable param's current ``.grad``."""
        for bucket in self.buckets:
            bucket.gather_grads()

    def zero_grads(self) -> None:
        for bucket in self.buckets:
            bucket.zero_grads()

    # -------------------------------------------------------------------------- user code

    def unchanged(self) -> bool:
        """Whether user code left every param and grad as the layout bound them (Note [the
        per-step check] in Bucket.unchanged)."""
        return all(bucket.unchanged() for bucket in self.buckets)

    def check_materialized(self) -> None:
        for bucket in self.buckets:
            if bucket.device.type == "meta":
                raise RuntimeError(
                    "IVON's parameters are on the meta device. Materializing a model with "
                    "to_empty() (or load_state_dict(assign=True)) replaces its parameter objects, "
                    "so an optimizer built before that holds the old meta tensors and would train "
                    "nothing. Build the optimizer after materializing the model.")

    def sync_requires_grad(self) -> None:
        """Follow requires_grad changes made since the last look (``Bucket.sync_requires_grad``)."""
        for bucket in self.buckets:
            bucket.sync_requires_grad()

    def written_params(self) -> Iterator[tuple]:
        """(bucket, index) for every param user code wrote or rebound since the last look."""
        for bucket in self.buckets:
            yield from ((bucket, index) for index in bucket.written())

    def forget_writes(self) -> bool:
        """Make every written or rebound param a view again, without taking its values.

        Returns whether there was any; the caller then writes the params itself.
        """
        if self.unchanged():
            return False
        return sum(1 for _ in self.written_params()) > 0

    def mark_seen(self) -> None:
        """Take every param's current version as seen (after the optimizer wrote the params)."""
        for bucket in self.buckets:
            bucket.versions = [p._version for p in bucket.params]

    def grad_versions(self) -> list:
        """A fingerprint of the gradients: changes when a backward, zero_grad or assignment did."""
        return [bucket.grad_fingerprint() for bucket in self.buckets]

    def grads_dropped(self, fingerprint: list) -> bool:
        """Whether a param whose grad was its view at ``fingerprint`` (``grad_versions``) now has
        no grad at all (``zero_grad(set_to_none=True)`` through the model)."""
        return any(was_view and param.grad is None
                   for bucket, (_, views) in zip(self.buckets, fingerprint)
                   for param, was_view in zip(bucket.params, views))

    # -------------------------------------------------------------------------- moved params

    def follow_moves(self, hess_init: list) -> bool:
        """Rebuild the layout when params moved to another device or dtype (Note [moved params]).

        Returns whether it did. The state of a moved param moves with it; a param that user code
        wrote after moving it (``to_empty`` then ``reset_parameters``) takes its values as the mean.
        ``hess_init`` is each param group's initial Hessian, for state that never existed (meta).
        """
        if not any(bucket.moved() for bucket in self.buckets):
            return False
        old_buckets = [b for b in self.buckets if b.follows_moves]
        self.buckets = [b for b in self.buckets if not b.follows_moves]
        by_group: dict = {}
        for old in old_buckets:
            by_group.setdefault(old.group_index, []).append(old)
        for group_index in sorted(by_group):
            self._rebuild_group(group_index, by_group[group_index], hess_init[group_index])
        return True

    def _rebuild_group(self, group_index: int, old_buckets: list, hess_init: float) -> None:
        """New buckets for a group's params by their current (device, dtype), in offset order,
        each param's state moved over from its old bucket."""
        members = [(old, index) for old in old_buckets for index in range(len(old.params))]
        members.sort(key=lambda m: m[0].offsets[m[1]])
        by_key: dict = {}
        for old, index in members:
            param = old.params[index]
            by_key.setdefault((param.device, param.dtype), []).append((old, index))
        for (device, dtype), moving in by_key.items():
            bucket = Bucket.create(group_index, moving[0][0].group_start, device, dtype,
                                   [old.params[i] for old, i in moving],
                                   [old.offsets[i] for old, i in moving],
                                   self.backend_choice, self.low_precision)
            for new_index, (old, index) in enumerate(moving):
                _move_param(old, index, bucket, new_index, hess_init)
            self.buckets.append(bucket)


@torch.no_grad()
def _move_param(old: Bucket, index: int, new: Bucket, new_index: int, hess_init: float
                ) -> None:
    param = old.params[index]
    where, new_where = old.slice_of(index), new.slice_of(new_index)
    sdtype = new.mean.dtype
    new.param_views[new_index].copy_(param.detach())
    if old.device.type == "meta":  # nothing was ever computed there: start afresh
        new.mean[new_where].copy_(new.param_flat[new_where])
        new.hess[new_where].fill_(float(hess_init))
    else:
        for name in ("mean", "momentum", "hess"):
            target = getattr(new, name)
            target[new_where].copy_(getattr(old, name)[where].to(target.dtype))
        if old.trainable[index]:
            # a conversion keeps the values the optimizer wrote; what differs was written
            # by user code after the move (to_empty, then reset_parameters). The version
            # counter cannot tell: torch.utils.swap_tensors resets it.
            moved_values = old.param_views[index].to(device=new.device, dtype=param.dtype)
            written = new.param_views[new_index] != moved_values
            if bool(written.any()):
                mean = new.shaped(new.mean, new_index)
                mean.copy_(torch.where(written, new.param_views[new_index].to(sdtype), mean))
        for name in PRIOR_STATE:
            if getattr(old, name) is not None:
                new.ensure_prior(name)
                getattr(new, name)[new_where].copy_(getattr(old, name)[where].to(sdtype))
        if old.avg_grad is not None:
            new.ensure_averages()
            new.avg_grad[new_where].copy_(old.avg_grad[where].to(sdtype))
            new.avg_hess_term[new_where].copy_(old.avg_hess_term[where].to(sdtype))
    grad = param.grad
    if grad is not None and old.device.type != "meta":
        new.grad_views[new_index].copy_(grad.reshape(param.shape))
    new.bind(new_index)
    new.trainable[new_index] = old.trainable[index]
