"""The posterior as an object: what IVON learned, usable without the optimizer.

IVON's posterior over each parameter element is the Gaussian N(m, sigma^2) with

    sigma = 1 / sqrt(ess * (hess + weight_decay))            (docs/DESIGN.md section 2)

(the noise the optimizer samples with is eps * sigma). ``IVON.posterior()`` returns it as a
``Posterior``: per param, in the order of the optimizer's params (group by group), a mean and a
standard deviation shaped like the param. ``merge`` combines posteriors of models fine-tuned from
one base by precision-weighted averaging.

Behind a framework's wrapper, ``ivon_fast.unwrap(wrapped).posterior()`` (``_wrappers``).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

FORMAT = "ivon_fast.Posterior/1"


@dataclass
class Posterior:
    """A diagonal Gaussian posterior over a model's parameters.

    Args:
        mean: one tensor per param, shaped like it (fp32 for bf16/fp16 params: the master mean).
        std: one tensor per param, shaped like its mean; 0 for a param that was frozen
            (``requires_grad=False``), which the optimizer never perturbs.
    """
    mean: list
    std: list

    def __post_init__(self):
        if len(self.mean) != len(self.std):
            raise ValueError(f"Invalid Posterior: {len(self.mean)} means but {len(self.std)} "
                             "standard deviations")
        for index, (mean, std) in enumerate(zip(self.mean, self.std)):
            if mean.shape != std.shape:
                raise ValueError(f"Invalid Posterior: param {index}'s mean has shape "
                                 f"{tuple(mean.shape)} but its std {tuple(std.shape)}")

    def save(self, path) -> None:
        """Write the posterior to ``path`` (CPU tensors; written to a temporary file in the
        same folder and renamed into place, so an interrupted save keeps the old file)."""
        path = os.fspath(path)
        payload = {"format": FORMAT, "mean": [m.detach().cpu() for m in self.mean],
                   "std": [s.detach().cpu() for s in self.std]}
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
        task with this posterior as its prior. Every std must be positive.

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
            precisions.append(1.0 / (ess * std.double().square()))
        return {"prior_mean": [m.detach().clone() for m in self.mean],
                "prior_precision": [p.to(s.dtype) for p, s in zip(precisions, self.std)]}

    @classmethod
    def load(cls, path, map_location=None) -> "Posterior":
        """Read a posterior written by ``save`` (tensors only: ``weights_only`` loading)."""
        payload = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"{os.fspath(path)!r} does not hold an ivon_fast Posterior "
                             f"(format {FORMAT!r})")
        return cls(mean=list(payload["mean"]), std=list(payload["std"]))


def of_optimizer(optimizer) -> Posterior:
    """The optimizer's current posterior, as copies (later steps do not change it)."""
    means, stds = [], []
    for group in optimizer.param_groups:
        ess, weight_decay = float(group["ess"]), float(group["weight_decay"])
        for param in group["params"]:
            state = optimizer.state[param]
            if param.requires_grad:
                mean = state["mean"].detach().clone()
                # a per-element prior precision replaces weight_decay (docs/DESIGN.md 14)
                delta = state["prior_precision"] if "prior_precision" in state else weight_decay
                std = 1.0 / (ess * (state["hess"].detach().to(mean.dtype) + delta)).sqrt()
            else:  # never perturbed nor updated: what it holds now (user code may have set it)
                mean = param.detach().to(state["mean"].dtype).clone()
                std = torch.zeros_like(mean)
            means.append(mean)
            stds.append(std)
    return Posterior(mean=means, std=stds)


def merge(posteriors: list) -> Posterior:
    """Combine posteriors of one architecture (models fine-tuned from one base) element by
    element, weighting each mean by its precision 1 / sigma^2:

        mean = sum_k (m_k / sigma_k^2) / sum_k (1 / sigma_k^2),
        std  = 1 / sqrt(sum_k 1 / sigma_k^2)      (the product of the Gaussians)

    computed in float64 and returned in each mean's dtype. Every std must be positive (a frozen
    param has std 0: leave it out, or merge its values yourself).
    """
    posteriors = list(posteriors)
    if not posteriors:
        raise ValueError("Invalid posteriors: merge() needs at least one Posterior")
    count = len(posteriors[0].mean)
    for index, posterior in enumerate(posteriors):
        if not isinstance(posterior, Posterior):
            raise ValueError(f"Invalid posteriors: item {index} is a {type(posterior).__name__}, "
                             "not an ivon_fast.Posterior")
        if len(posterior.mean) != count:
            raise ValueError(f"Invalid posteriors: item {index} has {len(posterior.mean)} params, "
                             f"item 0 has {count}")
    means, stds = [], []
    for param_index in range(count):
        parts = [(p.mean[param_index], p.std[param_index]) for p in posteriors]
        shape = parts[0][0].shape
        if any(mean.shape != shape for mean, _ in parts):
            raise ValueError(f"Invalid posteriors: param {param_index} has different shapes "
                             f"{[tuple(m.shape) for m, _ in parts]}")
        if any(bool((std <= 0).any()) for _, std in parts):
            raise ValueError(f"Invalid posteriors: param {param_index} has a std <= 0 (a frozen "
                             "param); merge only params with a posterior spread")
        precision_sum = sum(std.double().pow(-2) for _, std in parts)
        weighted_sum = sum(mean.double() * std.double().pow(-2) for mean, std in parts)
        dtype = parts[0][0].dtype
        means.append((weighted_sum / precision_sum).to(dtype))
        stds.append(precision_sum.rsqrt().to(dtype))
    return Posterior(mean=means, std=stds)


__all__ = ["Posterior", "merge", "of_optimizer"]
