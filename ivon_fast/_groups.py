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
from .posterior import PriorList
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
    for group in param_groups:
        _split_names(group)
    if not any(group["params"] for group in param_groups):
        raise ValueError("Invalid params: IVON got an empty parameter list (a generator such "
                         "as model.parameters() can only be iterated once)")
    for group in param_groups:
        check_group_hyperparameters(group)
        check_params(group["params"], backend_choice, sync=sync, rng=rng,
                     state_dtype=state_dtype)
    for name, value in (("prior_mean", prior_mean), ("prior_precision", prior_precision)):
        for group in param_groups:  # a group's own prior given by name
            if name in group:
                group[name] = _prior_in_order(name, group[name], [group])
        defaults[name] = _split_prior(name, _prior_in_order(name, value, [
            group for group in param_groups if name not in group]), param_groups)
    for group in param_groups:
        for name in PRIOR_STATE:
            check_prior(name, group.get(name, defaults[name]), group["params"])
    return param_groups


def _split_names(group: dict) -> None:
    """A group given as (name, param) pairs (``model.named_parameters()``): its params, and
    their names in ``param_names`` (torch.optim's convention)."""
    named = [isinstance(item, tuple) for item in group["params"]]
    if not any(named):
        return
    if not all(named):
        raise ValueError("Invalid params: a param group gives some params with their names and "
                         "some without; give all as (name, param) pairs or none")
    group["param_names"] = [name for name, _ in group["params"]]
    group["params"] = [param for _, param in group["params"]]


def _prior_in_order(name: str, value, groups: list):
    """A prior given by param name (a dict, ``Posterior.as_prior`` of a named posterior) as a
    list in the params' order of ``groups``, which must know their names; an unnamed
    posterior's list (``PriorList``) checked against those params. Other values as given."""
    if isinstance(value, PriorList):
        _check_same_params(name, [p for group in groups for p in group["params"]], value.params)
        return list(value)
    return _by_name(name, value, groups) if isinstance(value, dict) else value


def _by_name(name: str, value: dict, groups: list) -> list:
    """A prior's tensors by param name, in the params' order of ``groups``."""
    if not all("param_names" in group for group in groups):
        raise ValueError(f"Invalid {name}: given by param name, but the optimizer does not know "
                         "its params' names; pass model.named_parameters()")
    names = [n for group in groups for n in group["param_names"]]
    missing = [n for n in names if n not in value]
    if missing:
        raise ValueError(f"Invalid {name}: no tensor for param {missing[0]!r}")
    unknown = [n for n in value if n not in set(names)]
    if unknown:
        raise ValueError(f"Invalid {name}: {unknown[0]!r} is not a param of this optimizer")
    return [value[n] for n in names]


def _check_same_params(name: str, mine: list, theirs: list) -> None:
    """An unnamed posterior's prior must belong to exactly these params, in this order."""
    for index in range(max(len(mine), len(theirs))):
        if index >= len(mine) or index >= len(theirs) or mine[index] is not theirs[index]:
            raise ValueError(f"Invalid {name}: it comes from a posterior without param names "
                             f"whose param {index} is not this optimizer's param {index}; give "
                             "the posterior names (IVON(model.named_parameters()) or "
                             "opt.posterior(model))")


def param_names(param_groups: list, model=None):
    """Every param's name, group by group: from ``model.named_parameters()`` when given, else
    from the groups' ``param_names``; None when unknown."""
    params = [p for group in param_groups for p in group["params"]]
    if model is not None:
        names = {id(p): name for name, p in model.named_parameters()}
        for index, param in enumerate(params):
            if id(param) not in names:
                raise ValueError(f"Invalid model: the optimizer's param {index} (shape "
                                 f"{tuple(param.shape)}) is not a parameter of model")
        return [names[id(p)] for p in params]
    if all("param_names" in group for group in param_groups):
        return [name for group in param_groups for name in group["param_names"]]
    return None


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
    _split_names(group)
    check_params(group["params"], backend_choice, sync=sync, rng=rng, state_dtype=state_dtype)
    for name in PRIOR_STATE:
        if name in group:
            group[name] = _prior_in_order(name, group[name], [group])
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
    priors = {name: group.get(name) for name in PRIOR_STATE}
    new_buckets = opt._layout.add_group(len(opt.param_groups) - 1, group["params"],
                                        group["hess_init"], priors)
    for name, value in priors.items():  # the values are state now, saved per param
        if value is not None:
            group[name] = value if isinstance(value, str) else "given"
    opt._layout.state_views_into(opt.state)
    if opt._count > 0:
        for bucket in new_buckets:
            bucket.ensure_averages()
    if opt.resample_on_step and opt._pending_draw is not None:
        _op_loop.sample(opt, opt._pending_draw, buckets=new_buckets)


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
