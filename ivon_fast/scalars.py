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
from typing import Optional

import torch


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
    def for_group(cls, group: dict, step: Optional[int], *, rescale_lr: bool, debias: bool
                  ) -> "StepScalars":
        """The scalars of update number ``step`` (1 for the first) of a param group.

        Written op for op as ivon-opt 0.1.3: lr * (hess_init + weight_decay), 1 - beta1 ** step.
        ``step=None``: only the device knows the step (Note [steps decided on the device]); the
        debias factor is then 1.0 here and the update takes it from ``device_debias``.
        """
        lr, weight_decay = float(group["lr"]), float(group["weight_decay"])
        beta1 = float(group["beta1"])
        if rescale_lr:
            lr = lr * (float(group["hess_init"]) + weight_decay)
        factor = 1.0 - math.pow(beta1, float(step)) if debias and step is not None else 1.0
        return cls.of(lr=lr, ess=group["ess"], weight_decay=weight_decay, beta1=beta1,
                      beta2=group["beta2"], clip_radius=group["clip_radius"], debias=factor)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` without a host synchronization where that is safe: a copy into
    the CPU must complete before CPU code reads it (a ``non_blocking`` one returns at once), so
    that one waits; params spread over a CPU and a GPU cost a sync per step."""
    if tensor.device == device:
        return tensor
    return tensor.to(device, non_blocking=device.type != "cpu")


def device_lr_tensor(lr, params) -> torch.Tensor:
    """A capturable group's lr: the given tensor when it is a float tensor of one element on
    the params' device (schedulers then ``fill_`` it in place), else a 0-dim float64 tensor
    there holding the value (read once, here)."""
    device = params[0].device if params else torch.device("cpu")
    if (isinstance(lr, torch.Tensor) and lr.device == device and lr.is_floating_point()
            and lr.numel() == 1):
        return lr
    return torch.tensor(float(lr), dtype=torch.float64, device=device)


class StepCount:
    """The number of updates taken, kept on the host until a step's outcome is decided on a device.

    Note [steps decided on the device]: a step whose gradients are not finite is skipped by the
    kernels themselves (``found_inf``), so that neither the GradScaler's fused path nor the
    optimizer's own check waits for the device. The host then cannot know whether the step count
    advanced; from the first such step on, the count lives in a float64 device tensor (exact up to
    2^53 steps), the debias factor 1 - beta1^t is formed from it on the device (in double, as the
    host would), and reading ``value()`` synchronizes.
    """

    def __init__(self):
        self._host_taken = 0
        self._host_skipped = 0
        self._taken: Optional[torch.Tensor] = None    # float64, 1 element, once on a device
        self._skipped: Optional[torch.Tensor] = None
        self._pinned = False  # capturable: the tensors above exist and are never replaced

    @property
    def on_device(self) -> bool:
        return self._taken is not None

    def value(self) -> int:
        return self._host_taken if self._taken is None else int(self._taken.item())

    def skipped(self) -> int:
        return self._host_skipped if self._skipped is None else int(self._skipped.item())

    def set(self, taken: int, skipped: int = 0) -> None:
        self._host_taken, self._host_skipped = int(taken), int(skipped)
        if self._pinned and self._taken is not None:  # in place: a captured graph reads them
            self._taken.fill_(float(taken))
            self._skipped.fill_(float(skipped))
            return
        self._taken = self._skipped = None

    def pin_to_device(self, device: torch.device) -> None:
        """Keep the count on ``device`` from now on, in the same two tensors (capturable steps:
        a CUDA graph captured once keeps reading and advancing them; ``set`` fills them)."""
        self._place(torch.device(device))
        self._pinned = True

    def advance_on_host(self) -> int:
        """The next update's number, when no device decides whether it happens."""
        self._host_taken += 1
        return self._host_taken

    def advance_on_device(self, device: torch.device) -> torch.Tensor:
        """The next update's number as a device tensor; ``settle`` takes it back if skipped."""
        self._place(device)
        return self._taken.add_(1)

    def _place(self, device: torch.device) -> None:
        """The two count tensors on ``device``: made from the host's counts the first time,
        moved with the params afterwards (``model.to``)."""
        if self._taken is None:
            self._taken = torch.full((1,), float(self._host_taken), dtype=torch.float64,
                                     device=device)
            self._skipped = torch.full((1,), float(self._host_skipped), dtype=torch.float64,
                                       device=device)
        elif self._taken.device != device:
            self._taken, self._skipped = self._taken.to(device), self._skipped.to(device)

    def settle(self, found_inf: Optional[torch.Tensor]) -> None:
        """A skipped update (found_inf nonzero) does not count; it is counted as skipped."""
        if found_inf is None:
            return
        skipped = to_device(found_inf, self._taken.device).ne(0).to(torch.float64)
        self._taken.sub_(skipped)
        self._skipped.add_(skipped)

    def debias_on_device(self, beta1: float, dtype: torch.dtype) -> torch.Tensor:
        """1 - beta1^t of the update being taken, in double on the device, rounded to ``dtype``."""
        return torch.pow(float(beta1), self._taken).neg_().add_(1.0).to(dtype)
