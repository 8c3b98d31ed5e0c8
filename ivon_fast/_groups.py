"""Param groups: their set-up, and the values that live in them besides the hyperparameters
(priors, the two spellings of the betas, a capturable group's lr tensor).

Note [betas]: LR schedulers that cycle momentum (``OneCycleLR``, ``CyclicLR`` with
``cycle_momentum=True``) look for ``betas`` in the param groups, as AdamW has them. Every group
carries ``betas == (beta1, beta2)`` beside the official names. At each step the two are
reconciled (``Betas.reconcile``): whichever was written since the last step wins (a scheduler
writes ``betas``, user code may write ``beta1``); both written to different values is an error.
"""
from __future__ import annotations

import torch

from . import _op_loop
from ._bucket import PRIOR_STATE
from ._checks import check_group_hyperparameters, check_params, check_prior
from .scalars import device_lr_tensor


def param_list(params) -> list:
    return [params] if isinstance(params, torch.Tensor) else list(params)


def new_param_groups(params, defaults: dict, *, backend_choice: str, sync: bool, rng: str,
                     state_dtype: torch.dtype, prior_mean, prior_precision) -> list:
    """The constructor's param groups, checked (a ValueError before anything moves): each
    group's params materialized once (they may be generators such as ``module.parameters()``);
    a constructor-level prior list is split across the groups and its default recorded in
    ``defaults``."""
    param_groups = param_list(params)
    if not param_groups or not isinstance(param_groups[0], dict):
        param_groups = [{"params": param_groups}]
    param_groups = [{**group, "params": param_list(group["params"])} for group in param_groups]
    if not any(group["params"] for group in param_groups):
        raise ValueError("Invalid params: IVON got an empty parameter list (a generator such "
                         "as model.parameters() can only be iterated once)")
    for group in param_groups:
        check_group_hyperparameters(group)
        check_params(group["params"], backend_choice, sync=sync, rng=rng,
                     state_dtype=state_dtype)
    for name, value in (("prior_mean", prior_mean), ("prior_precision", prior_precision)):
        defaults[name] = _split_prior(name, value, param_groups)
    for group in param_groups:
        for name in PRIOR_STATE:
            check_prior(name, group.get(name, defaults[name]), group["params"])
    return param_groups


def take_over(param_groups: list, defaults: dict, optimizer_init) -> None:
    """torch's ``Optimizer.__init__`` (``optimizer_init``), which adds the groups one by one
    (``add_param_group``, which moves their params into buckets). torch validates each group only
    when adding it (duplicates across groups, non-leaf tensors), after the earlier groups' params
    moved: undo that on failure."""
    originals = [(p, p.data, p.grad if p.is_leaf else None)
                 for group in param_groups for p in group["params"]]
    try:
        optimizer_init(param_groups, defaults)
    except BaseException:
        for param, data, grad in originals:
            param.data = data
            if param.is_leaf:
                param.grad = grad
        raise


def check_added_group(group: dict, defaults: dict, *, backend_choice: str, sync: bool, rng: str,
                      state_dtype: torch.dtype) -> None:
    """``add_param_group``'s group, checked and completed (its betas, its params a list)."""
    check_group_hyperparameters(group)
    _betas_of_new_group(group, defaults)
    group["params"] = param_list(group["params"])
    check_params(group["params"], backend_choice, sync=sync, rng=rng, state_dtype=state_dtype)
    for name in PRIOR_STATE:
        check_prior(name, group.get(name, defaults.get(name)), group["params"])


def _split_prior(name: str, value, param_groups: list):
    """A constructor-level prior given as one tensor per param covers the params of the groups
    without their own, in order: each such group gets its share. Returns the default that
    later groups (add_param_group) take: the value itself for None and 'init', else None."""
    if not isinstance(value, (list, tuple)):
        return value
    value = list(value)
    takers = [group for group in param_groups if name not in group]
    wanted = sum(len(group["params"]) for group in takers)
    if len(value) != wanted:
        raise ValueError(f"Invalid {name}: {len(value)} tensors for the {wanted} params of the "
                         "param groups without their own (one per param, in order)")
    start = 0
    for group in takers:
        group[name] = value[start:start + len(group["params"])]
        start += len(group["params"])
    return None


def set_up_added_group(opt, group: dict) -> None:
    """A group torch has just added to ``opt.param_groups``: its betas seen, a capturable lr on
    the device, its params moved into new buckets with its prior, and its state views in
    ``opt.state``; mid-step, it takes part with zero past gradients (and in the drop-in mode
    its params hold the pending sample)."""
    opt._betas.add(group)
    if opt.capturable:
        group["lr"] = device_lr_tensor(group["lr"], group["params"])
    new_buckets = opt._layout.add_group(len(opt.param_groups) - 1, group["params"],
                                        group["hess_init"])
    _attach_priors(group, new_buckets)
    opt._layout.state_views_into(opt.state)
    if opt._count > 0:
        for bucket in new_buckets:
            bucket.ensure_averages()
    if opt.resample_on_step and opt._pending_draw is not None:
        _op_loop.sample(opt, opt._pending_draw, buckets=new_buckets)


@torch.no_grad()
def _attach_priors(group: dict, buckets: list) -> None:
    """The group's prior into its buckets' flat prior state; the group then records only what
    it was ('init' or 'given'; the values are state, saved per param)."""
    position = {id(p): i for i, p in enumerate(group["params"])}
    for name in PRIOR_STATE:
        value = group.get(name)
        if value is None:
            continue
        for bucket in buckets:
            bucket.ensure_prior(name)
            for index, param in enumerate(bucket.params):
                source = (bucket.shaped(bucket.mean, index) if isinstance(value, str)
                          else value[position[id(param)]].detach())
                bucket.shaped(getattr(bucket, name), index).copy_(source)
        group[name] = value if isinstance(value, str) else "given"


def _two_betas(betas) -> tuple:
    try:
        beta1, beta2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"Invalid betas: {betas!r}; it must be a pair (beta1, beta2)") from None
    return beta1, beta2


def _betas_of_new_group(group: dict, defaults: dict) -> None:
    """A new group's ``betas`` and ``beta1``/``beta2`` (Note [betas]): given ``betas`` fill in
    the official names (a contradiction is an error), else ``betas`` follows them."""
    if "betas" in group:
        for name, value in zip(("beta1", "beta2"), _two_betas(group["betas"])):
            if name in group and group[name] != value:
                raise ValueError(f"Invalid param group: betas={tuple(group['betas'])} but "
                                 f"{name}={group[name]}; give one of the two")
            group[name] = value
        check_group_hyperparameters(group)
    group["betas"] = (group.get("beta1", defaults["beta1"]), group.get("beta2", defaults["beta2"]))


class Betas:
    """Each group's (beta1, beta2) at the last reconciliation (Note [betas])."""

    def __init__(self):
        self.seen: list = []

    def add(self, group: dict) -> None:
        self.seen.append((group["beta1"], group["beta2"]))

    def reconcile(self, param_groups: list) -> None:
        """``betas`` and ``beta1``/``beta2`` agree again. Every group is checked before any is
        written."""
        agreed = []
        for index, group in enumerate(param_groups):
            seen = self.seen[index]
            official = (group["beta1"], group["beta2"])
            betas = _two_betas(group["betas"])
            if betas != seen and official != seen and betas != official:
                raise ValueError(
                    f"Invalid param group {index}: betas was set to {betas} and beta1, beta2 to "
                    f"{official} since the last step; set one of the two")
            chosen = betas if betas != seen else official
            check_group_hyperparameters(dict(zip(("beta1", "beta2"), chosen)))
            agreed.append(chosen)
        for index, (group, chosen) in enumerate(zip(param_groups, agreed)):
            group["beta1"], group["beta2"] = chosen
            group["betas"] = self.seen[index] = chosen

    def loaded(self, param_groups: list) -> None:
        """After load_state_dict: the loaded beta1, beta2 decide."""
        for index, group in enumerate(param_groups):
            group["betas"] = self.seen[index] = (group["beta1"], group["beta2"])
