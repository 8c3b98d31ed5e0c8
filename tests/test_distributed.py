"""``sync=True`` with real processes: two gloo ranks on CPU (issue 7, item 11).

With ``sync=True`` each rank is one Monte Carlo sample of the step: before the update the ranks'
sample averages (avg_grad and the Hessian term: noise * grad for 'price', grad ** 2 for 'gradsq')
are all-reduced and divided by the world size, so mean, momentum and Hessian stay identical on
every rank. By default (rng='philox') rank r draws its noise with the key
``ivon_fast.noise.rank_seed(seed, r)``, so ranks given one seed still draw distinct samples; without
sync they draw the same noise (plain DDP needs identical samples).

The module starts two processes (``tests/_dist_worker.py``) once, for all scenarios and configs,
through a FileStore in a temporary directory (no port to pick), under a timeout; the ranks save
their results to files and every assertion is made here. Expectations are independent of the code under
test: ivon-opt itself, or the step computed by hand in plain torch (docs/DESIGN.md section 2) from the
ranks' recorded gradients, or the noise spec ``reference.philox_normal`` (docs/DESIGN.md section 3).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ivon_fast
from ivon_fast import reference

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _dist_worker as worker  # noqa: E402  (the rank's code: model, data shards, seeds, HP)

WORLD_SIZE = 2
SPAWN_TIMEOUT_S = 180  # all scenarios; the process group's own timeout is 60 s
HP = worker.HP


# ----------------------------------------------------------------------------- running the ranks

def _spawn(configs: dict, directory: Path) -> list:
    """Run every scenario's configs on WORLD_SIZE processes; by rank, {scenario: {id: result}}."""
    env = dict(os.environ)
    # the ranks import the same ivon_fast as this process (a source checkout or an install)
    package_root = str(Path(ivon_fast.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(
        [package_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("OMP_NUM_THREADS", "1")
    if sys.platform.startswith("linux") and os.path.exists("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    logs = [directory / f"rank{rank}.log" for rank in range(WORLD_SIZE)]
    processes = []
    for rank in range(WORLD_SIZE):
        with open(logs[rank], "w") as log:
            processes.append(subprocess.Popen(
                [sys.executable, str(Path(worker.__file__).resolve()), str(rank), str(WORLD_SIZE),
                 str(directory / "store"), json.dumps(configs), str(directory)],
                env=env, stdout=log, stderr=subprocess.STDOUT))
    # wait for both; when one rank fails, the other would only wait for it until the process
    # group's timeout: stop it at once
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
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
        what = f"timed out after {SPAWN_TIMEOUT_S} s" if timed_out else "failed"
        raise RuntimeError(f"the ranks {what}\n" + "\n".join(failures))
    return [torch.load(directory / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def run_ranks(tmp_path_factory):
    """run_ranks(scenario, config id) -> the config's result on each rank (one spawn in all)."""
    cache = {}

    def run(scenario: str, config_id: str) -> list:
        if "ranks" not in cache:
            try:
                cache["ranks"] = _spawn(CONFIGS, tmp_path_factory.mktemp("ranks"))
            except RuntimeError as error:
                cache["ranks"] = str(error)
        if isinstance(cache["ranks"], str):
            pytest.fail(cache["ranks"], pytrace=False)
        results = [per_rank[scenario][config_id] for per_rank in cache["ranks"]]
        errors = [f"rank {rank}:\n{result['error']}" for rank, result in enumerate(results)
                  if "error" in result]
        if errors:
            pytest.fail("\n".join(errors), pytrace=False)
        return results

    return run


def _configs(**axes):
    """Every combination of the axes, each with an id; e.g. _configs(a=[1, 2], b=['x'])."""
    configs = [{}]
    for name, values in axes.items():
        configs = [{**config, name: value} for config in configs for value in values]
    for config in configs:
        config["id"] = "-".join(f"{name}={value}" for name, value in config.items())
    return configs


def _by_id(scenario, **match):
    return [c["id"] for c in CONFIGS[scenario]
            if all(c.get(name) == value for name, value in match.items())]


CONFIGS = {
    "ivon_opt": _configs(hess_approx=["price", "gradsq"], mc_samples=[1, 2], steps=[3]),
    "division": (
        _configs(rng=["torch"], backend=["reference"], hess_approx=["price", "gradsq"],
                 mc_samples=[1, 2], steps=[2])
        # 'gradsq' needs no noise in the expectation: the kernel backend ('auto') is checked too
        + _configs(rng=["philox"], backend=["reference", "auto"], hess_approx=["gradsq"],
                   mc_samples=[1, 2], steps=[2])),
    "noise": _configs(backend=["reference", "auto"], sync=[True, False],
                      loop=["official", "drop_in"]),
    "drop_in": (_configs(backend=["reference", "auto"], loop=["plain", "closure"], sync=[True],
                         steps=[4])
                + _configs(backend=["auto"], loop=["plain"], sync=[False], steps=[4])),
}


def _assert_equal(actual, expected, what):
    assert torch.equal(actual, expected), (
        f"{what}: differs by up to {(actual - expected).abs().max().item():.3g}")


# ----------------------------------------------------------------------------- 1. ivon-opt

@pytest.mark.parametrize("config_id", _by_id("ivon_opt"))
def test_sync_equals_ivon_opt_sync_bitwise(run_ranks, config_id):
    """The official loop with sync=True: ivon_fast(rng='torch', backend='reference') and ivon-opt,
    from identically seeded rank-dependent generators, give bitwise equal params, momentum and
    Hessian on every rank (ivon-opt all-reduces with SUM and then div_(world_size)). ivon-opt
    0.1.3 cannot sync 'gradsq' (it all-reduces avg_nxg, which is None then): for 'gradsq' the
    expectation is ivon-opt with avg_gsq reduced the same way (worker.IvonOptSyncAllTerms)."""
    results = run_ranks("ivon_opt", config_id)
    for rank, result in enumerate(results):
        official, fast = result["official"], result["fast"]
        for name in ("params", "momentum", "hess"):
            _assert_equal(fast[name], official[name], f"rank {rank}: {name}")
        _assert_equal(fast["mean"], official["params"], f"rank {rank}: mean")
    for name in ("params", "momentum", "hess"):
        _assert_equal(results[1]["fast"][name], results[0]["fast"][name], f"{name} across ranks")


# ----------------------------------------------------------------------------- 2. the averaging

def _expected_last_step(results, config, world_divisor):
    """The last step's mean, momentum and hess, computed by hand from the ranks' samples.

    Each rank's sample averages (running means, as ivon-opt takes them) are summed over the ranks
    and divided by ``world_divisor`` (the world size for the right answer), then fed to the
    update written out by hand (clip_radius is inf: no clip). rng='torch' noise is regenerated from torch's generator
    state recorded before each sample: one torch.randn over the param group, as ivon-opt draws it.
    """
    before = results[0]["before"]
    ess, weight_decay = HP["ess"], HP["weight_decay"]
    numel = before["mean"].numel()
    sums = [torch.zeros(numel), torch.zeros(numel)]
    for result in results:
        avg_grad = avg_hess_term = None
        for index, grad in enumerate(result["grads"], start=1):
            if config["hess_approx"] == "price":
                generator = torch.Generator()
                generator.set_state(result["rng_states"][index - 1])
                eps = torch.randn(numel, generator=generator)
                term = eps / (ess * (before["hess"] + weight_decay)).sqrt() * grad
            else:
                term = grad.square()
            if index == 1:
                avg_grad, avg_hess_term = grad, term
            else:
                avg_grad = avg_grad + (grad - avg_grad) / index
                avg_hess_term = avg_hess_term + (term - avg_hess_term) / index
        sums = [sums[0] + avg_grad, sums[1] + avg_hess_term]
    return _update_by_hand(before, sums[0] / world_divisor, sums[1] / world_divisor,
                           config["hess_approx"], step=config["steps"])


def _update_by_hand(before, avg_grad, avg_hess_term, hess_approx, step):
    """docs/DESIGN.md section 2's update in plain torch (fp32 tensors, double host scalars)."""
    mean, momentum, hess = before["mean"], before["momentum"], before["hess"]
    ess, weight_decay, beta1, beta2 = HP["ess"], HP["weight_decay"], HP["beta1"], HP["beta2"]
    lr = HP["lr"] * (HP["hess_init"] + weight_decay)  # rescale_lr
    debias = 1.0 - math.pow(beta1, float(step))
    momentum = beta1 * momentum + (1.0 - beta1) * avg_grad
    if hess_approx == "price":
        f = (avg_hess_term * (hess + weight_decay)) * ess
    else:
        f = avg_hess_term * ess
    hess = (beta2 * hess + (1.0 - beta2) * f
            + (0.5 * (1 - beta2) ** 2) * (hess - f).square() / (hess + weight_decay))
    mean = mean - lr * ((momentum / debias + weight_decay * mean) / (hess + weight_decay))
    return dict(mean=mean, momentum=momentum, hess=hess)


def _close(actual, expected):
    return torch.allclose(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config_id", _by_id("division"))
def test_sync_step_averages_ranks_over_world_size(run_ranks, config_id):
    """One synced step equals the update from the MEAN of the two ranks' sample averages
    (avg_grad and the Hessian term), computed by hand, on both ranks; and it is far from the
    update from their sum (a missing div_) or from their sum / 4 (dividing twice)."""
    config = next(c for c in CONFIGS["division"] if c["id"] == config_id)
    results = run_ranks("division", config_id)
    assert len(results[0]["grads"]) == config["mc_samples"]
    for name in ("mean", "momentum", "hess"):  # the synced steps before kept the ranks together
        _assert_equal(results[1]["before"][name], results[0]["before"][name],
                      f"{name} across ranks before the last step")
    assert not torch.allclose(results[0]["grads"][0], results[1]["grads"][0]), (
        "the ranks' gradients should differ (different data shards), or averaging proves nothing")

    expected = _expected_last_step(results, config, WORLD_SIZE)
    wrong = {"not divided by the world size": _expected_last_step(results, config, 1),
             "divided by the world size twice": _expected_last_step(results, config, 4)}
    for rank, result in enumerate(results):
        for name in ("mean", "momentum", "hess"):
            actual = result["after"][name]
            assert _close(actual, expected[name]), (
                f"rank {rank}: {name} differs from the world-size average's update by up to "
                f"{(actual - expected[name]).abs().max().item():.3g}")
        _assert_equal(result["params"], result["after"]["mean"], f"rank {rank}: params vs mean")
    # the test can tell: each wrong average moves every buffer measurably
    for label, update in wrong.items():
        for name in ("mean", "momentum", "hess"):
            assert not _close(update[name], expected[name]), f"{name} is insensitive to {label}"


# ----------------------------------------------------------------------------- 3. the noise

def _expected_samples(result, key, draws):
    """theta = mean + eps / sqrt(ess (hess + wd)), eps the spec's Philox normals of ``key``."""
    before = result["before"]
    mean, hess = before["mean"], before["hess"]
    expected = []
    for draw in draws:
        eps = reference.philox_normal(key, draw, 0, mean.numel())
        expected.append(mean + eps / (HP["ess"] * (hess + HP["weight_decay"])).sqrt())
    return expected


def _assert_samples(actual, expected, config, what):
    if config["backend"] == "reference":
        _assert_equal(actual, expected, what)
    else:  # kernels: the same integers, transcendental functions within an ulp or so
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=what)


@pytest.mark.parametrize("config_id", _by_id("noise", sync=True))
def test_sync_ranks_draw_distinct_noise_keyed_by_rank_seed(run_ranks, config_id):
    """sync=True, default rng='philox', one seed passed on both ranks: rank r's samples are
    mean + eps sigma with eps the spec's noise (reference.philox_normal) of the key
    rank_seed(seed, r) (rank 0 keeps the seed), so the two ranks' samples differ."""
    from ivon_fast.noise import rank_seed

    config = next(c for c in CONFIGS["noise"] if c["id"] == config_id)
    results = run_ranks("noise", config_id)
    _assert_equal(results[1]["before"]["mean"], results[0]["before"]["mean"], "initial means")
    assert rank_seed(worker.PHILOX_SEED, 0) == worker.PHILOX_SEED
    for draw, (first, second) in enumerate(zip(results[0]["samples"], results[1]["samples"])):
        differing = (first != second).float().mean().item()
        assert differing > 0.9, (
            f"draw {draw}: ranks 0 and 1 drew the same noise at {1 - differing:.0%} of elements; "
            "under sync=True each rank must be a distinct Monte Carlo sample")
    for rank, result in enumerate(results):
        expected = _expected_samples(result, rank_seed(worker.PHILOX_SEED, rank),
                                     range(len(result["samples"])))
        for draw, (actual, want) in enumerate(zip(result["samples"], expected)):
            _assert_samples(actual, want, config,
                            f"rank {rank}, draw {draw}: not the noise of key rank_seed(seed, {rank})")


@pytest.mark.parametrize("config_id", _by_id("noise", sync=False))
def test_without_sync_ranks_with_one_seed_draw_identical_noise(run_ranks, config_id):
    """sync=False, one seed on both ranks: both ranks draw exactly the same samples, those of the
    seed itself (data-parallel training with DDP-averaged gradients needs one sample)."""
    config = next(c for c in CONFIGS["noise"] if c["id"] == config_id)
    results = run_ranks("noise", config_id)
    for draw, (first, second) in enumerate(zip(results[0]["samples"], results[1]["samples"])):
        _assert_equal(second, first, f"draw {draw}: rank 1 vs rank 0")
    for rank, result in enumerate(results):
        expected = _expected_samples(result, worker.PHILOX_SEED, range(len(result["samples"])))
        for draw, (actual, want) in enumerate(zip(result["samples"], expected)):
            _assert_samples(actual, want, config, f"rank {rank}, draw {draw}: not the seed's noise")


# ----------------------------------------------------------------------------- 4. drop-in mode

@pytest.mark.parametrize("config_id", _by_id("drop_in", sync=True))
def test_drop_in_sync_keeps_rank_means_identical(run_ranks, config_id):
    """resample_on_step=True with sync=True, each rank on its own data: after a few steps (the
    plain ``backward(); step(); zero_grad()`` loop, or step(closure) with 2 samples) the ranks'
    mean, momentum and Hessian are bitwise identical, and the mean has moved."""
    results = run_ranks("drop_in", config_id)
    assert not torch.allclose(results[0]["first_grad"], results[1]["first_grad"]), (
        "the ranks' gradients should differ (different data shards)")
    for name in ("mean", "momentum", "hess"):
        _assert_equal(results[1]["after"][name], results[0]["after"][name], f"{name} across ranks")
    _assert_equal(results[1]["mean_params"], results[0]["mean_params"], "mean_params across ranks")
    for rank, result in enumerate(results):
        _assert_equal(result["mean_params"], result["after"]["mean"], f"rank {rank}: mean_params")
        assert not torch.allclose(result["after"]["mean"], result["initial"]["mean"]), (
            f"rank {rank}: the mean did not move")


@pytest.mark.parametrize("config_id", _by_id("drop_in", sync=False))
def test_drop_in_without_sync_rank_means_diverge(run_ranks, config_id):
    """The control of the test above: the same runs without sync leave the ranks' means apart, so
    identical means there come from the averaging, not from identical data."""
    results = run_ranks("drop_in", config_id)
    assert not torch.allclose(results[0]["after"]["mean"], results[1]["after"]["mean"])
