"""Build of ivon-fast: the compiled extension ``ivon_fast._C`` and the torch requirement.

    MAX_JOBS=2 pip install --no-build-isolation -e '.[test]'

The static package metadata is in pyproject.toml. The extension always holds the CPU kernels, and
the CUDA kernels whenever torch is a CUDA build and nvcc is found (CUDA_HOME or nvcc on PATH).
Environment switches:

    IVON_FAST_NO_EXT=1      no extension at all (pure Python install; the reference / Triton
                            backends still work)
    IVON_FAST_NO_CUDA=1     CPU kernels only
    IVON_FAST_FORCE_CUDA=1  fail instead of silently skipping the CUDA kernels
    TORCH_CUDA_ARCH_LIST    CUDA architectures (default here: the visible GPUs' own, else
                            '8.0;9.0+PTX', i.e. sm_80 and sm_90 code plus PTX that newer GPUs
                            can JIT)
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import sys

import setuptools
from setuptools import setup

# pyproject.toml's [project] table holds the name, version and extras; setuptools reads it from
# version 61 on, and an older one would quietly build a package without them. pip installs the
# setuptools that pyproject.toml asks for only in an isolated build, so check here.
if int(setuptools.__version__.split(".")[0]) < 61:
    sys.exit(f"ivon-fast needs setuptools>=61 to build, found {setuptools.__version__}: "
             "pip install -U setuptools")

def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """A CUDA toolkit folder with headers, for when CUDA_HOME is not set.

    torch takes the folder above the first `nvcc` on PATH, which is wrong when that nvcc is a
    wrapper script (e.g. /usr/local/bin/nvcc calling /usr/local/cuda-13.0/bin/nvcc): it would look
    for the CUDA headers in /usr/local/include. Prefer a folder that really holds them.
    """
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for folder in candidates:
        if os.path.exists(os.path.join(folder, "include", "cuda_runtime.h")):
            return folder
    return None


# Note [CUDA sources]: the CUDA translation units (csrc/cuda_kernels.cuh holds the kernels): the
# update's instances in one file per param type, so that MAX_JOBS compiles them in parallel
CUDA_SOURCES = ("cuda_update_float.cu", "cuda_update_bf16.cu", "cuda_update_f16.cu",
                "cuda_ops.cu")


def cuda_arch_list(torch) -> str:
    """The CUDA architectures to build for: TORCH_CUDA_ARCH_LIST when set; else those of the
    visible GPUs, for a build used where it is made (what the GPU runs and no more: each
    architecture costs a full compile of the CUDA kernels); else, without a GPU (the kernels
    were asked for: CI, or wheels), '8.0;9.0+PTX'. A GPU newer than this torch supports gets the
    newest architecture torch knows, with PTX that its driver compiles.
    """
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if not torch.cuda.is_available():
        # explicit: without a list and a GPU, torch compiles for every architecture it knows
        return "8.0;9.0+PTX"
    known = [(int(m.group(1)), int(m.group(2))) for arch in torch.cuda.get_arch_list()
             for m in [re.fullmatch(r"sm_(\d+)(\d)", arch)] if m]
    newest = max(known, default=(9, 0))
    archs = set()
    for device in range(torch.cuda.device_count()):
        capability = torch.cuda.get_device_capability(device)
        major, minor = min(capability, newest)
        archs.add(f"{major}.{minor}" + ("+PTX" if capability > newest else ""))
    return ";".join(sorted(archs))


def torch_requirement(built_against: str | None) -> str:
    """The torch requirement of the package built against torch ``built_against`` (None: no
    extension built).

    Note [torch pin]: torch's C++ ABI changes between minor releases, so an extension compiled
    against torch 2.14 fails to import (undefined symbols) or crashes under 2.15. A build with the
    extension therefore requires the minor release it was compiled against, e.g. 'torch==2.14.*'
    for '2.14.1+cu130' (the local label does not take part in a prefix match); patch releases
    carry fixes only and keep the ABI. ivon_fast/_extension.py makes the same check at import, for
    installs that pip's resolver did not see (an editable build, then a torch upgrade).
    """
    if built_against is None:
        return "torch>=2.4,<3"
    major, minor = re.match(r"(\d+)\.(\d+)", built_against).groups()
    return f"torch=={major}.{minor}.*"


def write_build_info(path: str, info: dict) -> None:
    """Write ``info`` (names to Python literals) as the module ivon_fast/_build_info.py."""
    lines = ["# What ivon_fast._C was built against; written by setup.py, read by"
             " ivon_fast/_extension.py.\n"]
    lines += [f"{name} = {value!r}\n" for name, value in info.items()]
    with open(path, "w") as file:
        file.writelines(lines)


def _recording_build_ext(base, info: dict):
    """``base`` (torch's build_ext) that also writes ``info`` next to the extension it built.

    Written only after a successful build, so the record never describes an extension that a
    failed rebuild left behind. Next to the extension means in the build folder that a wheel
    packs, or in the source tree for in-place and editable builds (setuptools has put the inplace
    flag back by the time run() returns, so get_ext_fullpath names the file in use).
    """
    class RecordingBuildExt(base):
        def run(self):
            super().run()
            folder = os.path.dirname(self.get_ext_fullpath("ivon_fast._C"))
            write_build_info(os.path.join(folder, "_build_info.py"), info)

    return RecordingBuildExt


def _persistent_build_temp(base, folder: str):
    """``base`` (a build_ext) that keeps its object files in ``folder``.

    pip's editable install (PEP 660) runs the build in a new temporary folder every time, so each
    install would compile every source again (minutes). In a git-ignored folder of the source tree
    the objects outlive the install, and torch's ninja build recompiles only what changed: ninja
    tracks each object's sources, the headers they include and its compile command.
    """
    class PersistentBuildTemp(base):
        def finalize_options(self):
            super().finalize_options()
            self.build_temp = folder

    return PersistentBuildTemp


def _extension_build():
    """(ext_modules, cmdclass, torch version built against) for ivon_fast._C, or
    ([], {}, None) under IVON_FAST_NO_EXT=1."""
    if _flag("IVON_FAST_NO_EXT"):
        return [], {}, None
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        cuda_home = _find_cuda_home()
        if cuda_home is not None:  # must be set before torch.utils.cpp_extension is imported
            os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
    except ImportError:
        sys.exit("ivon-fast compiles its extension against the installed torch, and none is "
                 "importable here: install torch first, then build without isolation "
                 "(pip install --no-build-isolation ...), or set IVON_FAST_NO_EXT=1")
    from torch.utils import cpp_extension

    here = os.path.dirname(os.path.abspath(__file__))
    csrc = os.path.join("csrc")
    cpu_sources = [os.path.join(csrc, name) for name in (
        "ops.cpp", "cpu_dispatch.cpp", "cpu_isa_generic.cpp", "cpu_isa_avx2.cpp",
        "cpu_isa_avx512.cpp")]
    # Note [compile flags]: -O3 lets GCC vectorize the kernel loops; -fno-math-errno lets sqrtf
    # vectorize; no automatic FMA contraction, so the update rounds like the reference's torch
    # ops and CPU and CUDA agree (the polynomials use explicit fmaf). The instruction sets are
    # raised per file by target pragmas, not flags (see csrc/cpu_isa_avx512.cpp). No -std: torch's
    # build helper picks the standard its headers need (C++17 for older torch, C++20 for newer).
    # -g0 overrides the -g of Python's own flags: debug info of the kernels' hundreds of template
    # instances made up about 30% of the C++ compile time (the symbols stay for backtraces).
    cxx = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-g0"]
    # --threads 2: nvcc compiles the two architectures of the default arch list in parallel, so
    # the last CUDA file does not finish alone on one core of a MAX_JOBS=2 build.
    nvcc = ["-O3", "--fmad=false", "-lineinfo", "--threads", "2"]
    include_dirs = [os.path.join(here, csrc)]
    link_args = []
    # Note [OpenMP]: at::parallel_for is a header template; with torch's OpenMP backend its
    # `#pragma omp parallel` is compiled into this extension, and without -fopenmp it silently
    # runs on one thread. The extension then links libgomp.so.1, which resolves to the copy torch
    # already loaded (same runtime, same thread count).
    if sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info():
        cxx.append("-fopenmp")
        link_args.append("-fopenmp")

    want_cuda = not _flag("IVON_FAST_NO_CUDA")
    force_cuda = _flag("IVON_FAST_FORCE_CUDA")
    cuda_home = cpp_extension.CUDA_HOME
    nvcc_found = cuda_home is not None and (
        os.path.exists(os.path.join(cuda_home, "bin", "nvcc")) or shutil.which("nvcc"))
    why_not = None
    if not want_cuda:
        why_not = "IVON_FAST_NO_CUDA is set"
    elif torch.version.cuda is None:
        why_not = "torch is not a CUDA build"
    elif not nvcc_found:
        why_not = "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    elif not (force_cuda or os.environ.get("TORCH_CUDA_ARCH_LIST")
              or torch.cuda.is_available()):
        # the CUDA part is most of the build's time, and nothing here could run it
        why_not = ("no GPU is visible (IVON_FAST_FORCE_CUDA=1, or an arch list in "
                   "TORCH_CUDA_ARCH_LIST for wheels run elsewhere, builds them anyway)")
    if why_not is not None and force_cuda:
        raise RuntimeError(f"IVON_FAST_FORCE_CUDA=1 but the CUDA kernels cannot be built: {why_not}")

    if why_not is None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list(torch)
        ext = cpp_extension.CUDAExtension(
            "ivon_fast._C",
            cpu_sources + [os.path.join(csrc, name) for name in CUDA_SOURCES],
            include_dirs=include_dirs,
            define_macros=[("IVON_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link_args,
        )
        print("ivon-fast: building the CPU and CUDA kernels "
              f"(TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
    else:
        ext = cpp_extension.CppExtension(
            "ivon_fast._C", cpu_sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx}, extra_link_args=link_args)
        print(f"ivon-fast: building the CPU kernels only ({why_not})")
    info = {
        "TORCH_VERSION": str(torch.__version__),
        "CUDA_VERSION": torch.version.cuda,  # of the torch built against; None: a CPU-only torch
        "CUDA_KERNELS": why_not is None,
        "CUDA_ARCH_LIST": os.environ["TORCH_CUDA_ARCH_LIST"] if why_not is None else None,
    }
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    # one folder per Python and torch, so switching either never mixes their objects
    objects = os.path.join(
        here, "build", f"temp-{sys.implementation.cache_tag}-torch-{torch.__version__}")
    build_ext = _persistent_build_temp(build_ext, objects)
    return [ext], {"build_ext": _recording_build_ext(build_ext, info)}, info["TORCH_VERSION"]


def main():
    ext_modules, cmdclass, torch_version = _extension_build()
    setup(
        install_requires=[torch_requirement(torch_version)],
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )


# setuptools runs this file as __main__ (directly and from pip); tests import it for its functions
if __name__ == "__main__":
    main()
