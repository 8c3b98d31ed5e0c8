"""The compiled extension ``ivon_fast._C``, imported only when it was built for the running torch.

torch's C++ ABI changes between minor releases, so an extension compiled against another torch
fails to import with an undefined symbol, or crashes the process. setup.py records what it built
against in ``ivon_fast/_build_info.py`` (git-ignored; written next to the extension once it has
built), and ``load_error`` compares that record with the running torch before it imports the
extension: a mismatch is reported without ever loading the shared library.
"""
from __future__ import annotations

import functools
import importlib
import re

import torch

__all__ = ["ExtensionWarning", "BUILD_HINT", "build_info", "mismatch", "load_error"]

BUILD_HINT = ("build it against the torch you run: in a clone of the repository, "
              "`MAX_JOBS=2 pip install --no-build-isolation -e .` with IVON_FAST_NO_EXT unset "
              "(or reinstall ivon-fast with `pip install --no-build-isolation`); rebuild after "
              "every torch upgrade")


class ExtensionWarning(UserWarning):
    """``backend='auto'`` fell back from the compiled kernels: ``ivon_fast._C`` cannot be loaded."""


def build_info() -> dict | None:
    """What setup.py recorded when it built the extension, or None when it built none.

    Keys: TORCH_VERSION (the torch built against), CUDA_VERSION (that torch's CUDA, None for a
    CPU-only torch), CUDA_KERNELS (whether the CUDA kernels were built), CUDA_ARCH_LIST (their
    TORCH_CUDA_ARCH_LIST, None without them).
    """
    try:
        from ivon_fast import _build_info
    except ImportError:
        return None
    return {name: value for name, value in vars(_build_info).items() if name.isupper()}


def _minor_release(version: str) -> tuple[int, int]:
    """(major, minor) of a version such as '2.14.1+cu130' or '2.15.0a0+git1234'."""
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def mismatch(info: dict, torch_version: str, torch_cuda: str | None) -> str | None:
    """Why an extension built as ``info`` records cannot run under torch ``torch_version`` with
    CUDA ``torch_cuda`` (None: a CPU-only torch), or None when it can.

    The torch minor releases must match (Note [torch pin] in setup.py). CUDA kernels also need
    the CUDA major version they were compiled for: they link that CUDA runtime and torch's CUDA
    libraries, which a CPU-only torch does not have.
    """
    built = info["TORCH_VERSION"]
    if _minor_release(built) != _minor_release(torch_version):
        return f"ivon_fast._C was built for torch {built}, but torch {torch_version} is running"
    if info["CUDA_KERNELS"]:
        running = f"CUDA {torch_cuda}" if torch_cuda else "no CUDA (a CPU-only build)"
        if torch_cuda is None or torch_cuda.split(".")[0] != info["CUDA_VERSION"].split(".")[0]:
            return (f"ivon_fast._C holds CUDA {info['CUDA_VERSION']} kernels, but the running "
                    f"torch {torch_version} has {running}")
    return None


@functools.lru_cache(maxsize=None)
def load_error() -> str | None:
    """None once ``ivon_fast._C`` is imported (its ``torch.ops.ivon_fast`` ops registered), else
    why it was not. The first call imports it; later calls return the same answer."""
    info = build_info()
    if info is None:
        return ("ivon_fast was installed without its compiled extension (no "
                "ivon_fast/_build_info.py: built with IVON_FAST_NO_EXT=1, or not built)")
    reason = mismatch(info, torch.__version__, torch.version.cuda)
    if reason is not None:
        return reason
    try:
        importlib.import_module("ivon_fast._C")
    except ImportError as error:
        return f"ivon_fast._C could not be imported ({type(error).__name__}: {error})"
    return None
