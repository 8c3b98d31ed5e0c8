"""The CUDA source on the CPU as a backend of the kernel suite (tests/kernel_backends.py's
``cuda_on_cpu``; Note [the CUDA source on the CPU] in csrc/cuda_on_cpu.h).

It implements ``ivon_fast.reference``'s op contract with the compiled backend's own Python
wrappers (a second instance of ``ivon_fast.cpp_backend``) over the test build of
tests/cuda_on_cpu_build.py, whose ops are ``torch.ops.ivon_fast_cuda_on_cpu.*``: csrc/ops.cpp
builds their OpArgs, and the CUDA kernels, compiled as host C++ under ASan and UBSan, run on
them. It runs only in a process that loaded the ASan runtime first (tests/test_cuda_on_cpu.py
starts one, and runs this backend's part of the suite there); anywhere else
``unavailable_reason`` says so and the suite skips it.

Note [guarded buffers]: x86 reads and writes happily past a buffer and through a misaligned
pointer, where a GPU would fault or corrupt a neighbour. So every tensor an op gets is copied
into an allocation of its own (ASan puts redzones around it) between two 64-byte guards that
hold a sentinel byte and are poisoned for ASan: any read or write of a guard stops the process
with ASan's report, and a write the poisoning missed (ASan poisons whole 8-byte granules) is
found by the sentinel check after the op. The results are copied back into the caller's
tensors. The data starts 16-byte aligned, or, for the buffers named by ``misaligned``, a
given number of elements past that (a view offset by one element, as a param of odd size
before it in a bucket would leave it).
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import importlib.util
import inspect
import json
import os

import torch

import cuda_on_cpu_build as build

ENV_LIBRARY = "IVON_CUDA_ON_CPU_LIBRARY"  # the built library (tests/test_cuda_on_cpu.py)
ENV_REPORT = "IVON_CUDA_ON_CPU_REPORT"    # where to write the coverage report at exit
GUARD, SENTINEL = 64, 0xA5
DEFAULT_SM_COUNT = 1  # at most 8 blocks: the suite's long segments wrap the grid-stride loop

_misaligned: dict = {}  # buffer name -> elements past 16-byte alignment


def asan_loaded() -> bool:
    """Whether this process has the ASan runtime (it must have been loaded first)."""
    return hasattr(ctypes.CDLL(None), "__asan_init")


@functools.lru_cache(maxsize=None)
def shim():
    """The loaded library (ctypes, for the shim's knobs), its ops registered with torch."""
    path = os.environ.get(ENV_LIBRARY) or build.library()
    torch.ops.load_library(path)
    lib = ctypes.CDLL(path)
    for name in ("reachable", "ran", "shapes", "last_launch"):
        getattr(lib, f"ivon_cuda_on_cpu_{name}").restype = ctypes.c_char_p
    lib.ivon_cuda_on_cpu_probe_read.restype = ctypes.c_float
    lib.ivon_cuda_on_cpu_probe_read.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.ivon_cuda_on_cpu_probe_float4.restype = ctypes.c_float
    lib.ivon_cuda_on_cpu_probe_float4.argtypes = [ctypes.c_void_p]
    lib.ivon_cuda_on_cpu_set_sm_count(DEFAULT_SM_COUNT)
    if os.environ.get(ENV_REPORT):
        atexit.register(_write_report, os.environ[ENV_REPORT])
    return lib


def unavailable_reason(device) -> str | None:
    """None where this backend can run (the kernel suite's skip reason otherwise)."""
    if torch.device(device).type != "cpu":
        return "the CUDA source on the CPU runs on cpu tensors"
    if not asan_loaded():
        return ("the CUDA source on the CPU runs in the sanitized subprocess of "
                "tests/test_cuda_on_cpu.py (the ASan runtime must be loaded first)")
    try:
        shim()
    except build.Unavailable as error:
        return str(error)
    return None


@functools.lru_cache(maxsize=None)
def _wrappers():
    """A second instance of ivon_fast.cpp_backend whose wrappers call this build's ops."""
    spec = importlib.util.find_spec("ivon_fast.cpp_backend")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.LIBRARY = build.OPS_LIBRARY
    shim()
    return module


# ---- the knobs -------------------------------------------------------------------------------
@contextlib.contextmanager
def sm_count(count: int):
    """Launches inside get the grid of a GPU with ``count`` SMs (at most 8 blocks per SM)."""
    shim().ivon_cuda_on_cpu_set_sm_count(count)
    try:
        yield
    finally:
        shim().ivon_cuda_on_cpu_set_sm_count(DEFAULT_SM_COUNT)


@contextlib.contextmanager
def misaligned(**shifts: int):
    """Inside, the named buffers (the ops' argument names) start ``shift`` elements past a
    16-byte boundary (Note [guarded buffers])."""
    saved = dict(_misaligned)
    _misaligned.update(shifts)
    try:
        yield
    finally:
        _misaligned.clear()
        _misaligned.update(saved)


def _lines(raw: bytes) -> list[str]:
    return [line for line in raw.decode().splitlines() if line]


def _counts(raw: bytes) -> dict:
    return {name: int(count) for count, name in (line.split("\t", 1) for line in _lines(raw))}


def report() -> dict:
    """reachable: every instance the dispatchers can launch (launched dry); ran: the instances
    run so far, with their launches; shapes: [kernel, vector or scalar path, grid shape] run."""
    lib = shim()
    return {"reachable": sorted(_counts(lib.ivon_cuda_on_cpu_reachable())),
            "ran": _counts(lib.ivon_cuda_on_cpu_ran()),
            "shapes": [line.split("\t") for line in _lines(lib.ivon_cuda_on_cpu_shapes())]}


def last_launch() -> list[str]:
    """[instance, vector or scalar path, grid shape] of the last launch run."""
    return shim().ivon_cuda_on_cpu_last_launch().decode().split("\t")


def _write_report(path: str) -> None:
    with open(path, "w") as file:
        json.dump(report(), file)


# ---- guarded buffers (Note [guarded buffers]) ------------------------------------------------
def _asan(name: str, raw: torch.Tensor, start: int, stop: int) -> None:
    if stop > start:
        getattr(ctypes.CDLL(None), name)(ctypes.c_void_p(raw.data_ptr() + start),
                                         ctypes.c_size_t(stop - start))


class Guarded:
    """A copy of ``tensor`` between two poisoned, sentinel-filled guards (``view`` is it)."""

    def __init__(self, tensor: torch.Tensor, name: str, shift: int = 0):
        self.name = name
        size = tensor.element_size()
        nbytes = tensor.numel() * size
        self.start = GUARD + shift * size
        self.stop = self.start + nbytes
        self.raw = torch.full((self.stop + GUARD,), SENTINEL, dtype=torch.uint8)
        assert self.raw.data_ptr() % 16 == 0, "torch's CPU allocation is not 16-byte aligned"
        self.view = self.raw[self.start:self.stop].view(tensor.dtype).view(tensor.shape)
        self.view.copy_(tensor)
        _asan("__asan_poison_memory_region", self.raw, 0, self.start)
        _asan("__asan_poison_memory_region", self.raw, self.stop, len(self.raw))

    def release(self) -> None:
        """Unpoisons the guards and checks that they hold the sentinel still."""
        _asan("__asan_unpoison_memory_region", self.raw, 0, len(self.raw))
        for part, where in ((self.raw[:self.start], "before"), (self.raw[self.stop:], "after")):
            changed = (part != SENTINEL).nonzero().flatten()
            assert changed.numel() == 0, (
                f"the op wrote {changed.numel()} byte(s) {where} {self.name}")


def _guardable(value) -> bool:
    """A tensor the op would accept as a buffer; others reach the op as they are, so that its
    checks see them (a non-contiguous or non-CPU tensor)."""
    return isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.is_contiguous()


def _call(op, args, kwargs):
    """``op`` on guarded copies of its tensors; the results are copied back."""
    bound = inspect.signature(op).bind(*args, **kwargs)
    originals = dict(bound.arguments)
    guarded = {name: Guarded(value, name, _misaligned.get(name, 0))
               for name, value in originals.items() if _guardable(value)}
    for name, buffer in guarded.items():
        bound.arguments[name] = buffer.view
    try:
        op(*bound.args, **bound.kwargs)
    finally:
        for buffer in guarded.values():
            buffer.release()
    for name, buffer in guarded.items():
        originals[name].copy_(buffer.view)


def sample(*args, **kwargs):
    _call(_wrappers().sample, args, kwargs)


def accumulate(*args, **kwargs):
    _call(_wrappers().accumulate, args, kwargs)


def update(*args, **kwargs):
    _call(_wrappers().update, args, kwargs)
