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

Note [params that wait]: a param that does not train (``requires_grad=False`` when its group is
added, or without elements) is not taken into a bucket: it keeps its own storage, and costs no
state and no gradient buffer, so ``IVON(peft_model.parameters())`` holds what
``IVON(adapter params)`` holds. It waits (``FlatLayout.waiting``) with its global offset and its
prior's sources; its elements keep their place in the global index, so the noise of every other
param is the same either way. When it first trains (``requires_grad`` set, checked at every
optimizer call), its group's buckets are rebuilt with it (``admit``): it joins with fresh state
from its current values, as an unfrozen param always did. A param frozen after it trained stays
in its bucket with its state (it may train again).

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

from dataclasses import dataclass

from ._bucket import PRIOR_STATE, Bucket, ParamEntry
from ._sharded import ShardedBucket, is_sharded


@dataclass(eq=False)
class Waiting:
    """A param that does not train yet (Note [params that wait])."""
    group_index: int
    group_start: int  # the global index of its param group's first element
    entry: ParamEntry


def trains(param: torch.Tensor) -> bool:
    """Whether a param takes part in training: it requires grad and has elements."""
    return param.requires_grad and param.numel() > 0


class FlatLayout:
    """The buckets of all param groups, and what user code did to their params."""

    def __init__(self, backend_choice: str, low_precision: torch.dtype = torch.float32):
        self.backend_choice = backend_choice
        self.low_precision = low_precision  # IVON's state_dtype: momentum and hess
        self.buckets: list = []
        self.waiting: list = []  # Note [params that wait]
        self.numel = 0  # elements in the global flat index space so far
        self.grads_at_rest = None  # Note [a step without a gradient]: rest_mark(), None: unknown

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["copy_marks"] = [bucket.copy_marks() for bucket in self.buckets]
        state["at_rest"] = not self.gradient_arrived()  # a copy's versions start afresh
        return state

    def __setstate__(self, state: dict) -> None:
        marks, at_rest = state.pop("copy_marks"), state.pop("at_rest")
        self.__dict__.update(state)
        for bucket, bucket_marks in zip(self.buckets, marks):
            bucket.realias(bucket_marks)
        self.grads_at_rest = self.rest_mark() if at_rest else None

    # -------------------------------------------------------------------------- construction

    def add_group(self, group_index: int, params: list, hess_init: float,
                  priors: dict) -> list:
        """Move a param group's trainable params into new buckets (returned); the others wait
        (Note [params that wait]). ``priors``: the group's prior sources by name (None, 'init',
        or one tensor per param)."""
        by_key: dict = {}
        group_start = self.numel
        for position, param in enumerate(params):
            prior = {name: value if isinstance(value, str) else value[position].detach()
                     for name, value in priors.items() if value is not None}
            entry = ParamEntry(param, self.numel, prior)
            self.numel += param.numel()  # a DTensor's numel is the unsharded param's
            if is_sharded(param):  # FSDP2 keeps its storage; its buckets hold every param
                by_key.setdefault((param.device, param.dtype, ShardedBucket), []).append(entry)
            elif trains(param):
                by_key.setdefault((param.device, param.dtype, Bucket), []).append(entry)
            else:
                self.waiting.append(Waiting(group_index, group_start, entry))
        new_buckets = [kind.build(group_index, group_start, device, dtype, entries,
                                  self.backend_choice, hess_init, self.low_precision)
                       for (device, dtype, kind), entries in by_key.items()]
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
        per-step check] in Bucket.unchanged), and no waiting param trains now."""
        return (all(bucket.unchanged() for bucket in self.buckets)
                and not any(trains(waiting.entry.param) for waiting in self.waiting))

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

    def rest_mark(self) -> list:
        """The gradients as the optimizer left them (after a step or its own zero_grad)."""
        return [(bucket, bucket.grad_flat._version) for bucket in self.buckets]

    def gradient_arrived(self, grads_bound: bool = False) -> bool:
        """Whether a trainable param got a gradient since ``grads_at_rest``: a backward into its
        view, or a tensor of its own (a grad of None is none). Unknown counts as arrived.
        ``grads_bound``: every trainable grad is known to be its view (``unchanged()``), so the
        buffers' versions alone tell.

        Note [a step without a gradient]: a drop-in ``step()`` when no trainable param got a
        gradient since the last step (no backward; or only ``zero_grad``) does nothing, as
        torch.optim's step does for params without a gradient: the params keep their sample,
        the state and the step count stay. (Without it, the step would move the mean by the
        weight decay and the momentum of a zero gradient.)
        """
        if self.grads_at_rest is None or [b for b, _ in self.grads_at_rest] != self.buckets:
            return True
        if grads_bound:
            return any(bucket.grad_flat._version != version
                       for bucket, version in self.grads_at_rest)
        # (a waiting param that trains now has joined a new bucket first: _user_writes.prepare)
        return any(bucket.trainable[index] and param.grad is not None
                   and (not bucket.holds_grad(index) or bucket.grad_flat._version != version)
                   for bucket, version in self.grads_at_rest
                   for index, param in enumerate(bucket.params))

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
        for group_index in sorted({old.group_index for old in old_buckets}):
            self._rebuild_group([old for old in old_buckets if old.group_index == group_index],
                                [], hess_init[group_index])
        return True

    def admit_new_trainables(self, hess_init: list) -> bool:
        """Waiting params that train now join their groups' buckets (Note [params that wait]);
        returns whether any did. ``hess_init``: each param group's initial Hessian."""
        joining = [waiting for waiting in self.waiting if trains(waiting.entry.param)]
        self.admit(joining, hess_init)
        return bool(joining)

    def admit(self, joining: list, hess_init: list) -> None:
        """The ``Waiting`` params of ``joining`` join their groups' buckets, which are rebuilt."""
        self.waiting = [waiting for waiting in self.waiting if waiting not in joining]
        for group_index in sorted({waiting.group_index for waiting in joining}):
            old = [b for b in self.buckets if b.group_index == group_index and b.follows_moves]
            self.buckets = [b for b in self.buckets if b not in old]
            self._rebuild_group(old, [w for w in joining if w.group_index == group_index],
                                hess_init[group_index])

    def _rebuild_group(self, old_buckets: list, joining: list, hess_init: float) -> None:
        """New buckets for a group's params by their current (device, dtype), in offset order:
        each bucket member's state moved over from its old bucket, each joining param's fresh."""
        members = [(old.offsets[i], old.params[i], (old, i))
                   for old in old_buckets for i in range(len(old.params))]
        members += [(w.entry.offset, w.entry.param, w) for w in joining]
        members.sort(key=lambda member: member[0])
        first = old_buckets[0] if old_buckets else joining[0]
        group_index, group_start = first.group_index, first.group_start
        by_key: dict = {}
        for member in members:
            by_key.setdefault((member[1].device, member[1].dtype), []).append(member)
        for (device, dtype), moving in by_key.items():
            bucket = Bucket.create(group_index, group_start, device, dtype,
                                   [param for _, param, _ in moving],
                                   [offset for offset, _, _ in moving],
                                   self.backend_choice, self.low_precision)
            for new_index, (_, _, source) in enumerate(moving):
                if isinstance(source, Waiting):
                    bucket.take_in(new_index, hess_init, source.entry.prior)
                else:
                    _move_param(*source, bucket, new_index, hess_init)
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
