"""IVON over FSDP2 (``torch.distributed.fsdp.fully_shard``): two gloo ranks on CPU.

The params are DTensors placed ``Shard(0)`` on a 1-D mesh of 2 ranks; the model's shards are
uneven (5 rows -> 3 + 2) and empty (a one-row weight leaves rank 1 nothing). Design:
docs/DESIGN.md section 9 and ``ivon_fast/_sharded.py``.

The module starts two processes (``tests/_fsdp_worker.py``) once, for all scenarios, through a
FileStore in a temporary directory, under a timeout (``tests/_ranks.py``, shared with
``tests/test_distributed.py``); the ranks save their results to files and every assertion is
made here. The expectations are independent of the sharded code under test:
an unsharded single-process IVON run on the full batch, computed here (FSDP's gradient is the
average of the ranks' gradients, and each rank trains on half the batch with a mean loss, so the
runs agree up to the rounding of the reduce-scatter); the noise spec ``reference.philox_normal``
at offsets computed from torch.chunk's row split; an uninterrupted run.

bf16 state (``state_dtype=torch.bfloat16``, docs/DESIGN.md section 16) takes the same paths: its
stochastic rounding draws its bits by the unsharded model's element index, so the sharded run
matches the unsharded bf16 run (bf16 momentum and hess bit for bit, the float32 mean and params
within the same tolerance as with float32 state), and its bf16 DTensor state round-trips
through per-rank state dicts, DCP and an unsharded checkpoint.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ivon_fast import reference
from ivon_fast.noise import EVAL_DRAW_BASE

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _ranks  # noqa: E402  (starting the ranks, collecting their results)
import _fsdp_worker as worker  # noqa: E402  (the rank's code: model, data, loops, HP)

pytest.importorskip("torch.distributed.fsdp")

WORLD_SIZE = 2
SPAWN_TIMEOUT_S = 180  # all scenarios; the process group's own timeout is 60 s
HP, SEED = worker.HP, worker.SEED
NUMEL = sum(p.numel() for p in worker.build_model().parameters())


# ----------------------------------------------------------------------------- running the ranks

@pytest.fixture(scope="module")
def run_ranks(tmp_path_factory):
    """run_ranks(scenario, config id) -> the config's result on each rank (one spawn in all)."""
    return _ranks.results(worker.__file__, CONFIGS, WORLD_SIZE, SPAWN_TIMEOUT_S,
                          lambda: tmp_path_factory.mktemp("fsdp"))


_configs = _ranks.configs  # every combination of the axes, each with an id


def _config(scenario, config_id):
    return next(c for c in CONFIGS[scenario] if c["id"] == config_id)


def _ids(scenario):
    return [c["id"] for c in CONFIGS[scenario]]


def _resume(loop, mc_samples, events, cut, tag, **state_dtype):
    return dict(id=tag, loop=loop, mc_samples=mc_samples, events=events, cut=cut, tag=tag,
                **state_dtype)


BF16 = dict(state_dtype="bfloat16")  # the worker's make_optimizer takes the dtype's name


CONFIGS = {
    "train": (_configs(loop=["official", "drop_in"], mc_samples=[1, 2], backend=["auto"],
                       steps=[3])
              + _configs(loop=["official", "drop_in"], mc_samples=[1], backend=["reference"],
                         steps=[3])
              + _configs(loop=["official", "drop_in"], mc_samples=[1], backend=["auto"],
                         steps=[3], state_dtype=["bfloat16"])),
    "noise": _configs(loop=["official", "drop_in"], backend=["reference", "auto"]),
    "options": [dict(id="options")],
    "nonfinite": _configs(backend=["reference"]),
    "meta": [dict(id="meta", steps=3)],
    "resume": [
        # mid-step: one of two samples folded into the averages (avg_grad, avg_hess_term)
        _resume("official", 2, list("SSTSSTS") + list("STSST"), 7, "official-mid-step"),
        # the official loop's last sample pending (its gradient is part of the state)
        _resume("official", 1, list("STSTS") + list("TSTST"), 5, "official-pending"),
        # drop-in: the params hold the next sample (params_hold)
        _resume("drop_in", 1, list("DDD") + list("DDD"), 3, "drop_in"),
        _resume("drop_in", 2, list("CC") + list("CC"), 2, "drop_in-closure"),
        # bf16 state: mid-step (the averages stay float32), and drop-in
        _resume("official", 2, list("SSTSSTS") + list("STSST"), 7, "official-mid-step-bf16",
                **BF16),
        _resume("drop_in", 1, list("DDD") + list("DDD"), 3, "drop_in-bf16", **BF16),
    ],
    "dcp": (_configs(loop=["official", "drop_in"], api=["helpers", "plain", "full"], tag=["x"])
            + _configs(loop=["drop_in"], api=["helpers"], tag=["x"], state_dtype=["bfloat16"])),
    "from_unsharded": (_configs(loop=["official", "drop_in"], steps_before=[2], steps_after=[2])
                       + _configs(loop=["official"], steps_before=[2], steps_after=[2],
                                  state_dtype=["bfloat16"])),
}
for _config_dict in CONFIGS["dcp"]:  # one checkpoint directory per config
    _config_dict["tag"] = _config_dict["id"]


# ----------------------------------------------------------------------------- expectations

def _dense_run(loop, mc_samples, steps, backend="auto", seed=SEED, init=None, events=None,
               state_dtype="float32"):
    """The unsharded single-process run on the full batch (the expectation)."""
    model = worker.build_model()
    if init is not None:
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(init, model.parameters())
    optimizer = worker.make_optimizer(model.parameters(), loop, mc_samples, backend, seed,
                                      state_dtype=state_dtype)
    x, y = worker.full_batch()
    events = worker.step_events(loop, mc_samples, steps) if events is None else events
    worker.run_events(model, optimizer, events, x, y)
    return dict(state=worker.state_of(optimizer, full=False),
                params=worker.flat(model.parameters()))


def _assert_close(actual, expected, what, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _far(actual, expected, rtol=1e-5, atol=1e-6):
    return not torch.allclose(actual, expected, rtol=rtol, atol=atol)


def _assert_equal(actual, expected, what):
    assert torch.equal(actual, expected), (
        f"{what}: differs by up to {(actual - expected).abs().max().item():.3g}")


def _sample(mean, eps, hess=None):
    """theta = mean + eps / sqrt(ess (h + wd)) (at the initial Hessian unless given), as
    ivon-opt writes it."""
    hess = torch.full_like(mean, HP["hess_init"]) if hess is None else hess
    return mean + eps / (HP["ess"] * (hess + HP["weight_decay"])).sqrt()


# ----------------------------------------------------------------------------- 1. training

@pytest.mark.parametrize("config_id", _ids("train"))
def test_sharded_training_equals_unsharded_run(run_ranks, config_id):
    """Both loops, 1 and 2 MC samples: the gathered mean, momentum, Hessian and params of the
    sharded run equal those of an unsharded single-process run on the full batch (tolerance: the
    reduce-scatter's rounding), on both ranks; a run with another seed is far from it (the test
    sees the noise). Afterwards mean_params() puts the mean into the sharded params, and
    sampled_params() the first evaluation draw's noise at the global offsets. bf16 state: the
    same against the unsharded bf16 run, and the state (saved as DTensors) is bf16."""
    config = _config("train", config_id)
    state_dtype = config.get("state_dtype", "float32")
    results = run_ranks("train", config_id)
    expected = _dense_run(config["loop"], config["mc_samples"], config["steps"],
                          config["backend"], state_dtype=state_dtype)
    _assert_equal(results[0]["init"], worker.flat(worker.build_model().parameters()), "init")
    for rank, result in enumerate(results):
        assert result["saved_dtypes"] == {"mean": ["torch.float32"],
                                          "momentum": [f"torch.{state_dtype}"],
                                          "hess": [f"torch.{state_dtype}"]}, f"rank {rank}"
        for name in ("mean", "momentum", "hess"):
            assert result["after"][name].dtype == expected["state"][name].dtype
            if state_dtype == "bfloat16" and name != "mean":
                # rounded with the bits of the unsharded index; the reduce-scatter's last-bit
                # differences change a stochastic rounding's result with probability 2^-16
                # each, so the bf16 values are the unsharded run's, bit for bit
                _assert_equal(result["after"][name], expected["state"][name],
                              f"rank {rank}: {name}")
            _assert_close(result["after"][name], expected["state"][name], f"rank {rank}: {name}")
        _assert_close(result["params"], expected["params"], f"rank {rank}: params")
    for rank, result in enumerate(results):  # evaluation: mean_params and sampled_params()
        _assert_equal(result["mean_params"], result["after"]["mean"], f"rank {rank}: mean_params")
        after = result["after"]
        eps = reference.philox_normal(SEED, EVAL_DRAW_BASE, 0, NUMEL)
        _assert_close(result["eval_sample"], _sample(after["mean"], eps, after["hess"].float()),
                      f"rank {rank}: the first evaluation sample")
    other_seed = _dense_run(config["loop"], config["mc_samples"], config["steps"],
                            config["backend"], seed=SEED + 1, state_dtype=state_dtype)
    assert _far(other_seed["state"]["mean"], expected["state"]["mean"])
    assert _far(results[0]["after"]["mean"], other_seed["state"]["mean"])


@pytest.mark.parametrize("config_id", _ids("train"))
def test_state_is_flat_per_local_shard(run_ranks, config_id):
    """Each rank holds only its shard's state: flat buffers of its local elements (rank 1's
    share of the one-row weight is empty) and at most 3 elements of pad per shard (Note [quads
    in the buffers]), summing to the model over the ranks; the state dict's entries are
    DTensors holding the same local elements."""
    results = run_ranks("train", config_id)
    assert sum(result["local_numel"] for result in results) == NUMEL
    assert results[0]["local_numel"] != results[1]["local_numel"]  # uneven shards
    for rank, result in enumerate(results):
        assert 0 <= result["pads"] <= 3 * result["local_params"]
        for name, numel in result["bucket_numels"].items():
            assert numel == result["local_numel"] + result["pads"], \
                f"rank {rank}: {name} holds {numel} elements"
        assert result["saved_local_numel"] == result["local_numel"]
        assert result["saved_types"] == ["DTensor"]


# ----------------------------------------------------------------------------- 2. the noise

@pytest.mark.parametrize("config_id", _ids("noise"))
def test_noise_is_indexed_by_global_position(run_ranks, config_id):
    """Each rank's local shard of draw d is mean + philox_normal(seed, d, offset, n) * sigma, with
    offset the shard's first element in the UNSHARDED model's flat order (param offset + first row
    * row length): the sharded run draws the noise of the unsharded model, element by element.
    The ranks' shards cover the model exactly once."""
    config = _config("noise", config_id)
    results = run_ranks("noise", config_id)
    init = results[0]["init"]
    _assert_equal(init, worker.flat(worker.build_model().parameters()), "init")

    def check(actual, expected, what):
        if config["backend"] == "reference":
            _assert_equal(actual, expected, what)
        else:  # kernels: the same integers, transcendental functions within an ulp or so
            _assert_close(actual, expected, what)

    assert len(results[0]["draws"]) == (2 if config["loop"] == "official" else 1)
    for draw in range(len(results[0]["draws"])):
        covered = torch.zeros(NUMEL, dtype=torch.long)
        for rank, result in enumerate(results):
            for start, values in result["draws"][draw]["runs"]:
                if start is None:
                    assert values.numel() == 0
                    continue
                n = values.numel()
                covered[start:start + n] += 1
                eps = reference.philox_normal(SEED, draw, start, n)
                check(values, _sample(init[start:start + n], eps),
                      f"rank {rank}, draw {draw}, shard at {start}")
            full = _sample(init, reference.philox_normal(SEED, draw, 0, NUMEL))
            check(result["draws"][draw]["full"], full, f"rank {rank}, draw {draw}, gathered")
        assert torch.equal(covered, torch.ones_like(covered)), "shards overlap or leave gaps"
    assert any(start is None for start, _ in results[1]["draws"][0]["runs"]), (
        "rank 1 should hold an empty shard")


def test_options_under_fsdp(run_ranks):
    """seed=None: the ranks agree on rank 0's seed although their default generators differ;
    sync=True and rng='torch' are refused with a ValueError naming the option; a shard that is
    not a contiguous run of rows (Shard(1) of a matrix) is refused; Shard(1) of a one-row
    matrix is a contiguous run and samples the noise at its global offsets. A write to a sharded
    param (under no_grad) becomes its mean; a param frozen after construction gets its mean back
    (in the drop-in mode it held a sample)."""
    results = run_ranks("options", "options")
    assert results[0]["seed"] == results[1]["seed"]
    init = worker.flat(worker.build_model().parameters())
    written = init.clone()
    written[:20] = 0.25  # the first Linear's weight
    for rank, result in enumerate(results):
        _assert_equal(result["written_mean"], written, f"rank {rank}: mean after a write")
        _assert_equal(result["frozen"], init[40:43], f"rank {rank}: frozen param")
    for result in results:
        errors = result["errors"]
        assert errors["sync"] is not None and "Invalid sync" in errors["sync"]
        assert errors["rng"] is not None and "Invalid rng" in errors["rng"]
        assert errors["shard1"] is not None and "contiguous run" in errors["shard1"]
        expected = _sample(torch.zeros(6), reference.philox_normal(SEED, 0, 0, 6))
        _assert_close(result["row_sample"], expected, "Shard(1) of a one-row matrix")


# ----------------------------------------------------------------------------- 3. meta init

def test_meta_init_then_to_empty(run_ranks):
    """Meta-device model, fully_shard, to_empty(device='cpu'), reset_parameters, then IVON: the
    mean starts at the re-initialized weights, and training equals the unsharded run from them."""
    results = run_ranks("meta", "meta")
    for rank, result in enumerate(results):
        assert result["device"] == "cpu"
        _assert_equal(result["initial_mean"], result["init"], f"rank {rank}: initial mean")
    init = results[0]["init"]
    assert _far(init, worker.flat(worker.build_model().parameters()))  # re-initialized
    expected = _dense_run("drop_in", 1, _config("meta", "meta")["steps"], init=init)
    for rank, result in enumerate(results):
        for name in ("mean", "momentum", "hess"):
            _assert_close(result["after"][name], expected["state"][name], f"rank {rank}: {name}")
        _assert_close(result["params"], expected["params"], f"rank {rank}: params")


# ----------------------------------------------------------------------------- 4. state dicts

def _assert_resumed_exactly(results):
    for rank, result in enumerate(results):
        done, resumed = result["uninterrupted"], result["resumed"]
        assert resumed["step"] == done["step"]
        for name in ("mean", "momentum", "hess"):
            _assert_equal(resumed["state"][name], done["state"][name], f"rank {rank}: {name}")
        _assert_equal(resumed["params"], done["params"], f"rank {rank}: params")


@pytest.mark.parametrize("config_id", _ids("resume"))
def test_state_dict_round_trip_resumes_exactly(run_ranks, config_id):
    """opt.state_dict() on each rank (torch.save, then torch.load with weights_only: DTensor
    entries, the local shard's state), loaded into a fresh model and optimizer (other weights,
    other seed), resumes exactly: continuing equals the uninterrupted run, bitwise, also mid-step
    and with a pending sample."""
    config = _config("resume", config_id)
    state_dtype = config.get("state_dtype", "float32")
    results = run_ranks("resume", config_id)
    expected_keys = {"mean", "momentum", "hess"}
    if config_id.startswith("official-mid-step"):
        expected_keys |= {"avg_grad", "avg_hess_term"}
    if config_id == "official-pending":
        expected_keys |= {"pending_grad"}
    for result in results:
        assert set(result["saved_keys"]) == expected_keys
        assert result["saved_types"] == ["DTensor"]
        assert result["saved_dtypes"] == {"mean": ["torch.float32"],
                                          "momentum": [f"torch.{state_dtype}"],
                                          "hess": [f"torch.{state_dtype}"]}
    _assert_resumed_exactly(results)
    steps = sum(config["events"].count(event) for event in "TDC")
    assert results[0]["uninterrupted"]["step"] == steps


@pytest.mark.parametrize("config_id", _ids("dcp"))
def test_distributed_checkpoint_resumes_exactly(run_ranks, config_id):
    """torch.distributed.checkpoint save / load at a step boundary, through
    get_optimizer_state_dict / set_optimizer_state_dict ('helpers') and of opt.state_dict()
    itself ('plain'), into a fresh model and optimizer: continuing equals the uninterrupted run.
    'full': the helpers with full_state_dict=True (gathered unsharded tensors, loaded back
    sharded)."""
    _assert_resumed_exactly(run_ranks("dcp", config_id))


@pytest.mark.parametrize("config_id", _ids("from_unsharded"))
def test_unsharded_checkpoint_loads_into_sharded_optimizer(run_ranks, config_id):
    """An unsharded run's state dict (full tensors) loaded into a sharded optimizer: each rank
    takes its shard, and continuing sharded equals the unsharded run continued."""
    config = _config("from_unsharded", config_id)
    results = run_ranks("from_unsharded", config_id)
    expected = _dense_run(config["loop"], 1, config["steps_before"] + config["steps_after"],
                          state_dtype=config.get("state_dtype", "float32"))
    for rank, result in enumerate(results):
        for name in ("mean", "momentum", "hess"):
            assert result["state"][name].dtype == expected["state"][name].dtype
            _assert_close(result["state"][name], expected["state"][name], f"rank {rank}: {name}")
        _assert_close(result["params"], expected["params"], f"rank {rank}: params")


# ----------------------------------------------------------------------------- non-finite grads

@pytest.mark.parametrize("config_id", _ids("nonfinite"))
def test_a_nan_in_one_ranks_shard_skips_the_step_on_every_rank(run_ranks, config_id):
    """Rank 1's shard alone holds the NaN; both ranks skip (their found_inf is summed over the
    mesh), keep the state of the step before, and go on together."""
    results = run_ranks("nonfinite", config_id)
    for rank, result in enumerate(results):
        assert result["skipped"] == 1 and result["step"] == 2, f"rank {rank}"
        before, skipped, after = result["states"]
        for name in ("mean", "momentum", "hess"):
            _assert_equal(skipped[name], before[name], f"rank {rank}: {name} after the skip")
            assert torch.isfinite(after[name]).all()
            assert not torch.equal(after[name], before[name])
    for name in ("mean", "momentum", "hess"):
        _assert_equal(results[0]["states"][2][name], results[1]["states"][2][name], name)
