"""The CUDA source on the CPU, in CI (Note [the CUDA source on the CPU] in csrc/cuda_on_cpu.h;
docs/DESIGN.md, "The CUDA source on the CPU").

tests/cuda_on_cpu_build.py compiles every csrc/*.cu as host C++ under ASan and UBSan (cached in
build/cuda_on_cpu/); ASan must be loaded before anything else in the process that runs it, so
the kernel suite's ``cuda_on_cpu`` backend (tests/kernel_backends.py) runs in a subprocess
started here, with tests/cuda_on_cpu_suite.py's grids and misaligned buffers after it. A
sanitizer's finding stops that process; the test then fails with the report. The subprocess
writes which kernel instances ran and on which paths and grids, and the test checks that every
instance the dispatchers can launch ran (the dispatchers list them themselves, launching dry),
each kernel on its vector and its scalar path, and on one block, many blocks and a wrapping
grid-stride loop.

Skipped, with the reason, where the extension was built without its CUDA kernels (the CUDA
source is not in use), unless IVON_FAST_EXPECT_CUDA=1 (CI) says it must run: then a missing
compiler or sanitizer runtime fails instead.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from ivon_fast import _extension

import cuda_on_cpu_backend as emulated
import cuda_on_cpu_build as build
import kernel_cases as kc

EXPECT_CUDA = os.environ.get("IVON_FAST_EXPECT_CUDA") == "1"


def _skip_reason():
    if EXPECT_CUDA:
        return None
    info = _extension.build_info()
    if info is None or not info["CUDA_KERNELS"]:
        return ("ivon_fast._C was built without its CUDA kernels, so their source is not in use "
                "(IVON_FAST_EXPECT_CUDA=1 runs it on the CPU anyway)")
    try:
        build.preload()
    except build.Unavailable as error:
        return str(error)
    return None


pytestmark = [pytest.mark.cpp, pytest.mark.skipif(_skip_reason() is not None,
                                                  reason=str(_skip_reason()))]

FAMILIES = {"sample_kernel": kc.CUDA_SAMPLE_INSTANCES,
            "accumulate_kernel": kc.CUDA_ACCUMULATE_INSTANCES,
            "update_kernel": kc.CUDA_UPDATE_INSTANCES}
SHAPES = ("one block", "many blocks", "wraps")


@pytest.fixture(scope="module")
def library():
    return build.library()


# no leak report (Python and torch keep their allocations to the end); no quarantine of freed
# memory: it finds uses after free, which the kernels cannot commit (they allocate nothing), and
# without it torch's many allocations reuse warm pages instead of touching fresh ones
ASAN_OPTIONS = "detect_leaks=0:quarantine_size_mb=0:thread_local_quarantine_size_kb=0"


def _sanitized(library, **extra):
    """The environment of a process that runs the library: ASan loaded first (ASAN_OPTIONS),
    a stack with UBSan's report."""
    env = dict(os.environ, LD_PRELOAD=build.preload(), ASAN_OPTIONS=ASAN_OPTIONS,
               UBSAN_OPTIONS="print_stacktrace=1", PYTHONDONTWRITEBYTECODE="1", **extra)
    env[emulated.ENV_LIBRARY] = library
    return env


def _tail(text, limit=6000):
    return text if len(text) <= limit else "...\n" + text[-limit:]


def _sanitizer_report(stderr, frames=16):
    """The head of a sanitizer's report (its finding and the frames of the kernel and the op,
    before the long tail of torch's and the interpreter's) and ASan's summary line; "" without
    one."""
    lines = stderr.splitlines()
    starts = [i for i, line in enumerate(lines)
              if "ERROR: AddressSanitizer" in line or "runtime error:" in line]
    if not starts:
        return ""
    summary = [line for line in lines if line.startswith("SUMMARY:")]
    head = [line[:200] for line in lines[starts[0]:starts[0] + frames]]
    return "\n".join(head + ["..."] + summary)


def _failure(result):
    """Why the subprocess failed: its failed tests (after a sanitizer's finding, which stops
    it, the test it was running), the sanitizer's report, its output."""
    lines = result.stdout.splitlines()
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    started = [line.split()[0] for line in lines if line.startswith("tests/")]
    report = _sanitizer_report(result.stderr)
    if report and started:
        failed.append(f"{started[-1]} (stopped by the sanitizer)")
    return (f"the CUDA source on the CPU failed (exit status {result.returncode})\n"
            f"--- failed tests ---\n{chr(10).join(failed) or '(none reported)'}\n"
            f"--- sanitizer report ---\n"
            f"{report or '(none); stderr:' + chr(10) + _tail(result.stderr, 2000)}\n"
            f"--- pytest output ---\n{_tail(result.stdout)}")


def _check_coverage(report):
    """Every instance the dispatchers can launch ran; each kernel ran on both paths and on
    every grid shape."""
    reachable, ran = set(report["reachable"]), set(report["ran"])
    assert reachable <= ran, f"never ran: {sorted(reachable - ran)[:10]}"
    for family, instances in FAMILIES.items():  # the dispatchers' list and the suite's agree
        listed = [name for name in reachable if name.startswith(family + "<")]
        assert len(listed) == len(instances), (family, len(listed), len(instances))
    shapes = {tuple(shape) for shape in report["shapes"]}
    wanted = {(family, path, shape) for family in FAMILIES for path in ("vector", "scalar")
              for shape in SHAPES}
    assert wanted <= shapes, f"never launched: {sorted(wanted - shapes)}; seen: {sorted(shapes)}"


def test_the_cuda_source_runs_the_kernel_suite_on_the_cpu(library, tmp_path):
    """The shared kernel suite's cuda_on_cpu backend and tests/cuda_on_cpu_suite.py, under ASan
    and UBSan: every check passes and no sanitizer reports anything; every instance, path and
    grid shape ran (see the module docstring)."""
    report = tmp_path / "report.json"
    # -v, unbuffered: each test's name is out before it runs. --capture=sys: pytest's default
    # captures file descriptor 2 into a file that dies with the process, report and all
    command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--tb=short",
               "--capture=sys", "tests/test_kernels.py", "tests/test_kernels_state.py",
               "tests/cuda_on_cpu_suite.py", "-k", "cuda_on_cpu"]
    env = _sanitized(library, PYTHONUNBUFFERED="1", **{emulated.ENV_REPORT: str(report)})
    result = subprocess.run(command, cwd=build.REPO, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        pytest.fail(_failure(result), pytrace=False)
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and " skipped" not in summary, summary
    _check_coverage(json.loads(report.read_text()))


# each probe: a guarded buffer of 8 floats (Note [guarded buffers]), then one bad access
PROBES = {
    "read one past the end": ("b.ivon_cuda_on_cpu_probe_read(view.data_ptr(), 8)",
                              "AddressSanitizer: use-after-poison"),
    "read one before the start": ("b.ivon_cuda_on_cpu_probe_read(view.data_ptr(), -1)",
                                  "AddressSanitizer: use-after-poison"),
    "load a float4 one float past alignment": (
        "b.ivon_cuda_on_cpu_probe_float4(view.data_ptr() + 4)",
        "misaligned address"),
}


def _probe(access):
    return textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, "tests")
        import cuda_on_cpu_backend as emulated
        b = emulated.shim()
        view = emulated.Guarded(torch.zeros(8), "probe").view
        {access}
        print("no report")
    """)


def test_the_sanitizers_stop_an_out_of_range_read_and_a_misaligned_vector_load(library):
    """The sanitizers work in the setup the suite runs in: the library's own code reading a
    guarded buffer one element past either end, and loading a float4 from a pointer 4 bytes
    past 16-byte alignment, stops the process with the report."""
    running = {name: subprocess.Popen([sys.executable, "-c", _probe(access)], cwd=build.REPO,
                                      env=_sanitized(library), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
               for name, (access, _) in PROBES.items()}
    for name, process in running.items():
        stdout, stderr = process.communicate()
        expected = PROBES[name][1]
        assert process.returncode != 0 and expected in stderr, (
            f"{name}: exit status {process.returncode}, no {expected!r}:\n{stdout}\n"
            f"{_tail(stderr, 3000)}")
