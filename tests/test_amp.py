"""Mixed precision and non-finite gradients (docs/DESIGN.md section 11).

``torch.amp.GradScaler`` takes IVON's fused path: ``scaler.step(optimizer)`` sets ``grad_scale`` and
``found_inf`` on the optimizer and calls ``step()``; the kernels divide the gradients by the scale
and skip an overflowed step on the device. Without a scaler, ``skip_nonfinite`` (default True)
skips a step whose gradients are not finite.

Expectations: the same run without loss scaling (a power-of-two scale divides exactly, so bitwise
equal), the state before a skipped step (bitwise), and the reference ops called by hand
(``ivon_fast.reference``) for the step after a skip.
"""
from __future__ import annotations

import math

import pytest
import torch

from ivon_fast import IVON, _op_loop, backends, reference
from ivon_fast.scalars import StepScalars

from test_optimizer import HP, loss_fn, make_model

SCALE = 2.0 ** 12

BACKENDS = [
    "reference",
    pytest.param("cpu", marks=[pytest.mark.cpp, pytest.mark.skipif(
        backends.unavailable_reason("cpu", torch.device("cpu")) is not None,
        reason="the compiled CPU kernels are not available")]),
    pytest.param("triton", marks=[pytest.mark.triton, pytest.mark.skipif(
        backends.unavailable_reason("triton", torch.device("cpu")) is not None,
        reason="Triton is not available")]),
]


def _build(mode, backend, mc=1, hess_approx="price", dtype=torch.float32, **kwargs):
    model = make_model(0, dtype=dtype)
    opt = IVON(model.parameters(), **HP, mc_samples=mc, hess_approx=hess_approx, seed=7,
               backend=backend, resample_on_step=(mode == "dropin"), **kwargs)
    return model, opt


def _scaler():
    # growth_interval large: the scale stays SCALE unless a step overflows
    return torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=10**6)


def _iteration(model, opt, mode, i, mc=1, scaler=None, poison=None, dtype=torch.float32):
    """One training iteration; ``poison(sample_index)`` may corrupt a sample's gradient."""
    def backward(sample_index):
        loss = loss_fn(model, i, dtype)
        (loss if scaler is None else scaler.scale(loss)).backward()
        if poison is not None:
            poison(sample_index)

    if mode == "dropin":
        backward(0)
    else:
        for k in range(mc):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                backward(k)
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()
    opt.zero_grad()


def _state(model, opt):
    params = list(model.parameters())
    return ([p.detach().clone() for p in params],
            [{k: opt.state[p][k].clone() for k in ("mean", "momentum", "hess")} for p in params])


def _assert_state_equal(a, b):
    for pa, pb in zip(a[0], b[0]):
        assert torch.equal(pa, pb)
    for sa, sb in zip(a[1], b[1]):
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


def _poison_first_grad(model, value, at_sample=0):
    def poison(sample_index):
        if sample_index == at_sample:
            model.body[0].weight.grad.view(-1)[3] = value
    return poison


# ----------------------------------------------------------------------------- the scaler's path

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,mc,hess_approx", [
    ("dropin", 1, "price"), ("official", 1, "price"), ("official", 3, "price"),
    ("official", 3, "gradsq"), ("dropin", 1, "gradsq")])
def test_scaled_training_equals_unscaled_training(backend, mode, mc, hess_approx):
    """The kernels divide every sample's gradient (and the folded averages, 'gradsq' twice) by
    the scale: with a power-of-two scale that is exact, so the runs agree bit for bit."""
    runs = []
    for scaler in (None, _scaler()):
        model, opt = _build(mode, backend, mc, hess_approx)
        for i in range(4):
            _iteration(model, opt, mode, i, mc, scaler)
        runs.append(_state(model, opt))
        assert opt.current_step == 4 and opt.skipped_steps == 0
    _assert_state_equal(runs[0], runs[1])
    start = make_model(0)
    assert not torch.equal(next(start.parameters()), runs[0][0][0])


def test_ivon_declares_the_fused_amp_path_and_receives_the_scale():
    model, opt = _build("dropin", "reference")
    seen = {}
    original = _op_loop.amp_inputs

    def spy(self, with_grad, folded):
        seen["grad_scale"] = getattr(self, "grad_scale", None)
        seen["found_inf"] = getattr(self, "found_inf", None)
        return original(self, with_grad, folded)

    _op_loop.amp_inputs = spy
    try:
        _iteration(model, opt, "dropin", 0, scaler=_scaler())
    finally:
        _op_loop.amp_inputs = original
    assert IVON._step_supports_amp_scaling
    assert float(seen["grad_scale"]) == SCALE and float(seen["found_inf"]) == 0.0
    assert not hasattr(opt, "grad_scale")  # the scaler removes its attributes after the step


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,mc,at_sample", [
    ("dropin", 1, 0), ("official", 1, 0), ("official", 2, 1), ("official", 2, 0)])
def test_scaler_overflow_skips_the_step_on_the_device(backend, mode, mc, at_sample):
    """An overflow in the last sample is the scaler's found_inf; one in an earlier, folded
    sample is found by the optimizer's own check of the averages (the scaler never sees it)."""
    model, opt = _build(mode, backend, mc)
    scaler = _scaler()
    _iteration(model, opt, mode, 0, mc, scaler)
    before = _state(model, opt)
    draws_before = opt._draws.next_train
    _iteration(model, opt, mode, 1, mc, scaler,
               poison=_poison_first_grad(model, float("inf"), at_sample=at_sample))
    after = _state(model, opt)
    # mean, momentum and hess untouched; the step does not count
    for sa, sb in zip(before[1], after[1]):
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
    assert opt.current_step == 1 and opt.skipped_steps == 1
    # the scaler backs off when it saw the overflow itself
    assert scaler.get_scale() == (SCALE / 2 if at_sample == mc - 1 else SCALE)
    if mode == "official":
        _assert_state_equal(before, after)  # params hold the unchanged mean
    else:
        # the params hold the next draw's sample around the unchanged mean
        assert opt._draws.next_train == draws_before + 1
        _assert_holds_sample(model, opt, opt._draws.next_train - 1)
    # training goes on, and the step after the skip is update number 2 (debias with t = 2)
    _iteration(model, opt, mode, 2, mc, scaler)
    assert opt.current_step == 2 and opt.skipped_steps == 1


def _assert_holds_sample(model, opt, draw):
    offset = 0
    for p in model.parameters():
        state = opt.state[p]
        expected = torch.empty_like(state["mean"]).view(-1)
        reference.sample(expected, state["mean"].reshape(-1), state["hess"].reshape(-1),
                         seed=opt.seed, draw=draw, offset=offset, ess=HP["ess"],
                         weight_decay=HP["weight_decay"])
        torch.testing.assert_close(p.detach().reshape(-1), expected, rtol=1e-6, atol=1e-7)
        offset += p.numel()


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_after_a_skip_is_the_reference_update_with_the_unchanged_count(backend):
    """After a skipped step the next update uses step number t (not t + 1) for debiasing and
    the state from before the skip: computed here with the reference ops by hand."""
    model, opt = _build("official", backend)
    _iteration(model, opt, "official", 0)
    _iteration(model, opt, "official", 1, poison=_poison_first_grad(model, float("nan")))
    assert opt.current_step == 1 and opt.skipped_steps == 1
    params = list(model.parameters())
    state = {p: {k: opt.state[p][k].clone() for k in ("mean", "momentum", "hess")}
             for p in params}
    draw = opt._draws.next_train
    with opt.sampled_params(train=True):
        opt.zero_grad()
        loss_fn(model, 2).backward()
    grads = [p.grad.detach().clone() for p in params]
    opt.step()
    scalars = StepScalars.for_group(opt.param_groups[0], 2, rescale_lr=True, debias=True)
    offset = 0
    for p, grad in zip(params, grads):
        s = state[p]
        flat = [s[k].reshape(-1).clone() for k in ("mean", "momentum", "hess")]
        param_out = torch.empty_like(flat[0])
        reference.update(param_out, grad.reshape(-1), *flat, None, None, seed=opt.seed,
                         draw=draw, offset=offset, count=1, hess_approx="price",
                         scalars=scalars)
        torch.testing.assert_close(opt.state[p]["mean"].reshape(-1), flat[0], rtol=1e-6,
                                   atol=1e-7)
        torch.testing.assert_close(p.detach().reshape(-1), param_out, rtol=1e-6, atol=1e-7)
        offset += p.numel()


def test_unscale_before_step_with_folded_samples_is_a_clear_error():
    model, opt = _build("official", "reference", mc=2)
    scaler = _scaler()
    for k in range(2):
        with opt.sampled_params(train=True):
            opt.zero_grad()
            scaler.scale(loss_fn(model, 0)).backward()
    scaler.unscale_(opt)
    before = _state(model, opt)
    with pytest.raises(RuntimeError, match="unscale_"):
        scaler.step(opt)
    _assert_state_equal(before, _state(model, opt))
    assert opt.current_step == 0


@pytest.mark.parametrize("schedule_weight_decay", [False, True])
def test_unscale_then_clip_with_one_sample_equals_unscaled_clipping(schedule_weight_decay):
    """scaler.unscale_ (for gradient clipping) hands over no scale: the step reads the
    gradients the scaler already divided. A weight-decay schedule makes the step fold the
    pending sample itself (its noise needs the old value): still one unscaled sample, no error."""
    runs = []
    for scaled in (False, True):
        model, opt = _build("dropin", "reference")
        scaler = _scaler() if scaled else None
        for i in range(3):
            if schedule_weight_decay:
                opt.param_groups[0]["weight_decay"] = HP["weight_decay"] * (i + 1)
            loss = loss_fn(model, i)
            (scaler.scale(loss) if scaled else loss).backward()
            if scaled:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            if scaled:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad()
        runs.append(_state(model, opt))
    _assert_state_equal(runs[0], runs[1])


def test_fp16_params_train_with_the_scaler_and_keep_an_fp32_mean():
    """torch refuses to unscale fp16 gradients outside a fused optimizer; IVON's fused path
    takes them, and the fp32 master mean follows the fp32 run closely."""
    results = []
    for dtype, scaler in ((torch.float32, None), (torch.float16, _scaler())):
        model, opt = _build("dropin", "reference", dtype=dtype)
        for i in range(3):
            _iteration(model, opt, "dropin", i, scaler=scaler, dtype=dtype)
        assert opt.skipped_steps == 0
        results.append([opt.state[p]["mean"].clone() for p in model.parameters()])
    for mean32, mean16 in zip(*results):
        assert mean16.dtype == torch.float32
        torch.testing.assert_close(mean16, mean32, rtol=0, atol=5e-3)


# ----------------------------------------------------------------------------- without a scaler

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,mc,at_sample", [
    ("dropin", 1, 0), ("official", 1, 0), ("official", 2, 0), ("official", 2, 1)])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_gradient_skips_the_step_by_default(backend, mode, mc, at_sample, value):
    """A non-finite gradient in any sample of a step (folded or pending) never reaches mean,
    momentum or Hessian; the step is counted as skipped."""
    model, opt = _build(mode, backend, mc)
    _iteration(model, opt, mode, 0, mc)
    before = _state(model, opt)
    _iteration(model, opt, mode, 1, mc, poison=_poison_first_grad(model, value, at_sample))
    after = _state(model, opt)
    for sa, sb in zip(before[1], after[1]):
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
            assert torch.isfinite(sb[key]).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.current_step == 1 and opt.skipped_steps == 1
    _iteration(model, opt, mode, 2, mc)
    assert opt.current_step == 2 and opt.skipped_steps == 1
    assert all(torch.isfinite(opt.state[p]["mean"]).all() for p in model.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_nonfinite_false_lets_the_nan_through(backend):
    """The opt-out really removes the check (and documents what it costs)."""
    model, opt = _build("dropin", backend, skip_nonfinite=False)
    _iteration(model, opt, "dropin", 0, poison=_poison_first_grad(model, float("nan")))
    assert opt.skipped_steps == 0 and opt.current_step == 1
    assert torch.isnan(opt.state[model.body[0].weight]["mean"]).any()


def test_skip_nonfinite_must_be_a_bool():
    with pytest.raises(ValueError, match="skip_nonfinite"):
        IVON(make_model(0).parameters(), **HP, skip_nonfinite="yes")


@pytest.mark.parametrize("skip_nonfinite", [True, False])
def test_finite_training_is_the_same_with_and_without_the_check(skip_nonfinite):
    runs = []
    for check in (True, skip_nonfinite):
        model, opt = _build("dropin", "reference", skip_nonfinite=check)
        for i in range(4):
            _iteration(model, opt, "dropin", i)
        runs.append(_state(model, opt))
    _assert_state_equal(runs[0], runs[1])


def test_skipped_steps_and_step_count_survive_a_checkpoint():
    model, opt = _build("official", "reference")
    _iteration(model, opt, "official", 0)
    _iteration(model, opt, "official", 1, poison=_poison_first_grad(model, float("nan")))
    saved = opt.state_dict()
    assert saved["ivon"]["step"] == 1 and saved["ivon"]["skipped_steps"] == 1
    model2, opt2 = _build("official", "reference")
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(saved)
    assert opt2.current_step == 1 and opt2.skipped_steps == 1
    for m, o in ((model, opt), (model2, opt2)):
        _iteration(m, o, "official", 2)
    _assert_state_equal(_state(model, opt), _state(model2, opt2))


# ----------------------------------------------------------------------------- no host sync

class _NoSync:
    """Make every host read of a tensor's value an error (a CPU stand-in for
    ``torch.cuda.set_sync_debug_mode('error')``)."""

    NAMES = ("item", "__bool__", "__float__", "__int__", "tolist", "__index__")

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in self.NAMES}

        def refuse(*args, **kwargs):
            raise AssertionError("a host synchronization inside step()")
        for name in self.NAMES:
            setattr(torch.Tensor, name, refuse)

    def __exit__(self, *exc):
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("mode,mc", [("dropin", 1), ("official", 2)])
@pytest.mark.parametrize("scaled", [False, True])
def test_step_reads_no_tensor_value_on_the_host(mode, mc, scaled):
    model, opt = _build(mode, "reference", mc)
    scaler = _scaler() if scaled else None
    for i in range(2):
        if mode == "dropin":
            loss = loss_fn(model, i)
            (loss if scaler is None else scaler.scale(loss)).backward()
        else:
            for _ in range(mc):
                with opt.sampled_params(train=True):
                    opt.zero_grad()
                    loss = loss_fn(model, i)
                    (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is None:
            with _NoSync():
                opt.step()
        else:
            # the scaler's own step is sync-free too; its update() is not ours to judge
            with _NoSync():
                scaler.step(opt)
            scaler.update()
        opt.zero_grad()
    assert opt.current_step == 2


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["dropin", "official"])
def test_cuda_step_with_scaler_does_not_synchronize(mode):
    model = make_model(0).cuda()
    opt = IVON(model.parameters(), **HP, seed=7, resample_on_step=(mode == "dropin"))
    scaler = torch.amp.GradScaler("cuda", init_scale=SCALE)
    x = torch.randn(16, 4, device="cuda")
    for _ in range(3):
        if mode == "dropin":
            scaler.scale(model(x).square().mean()).backward()
        else:
            with opt.sampled_params(train=True):
                opt.zero_grad()
                scaler.scale(model(x).square().mean()).backward()
        torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.step(opt)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        scaler.update()
        opt.zero_grad()
    assert opt.current_step == 3 and math.isfinite(float(next(model.parameters()).sum()))


def test_a_failed_step_inside_scaler_step_leaves_no_scale_behind():
    """torch's GradScaler removes grad_scale / found_inf only when step() returns; after a step
    that raised, the next scaler.step() must not hand over the scale squared."""
    runs = []
    for fail_once in (False, True):
        model, opt = _build("dropin", "reference")
        scaler = _scaler()
        for i in range(3):
            scaler.scale(loss_fn(model, i)).backward()
            if fail_once and i == 1:
                opt.param_groups[0]["beta1"] = 1.0  # out of range: step() refuses
                with pytest.raises(ValueError, match="beta1"):
                    scaler.step(opt)
                assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
                opt.param_groups[0]["beta1"] = HP["beta1"]  # fixed: the same step again
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        runs.append(_state(model, opt))
    _assert_state_equal(runs[0], runs[1])


def test_scaler_without_any_gradient_hands_an_int_found_inf_and_changes_nothing():
    """With every .grad None the scaler hands over found_inf as the int 0. Drop-in: no gradient
    arrived, so the step does nothing, as without a scaler (Note [a step without a gradient]).
    Official loop, the sample scaled and folded in by zero_grad() before the grads were dropped:
    the step reads the int and equals the step of a run with every gradient divided by hand."""
    for mode in ("dropin", "official"):
        runs = []
        for scaler in (None, _scaler()):
            model, opt = _build(mode, "reference")
            if mode == "official":
                with opt.sampled_params(train=True):
                    opt.zero_grad()
                    loss = loss_fn(model, 0)
                    (loss if scaler is None else scaler.scale(loss)).backward()
                    if scaler is None:   # the scale, divided out by hand
                        for p in model.parameters():
                            p.grad.mul_(SCALE).div_(SCALE)
                opt.zero_grad()   # folds the sample in
            for p in model.parameters():
                p.grad = None
            if scaler is None:
                opt.step()
            else:
                scaler.scale(loss_fn(model, 0))  # the scaler's scale exists from here on
                scaler.step(opt)
            runs.append(_state(model, opt))
        _assert_state_equal(runs[0], runs[1])


@pytest.mark.parametrize("mc", [1, 2])
def test_freezing_a_layer_after_a_nan_step_does_not_skip_the_later_steps(mc):
    """A frozen param's gradient and averages are zeroed: the check reads whole buffers."""
    model, opt = _build("official", "reference", mc)
    _iteration(model, opt, "official", 0, mc,
               poison=_poison_first_grad(model, float("nan"), at_sample=0))
    assert opt.skipped_steps == 1
    model.body[0].weight.requires_grad_(False)
    for i in range(1, 4):
        _iteration(model, opt, "official", i, mc)
    assert opt.skipped_steps == 1 and opt.current_step == 3
