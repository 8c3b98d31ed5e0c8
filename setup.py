"""Build of ivon-fast: the Python package plus the compiled extension ``ivon_fast._C``.

    MAX_JOBS=2 pip install --no-build-isolation -e '.[test]'

The extension always holds the CPU kernels, and the CUDA kernels whenever torch is a CUDA build and
nvcc is found (CUDA_HOME or nvcc on PATH). Environment switches:

    IVON_FAST_NO_EXT=1      no extension at all (pure Python install; the reference / Triton
                            backends still work)
    IVON_FAST_NO_CUDA=1     CPU kernels only
    IVON_FAST_FORCE_CUDA=1  fail instead of silently skipping the CUDA kernels
    TORCH_CUDA_ARCH_LIST    CUDA architectures (default here: '8.0;9.0+PTX', i.e. sm_80 and
                            sm_90 code plus PTX that newer GPUs can JIT)
"""
import glob
import os
import shutil
import sys

from setuptools import setup


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


def _extension_build():
    """(ext_modules, cmdclass) for ivon_fast._C, or ([], {}) under IVON_FAST_NO_EXT=1."""
    if _flag("IVON_FAST_NO_EXT"):
        return [], {}
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        cuda_home = _find_cuda_home()
        if cuda_home is not None:  # must be set before torch.utils.cpp_extension is imported
            os.environ["CUDA_HOME"] = cuda_home
    import torch
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
    cxx = ["-O3", "-fno-math-errno", "-ffp-contract=off"]
    nvcc = ["-O3", "--fmad=false", "-lineinfo"]
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
    if why_not is not None and force_cuda:
        raise RuntimeError(f"IVON_FAST_FORCE_CUDA=1 but the CUDA kernels cannot be built: {why_not}")

    if why_not is None:
        # an explicit arch list: without one and without a visible GPU, torch compiles for every
        # architecture it knows, which makes the CI build many times slower
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        ext = cpp_extension.CUDAExtension(
            "ivon_fast._C",
            cpu_sources + [os.path.join(csrc, "cuda_kernels.cu")],
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
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extension_build()

setup(
    name="ivon-fast",
    version="0.1.0",
    description="Fused IVON optimizer for PyTorch (CPU, CUDA and Triton kernels)",
    packages=["ivon_fast"],
    python_requires=">=3.9",
    install_requires=["torch>=2.4,<3"],
    extras_require={"test": ["pytest", "pytest-benchmark", "numpy", "ivon-opt==0.1.3"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
