"""Backend registry: one module per backend, all implementing the op contract of reference.py.

A backend module exposes ``sample``, ``accumulate`` and ``update`` with the signatures documented
in ``ivon_fast.reference``, and ``unavailable_reason(device) -> str | None`` (None when it can
run on that device). Kernel backends take the params in KERNEL_DTYPES; every backend keeps the
momentum and hess in float32 or bfloat16 (IVON's ``state_dtype``, docs/DESIGN.md section 16).
"""
from __future__ import annotations

import importlib
import warnings

import torch

from ivon_fast import _extension

BACKENDS = ("reference", "triton", "cuda", "cpu")

# The order 'auto' tries, fastest first, per device type. On an H200 (bench/results/) the Triton
# update-with-resample reached 91% of copy bandwidth and the CUDA kernel 83%.
_AUTO_ORDER = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}

_MODULES = {
    "reference": "ivon_fast.reference",
    "triton": "ivon_fast.triton_backend",
    "cuda": "ivon_fast.cpp_backend",
    "cpu": "ivon_fast.cpp_backend",
}


# the backends of the compiled extension ivon_fast._C
_COMPILED = ("cuda", "cpu")


def _load(name: str):
    return importlib.import_module(_MODULES[name])


# the kernel backends take fp32 / bf16 / fp16 params (fp32 mean); the reference takes any float
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unavailable_reason(name: str, device: torch.device,
                       dtype: torch.dtype = torch.float32) -> str | None:
    """Why backend ``name`` cannot run on ``device`` with ``dtype`` params, or None when it
    can."""
    device = torch.device(device)
    if name == "reference":
        return None
    if dtype not in KERNEL_DTYPES:
        return f"backend={name!r} takes {KERNEL_DTYPES} params, got {dtype}"
    if name in ("cuda", "cpu") and device.type != name:
        return f"backend={name!r} runs on {name} tensors, got parameters on {device}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    try:
        module = _load(name)
    except ImportError as error:
        return f"backend={name!r} could not be imported: {error}"
    return module.unavailable_reason(device)


def resolve(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The concrete backend for ``name`` on ``device`` and ``dtype`` params.

    'auto' picks the fastest one available (the reference when no kernel fits); an explicit
    name that cannot run there raises ValueError.
    """
    device = torch.device(device)
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
            if unavailable_reason(candidate, device, dtype) is None:
                return candidate
            if candidate in _COMPILED and dtype in KERNEL_DTYPES:
                _warn_extension_unloadable()
        return "reference"
    reason = unavailable_reason(name, device, dtype)
    if reason is not None:
        raise ValueError(f"Invalid backend: {reason}")
    return name


_extension_warned = False


def _warn_extension_unloadable() -> None:
    """Warn, once per process, when 'auto' passes over the compiled kernels because the
    extension cannot be loaded: the fallback works but is slower, and the cause (often a torch
    upgraded after the build) is easy to fix. Other reasons (no CUDA kernels built) are not
    warned about: they are choices of the build."""
    global _extension_warned
    error = _extension.load_error()
    if error is None or _extension_warned:
        return
    _extension_warned = True
    warnings.warn(f"ivon_fast: backend='auto' cannot use the compiled kernels and falls back to "
                  f"a slower backend: {error}. To fix it, {_extension.BUILD_HINT}. "
                  "`python -m ivon_fast` shows what is installed.",
                  _extension.ExtensionWarning, stacklevel=3)


def get(name: str):
    """The module implementing concrete backend ``name``."""
    return _load(name)
