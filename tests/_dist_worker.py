"""One rank of the multi-process tests in ``tests/test_distributed.py`` (not a test module).

Run as a script by the test file (through ``_ranks.spawn``), once per rank:

    python _dist_worker.py RANK WORLD_SIZE INIT_FILE CONFIGS_JSON OUT_DIR

This module holds the scenarios (and the model, data and hyperparameters they share with the test
file); ``tests/_ranks.py`` does the rest: ``_ranks.run`` joins the gloo process group (FileStore
at INIT_FILE, CPU only), runs every config of every scenario as
``scenario(rank, world_size, **config)``, and saves ``{scenario: {config id: result}}`` to
``OUT_DIR/rank<RANK>.pt``; a config that raises records ``{"error": traceback}`` instead, so one
broken config fails only its own test. The assertions are made by the test process.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

import ivon
import ivon_fast

# the tests folder: first on sys.path when this runs as a script; the test module puts it there
import _ranks

# The model and the hyperparameters every scenario uses. beta2 is small so that the Hessian term
# (and so its averaging across ranks) visibly moves the Hessian within a step or two.
HP = dict(lr=0.1, ess=50.0, hess_init=1.0, beta1=0.9, beta2=0.9, weight_decay=1e-3)
INIT_SEED = 0          # same model init on every rank
DATA_SEED = 1000       # rank r trains on the shard drawn with DATA_SEED + r
TORCH_NOISE_SEED = 100  # rng='torch': rank r seeds torch with TORCH_NOISE_SEED + r
PHILOX_SEED = (1 << 40) + 12345  # rng='philox': the one seed passed on every rank (hi32 != 0)


def build_model() -> nn.Module:
    """51 params (not a multiple of 4, so the last Philox quad is partly used)."""
    torch.manual_seed(INIT_SEED)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def shard(rank: int):
    generator = torch.Generator().manual_seed(DATA_SEED + rank)
    x = torch.randn(16, 4, generator=generator)
    y = torch.randint(0, 3, (16,), generator=generator)
    return x, y


def loss_of(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).clone() for t in tensors])


def fast_state(optimizer) -> dict:
    """mean / momentum / hess of an ivon_fast.IVON, flat in param order (from its state dict)."""
    state = optimizer.state_dict()["state"]
    return {name: torch.cat([state[i][name].reshape(-1).clone() for i in sorted(state)])
            for name in ("mean", "momentum", "hess")}


class ScaledNet(nn.Module):
    """Linear-Tanh-Linear times a buffer (DDP broadcasts buffers from rank 0 before each forward).

    39 params (not a multiple of 4)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        self.register_buffer("scale", torch.tensor([1.0, 0.5, 2.0]))

    def forward(self, x):
        return self.body(x) * self.scale


def build_ddp_model(init_seed: int = INIT_SEED) -> nn.Module:
    torch.manual_seed(init_seed)
    return ScaledNet()


def full_batch(world_size: int):
    """Every rank's shard, concatenated in rank order: what one process trains on."""
    shards = [shard(rank) for rank in range(world_size)]
    return torch.cat([x for x, _ in shards]), torch.cat([y for _, y in shards])


def ddp_options(loop, mc_samples, hess_approx, backend) -> dict:
    """IVON's options in the DDP scenario: no sync, one seed everywhere (shared noise)."""
    return dict(HP, mc_samples=mc_samples, hess_approx=hess_approx, backend=backend,
                seed=PHILOX_SEED, resample_on_step=loop == "drop_in")


def train_steps(model, optimizer, x, y, loop, mc_samples, steps, recorded) -> list:
    """``steps`` IVON steps on (x, y) in the given loop; the flat params after each step.

    official: ``mc_samples`` sampled_params(train=True) blocks (zero_grad inside), then step().
    drop_in: backward(); step(); zero_grad(), or step(closure) when mc_samples > 1.
    ``recorded``: the module whose parameters are recorded (the model inside a DDP wrapper).
    """
    trajectory = []
    for _ in range(steps):
        if loop == "official":
            for _ in range(mc_samples):
                with optimizer.sampled_params(train=True):
                    optimizer.zero_grad()
                    loss_of(model, x, y).backward()
            optimizer.step()
        elif mc_samples == 1:
            loss_of(model, x, y).backward()
            optimizer.step()
            optimizer.zero_grad()
        else:
            def closure():
                optimizer.zero_grad()
                loss = loss_of(model, x, y)
                loss.backward()
                return loss
            optimizer.step(closure)
        trajectory.append(flat(recorded.parameters()))
    return trajectory


def run_record(model, optimizer, x, y, loop, mc_samples, steps, recorded) -> dict:
    """Train, then record the params after each step, the final state and mean_params()."""
    trajectory = train_steps(model, optimizer, x, y, loop, mc_samples, steps, recorded)
    with optimizer.mean_params():
        mean_params = flat(recorded.parameters())
    return dict(trajectory=trajectory, state=fast_state(optimizer), mean_params=mean_params,
                backends=str(optimizer.backends))


class IvonOptSyncAllTerms(ivon.IVON):
    """ivon-opt 0.1.3 whose sync also averages avg_gsq.

    ivon-opt's ``_sync_samples`` all-reduces ``avg_grad`` and ``avg_nxg`` only (sum, then
    ``div_(world_size)``), so with hess_approx='gradsq' and sync=True it calls
    ``all_reduce(None)`` and fails. This subclass reduces the term its hess_approx uses, in the
    same way (sum, then div_ by the world size); for 'price' it does exactly what ivon-opt does.
    """

    def _sync_samples(self):
        world_size = dist.get_world_size()
        for key in ("avg_grad", "avg_nxg" if self.hess_approx == "price" else "avg_gsq"):
            dist.all_reduce(self.state[key])
            self.state[key].div_(world_size)


# ----------------------------------------------------------------------------- scenarios

def scenario_ivon_opt(rank, world_size, hess_approx, mc_samples, steps):
    """The official loop, sync=True, with ivon-opt and with ivon_fast(rng='torch', reference)."""
    x, y = shard(rank)

    def train(make_optimizer):
        model = build_model()
        optimizer = make_optimizer(model.parameters())
        torch.manual_seed(TORCH_NOISE_SEED + rank)  # rank-dependent noise, identical for both runs
        for _ in range(steps):
            for _ in range(mc_samples):
                with optimizer.sampled_params(train=True):
                    optimizer.zero_grad()
                    loss_of(model, x, y).backward()
            optimizer.step()
        return model, optimizer

    options = dict(HP, mc_samples=mc_samples, hess_approx=hess_approx, sync=True)
    official_class = ivon.IVON if hess_approx == "price" else IvonOptSyncAllTerms
    model, optimizer = train(lambda params: official_class(params, **options))
    group = optimizer.param_groups[0]
    official = dict(params=flat(model.parameters()), momentum=group["momentum"].clone(),
                    hess=group["hess"].clone())
    model, optimizer = train(lambda params: ivon_fast.IVON(params, rng="torch",
                                                           backend="reference", **options))
    state = fast_state(optimizer)
    fast = dict(params=flat(model.parameters()), mean=state["mean"],
                momentum=state["momentum"], hess=state["hess"])
    return dict(official=official, fast=fast)


def scenario_division(rank, world_size, rng, backend, hess_approx, mc_samples, steps,
                      loop="official"):
    """Train ``steps`` synced steps; record what the last one started from and what it produced.

    Recorded for the last step: the state before it, each sample's gradient, and (rng='torch')
    torch's generator state before each sample, from which the test regenerates the noise.
    loop='official': mc_samples sampled_params(train=True) blocks, then step(); loop='drop_in'
    (resample_on_step=True): backward(); step(); zero_grad(), or step(closure) for 2 samples.
    Either way step k draws the training draws k * mc_samples .. (k + 1) * mc_samples - 1.
    """
    x, y = shard(rank)
    model = build_model()
    seed = PHILOX_SEED if rng == "philox" else None
    optimizer = ivon_fast.IVON(model.parameters(), mc_samples=mc_samples, hess_approx=hess_approx,
                               sync=True, backend=backend, rng=rng, seed=seed,
                               resample_on_step=loop == "drop_in", **HP)
    torch.manual_seed(TORCH_NOISE_SEED + rank)
    before, grads, rng_states = None, [], []

    def backward(last):
        loss = loss_of(model, x, y)
        loss.backward()
        if last:
            grads.append(flat(p.grad for p in model.parameters()))
        return loss

    for step in range(steps):
        last = step == steps - 1
        if last:
            before = fast_state(optimizer)
        if loop == "drop_in":
            if mc_samples == 1:
                backward(last)
                optimizer.step()
                optimizer.zero_grad()
            else:
                def closure():
                    optimizer.zero_grad()
                    return backward(last)
                optimizer.step(closure)
            continue
        for _ in range(mc_samples):
            if last:
                rng_states.append(torch.get_rng_state())
            with optimizer.sampled_params(train=True):
                optimizer.zero_grad()
                backward(last)
        optimizer.step()
    params = flat(model.parameters())
    with optimizer.mean_params():
        mean_params = flat(model.parameters())
    return dict(before=before, grads=grads, rng_states=rng_states, after=fast_state(optimizer),
                params=params, mean_params=mean_params, backends=str(optimizer.backends))


def scenario_noise(rank, world_size, backend, sync, loop):
    """The samples a rank draws with the default rng='philox' and one seed passed everywhere."""
    x, y = shard(rank)
    model = build_model()
    options = dict(HP, sync=sync, backend=backend, seed=PHILOX_SEED)
    samples = []
    if loop == "official":
        optimizer = ivon_fast.IVON(model.parameters(), mc_samples=2, **options)
        before = fast_state(optimizer)
        for _ in range(2):  # draws 0 and 1
            with optimizer.sampled_params(train=True):
                samples.append(flat(model.parameters()))
                optimizer.zero_grad()
                loss_of(model, x, y).backward()
        optimizer.step()
    else:  # drop-in: the params hold draw 0 from construction on
        optimizer = ivon_fast.IVON(model.parameters(), resample_on_step=True, **options)
        before = fast_state(optimizer)
        samples.append(flat(model.parameters()))
        loss_of(model, x, y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return dict(before=before, samples=samples, backends=str(optimizer.backends))


def scenario_drop_in(rank, world_size, backend, loop, sync, steps):
    """Drop-in mode (resample_on_step=True): the plain loop, or step(closure) with 2 samples."""
    x, y = shard(rank)
    model = build_model()
    mc_samples = 2 if loop == "closure" else 1
    optimizer = ivon_fast.IVON(model.parameters(), resample_on_step=True, sync=sync,
                               backend=backend, seed=PHILOX_SEED, mc_samples=mc_samples, **HP)
    initial = fast_state(optimizer)
    first_grad = None

    def closure():
        optimizer.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    for _ in range(steps):
        if loop == "plain":
            loss_of(model, x, y).backward()
            if first_grad is None:
                first_grad = flat(p.grad for p in model.parameters())
            optimizer.step()
            optimizer.zero_grad()
        else:
            optimizer.step(closure)
            if first_grad is None:
                first_grad = flat(p.grad for p in model.parameters())
    with optimizer.mean_params():
        mean_params = flat(model.parameters())
    return dict(initial=initial, after=fast_state(optimizer), mean_params=mean_params,
                first_grad=first_grad, backends=str(optimizer.backends))


def scenario_ddp(rank, world_size, loop, mc_samples, hess_approx, backend, steps, order="ddp_first",
                 bucket_view=False, init="per_rank"):
    """Shared-noise data parallel: the model wrapped in torch's DistributedDataParallel (which
    averages the gradients over the ranks), IVON without sync and with one seed on every rank,
    each rank on its own half of the batch.

    order: 'ddp_first' (``IVON(DDP(model).parameters())``, the usual order) or 'ivon_first' (the
    optimizer is built before DDP, whose constructor then broadcasts rank 0's params and buffers
    into params that the optimizer already owns). bucket_view: DDP's
    ``gradient_as_bucket_view`` (DDP rebinds every ``p.grad`` to a view into its own buckets).
    init: 'per_rank' (rank r initializes with INIT_SEED + r and scales its buffer by 1 + r: DDP's
    broadcast from rank 0 must fix both) or 'same'.
    """
    x, y = shard(rank)
    model = build_ddp_model(INIT_SEED + (rank if init == "per_rank" else 0))
    if init == "per_rank":
        model.scale.mul_(1.0 + rank)
    options = ddp_options(loop, mc_samples, hess_approx, backend)
    if order == "ddp_first":
        wrapped = DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
        optimizer = ivon_fast.IVON(wrapped.parameters(), **options)
    else:
        optimizer = ivon_fast.IVON(model.parameters(), **options)
        wrapped = DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
    result = run_record(wrapped, optimizer, x, y, loop, mc_samples, steps, recorded=model)
    result["scale"] = model.scale.clone()
    return result


SCENARIOS = {
    "ivon_opt": scenario_ivon_opt,
    "division": scenario_division,
    "noise": scenario_noise,
    "drop_in": scenario_drop_in,
    "ddp": scenario_ddp,
}


if __name__ == "__main__":
    sys.exit(_ranks.run(sys.argv, SCENARIOS))
