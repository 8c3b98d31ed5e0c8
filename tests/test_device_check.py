"""bench/device_check.sh --dry-run: the GPU machine's script cannot rot on a CPU.

The dry run does for real what needs no GPU (the wheels' install, the environment, the timeouts,
the quick CPU forms of the benchmark and the end-to-end step with their real flags, pytest
collecting the GPU tests, the closing table) and prints each GPU step's command. Here: it exits
0, prints every step's command, never builds, leaves its results outside the working tree in at
most 8 files (what the device tool takes back), and the flags it prints are ones the entry points
accept: python -m bench's own parser, bench.e2e's parser (stopped before it trains), pip's help;
pytest's are checked by the dry run itself, which collects with the same flags.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("build", "bench", "e2e", "trajectories", "gpu_tests")
PROBE = "ivon_device_check_probe"


def _wheel(folder) -> None:
    """A one-module pure-Python wheel, so the dry run's wheel install runs for real."""
    info = f"{PROBE}-0.1.dist-info"
    with zipfile.ZipFile(folder / f"{PROBE}-0.1-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{PROBE}.py", "VALUE = 1\n")
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {PROBE}\nVersion: 0.1\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\n"
                                        "Root-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", f"{PROBE}.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n"
                                         f"{info}/RECORD,,\n")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The dry run's output, its exit status and its results folder."""
    out, wheels = tmp_path_factory.mktemp("device_out"), tmp_path_factory.mktemp("wheels")
    _wheel(wheels)
    env = dict(os.environ, OUT=str(out), WHEEL_DIR=str(wheels), PYTHON=sys.executable)
    result = subprocess.run(["bash", "bench/device_check.sh", "--dry-run"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    return result, out


def commands(output: str) -> dict:
    """{step: its command as words}, from the lines '+ STEP: COMMAND'."""
    found = {}
    for line in output.splitlines():
        if line.startswith("+ ") and ": " in line:
            name, command = line[2:].split(": ", 1)
            found[name] = shlex.split(command)
    return found


def after(words: list, module: str) -> list:
    """The arguments after ``-m module``."""
    index = words.index("-m")
    assert words[index + 1] == module, words
    return words[index + 2:]


def test_the_dry_run_passes_and_prints_every_step(dry_run):
    result, out = dry_run
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    printed = commands(result.stdout)
    assert set(STEPS) <= set(printed), printed.keys()
    for name in STEPS:  # printed, never run: the extension is not rebuilt here
        assert f"\n{name:<18} printed" in result.stdout
    for name in ("wheels", "env", "check_bench", "check_e2e", "check_gpu_tests"):
        assert f"\n{name:<18} ok" in result.stdout
    assert "tests collected" in result.stdout  # the GPU tests' selection is not empty
    # the results: out of the working tree, at most the 8 files the device tool takes back
    assert sorted(os.listdir(out)) == ["bench_gpu.json", "e2e.json", "logs.tar.gz",
                                       "summary.txt"]
    assert "bench/results/bench_" in result.stdout  # where to record them


def test_the_build_is_for_one_architecture_with_flags_pip_knows(dry_run):
    words = commands(dry_run[0].stdout)["build"]
    assert words[0] == "env"
    settings = dict(word.split("=", 1) for word in words[1:] if "=" in word)
    assert settings["TORCH_CUDA_ARCH_LIST"].replace(".", "").isdigit()  # one arch, e.g. 9.0
    assert int(settings["MAX_JOBS"]) >= 1 and settings["IVON_FAST_FORCE_CUDA"] == "1"
    arguments = after(words, "pip")
    assert arguments[0] == "install" and arguments[-2:] == ["-e", "."]
    help_text = subprocess.run([sys.executable, "-m", "pip", "install", "--help"],
                               capture_output=True, text=True, timeout=60).stdout
    for flag in arguments[1:]:
        if flag.startswith("--"):
            assert flag in help_text, flag


def test_the_bench_command_parses_as_the_record_needs(dry_run):
    from bench.__main__ import parse_args
    args = parse_args(after(commands(dry_run[0].stdout)["bench"], "bench"))
    assert args.device == "cuda" and args.sizes == "64M,256M"
    assert args.state_dtypes == "float32,bfloat16" and "float32" in args.dtype
    assert args.json.startswith(str(dry_run[1]))


def test_the_e2e_command_parses(dry_run, monkeypatch):
    from bench import e2e

    class Parsed(Exception):
        pass

    def stop(device):  # main() calls it once the arguments are parsed and checked
        raise Parsed(device)
    monkeypatch.setattr(e2e, "environment", stop)
    arguments = after(commands(dry_run[0].stdout)["e2e"], "bench.e2e")
    with pytest.raises(Parsed) as parsed:
        e2e.main(arguments)
    assert str(parsed.value.args[0]) == "cuda"
    assert arguments[arguments.index("--config") + 1] == "gpt2-125m"


def test_the_gpu_tests_are_checked_with_their_own_flags(dry_run):
    printed = commands(dry_run[0].stdout)
    real, check = after(printed["gpu_tests"], "pytest"), after(printed["check_gpu_tests"],
                                                                "pytest")
    assert real[real.index("-m") + 1] == "gpu or triton"
    if "-n" in real:  # pytest-xdist's workers: left out of the collecting check
        del real[real.index("-n"):real.index("-n") + 2]
    assert set(real) <= set(check) and "--collect-only" in check
    assert after(printed["trajectories"], "pytest")[-1] == "tests/test_backend_trajectories.py"
