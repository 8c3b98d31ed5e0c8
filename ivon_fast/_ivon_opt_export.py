"""ivon-opt's state dict of an ``ivon_fast.IVON`` (``IVON.ivon_opt_state_dict()``).

ivon-opt (``ivon.IVON``) keeps per param group one flat ``momentum`` and ``hess`` over every param
of the group (frozen ones included), the running sample averages over all groups in
``state['avg_grad']`` and ``state['avg_nxg']`` (or ``'avg_gsq'``), and the number of samples
taken in ``state['count']``. It has no mean (the model's params are the mean), no step count
(``current_step`` is an attribute: set it after loading), one dtype for all buffers, and no
priors, no pending sample and no sharded params: an export of state that ivon-opt cannot hold is
refused, naming what it lacks.
"""
from __future__ import annotations

import torch

from . import _user_writes

_GROUP_KEYS = ("lr", "beta1", "beta2", "weight_decay", "hess_init", "ess", "clip_radius")


def export(opt) -> dict:
    """ivon-opt's state dict of ``opt``'s state (see the module docstring)."""
    _check_exportable(opt)
    with torch.no_grad():
        _user_writes.prepare(opt)
        if opt._pending_draw is not None and not opt.resample_on_step:
            opt._fold_pending()   # ivon-opt folds a sample in at the block's exit
        first = opt._layout.buckets[0]
        dtype, device = first.param_flat.dtype, first.device
        groups = [_group(opt, index, group, dtype, device)
                  for index, group in enumerate(opt.param_groups)]
        state = {"count": opt._count, "avg_grad": None, "avg_nxg": None, "avg_gsq": None}
        if opt._count > 0:
            hess_key = "avg_nxg" if opt.hess_approx == "price" else "avg_gsq"
            state["avg_grad"] = torch.zeros(opt._layout.numel, dtype=dtype, device=device)
            state[hess_key] = torch.zeros_like(state["avg_grad"])
        for bucket in opt._layout.buckets:
            _bucket_into(bucket, groups[bucket.group_index], state, opt.hess_approx)
    return {"state": state, "param_groups": groups}


def _check_exportable(opt) -> None:
    layout = opt._layout
    if opt._in_context:
        raise RuntimeError("ivon_opt_state_dict() inside sampled_params() or mean_params(): "
                           "call it between steps")
    if not layout.buckets:
        raise RuntimeError("ivon_opt_state_dict(): no param trains yet (ivon-opt needs one)")
    kinds = {(bucket.param_flat.dtype, bucket.device) for bucket in layout.buckets}
    if len(kinds) > 1:
        raise RuntimeError(f"ivon_opt_state_dict(): the params have several dtypes or devices "
                           f"{sorted(map(str, kinds))}; ivon-opt keeps one")
    for bucket in layout.buckets:
        if not bucket.follows_moves:
            raise RuntimeError("ivon_opt_state_dict(): sharded (FSDP2) params; ivon-opt has no "
                               "sharded state")
        if bucket.prior_mean is not None or bucket.prior_precision is not None:
            raise RuntimeError("ivon_opt_state_dict(): a param group has a prior_mean or "
                               "prior_precision; ivon-opt's prior is N(0, 1/weight_decay)")


def _group(opt, index: int, group: dict, dtype, device) -> dict:
    numel = sum(p.numel() for p in group["params"])
    saved = {key: float(group[key]) for key in _GROUP_KEYS}
    saved.update(mc_samples=opt.mc_samples, numel=numel,
                 momentum=torch.zeros(numel, dtype=dtype, device=device),
                 hess=torch.full((numel,), float(group["hess_init"]), dtype=dtype,
                                 device=device))
    start = sum(len(g["params"]) for g in opt.param_groups[:index])
    saved["params"] = list(range(start, start + len(group["params"])))
    return saved


def _bucket_into(bucket, group: dict, state: dict, hess_approx: str) -> None:
    """A bucket's part of the group's flat buffers and of the global sample averages."""
    hess_key = "avg_nxg" if hess_approx == "price" else "avg_gsq"
    for index in range(len(bucket.params)):
        where = bucket.slice_of(index)
        local = slice(bucket.offsets[index] - bucket.group_start,
                      bucket.offsets[index] - bucket.group_start + where.stop - where.start)
        group["momentum"][local].copy_(bucket.momentum[where])
        group["hess"][local].copy_(bucket.hess[where])
        if state["count"] > 0:
            flat = slice(bucket.offsets[index], bucket.offsets[index] + where.stop - where.start)
            state["avg_grad"][flat].copy_(bucket.avg_grad[where])
            state[hess_key][flat].copy_(bucket.avg_hess_term[where])
