"""Paths users really take, each of which once gave silently wrong results (issue 7's review).

Expectations come from ivon-opt itself (bitwise, rng='torch'), from the explicit reference
simulator of test_optimizer, from an uninterrupted or differently built run, or from the noise
spec (reference.philox_normal) directly.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn

import ivon
from ivon_fast import IVON, reference
from ivon_fast.noise import EVAL_DRAW_BASE
from ivon_fast.scalars import StepScalars

from test_optimizer import (HP, SEED, Simulator, assert_params_equal, assert_same_run,
                            assert_state_dicts_equal, batch, build, dropin_iter, load_checkpoint,
                            loss_fn, make_model, normalized_noise, snapshot, train)

ESS, WD = HP["ess"], HP["weight_decay"]


def _single_group_spec(model):
    return [([n for n, _ in model.named_parameters()], dict(HP))]


# ----------------------------------------------------------------------------- 1. zero_grad anywhere

def _ivon_opt_run(optimizer_class, clear, mc, steps=4, **kwargs):
    """The official loop with the gradients cleared in one of the ways users clear them."""
    model = make_model(3)
    torch.manual_seed(11)
    opt = optimizer_class(model.parameters(), **HP, mc_samples=mc, **kwargs)
    for i in range(steps):
        for _ in range(mc):
            if clear == "opt_before":
                opt.zero_grad()
            elif clear == "model_before_none":
                model.zero_grad(set_to_none=True)
            elif clear == "model_before_zero":
                model.zero_grad(set_to_none=False)
            with opt.sampled_params(train=True):
                if clear == "opt_inside":
                    opt.zero_grad()
                elif clear == "model_inside":
                    model.zero_grad()
                loss_fn(model, i).backward()
        opt.step()
    return model


@pytest.mark.parametrize("mc", [1, 2, 3])
@pytest.mark.parametrize("clear", ["opt_inside", "model_inside", "opt_before", "model_before_none",
                                   "model_before_zero"])
def test_clearing_grads_anywhere_equals_ivon_opt_bitwise(clear, mc):
    expected = _ivon_opt_run(ivon.IVON, "opt_inside", mc)
    actual = _ivon_opt_run(IVON, clear, mc, backend="reference", rng="torch")
    initial = make_model(3)
    for want, got, start in zip(expected.parameters(), actual.parameters(), initial.parameters()):
        assert not torch.equal(want, start)
        assert torch.equal(want, got)


def test_a_sample_beyond_mc_samples_after_clearing_grads_is_an_error():
    model, opt = build("official", mc=1)
    with opt.sampled_params(train=True):
        loss_fn(model, 0).backward()
    model.zero_grad(set_to_none=False)
    before = opt.state_dict()
    with pytest.raises(RuntimeError, match="mc_samples"):
        with opt.sampled_params(train=True):
            loss_fn(model, 0).backward()
    assert_state_dicts_equal(before, opt.state_dict())


def test_optimizer_zero_grad_between_blocks_keeps_the_pending_sample():
    """Beyond mc_samples, clearing through the optimizer folds the sample in first: no error."""
    model_a, opt_a = build("official", mc=1)
    model_b, opt_b = build("official", mc=2)
    for model, opt in ((model_a, opt_a), (model_b, opt_b)):
        for _ in range(2):
            opt.zero_grad()
            with opt.sampled_params(train=True):
                loss_fn(model, 0).backward()
        opt.step()
    assert_same_run(model_a, opt_a, model_b, opt_b)


# ----------------------------------------------------------------------------- 2. resume across backends

def _kernel_backends():
    from ivon_fast import backends
    return [name for name in ("cpu", "triton")
            if backends.unavailable_reason(name, torch.device("cpu")) is None]


@pytest.mark.parametrize("model_first", [True, False], ids=["model_then_opt", "opt_then_model"])
@pytest.mark.parametrize("pair", [("cpu", "reference"), ("reference", "cpu"), ("cpu", "triton"),
                                  ("reference", "triton")],
                         ids=lambda p: f"{p[0]}->{p[1]}")
def test_dropin_resume_across_backends_keeps_the_mean(pair, model_first):
    saver, loader = pair
    if any(name != "reference" and name not in _kernel_backends() for name in pair):
        pytest.skip(f"backend {pair} not available here")

    def make(backend, model_seed=0):
        model = make_model(model_seed)
        return model, IVON(model.parameters(), **HP, backend=backend, seed=SEED,
                           resample_on_step=True)

    model_a, opt_a = make(saver)
    for i in range(3):
        dropin_iter(model_a, opt_a, i)
    saved = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, saved)
    assert opt_a.state_dict()["ivon"]["params_hold"] == opt_a._pending_draw
    for i in range(3, 6):
        dropin_iter(model_a, opt_a, i)

    model_b, opt_b = make(loader, model_seed=9)
    saved.seek(0)
    checkpoint = torch.load(saved)
    load_checkpoint(model_b, opt_b, checkpoint, model_first)
    for i in range(3, 6):
        dropin_iter(model_b, opt_b, i)
    # the backends round differently by an ulp here and there; a mean replaced by a sample would
    # be off by about one posterior standard deviation (0.1 here)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        for key in ("mean", "momentum", "hess"):
            torch.testing.assert_close(opt_b.state[pb][key], opt_a.state[pa][key],
                                       rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)


def test_official_bf16_resume_keeps_the_fp32_master_mean():
    """A bf16 model checkpoint holds the rounded mean; loading it after the optimizer's state
    must not replace the fp32 master mean by its rounding."""
    def make():
        model = make_model(0, dtype=torch.bfloat16)
        return model, IVON(model.parameters(), **HP, backend="reference", seed=SEED)

    def run(model, opt, start, n):
        for i in range(start, start + n):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                loss_fn(model, i, torch.bfloat16).backward()
            opt.step()

    model_a, opt_a = make()
    run(model_a, opt_a, 0, 3)
    checkpoint = {"model": {k: v.clone() for k, v in model_a.state_dict().items()},
                  "opt": opt_a.state_dict()}
    run(model_a, opt_a, 3, 2)
    model_b, opt_b = make()
    opt_b.load_state_dict(checkpoint["opt"])
    model_b.load_state_dict(checkpoint["model"])
    run(model_b, opt_b, 3, 2)
    means = [opt_a.state[p]["mean"] for p in model_a.parameters()]
    assert any(not torch.equal(m, m.bfloat16().float()) for m in means)  # not trivially equal
    assert_same_run(model_a, opt_a, model_b, opt_b)


# ----------------------------------------------------------------------------- 3. empty params

def test_empty_parameter_list_is_a_value_error():
    with pytest.raises(ValueError, match="empty parameter list"):
        IVON([], **HP)
    model = make_model(0)
    params = model.parameters()
    list(params)   # consumed
    with pytest.raises(ValueError, match="empty parameter list"):
        IVON(params, **HP)
    with pytest.raises(ValueError, match="empty parameter list"):
        IVON([{"params": []}], **HP)


# ----------------------------------------------------------------------------- 4. meta init, moves

def test_built_on_meta_then_materialized_is_a_clear_error():
    with torch.device("meta"):
        model = nn.Linear(4, 3)
    opt = IVON(model.parameters(), **HP)
    model.to_empty(device="cpu")
    model.reset_parameters()
    model(torch.randn(2, 4)).sum().backward()
    for call in (opt.step, opt.state_dict, lambda: opt.sampled_params().__enter__(),
                 lambda: opt.mean_params().__enter__()):
        with pytest.raises(RuntimeError, match="meta device"):
            call()


def test_to_empty_and_reinit_on_the_same_device_trains_as_if_built_on_the_new_weights():
    def reinit(model):
        torch.manual_seed(21)
        for module in model.body:
            if isinstance(module, nn.Linear):
                module.reset_parameters()

    model_a = make_model(0)
    opt_a = IVON(model_a.parameters(), **HP, backend="reference", seed=SEED)
    model_a.to_empty(device="cpu")
    reinit(model_a)
    with torch.no_grad():
        model_a.scale.fill_(0.5)
        model_a.odd.normal_(generator=torch.Generator().manual_seed(3))
    train(model_a, opt_a, "official", 0, 3)

    model_b = make_model(0)
    reinit(model_b)
    with torch.no_grad():
        model_b.scale.fill_(0.5)
        model_b.odd.normal_(generator=torch.Generator().manual_seed(3))
    opt_b = IVON(model_b.parameters(), **HP, backend="reference", seed=SEED)
    train(model_b, opt_b, "official", 0, 3)
    assert_same_run(model_a, opt_a, model_b, opt_b)


@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_model_to_float64_after_construction_moves_the_state(mode):
    model_a, opt_a = build(mode)
    train(model_a, opt_a, mode, 0, 2)
    saved = opt_a.state_dict()
    with opt_a.mean_params():
        weights = {k: v.clone() for k, v in model_a.state_dict().items()}
    model_a.double()
    train_double(model_a, opt_a, mode)

    # expectation: an optimizer built on a float64 model and loaded with the same state
    model_b = make_model(0)
    model_b.load_state_dict(weights)
    model_b.double()
    opt_b = IVON(model_b.parameters(), **HP, backend="reference", seed=opt_a.seed,
                 resample_on_step=(mode == "dropin"))
    opt_b.load_state_dict(saved)
    train_double(model_b, opt_b, mode)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert pa.dtype == torch.float64 and opt_a.state[pa]["mean"].dtype == torch.float64
    if mode == "official":
        assert_same_run(model_a, opt_a, model_b, opt_b)
    else:   # model_a's first backward after the move ran at the fp32 sample, model_b's at fp64
        for pa, pb in zip(model_a.parameters(), model_b.parameters()):
            for key in ("mean", "momentum", "hess"):
                torch.testing.assert_close(opt_a.state[pa][key], opt_b.state[pb][key],
                                           rtol=1e-6, atol=1e-7)


def train_double(model, opt, mode):
    for i in range(2, 4):
        x, y = batch(i, torch.float64)
        if mode == "official":
            with opt.sampled_params(train=True):
                opt.zero_grad()
                ((model(x) - y) ** 2).mean().backward()
            opt.step()
        else:
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()


def test_model_half_keeps_the_fp32_master_mean_and_trains():
    model, opt = build("official")
    train(model, opt, "official", 0, 2)
    mean_before = {n: opt.state[p]["mean"].clone() for n, p in model.named_parameters()}
    model.half()
    with opt.mean_params():
        pass
    for name, param in model.named_parameters():
        state = opt.state[param]
        assert param.dtype == torch.float16 and state["mean"].dtype == torch.float32
        assert torch.equal(state["mean"], mean_before[name])      # not rounded to fp16
        assert torch.equal(param, mean_before[name].half())
    x, y = batch(2, torch.float16)
    with opt.sampled_params(train=True):
        opt.zero_grad()
        ((model(x) - y) ** 2).float().mean().backward()
    opt.step()
    assert any(not torch.equal(opt.state[p]["mean"], mean_before[n])
               for n, p in model.named_parameters())


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_model_to_cuda_after_construction_follows(mode):
    model_a, opt_a = build(mode)
    train(model_a, opt_a, mode, 0, 2)
    model_b, opt_b = build(mode)
    train(model_b, opt_b, mode, 0, 2)
    model_b.cuda()
    for i in range(2, 4):
        x, y = (t.cuda() for t in batch(i))
        if mode == "official":
            with opt_b.sampled_params(train=True):
                opt_b.zero_grad()
                ((model_b(x) - y) ** 2).mean().backward()
            opt_b.step()
        else:
            ((model_b(x) - y) ** 2).mean().backward()
            opt_b.step()
            opt_b.zero_grad()
    train(model_a, opt_a, mode, 2, 2)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert pb.is_cuda and opt_b.state[pb]["mean"].is_cuda
        torch.testing.assert_close(pb.cpu(), pa, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- 5. writes in blocks

@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_writes_inside_mean_params_become_the_mean(mode):
    model, opt = build(mode)
    train(model, opt, mode, 0, 2)
    new_weights = make_model(7).state_dict()
    with opt.mean_params():
        model.load_state_dict(new_weights)
    for name, param in model.named_parameters():
        assert torch.equal(opt.state[param]["mean"], new_weights[name])
        if mode == "official":
            assert torch.equal(param, new_weights[name])
    # the next sample is drawn around the new mean
    if mode == "dropin":
        w = model.body[0].weight
        state = opt.state[w]
        z = normalized_noise(w, state["mean"], state["hess"], ESS, WD)
        assert z.abs().max() < 6 and z.std() > 0.5


def test_an_exception_inside_mean_params_discards_its_writes():
    model, opt = build("official")
    train(model, opt, "official", 0, 2)
    before, state = snapshot(model), opt.state_dict()
    with pytest.raises(KeyError):
        with opt.mean_params():
            with torch.no_grad():
                model.body[0].weight.add_(1.0)
            model.body[0].bias.data = torch.zeros(8)
            raise KeyError("user code failed")
    assert_params_equal(model, before)
    assert_state_dicts_equal(state, opt.state_dict())
    bias, bucket = model.body[0].bias, opt._layout.buckets[0]
    index = next(i for i, p in enumerate(bucket.params) if p is bias)
    assert bias.data_ptr() == bucket.expected_ptrs()[0][index]  # back in its place


@pytest.mark.parametrize("train_block", [True, False])
def test_writes_inside_sampled_params_are_an_error_and_change_nothing(train_block):
    model, opt = build("official")
    train(model, opt, "official", 0, 2)
    before, state = snapshot(model), opt.state_dict()
    with pytest.raises(RuntimeError, match="written inside sampled_params"):
        with opt.sampled_params(train=train_block):
            model.load_state_dict(make_model(7).state_dict())
    assert_params_equal(model, before)
    assert_state_dicts_equal(state, opt.state_dict())


# ----------------------------------------------------------------------------- 6. channels_last

def test_channels_last_params_keep_their_memory_format_and_draw_noise_in_storage_order():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    head = nn.Linear(4, 2)
    params = [conv.weight, conv.bias, *head.parameters()]
    opt = IVON(params, **HP, backend="reference", seed=SEED, resample_on_step=True)
    weight = conv.weight
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert not weight.is_contiguous()
    # the params hold the sample of draw 0; element i of the flat (storage) order has noise i
    state = opt.state[weight]
    z = normalized_noise(weight, state["mean"], state["hess"], ESS, WD)
    in_storage_order = z.permute(0, 2, 3, 1).reshape(-1)
    expected = reference.philox_normal(SEED, 0, 0, weight.numel()).double()
    torch.testing.assert_close(in_storage_order, expected, rtol=1e-4, atol=1e-5)
    x = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)
    for _ in range(2):
        head(conv(x).mean((2, 3))).pow(2).sum().backward()
        grad_ptr = weight.grad.data_ptr()
        opt.step()
        opt.zero_grad()
        assert weight.grad.data_ptr() == grad_ptr   # autograd accumulated into the buffer
        assert weight.is_contiguous(memory_format=torch.channels_last)
        assert weight.grad.is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- 7. beta1 = 1

@pytest.mark.parametrize("bad", [dict(beta1=1.0), dict(beta1=1.5), dict(ess=0.0),
                                 dict(hess_init=0.0), dict(clip_radius=0.0)])
def test_values_that_divide_by_zero_are_rejected(bad):
    model = make_model(0)
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        IVON(model.parameters(), **{**HP, **bad})
    with pytest.raises(ValueError, match=name):
        IVON([{"params": list(model.parameters()), **bad}], **HP)


# ----------------------------------------------------------------------------- evaluation draws

@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_evaluation_noise_is_its_own_stream(mode):
    model, opt = build(mode)
    w = model.body[0].weight
    params = list(model.parameters())
    offset = sum(p.numel() for p in params[:next(i for i, p in enumerate(params) if p is w)])
    for k in range(2):
        with opt.sampled_params():
            state = opt.state[w]
            z = normalized_noise(w, state["mean"], state["hess"], ESS, WD).reshape(-1)
        want = reference.philox_normal(opt.seed, EVAL_DRAW_BASE + k, offset, w.numel()).double()
        torch.testing.assert_close(z, want, rtol=1e-4, atol=1e-5)
        train_noise = reference.philox_normal(opt.seed, k, offset, w.numel()).double()
        assert (z - train_noise).abs().max() > 0.5


# ----------------------------------------------------------------------------- 12. torch.compile

@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_compiled_training_step_follows_eager(mode):
    torch._dynamo.reset()

    def make_step(model, opt):
        def step(i):
            if mode == "official":
                with opt.sampled_params(train=True):
                    opt.zero_grad()
                    loss_fn(model, i).backward()
                opt.step()
            else:
                loss_fn(model, i).backward()
                opt.step()
                opt.zero_grad()
        return step

    model_a, opt_a = build(mode)
    eager = make_step(model_a, opt_a)
    model_b, opt_b = build(mode)
    compiled = torch.compile(make_step(model_b, opt_b), backend="eager")
    for i in range(4):
        eager(i)
        compiled(i)
    assert opt_b._draws.next_train == opt_a._draws.next_train == (4 if mode == "official" else 5)
    assert_same_run(model_a, opt_a, model_b, opt_b)


def test_fullgraph_compile_of_step_refuses_loudly():
    torch._dynamo.reset()
    model, opt = build("dropin")

    @torch.compile(backend="eager", fullgraph=True)
    def step():
        opt.step()

    loss_fn(model, 0).backward()
    # the refusal names the reason: step() is opaque to Dynamo by design (Note [torch.compile])
    with pytest.raises(Exception, match=r"torch\.compiler\.disable"):
        step()


# ----------------------------------------------------------------------------- 13. closures

@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_do_nothing_closure_after_a_manual_backward_equals_a_plain_step(mode):
    """PyTorch Lightning's manual optimization: backward by the user, then step(closure) with a
    closure that returns None and computes nothing."""
    def run(with_closure):
        model, opt = build(mode)
        for i in range(3):
            if mode == "official":
                with opt.sampled_params(train=True):
                    opt.zero_grad()
                    loss_fn(model, i).backward()
            else:
                loss_fn(model, i).backward()
            result = opt.step(lambda: None) if with_closure else opt.step()
            assert result is None
            opt.zero_grad()
        return model, opt

    model_a, opt_a = run(False)
    model_b, opt_b = run(True)
    assert_same_run(model_a, opt_a, model_b, opt_b)


@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_closure_that_returns_none_after_backward_trains_like_one_that_returns_the_loss(mode):
    def run(returns_loss):
        model, opt = build(mode)
        for i in range(3):
            def closure():
                opt.zero_grad()
                loss = loss_fn(model, i)
                loss.backward()
                return loss if returns_loss else None
            result = opt.step(closure)
            assert (result is None) != returns_loss
        return model, opt

    model_a, opt_a = run(True)
    model_b, opt_b = run(False)
    assert_same_run(model_a, opt_a, model_b, opt_b)
    sim_model = make_model(0)
    assert any(not torch.equal(p, q) for p, q in zip(model_a.parameters(), sim_model.parameters()))


@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_a_failure_after_the_closures_leaves_everything_as_it_was(mode):
    model, opt = build(mode, mc=2)
    train(model, opt, mode, 0, 1) if mode == "official" else None
    before, state = snapshot(model), opt.state_dict()

    def closure():
        opt.zero_grad()
        loss_fn(model, 0).backward()
        return "not a number"      # averaging the losses fails after both samples

    with pytest.raises(TypeError):
        opt.step(closure)
    assert_params_equal(model, before)
    assert_state_dicts_equal(state, opt.state_dict())


def test_dropin_simulator_with_model_zero_grad_set_to_none():
    """zero_grad(set_to_none=True) on the model drops the grad views; the step must still read
    the new gradients (against the explicit reference computation)."""
    model = make_model(0)
    spec = _single_group_spec(model)
    sim = Simulator(make_model(0), spec, "dropin", SEED)
    opt = IVON(model.parameters(), **HP, backend="reference", seed=SEED, resample_on_step=True)
    for i in range(4):
        loss_fn(model, i).backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        sim.step(i)
        sim.assert_matches(model, opt)


# ----------------------------------------------------------------------------- state-dict hooks

def test_torch_state_dict_hooks_are_honoured():
    model, opt = build("official")
    train(model, opt, "official", 0, 2)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("save-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    state = opt.state_dict()
    assert calls == ["save-pre"] and state["extra"] == 1

    model_b, opt_b = build("official", model_seed=4)

    def drop_extra(o, sd):
        calls.append("load-pre")
        return {k: v for k, v in sd.items() if k != "extra"}

    opt_b.register_load_state_dict_pre_hook(drop_extra)
    opt_b.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    opt_b.load_state_dict(state)
    assert calls == ["save-pre", "load-pre", "load-post"]
    for p, q in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(opt_b.state[q]["mean"], opt.state[p]["mean"])


def test_add_param_group_between_a_block_and_step_with_torch_noise():
    """rng='torch' draws per group; a group added while a sample is pending draws its own noise
    for that sample, after the existing groups', so theirs is unchanged."""
    def run(add):
        model = make_model(0)
        torch.manual_seed(5)
        opt = IVON(model.parameters(), **HP, backend="reference", rng="torch")
        extra = nn.Parameter(torch.ones(3))
        with opt.sampled_params(train=True):
            opt.zero_grad()
            loss_fn(model, 0).backward()
        if add:
            opt.add_param_group({"params": [extra]})
        opt.step()
        return model, opt, extra

    model_a, opt_a, _ = run(add=False)
    model_b, opt_b, extra = run(add=True)
    assert_same_run(model_a, opt_a, model_b, opt_b)
    assert not torch.equal(opt_b.state[extra]["hess"], torch.ones(3))  # the new group updated


# ----------------------------------------------------------------------------- review findings

def _run_with_projection(mode, project, steps=6):
    model, opt = build(mode)
    for i in range(steps):
        train(model, opt, mode, i, 1)
        with torch.no_grad():
            for p in model.parameters():
                project(p)
    return model, opt


@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_a_write_that_changes_nothing_changes_nothing(mode):
    """A projection after step() that changes no value (clamp to +-100) must not turn the sample
    (drop-in) or the rounded mean into the mean."""
    model_a, opt_a = _run_with_projection(mode, lambda p: p.clamp_(-100.0, 100.0))
    model_b, opt_b = _run_with_projection(mode, lambda p: None)
    assert_same_run(model_a, opt_a, model_b, opt_b)


@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_a_projection_moves_exactly_the_elements_it_changed(mode):
    model, opt = build(mode)
    train(model, opt, mode, 0, 2)
    w = model.body[0].weight
    state = opt.state[w]
    mean_before, held = state["mean"].clone(), w.detach().clone()
    with torch.no_grad():
        w.clamp_(min=0.0)
    opt.state_dict()   # any optimizer call catches up with the write
    changed = held < 0
    assert changed.any() and (~changed).any()
    assert torch.equal(state["mean"][changed], torch.zeros_like(state["mean"][changed]))
    assert torch.equal(state["mean"][~changed], mean_before[~changed])


def test_bf16_write_that_changes_nothing_keeps_the_fp32_master_mean():
    model = make_model(0, dtype=torch.bfloat16)
    opt = IVON(model.parameters(), **HP, backend="reference", seed=SEED)
    x, y = batch(0, torch.bfloat16)
    with opt.sampled_params(train=True):
        ((model(x) - y) ** 2).mean().backward()
    opt.step()
    means = [opt.state[p]["mean"].clone() for p in model.parameters()]
    assert any(not torch.equal(m, m.bfloat16().float()) for m in means)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.0)
    opt.state_dict()
    for p, m in zip(model.parameters(), means):
        assert torch.equal(opt.state[p]["mean"], m)


@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_share_memory_after_construction_changes_nothing(mode):
    model_a, opt_a = build(mode)
    model_b, opt_b = build(mode)
    train(model_a, opt_a, mode, 0, 2)
    train(model_b, opt_b, mode, 0, 2)
    model_b.share_memory()
    train(model_a, opt_a, mode, 2, 3)
    train(model_b, opt_b, mode, 2, 3)
    assert_same_run(model_a, opt_a, model_b, opt_b)


def test_a_new_memory_format_after_construction_is_a_clear_error():
    conv = nn.Conv2d(3, 4, 3)
    opt = IVON(conv.parameters(), **HP, backend="reference")
    before = snapshot(conv)
    conv.to(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="memory layout"):
        opt.state_dict()
    assert_params_equal(conv, before)


@pytest.mark.parametrize("conversion", ["double", "bfloat16"])
@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_swapping_conversion_moves_the_state_like_the_default_one(mode, conversion):
    def run(swap):
        model, opt = build(mode)
        train(model, opt, mode, 0, 2)
        torch.__future__.set_swap_module_params_on_conversion(swap)
        try:
            getattr(model, conversion)()
        finally:
            torch.__future__.set_swap_module_params_on_conversion(False)
        with opt.mean_params():
            pass
        return [opt.state[p]["mean"].clone() for p in model.parameters()]

    for swapped, default in zip(run(True), run(False)):
        assert torch.equal(swapped, default)


@pytest.mark.parametrize("frozen_at_construction", [True, False])
@pytest.mark.parametrize("grads_dropped", [False, True], ids=["grads_kept", "grads_dropped"])
def test_unfreezing_in_dropin_mode_keeps_the_first_gradient(frozen_at_construction,
                                                            grads_dropped):
    """grads_dropped: model.zero_grad(set_to_none=True) while frozen, so the first backward
    after unfreezing hands the param a gradient tensor of its own."""
    model = make_model(0)
    w = model.body[0].weight
    if frozen_at_construction:   # then w.grad is None until the first backward after unfreezing
        w.requires_grad_(False)
    torch.manual_seed(1)
    opt = IVON(model.parameters(), **HP, backend="reference", resample_on_step=True)
    w.requires_grad_(False)
    train(model, opt, "dropin", 0, 2)
    if grads_dropped:
        model.zero_grad(set_to_none=True)
    w.requires_grad_(True)
    loss_fn(model, 2).backward()
    # frozen at construction, it has no state until it first trains (it starts from zero)
    assert ("momentum" in opt.state.get(w, {})) is not frozen_at_construction
    momentum = opt.state[w]["momentum"].clone() if "momentum" in opt.state.get(w, {}) \
        else torch.zeros_like(w)
    grad = w.grad.detach().clone()
    assert grad.abs().max() > 0
    opt.step()
    expected = HP["beta1"] * momentum + (1 - HP["beta1"]) * grad
    torch.testing.assert_close(opt.state[w]["momentum"], expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("block", ["eval", "train"])
def test_optimizer_state_dict_inside_a_sample_block_is_refused(block):
    model, opt = build("official")
    train(model, opt, "official", 0, 1)
    context = {"eval": lambda: opt.sampled_params(),
               "train": lambda: opt.sampled_params(train=True)}[block]
    with context():
        with pytest.raises(RuntimeError, match="state_dict"):
            opt.state_dict()


@pytest.mark.parametrize("mode", ["official", "dropin"])
@pytest.mark.parametrize("model_first", [True, False], ids=["model_then_opt", "opt_then_model"])
def test_checkpoint_saved_inside_mean_params_holds_the_mean_and_resumes_exactly(mode,
                                                                                model_first):
    """What the HF and Lightning callbacks do: save model and optimizer while the params hold
    the mean. The model file is the mean; the pair resumes the uninterrupted run bitwise."""
    model_a, opt_a = build(mode)
    train(model_a, opt_a, mode, 0, 3)
    with opt_a.mean_params():
        checkpoint = copy.deepcopy({"model": model_a.state_dict(), "opt": opt_a.state_dict()})
        posterior = opt_a.posterior()
    for name, param in model_a.named_parameters():
        assert torch.equal(checkpoint["model"][name], opt_a.state[param]["mean"])
    assert all(torch.equal(m, opt_a.state[p]["mean"])
               for m, p in zip(posterior.mean, model_a.parameters()))
    train(model_a, opt_a, mode, 3, 2)

    model_b, opt_b = build(mode, model_seed=5, opt_seed=99)
    load_checkpoint(model_b, opt_b, checkpoint, model_first)
    if mode == "dropin" and not model_first:
        # the model now holds the mean, not the sample the state records: a gradient taken
        # there is refused, and the next one (the optimizer rewrote the sample) is right
        loss_fn(model_b, 3).backward()
        with pytest.raises(RuntimeError, match="load the model's state dict before"):
            opt_b.step()
        opt_b.zero_grad()
    train(model_b, opt_b, mode, 3, 2)
    assert_same_run(model_a, opt_a, model_b, opt_b)


def test_an_optimizer_call_after_the_late_model_load_rewrites_the_sample():
    """The refusal above is about a gradient taken before the optimizer rewrote the sample: an
    optimizer call between the late model load and the forward (here an evaluation block)
    rewrites it, and training continues exactly. (A model file that holds the sample loads in
    either order: test_drop_in_resume_in_either_load_order.)"""
    model_a, opt_a = build("dropin")
    train(model_a, opt_a, "dropin", 0, 3)
    with opt_a.mean_params():
        at_mean = copy.deepcopy({"model": model_a.state_dict(), "opt": opt_a.state_dict()})
    train(model_a, opt_a, "dropin", 3, 2)
    model_b, opt_b = build("dropin", model_seed=5, opt_seed=99)
    load_checkpoint(model_b, opt_b, at_mean, model_first=False)
    with opt_b.mean_params():  # an optimizer call before the forward: the sample is back
        pass
    train(model_b, opt_b, "dropin", 3, 2)
    assert_same_run(model_a, opt_a, model_b, opt_b)


def test_model_zero_grad_to_none_between_the_block_and_step_is_an_error():
    model, opt = build("official")
    with opt.sampled_params(train=True):
        loss_fn(model, 0).backward()
    model.zero_grad(set_to_none=True)
    before = snapshot(model)
    names = ("mean", "momentum", "hess")
    state = [[opt.state[p][name].clone() for name in names] for p in model.parameters()]
    for call in (opt.step, opt.state_dict):
        with pytest.raises(RuntimeError, match="set to None"):
            call()
    assert_params_equal(model, before)
    for p, saved in zip(model.parameters(), state):
        for name, value in zip(names, saved):
            assert torch.equal(opt.state[p][name], value)


@pytest.mark.parametrize("change", [("weight_decay", 0.5), ("ess", 10.0)])
def test_dropin_noise_scalars_changed_after_step_keep_the_drawn_noise(change):
    """A scheduler changing weight_decay or ess after step(): the pending sample's noise (what
    the params really hold) must enter the Hessian estimate, as ivon-opt's stored noise does."""
    key, value = change
    model, opt = build("dropin")
    train(model, opt, "dropin", 0, 3)
    for group in opt.param_groups:
        group[key] = value
    w = model.body[0].weight
    state = opt.state[w]
    noise = (w.detach() - state["mean"]).clone()
    hess = state["hess"].clone()
    loss_fn(model, 3).backward()
    grad = w.grad.detach().clone()
    opt.step()
    s = StepScalars.for_group(opt.param_groups[0], 4, rescale_lr=True, debias=True)
    f = (noise * grad * (hess + s.weight_decay)) * s.ess
    expected = (s.beta2 * hess + s.one_minus_beta2 * f
                + s.hess_coef * (hess - f).square() / (hess + s.weight_decay))
    torch.testing.assert_close(state["hess"], expected, rtol=1e-6, atol=1e-9)


def test_the_same_parameter_twice_in_a_group_is_a_value_error_before_anything_moves():
    model = make_model(0)
    params = list(model.parameters())
    before = [p.data_ptr() for p in params]
    with pytest.raises(ValueError, match="same parameter twice"):
        IVON(params + params[:1], **HP)
    assert [p.data_ptr() for p in params] == before


# ------------------------------------------------- zero-element and zero-dimensional params

class _WithMarkers(nn.Module):
    """A zero-element param (the device-marker idiom) and a zero-dimensional scale."""

    def __init__(self, markers: bool):
        super().__init__()
        torch.manual_seed(0)
        if markers:
            self.marker = nn.Parameter(torch.empty(0))
        self.body = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.tensor(1.5) if markers else torch.tensor([1.5]))
        if markers:
            self.empty_matrix = nn.Parameter(torch.empty(0, 4))

    def forward(self, x):
        return self.body(x) * self.scale


@pytest.mark.parametrize("mode", ["official", "dropin"])
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=pytest.mark.cpp)])
def test_zero_element_and_zero_dim_params_train_like_a_model_without_them(mode, backend):
    """Zero-element params take no noise index and a zero-dim param is one element, so the run
    equals one where the markers are absent and the scale has shape (1,), bit for bit: both
    loops, the closure step, evaluation samples, mean_params, state dict round trip."""
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))

    def run(markers):
        model = _WithMarkers(markers)
        opt = IVON(model.parameters(), lr=0.1, ess=10.0, resample_on_step=mode == "dropin",
                   backend=backend, seed=5)
        outputs = []
        for _ in range(2):
            if mode == "dropin":
                opt.zero_grad()
                model(x).square().sum().backward()
                opt.step()
            else:
                with opt.sampled_params(train=True):
                    opt.zero_grad()
                    model(x).square().sum().backward()
                opt.step()
            with opt.sampled_params(), torch.no_grad():
                outputs.append(model(x))
            with opt.mean_params(), torch.no_grad():
                outputs.append(model(x))

        def closure():
            opt.zero_grad()
            loss = model(x).square().sum()
            loss.backward()
            return loss

        outputs.append(opt.step(closure).detach())
        opt.load_state_dict(opt.state_dict())
        opt.step(closure)
        return outputs, [p.detach().reshape(-1) for p in model.parameters() if p.numel()]

    with_markers, without = run(True), run(False)
    for a, b in zip(with_markers[0] + with_markers[1], without[0] + without[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_a_write_to_one_bucket_leaves_the_other_bucket_exactly_as_it_was(mode):
    """Two param groups (two buckets); a write to a param of the second: its written elements
    become the mean, and the first bucket's state is the unwritten twin's, bit for bit."""
    def build_two_groups():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        opt = IVON([{"params": model[0].parameters()}, {"params": model[2].parameters()}],
                   **HP, backend="reference", seed=SEED, resample_on_step=mode == "dropin")
        return model, opt

    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))

    def one_step(model, opt):
        if mode == "official":
            with opt.sampled_params(train=True):
                opt.zero_grad()
                model(x).square().sum().backward()
        else:
            opt.zero_grad()
            model(x).square().sum().backward()
        opt.step()

    (model, opt), (twin, twin_opt) = build_two_groups(), build_two_groups()
    for m, o in ((model, opt), (twin, twin_opt)):
        one_step(m, o)
    with torch.no_grad():
        model[2].bias.fill_(0.25)
    posterior, twin_posterior = opt.posterior(), twin_opt.posterior()
    assert torch.equal(posterior.mean[3], torch.full((2,), 0.25))   # the write is the mean
    for index in range(3):   # the first bucket, and the second one's unwritten weight
        assert torch.equal(posterior.mean[index], twin_posterior.mean[index])
        assert torch.equal(posterior.std[index], twin_posterior.std[index])
    first = list(model[0].parameters())
    for p, q in zip(first, twin[0].parameters()):
        assert torch.equal(p, q)   # the first bucket's params are untouched too
