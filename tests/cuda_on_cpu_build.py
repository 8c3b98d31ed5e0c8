"""The test build of the CUDA source on the CPU (Note [the CUDA source on the CPU] in
csrc/cuda_on_cpu.h): every csrc/*.cu compiled as host C++ with -DIVON_CUDA_ON_CPU under
AddressSanitizer and UndefinedBehaviorSanitizer, with the shim's bookkeeping
(csrc/cuda_on_cpu.cpp) and the extension's own op layer (csrc/ops.cpp, its ops registered as
torch.ops.ivon_fast_cuda_on_cpu.*), linked into one shared library in build/cuda_on_cpu/.

Note [the CPU run's build cache]: each object file is named by a hash of what made it (the
compiler, its flags, torch, the source and every csrc file that is not a translation unit of its
own: the headers, whatever their suffix), and the library
by the hash of its objects. A changed source gets a new name, so nothing stale is ever linked
and an unchanged one is never compiled again: the kernel suite reuses the build, and
tests/mutate.py carries the folder into its copies, where a mutated .cu recompiles alone.

Why -O0 (measured on the 2-core VM, busy with other builds: the kernels' file took about 27 s
of CPU at -O0 and 186 s at -O1, both with the sanitizers): GCC still inlines the always_inline
math at -O0, and an emulated update of 70 001 elements took about 0.1 s there.
"""
from __future__ import annotations

import concurrent.futures
import glob
import hashlib
import os
import shutil
import subprocess
import sysconfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(REPO, "csrc")
FOLDER = os.path.join(REPO, "build", "cuda_on_cpu")
OPS_LIBRARY = "ivon_fast_cuda_on_cpu"  # the torch library of its ops (csrc/ops.cpp)
COMPILER = "g++"
TRANSLATION_UNITS = (".cu", ".cpp")  # csrc's other files are headers

# -fno-sanitize-recover: a finding aborts the process (the test that ran it fails with the
# report); alignment is part of GCC's -fsanitize=undefined, named to say that it is wanted
SANITIZE = ["-fsanitize=address,undefined", "-fsanitize=alignment", "-fno-sanitize-recover=all",
            "-fno-omit-frame-pointer"]
# -ffp-contract=off as in the extension's build (Note [floating-point contraction] in
# csrc/ivon_math.h), so every multiply and add rounds on its own; paths relative to the
# repository (the compiler runs there), so that a copy of it, such as tests/mutate.py makes,
# hashes its unchanged sources to the same objects
COMMON = ["-std=c++20", "-O0", "-g1", "-fPIC", "-ffp-contract=off", "-fno-math-errno",
          "-Wno-unknown-pragmas", "-DIVON_CUDA_ON_CPU", "-Icsrc"]


class Unavailable(Exception):
    """The toolchain the CPU run needs is missing (the message says what)."""


def cuda_sources() -> list[str]:
    """The CUDA source files, relative to the repository: every csrc/*.cu, whatever they are
    called."""
    return sorted(os.path.relpath(path, REPO) for path in glob.glob(os.path.join(CSRC, "*.cu")))


def _runtime(name: str) -> str:
    compiler = shutil.which(COMPILER)
    if compiler is None:
        raise Unavailable(f"{COMPILER} is not on PATH: the CUDA source on the CPU is compiled "
                          "with it")
    path = subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True,
                          text=True, check=True).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        raise Unavailable(f"{COMPILER} has no {name}, which the CUDA source on the CPU needs")
    return path


def preload() -> str:
    """LD_PRELOAD for a process that loads the library: the compiler's ASan runtime, which must
    come first, then its C++ runtime. ASan looks up the C++ functions it intercepts
    (__cxa_throw) when it starts, and Python does not link libstdc++: without it there, the first
    C++ exception (torch throws some while importing) stops the process with a failed CHECK."""
    return f"{_runtime('libasan.so')} {_runtime('libstdc++.so')}"


def _torch_flags() -> list[str]:
    import torch
    from torch.utils import cpp_extension
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
    return [f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-DIVON_OPS_LIBRARY={OPS_LIBRARY}",
            "-DTORCH_API_INCLUDE_EXTENSION_H"] + ["-I" + path for path in includes]


def _units() -> list[tuple[str, list[str]]]:
    """(source, compile flags) of every object, the longest compiles first: the CUDA sources as
    C++ under the sanitizers, the op layer, which is not under test, without them (it compiles
    faster), and the shim's bookkeeping under them."""
    kernels = COMMON + SANITIZE
    units = [(source, ["-x", "c++"] + kernels) for source in cuda_sources()]
    units.append(("csrc/ops.cpp", COMMON + _torch_flags()))
    units.append(("csrc/cuda_on_cpu.cpp", kernels))
    return units


def _digest(parts) -> str:
    sha = hashlib.sha256()
    for part in parts:
        sha.update(part if isinstance(part, bytes) else str(part).encode())
        sha.update(b"\0")
    return sha.hexdigest()[:16]


def _compiler_version() -> str:
    return subprocess.run([COMPILER, "--version"], capture_output=True, text=True,
                          check=True).stdout


def _object_path(source: str, flags: list[str], version: str) -> str:
    """Note [the CPU run's build cache]: the object's name holds the hash of its inputs."""
    import torch
    headers = sorted(os.path.relpath(path, REPO) for path in glob.glob(os.path.join(CSRC, "*"))
                     if os.path.isfile(path) and not path.endswith(TRANSLATION_UNITS))
    parts = [version, *flags, torch.__version__]
    for path in [source] + headers:
        with open(os.path.join(REPO, path), "rb") as file:
            parts += [path, file.read()]
    stem = os.path.basename(source).replace(".", "_")
    return os.path.join(FOLDER, f"{stem}-{_digest(parts)}.o")


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{' '.join(command)}\n{result.stderr[-6000:]}")


def _compile(source: str, flags: list[str], target: str) -> str:
    if not os.path.exists(target):
        partial = f"{target}.{os.getpid()}.tmp"
        _run([COMPILER, *flags, "-c", source, "-o", partial], f"compiling {source}")
        os.replace(partial, target)  # whole or absent, also for a build running beside
    return target


def _link(objects: list[str]) -> str:
    from torch.utils import cpp_extension
    name = f"libivon_cuda_on_cpu-{_digest(map(os.path.basename, objects))}.so"
    target = os.path.join(FOLDER, name)
    if not os.path.exists(target):
        torch_lib = cpp_extension.library_paths()[0]
        partial = f"{target}.{os.getpid()}.tmp"
        _run([COMPILER, "-shared", *SANITIZE, *objects, "-o", partial, "-L" + torch_lib,
              "-Wl,-rpath," + torch_lib, "-lc10", "-ltorch_cpu", "-ltorch"], "linking")
        os.replace(partial, target)
    return target


def _prune(keep: list[str]) -> None:
    """Removes what earlier sources built (every name's hash differs from the current one)."""
    for path in glob.glob(os.path.join(FOLDER, "*")):
        if path not in keep and not path.endswith(".tmp"):
            os.remove(path)


def library() -> str:
    """The path of the built library, compiling only what changed (two jobs at a time)."""
    preload()  # fail early, with the reason, without the toolchain
    os.makedirs(FOLDER, exist_ok=True)
    version = _compiler_version()
    jobs = [(source, flags, _object_path(source, flags, version)) for source, flags in _units()]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        objects = list(pool.map(lambda job: _compile(*job), jobs))
    target = _link(sorted(objects))
    _prune(objects + [target])
    return target


if __name__ == "__main__":  # builds (python tests/cuda_on_cpu_build.py) and says where
    print(library())
