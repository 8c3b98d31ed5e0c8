"""``python -m ivon_fast``: what is installed, and which backend ``backend='auto'`` picks where.

One ``name: value`` line per fact, for bug reports and for checking a build:

    ivon_fast:    version and where it is imported from
    python:       the interpreter's version
    torch:        the running torch, its CUDA version and the visible CUDA devices
    extension:    whether ivon_fast._C loaded, and the torch it was built for (or why not)
    cpu kernels:  the instruction-set builds this CPU can run, and the one in use
    cuda kernels: whether they were built, and for which architectures
    triton:       whether Triton imports, and where the Triton backend can run (or why not)
    auto on X:    the backend 'auto' picks for params of each dtype on device X
"""
from __future__ import annotations

import os
import sys
import warnings

import torch

import ivon_fast
from ivon_fast import _extension, backends

# The CPU kernel builds, best first (csrc/cpu_dispatch.cpp); x86 builds hold all three.
_CPU_ISAS = ("avx512", "avx2", "generic")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _cpu_kernels() -> str:
    ops = torch.ops.ivon_fast
    in_use = ops._cpu_isa()
    # _set_cpu_isa accepts exactly the builds this CPU can run; probing switches the build in
    # use, so put the current one (possibly forced by IVON_FAST_CPU_ISA) back afterwards
    usable = [name for name in _CPU_ISAS if ops._set_cpu_isa(name)]
    ops._set_cpu_isa(in_use)
    return f"built; builds this CPU can run: {', '.join(usable)}; in use: {in_use}"


def _cuda_kernels(info: dict) -> str:
    if not torch.ops.ivon_fast._built_with_cuda():
        return "not built"
    return f"built for TORCH_CUDA_ARCH_LIST={info['CUDA_ARCH_LIST']}"


def _triton(devices: list[str]) -> str:
    try:
        import triton
    except ImportError as error:
        return f"not importable ({error})"
    from ivon_fast import triton_backend

    places = []
    for device in devices:
        reason = triton_backend.unavailable_reason(device)
        places.append(f"{device}: " + ("runs" if reason is None else f"does not run ({reason})"))
    return f"{triton.__version__}; " + "; ".join(places)


def _auto(device: str) -> str:
    # the extension line already says why the compiled kernels are missing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _extension.ExtensionWarning)
        picks = [f"{str(dtype).removeprefix('torch.')} -> {backends.resolve('auto', device, dtype)}"
                 for dtype in _DTYPES]
    return ", ".join(picks)


def report() -> list[tuple[str, str]]:
    """The (name, value) lines that ``python -m ivon_fast`` prints."""
    info = _extension.build_info()
    error = _extension.load_error()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    lines = [
        ("ivon_fast", f"{ivon_fast.__version__} ({os.path.dirname(ivon_fast.__file__)})"),
        ("python", sys.version.split()[0]),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda}; "
                  f"{cuda_devices} CUDA devices visible)"),
    ]
    if error is None:
        lines += [
            ("extension", f"loaded; built for torch {info['TORCH_VERSION']} "
                          f"(CUDA {info['CUDA_VERSION']})"),
            ("cpu kernels", _cpu_kernels()),
            ("cuda kernels", _cuda_kernels(info)),
        ]
    else:
        lines += [
            ("extension", f"not loaded: {error}; to fix it, {_extension.BUILD_HINT}"),
            ("cpu kernels", "not available"),
            ("cuda kernels", "not available"),
        ]
    lines.append(("triton", _triton(devices)))
    lines += [(f"auto on {device}", _auto(device)) for device in devices]
    return lines


def main() -> None:
    lines = report()
    width = max(len(name) for name, _ in lines) + 2
    for name, value in lines:
        print(f"{name + ':':<{width}}{value}")


if __name__ == "__main__":
    main()
