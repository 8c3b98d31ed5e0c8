"""The backends the kernel suite runs on: one table, one line per backend.

Every module named here implements the op contract of ``ivon_fast.reference`` (docs/DESIGN.md
section 5): ``sample``, ``accumulate`` and ``update`` with the same keyword arguments. A backend
added later plugs into the whole kernel suite (tests/test_kernels*.py) with one line in
``BACKENDS``: its name (the test id), its module, the device its tensors live on, its pytest
marks, and whether it is the spec (compared with nothing: a check of the reference against itself
could not fail). Its skip reason is the module's ``unavailable_reason(device)`` (none for a module
without one); the ``gpu`` mark skips without a CUDA device (tests/conftest.py).

The compiled extension: missing, its backends are skipped with the reason, unless
``IVON_FAST_EXPECT_EXT=1`` or ``IVON_FAST_EXPECT_CUDA=1`` says it must be there (CI): then
importing this module fails, and with ``IVON_FAST_EXPECT_CUDA=1`` a CUDA backend whose kernels are
missing fails instead of skipping.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import pytest
import torch


@dataclass(frozen=True)
class Backend:
    name: str                 # the test id
    module_name: str          # implements ivon_fast.reference's op contract
    device: str               # where its tensors live
    marks: tuple = ()
    spec: bool = False        # the reference: never compared with itself

    @property
    def module(self):
        return importlib.import_module(self.module_name)

    def unavailable_reason(self):
        reason = getattr(self.module, "unavailable_reason", None)
        return None if reason is None else reason(self.device)

    @property
    def triton(self) -> bool:
        return self.module_name == "ivon_fast.triton_backend"

    @property
    def compiled(self) -> bool:
        return self.module_name == "ivon_fast.cpp_backend"


# Triton runs on the GPU where there is one, else on CPU tensors under the interpreter (set by
# tests/conftest.py; without a GPU the interpreter is the only way Triton runs here).
_TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

BACKENDS = [
    Backend("reference", "ivon_fast.reference", "cpu", spec=True),
    Backend("triton", "ivon_fast.triton_backend", _TRITON_DEVICE, (pytest.mark.triton,)),
    Backend("cpu", "ivon_fast.cpp_backend", "cpu", (pytest.mark.cpp,)),
    Backend("cuda", "ivon_fast.cpp_backend", "cuda", (pytest.mark.cpp, pytest.mark.gpu)),
    # the CUDA source compiled as host C++ under the sanitizers; runs only in the subprocess of
    # tests/test_cuda_on_cpu.py, which loads ASan first (Note [the CUDA source on the CPU])
    Backend("cuda_on_cpu", "cuda_on_cpu_backend", "cpu", (pytest.mark.cpp,)),
]
BY_NAME = {backend.name: backend for backend in BACKENDS}

_EXPECT_EXT = os.environ.get("IVON_FAST_EXPECT_EXT") == "1"
_EXPECT_CUDA = os.environ.get("IVON_FAST_EXPECT_CUDA") == "1"
_EXT_REASON = BY_NAME["cpu"].unavailable_reason()
if _EXT_REASON is not None and (_EXPECT_EXT or _EXPECT_CUDA):
    raise RuntimeError(f"the compiled extension is expected but unavailable: {_EXT_REASON}")


def _skip_reason(backend: Backend) -> str | None:
    if "gpu" in {mark.name for mark in backend.marks} and not torch.cuda.is_available():
        return None  # the gpu mark skips it (tests/conftest.py), with that reason
    reason = backend.unavailable_reason()
    if reason is not None and backend.compiled and backend.device == "cuda" and _EXPECT_CUDA:
        return None  # the CUDA kernels must be there: let the test fail
    return reason


def backend_params(which="all", *, only=None):
    """pytest.param of each backend, with its marks and skip: ``which`` 'all', or 'compared'
    (every backend but the spec: the checks against ivon_fast.reference); ``only``: a predicate
    on the Backend (e.g. the Triton ones)."""
    params = []
    for backend in BACKENDS:
        if which == "compared" and backend.spec:
            continue
        if only is not None and not only(backend):
            continue
        marks = list(backend.marks)
        reason = _skip_reason(backend)
        if reason is not None:
            marks.append(pytest.mark.skip(reason=reason))
        params.append(pytest.param(backend, id=backend.name, marks=marks))
    return params


ALL = backend_params("all")
COMPARED = backend_params("compared")
