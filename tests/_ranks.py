"""Running the multi-process tests' ranks: the code ``tests/test_distributed.py`` and
``tests/test_fsdp.py`` (and their workers ``tests/_dist_worker.py`` and ``tests/_fsdp_worker.py``)
share (not a test module).

Parent side, in the test process: :func:`spawn` starts one worker script per rank, once for all
scenarios and configs, waits for them under a timeout, and returns each rank's results;
:func:`results` is the test modules' ``run_ranks`` fixture (spawn once, then a config's result on
each rank). Worker
side, in each rank: :func:`run` joins a gloo process group, runs every config of every scenario
and saves the results. The two sides talk through the command line

    python WORKER RANK WORLD_SIZE INIT_FILE CONFIGS_JSON OUT_DIR

CONFIGS_JSON maps a scenario name to its list of configs (dicts with an "id"; :func:`configs`
makes a grid of them). The rendezvous is a
FileStore at INIT_FILE (no port to pick), CPU only. Rank r saves ``{scenario: {config id: result}}``
to ``OUT_DIR/rank<r>.pt``; a config that raises records ``{"error": traceback}`` instead, so one
broken config fails only its own test. All scenarios share one set of processes: starting one
costs seconds (importing torch, and torch._dynamo on the first optimizer). Every assertion is made
by the test process.

The workers run as scripts, with their own folder (tests/) first on sys.path, and the test modules
put that folder on sys.path themselves: both import this module as ``_ranks``.
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
import torch.distributed as dist

import ivon_fast

PROCESS_GROUP_TIMEOUT_S = 60  # a rank waiting for another in a collective gives up after this


# ----------------------------------------------------------------------------- parent side

def _environment() -> dict:
    env = dict(os.environ)
    # the ranks import the same ivon_fast as this process (a source checkout or an install)
    package_root = str(Path(ivon_fast.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(
        [package_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("OMP_NUM_THREADS", "1")
    if sys.platform.startswith("linux") and os.path.exists("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def configs(**axes) -> list:
    """Every combination of the axes, each with an id; e.g. configs(a=[1, 2], b=['x']) ->
    [{'a': 1, 'b': 'x', 'id': 'a=1-b=x'}, {'a': 2, 'b': 'x', 'id': 'a=2-b=x'}]."""
    combinations = [{}]
    for name, values in axes.items():
        combinations = [{**config, name: value} for config in combinations for value in values]
    for config in combinations:
        config["id"] = "-".join(f"{name}={value}" for name, value in config.items())
    return combinations


def spawn(worker_file, configs: dict, directory: Path, world_size: int, timeout_s: float) -> list:
    """Run every scenario's configs on ``world_size`` processes of ``worker_file``; by rank,
    ``{scenario: {id: result}}``.

    Each rank logs to ``directory/rank<r>.log``. When one rank fails the others would only wait
    for it until the process group's timeout: they are stopped at once. Ranks still running after
    ``timeout_s`` are killed. Raises RuntimeError, with the failing ranks' log tails, on a failure
    or a timeout.
    """
    directory = Path(directory)
    env = _environment()
    logs = [directory / f"rank{rank}.log" for rank in range(world_size)]
    processes = []
    for rank in range(world_size):
        with open(logs[rank], "w") as log:
            processes.append(subprocess.Popen(
                [sys.executable, str(Path(worker_file).resolve()), str(rank), str(world_size),
                 str(directory / "store"), json.dumps(configs), str(directory)],
                env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout_s
    while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p in processes):
            break
        time.sleep(0.05)
    timed_out = any(p.poll() is None for p in processes) and time.monotonic() >= deadline
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()
    failures = [f"rank {rank} exited with {process.returncode}:\n{logs[rank].read_text()[-4000:]}"
                for rank, process in enumerate(processes) if process.returncode != 0]
    if timed_out or failures:
        what = f"timed out after {timeout_s} s" if timed_out else "failed"
        raise RuntimeError(f"the ranks {what}\n" + "\n".join(failures))
    return [torch.load(directory / f"rank{rank}.pt", weights_only=False)
            for rank in range(world_size)]


def results(worker_file, configs: dict, world_size: int, timeout_s: float,
            make_directory: Callable[[], Path]) -> Callable[[str, str], list]:
    """The body of a test module's ``run_ranks`` fixture: ``run_ranks(scenario, config id)`` ->
    the config's result on each rank.

    The first call spawns the ranks (in ``make_directory()``) for every config at once; later
    calls read what they saved. A failed spawn fails every test that asks, with the ranks' logs; a
    config that raised on some rank fails its own tests, with the ranks' tracebacks.
    """
    import pytest

    cache = {}

    def run(scenario: str, config_id: str) -> list:
        if "ranks" not in cache:
            try:
                cache["ranks"] = spawn(worker_file, configs, make_directory(), world_size,
                                       timeout_s)
            except RuntimeError as error:
                cache["ranks"] = str(error)
        if isinstance(cache["ranks"], str):
            pytest.fail(cache["ranks"], pytrace=False)
        per_config = [per_rank[scenario][config_id] for per_rank in cache["ranks"]]
        errors = [f"rank {rank}:\n{result['error']}" for rank, result in enumerate(per_config)
                  if "error" in result]
        if errors:
            pytest.fail("\n".join(errors), pytrace=False)
        return per_config

    return run


# ----------------------------------------------------------------------------- worker side

def run(argv, scenarios: Mapping[str, Callable],
        setup: Optional[Callable[[int, int, Path], dict]] = None) -> int:
    """One rank: the body of a worker script, ``sys.exit(run(sys.argv, SCENARIOS))``.

    ``scenarios`` maps a scenario name to a function called as
    ``scenario(rank, world_size, **extra, **config)`` (the config without its "id"), where
    ``extra`` is ``setup(rank, world_size, out_dir)`` (called once, after the process group is up;
    e.g. a device mesh) or empty. The ranks meet at a barrier after every config.
    """
    rank, world_size, init_file = int(argv[1]), int(argv[2]), argv[3]
    configs, out_dir = json.loads(argv[4]), Path(argv[5])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size,
                            timeout=datetime.timedelta(seconds=PROCESS_GROUP_TIMEOUT_S))
    results = {}
    try:
        extra = {} if setup is None else setup(rank, world_size, out_dir)
        for scenario, scenario_configs in configs.items():
            results[scenario] = {}
            for config in scenario_configs:
                config = dict(config)
                config_id = config.pop("id")
                try:
                    result = scenarios[scenario](rank, world_size, **extra, **config)
                except Exception:  # noqa: BLE001 -- recorded, reported by the test of this config
                    result = {"error": traceback.format_exc()}
                results[scenario][config_id] = result
                dist.barrier()  # keep the ranks in step from one config to the next
    finally:
        torch.save(results, out_dir / f"rank{rank}.pt")
        dist.destroy_process_group()
    return 0
