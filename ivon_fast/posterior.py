"""The posterior as an object: what IVON learned, usable without the optimizer.

IVON's posterior over each parameter element is the Gaussian N(m, sigma^2) with

    sigma = 1 / sqrt(ess * (hess + weight_decay))            (docs/DESIGN.md section 2)

(the noise the optimizer samples with is eps * sigma). ``IVON.posterior()`` returns it as a
``Posterior``: per param, in the order of the optimizer's params (group by group), a mean and a
standard deviation shaped like the param. ``merge`` combines posteriors of models fine-tuned from
one base by precision-weighted averaging.

Note [posteriors know their params]: a posterior is in param-group order, which need not be a
model's ``parameters()`` order (layer-wise lr groups list the top layer first), and shapes often
repeat, so matching by order can silently pick the wrong weights. A posterior therefore carries
its params' names when they are known (``IVON(model.named_parameters())``, or
``opt.posterior(model)``), saves them, and ``predict``, ``as_prior`` and ``merge`` align by name.
Without names it can be aligned only with the very params it was built from (it keeps weak
references to them, never saved); anything else is refused, naming the first mismatch.
``with_names`` attaches names by hand, for posteriors saved without them.

Behind a framework's wrapper, ``ivon_fast.unwrap(wrapped).posterior()`` (``_wrappers``).
"""
from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch

from .reference import state_dtype

FORMAT = "ivon_fast.Posterior/2"
_FORMATS = ("ivon_fast.Posterior/1", FORMAT)  # /1: written before posteriors had names


@dataclass
class Posterior:
    """A diagonal Gaussian posterior over a model's parameters.

    Args:
        mean: one tensor per param, shaped like it (fp32 for bf16/fp16 params: the master mean).
        std: one tensor per param, shaped like its mean; 0 for a param that was frozen
            (``requires_grad=False``), which the optimizer never perturbs.
        names (default None): each param's name in its model (``named_parameters()``), or None
            when unknown (Note [posteriors know their params]).
    """
    mean: list
    std: list
    names: Optional[list] = None
    # weak references to the params it was built from, when it was (not saved, not compared)
    params: Optional[list] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if len(self.mean) != len(self.std):
            raise ValueError(f"Invalid Posterior: {len(self.mean)} means but {len(self.std)} "
                             "standard deviations")
        for index, (mean, std) in enumerate(zip(self.mean, self.std)):
            if mean.shape != std.shape:
                raise ValueError(f"Invalid Posterior: param {index}'s mean has shape "
                                 f"{tuple(mean.shape)} but its std {tuple(std.shape)}")
        if self.names is not None:
            self.names = list(self.names)
            if len(self.names) != len(self.mean) or len(set(self.names)) != len(self.names) \
                    or not all(isinstance(name, str) for name in self.names):
                raise ValueError(f"Invalid Posterior: names must be {len(self.mean)} distinct "
                                 f"strings, one per param, got {self.names!r}")

    def with_names(self, names) -> "Posterior":
        """This posterior with ``names`` (one per param, in its order): you vouch for the
        order, e.g. for a posterior saved before posteriors had names."""
        return Posterior(mean=list(self.mean), std=list(self.std), names=list(names))

    def live_params(self) -> Optional[list]:
        """The params it was built from, if it was and they all still exist."""
        params = [ref() for ref in self.params] if self.params is not None else None
        return None if params is None or any(p is None for p in params) else params

    def save(self, path) -> None:
        """Write the posterior to ``path`` (CPU tensors and the names; written to a temporary
        file in the same folder and renamed into place, so an interrupted save keeps the old
        file)."""
        path = os.fspath(path)
        payload = {"format": FORMAT, "mean": [m.detach().cpu() for m in self.mean],
                   "std": [s.detach().cpu() for s in self.std], "names": self.names}
        temporary = f"{path}.tmp{os.getpid()}"
        try:
            with open(temporary, "wb") as file:
                torch.save(payload, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)

    def as_prior(self, ess: float) -> dict:
        """This posterior as the prior of a next task (continual learning): the constructor
        arguments ``prior_mean`` (the means) and ``prior_precision`` (1 / (ess sigma^2), the
        precision in weight_decay's units for a task trained with effective sample size
        ``ess``), so ``IVON(params, ..., ess=ess, **posterior.as_prior(ess))`` starts the next
        task with this posterior as its prior. Every std must be positive. With names, each is
        a dict by name (IVON then needs ``model.named_parameters()``); without, a list that
        IVON checks against the params the posterior was built from (Note [posteriors know
        their params]).

        Args:
            ess (float): the next task's effective sample size, > 0.
        """
        if not (isinstance(ess, (int, float)) and not isinstance(ess, bool) and ess > 0
                and math.isfinite(ess)):
            raise ValueError(f"Invalid ess: {ess!r}; it must be a finite number > 0")
        precisions = []
        for index, std in enumerate(self.std):
            if bool((std <= 0).any()):
                raise ValueError(f"Invalid Posterior for as_prior: param {index} has a std <= 0 "
                                 "(a frozen param); freeze it in the next task too, and give "
                                 "its group its own prior")
            precisions.append((1.0 / (ess * std.double().square())).to(std.dtype))
        means = [m.detach().clone() for m in self.mean]
        if self.names is not None:
            return {"prior_mean": dict(zip(self.names, means)),
                    "prior_precision": dict(zip(self.names, precisions))}
        params = self.live_params()
        if params is None:
            raise ValueError("Invalid Posterior for as_prior: it has no param names and was not "
                             "built from live params, so its order cannot be checked; give it "
                             "names (Posterior.with_names, or IVON(model.named_parameters()))")
        return {"prior_mean": PriorList(means, params),
                "prior_precision": PriorList(precisions, params)}

    @classmethod
    def load(cls, path, map_location=None) -> "Posterior":
        """Read a posterior written by ``save`` (tensors only: ``weights_only`` loading)."""
        payload = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") not in _FORMATS:
            raise ValueError(f"{os.fspath(path)!r} does not hold an ivon_fast Posterior "
                             f"(format {FORMAT!r})")
        return cls(mean=list(payload["mean"]), std=list(payload["std"]),
                   names=payload.get("names"))


class PriorList(list):
    """An unnamed posterior's prior tensors, with the params they belong to, in order: IVON
    checks they are its params (Note [posteriors know their params])."""

    def __init__(self, tensors: list, params: list):
        super().__init__(tensors)
        self.params = params


def of_optimizer(optimizer, names: Optional[list] = None) -> Posterior:
    """The optimizer's current posterior, as copies (later steps do not change it)."""
    means, stds, params = [], [], []
    for group in optimizer.param_groups:
        ess, weight_decay = float(group["ess"]), float(group["weight_decay"])
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if param.requires_grad and "mean" in state:
                mean = state["mean"].detach().clone()
                # a per-element prior precision replaces weight_decay (docs/DESIGN.md 14)
                delta = state["prior_precision"] if "prior_precision" in state else weight_decay
                std = 1.0 / (ess * (state["hess"].detach().to(mean.dtype) + delta)).sqrt()
            else:  # never perturbed nor updated: what it holds now (user code may have set it)
                mean = param.detach().to(state_dtype(param.dtype)).clone()
                std = torch.zeros_like(mean)
            means.append(mean)
            stds.append(std)
            params.append(weakref.ref(param))
    return Posterior(mean=means, std=stds, names=names, params=params)


def merge(posteriors: list) -> Posterior:
    """Combine posteriors of one architecture (models fine-tuned from one base) element by
    element, weighting each mean by its precision 1 / sigma^2:

        mean = sum_k (m_k / sigma_k^2) / sum_k (1 / sigma_k^2),
        std  = 1 / sqrt(sum_k 1 / sigma_k^2)      (the product of the Gaussians)

    computed in float64 and returned in each mean's dtype. The posteriors are aligned by name
    (Note [posteriors know their params]): each must have names, the same set; the result is
    in the first one's order. Every std must be positive (a frozen param has std 0: leave it
    out, or merge its values yourself).
    """
    posteriors = list(posteriors)
    if not posteriors:
        raise ValueError("Invalid posteriors: merge() needs at least one Posterior")
    aligned = [_aligned_to(posteriors[0], posterior, index)
               for index, posterior in enumerate(posteriors)]
    means, stds = [], []
    for param_index, name in enumerate(posteriors[0].names):
        parts = [parts[param_index] for parts in aligned]
        if any(bool((std <= 0).any()) for _, std in parts):
            raise ValueError(f"Invalid posteriors: param {name!r} has a std <= 0 (a frozen "
                             "param); merge only params with a posterior spread")
        precision_sum = sum(std.double().pow(-2) for _, std in parts)
        weighted_sum = sum(mean.double() * std.double().pow(-2) for mean, std in parts)
        dtype = parts[0][0].dtype
        means.append((weighted_sum / precision_sum).to(dtype))
        stds.append(precision_sum.rsqrt().to(dtype))
    return Posterior(mean=means, std=stds, names=list(posteriors[0].names))


def _aligned_to(first: Posterior, posterior, index: int) -> list:
    """(mean, std) of ``posterior`` for each of ``first``'s names, in its order."""
    if not isinstance(posterior, Posterior):
        raise ValueError(f"Invalid posteriors: item {index} is a {type(posterior).__name__}, "
                         "not an ivon_fast.Posterior")
    if posterior.names is None:
        raise ValueError(f"Invalid posteriors: item {index} has no param names, so it cannot be "
                         "aligned with the others; build it with IVON(model.named_parameters()) "
                         "or opt.posterior(model), or give it names (Posterior.with_names)")
    by_name = {name: (m, s) for name, m, s in zip(posterior.names, posterior.mean, posterior.std)}
    missing = [name for name in first.names if name not in by_name]
    extra = [name for name in posterior.names if name not in set(first.names)]
    if missing or extra:
        raise ValueError(f"Invalid posteriors: item {index} has different params than item 0: "
                         f"{'missing ' + repr(missing[0]) if missing else 'extra ' + repr(extra[0])}")
    pairs = [by_name[name] for name in first.names]
    for name, (mean, _), reference in zip(first.names, pairs, first.mean):
        if mean.shape != reference.shape:
            raise ValueError(f"Invalid posteriors: param {name!r} has shape {tuple(mean.shape)} "
                             f"in item {index} but {tuple(reference.shape)} in item 0")
    return pairs


__all__ = ["Posterior", "PriorList", "merge", "of_optimizer"]
