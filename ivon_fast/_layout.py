"""The flat layout: params, grads and optimizer state in contiguous buffers per bucket.

A bucket holds the params of one param group with one (device, dtype). Every ``p.data`` and
``p.grad`` is a view into the bucket's flat buffers, with the param's own strides (a
``channels_last`` weight stays ``channels_last``): the flat order is each param's storage order,
which is also the order of the noise index (docs/DESIGN.md sections 3 and 4). The state (mean,
momentum, hess, and the sample averages while a step takes several samples) is flat alongside.

Sharded params (FSDP2 DTensors) cannot be views: FSDP owns their storage. They go to a
``ShardedBucket`` (``_sharded``): flat state over the rank's local shards, with the params and
grads copied in and out (``gather_grads``, ``publish``); the loops below hand such buckets to it.

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

import itertools
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from . import backends
from .reference import moment_dtype, state_dtype

PRIOR_STATE = ("prior_mean", "prior_precision")  # optional per-element state of a group


def resolve_backend(choice: str, device, dtype: torch.dtype, low_precision: torch.dtype) -> str:
    """The concrete backend of a bucket of ``dtype`` params on ``device`` whose momentum and hess
    are ``low_precision`` (IVON's ``state_dtype``; ``backends.resolve``): 'auto' takes the
    fastest backend that implements that state dtype, an explicit backend that does not is a
    ValueError. float64 params keep float64 state (``moment_dtype``) whatever ``low_precision``
    says, and resolve as with float32 state (the reference takes them, no kernel does)."""
    return backends.resolve(choice, device, dtype,
                            torch.float32 if dtype == torch.float64 else low_precision)


@dataclass
class Segment:
    """A run of trainable params contiguous both in their bucket and in the global index."""
    start: int
    stop: int
    offset: int  # global flat index of the run's first element

    @property
    def slice(self) -> slice:
        return slice(self.start, self.stop)


@dataclass(eq=False)  # identity: buckets hold tensors
class Bucket:
    """The params of one param group with one (device, dtype), in flat contiguous buffers."""
    group_index: int
    group_start: int        # the global index of the param group's first element
    params: list
    starts: list            # each param's first element in the bucket
    offsets: list           # each param's first element in the global flat index space
    param_flat: torch.Tensor
    grad_flat: torch.Tensor
    mean: torch.Tensor
    momentum: torch.Tensor
    hess: torch.Tensor
    backend: str
    avg_grad: Optional[torch.Tensor] = None
    avg_hess_term: Optional[torch.Tensor] = None
    # the group's prior, per element, when it has one (docs/DESIGN.md section 14); None: the
    # zero-mean prior of precision weight_decay
    prior_mean: Optional[torch.Tensor] = None
    prior_precision: Optional[torch.Tensor] = None
    param_views: list = field(default_factory=list)  # each param's view into param_flat
    grad_views: list = field(default_factory=list)   # each param's view into grad_flat
    versions: list = field(default_factory=list)     # each param's _version after our last look
    trainable: list = field(default_factory=list)    # each param's requires_grad at our last look
    _segments_key: tuple = ()
    _segments: list = field(default_factory=list)
    _bases: tuple = ()      # (param_flat, grad_flat) addresses the two lists below are from
    _param_ptrs: list = field(default_factory=list)  # each param's first element's address
    _grad_ptrs: list = field(default_factory=list)   # each grad view's first element's address

    sharded = False  # ShardedBucket (_sharded): params in storage the framework owns

    @property
    def device(self) -> torch.device:
        return self.param_flat.device

    def slice_of(self, index: int) -> slice:
        return slice(self.starts[index], self.starts[index] + self.params[index].numel())

    def segments(self) -> list:
        """The runs of trainable params, merged where both orders agree (one launch each)."""
        key = tuple(self.trainable)
        if key != self._segments_key:
            self._segments, run = [], None
            for index in range(len(self.params)):
                if not self.trainable[index]:
                    run = None
                    continue
                where, offset = self.slice_of(index), self.offsets[index]
                start = where.start
                if where.stop == start:  # empty (e.g. a rank's share of a one-row param)
                    continue
                if run is not None and run.stop == start and run.offset + start - run.start == offset:
                    run.stop = where.stop
                else:
                    run = Segment(start, where.stop, offset)
                    self._segments.append(run)
            self._segments_key = key
        return self._segments

    def expected_ptrs(self) -> tuple:
        """Each param's and grad view's expected address, from the buffers' current storage (a
        ``share_memory_()`` moves a storage in place, and every view with it)."""
        bases = (self.param_flat.data_ptr(), self.grad_flat.data_ptr())
        if bases != self._bases:
            param_size, grad_size = self.param_flat.element_size(), self.grad_flat.element_size()
            self._param_ptrs = [bases[0] + start * param_size for start in self.starts]
            self._grad_ptrs = [bases[1] + start * grad_size for start in self.starts]
            self._bases = bases
        return self._param_ptrs, self._grad_ptrs

    def unchanged(self) -> bool:
        """Whether every param and grad is exactly as the layout left them: no write, rebind or
        ``requires_grad`` change, every trainable grad its view into ``grad_flat``.

        Note [the per-step check]: this is the only per-param work of an optimizer call when user
        code changed nothing: a few attribute reads per param in one loop. Anything it finds
        sends the caller down the full, slower paths, which sort out what happened.
        """
        param_ptrs, grad_ptrs = self.expected_ptrs()
        for param, version, trainable, param_ptr, view, grad_ptr, param_view in zip(
                self.params, self.versions, self.trainable, param_ptrs, self.grad_views,
                grad_ptrs, self.param_views):
            # the shape too: p.data = p.data.view(...) keeps the address and the version
            if (param._version != version or param.requires_grad != trainable
                    or param.data_ptr() != param_ptr or param.shape != param_view.shape):
                return False
            if trainable and (param.grad is not view or view.data_ptr() != grad_ptr):
                return False
        return True

    def grads_bound(self) -> bool:
        """Whether every trainable param's grad is its view into ``grad_flat``."""
        _, grad_ptrs = self.expected_ptrs()
        return all(param.grad is view and view.data_ptr() == grad_ptr
                   for param, trainable, view, grad_ptr in zip(
                       self.params, self.trainable, self.grad_views, grad_ptrs)
                   if trainable)

    def holds_grad(self, index: int) -> bool:
        """Whether the param's ``.grad`` is its view into ``grad_flat``.

        ``model.to(...)`` and ``to_empty`` rebind ``p.grad.data`` too, which moves our view object
        itself away from the buffer: compare the storage, not only the object.
        """
        view = self.grad_views[index]
        return (self.params[index].grad is view
                and view.data_ptr() == self.expected_ptrs()[1][index])

    def renew_grad_view(self, index: int) -> torch.Tensor:
        """A fresh view for a param whose grad view object was rebound away from the buffer."""
        old = self.grad_views[index]
        self.grad_views[index] = _view(self.grad_flat, self.slice_of(index), old,
                                       self.param_views[index].stride())
        return self.grad_views[index]

    def shaped(self, flat: torch.Tensor, index: int) -> torch.Tensor:
        """Param ``index``'s part of a flat state buffer, shaped and strided like the param."""
        view = self.param_views[index]
        return torch.as_strided(flat[self.slice_of(index)], view.shape, view.stride())

    def prior_inputs(self, where: slice, update: bool = False) -> dict:
        """The prior's inputs of an op over ``where`` (only those the group has: an op without
        them reads nothing more)."""
        inputs = {}
        if self.prior_precision is not None:
            inputs["prior_precision"] = self.prior_precision[where]
        if update and self.prior_mean is not None:
            inputs["prior_mean"] = self.prior_mean[where]
        return inputs

    def ensure_prior(self, name: str) -> None:
        """Allocate the prior state ``name`` ('prior_mean' or 'prior_precision') if missing."""
        if getattr(self, name) is None:
            setattr(self, name, torch.zeros_like(self.mean))

    def ensure_averages(self) -> None:
        if self.avg_grad is None:
            self.avg_grad = torch.zeros_like(self.mean)
            self.avg_hess_term = torch.zeros_like(self.mean)


def storage_strides(tensor: torch.Tensor) -> tuple:
    """The strides of a view that lays ``tensor``'s elements out as ``tensor`` does in memory.

    A dense tensor (its elements fill ``numel`` consecutive slots in some order, e.g.
    channels_last) keeps its strides; anything else (a slice with gaps, overlapping strides) gets
    the contiguous ones.
    """
    contiguous = []
    running = 1
    for size in reversed(tensor.shape):
        contiguous.append(running)
        running *= size
    contiguous = tuple(reversed(contiguous))
    if tensor.numel() == 0 or tensor.is_contiguous():
        return contiguous
    expected = 1
    for dim in sorted(range(tensor.dim()), key=lambda d: tensor.stride(d)):
        if tensor.shape[dim] == 1:
            continue
        if tensor.stride(dim) != expected:
            return contiguous
        expected *= tensor.shape[dim]
    return tuple(tensor.stride())


def _view(flat: torch.Tensor, where: slice, like: torch.Tensor, strides: tuple) -> torch.Tensor:
    return torch.as_strided(flat[where], like.shape, strides)


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
        from ._sharded import ShardedBucket, is_sharded

        by_key: dict = {}
        group_start = self.numel
        for param in params:
            by_key.setdefault((param.device, param.dtype, is_sharded(param)), []).append(
                (param, self.numel))
            self.numel += param.numel()  # a DTensor's numel is the unsharded param's
        new_buckets = []
        for (device, dtype, sharded), members in by_key.items():
            if sharded:  # FSDP2 keeps their storage: no rebinding (_sharded)
                bucket = ShardedBucket.create(group_index, group_start, device, dtype,
                                              [p for p, _ in members], [o for _, o in members],
                                              self.backend_choice, hess_init, self.low_precision)
                self.buckets.append(bucket)
                new_buckets.append(bucket)
                continue
            bucket = self._make_bucket(group_index, group_start, device, dtype,
                                       [p for p, _ in members], [offset for _, offset in members])
            for index, param in enumerate(bucket.params):
                where = bucket.slice_of(index)
                with torch.no_grad():
                    bucket.param_views[index].copy_(param.detach())
                    bucket.mean[where].copy_(bucket.param_flat[where])
                    grad = param.grad if param.requires_grad else None
                    if grad is not None:
                        bucket.grad_views[index].copy_(grad)
                bucket.hess[where].fill_(float(hess_init))
                self._bind(bucket, index)
            self.buckets.append(bucket)
            new_buckets.append(bucket)
        return new_buckets

    def _make_bucket(self, group_index, group_start, device, dtype, params, offsets) -> Bucket:
        sizes = [p.numel() for p in params]
        starts = [0, *itertools.accumulate(sizes)][:-1]
        total, sdtype = sum(sizes), state_dtype(dtype)
        mdtype = moment_dtype(dtype, self.low_precision)
        bucket = Bucket(
            group_index=group_index, group_start=group_start, params=params, starts=starts,
            offsets=offsets,
            param_flat=torch.empty(total, dtype=dtype, device=device),
            grad_flat=torch.zeros(total, dtype=dtype, device=device),
            mean=torch.empty(total, dtype=sdtype, device=device),
            momentum=torch.zeros(total, dtype=mdtype, device=device),
            hess=torch.empty(total, dtype=mdtype, device=device),
            backend=resolve_backend(self.backend_choice, device, dtype, self.low_precision))
        for index, param in enumerate(params):
            strides = storage_strides(param)
            bucket.param_views.append(_view(bucket.param_flat, bucket.slice_of(index), param, strides))
            bucket.grad_views.append(_view(bucket.grad_flat, bucket.slice_of(index), param, strides))
        return bucket

    @staticmethod
    def _bind(bucket: Bucket, index: int) -> None:
        """Make the param (and its grad, when trainable) views into the bucket."""
        param = bucket.params[index]
        param.data = bucket.param_views[index]
        if param.requires_grad:
            param.grad = bucket.grad_views[index]
        while len(bucket.versions) <= index:
            bucket.versions.append(0)
            bucket.trainable.append(False)
        bucket.versions[index] = param._version
        bucket.trainable[index] = param.requires_grad

    def state_views(self) -> Iterator[tuple]:
        """(param, {'mean', 'momentum', 'hess'} views shaped like the param, and the prior's
        'prior_mean' / 'prior_precision' where the group has them) for every param."""
        for bucket in self.buckets:
            if bucket.sharded:
                yield from bucket.state_views()
                continue
            names = ("mean", "momentum", "hess") + tuple(
                name for name in PRIOR_STATE if getattr(bucket, name) is not None)
            for index, param in enumerate(bucket.params):
                yield param, {name: bucket.shaped(getattr(bucket, name), index)
                              for name in names}

    # -------------------------------------------------------------------------- the op loop

    def segments(self, buckets=None) -> Iterator[tuple]:
        """(bucket, segment) for every run of trainable params, in bucket order."""
        for bucket in self.buckets if buckets is None else buckets:
            for segment in bucket.segments():
                yield bucket, segment

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
        """Follow requires_grad changes made since the last look.

        A param frozen since then gets its mean back (it may hold a sample); an unfrozen one starts
        from its current value.
        """
        for bucket in self.buckets:
            if bucket.sharded:
                bucket.sync_requires_grad()
                continue
            for index, param in enumerate(bucket.params):
                if param.requires_grad == bucket.trainable[index]:
                    continue
                where = bucket.slice_of(index)
                with torch.no_grad():
                    if param.requires_grad:
                        bucket.mean[where].copy_(bucket.param_flat[where])
                        # in the drop-in mode the backward may already have run: keep its grad
                        view, grad = bucket.grad_views[index], param.grad
                        if grad is None:
                            view.zero_()
                        elif grad is not view:
                            view.copy_(grad.reshape(view.shape))
                        param.grad = view
                    else:
                        bucket.param_flat[where].copy_(bucket.mean[where])
                bucket.trainable[index] = param.requires_grad

    def follow_moves(self, hess_init: list) -> bool:
        """Rebuild the layout when params moved to another device or dtype (Note [moved params]).

        Returns whether it did. The state of a moved param moves with it; a param that user code
        wrote after moving it (``to_empty`` then ``reset_parameters``) takes its values as the mean.
        ``hess_init`` is each param group's initial Hessian, for state that never existed (meta).
        """
        # a move rebinds p.data: look at the device and dtype of rebound params only
        # sharded params never move with the layout: ShardedBucket.local refuses a moved shard
        moved = any(p.data_ptr() != expected
                    and (p.device != b.device or p.dtype != b.param_flat.dtype)
                    for b in self.buckets if not b.sharded
                    for p, expected in zip(b.params, b.expected_ptrs()[0]))
        if not moved:
            return False
        old_buckets = [b for b in self.buckets if not b.sharded]
        self.buckets = [b for b in self.buckets if b.sharded]
        by_group: dict = {}
        for old in old_buckets:
            by_group.setdefault(old.group_index, []).append(old)
        for group_index in sorted(by_group):
            members = [(old, index) for old in by_group[group_index]
                       for index in range(len(old.params))]
            members.sort(key=lambda m: m[0].offsets[m[1]])
            by_key: dict = {}
            for old, index in members:
                param = old.params[index]
                by_key.setdefault((param.device, param.dtype), []).append((old, index))
            for (device, dtype), moving in by_key.items():
                bucket = self._make_bucket(group_index, moving[0][0].group_start, device, dtype,
                                           [old.params[i] for old, i in moving],
                                           [old.offsets[i] for old, i in moving])
                for new_index, (old, index) in enumerate(moving):
                    self._move_param(old, index, bucket, new_index, hess_init[group_index])
                self.buckets.append(bucket)
        return True

    @staticmethod
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
        FlatLayout._bind(new, new_index)
        new.trainable[new_index] = old.trainable[index]

    def written_params(self) -> Iterator[tuple]:
        """(bucket, index) for every param user code wrote or rebound since the last look.

        A rebound ``p.data`` (same device, dtype and shape) is copied into the bucket and the param
        made a view again; the caller decides what the new values mean.
        """
        for bucket in self.buckets:
            if bucket.sharded:
                yield from ((bucket, index) for index in bucket.written())
                continue
            param_ptrs, _ = bucket.expected_ptrs()
            for index, (param, expected) in enumerate(zip(bucket.params, param_ptrs)):
                rebound = (param.data_ptr() != expected
                           or param.shape != bucket.param_views[index].shape)
                if not rebound and param._version == bucket.versions[index]:
                    continue
                if rebound:
                    view = bucket.param_views[index]
                    if param.shape != view.shape:
                        raise RuntimeError(
                            "a parameter managed by IVON changed its shape from "
                            f"{tuple(view.shape)} to {tuple(param.shape)}; build a new optimizer")
                    if param.numel() > 1 and storage_strides(param) != view.stride():
                        # the noise index follows each param's storage order (DESIGN.md 3):
                        # a new memory format would silently change every element's noise
                        raise RuntimeError(
                            "a parameter managed by IVON changed its memory layout (strides "
                            f"{tuple(view.stride())} -> {tuple(param.stride())}), e.g. "
                            "model.to(memory_format=...) after the optimizer was built; convert "
                            "the model before building the optimizer")
                    with torch.no_grad():
                        view.copy_(param.data)
                    param.data = view
                bucket.versions[index] = param._version
                yield bucket, index

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

    def gather_grads(self) -> None:
        """Make the flat gradient buffer hold every trainable param's current ``.grad``."""
        for bucket in self.buckets:
            if bucket.sharded:
                bucket.gather_grads()
                continue
            if bucket.grads_bound():
                continue
            for index, param in enumerate(bucket.params):
                if not bucket.trainable[index] or bucket.holds_grad(index):
                    continue
                grad = param.grad
                view = (bucket.renew_grad_view(index) if grad is bucket.grad_views[index]
                        else bucket.grad_views[index])
                if grad is None:
                    view.zero_()
                elif grad.is_sparse:
                    raise RuntimeError("IVON does not support sparse gradients (e.g. "
                                       "nn.Embedding(sparse=True)); use dense gradients")
                else:
                    view.copy_(grad.reshape(view.shape))
                param.grad = view

    def grad_versions(self) -> list:
        """A fingerprint of the gradients: changes when a backward, zero_grad or assignment did."""
        return [bucket.grad_fingerprint() if bucket.sharded else
                (bucket.grad_flat._version,
                 [param.grad is view for param, view in zip(bucket.params, bucket.grad_views)])
                for bucket in self.buckets]

    def grads_dropped(self, fingerprint: list) -> bool:
        """Whether a param whose grad was its view at ``fingerprint`` (``grad_versions``) now has
        no grad at all (``zero_grad(set_to_none=True)`` through the model)."""
        return any(was_view and param.grad is None
                   for bucket, (_, views) in zip(self.buckets, fingerprint)
                   for param, was_view in zip(bucket.params, views))

    def zero_grads(self) -> None:
        for bucket in self.buckets:
            if bucket.sharded:
                bucket.zero_grads()
                continue
            bucket.grad_flat.zero_()
            for index, param in enumerate(bucket.params):
                if param.requires_grad and not bucket.holds_grad(index):
                    param.grad = (bucket.renew_grad_view(index)
                                  if param.grad is bucket.grad_views[index]
                                  else bucket.grad_views[index])

    def restore(self) -> None:
        """Trainable params <- their mean."""
        for bucket, segment in self.segments():
            bucket.param_flat[segment.slice].copy_(bucket.mean[segment.slice])
        self.publish()

    def publish(self, buckets=None) -> None:
        """After the optimizer wrote ``param_flat``: sharded params get the values (_sharded)."""
        for bucket in self.buckets if buckets is None else buckets:
            if bucket.sharded:
                bucket.publish()
