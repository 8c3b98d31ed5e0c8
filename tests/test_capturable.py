"""Capturable steps (issue 8, docs/DESIGN.md section 9): ``IVON(..., capturable=True)``.

Kernel level: every op takes ``device_draws`` (int64 draw numbers read on the device) and gives
exactly what the same op gives with those numbers as host arguments, on every backend.

Optimizer level (CPU, runs in CI): capturable training equals ordinary training bit for bit in
both loops while a LambdaLR scheduler changes lr every step; a "replay proxy" records every
backend call's non-tensor arguments and checks they are the same from step to step (what a CUDA
graph replay requires), while the results still follow the scheduler and take fresh draws; state
dicts round-trip. With bf16 state (docs/DESIGN.md section 16) the same holds, and the stochastic
rounding's index comes from the device's draw counter in every update (also one with all samples
folded in), so each replay rounds with fresh bits. The tests marked gpu capture a real step in a
CUDA graph and replay it.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

from ivon_fast import IVON, backends
from ivon_fast import reference as ref
from ivon_fast.scalars import StepScalars

# ------------------------------------------------------------------------------------------------
# kernel level
# ------------------------------------------------------------------------------------------------


def _kernel_backends():
    params = [pytest.param("reference", id="reference")]
    for name in ("cpu", "triton"):
        reason = backends.unavailable_reason(name, torch.device("cpu"))
        marks = [pytest.mark.skipif(reason is not None, reason=str(reason))]
        if name == "cpu" and reason is not None and (
                os.environ.get("IVON_FAST_EXPECT_EXT") == "1"
                or os.environ.get("IVON_FAST_EXPECT_CUDA") == "1"):
            raise RuntimeError(f"the compiled extension is expected but unavailable: {reason}")
        params.append(pytest.param(name, id=name, marks=marks))
    return params


KERNEL_BACKENDS = _kernel_backends()
SEED = (1 << 64) - 98765
# draw numbers whose high word is at work (and the carry into it), and one with bit 63 set
DRAWS = [(3, 4), ((1 << 32) - 1, 1 << 32), ((1 << 40) + 5, (1 << 40) + 6),
         (ref.EVAL_DRAW_BASE + 2, ref.EVAL_DRAW_BASE + 3)]
SCALARS = StepScalars.of(lr=0.05, ess=30.0, weight_decay=1e-3, beta1=0.9, beta2=0.95,
                         debias=0.3)
STATE_TOL = dict(rtol=1e-5, atol=1e-6)


def _i64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _device_draws(*draws) -> torch.Tensor:
    return torch.tensor([_i64(d) for d in draws], dtype=torch.int64)


def _inputs(n=1029, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(mean=torch.randn(n, generator=g), hess=torch.rand(n, generator=g) * 2 + 0.1,
                momentum=torch.randn(n, generator=g) * 0.1, grad=torch.randn(n, generator=g),
                avg_grad=torch.randn(n, generator=g), avg_term=torch.randn(n, generator=g))


def _run_op(module, op, inputs, *, offset, draw, next_draw, device_draws, hess_approx="price",
            count=1, resample=True):
    """One op call; returns every tensor it may have written."""
    t = {k: v.clone() for k, v in inputs.items()}
    n = t["mean"].numel()
    param = torch.empty(n)
    extra = {} if device_draws is None else {"device_draws": device_draws}
    if op == "sample":
        module.sample(param, t["mean"], t["hess"], seed=SEED, draw=draw, offset=offset,
                      ess=SCALARS.ess, weight_decay=SCALARS.weight_decay,
                      **({} if device_draws is None else {"device_draws": device_draws[:1]}))
        return [param]
    if op == "accumulate":
        module.accumulate(t["grad"], t["hess"], t["avg_grad"], t["avg_term"], seed=SEED,
                          draw=draw, offset=offset, count=count, ess=SCALARS.ess,
                          weight_decay=SCALARS.weight_decay, hess_approx=hess_approx,
                          **({} if device_draws is None else {"device_draws": device_draws[:1]}))
        return [t["avg_grad"], t["avg_term"]]
    module.update(param, t["grad"], t["mean"], t["momentum"], t["hess"], t["avg_grad"],
                  t["avg_term"], seed=SEED, draw=draw, next_draw=next_draw if resample else None,
                  offset=offset, count=count, hess_approx=hess_approx, scalars=SCALARS, **extra)
    return [param, t["mean"], t["momentum"], t["hess"]]


OPS = [pytest.param("sample", {}, id="sample"),
       pytest.param("accumulate", dict(count=1), id="accumulate-first"),
       pytest.param("accumulate", dict(count=3), id="accumulate-3"),
       pytest.param("update", dict(count=1), id="update-resample"),
       pytest.param("update", dict(count=2, hess_approx="gradsq"), id="update-gradsq-2"),
       pytest.param("update", dict(count=1, resample=False), id="update-no-next")]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("op,kwargs", OPS)
@pytest.mark.parametrize("draws", DRAWS, ids=["small", "carry", "high", "eval"])
def test_device_draws_equal_host_draws_bitwise(backend, op, kwargs, draws):
    """The same numbers, as launch arguments or read on the device: the same bits."""
    if backend == "triton" and 1 << 31 <= draws[0] < 1 << 32:
        # found here, not fixed: the interpreter holds a Python int argument in [2^31, 2^32) as
        # a numpy uint32 typed i64, so _philox's `draw >> 32` shifts a 32-bit value (the GPU
        # compiles an i64); the device draws give the reference's noise (next test)
        pytest.xfail("Triton interpreter: host draw in [2^31, 2^32) gets a wrong high word")
    module = backends.get(backend)
    inputs = _inputs()
    host = _run_op(module, op, inputs, offset=(1 << 34) + 3, draw=draws[0], next_draw=draws[1],
                   device_draws=None, **kwargs)
    device = _run_op(module, op, inputs, offset=(1 << 34) + 3, draw=0, next_draw=0,
                     device_draws=_device_draws(*draws), **kwargs)
    for a, b in zip(host, device):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", [p for p in KERNEL_BACKENDS if p.values[0] != "reference"])
@pytest.mark.parametrize("op,kwargs", OPS)
def test_device_draws_match_reference(backend, op, kwargs):
    """Each kernel backend with device draws equals the reference with the same device draws."""
    inputs = _inputs(seed=1)
    draws = _device_draws((1 << 32) - 1, 1 << 32)  # the carry into the high word
    got = _run_op(backends.get(backend), op, inputs, offset=6, draw=0, next_draw=0,
                  device_draws=draws.clone(), **kwargs)
    want = _run_op(ref, op, inputs, offset=6, draw=0, next_draw=0, device_draws=draws.clone(),
                   **kwargs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **STATE_TOL)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_device_draws_replace_the_host_draws(backend):
    """With device draws the host's draw numbers are ignored: the tensor decides, and a new
    value in it (what a graph replay sees) gives that draw's noise."""
    module = backends.get(backend)
    inputs = _inputs(seed=2)
    draws = _device_draws(9, 10)
    first = _run_op(module, "update", inputs, offset=1, draw=5, next_draw=6,
                    device_draws=draws, count=1)
    assert all(torch.equal(a, b) for a, b in zip(first, _run_op(
        module, "update", inputs, offset=1, draw=9, next_draw=10, device_draws=None, count=1)))
    draws.add_(1)  # as the optimizer advances it on the device
    second = _run_op(module, "update", inputs, offset=1, draw=5, next_draw=6,
                     device_draws=draws, count=1)
    assert all(torch.equal(a, b) for a, b in zip(second, _run_op(
        module, "update", inputs, offset=1, draw=10, next_draw=11, device_draws=None, count=1)))
    assert not torch.equal(first[0], second[0])


# ------------------------------------------------------------------------------------------------
# optimizer level (CPU)
# ------------------------------------------------------------------------------------------------

OPT_BACKENDS = [p for p in KERNEL_BACKENDS if p.values[0] != "triton"] + [
    pytest.param("triton", id="triton", marks=[
        pytest.mark.triton, *[m for p in KERNEL_BACKENDS if p.values[0] == "triton"
                              for m in p.marks]])]
HP = dict(lr=0.05, ess=200.0, hess_init=0.5, weight_decay=1e-3, beta2=0.999)
LOOPS = [pytest.param("dropin", 1, id="dropin"), pytest.param("official", 1, id="official"),
         pytest.param("official", 2, id="official-mc2"), pytest.param("closure", 2, id="closure")]
# the official loop with zero_grad() between the last block and step(): every sample is folded
# in, and the update has neither a pending sample nor a next one
FOLDED = pytest.param("folded", 2, id="official-folded")
BF16 = torch.bfloat16


def _with_bf16_state(params):
    """The backends of ``params``, each skipped where it cannot run on CPU (every backend
    implements bf16 state)."""
    out = []
    for param in params:
        name = param.values[0]
        reason = backends.unavailable_reason(name, torch.device("cpu"), torch.float32)
        out.append(pytest.param(name, id=name, marks=[
            *param.marks, pytest.mark.skipif(reason is not None, reason=str(reason))]))
    return out


def _model(device="cpu"):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(),
                               torch.nn.Linear(9, 2)).to(device)


def _batch(device="cpu"):
    g = torch.Generator().manual_seed(3)
    return torch.randn(32, 6, generator=g).to(device), torch.randn(32, 2, generator=g).to(device)


def _lambda(epoch):
    return 1.0 / (1.0 + 0.37 * epoch)


def _one_step(opt, model, x, y, loop, mc):
    def loss_fn():
        return (model(x) - y).square().mean()
    if loop == "dropin":
        loss_fn().backward()
        opt.step()
        opt.zero_grad()
    elif loop in ("official", "folded"):
        for _ in range(mc):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                loss_fn().backward()
        if loop == "folded":
            opt.zero_grad()  # folds the pending sample in: step() has none
        opt.step()
    else:
        def closure():
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss
        opt.step(closure)


def _train(backend, loop, mc, *, capturable, steps=5, scheduler=True, seed=1234, **options):
    model = _model()
    opt = IVON(model.parameters(), **HP, backend=backend, seed=seed, mc_samples=mc,
               resample_on_step=loop == "dropin" or (loop == "closure" and mc == 1),
               capturable=capturable, **options)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lambda) if scheduler else None
    x, y = _batch()
    trajectory = []
    for _ in range(steps):
        _one_step(opt, model, x, y, loop, mc)
        if sched is not None:
            sched.step()
        trajectory.append([p.detach().clone() for p in model.parameters()])
    with opt.mean_params():
        means = [p.detach().clone() for p in model.parameters()]
    return trajectory, means, opt


def _assert_equal_runs(a, b):
    for step_a, step_b in zip(a, b):
        for x, y in zip(step_a, step_b):
            assert torch.equal(x, y)


@pytest.mark.parametrize("backend", OPT_BACKENDS)
@pytest.mark.parametrize("loop,mc", LOOPS)
def test_capturable_trains_exactly_like_eager(backend, loop, mc):
    """capturable=True (lr, draws, step count and debias on the device) gives the same bits as
    the host path, while LambdaLR changes lr every step."""
    steps = 3 if backend == "triton" else 5
    traj_host, mean_host, opt_host = _train(backend, loop, mc, capturable=False, steps=steps)
    traj_dev, mean_dev, opt_dev = _train(backend, loop, mc, capturable=True, steps=steps)
    _assert_equal_runs(traj_host, traj_dev)
    _assert_equal_runs([mean_host], [mean_dev])
    assert opt_dev.current_step == opt_host.current_step == steps
    assert isinstance(opt_dev.param_groups[0]["lr"], torch.Tensor)
    assert opt_dev.param_groups[0]["lr"].item() == opt_host.param_groups[0]["lr"]
    # the scheduler mattered: without it the run differs
    traj_const, _, _ = _train(backend, loop, mc, capturable=True, steps=steps, scheduler=False)
    assert not torch.equal(traj_const[-1][0], traj_dev[-1][0])


@pytest.mark.parametrize("loop,mc", [LOOPS[0], LOOPS[1]])
def test_capturable_without_nonfinite_check(loop, mc):
    backend = "reference"
    a, _, _ = _train(backend, loop, mc, capturable=False, skip_nonfinite=False)
    b, _, opt = _train(backend, loop, mc, capturable=True, skip_nonfinite=False)
    _assert_equal_runs(a, b)
    assert opt.current_step == 5


def test_capturable_skips_nonfinite_steps_like_eager():
    """A NaN gradient skips the step on the device in both modes, and the next step draws
    fresh noise."""
    results = []
    for capturable in (False, True):
        model = _model()
        opt = IVON(model.parameters(), **HP, backend="reference", seed=5, resample_on_step=True,
                   capturable=capturable)
        x, y = _batch()
        params = []
        for step in range(4):
            (model(x) - y).square().mean().backward()
            if step == 1:
                model[0].weight.grad[0, 0] = float("nan")
            opt.step()
            opt.zero_grad()
            params.append([p.detach().clone() for p in model.parameters()])
        results.append((params, opt.current_step, opt.skipped_steps))
    _assert_equal_runs(results[0][0], results[1][0])
    assert results[0][1:] == results[1][1:] == (3, 1)


def _record_backend_calls(monkeypatch, backend):
    """Patch the backend module's ops to record each call's arguments: non-tensor values as
    they are, tensors as (dtype, shape) plus, for the tensors a graph would keep reading
    (params, grads, state, the draw counter), their address."""
    module = backends.get(backend)
    calls = []
    transient = ("grad_scale", "found_inf", "device_lr", "device_debias")

    def describe(name, value):
        if isinstance(value, torch.Tensor):
            address = None if name in transient else value.data_ptr()
            return ("tensor", value.dtype, tuple(value.shape), address)
        if isinstance(value, StepScalars):
            return ("scalars", value)
        return value

    for op in ("sample", "accumulate", "update"):
        original = getattr(module, op)

        def wrapper(*args, _op=op, _original=original, **kwargs):
            calls.append((_op, tuple(describe(i, a) for i, a in enumerate(args)),
                          tuple(sorted((k, describe(k, v)) for k, v in kwargs.items()))))
            return _original(*args, **kwargs)
        monkeypatch.setattr(module, op, wrapper)
    return calls


def _replay_proxy(monkeypatch, backend, loop, mc, **options):
    """What a CUDA graph replay requires: steps 2..N launch the same ops with the same host
    arguments (the same draw arguments, the same host scalars, the same tensors), while the
    results follow the scheduler's lr and fresh draws (equal to the host path's)."""
    steps = 5
    model = _model()
    opt = IVON(model.parameters(), **HP, backend=backend, seed=77, mc_samples=mc,
               resample_on_step=loop == "dropin", capturable=True, **options)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lambda)
    x, y = _batch()
    _one_step(opt, model, x, y, loop, mc)  # step 1: outside the recording (the warmup)
    sched.step()
    calls = _record_backend_calls(monkeypatch, backend)
    per_step, samples = [], []
    for _ in range(steps - 1):
        start = len(calls)
        _one_step(opt, model, x, y, loop, mc)
        sched.step()
        per_step.append(calls[start:])
        samples.append([p.detach().clone() for p in model.parameters()])
    assert per_step[0], "no backend call was recorded"
    for later in per_step[1:]:
        assert later == per_step[0]
    monkeypatch.undo()
    # ... and the results are the host path's: fresh draws, the scheduled lr
    host, _, _ = _train(backend, loop, mc, capturable=False, steps=steps, seed=77, **options)
    _assert_equal_runs(host[1:], samples)
    assert not torch.equal(samples[0][0], samples[1][0])
    return opt


@pytest.mark.parametrize("backend", [p for p in OPT_BACKENDS if p.values[0] != "triton"])
@pytest.mark.parametrize("loop,mc", LOOPS[:3])
def test_replay_proxy(monkeypatch, backend, loop, mc):
    """What a CUDA graph replay requires (``_replay_proxy``), float32 state."""
    _replay_proxy(monkeypatch, backend, loop, mc)


@pytest.mark.parametrize("backend", _with_bf16_state(
    [p for p in OPT_BACKENDS if p.values[0] != "triton"]))
@pytest.mark.parametrize("loop,mc", [*LOOPS[:3], FOLDED])
def test_replay_proxy_bf16_state(monkeypatch, backend, loop, mc):
    """bf16 state: the update's host arguments stay the same from step to step too (the
    rounding index is read on the device, not passed as round_draw), also when the update has
    no pending and no next sample; the results equal the host path's and the state is bf16."""
    opt = _replay_proxy(monkeypatch, backend, loop, mc, state_dtype=BF16)
    for param in opt.param_groups[0]["params"]:
        assert opt.state[param]["momentum"].dtype == opt.state[param]["hess"].dtype == BF16


@pytest.mark.parametrize("backend", _with_bf16_state(OPT_BACKENDS))
@pytest.mark.parametrize("loop,mc", [*LOOPS, FOLDED])
def test_capturable_bf16_state_trains_exactly_like_eager(backend, loop, mc):
    """bf16 state, capturable=True against False: the same params at every step and the same
    bf16 momentum and hess, bit for bit (the stochastic rounding's bits are the same)."""
    steps = 3 if backend == "triton" else 5
    traj_host, mean_host, opt_host = _train(backend, loop, mc, capturable=False, steps=steps,
                                            state_dtype=BF16)
    traj_dev, mean_dev, opt_dev = _train(backend, loop, mc, capturable=True, steps=steps,
                                         state_dtype=BF16)
    _assert_equal_runs(traj_host, traj_dev)
    _assert_equal_runs([mean_host], [mean_dev])
    for p_host, p_dev in zip(opt_host.param_groups[0]["params"],
                             opt_dev.param_groups[0]["params"]):
        for key in ("momentum", "hess"):
            assert opt_dev.state[p_dev][key].dtype == BF16
            assert torch.equal(opt_dev.state[p_dev][key], opt_host.state[p_host][key])
    assert opt_dev.current_step == opt_host.current_step == steps


def _spy_rounding_indices(monkeypatch):
    """Patch the reference's update to record each call's rounding index: ('device', the
    device's draws[1]) when it gets device draws, else ('host', round_draw)."""
    indices = []
    original = ref.update

    def spy(*args, **kwargs):
        draws = kwargs.get("device_draws")
        if draws is not None:
            assert kwargs["round_draw"] == 0  # a host value would be frozen into a graph
            indices.append(("device", int(draws[1])))
        else:
            indices.append(("host", kwargs["round_draw"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(ref, "update", spy)
    return indices


@pytest.mark.parametrize("loop,mc", [LOOPS[0], LOOPS[2], FOLDED])
def test_capturable_bf16_rounding_index_is_the_hosts_and_fresh(monkeypatch, loop, mc):
    """Every capturable update reads its rounding index from the device's draw counter: the
    same index the host path uses (one more than the step's last training draw), growing from
    update to update. A run whose index were stuck ends in other bf16 state."""
    indices = _spy_rounding_indices(monkeypatch)
    _, _, opt_dev = _train("reference", loop, mc, capturable=True, state_dtype=BF16)
    assert {source for source, _ in indices} == {"device"}  # every update, on the device
    on_device = [index for _, index in indices]
    indices.clear()
    _train("reference", loop, mc, capturable=False, state_dtype=BF16)
    assert on_device == [index for _, index in indices]
    assert len(on_device) == 5 and all(a < b for a, b in zip(on_device, on_device[1:]))
    assert on_device[0] == mc  # draws 0 .. mc - 1 taken before the first update

    monkeypatch.undo()
    original = ref.update

    def stuck(*args, **kwargs):  # every update rounds with the first update's bits
        return original(*args, **{**kwargs, "round_draw": on_device[0]})

    monkeypatch.setattr(ref, "update", stuck)
    _, _, opt_stuck = _train("reference", loop, mc, capturable=False, state_dtype=BF16)
    differs = [not torch.equal(opt_stuck.state[p]["hess"], opt_dev.state[q]["hess"])
               for p, q in zip(opt_stuck.param_groups[0]["params"],
                               opt_dev.param_groups[0]["params"])]
    assert any(differs)


def test_replay_proxy_sees_host_draws_without_capturable(monkeypatch):
    """The proxy's negative control: without capturable the draws are launch arguments and
    change every step."""
    model = _model()
    opt = IVON(model.parameters(), **HP, backend="reference", seed=77, resample_on_step=True)
    x, y = _batch()
    _one_step(opt, model, x, y, "dropin", 1)
    calls = _record_backend_calls(monkeypatch, "reference")
    _one_step(opt, model, x, y, "dropin", 1)
    first = list(calls)
    _one_step(opt, model, x, y, "dropin", 1)
    assert calls[len(first):] != first


@pytest.mark.parametrize("loop,mc", [LOOPS[0], LOOPS[2]])
def test_state_dict_round_trip(loop, mc):
    """Save mid-training in capturable mode, load into a fresh capturable optimizer: both
    continue alike; the loaded optimizer keeps its own lr tensor and device counters (a graph
    captured before the load still reads them)."""
    backend = "reference"
    model = _model()
    opt = IVON(model.parameters(), **HP, backend=backend, seed=9, mc_samples=mc,
               resample_on_step=loop == "dropin", capturable=True)
    x, y = _batch()
    for _ in range(3):
        _one_step(opt, model, x, y, loop, mc)
    opt.param_groups[0]["lr"].fill_(0.02)
    state = copy.deepcopy(opt.state_dict())
    assert state["ivon"]["next_train_draw"] == 3 * mc + (1 if loop == "dropin" else 0)
    assert state["ivon"]["step"] == 3
    model_state = copy.deepcopy(model.state_dict())

    other_model = _model()
    other = IVON(other_model.parameters(), **HP, backend=backend, seed=1, mc_samples=mc,
                 resample_on_step=loop == "dropin", capturable=True)
    lr_tensor, draws, taken = (other.param_groups[0]["lr"], other._draws.device,
                               other._steps._taken)
    other.load_state_dict(state)
    other_model.load_state_dict(model_state)
    assert other.param_groups[0]["lr"] is lr_tensor and lr_tensor.item() == 0.02
    assert other._draws.device is draws and other._steps._taken is taken
    assert other.current_step == 3
    for _ in range(2):
        _one_step(opt, model, x, y, loop, mc)
        _one_step(other, other_model, x, y, loop, mc)
    for a, b in zip(model.parameters(), other_model.parameters()):
        assert torch.equal(a, b)
    assert other.state_dict()["ivon"]["next_train_draw"] == opt.state_dict()["ivon"][
        "next_train_draw"]


def test_state_dict_reads_the_device_counters():
    """Graph replays advance only the device's counters; the state dict reads them there."""
    model = _model()
    opt = IVON(model.parameters(), **HP, backend="reference", seed=9, resample_on_step=True,
               capturable=True)
    x, y = _batch()
    _one_step(opt, model, x, y, "dropin", 1)
    opt._draws.device.add_(4)  # what four replays do to the counter behind the host's back
    opt._steps._taken.add_(4)
    meta = opt.state_dict()["ivon"]
    assert (meta["next_train_draw"], meta["pending_draw"], meta["step"]) == (6, 5, 5)


def test_capturable_options():
    model = _model()
    with pytest.raises(ValueError, match="capturable"):
        IVON(model.parameters(), **HP, backend="reference", rng="torch", capturable=True)
    with pytest.raises(ValueError, match="capturable"):
        IVON(model.parameters(), **HP, backend="reference", capturable=1)
    lr = torch.tensor(0.01, dtype=torch.float32)
    opt = IVON([{"params": model[0].parameters(), "lr": lr},
                {"params": model[2].parameters()}], **HP, backend="reference", capturable=True)
    assert opt.param_groups[0]["lr"] is lr            # a tensor on the params' device: kept
    assert opt.param_groups[1]["lr"].dtype == torch.float64
    assert opt.param_groups[1]["lr"].item() == HP["lr"]


# ------------------------------------------------------------------------------------------------
# GPU: a real CUDA graph
# ------------------------------------------------------------------------------------------------


def _graph_run(backend, loop, capture: bool, replays: int, warmup: int = 3, **options):
    """Train on CUDA: ``warmup`` eager steps on a side stream, then (capture) one captured step
    replayed ``replays`` times, or the same number of eager steps; LambdaLR between steps.
    Returns the params after each replay / step."""
    model = _model("cuda")
    opt = IVON(model.parameters(), **HP, backend=backend, seed=2024,
               resample_on_step=loop == "dropin", capturable=True, **options)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lambda)
    static_x, static_y = _batch("cuda")

    def step():
        if loop == "dropin":
            opt.zero_grad()
            (model(static_x) - static_y).square().mean().backward()
            opt.step()
        else:
            with opt.sampled_params(train=True):
                opt.zero_grad()
                (model(static_x) - static_y).square().mean().backward()
            opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
            sched.step()
    torch.cuda.current_stream().wait_stream(side)
    out = []
    if capture:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        for _ in range(replays):
            graph.replay()
            sched.step()
            out.append([p.detach().clone() for p in model.parameters()])
    else:
        for _ in range(replays):
            step()
            sched.step()
            out.append([p.detach().clone() for p in model.parameters()])
    torch.cuda.synchronize()
    return out, opt


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("loop", ["dropin", "official"])
def test_cuda_graph_replays_equal_eager_capturable_steps(backend, loop):
    replays = 5
    graphed, opt_graph = _graph_run(backend, loop, capture=True, replays=replays)
    eager, opt_eager = _graph_run(backend, loop, capture=False, replays=replays)
    for a, b in zip(graphed, eager):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    assert not torch.equal(graphed[0][0], graphed[1][0])  # fresh draws at every replay
    assert opt_graph.current_step == opt_eager.current_step == 3 + replays
    meta_graph, meta_eager = opt_graph.state_dict()["ivon"], opt_eager.state_dict()["ivon"]
    assert meta_graph["next_train_draw"] == meta_eager["next_train_draw"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("loop", ["dropin", "official"])
def test_cuda_graph_replays_bf16_state(backend, loop):
    """bf16 state in a CUDA graph (each backend that implements it on CUDA): the replays equal
    eager capturable steps, bf16 momentum and hess included, so every replay rounds with the
    bits of its own draw."""
    reason = backends.unavailable_reason(backend, torch.device("cuda"), torch.float32)
    if reason is not None:
        pytest.skip(reason)
    replays = 4
    graphed, opt_graph = _graph_run(backend, loop, capture=True, replays=replays,
                                    state_dtype=BF16)
    eager, opt_eager = _graph_run(backend, loop, capture=False, replays=replays,
                                  state_dtype=BF16)
    for a, b in zip(graphed, eager):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    for p, q in zip(opt_graph.param_groups[0]["params"], opt_eager.param_groups[0]["params"]):
        for key in ("momentum", "hess"):
            assert opt_graph.state[p][key].dtype == BF16
            torch.testing.assert_close(opt_graph.state[p][key], opt_eager.state[q][key],
                                       rtol=1e-6, atol=1e-7)
    assert not torch.equal(graphed[0][0], graphed[1][0])


def test_a_state_dict_keeps_the_lr_of_its_moment():
    """The group's lr is a live device tensor: the state dict holds its value at saving, so an
    in-memory state dict loaded later restores that lr, not the scheduler's current one."""
    model = _model()
    opt = IVON(model.parameters(), **HP, backend="reference", seed=9, resample_on_step=True,
               capturable=True)
    x, y = _batch()
    _one_step(opt, model, x, y, "dropin", 1)
    saved = opt.state_dict()  # no deepcopy: what torch.save would write only later
    opt.param_groups[0]["lr"].fill_(0.0125)
    _one_step(opt, model, x, y, "dropin", 1)
    assert float(saved["param_groups"][0]["lr"]) == HP["lr"]
    opt.load_state_dict(saved)
    assert float(opt.param_groups[0]["lr"]) == HP["lr"]


@pytest.mark.parametrize("train", [True, False], ids=["training_block", "evaluation_block"])
def test_an_exception_inside_a_block_gives_the_device_draw_back(train):
    """capturable=True keeps the draw counter on the device: a block that raises gives its
    draw back there too, and training then equals a run without the failed block."""
    def run(fail):
        model = _model()
        opt = IVON(model.parameters(), **HP, backend="reference", seed=9, mc_samples=2,
                   capturable=True)
        x, y = _batch()
        _one_step(opt, model, x, y, "official", 2)
        if fail:
            with pytest.raises(KeyError):
                with opt.sampled_params(train=train):
                    raise KeyError("in the user's code")
        for _ in range(2):
            _one_step(opt, model, x, y, "official", 2)
        with opt.sampled_params():   # the evaluation stream, too
            evaluated = [p.detach().clone() for p in model.parameters()]
        return [p.detach().clone() for p in model.parameters()] + evaluated

    _assert_equal_runs([run(False)], [run(True)])
