"""State dicts of ``ivon_fast.IVON``: its own format, and loading ivon-opt's.

Own format (``"ivon": {"format": "ivon_fast/1", ...}``): torch.optim's layout (``state`` keyed by
param index in param_groups order, ``param_groups`` with index lists) plus the optimizer's
counters. Per param: ``mean``, ``momentum``, ``hess``; mid-step also ``avg_grad`` and
``avg_hess_term`` (samples already folded in), ``pending_grad`` (the official loop's last sample,
not yet folded in), with ``rng='torch'``, ``pending_noise``, and the group's prior
(``prior_mean``, ``prior_precision``) where it has one (docs/DESIGN.md section 14).

Note [what the params hold]: a model checkpoint saved beside the optimizer's holds what the
params held then: the mean (official loop) or the sample of ``params_hold`` (drop-in mode, a draw
number). That is recorded in the state (``ivon.params_hold``), never guessed from values. After
``load_state_dict`` the params hold that again, computed by this optimizer's backend and device;
a model checkpoint loaded right after (before the next optimizer call) is taken as the saved copy
of the same thing, not as new weights, so the two load orders resume alike, also across backends
and devices where the copies differ by rounding. A drop-in model file saved inside
``mean_params()`` holds the mean instead (the HF and Lightning callbacks save so): loaded before
the optimizer's state it resumes exactly; loaded after, a gradient computed before the next
optimizer call was taken at the mean, and ``step()`` refuses it (``_OVERWRITTEN_MESSAGE``).

Note [sharded state dicts]: the entries of a sharded (FSDP2 DTensor) param are DTensors of the
param's global shape and placements over the rank's local shard's state, so each rank saves its
shard and ``torch.distributed.checkpoint`` sees ordinary sharded tensors. DCP's
``get_optimizer_state_dict`` keeps only ``state`` and ``param_groups`` (with params named by
FQN), so every saved group carries a copy of the counters (key ``ivon``), and loading maps the
saved state by the saved groups' param order (torch's convention), not by index. A full
(unsharded) tensor loads into a sharded param too: each rank takes its shard (docs/DESIGN.md
section 12).

Every load checks everything before it changes anything.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _user_writes
from ._checks import check_group_hyperparameters

FORMAT = "ivon_fast/1"
_GROUP_KEY = "ivon"  # each saved param group's copy of the counters
_STATE = ("mean", "momentum", "hess")
_AVERAGES = ("avg_grad", "avg_hess_term")
_PRIORS = ("prior_mean", "prior_precision")  # a group's prior, where it has one


def _flat_params(opt) -> list:
    return [p for group in opt.param_groups for p in group["params"]]


def save_with_hooks(opt) -> dict:
    """``opt.state_dict()``: ``save`` between torch's state-dict pre and post hooks."""
    for hook in opt._optimizer_state_dict_pre_hooks.values():
        hook(opt)
    with torch.no_grad():
        _user_writes.prepare(opt, params_hold_mean=opt._in_mean)
        opt._check_pending_grads()
        opt._pending_draw = opt._draws.settle_host(opt._pending_draw)  # capturable: replays
        state_dict = save(opt)
    for hook in opt._optimizer_state_dict_post_hooks.values():
        result = hook(opt, state_dict)
        if result is not None:
            state_dict = result
    return state_dict


def load_with_hooks(opt, state_dict: dict, step: Optional[int]) -> None:
    """``opt.load_state_dict()``: ``load`` between torch's load-state-dict pre and post hooks."""
    for hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = hook(opt, state_dict)
        if result is not None:
            state_dict = result
    load(opt, state_dict, step)
    opt._betas.loaded(opt.param_groups)
    for hook in opt._optimizer_load_state_dict_post_hooks.values():
        hook(opt)


def save(opt) -> dict:
    """The state dict of ``opt`` (caught up with user code: ``_user_writes.prepare``)."""
    pending_grad = opt._pending_draw is not None and not opt.resample_on_step
    if pending_grad:
        opt._layout.gather_grads()  # the pending sample's gradient is part of the state
    param_ids = {id(p): i for i, p in enumerate(_flat_params(opt))}
    state = {param_ids[id(param)]: _saved_entry(opt, bucket, index, pending_grad)
             for bucket in opt._layout.buckets for index, param in enumerate(bucket.params)}
    meta = {
        "format": FORMAT, "step": opt.current_step, "skipped_steps": opt.skipped_steps,
        "seed": opt.seed,
        "next_train_draw": opt._draws.next_train, "next_eval_draw": opt._draws.next_eval,
        "count": opt._count, "pending_draw": opt._pending_draw,
        "params_hold": opt._pending_draw if opt.resample_on_step else None,
        "resample_on_step": opt.resample_on_step, "hess_approx": opt.hess_approx,
        "rng": opt.rng, "mc_samples": opt.mc_samples,
        "state_dtype": str(opt.state_dtype).replace("torch.", ""),
    }
    # each group carries a copy of the counters too (Note [sharded state dicts]: DCP's
    # get_optimizer_state_dict keeps only "state" and "param_groups")
    # a capturable group's lr is a live device tensor: save its value, not the tensor itself
    groups = [{**{k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
                  for k, v in group.items() if k != "params"},
               "params": [param_ids[id(p)] for p in group["params"]], _GROUP_KEY: dict(meta)}
              for group in opt.param_groups]
    return {"state": state, "param_groups": groups, "ivon": meta}


def _saved_entry(opt, bucket, index: int, pending_grad: bool) -> dict:
    """A param's entry of the state dict: its state, and mid-step what the step has so far."""
    where = bucket.slice_of(index)
    names = [name for name in _STATE + _PRIORS if getattr(bucket, name) is not None]
    if opt._count > 0:
        names += _AVERAGES
    entry = {name: bucket.saved(index, getattr(bucket, name)[where].clone()) for name in names}
    if pending_grad:
        entry["pending_grad"] = bucket.saved(index, bucket.grad_flat[where].clone())
    if opt._pending_draw is not None:
        local = bucket.offsets[index] - bucket.group_start
        noise = opt._noise.pending_noise(opt._pending_draw, bucket.group_index, local,
                                         local + bucket.params[index].numel())
        if noise is not None:
            entry["pending_noise"] = noise
    return entry


def load(opt, state_dict: dict, step: Optional[int]) -> None:
    """Load an own or an ivon-opt state dict into ``opt``."""
    saved_groups = state_dict.get("param_groups")
    if not isinstance(saved_groups, list) or len(saved_groups) != len(opt.param_groups):
        raise ValueError("state_dict has a different number of param groups than this optimizer")
    for saved, group in zip(saved_groups, opt.param_groups):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError("state_dict's param groups differ in size from this optimizer's")
        check_group_hyperparameters(saved)
    if "ivon" in state_dict or any(_GROUP_KEY in group for group in saved_groups):
        _load_own(opt, state_dict, saved_groups)
    elif all("momentum" in g and "hess" in g for g in saved_groups):
        if step is None or isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(
                "Invalid step: an ivon-opt state dict does not record the step count; pass "
                "load_state_dict(state_dict, step=<int >= 0: optimizer steps taken so far>)")
        _load_ivon_opt(opt, state_dict, saved_groups, step)
    else:
        raise ValueError("state_dict is neither an ivon_fast nor an ivon-opt IVON state dict")


def _copy_hyperparameters(opt, saved_groups) -> None:
    for saved, group in zip(saved_groups, opt.param_groups):
        for key, value in saved.items():
            # the prior's kind stays this optimizer's (its values were checked to agree)
            if key not in ("params", "momentum", "hess", "numel", _GROUP_KEY) + _PRIORS:
                if key == "lr" and opt.capturable and isinstance(group["lr"], torch.Tensor):
                    # in place: a captured graph and the schedulers hold this tensor
                    if group["lr"] is not value:
                        group["lr"].copy_(torch.as_tensor(value).reshape(group["lr"].shape))
                    continue
                group[key] = value


def _load_own(opt, state_dict: dict, saved_groups) -> None:
    meta = state_dict.get("ivon")
    if meta is None:  # passed through DCP's set_optimizer_state_dict: the groups' copy
        meta = next(group[_GROUP_KEY] for group in saved_groups if _GROUP_KEY in group)
    entries, needed, joining = _validate_own(opt, meta, state_dict["state"], saved_groups)
    _apply_own(opt, meta, entries, needed, joining, saved_groups)


def _validate_own(opt, meta: dict, saved_state: dict, saved_groups) -> tuple:
    """Check an own state dict against ``opt`` before anything changes (a ValueError naming
    what does not fit). Returns (each param's saved entry, by param; the entries it must have;
    the waiting params that join, Note [params that wait] in _layout)."""
    if meta.get("format") != FORMAT:
        raise ValueError(f"unknown state_dict format {meta.get('format')!r}")
    for key, mine in (("resample_on_step", opt.resample_on_step), ("rng", opt.rng)):
        if meta[key] != mine:
            raise ValueError(f"state_dict was saved with {key}={meta[key]!r}, this optimizer "
                             f"has {key}={mine!r}")
    needed = _needed_entries(opt, meta)
    # the saved groups' param keys, in order: indices here, names after DCP's helpers (which
    # rely on torch's convention that the order is the param order)
    keys = [key for saved in saved_groups for key in saved["params"]]
    place = {id(param): (bucket, index) for bucket in opt._layout.buckets
             for index, param in enumerate(bucket.params)}
    waiting = {id(w.entry.param): w for w in opt._layout.waiting}
    entries, joining = {}, []
    for index, param in enumerate(_flat_params(opt)):
        entry = saved_state.get(keys[index])
        if id(param) in waiting:
            if _joins(opt, waiting[id(param)], entry, index, needed):
                entries[id(param)] = entry
                joining.append(waiting[id(param)])
            continue
        if entry is None:
            raise ValueError(f"state_dict has no state for parameter {index}")
        bucket, position = place[id(param)]
        _check_entry(entry, index, param, needed,
                     [n for n in _PRIORS if getattr(bucket, n) is not None],
                     lambda value: bucket.saved_values(position, value))
        entries[id(param)] = entry
    return entries, needed, joining


def _joins(opt, waiting, entry, index: int, needed: list) -> bool:
    """Whether a param that waits here joins with its saved entry: the saved run trained it."""
    group, param = opt.param_groups[waiting.group_index], waiting.entry.param
    if entry is None or param.numel() == 0 or not _trained(entry, group["hess_init"]):
        return False
    _check_entry(entry, index, param, needed, [n for n in _PRIORS if group.get(n) is not None],
                 lambda value: None)
    return True


def _trained(entry: dict, hess_init: float) -> bool:
    """Whether a saved entry of a param that waits here holds trained state, not the fresh
    state of a param that never trained (older state dicts saved every param): any momentum,
    sample average, or a hess other than ``hess_init``."""
    fresh_hess = torch.tensor(float(hess_init), dtype=entry["hess"].dtype)
    return (bool(entry["momentum"].ne(0).any()) or bool(entry["hess"].ne(fresh_hess).any())
            or any(bool(entry[name].ne(0).any()) for name in _AVERAGES if name in entry))


def _needed_entries(opt, meta: dict) -> list:
    """The per-param entries a state dict saved in the state ``meta`` describes holds."""
    pending = meta["pending_draw"]
    needed = list(_STATE)
    if meta["count"] > 0:
        needed += _AVERAGES
    if pending is not None and not opt.resample_on_step:
        needed.append("pending_grad")
    if pending is not None and opt.rng == "torch":
        needed.append("pending_noise")
    return needed


def _check_entry(entry: dict, index: int, param, needed: list, priors: list, fits) -> None:
    """A param's saved entry has every entry ``needed`` and the group's ``priors``, each of
    the param's size, and ``fits`` each (a sharded param's shard must fit)."""
    for name in needed + priors:
        if name not in entry or entry[name].numel() != param.numel():
            raise ValueError(f"state_dict's {name!r} of parameter {index} is missing or "
                             f"does not have the parameter's {param.numel()} elements")
        fits(entry[name])
    for name in _PRIORS:
        if name in entry and name not in priors:
            raise ValueError(f"state_dict has a {name!r} for parameter {index}, but this "
                             f"optimizer's param group has none; construct IVON with the "
                             f"same {name} option as the run that saved it")


def _apply_own(opt, meta: dict, entries: dict, needed: list, joining: list,
               saved_groups) -> None:
    """Load a checked own state dict: hyperparameters, counters, then every bucket's state
    (the waiting params of ``joining`` join first)."""
    _copy_hyperparameters(opt, saved_groups)
    if joining:
        opt._layout.admit(joining, [group["hess_init"] for group in opt.param_groups])
        opt._layout.state_views_into(opt.state)
    opt._live.record(opt.param_groups)
    opt._steps.set(meta["step"], meta.get("skipped_steps", 0))
    opt.seed = meta["seed"]
    opt._noise.seed = meta["seed"]
    _set_draws(opt, meta["next_train_draw"], meta["next_eval_draw"])
    opt._count, opt._pending_draw = meta["count"], meta["pending_draw"]
    opt.hess_approx, opt.mc_samples = meta["hess_approx"], meta["mc_samples"]
    opt._pending_grads = None
    with torch.no_grad():
        opt._layout.sync_requires_grad()
        for bucket in opt._layout.buckets:
            _load_bucket(bucket, entries, needed, with_averages=opt._count > 0)
        if "pending_noise" in needed:
            _restore_pending_noise(opt, entries)
        opt._write_resting_params()
        opt._layout.mark_seen()
    opt._params_from_checkpoint = True  # Note [what the params hold]


def _load_bucket(bucket, entries: dict, needed: list, with_averages: bool) -> None:
    if with_averages:
        bucket.ensure_averages()
    for index, param in enumerate(bucket.params):
        entry, where = entries[id(param)], bucket.slice_of(index)
        names = [n for n in needed if n in _STATE or n in _AVERAGES]
        names += [n for n in _PRIORS if getattr(bucket, n) is not None]
        for name in names:
            getattr(bucket, name)[where].copy_(bucket.saved_values(index, entry[name]))
        if "pending_grad" in needed:
            bucket.grad_flat[where].copy_(bucket.saved_values(index, entry["pending_grad"]))
            bucket.attach_grad(index)


def _restore_pending_noise(opt, entries: dict) -> None:
    """rng='torch': the pending draw's noise, one tensor per group (TorchNoise)."""
    noise = []
    for group in opt.param_groups:
        first = group["params"][0]
        pieces = [entries[id(p)]["pending_noise"].reshape(-1) for p in group["params"]]
        noise.append(torch.cat(pieces).to(first.device, first.dtype))
    opt._noise.restore_pending(opt._pending_draw, noise)


def _set_draws(opt, next_train: int, next_eval: int) -> None:
    """The draw counters; capturable: the device's in place, and the step count pinned there."""
    opt._draws.set_on_host(next_train, next_eval)
    if opt._draws.device is not None:
        opt._steps.pin_to_device(opt._draws.device.device)


def _load_ivon_opt(opt, state_dict: dict, saved_groups, step: int) -> None:
    saved_state = state_dict.get("state", {})
    count = int(saved_state.get("count", 0) or 0)
    hess_key = "avg_nxg" if opt.hess_approx == "price" else "avg_gsq"
    _validate_ivon_opt(opt, saved_state, saved_groups, count, hess_key)
    with torch.no_grad():
        # the model's params are ivon-opt's mean: take them (Note [user writes to params])
        _user_writes.prepare(opt)
        _copy_hyperparameters(opt, saved_groups)
        opt.current_step = step
        _set_draws(opt, opt._draws.next_train, opt._draws.next_eval)
        for bucket in opt._layout.buckets:
            _load_ivon_opt_bucket(bucket, saved_groups[bucket.group_index], saved_state, count,
                                  hess_key)
        opt._count = count
        if not opt.resample_on_step:
            opt._pending_draw = None
        opt._write_resting_params()
        opt._layout.mark_seen()


def _validate_ivon_opt(opt, saved_state: dict, saved_groups, count: int, hess_key: str) -> None:
    layout = opt._layout
    for saved, group in zip(saved_groups, opt.param_groups):
        numel = sum(p.numel() for p in group["params"])
        if saved["momentum"].numel() != numel or saved["hess"].numel() != numel:
            raise ValueError("ivon-opt state_dict's buffers differ in size from this optimizer's")
    if count > 0:
        for key in ("avg_grad", hess_key):
            value = saved_state.get(key)
            if not isinstance(value, torch.Tensor) or value.numel() != layout.numel:
                raise ValueError(f"ivon-opt state_dict holds {count} samples but no {key!r} "
                                 f"of {layout.numel} elements (hess_approx={opt.hess_approx!r})")


def _load_ivon_opt_bucket(bucket, saved: dict, saved_state: dict, count: int,
                          hess_key: str) -> None:
    """A bucket's part of ivon-opt's per-group flat buffers (and its global sample averages)."""
    if count > 0:
        bucket.ensure_averages()
    for index in range(len(bucket.params)):
        local = bucket.offsets[index] - bucket.group_start
        where = bucket.slice_of(index)
        size = where.stop - where.start  # a sharded param's: its local shard's
        bucket.momentum[where].copy_(saved["momentum"][local:local + size])
        bucket.hess[where].copy_(saved["hess"][local:local + size])
        if count > 0:
            flat = slice(bucket.offsets[index], bucket.offsets[index] + size)
            bucket.avg_grad[where].copy_(saved_state["avg_grad"][flat])
            bucket.avg_hess_term[where].copy_(saved_state[hess_key][flat])
