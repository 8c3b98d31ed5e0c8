"""One rank of the FSDP2 tests in ``tests/test_fsdp.py`` (not a test module).

Run as a script by the test file (through ``_ranks.spawn``), once per rank:

    python _fsdp_worker.py RANK WORLD_SIZE INIT_FILE CONFIGS_JSON OUT_DIR

This module holds the scenarios; ``tests/_ranks.py`` does the rest, as for
``tests/_dist_worker.py``: ``_ranks.run`` joins a gloo process group (FileStore at INIT_FILE,
CPU), calls :func:`setup` (a 1-D device mesh over all ranks), runs every config of every scenario
as ``scenario(rank, world_size, mesh=..., out_dir=..., **config)`` and saves
``{scenario: {config id: result}}`` to ``OUT_DIR/rank<RANK>.pt``; a config that raises records
``{"error": traceback}``. The test process imports this module too, for the model, the data and
the training events, and runs the unsharded single-process expectations itself.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn as nn

import ivon_fast

# the tests folder: first on sys.path when this runs as a script; the test module puts it there
import _ranks

HP = dict(lr=0.1, ess=50.0, hess_init=1.0, beta1=0.9, beta2=0.9, weight_decay=1e-3)
SEED = (1 << 40) + 777       # the noise seed passed on every rank (hi32 != 0)
INIT_SEED = 0
BATCH = 16                   # the full batch; rank r trains on rows [r * B / W, (r + 1) * B / W)


def build_model(init_seed: int = INIT_SEED) -> nn.Module:
    """47 params in six tensors; sharded over 2 ranks: 5 rows -> 3 + 2 (uneven), 3 -> 2 + 1,
    1 -> 1 + 0 (rank 1 holds an empty shard of the last weight and bias)."""
    torch.manual_seed(init_seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1))


def full_batch():
    generator = torch.Generator().manual_seed(1000)
    return torch.randn(BATCH, 4, generator=generator), torch.randn(BATCH, 1, generator=generator)


def loss_of(model, x, y):
    return ((model(x) - y) ** 2).mean()


def step_events(loop: str, mc_samples: int, steps: int) -> list:
    """The training events of ``steps`` steps: 'S' a sampled_params(train=True) block, 'T'
    step(), 'D' the drop-in backward(); step(); zero_grad(), 'C' step(closure)."""
    if loop == "official":
        return (["S"] * mc_samples + ["T"]) * steps
    return ["D" if mc_samples == 1 else "C"] * steps


def make_optimizer(params, loop: str, mc_samples: int, backend: str = "auto", seed=SEED,
                   state_dtype: str = "float32"):
    """``state_dtype``: the name of IVON's momentum / hess dtype ('float32', 'bfloat16'; configs
    travel as JSON)."""
    return ivon_fast.IVON(params, mc_samples=mc_samples, backend=backend, seed=seed,
                          resample_on_step=loop != "official",
                          state_dtype=getattr(torch, state_dtype), **HP)


def run_events(model, optimizer, events, x, y) -> None:
    """The training loops, as users write them (docs: the official and the drop-in loop)."""
    def closure():
        optimizer.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    for event in events:
        if event == "S":
            with optimizer.sampled_params(train=True):
                optimizer.zero_grad()
                loss_of(model, x, y).backward()
        elif event == "T":
            optimizer.step()
        elif event == "D":
            loss_of(model, x, y).backward()
            optimizer.step()
            optimizer.zero_grad()
        elif event == "C":
            optimizer.step(closure)
        else:
            raise ValueError(event)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).clone() for t in tensors])


def state_of(optimizer, full) -> dict:
    """mean / momentum / hess flat in param order from the state dict; ``full`` gathers each
    DTensor (a collective) into the unsharded tensor."""
    state = optimizer.state_dict()["state"]

    def value(tensor):
        return tensor.full_tensor() if full and hasattr(tensor, "full_tensor") else tensor

    return {name: flat(value(state[i][name]) for i in sorted(state))
            for name in ("mean", "momentum", "hess")}


# ----------------------------------------------------------------------------- sharding

def shard_model(model, mesh) -> None:
    """FSDP2 as its documentation applies it: submodules, then the root. The first two Linears
    are units of their own; the last one's params belong to the root's unit (FSDP2 keeps the
    root's params unsharded from forward to backward)."""
    from torch.distributed.fsdp import fully_shard

    for module in list(model)[:3]:
        if isinstance(module, nn.Linear):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def full_params(model) -> torch.Tensor:
    return flat(p.full_tensor() for p in model.parameters())


def local_batch(rank, world_size):
    x, y = full_batch()
    rows = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    return x[rows], y[rows]


def local_runs(model, rank, world_size) -> list:
    """(global index of the first element, local values) of each param's local shard.

    The global index is computed here from torch.chunk's row split (what Shard(0) places on each
    rank), independently of the DTensor API the optimizer uses: the param's offset in the
    unsharded flat order plus the shard's first row times the row length.
    """
    runs, offset = [], 0
    for param in model.parameters():
        rows = torch.chunk(torch.arange(param.shape[0]), world_size)
        mine = rows[rank] if rank < len(rows) else torch.empty(0, dtype=torch.long)
        start = (offset + int(mine[0]) * (param.numel() // param.shape[0])) if len(mine) else None
        runs.append((start, param.to_local().detach().reshape(-1).clone()))
        offset += param.numel()
    return runs


# ----------------------------------------------------------------------------- scenarios

def scenario_train(rank, world_size, mesh, out_dir, loop, mc_samples, backend, steps,
                   state_dtype="float32"):
    """Train a sharded model; gather what the test compares with an unsharded run."""
    model = build_model()
    shard_model(model, mesh)
    init = full_params(model)
    optimizer = make_optimizer(model.parameters(), loop, mc_samples, backend,
                               state_dtype=state_dtype)
    x, y = local_batch(rank, world_size)
    run_events(model, optimizer, step_events(loop, mc_samples, steps), x, y)
    after = state_of(optimizer, full=True)
    with optimizer.mean_params():
        mean_params = full_params(model)
    with optimizer.sampled_params():  # the first evaluation draw
        eval_sample = full_params(model)
    buckets = optimizer._layout.buckets
    local_numel = sum(p.to_local().numel() for p in model.parameters())
    state = optimizer.state_dict()["state"]
    return dict(
        init=init, after=after, params=full_params(model), mean_params=mean_params,
        eval_sample=eval_sample, local_numel=local_numel,
        bucket_numels={name: sum(getattr(b, name).numel() for b in buckets)
                       for name in ("mean", "momentum", "hess", "param_flat", "grad_flat")},
        # the pads before shards that start mid-quad (Note [quads in the buffers])
        pads=sum(b.mean.numel() - sum(s.stop - s.start for s in map(b.slice_of, range(len(
            b.params)))) for b in buckets), local_params=sum(len(b.params) for b in buckets),
        saved_local_numel=sum(state[i]["mean"].to_local().numel() for i in state),
        saved_types=sorted({type(state[i]["mean"]).__name__ for i in state}),
        saved_dtypes={name: sorted({str(state[i][name].dtype) for i in state})
                      for name in ("mean", "momentum", "hess")},
        backends=str(optimizer.backends))


def scenario_noise(rank, world_size, mesh, out_dir, loop, backend):
    """The samples of draws 0 (and 1): each local shard with its global offset, and gathered."""
    model = build_model()
    init = flat(model.parameters())
    shard_model(model, mesh)
    draws = []

    def record():
        draws.append(dict(runs=local_runs(model, rank, world_size), full=full_params(model)))

    if loop == "drop_in":  # the params hold draw 0 from construction on
        optimizer = make_optimizer(model.parameters(), loop, 1, backend)
        record()
    else:
        optimizer = make_optimizer(model.parameters(), loop, 2, backend)
        x, y = local_batch(rank, world_size)
        for _ in range(2):  # draws 0 and 1
            with optimizer.sampled_params(train=True):
                record()
                optimizer.zero_grad()
                loss_of(model, x, y).backward()
    return dict(init=init, draws=draws, backends=str(optimizer.backends))


def scenario_options(rank, world_size, mesh, out_dir):
    """The seed the ranks agree on, and the refused options (their error messages)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    model = build_model()
    shard_model(model, mesh)
    torch.manual_seed(100 + rank)  # rank-dependent default generators
    seed = ivon_fast.IVON(model.parameters(), **HP).seed
    errors = {}

    def refused(name, make):
        try:
            make()
        except ValueError as error:
            errors[name] = str(error)
        else:
            errors[name] = None

    refused("sync", lambda: ivon_fast.IVON(model.parameters(), sync=True, **HP))
    refused("rng", lambda: ivon_fast.IVON(model.parameters(), rng="torch", **HP))
    columns = nn.Parameter(distribute_tensor(torch.randn(3, 4), mesh, [Shard(1)]))
    refused("shard1", lambda: ivon_fast.IVON([columns], **HP))
    # a param that cannot be refused: Shard(1) of a one-row matrix is one contiguous run
    row = nn.Parameter(distribute_tensor(torch.zeros(1, 6), mesh, [Shard(1)]))
    ivon_fast.IVON([row], seed=SEED, resample_on_step=True, **HP)
    row_sample = row.full_tensor().reshape(-1)

    # user code: a write to the params becomes the mean; a frozen param gets its mean back
    optimizer = ivon_fast.IVON(model.parameters(), seed=SEED, resample_on_step=True, **HP)
    with torch.no_grad():
        model[0].weight.fill_(0.25)
    written_mean = state_of(optimizer, full=True)["mean"]
    model[2].bias.requires_grad_(False)
    optimizer.state_dict()  # any optimizer call catches up
    frozen = model[2].bias.full_tensor()
    return dict(seed=seed, errors=errors, row_sample=row_sample, written_mean=written_mean,
                frozen=frozen)


def scenario_meta(rank, world_size, mesh, out_dir, steps):
    """Build on the meta device, fully_shard, to_empty, re-init, then build IVON and train."""
    with torch.device("meta"):
        model = build_model()
    shard_model(model, mesh)
    model.to_empty(device="cpu")
    torch.manual_seed(7)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    init = full_params(model)
    optimizer = make_optimizer(model.parameters(), "drop_in", 1)
    initial_mean = state_of(optimizer, full=True)["mean"]
    x, y = local_batch(rank, world_size)
    run_events(model, optimizer, step_events("drop_in", 1, steps), x, y)
    return dict(init=init, initial_mean=initial_mean, after=state_of(optimizer, full=True),
                params=full_params(model), device=str(next(model.parameters()).device))


def _final(model, optimizer) -> dict:
    return dict(state=state_of(optimizer, full=True), params=full_params(model),
                step=optimizer.current_step)


def _resumed(mesh, loop, mc_samples, events, cut, save, load, rank, world_size,
             state_dtype="float32") -> tuple:
    """(uninterrupted run, run saved after ``cut`` events and resumed in fresh objects)."""
    x, y = local_batch(rank, world_size)
    model = build_model()
    shard_model(model, mesh)
    optimizer = make_optimizer(model.parameters(), loop, mc_samples, state_dtype=state_dtype)
    run_events(model, optimizer, events[:cut], x, y)
    save(model, optimizer)
    run_events(model, optimizer, events[cut:], x, y)
    uninterrupted = _final(model, optimizer)

    model = build_model(init_seed=INIT_SEED + 1)  # other weights, another seed: all must load
    shard_model(model, mesh)
    optimizer = make_optimizer(model.parameters(), loop, mc_samples, seed=SEED + 1,
                               state_dtype=state_dtype)
    load(model, optimizer)
    run_events(model, optimizer, events[cut:], x, y)
    return uninterrupted, _final(model, optimizer)


def scenario_resume(rank, world_size, mesh, out_dir, loop, mc_samples, events, cut, tag,
                    state_dtype="float32"):
    """opt.state_dict() / load_state_dict on each rank (torch.save of the sharded state)."""
    path = Path(out_dir) / f"resume-{tag}-rank{rank}.pt"

    def save(model, optimizer):
        torch.save(dict(model=model.state_dict(), optim=optimizer.state_dict()), path)

    def load(model, optimizer):
        saved = torch.load(path)  # weights_only: DTensors and the counters load
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optim"])

    uninterrupted, resumed = _resumed(mesh, loop, mc_samples, events, cut, save, load, rank,
                                      world_size, state_dtype)
    saved = torch.load(path)["optim"]
    keys = sorted({name for entry in saved["state"].values() for name in entry})
    return dict(uninterrupted=uninterrupted, resumed=resumed, saved_keys=keys,
                saved_types=sorted({type(t).__name__ for entry in saved["state"].values()
                                    for t in entry.values()}),
                saved_dtypes={name: sorted({str(entry[name].dtype)
                                            for entry in saved["state"].values()})
                              for name in ("mean", "momentum", "hess")})


def scenario_dcp(rank, world_size, mesh, out_dir, loop, api, tag, state_dtype="float32"):
    """torch.distributed.checkpoint: through get/set_optimizer_state_dict ('helpers') or of
    opt.state_dict() itself ('plain'); 'full': the helpers' full_state_dict option (unsharded
    tensors in memory, no DCP files)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         get_model_state_dict,
                                                         get_optimizer_state_dict,
                                                         set_model_state_dict,
                                                         set_optimizer_state_dict)

    checkpoint = str(Path(out_dir) / f"dcp-{tag}")
    mc_samples, steps = 1, 4
    events = step_events(loop, mc_samples, steps)
    cut = len(events) // 2

    def state(model, optimizer):
        if api == "helpers":
            return dict(model=get_model_state_dict(model),
                        optim=get_optimizer_state_dict(model, optimizer))
        return dict(model=model.state_dict(), optim=optimizer.state_dict())

    full = StateDictOptions(full_state_dict=True)
    kept = {}

    def save(model, optimizer):
        if api == "full":
            kept.update(model=get_model_state_dict(model, options=full),
                        optim=get_optimizer_state_dict(model, optimizer, options=full))
            return
        dcp.save(state(model, optimizer), checkpoint_id=checkpoint)

    def load(model, optimizer):
        if api == "full":
            set_model_state_dict(model, kept["model"], options=full)
            set_optimizer_state_dict(model, optimizer, kept["optim"], options=full)
            return
        loaded = state(model, optimizer)  # the template DCP loads into, in place
        dcp.load(loaded, checkpoint_id=checkpoint)
        if api == "helpers":
            set_model_state_dict(model, loaded["model"])
            set_optimizer_state_dict(model, optimizer, loaded["optim"])
        else:
            model.load_state_dict(loaded["model"])
            optimizer.load_state_dict(loaded["optim"])

    uninterrupted, resumed = _resumed(mesh, loop, mc_samples, events, cut, save, load, rank,
                                      world_size, state_dtype)
    return dict(uninterrupted=uninterrupted, resumed=resumed)


def scenario_from_unsharded(rank, world_size, mesh, out_dir, loop, steps_before, steps_after,
                            state_dtype="float32"):
    """An unsharded run's checkpoint (full tensors) loaded into a sharded model and optimizer."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         set_model_state_dict)

    x, y = full_batch()
    dense = build_model()
    dense_optimizer = make_optimizer(dense.parameters(), loop, 1, state_dtype=state_dtype)
    run_events(dense, dense_optimizer, step_events(loop, 1, steps_before), x, y)
    model_state, optim_state = dense.state_dict(), dense_optimizer.state_dict()

    model = build_model(init_seed=INIT_SEED + 1)
    shard_model(model, mesh)
    optimizer = make_optimizer(model.parameters(), loop, 1, seed=SEED + 1,
                               state_dtype=state_dtype)
    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
    optimizer.load_state_dict(optim_state)
    x, y = local_batch(rank, world_size)
    run_events(model, optimizer, step_events(loop, 1, steps_after), x, y)
    return _final(model, optimizer)


def scenario_nonfinite(rank, world_size, mesh, out_dir, backend):
    """Drop-in training where only rank 1's gradient shard turns NaN in the second step: each
    rank checks only its shards, so the ranks must agree (docs/DESIGN.md section 11)."""
    model = build_model()
    shard_model(model, mesh)
    optimizer = ivon_fast.IVON(model.parameters(), backend=backend, seed=SEED,
                               resample_on_step=True, skip_nonfinite=True, **HP)
    x, y = local_batch(rank, world_size)
    states = []
    for step in range(3):
        loss_of(model, x, y).backward()
        if step == 1 and rank == 1:
            poisoned = next(p for p in model.parameters() if p.to_local().numel() > 0)
            poisoned.grad.to_local().view(-1)[0] = float("nan")
        optimizer.step()
        optimizer.zero_grad()
        states.append(state_of(optimizer, full=True))
    return dict(states=states, skipped=optimizer.skipped_steps, step=optimizer.current_step)


SCENARIOS = {
    "nonfinite": scenario_nonfinite,
    "train": scenario_train,
    "noise": scenario_noise,
    "options": scenario_options,
    "meta": scenario_meta,
    "resume": scenario_resume,
    "dcp": scenario_dcp,
    "from_unsharded": scenario_from_unsharded,
}


def setup(rank, world_size, out_dir):
    """What every scenario takes besides its config: the 1-D mesh over all ranks, the output
    folder (checkpoints)."""
    from torch.distributed.device_mesh import init_device_mesh

    return dict(mesh=init_device_mesh("cpu", (world_size,)), out_dir=out_dir)


if __name__ == "__main__":
    sys.exit(_ranks.run(sys.argv, SCENARIOS, setup=setup))
