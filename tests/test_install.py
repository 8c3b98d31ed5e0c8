"""The install: setup.py's torch pin and build record, the extension's load check, the fallback of
backend='auto' when the extension cannot be loaded, and ``python -m ivon_fast``.

The load paths that must not touch the real extension (a torch upgraded after the build, an
extension never built or not importable) run in subprocesses, which fake the situation before
ivon_fast is first imported.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import ivon_fast
from ivon_fast import _extension, backends

ROOT = Path(__file__).resolve().parents[1]
_EXPECT_EXT = any(os.environ.get(name) == "1"
                  for name in ("IVON_FAST_EXPECT_EXT", "IVON_FAST_EXPECT_CUDA"))


def _setup_module():
    """setup.py as a module: its functions, without running setup() (it runs only as __main__)."""
    spec = importlib.util.spec_from_file_location("ivon_fast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def _next_minor(version: str) -> str:
    major, minor = version.split(".")[:2]
    return f"{major}.{int(minor) + 1}.0"


# ------------------------------------------------------------------------------------------------
# setup.py
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("built_against, requirement", [
    ("2.14.1+cu130", "torch==2.14.*"),
    ("2.14.0", "torch==2.14.*"),
    ("2.15.0a0+git1234567", "torch==2.15.*"),
    ("3.0.2+cpu", "torch==3.0.*"),
    (None, "torch>=2.4,<3"),  # no extension: any supported torch
])
def test_torch_requirement_pins_the_minor_release_built_against(built_against, requirement):
    assert _setup_module().torch_requirement(built_against) == requirement


class _FakeCuda:
    """torch.cuda as cuda_arch_list reads it: the visible GPUs' capabilities, the archs torch
    was built for."""
    def __init__(self, capabilities, archs=("sm_75", "sm_80", "sm_86", "sm_90", "sm_100")):
        self.capabilities, self.archs = list(capabilities), list(archs)

    def is_available(self):
        return bool(self.capabilities)

    def device_count(self):
        return len(self.capabilities)

    def get_device_capability(self, device):
        return self.capabilities[device]

    def get_arch_list(self):
        return self.archs


@pytest.mark.parametrize("capabilities, expected", [
    ([], "8.0;9.0+PTX"),                  # no GPU (the kernels were asked for): CI's two
    ([(9, 0)], "9.0"),                    # an H100: its own architecture only
    ([(8, 0), (9, 0), (8, 0)], "8.0;9.0"),  # each visible architecture once
    ([(12, 1)], "10.0+PTX"),              # newer than this torch knows: its newest, with PTX
])
def test_cuda_arch_list_is_the_visible_gpus(monkeypatch, capabilities, expected):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    fake_torch = type("FakeTorch", (), {"cuda": _FakeCuda(capabilities)})
    assert _setup_module().cuda_arch_list(fake_torch) == expected


def test_cuda_arch_list_keeps_the_users(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    fake_torch = type("FakeTorch", (), {"cuda": _FakeCuda([(9, 0)])})
    assert _setup_module().cuda_arch_list(fake_torch) == "8.6"


def test_build_info_file_round_trips(tmp_path):
    info = {"TORCH_VERSION": "2.14.1+cu130", "CUDA_VERSION": "13.0", "CUDA_KERNELS": True,
            "CUDA_ARCH_LIST": "8.0;9.0+PTX"}
    path = tmp_path / "_build_info.py"
    _setup_module().write_build_info(str(path), info)
    spec = importlib.util.spec_from_file_location("build_info_copy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert {name: getattr(module, name) for name in info} == info


# ------------------------------------------------------------------------------------------------
# the record of this checkout's build, and the load check
# ------------------------------------------------------------------------------------------------

def test_build_info_matches_the_running_torch():
    info = _extension.build_info()
    if info is None:
        if _EXPECT_EXT:
            pytest.fail("the extension is expected, but ivon_fast/_build_info.py is missing")
        pytest.skip("installed without the extension")
    assert info["TORCH_VERSION"] == torch.__version__
    assert _extension.load_error() is None
    # the record was written next to the extension it describes
    from ivon_fast import _build_info, _C
    assert Path(_build_info.__file__).parent == Path(_C.__file__).parent
    assert info["CUDA_KERNELS"] == torch.ops.ivon_fast._built_with_cuda()
    if info["CUDA_KERNELS"]:
        assert info["CUDA_VERSION"] == torch.version.cuda and info["CUDA_ARCH_LIST"]
    else:
        assert info["CUDA_ARCH_LIST"] is None
    if os.environ.get("IVON_FAST_EXPECT_CUDA") == "1":
        assert info["CUDA_KERNELS"]


_BUILT = {"TORCH_VERSION": "2.14.1+cu130", "CUDA_VERSION": "13.0", "CUDA_KERNELS": True,
          "CUDA_ARCH_LIST": "9.0"}


@pytest.mark.parametrize("info, torch_version, torch_cuda, expected", [
    (_BUILT, "2.14.1+cu130", "13.0", None),
    (_BUILT, "2.14.3+cu130", "13.0", None),              # a patch release keeps the ABI
    (_BUILT, "2.14.1+cu132", "13.2", None),              # same CUDA major version
    (_BUILT, "2.15.0+cu130", "13.0",
     "ivon_fast._C was built for torch 2.14.1+cu130, but torch 2.15.0+cu130 is running"),
    (_BUILT, "2.13.0+cu130", "13.0",
     "ivon_fast._C was built for torch 2.14.1+cu130, but torch 2.13.0+cu130 is running"),
    (_BUILT, "2.14.1+cpu", None, "ivon_fast._C holds CUDA 13.0 kernels, but the running torch "
                                 "2.14.1+cpu has no CUDA (a CPU-only build)"),
    (_BUILT, "2.14.1+cu128", "12.8", "ivon_fast._C holds CUDA 13.0 kernels, but the running "
                                     "torch 2.14.1+cu128 has CUDA 12.8"),
    (dict(_BUILT, CUDA_KERNELS=False, CUDA_ARCH_LIST=None), "2.14.1+cpu", None, None),
])
def test_mismatch(info, torch_version, torch_cuda, expected):
    assert _extension.mismatch(info, torch_version, torch_cuda) == expected


@pytest.fixture
def unloadable_extension(monkeypatch):
    """This process sees an extension that cannot be loaded, and has not warned about it yet."""
    monkeypatch.setattr(_extension, "load_error", lambda: "it was eaten by a grue")
    monkeypatch.setattr(backends, "_extension_warned", False)


def test_auto_warns_once_and_falls_back(unloadable_extension):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        picks = [backends.resolve("auto", "cpu", dtype)
                 for dtype in (torch.float32, torch.bfloat16, torch.float32)]
    assert picks == ["reference"] * 3
    assert len(caught) == 1 and caught[0].category is ivon_fast.ExtensionWarning
    message = str(caught[0].message)
    assert "it was eaten by a grue" in message
    assert "pip install --no-build-isolation -e ." in message
    assert "/usr/local" not in message and "cuda-" not in message
    with pytest.raises(ValueError, match="it was eaten by a grue.*--no-build-isolation"):
        backends.resolve("cpu", "cpu")


def test_float64_params_do_not_warn(unloadable_extension):
    # the kernels never take float64, so the extension is not what 'auto' passes over
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve("auto", "cpu", torch.float64) == "reference"


# One process per broken install: each fakes its situation before ivon_fast is imported, then
# reports as JSON what the package says and does.
_BROKEN_INSTALL = """
import json, sys, warnings
import torch
{fake}
import ivon_fast
from ivon_fast import _extension
from ivon_fast.__main__ import report

result = {{"load_error": _extension.load_error()}}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(2):  # two optimizers, one warning
        model = torch.nn.Linear(4, 2)
        optimizer = ivon_fast.IVON(model.parameters(), lr=0.1, ess=100.0)
        for _ in range(2):
            with optimizer.sampled_params(train=True):
                optimizer.zero_grad()
                model(torch.randn(8, 4)).pow(2).mean().backward()
            optimizer.step()
result["warnings"] = [str(w.message) for w in caught
                      if issubclass(w.category, ivon_fast.ExtensionWarning)]
result["finite"] = all(bool(p.isfinite().all()) for p in model.parameters())
try:
    ivon_fast.IVON(torch.nn.Linear(2, 2).parameters(), lr=0.1, ess=10.0, backend="cpu")
except ValueError as error:
    result["cpu_error"] = str(error)
result["extension_imported"] = "ivon_fast._C" in sys.modules
result["report"] = dict(report())
print(json.dumps(result))
"""


@pytest.mark.parametrize("situation", ["torch upgraded", "not built", "not importable"])
def test_broken_install_falls_back_with_one_warning(situation):
    info = _extension.build_info()
    if situation != "not built" and info is None:
        pytest.skip("needs a build record (installed without the extension)")
    fake = {
        # a torch one minor release newer than the one the extension was built for
        "torch upgraded": f"torch.__version__ = {_next_minor(torch.__version__)!r}",
        # what an IVON_FAST_NO_EXT=1 install leaves: no record, no extension
        "not built": "sys.modules['ivon_fast._build_info'] = None",
        # a record, but the library does not load (e.g. deleted, or a missing dependency)
        "not importable": "sys.modules['ivon_fast._C'] = None",
    }[situation]
    done = _run_python(textwrap.dedent(_BROKEN_INSTALL.format(fake=fake)))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])

    expected = {
        "torch upgraded": f"ivon_fast._C was built for torch {info and info['TORCH_VERSION']}, "
                          f"but torch {_next_minor(torch.__version__)} is running",
        "not built": "ivon_fast was installed without its compiled extension",
        "not importable": "ivon_fast._C could not be imported (ModuleNotFoundError: ",
    }[situation]
    assert result["load_error"].startswith(expected)
    if situation == "torch upgraded":
        # the mismatched library was never loaded
        assert not result["extension_imported"]
    assert len(result["warnings"]) == 1 and expected in result["warnings"][0]
    assert "pip install --no-build-isolation -e ." in result["warnings"][0]
    assert result["finite"]
    assert expected in result["cpu_error"] and "--no-build-isolation" in result["cpu_error"]
    assert result["report"]["extension"].startswith(f"not loaded: {expected}")
    assert "float32 -> reference" in result["report"]["auto on cpu"]


# ------------------------------------------------------------------------------------------------
# python -m ivon_fast
# ------------------------------------------------------------------------------------------------

def test_main_reports_the_install():
    done = subprocess.run([sys.executable, "-m", "ivon_fast"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(":", 1) for line in done.stdout.splitlines())
    lines = {name: value.strip() for name, value in lines.items()}

    assert lines["ivon_fast"].startswith(f"{ivon_fast.__version__} ")
    try:
        assert lines["ivon_fast"].startswith(importlib.metadata.version("ivon-fast") + " ")
    except importlib.metadata.PackageNotFoundError:
        pass  # imported from a source tree that was never installed
    assert lines["python"] == sys.version.split()[0]
    assert lines["torch"].startswith(f"{torch.__version__} (CUDA {torch.version.cuda}; "
                                     f"{torch.cuda.device_count()} CUDA devices visible)")

    loaded = importlib.util.find_spec("ivon_fast._C") is not None and _extension.load_error() is None
    if loaded:
        assert lines["extension"] == (f"loaded; built for torch {torch.__version__} "
                                      f"(CUDA {torch.version.cuda})")
        usable, in_use = lines["cpu kernels"].split("builds this CPU can run: ")[1].split("; in use: ")
        usable = usable.split(", ")
        assert usable[-1] == "generic" and in_use in usable
        if not os.environ.get("IVON_FAST_CPU_ISA"):
            assert in_use == usable[0]  # the best build unless one is forced
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("ivon_fast::sample", "CUDA")
        assert lines["cuda kernels"].startswith("built for" if has_cuda else "not built")
    else:
        assert lines["extension"].startswith("not loaded: ")

    if importlib.util.find_spec("triton") is None:
        assert lines["triton"].startswith("not importable")
    else:
        import triton
        assert lines["triton"].startswith(f"{triton.__version__}; cpu: ")

    kernel = "cpu" if loaded else "reference"
    assert lines["auto on cpu"] == (f"float32 -> {kernel}, bfloat16 -> {kernel}, "
                                    f"float16 -> {kernel}, float64 -> reference")
    assert ("auto on cuda" in lines) == torch.cuda.is_available()
