"""Sharded params (FSDP2's ``fully_shard``: DTensor params) in the flat layout.

docs/DESIGN.md section 12 describes the decision; in short:

- FSDP2 owns each sharded param's local storage (``p.to_local()`` is a view into FSDP's padded
  shard, which it all-gathers before each forward and may reallocate, e.g. at its lazy init), so
  ``p.data`` is never rebound. A ``ShardedBucket`` is an ordinary flat bucket over the LOCAL
  shards of its params: the state (mean, momentum, hess, sample averages) is flat per shard, and
  the kernels run on its flat ``param_flat`` / ``grad_flat`` exactly as for dense params.
- The params and grads are addressed in place, by lists fetched afresh at every use: before a
  kernel reads gradients, ``gather_grads`` copies each ``p.grad.to_local()`` into ``grad_flat``;
  after the optimizer wrote ``param_flat`` (a sample, the mean, an update), ``publish`` copies it
  back into each ``p.to_local()``. One ``torch._foreach_copy_`` each: 8 extra bytes per element
  and pass, and two extra flat copies of the local shard (``param_flat``, ``grad_flat``).
- The noise of an element is indexed by its position in the UNSHARDED model's flat order
  (docs/DESIGN.md section 3): a param's local shard must be one contiguous run of the full
  param's row-major order (``Shard(0)``, uneven and empty shards included; ``Replicate`` mesh
  dimensions too), and the bucket's ``offsets`` hold the global index of each shard's first
  element: the param's offset plus the shard's ``compute_local_shape_and_global_offset`` offset
  in row-major order.
- User writes to a param (``model.load_state_dict``, ``p.copy_`` under no_grad) bump the DTensor's
  version counter; our writes go to the local tensor, whose version counter is its own, so the
  layout's version bookkeeping applies unchanged. A write through ``p.to_local()`` is not seen
  (as a write through ``p.data`` is not for dense params).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch

from . import backends
from ._bucket import Bucket, quad_aligned_starts, storage_strides
from .reference import moment_dtype, state_dtype

_STATE = ("mean", "momentum", "hess")


def _dtensor_types():
    """(DTensor, Shard, Replicate), or None while ``torch.distributed.tensor`` is not imported:
    then no param can be a DTensor, and dense users do not pay for the import (about a second)."""
    module = sys.modules.get("torch.distributed.tensor")
    if module is None:
        return None
    return module.DTensor, module.Shard, module.Replicate


def is_sharded(param) -> bool:
    """Whether the layout handles ``param`` as a sharded (DTensor) param."""
    types = _dtensor_types()
    return types is not None and isinstance(param, types[0])


def _local(tensor: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return tensor.to_local()


def _shard_start(param) -> int:
    """The index of the local shard's first element in the full param's row-major order.

    Raises ValueError when the local shard is not one contiguous run of that order (e.g.
    ``Shard(1)`` of a matrix, or strided / partial placements).
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, shard_type, replicate_type = _dtensor_types()
    for placement in param.placements:
        if type(placement) not in (shard_type, replicate_type):
            raise ValueError(
                f"Invalid param: IVON supports DTensor params placed with Shard and Replicate "
                f"(FSDP2's fully_shard: Shard(0)), got placements {tuple(param.placements)}")
    shape = tuple(param.shape)
    local_shape, global_offset = compute_local_shape_and_global_offset(
        shape, param.device_mesh, param.placements)
    local = _local(param)
    if math.prod(local_shape) != local.numel():
        raise ValueError(  # pragma: no cover - DTensor's own invariant
            f"Invalid param: a DTensor's local shard has {local.numel()} elements, its placements "
            f"say {math.prod(local_shape)}")
    if local.numel() == 0:
        return 0
    split = [d for d in range(len(shape)) if local_shape[d] != shape[d]]
    if split and (any(shape[d] != 1 for d in range(split[0]))
                  or any(local_shape[d] != shape[d] for d in range(split[0] + 1, len(shape)))):
        raise ValueError(
            f"Invalid param: the local shard {tuple(local_shape)} of a DTensor param of shape "
            f"{shape} (placements {tuple(param.placements)}) is not a contiguous run of its "
            "elements; IVON's noise is indexed by the unsharded model's flat order, which needs "
            "shards of whole rows (Shard(0), as FSDP2's fully_shard places them)")
    start, stride = 0, 1
    for size, offset in zip(reversed(shape), reversed(global_offset)):
        start += offset * stride
        stride *= size
    return start


def check_params(params: list, *, sync: bool, rng: str) -> None:
    """The constructor's checks for sharded params (a ValueError before anything moves)."""
    sharded = [p for p in params if is_sharded(p)]
    if not sharded:
        return
    if sync:
        raise ValueError(
            "Invalid sync: True with sharded (DTensor, e.g. FSDP2 fully_shard) params. sync=True "
            "makes every rank one Monte Carlo sample of the same params, but under FSDP the ranks "
            "hold different elements of one model (FSDP already averages the gradients); use "
            "sync=False")
    if rng != "philox":
        raise ValueError(
            f"Invalid rng: {rng!r} with sharded (DTensor) params; ivon-opt's torch.randn noise "
            "is drawn per unsharded param group, use rng='philox'")
    for param in sharded:
        _shard_start(param)
        if not _local(param).is_contiguous():
            raise ValueError("Invalid param: a DTensor param's local shard is not contiguous")


def common_seed(param_groups: list, seed: int) -> int:
    """rank 0's seed on every rank of the first sharded param's mesh (a collective).

    The seed drawn from torch's default generator may differ between ranks; under FSDP the ranks
    hold parts of one model, whose noise must come from one key (docs/DESIGN.md section 3).
    """
    first = next((p for group in param_groups for p in group["params"] if is_sharded(p)), None)
    if first is None:
        return seed
    import torch.distributed as dist

    mesh = first.device_mesh
    value = torch.tensor([seed], dtype=torch.int64, device=mesh.device_type)
    for dim in range(mesh.ndim):
        dist.broadcast(value, group=mesh.get_group(dim), group_src=0)
    return int(value.item())


def agree_on_skip(buckets: list, found_inf: torch.Tensor) -> None:
    """Sum ``found_inf`` over the sharded params' mesh (a collective, no host sync): each rank
    checked only its shards, and the ranks must skip a step together (docs/DESIGN.md section 11).
    """
    first = next((b.params[0] for b in buckets if isinstance(b, ShardedBucket) and b.params),
                 None)
    if first is None:
        return
    import torch.distributed as dist

    mesh = first.device_mesh
    for dim in range(mesh.ndim):
        dist.all_reduce(found_inf, group=mesh.get_group(dim))


@dataclass(eq=False)
class ShardedBucket(Bucket):
    """A flat bucket over the local shards of DTensor params (module docstring).

    ``starts`` / ``sizes``: each local shard's place in the flat buffers; ``offsets``: the global
    index of each local shard's first element; ``param_views`` / ``grad_views``: views of
    ``param_flat`` / ``grad_flat`` shaped like the local shards (copies of the params' values,
    not the params' storage).
    """
    sizes: list = field(default_factory=list)

    follows_moves = False  # FSDP owns the storage; ``local`` refuses a moved shard

    @classmethod
    def build(cls, group_index: int, group_start: int, device, dtype, entries: list,
              backend_choice: str, hess_init: float,
              low_precision: torch.dtype = torch.float32) -> "ShardedBucket":
        """``entries``: the params' ``ParamEntry`` (sharded params take no prior);
        ``low_precision``: IVON's ``state_dtype``, the dtype of momentum and hess
        (``moment_dtype``), as for a dense ``Bucket``; the mean and averages stay float32."""
        params = [e.param for e in entries]
        offsets = [e.offset + _shard_start(e.param) for e in entries]
        locals_ = [_local(p) for p in params]
        sizes = [t.numel() for t in locals_]
        # each shard at a place congruent to its global offset (Note [quads in the buffers])
        starts, total = quad_aligned_starts(sizes, offsets)
        sdtype, mdtype = state_dtype(dtype), moment_dtype(dtype, low_precision)
        bucket = cls(
            group_index=group_index, group_start=group_start, params=params, starts=starts,
            offsets=offsets,
            param_flat=torch.zeros(total, dtype=dtype, device=device),
            grad_flat=torch.zeros(total, dtype=dtype, device=device),
            mean=torch.zeros(total, dtype=sdtype, device=device),
            momentum=torch.zeros(total, dtype=mdtype, device=device),
            hess=torch.full((total,), float(hess_init), dtype=mdtype, device=device),
            backend=backends.resolve(backend_choice, device, dtype), sizes=sizes)
        with torch.no_grad():
            for index, (param, local) in enumerate(zip(params, locals_)):
                where = bucket.slice_of(index)
                strides = storage_strides(local)
                bucket.param_views.append(torch.as_strided(bucket.param_flat[where], local.shape,
                                                           strides))
                bucket.grad_views.append(torch.as_strided(bucket.grad_flat[where], local.shape,
                                                          strides))
                bucket.param_views[index].copy_(local)
                bucket.versions.append(param._version)
                bucket.trainable.append(param.requires_grad)
            bucket.mean.copy_(bucket.param_flat)
        return bucket

    def moved(self) -> bool:
        """Never: ``local`` refuses a shard that changed device, dtype or shape."""
        return False

    def unchanged(self) -> bool:
        """Never taken as unchanged: FSDP may reallocate the local shards at any time, so every
        optimizer call takes the full paths, which hand off to this class."""
        return False

    def slice_of(self, index: int) -> slice:
        return slice(self.starts[index], self.starts[index] + self.sizes[index])

    def realias(self, marks: tuple) -> None:
        """After a copy: the params are FSDP's; ``param_views`` and ``grad_views`` are views of
        the copied flat buffers again (a plain pickle copies every tensor apart)."""
        for index, (view, grad) in enumerate(zip(self.param_views, self.grad_views)):
            where = self.slice_of(index)
            self.param_views[index] = torch.as_strided(self.param_flat[where], view.shape,
                                                       view.stride())
            self.grad_views[index] = torch.as_strided(self.grad_flat[where], grad.shape,
                                                      grad.stride())
        self.versions = [-1 if flag else param._version
                         for param, flag in zip(self.params, marks[0])]

    # ---------------------------------------------------------------- the params' own storage

    def local(self, index: int) -> torch.Tensor:
        """The param's local shard, fetched afresh (FSDP may have reallocated it)."""
        local = _local(self.params[index])
        view = self.param_views[index]
        if local.device != self.device or local.dtype != view.dtype or local.shape != view.shape:
            raise RuntimeError(
                "a sharded parameter managed by IVON changed its local shard (device, dtype or "
                f"shape: {local.device}, {local.dtype}, {tuple(local.shape)} instead of "
                f"{self.device}, {view.dtype}, {tuple(view.shape)}), e.g. the model was moved or "
                "resharded after the optimizer was built; build the optimizer afterwards")
        return local

    def publish(self) -> None:
        """The trainable params' local shards <- ``param_flat`` (after the optimizer wrote it)."""
        indices = [i for i, trainable in enumerate(self.trainable) if trainable and self.sizes[i]]
        if indices:
            torch._foreach_copy_([self.local(i) for i in indices],
                                 [self.param_views[i] for i in indices])

    def gather_grads(self) -> None:
        """``grad_flat`` <- every trainable param's local gradient (zero where it has none)."""
        sources, targets = [], []
        for index, param in enumerate(self.params):
            if not self.trainable[index] or not self.sizes[index]:
                continue
            grad = param.grad
            if grad is None:
                self.grad_views[index].zero_()
                continue
            local = _local(grad) if is_sharded(grad) else grad
            if local.shape != self.grad_views[index].shape:
                raise RuntimeError(
                    f"the gradient of a sharded parameter has local shape {tuple(local.shape)}, "
                    f"its parameter's local shard {tuple(self.grad_views[index].shape)}")
            sources.append(local)
            targets.append(self.grad_views[index])
        if sources:
            torch._foreach_copy_(targets, sources)

    def attach_grad(self, index: int) -> None:
        """The param's gradient <- ``grad_flat``'s part (a checkpoint's pending gradient)."""
        from torch.distributed.tensor import DTensor

        param, values = self.params[index], self.grad_views[index]
        if param.grad is None:
            param.grad = DTensor.from_local(values.clone(), param.device_mesh, param.placements,
                                            run_check=False, shape=param.shape,
                                            stride=param.stride())
        else:
            _local(param.grad).copy_(values)

    def grad_fingerprint(self) -> tuple:
        """Changes when a backward, zero_grad or assignment changed a gradient; the second item
        says which params had a gradient (``FlatLayout.grads_dropped``)."""
        grads = [param.grad for param in self.params]
        return (tuple(None if g is None else (id(g), _local(g)._version) for g in grads),
                [g is not None for g in grads])

    def zero_grads(self) -> None:
        grads = [_local(p.grad) for p in self.params if p.requires_grad and p.grad is not None]
        if grads:
            torch._foreach_zero_(grads)

    # ---------------------------------------------------------------- user code

    def written(self):
        """Indices of the params user code wrote since the last look (their values copied into
        ``param_flat``)."""
        for index, param in enumerate(self.params):
            local = self.local(index)
            if param._version == self.versions[index]:
                continue
            with torch.no_grad():
                self.param_views[index].copy_(local)
            self.versions[index] = param._version
            yield index

    @torch.no_grad()
    def sync_requires_grad(self) -> None:
        for index, param in enumerate(self.params):
            if param.requires_grad == self.trainable[index]:
                continue
            where = self.slice_of(index)
            if param.requires_grad:  # starts from its current value
                self.param_views[index].copy_(self.local(index))
                self.mean[where].copy_(self.param_flat[where])
            else:  # gets its mean back (it may hold a sample)
                self.param_flat[where].copy_(self.mean[where])
                self.local(index).copy_(self.param_views[index])
            self.trainable[index] = param.requires_grad

    # ---------------------------------------------------------------- state as DTensors

    def saved(self, index: int, flat: torch.Tensor):
        """Saved as a DTensor placed like the param (Note [sharded state dicts] in
        _checkpoint)."""
        return self.as_dtensor(index, flat)

    def as_dtensor(self, index: int, flat: torch.Tensor):
        """A flat piece of this param's state as a DTensor shaped and placed like the param."""
        from torch.distributed.tensor import DTensor

        param, view = self.params[index], self.param_views[index]
        with torch.no_grad():
            return DTensor.from_local(torch.as_strided(flat, view.shape, view.stride()),
                                      param.device_mesh, param.placements, run_check=False,
                                      shape=param.shape, stride=param.stride())

    def state_views(self):
        """(param, {'mean', 'momentum', 'hess'} DTensor views of the state) for every param."""
        for index, param in enumerate(self.params):
            where = self.slice_of(index)
            yield param, {name: self.as_dtensor(index, getattr(self, name)[where])
                          for name in _STATE}

    def saved_values(self, index: int, value: torch.Tensor) -> torch.Tensor:
        """The flat values of this param's local shard in a saved tensor: a DTensor placed like
        the param (this optimizer's, or DCP's resharded load), or a full unsharded tensor (an
        unsharded run's state dict, or DCP's ``full_state_dict``). ValueError otherwise."""
        param, size = self.params[index], self.sizes[index]
        if is_sharded(value):
            local = _local(value)
            if (tuple(value.shape) == tuple(param.shape) and local.numel() == size
                    and tuple(value.placements) == tuple(param.placements)
                    and value.device_mesh == param.device_mesh):
                return local.reshape(-1)
            raise ValueError(
                f"a saved DTensor of shape {tuple(value.shape)} placed {tuple(value.placements)} "
                f"does not match its sharded parameter ({tuple(param.shape)} placed "
                f"{tuple(param.placements)}); load resharded checkpoints with "
                "torch.distributed.checkpoint, which reshards them")
        if value.numel() != param.numel():
            raise ValueError(f"a saved tensor has {value.numel()} elements, its parameter "
                             f"{param.numel()}")
        start = _shard_start(param)
        return value.reshape(-1)[start:start + size]
