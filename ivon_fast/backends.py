"""Backend registry: one module per backend, all implementing the op contract of reference.py.

A backend module exposes ``sample``, ``accumulate`` and ``update`` with the signatures documented
in ``ivon_fast.reference``, and ``unavailable_reason(device) -> str | None`` (None when it can
run on that device).
"""
from __future__ import annotations

import importlib

import torch

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


def _load(name: str):
    return importlib.import_module(_MODULES[name])


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device``, or None when it can."""
    if name == "reference":
        return None
    if name in ("cuda", "cpu") and device.type != name:
        return f"backend={name!r} runs on {name} tensors, got parameters on {device}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    try:
        module = _load(name)
    except ImportError as error:
        return f"backend={name!r} could not be imported: {error}"
    return module.unavailable_reason(device)


def resolve(name: str, device: torch.device) -> str:
    """The concrete backend for ``name`` ('auto' picks the fastest one available) on ``device``."""
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
            if unavailable_reason(candidate, device) is None:
                return candidate
        return "reference"
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(reason)
    return name


def get(name: str):
    """The module implementing concrete backend ``name``."""
    return _load(name)
