"""torch.compile with ``ivon_fast.IVON`` (Note [torch.compile] in ``ivon_fast/optimizer.py``).

1. A compiled model (``torch.compile(model)``) trained with IVON, in both loops, follows the same
   training with the eager model, compiling once.
2. A compiled training step that calls the optimizer (``step()``, ``step(closure)``,
   ``sampled_params()``, ``mean_params()``, ``zero_grad()``) runs those calls eagerly behind graph
   breaks and follows eager step by step: the draw counters advance on every call, so each step
   uses a new sample. ``fullgraph=True`` refuses such a function with Dynamo's error, before
   anything ran. (tests/test_user_paths.py section 12 has the basic case with Dynamo's 'eager'
   backend; this module adds the AOT and Inductor backends, several samples, closures,
   evaluation blocks, exceptions and every refusal.)
3. An LR scheduler changing lr on every step does not recompile a compiled training step.

Backends: the tests compile with 'aot_eager', not the default Inductor. 'aot_eager' runs what
torch.compile captures (Dynamo's graphs, the AOT-autograd forward and backward) with the same aten
ops as eager mode, so a run with it must equal the eager run bitwise, a strong check at ~1 s per
graph. Inductor works on this CPU, but its first compilation in a process with a cold on-disk
cache takes 30 to 80 s on this 2-core machine (instruction-set probes and a dozen C++ builds,
even for a 3-layer model), which alone would exceed the module's budget of ~90 s. It is tested by
test_inductor_compiled_model_trains_like_the_eager_model, which runs when IVON_FAST_TEST_INDUCTOR=1
(~10 s with a warm cache). Inductor's kernels fuse the model's pointwise ops and reduce in another
order, so its gradients differ from eager by float rounding: that run is compared within
INDUCTOR_TOLERANCE.

Expectations: the same training with the eager model / an eager step function, the noise spec
(``reference.philox_normal``, docs/DESIGN.md section 3) for the samples, and Dynamo's own frame
counter (``torch._dynamo.testing.CompileCounterWithBackend``) for compilations.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from ivon_fast import IVON, reference

from test_optimizer import HP, batch, make_model

SEED = 4321
STEPS = 4
# Inductor's kernels round the model's forward and backward differently from eager (fused
# pointwise ops, reductions in another order): ~1e-8 relative on the gradients; over STEPS IVON
# steps that stays below ~1e-7 absolute on params and state of magnitude 1e-3 to 1 (measured
# <= 6e-8). A replayed sample or a skipped draw moves them by 1e-3 or more.
INDUCTOR_TOLERANCE = dict(rtol=1e-5, atol=1e-6)

LOOPS = {  # id: (loop, mc_samples)
    "official-mc1": ("official", 1),
    "official-mc2": ("official", 2),
    "dropin-mc1": ("dropin", 1),
    "dropin-closure-mc2": ("dropin", 2),
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch (and leaves no cached frames to the next one)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _build(loop, mc=1, backend="reference"):
    model = make_model(0)
    opt = IVON(model.parameters(), **HP, mc_samples=mc, backend=backend, seed=SEED,
               resample_on_step=(loop == "dropin"))
    return model, opt


def loss_fn(model, x, y):
    return ((model(x) - y) ** 2).mean()


def _train_step(model, opt, loop, mc, loss=loss_fn, samples=None):
    """One training iteration of the given loop on the batch (x, y).

    The compiled functions take tensors, not the batch number: Dynamo would specialize on an int
    and compile again for the next one, which says nothing about the optimizer. ``loss``: the
    loss function (a compiled one for a closure, which runs inside step(), out of Dynamo).
    ``samples``: a list that gets the params inside each sampled_params(train=True) block.
    """
    def step(x, y):
        if loop == "official":
            for _ in range(mc):
                with opt.sampled_params(train=True):
                    if samples is not None:
                        samples.append(_flat(model.parameters()))
                    opt.zero_grad()
                    loss(model, x, y).backward()
            opt.step()
        elif mc == 1:
            loss(model, x, y).backward()
            opt.step()
            opt.zero_grad()
        else:
            def closure():
                opt.zero_grad()
                value = loss(model, x, y)
                value.backward()
                return value
            opt.step(closure)
    return step


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).clone() for t in tensors])


def _snapshot(model, opt) -> dict:
    """params, mean, momentum, hess (flat, param order) and the draw counters."""
    params = list(model.parameters())
    snap = {"params": _flat(params)}
    for key in ("mean", "momentum", "hess"):
        snap[key] = _flat(opt.state[p][key] for p in params)
    snap["draws"] = torch.tensor([opt._draws.next_train, opt._draws.next_eval])
    return snap


def _run(step, model, opt, steps=STEPS, start=0) -> list:
    trajectory = []
    for i in range(start, start + steps):
        step(*batch(i))
        trajectory.append(_snapshot(model, opt))
    return trajectory


def _assert_runs_equal(actual, expected, exact):
    assert len(actual) == len(expected)
    for k, (got, want) in enumerate(zip(actual, expected)):
        for name in want:
            if exact or name == "draws":
                assert torch.equal(got[name], want[name]), (
                    f"after step {k + 1}: {name} differs from eager by up to "
                    f"{(got[name] - want[name]).abs().max().item():.3g}")
            else:
                torch.testing.assert_close(
                    got[name], want[name], **INDUCTOR_TOLERANCE,
                    msg=lambda m, k=k, name=name: f"after step {k + 1}: {name}: {m}")


def _assert_consecutive_steps_differ(trajectory):
    """Every step moved the params (a replayed sample would still move them, but the tests
    comparing with eager and with the noise spec tell which sample was used)."""
    for k in range(1, len(trajectory)):
        assert not torch.equal(trajectory[k]["params"], trajectory[k - 1]["params"]), k


def _assert_dropin_params_hold_the_next_draw(trajectory, mc, exact):
    """Drop-in mode: after step k the params are the sample of training draw (k + 1) * mc around
    the new mean: mean + eps / sqrt(ess (hess + wd)), eps the spec's noise of that draw (``exact``:
    the reference backend computes it as written here; the kernels' transcendental functions may
    differ by an ulp or so)."""
    for k, snap in enumerate(trajectory):
        draw = (k + 1) * mc
        assert snap["draws"][0].item() == draw + 1
        eps = reference.philox_normal(SEED, draw, 0, snap["mean"].numel())
        sample = snap["mean"] + eps / (HP["ess"] * (snap["hess"] + HP["weight_decay"])).sqrt()
        tolerance = dict(rtol=0, atol=0) if exact else INDUCTOR_TOLERANCE
        torch.testing.assert_close(snap["params"], sample, **tolerance,
                                   msg=lambda m, k=k: f"after step {k + 1}: {m}")


def _assert_official_samples_are_the_draws(samples, initial, trajectory, mc, exact):
    """Official loop: sample j of step k (0-based) is training draw k * mc + j around the state
    before that step: mean + eps / sqrt(ess (hess + wd)), eps the spec's noise of that draw."""
    assert len(samples) == mc * len(trajectory)
    for index, sample in enumerate(samples):
        k, draw = index // mc, index
        before = initial if k == 0 else trajectory[k - 1]
        eps = reference.philox_normal(SEED, draw, 0, sample.numel())
        want = before["mean"] + eps / (HP["ess"] * (before["hess"] + HP["weight_decay"])).sqrt()
        tolerance = dict(rtol=0, atol=0) if exact else INDUCTOR_TOLERANCE
        torch.testing.assert_close(sample, want, **tolerance,
                                   msg=lambda m, k=k, draw=draw: f"step {k + 1}, draw {draw}: {m}")


def _counter(backend: str) -> CompileCounterWithBackend:
    return CompileCounterWithBackend(backend)


# ----------------------------------------------------------------------------- 1. compiled model

def _check_compiled_model(loop_id, compile_backend, optimizer_backend="reference"):
    loop, mc = LOOPS[loop_id]
    model, opt = _build(loop, mc, optimizer_backend)
    expected = _run(_train_step(model, opt, loop, mc), model, opt)

    model, opt = _build(loop, mc, optimizer_backend)
    initial = _snapshot(model, opt)
    counter = _counter(compile_backend)
    compiled_model = torch.compile(model, backend=counter)
    samples = []
    actual = _run(_train_step(compiled_model, opt, loop, mc, samples=samples), model, opt)

    exact = compile_backend == "aot_eager"
    _assert_runs_equal(actual, expected, exact)
    assert counter.frame_count == 1, f"the model compiled {counter.frame_count} times"
    _assert_consecutive_steps_differ(actual)
    # the draws themselves, from the spec (the eager run could share a bug with this one)
    spec_exact = exact and optimizer_backend == "reference"
    if loop == "dropin":
        _assert_dropin_params_hold_the_next_draw(actual, mc, spec_exact)
    else:
        _assert_official_samples_are_the_draws(samples, initial, actual, mc, spec_exact)


@pytest.mark.parametrize("loop_id,optimizer_backend", [
    ("official-mc1", "reference"), ("official-mc2", "reference"), ("dropin-mc1", "reference"),
    ("official-mc2", "auto"), ("dropin-mc1", "auto")])
def test_compiled_model_trains_like_the_eager_model(loop_id, optimizer_backend):
    """``torch.compile(model, backend='aot_eager')`` trained with IVON (the loops are eager
    code): the sample the optimizer writes in place into the params before each forward is what
    the compiled graph reads, and its gradients reach the optimizer, so params, mean, momentum,
    Hessian and the draw counters after every step equal the eager model's run bitwise; the
    model compiles once (writing samples into the params never invalidates the compiled graph);
    in the drop-in mode the params hold the spec's sample of the next draw."""
    _check_compiled_model(loop_id, "aot_eager", optimizer_backend)


@pytest.mark.skipif(os.environ.get("IVON_FAST_TEST_INDUCTOR") != "1", reason=(
    "Inductor's first compilation takes 30 to 80 s with a cold cache on a 2-core CPU; set "
    "IVON_FAST_TEST_INDUCTOR=1 to run it"))
def test_inductor_compiled_model_trains_like_the_eager_model():
    """The same with the default backend, Inductor, in both loops, within INDUCTOR_TOLERANCE.
    One test for both loops: they compile the same graphs, so the second hits Inductor's cache."""
    for loop_id in ("official-mc2", "dropin-mc1"):
        torch._dynamo.reset()
        _check_compiled_model(loop_id, "inductor")


def test_inductor_tolerance_can_tell_a_replayed_or_skipped_sample():
    """The control of INDUCTOR_TOLERANCE: training where one step reuses the previous sample (the
    failure a traced optimizer call would cause), or skips a draw, is far outside it."""
    model, opt = _build("official")
    expected = _run(_train_step(model, opt, "official", 1), model, opt)

    for fault in ("replay", "skip"):
        model, opt = _build("official")
        step = _train_step(model, opt, "official", 1)
        trajectory = []
        for i in range(STEPS):
            if i == 2:
                opt._draws.next_train += -1 if fault == "replay" else 1
            step(*batch(i))
            trajectory.append(_snapshot(model, opt))
        for name in ("params", "mean", "hess"):
            assert not torch.allclose(trajectory[-1][name], expected[-1][name],
                                      **INDUCTOR_TOLERANCE), (fault, name)


# ----------------------------------------------------------------------------- 2. compiled step

@pytest.mark.parametrize("loop_id", list(LOOPS))
def test_compiled_training_step_follows_eager_step_by_step(loop_id):
    """``torch.compile`` of the whole training step (forward, backward and the optimizer calls:
    the official loop's sampled_params(train=True) blocks with zero_grad inside and step(); the
    drop-in loop's step() and zero_grad(), or step(closure) with two samples, the closure's loss
    compiled too): the optimizer calls run eagerly behind graph breaks, so after every call the
    draw counter has advanced as in eager mode and the params and state equal the eager run's
    bitwise ('aot_eager'; Inductor's handling of the model's graphs is covered in section 1);
    nothing compiles again after the first step; each step moves the params, and in the drop-in
    mode they hold the spec's sample of the next draw."""
    loop, mc = LOOPS[loop_id]
    compile_backend = "aot_eager"
    model, opt = _build(loop, mc)
    expected = _run(_train_step(model, opt, loop, mc), model, opt)

    model, opt = _build(loop, mc)
    counter = _counter(compile_backend)
    # step(closure) runs the closure out of Dynamo: a compiled loss there is compiled on its own
    loss = torch.compile(loss_fn, backend=counter) if loop_id == "dropin-closure-mc2" else loss_fn
    compiled = torch.compile(_train_step(model, opt, loop, mc, loss), backend=counter)
    actual = _run(compiled, model, opt, steps=1)
    frames = counter.frame_count
    actual += _run(compiled, model, opt, steps=STEPS - 1, start=1)

    exact = compile_backend == "aot_eager"
    _assert_runs_equal(actual, expected, exact)
    assert frames >= 1, "nothing was compiled: the test would prove nothing"
    # Dynamo guards on what it traces: an optimizer call it traced would compile again on every
    # step for the new counter values (and fall back to eager after 8)
    assert counter.frame_count == frames, (
        f"{counter.frame_count - frames} frames compiled again after the first step")
    assert [s["draws"][0].item() for s in actual] == [
        (k + 1) * mc + (loop == "dropin") for k in range(STEPS)]
    _assert_consecutive_steps_differ(actual)
    if loop == "dropin":
        _assert_dropin_params_hold_the_next_draw(actual, mc, exact)


def test_compiled_step_with_evaluation_and_mean_blocks_follows_eager():
    """A compiled function that trains one official step, then predicts inside
    sampled_params() (an evaluation draw: its own stream) and inside mean_params(): the
    predictions, the evaluation and training draw counters, and the training trajectory equal
    eager mode's; the evaluation sample differs from the mean's prediction, and the training
    equals training without any evaluation."""
    def make(model, opt):
        train = _train_step(model, opt, "official", 1)

        def step(x, y):
            train(x, y)
            with opt.sampled_params():
                sampled = model(x)
            with opt.mean_params():
                mean = model(x)
            return sampled.detach(), mean.detach()
        return step

    def run(compiled):
        model, opt = _build("official")
        step = make(model, opt)
        if compiled:
            step = torch.compile(step, backend="aot_eager")
        outputs, trajectory = [], []
        for i in range(STEPS):
            outputs.append(step(*batch(i)))
            trajectory.append(_snapshot(model, opt))
        return outputs, trajectory

    expected_outputs, expected = run(compiled=False)
    actual_outputs, actual = run(compiled=True)
    _assert_runs_equal(actual, expected, exact=True)
    for k, ((sampled, mean), (want_sampled, want_mean)) in enumerate(
            zip(actual_outputs, expected_outputs)):
        assert torch.equal(sampled, want_sampled), f"evaluation sample of step {k + 1}"
        assert torch.equal(mean, want_mean), f"mean prediction of step {k + 1}"
        assert not torch.equal(sampled, mean)
    assert actual[-1]["draws"].tolist() == [STEPS, STEPS]
    model, opt = _build("official")
    plain = _run(_train_step(model, opt, "official", 1), model, opt)
    for name in ("params", "mean", "momentum", "hess"):
        assert torch.equal(actual[-1][name], plain[-1][name]), name


class Boom(Exception):
    pass


def test_exceptions_inside_compiled_blocks_leave_everything_as_eager_does():
    """An exception raised inside a compiled function's sampled_params(train=True) block (after
    backward) or mean_params() block leaves the params, the state and the draw counters as they
    were before the call, exactly as in eager mode, and training afterwards equals training that
    never failed."""
    def failing(model, opt):
        def function(x, y, where):
            if where == "sampled_params":
                with opt.sampled_params(train=True):
                    opt.zero_grad()
                    loss_fn(model, x, y).backward()
                    raise Boom()
            with opt.mean_params():
                loss_fn(model, x, y).backward()
                raise Boom()
        return function

    def run(compiled):
        model, opt = _build("official")
        train, fail = _train_step(model, opt, "official", 1), failing(model, opt)
        if compiled:
            train = torch.compile(train, backend="aot_eager")
            fail = torch.compile(fail, backend="aot_eager")
        trajectory = []
        for i, where in enumerate(("sampled_params", "mean_params", None)):
            train(*batch(i))
            trajectory.append(_snapshot(model, opt))
            if where is not None:
                with pytest.raises(Boom):
                    fail(*batch(i + 1), where)
                after = _snapshot(model, opt)
                for name in after:
                    assert torch.equal(after[name], trajectory[-1][name]), (compiled, where, name)
        return trajectory

    eager, compiled = run(compiled=False), run(compiled=True)
    model, opt = _build("official")
    never_failed = _run(_train_step(model, opt, "official", 1), model, opt, steps=3)
    _assert_runs_equal(compiled, eager, exact=True)
    _assert_runs_equal(compiled, never_failed, exact=True)


# which IVON method each refused call reaches (the one Dynamo names in its error)
FULLGRAPH_CALLS = {
    "step": ("dropin", "IVON.step"),
    "step(closure)": ("dropin", "IVON.step"),
    "sampled_params(train=True)": ("official", "IVON._enter_sample"),
    "sampled_params()": ("official", "IVON._enter_sample"),
    "mean_params()": ("official", "IVON._enter_mean"),
    "zero_grad": ("official", "IVON.zero_grad"),
}


def _fullgraph_function(call, model, opt):
    def closure():
        loss = loss_fn(model, *batch(0))
        loss.backward()
        return loss

    def function(x, y):
        if call == "step":
            opt.step()
        elif call == "step(closure)":
            opt.step(closure)
        elif call == "sampled_params(train=True)":
            with opt.sampled_params(train=True):
                loss_fn(model, x, y).backward()
        elif call == "sampled_params()":
            with opt.sampled_params():
                return model(x)
        elif call == "mean_params()":
            with opt.mean_params():
                return model(x)
        else:
            opt.zero_grad()
    return torch.compile(function, backend="eager", fullgraph=True)


@pytest.mark.parametrize("call", list(FULLGRAPH_CALLS))
def test_fullgraph_refuses_every_optimizer_call_before_anything_runs(call):
    """``fullgraph=True`` compilation of a function calling any optimizer method that changes
    its counters raises Dynamo's Unsupported error, which names torch.compiler.disable and the
    IVON method, at trace time: nothing ran (params, grads, state and draw counters unchanged),
    and eager training afterwards equals training that never tried."""
    loop, method = FULLGRAPH_CALLS[call]
    model, opt = _build(loop)
    loss_fn(model, *batch(0)).backward()  # a pending gradient for step() / zero_grad() to use
    before = _snapshot(model, opt)
    grads = _flat(p.grad for p in model.parameters())
    with pytest.raises(torch._dynamo.exc.Unsupported) as refusal:
        _fullgraph_function(call, model, opt)(*batch(1))
    message = str(refusal.value)
    assert "torch.compiler.disable" in message, message
    assert method in message, message
    after = _snapshot(model, opt)
    for name in before:
        assert torch.equal(after[name], before[name]), name
    assert torch.equal(_flat(p.grad for p in model.parameters()), grads)

    # eager training goes on as if nothing had been tried
    opt.zero_grad()
    continued = _run(_train_step(model, opt, loop, 1), model, opt, steps=2, start=1)
    model, opt = _build(loop)
    loss_fn(model, *batch(0)).backward()
    opt.zero_grad()
    untouched = _run(_train_step(model, opt, loop, 1), model, opt, steps=2, start=1)
    _assert_runs_equal(continued, untouched, exact=True)


@pytest.mark.parametrize("call", ["step", "sampled_params(train=True)"])
def test_fullgraph_refusal_says_why_the_call_runs_eagerly(call):
    loop, _ = FULLGRAPH_CALLS[call]
    model, opt = _build(loop)
    loss_fn(model, *batch(0)).backward()
    with pytest.raises(torch._dynamo.exc.Unsupported) as refusal:
        _fullgraph_function(call, model, opt)(*batch(1))
    assert "reason: None" not in str(refusal.value), str(refusal.value)
    assert "draw counters" in str(refusal.value), str(refusal.value)


# ----------------------------------------------------------------------------- 3. recompilation

SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7),
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1.0 + k)),
}


@pytest.mark.parametrize("loop", ["official", "dropin"])
@pytest.mark.parametrize("scheduler_name,scheduler_inside", [("StepLR", True),
                                                             ("LambdaLR", False)])
def test_lr_scheduler_changing_lr_every_step_does_not_recompile(scheduler_name, scheduler_inside,
                                                                 loop):
    """A compiled training step calling optimizer.step(), with an LR scheduler changing lr on
    every step (``scheduler.step()`` inside the compiled function, or after it): Dynamo's frame
    count after the first step stays the same over 7 more lr changes, and every step used
    its own lr: the run equals the eager one with the same schedule (bitwise: the counting
    backend runs the captured graphs as they are), and differs from a constant-lr run."""
    steps = 8

    def run(compiled, schedule=True):
        model, opt = _build(loop)
        scheduler = SCHEDULERS[scheduler_name](opt) if schedule else None
        train = _train_step(model, opt, loop, 1)

        def step(x, y):
            train(x, y)
            if scheduler_inside and scheduler is not None:
                scheduler.step()

        counter = _counter("eager")
        if compiled:
            step = torch.compile(step, backend=counter)
        lrs, frames, trajectory = [], [], []
        for i in range(steps):
            lrs.append(opt.param_groups[0]["lr"])
            step(*batch(i))
            if not scheduler_inside and scheduler is not None:
                scheduler.step()
            frames.append(counter.frame_count)
            trajectory.append(_snapshot(model, opt))
        return lrs, frames, trajectory

    lrs, frames, actual = run(compiled=True)
    assert len(set(lrs)) == steps, f"the scheduler should change lr on every step: {lrs}"
    assert frames[0] >= 1, "nothing was compiled: the test would prove nothing"
    assert frames[-1] == frames[0], (
        f"Dynamo compiled {frames[-1] - frames[0]} more frames over {steps - 1} lr changes "
        f"(frames after each step: {frames})")
    eager_lrs, _, expected = run(compiled=False)
    assert eager_lrs == lrs
    _assert_runs_equal(actual, expected, exact=True)
    _, _, constant = run(compiled=False, schedule=False)
    assert not torch.equal(actual[-1]["mean"], constant[-1]["mean"])
