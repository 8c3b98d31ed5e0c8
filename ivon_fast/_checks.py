"""Argument checks of ``ivon_fast.IVON``: a ValueError naming the argument and its accepted range,
raised before anything is touched."""
from __future__ import annotations

import math
import numbers

import torch

from . import backends
from ._sharded import check_params as check_sharded
from ._sharded import is_sharded

HESS_APPROX = ("price", "gradsq")
RNGS = ("philox", "torch")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# name: (low, high, low_open, high_open). beta1 = 1 would make the debias factor 1 - beta1^t zero
# (a division by zero in the update); ess, hess_init and clip_radius appear as divisors or in
# 1 / sqrt(ess (h + wd)), so they must be positive.
_GROUP_RANGES = {
    "lr": (0.0, math.inf, False, True),
    "ess": (0.0, math.inf, True, True),
    "hess_init": (0.0, math.inf, True, True),
    "beta1": (0.0, 1.0, False, True),
    "beta2": (0.0, 1.0, False, False),
    "weight_decay": (0.0, math.inf, False, True),
    "clip_radius": (0.0, math.inf, True, False),
}


def check_range(name, value, low, high, low_open=False, high_open=False) -> None:
    """Raise ValueError naming the argument unless low (<|<=) value (<|<=) high."""
    try:
        number = math.nan if isinstance(value, (str, bool)) else float(value)
    except (TypeError, ValueError):
        number = math.nan
    ok_low = number > low if low_open else number >= low
    ok_high = number < high if high_open else number <= high
    if not (ok_low and ok_high):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"Invalid {name}: {value!r}; it must be in {interval}")


def check_group_hyperparameters(group: dict, read_tensors: bool = True) -> None:
    """``read_tensors=False`` (capturable steps): a one-element tensor's value is not read (that
    would wait for the device, which a CUDA graph capture forbids); its shape still is."""
    for name, (low, high, low_open, high_open) in _GROUP_RANGES.items():
        if name in group:
            value = group[name]
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(f"Invalid {name}: a tensor of {value.numel()} elements; it "
                                     "must be a number or a one-element tensor")
                if not read_tensors:
                    continue
                value = value.item()
            check_range(name, value, low, high, low_open, high_open)


def check_options(*, mc_samples, hess_approx, backend, rng, seed, state_dtype,
                  flags: dict) -> None:
    """The constructor's arguments other than the params and group hyperparameters."""
    if (isinstance(mc_samples, bool) or not isinstance(mc_samples, numbers.Integral)
            or mc_samples < 1):
        raise ValueError(f"Invalid mc_samples: {mc_samples!r}; it must be an int >= 1")
    if hess_approx not in HESS_APPROX:
        raise ValueError(f"Invalid hess_approx: {hess_approx!r}; it must be one of {HESS_APPROX}")
    _check_noise_options(backend, rng, seed)
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise ValueError(f"Invalid {name}: {flag!r}; it must be True or False")
    check_state_dtype(state_dtype)
    if flags.get("capturable") and rng == "torch":
        raise ValueError("Invalid capturable: True with rng='torch'; torch.randn noise is "
                         "drawn on the host per step and cannot be replayed by a CUDA graph "
                         "(use the default rng='philox')")


def _check_noise_options(backend, rng, seed) -> None:
    """``backend``, ``rng`` and ``seed``: together they decide where the noise comes from."""
    if backend != "auto" and backend not in backends.BACKENDS:
        raise ValueError(
            f"Invalid backend: {backend!r}; it must be 'auto' or one of {backends.BACKENDS}")
    if rng not in RNGS:
        raise ValueError(f"Invalid rng: {rng!r}; it must be one of {RNGS}")
    if rng == "torch" and backend not in ("auto", "reference"):
        raise ValueError(
            f"Invalid backend: {backend!r} with rng='torch'; torch.randn noise is only "
            "available with backend='reference' (or 'auto', which then picks it)")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not 0 <= seed < 2**64):
        raise ValueError(f"Invalid seed: {seed!r}; it must be None or an int in [0, 2**64)")


def check_params(params: list, backend_choice: str, *, sync: bool = False,
                 rng: str = "philox", state_dtype: torch.dtype = torch.float32) -> None:
    """The params of a group: tensors of a float dtype, each once, that ``backend_choice`` can
    serve (every backend keeps momentum and hess in any ``state_dtype``): the backend is
    resolved as the layout will resolve it (``backends.resolve``), so a ValueError comes before
    anything moves."""
    if len({id(p) for p in params}) != len(params):
        # torch only warns; each param owns one slice of a flat bucket, so a second copy would
        # be a second view that the optimizer overwrites
        raise ValueError("Invalid params: a param group lists the same parameter twice (e.g. "
                         "tied weights gathered from two modules); pass each parameter once")
    for param in params:
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"IVON params must be tensors, got {type(param).__name__}")
        if param.dtype not in FLOAT_DTYPES:
            raise ValueError(f"Invalid param dtype: {param.dtype}; IVON supports {FLOAT_DTYPES}")
        if param.is_sparse:
            raise ValueError("Invalid param: sparse tensors are not supported by IVON")
        if state_dtype != torch.float32 and param.dtype == torch.float64:
            raise ValueError(f"Invalid state_dtype: {state_dtype} with float64 params; their "
                             "state is float64 (use state_dtype=torch.float32)")
        backends.resolve(backend_choice, param.device, param.dtype)
    check_sharded(params, sync=sync, rng=rng)


def check_prior(name: str, value, params: list) -> None:
    """A param group's ``prior_mean`` (None, 'init' or one tensor per param) or
    ``prior_precision`` (None or one tensor per param, finite and >= 0): a ValueError naming the
    argument, before anything moves (docs/DESIGN.md section 14)."""
    if value is None:
        return
    from_init = name == "prior_mean" and isinstance(value, str) and value == "init"
    if not from_init and not isinstance(value, (list, tuple)):
        accepted = ("None, 'init' or a list of tensors shaped like the params"
                    if name == "prior_mean" else "None or a list of tensors shaped like the params")
        raise ValueError(f"Invalid {name}: {value!r}; it must be {accepted}")
    if any(is_sharded(p) for p in params):
        raise ValueError(f"Invalid {name}: priors are not supported for sharded (FSDP2 DTensor) "
                         "params yet; give the prior as weight_decay (zero mean) there")
    if from_init:
        return
    given = list(value)
    if len(given) != len(params):
        raise ValueError(f"Invalid {name}: {len(given)} tensors for {len(params)} params (one "
                         "per param, in the order of the params, group by group)")
    for index, (tensor, param) in enumerate(zip(given, params)):
        _check_prior_tensor(name, index, tensor, param)


def _check_prior_tensor(name: str, index: int, tensor, param) -> None:
    """Item ``index`` of a prior given as one tensor per param."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise ValueError(f"Invalid {name}: item {index} is not a floating-point tensor")
    if tuple(tensor.shape) != tuple(param.shape):
        raise ValueError(f"Invalid {name}: item {index} has shape {tuple(tensor.shape)}, "
                         f"its param {tuple(param.shape)}")
    if param.device.type == "meta" or tensor.device.type == "meta":
        raise ValueError(f"Invalid {name}: item {index} (or its param) is on the meta "
                         "device, where values cannot be kept; build the optimizer after "
                         "materializing the model")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"Invalid {name}: item {index} holds inf or NaN")
    if name == "prior_precision" and bool((tensor < 0).any()):
        raise ValueError(f"Invalid {name}: item {index} holds negative values; a prior "
                         "precision must be >= 0")


def check_state_dtype(state_dtype) -> None:
    """``state_dtype``: float32 or bfloat16 (docs/DESIGN.md 16), which every backend implements;
    bf16 state also takes ``capturable`` and sharded (FSDP2) params, not float64 params
    (``check_params``)."""
    if state_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"Invalid state_dtype: {state_dtype!r}; it must be torch.float32 or "
                         "torch.bfloat16")
