"""A bucket: the trainable params of one param group with one (device, dtype), in flat
contiguous buffers.

Every ``p.data`` of a dense bucket lies in its flat ``param_flat`` and every ``p.grad`` is a view
into ``grad_flat``, with the param's own strides (a ``channels_last`` weight stays
``channels_last``): the flat order is each param's storage order, which is also the order of the
noise index (docs/DESIGN.md sections 3 and 4). The state (mean, momentum, hess, the sample
averages while a step takes several samples, and the group's prior where it has one) is flat
alongside.

Note [params own their storage]: a param's ``.data`` is not a view of ``param_flat`` (all views
share one storage, and serialization tools see one tensor: safetensors and accelerate then save
one param of many, ``torch.save`` of a sub-module writes the whole buffer). Each param gets a
tensor with a storage of its own over its part of ``param_flat``'s memory (``own_storage``: a
DLPack hand-over, whose deleter holds a reference to ``param_flat``), so every tool sees one
storage per param, exactly its bytes, while the kernels still make one pass over the flat
buffer. Each such storage keeps the buffer alive: deleting the optimizer leaves the model's
params valid. Gradients stay views of ``grad_flat`` (no tool serializes them).

A bucket also answers for what user code did to its params since the layout last looked (Note
[user writes to params] in ``_layout``): writes and rebinds, ``requires_grad`` changes, gradients
assigned or dropped. Sharded params (FSDP2 DTensors) live in ``_sharded.ShardedBucket``, a
subclass that overrides the methods below where FSDP owns the storage; ``FlatLayout`` never asks
which kind a bucket is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from . import backends
from .reference import moment_dtype, state_dtype

PRIOR_STATE = ("prior_mean", "prior_precision")  # optional per-element state of a group


@dataclass(eq=False)
class ParamEntry:
    """A param of a group as the layout knows it: its first element's global flat index, and
    its prior's sources (name -> a tensor shaped like it, or 'init': its values when it joins)."""
    param: torch.Tensor
    offset: int
    prior: dict = field(default_factory=dict)


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
    param_views: list = field(default_factory=list)  # each param's storage in param_flat
    grad_views: list = field(default_factory=list)   # each param's view into grad_flat
    versions: list = field(default_factory=list)     # each param's _version after our last look
    trainable: list = field(default_factory=list)    # each param's requires_grad at our last look
    _segments_key: tuple = ()
    _segments: list = field(default_factory=list)
    _bases: tuple = ()      # (param_flat, grad_flat) addresses the two lists below are from
    _param_ptrs: list = field(default_factory=list)  # each param's first element's address
    _grad_ptrs: list = field(default_factory=list)   # each grad view's first element's address

    # Note [moved params] in _layout: the layout rebuilds a bucket whose params user code moved
    # to another device or dtype; sharded params never move with it (ShardedBucket.local refuses)
    follows_moves = True

    @classmethod
    def create(cls, group_index: int, group_start: int, device, dtype: torch.dtype, params: list,
               offsets: list, backend_choice: str, low_precision: torch.dtype) -> "Bucket":
        """An empty bucket for ``params`` (uninitialized mean and hess), with each param's view
        into the flat param and grad buffers; ``low_precision`` is IVON's ``state_dtype``."""
        starts, total = quad_aligned_starts([p.numel() for p in params], offsets)
        sdtype, mdtype = state_dtype(dtype), moment_dtype(dtype, low_precision)
        bucket = cls(
            group_index=group_index, group_start=group_start, params=params, starts=starts,
            offsets=offsets,
            # zeros: the pads (Note [quads in the buffers]) hold finite values nobody reads
            param_flat=torch.zeros(total, dtype=dtype, device=device),
            grad_flat=torch.zeros(total, dtype=dtype, device=device),
            mean=torch.zeros(total, dtype=sdtype, device=device),
            momentum=torch.zeros(total, dtype=mdtype, device=device),
            hess=torch.zeros(total, dtype=mdtype, device=device),
            backend=backends.resolve(backend_choice, device, dtype))
        for index, param in enumerate(params):
            where, strides = bucket.slice_of(index), storage_strides(param)
            bucket.param_views.append(own_storage(_view(bucket.param_flat, where, param, strides)))
            bucket.grad_views.append(_view(bucket.grad_flat, where, param, strides))
        return bucket

    @classmethod
    def build(cls, group_index: int, group_start: int, device, dtype: torch.dtype,
              entries: list, backend_choice: str, hess_init: float,
              low_precision: torch.dtype) -> "Bucket":
        """A bucket that took over the params of ``entries`` (``ParamEntry``) with fresh state
        (``take_in``)."""
        bucket = cls.create(group_index, group_start, device, dtype,
                            [entry.param for entry in entries],
                            [entry.offset for entry in entries], backend_choice, low_precision)
        for index, entry in enumerate(entries):
            bucket.take_in(index, hess_init, entry.prior)
        return bucket

    @torch.no_grad()
    def take_in(self, index: int, hess_init: float, prior: dict) -> None:
        """Param ``index`` joins with fresh state: its values are the mean, the hess
        ``hess_init``, the momentum zero (``create``), its prior from ``prior`` (name -> a
        tensor, or 'init': its values), its current grad kept; then it (and its grad, when
        trainable) lives in the bucket (``bind``)."""
        param, where = self.params[index], self.slice_of(index)
        self.param_views[index].copy_(param.detach())
        self.mean[where].copy_(self.param_flat[where])
        self.hess[where].fill_(float(hess_init))
        for name, source in prior.items():
            self.ensure_prior(name)
            self.shaped(getattr(self, name), index).copy_(
                self.shaped(self.mean, index) if isinstance(source, str) else source)
        grad = param.grad if param.requires_grad else None
        if grad is not None:
            self.grad_views[index].copy_(grad.reshape(param.shape))
        self.bind(index)

    def bind(self, index: int) -> None:
        """Make the param (and its grad, when trainable) views into the bucket."""
        param = self.params[index]
        param.data = self.param_views[index]
        if param.requires_grad:
            param.grad = self.grad_views[index]
        while len(self.versions) <= index:
            self.versions.append(0)
            self.trainable.append(False)
        self.versions[index] = param._version
        self.trainable[index] = param.requires_grad

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

    def state_views(self) -> Iterator[tuple]:
        """(param, {'mean', 'momentum', 'hess'} views shaped like the param, and the prior's
        'prior_mean' / 'prior_precision' where the group has them) for every param."""
        names = ("mean", "momentum", "hess") + tuple(
            name for name in PRIOR_STATE if getattr(self, name) is not None)
        for index, param in enumerate(self.params):
            yield param, {name: self.shaped(getattr(self, name), index) for name in names}

    # ------------------------------------------------------------------ saving and loading

    def saved(self, index: int, flat: torch.Tensor) -> torch.Tensor:
        """How param ``index``'s part ``flat`` of a state buffer is saved in a state dict."""
        return flat

    def saved_values(self, index: int, saved: torch.Tensor) -> torch.Tensor:
        """The flat values of param ``index``'s part in a saved tensor (ValueError when they
        don't fit)."""
        return saved.reshape(-1)

    def attach_grad(self, index: int) -> None:
        """The param's gradient <- ``grad_flat``'s part (a checkpoint's pending gradient)."""
        self.params[index].grad = self.grad_views[index]

    # ------------------------------------------------------------------ what user code did

    def moved(self) -> bool:
        """Whether user code moved a param to another device or dtype (Note [moved params]):
        a move rebinds ``p.data``, so only rebound params are looked at."""
        return any(param.data_ptr() != expected
                   and (param.device != self.device or param.dtype != self.param_flat.dtype)
                   for param, expected in zip(self.params, self.expected_ptrs()[0]))

    @torch.no_grad()
    def sync_requires_grad(self) -> None:
        """Follow requires_grad changes: a param frozen since the last look gets its mean back
        (it may hold a sample); an unfrozen one starts from its current value."""
        for index, param in enumerate(self.params):
            if param.requires_grad == self.trainable[index]:
                continue
            where = self.slice_of(index)
            if param.requires_grad:
                self.mean[where].copy_(self.param_flat[where])
                # in the drop-in mode the backward may already have run: keep its grad
                view, grad = self.grad_views[index], param.grad
                if grad is None:
                    view.zero_()
                elif grad is not view:
                    view.copy_(grad.reshape(view.shape))
                param.grad = view
            else:
                self.param_flat[where].copy_(self.mean[where])
            self.trainable[index] = param.requires_grad

    def written(self) -> Iterator[int]:
        """Indices of the params user code wrote or rebound since the last look.

        A rebound ``p.data`` (same device, dtype and shape) is copied into the bucket and the
        param made a view again; the caller decides what the new values mean.
        """
        param_ptrs, _ = self.expected_ptrs()
        for index, (param, expected) in enumerate(zip(self.params, param_ptrs)):
            rebound = (param.data_ptr() != expected
                       or param.shape != self.param_views[index].shape)
            if not rebound and param._version == self.versions[index]:
                continue
            if rebound:
                self._take_rebound(index)
            self.versions[index] = param._version
            yield index

    def _take_rebound(self, index: int) -> None:
        param, view = self.params[index], self.param_views[index]
        if param.shape != view.shape:
            raise RuntimeError(
                "a parameter managed by IVON changed its shape from "
                f"{tuple(view.shape)} to {tuple(param.shape)}; build a new optimizer")
        if param.numel() > 1 and storage_strides(param) != view.stride():
            # the noise index follows each param's storage order (DESIGN.md 3): a new memory
            # format would silently change every element's noise
            raise RuntimeError(
                "a parameter managed by IVON changed its memory layout (strides "
                f"{tuple(view.stride())} -> {tuple(param.stride())}), e.g. "
                "model.to(memory_format=...) after the optimizer was built; convert "
                "the model before building the optimizer")
        # a fresh storage over the param's place: the old one may have moved (share_memory_)
        fresh = own_storage(_view(self.param_flat, self.slice_of(index), view, view.stride()))
        with torch.no_grad():
            fresh.copy_(param.data)
        self.param_views[index] = fresh
        param.data = fresh

    def gather_grads(self) -> None:
        """Make ``grad_flat`` hold every trainable param's current ``.grad``."""
        if self.grads_bound():
            return
        for index, param in enumerate(self.params):
            if not self.trainable[index] or self.holds_grad(index):
                continue
            grad = param.grad
            view = (self.renew_grad_view(index) if grad is self.grad_views[index]
                    else self.grad_views[index])
            if grad is None:
                view.zero_()
            else:  # a sparse gradient is densified (docs/FAULTS.md): IVON's step is dense
                view.copy_((grad.to_dense() if grad.is_sparse else grad).reshape(view.shape))
            param.grad = view

    def grad_fingerprint(self) -> tuple:
        """Changes when a backward, zero_grad or assignment changed a gradient; the second item
        says which params had their gradient (``FlatLayout.grads_dropped``)."""
        return (self.grad_flat._version,
                [param.grad is view for param, view in zip(self.params, self.grad_views)])

    def zero_grads(self) -> None:
        self.grad_flat.zero_()
        for index, param in enumerate(self.params):
            if param.requires_grad and not self.holds_grad(index):
                param.grad = (self.renew_grad_view(index)
                              if param.grad is self.grad_views[index]
                              else self.grad_views[index])

    def copy_marks(self) -> tuple:
        """What a copy must know of the params that the copied params cannot say (a copied
        ``Parameter`` has a fresh version and no grad): for each param, whether user code wrote
        it since the layout last looked, and whether its grad is its view into ``grad_flat``."""
        return ([param._version != version for param, version in zip(self.params, self.versions)],
                [self.holds_grad(index) for index in range(len(self.params))])

    def realias(self, marks: tuple) -> None:
        """After a copy (``copy.deepcopy``, pickle): each param's own storage over the copied
        ``param_flat`` again, holding the param's copied values, and each grad view a view of
        the copied ``grad_flat`` (a plain pickle copies every tensor apart; Note [copies] in
        optimizer), as the original's ``copy_marks`` say."""
        unseen, held = marks
        for index, param in enumerate(self.params):
            where, strides = self.slice_of(index), self.param_views[index].stride()
            fresh = own_storage(_view(self.param_flat, where, param, strides))
            with torch.no_grad():
                fresh.copy_(param.data)
            self.param_views[index] = fresh
            param.data = fresh
            self.versions[index] = -1 if unseen[index] else param._version
            self.grad_views[index] = _view(self.grad_flat, where, param, strides)
            if held[index]:
                param.grad = self.grad_views[index]

    def publish(self) -> None:
        """After the optimizer wrote ``param_flat``: the params are views of it already."""


def quad_aligned_starts(sizes: list, offsets: list) -> tuple:
    """(each param's first element in its bucket, the buffers' length) for params of ``sizes`` at
    the global ``offsets``, in order.

    Note [quads in the buffers]: the noise comes in quads of 4 elements with the same global
    index >> 2 (docs/DESIGN.md section 3), which the kernels load and store as one 16-byte word
    (fp32) when it lies on a 16-byte boundary. A param whose global offset does not follow on from
    the previous one in the bucket (a bucket's first param after an odd-sized param group, a
    param after an odd-sized waiting param or one of another dtype) starts after a pad of up to
    3 elements, at a position congruent to its global offset modulo 4: local and global index
    then agree modulo 4 everywhere, every quad of the bucket is one aligned word, and the
    segments that start mid-quad still run on aligned words (a masked head; Note [segments
    from their quad] in triton_backend). A bucket whose offsets run on from a multiple of 4 has
    no pad. Pads belong to no param: no view, no saved state, no segment covers them.
    """
    starts, end = [], 0
    for size, offset in zip(sizes, offsets):
        start = end + (offset - end) % 4
        starts.append(start)
        end = start + size
    return starts, end


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


def own_storage(view: torch.Tensor) -> torch.Tensor:
    """A tensor over ``view``'s memory with a storage of its own, which keeps the memory
    alive (Note [params own their storage]); on the meta device, which has no memory (and no
    DLPack), the view itself."""
    if view.device.type == "meta":
        return view.detach()
    return torch.from_dlpack(view.detach())


def _view(flat: torch.Tensor, where: slice, like: torch.Tensor, strides: tuple) -> torch.Tensor:
    return torch.as_strided(flat[where], like.shape, strides)


