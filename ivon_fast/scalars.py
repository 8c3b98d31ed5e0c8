"""The host-side scalars of one IVON update, computed once per param group and step.

Every backend's ``update`` takes one ``StepScalars``: the reference multiplies its fields into fp32
/ fp64 tensors as Python floats (as ivon-opt does), the Triton and C++ kernels receive them as
runtime arguments and round each to fp32 once. The combined values (1 - beta1, 0.5 (1 - beta2)^2,
the rescaled lr, the debias factor) are formed here, in double, and nowhere else, so every backend
rounds the same doubles.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class StepScalars:
    """Hyperparameters of one update, as Python floats (double).

    Args:
        lr: the effective learning rate (already rescaled by hess_init + weight_decay when
            ``rescale_lr``).
        ess: effective sample size lambda.
        weight_decay: prior precision delta.
        beta1, beta2: momentum and Hessian-estimate coefficients.
        clip_radius: elementwise clip of the preconditioned step (may be inf).
        debias: 1 - beta1 ** step, or 1.0 without debiasing.
        one_minus_beta1, one_minus_beta2, hess_coef: 1 - beta1, 1 - beta2, 0.5 (1 - beta2)^2.
    """
    lr: float
    ess: float
    weight_decay: float
    beta1: float
    beta2: float
    clip_radius: float
    debias: float
    one_minus_beta1: float
    one_minus_beta2: float
    hess_coef: float

    @classmethod
    def of(cls, *, lr, ess, weight_decay, beta1, beta2, clip_radius=math.inf, debias=1.0
           ) -> "StepScalars":
        """The scalars for an already effective ``lr`` and ``debias`` factor."""
        beta1, beta2 = float(beta1), float(beta2)
        return cls(lr=float(lr), ess=float(ess), weight_decay=float(weight_decay), beta1=beta1,
                   beta2=beta2, clip_radius=float(clip_radius), debias=float(debias),
                   one_minus_beta1=1.0 - beta1, one_minus_beta2=1.0 - beta2,
                   hess_coef=0.5 * (1 - beta2) ** 2)

    @classmethod
    def for_group(cls, group: dict, step: int, *, rescale_lr: bool, debias: bool
                  ) -> "StepScalars":
        """The scalars of update number ``step`` (1 for the first) of a param group.

        Written op for op as ivon-opt 0.1.3: lr * (hess_init + weight_decay), 1 - beta1 ** step.
        """
        lr, weight_decay = float(group["lr"]), float(group["weight_decay"])
        beta1 = float(group["beta1"])
        if rescale_lr:
            lr = lr * (float(group["hess_init"]) + weight_decay)
        factor = 1.0 - math.pow(beta1, float(step)) if debias else 1.0
        return cls.of(lr=lr, ess=group["ess"], weight_decay=weight_decay, beta1=beta1,
                      beta2=group["beta2"], clip_radius=group["clip_radius"], debias=factor)
