"""Faults: what ``ivon_fast.IVON`` does with each mistake or accident (docs/FAULTS.md).

One test (or one parametrized family) per row of docs/FAULTS.md that no older test proves
exactly; the other rows cite their test in the table. Every expectation is independent of the
code under test: the error type and the key words of its message, the exact state before the
fault (params and state dict, bitwise), or a run of the same training without the fault.

Tests marked ``xfail(strict=True)`` show a package bug (the reason names it): they fail today and
must start passing when it is fixed (then drop the marker). Everything runs on the CPU with
``backend='reference'``; the one test that needs a CUDA device is marked ``gpu``.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch
import torch.nn as nn

import ivon
from ivon_fast import IVON

from test_optimizer import (HP, SEED, assert_params_equal, assert_same_run,
                            assert_state_dicts_equal, build, loss_fn, make_model, official_iter,
                            snapshot, train)

INF, NAN = float("inf"), float("nan")


def _frozen(model, opt):
    """Everything a fault must leave alone: the params and the full state dict."""
    return snapshot(model), opt.state_dict()


def _assert_unchanged(model, opt, before):
    assert_params_equal(model, before[0])
    assert_state_dicts_equal(before[1], opt.state_dict())


def _state_tensors(model, opt):
    return [{k: opt.state[p][k].clone() for k in ("mean", "momentum", "hess")}
            for p in model.parameters()]


def _assert_state_tensors_equal(a, b):
    for sa, sb in zip(a, b):
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


def _ptrs(params):
    return [p.data_ptr() for p in params]


# ============================================================================ 1. arguments

# the accepted interval of each group hyperparameter, as the message writes it
_RANGES = {"lr": "[0.0, inf)", "ess": "(0.0, inf)", "hess_init": "(0.0, inf)",
           "beta1": "[0.0, 1.0)", "beta2": "[0.0, 1.0]", "weight_decay": "[0.0, inf)",
           "clip_radius": "(0.0, inf]"}

_BAD_HYPERPARAMETERS = [
    ("lr", -0.1), ("lr", INF), ("lr", NAN), ("lr", None), ("lr", "0.1"), ("lr", True),
    ("ess", 0.0), ("ess", -1.0), ("ess", INF), ("hess_init", 0.0), ("hess_init", NAN),
    ("beta1", 1.0), ("beta1", -1e-9), ("beta2", 1.0 + 1e-9), ("beta2", -0.5),
    ("weight_decay", -1e-4), ("weight_decay", INF), ("clip_radius", 0.0), ("clip_radius", -1.0),
    ("lr", torch.tensor([0.1, 0.2])),
]


def _expected_words(name, value):
    if isinstance(value, torch.Tensor):
        return [f"Invalid {name}", "one-element tensor"]
    return [f"Invalid {name}", f"it must be in {_RANGES[name]}"]


@pytest.mark.parametrize("where", ["constructor", "param_group", "add_param_group",
                                   "load_state_dict"])
@pytest.mark.parametrize("name,value", _BAD_HYPERPARAMETERS,
                         ids=[f"{n}={v!r}" for n, v in _BAD_HYPERPARAMETERS])
def test_an_invalid_hyperparameter_is_a_value_error_naming_it_and_its_range(where, name, value):
    """Every group hyperparameter, wherever it is given: a ValueError with the argument's name
    and its accepted interval, and nothing moved (storage, values, grads, optimizer state)."""
    model = make_model(0, extra=True)
    params = list(model.parameters())
    before, ptrs = snapshot(model), _ptrs(params)
    opt, opt_before = None, None
    if where == "constructor":
        call = lambda: IVON(params, **{**HP, name: value}, backend="reference")
    elif where == "param_group":
        groups = [dict(params=list(model.body.parameters())),
                  dict(params=[model.scale, model.odd], **{name: value})]
        call = lambda: IVON(groups, **HP, backend="reference")
    else:
        opt = IVON(list(model.body.parameters()) + [model.scale, model.odd], **HP,
                   backend="reference", seed=SEED)
        official_iter(model, opt, 0)
        before, ptrs = snapshot(model), _ptrs(params)
        opt_before = opt.state_dict()
        if where == "add_param_group":
            call = lambda: opt.add_param_group(dict(params=list(model.head.parameters()),
                                                    **{name: value}))
        else:
            saved = copy.deepcopy(opt_before)
            saved["param_groups"][0][name] = value
            call = lambda: opt.load_state_dict(saved)
    with pytest.raises(ValueError) as info:
        call()
    for words in _expected_words(name, value):
        assert words in str(info.value)
    assert _ptrs(params) == ptrs
    assert_params_equal(model, before)
    if opt is None:
        assert all(p.grad is None for p in params)
    else:
        assert len(opt.param_groups) == 1
        assert all(p not in opt.state for p in model.head.parameters())
        assert_state_dicts_equal(opt_before, opt.state_dict())


@pytest.mark.parametrize("name,value", [("lr", 0.0), ("beta1", 0.0), ("beta2", 0.0),
                                        ("beta2", 1.0), ("weight_decay", 0.0),
                                        ("clip_radius", INF), ("lr", torch.tensor(0.05))])
def test_the_edges_of_every_range_are_accepted_and_train(name, value):
    """The other side of the checks: the closed ends of the intervals (and one-element tensors)
    are accepted, in the constructor and in a param group, and a step with them stays finite."""
    for as_group in (False, True):
        model = make_model(0)
        if as_group:
            opt = IVON([dict(params=model.parameters(), **{name: value})], **HP,
                       backend="reference", seed=SEED)
        else:
            opt = IVON(model.parameters(), **{**HP, name: value}, backend="reference", seed=SEED)
        official_iter(model, opt, 0)
        assert opt.current_step == 1
        assert all(torch.isfinite(p).all() for p in model.parameters())


_FLAGS = ("sync", "debias", "rescale_lr", "resample_on_step", "skip_nonfinite")
_BAD_OPTIONS = [
    ("mc_samples", 0, "it must be an int >= 1"), ("mc_samples", 2.0, "it must be an int >= 1"),
    ("mc_samples", True, "it must be an int >= 1"), ("mc_samples", "2", "it must be an int >= 1"),
    ("hess_approx", "fisher", "it must be one of ('price', 'gradsq')"),
    ("hess_approx", None, "it must be one of ('price', 'gradsq')"),
    ("backend", "gpu", "it must be 'auto' or one of"),
    ("backend", None, "it must be 'auto' or one of"),
    ("rng", "numpy", "it must be one of ('philox', 'torch')"),
    ("seed", -1, "it must be None or an int in [0, 2**64)"),
    ("seed", 2 ** 64, "it must be None or an int in [0, 2**64)"),
    ("seed", 1.5, "it must be None or an int in [0, 2**64)"),
    ("seed", True, "it must be None or an int in [0, 2**64)"),
    ("seed", "7", "it must be None or an int in [0, 2**64)"),
] + [(flag, value, "it must be True or False") for flag in _FLAGS for value in (1, None, "yes")]


@pytest.mark.parametrize("name,value,words", _BAD_OPTIONS,
                         ids=[f"{n}={v!r}" for n, v, _ in _BAD_OPTIONS])
def test_an_invalid_option_is_a_value_error_naming_it_and_what_it_accepts(name, value, words):
    model = make_model(0)
    params = list(model.parameters())
    before, ptrs = snapshot(model), _ptrs(params)
    kwargs = dict(HP, backend="reference")
    kwargs[name] = value
    with pytest.raises(ValueError) as info:
        IVON(params, **kwargs)
    assert f"Invalid {name}" in str(info.value) and words in str(info.value)
    assert _ptrs(params) == ptrs
    assert_params_equal(model, before)
    assert all(p.grad is None for p in params)


def test_global_options_given_in_a_param_group_are_ignored():
    """mc_samples, hess_approx, ... are per optimizer, as in ivon-opt; inside a param-group dict
    (like any unknown key in torch.optim) they are kept in the group and never read, invalid
    values included: the run equals one without them."""
    model_a, opt_a = build("official")
    model_b = make_model(0)
    torch.manual_seed(1)   # build()'s seed source
    opt_b = IVON([dict(params=model_b.parameters(), mc_samples=0, hess_approx="fisher",
                       backend="nonsense")], **HP, backend="reference")
    assert opt_b.param_groups[0]["mc_samples"] == 0 and opt_b.mc_samples == 1
    train(model_a, opt_a, "official", 0, 3)
    train(model_b, opt_b, "official", 0, 3)
    assert_same_run(model_a, opt_a, model_b, opt_b)


@pytest.mark.parametrize("name,bad,good", [("beta1", 1.0, 0.9), ("lr", -1.0, 0.1),
                                           ("clip_radius", -1.0, float("inf"))])
def test_a_hyperparameter_put_out_of_range_after_construction_is_refused_at_the_step(name, bad,
                                                                                     good):
    """step() checks the groups' ranges again (a scheduler or user code may write into
    param_groups): beta1 = 1 would make the debias factor 1 - beta1^t zero and the mean inf, a
    negative lr would climb the loss. The error names the argument and nothing changes; a valid
    value trains on."""
    model, opt = build("official")
    train(model, opt, "official", 0, 1)
    opt.param_groups[0][name] = bad
    with opt.sampled_params(train=True):
        opt.zero_grad()
        loss_fn(model, 1).backward()
    before = _frozen(model, opt)
    with pytest.raises(ValueError, match=rf"Invalid {name}: {bad}"):
        opt.step()
    _assert_unchanged(model, opt, before)
    assert opt.current_step == 1
    opt.param_groups[0][name] = good
    opt.step()
    assert opt.current_step == 2
    assert all(torch.isfinite(opt.state[p]["mean"]).all() for p in model.parameters())


# ============================================================================ 2. params

def test_a_param_group_with_a_param_already_managed_is_refused_and_changes_nothing():
    model_a, opt_a = build("official")
    train(model_a, opt_a, "official", 0, 3)
    model_b, opt_b = build("official")
    train(model_b, opt_b, "official", 0, 2)
    before = _frozen(model_b, opt_b)
    ptrs = _ptrs(model_b.parameters())
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt_b.add_param_group({"params": [model_b.scale]})
    extra = nn.Parameter(torch.ones(3))
    extra_ptr = extra.data_ptr()
    with pytest.raises(ValueError, match="same parameter twice"):
        opt_b.add_param_group({"params": [extra, extra]})
    assert extra.data_ptr() == extra_ptr and extra not in opt_b.state
    assert len(opt_b.param_groups) == 1 and _ptrs(model_b.parameters()) == ptrs
    _assert_unchanged(model_b, opt_b, before)
    train(model_b, opt_b, "official", 2, 1)
    assert_same_run(model_a, opt_a, model_b, opt_b)


@pytest.mark.parametrize("bad,error,words", [
    ("a string", TypeError, "IVON params must be tensors, got str"),
    (torch.zeros(3, dtype=torch.int64), ValueError, "Invalid param dtype: torch.int64"),
    (torch.zeros(3, 3).to_sparse(), ValueError, "sparse tensors are not supported"),
], ids=["not_a_tensor", "int64", "sparse"])
def test_a_param_that_is_not_a_dense_float_tensor_is_refused_before_anything_moves(bad, error,
                                                                                   words):
    model = make_model(0)
    params = list(model.parameters())
    before, ptrs = snapshot(model), _ptrs(params)
    for groups in ([*params, bad], [dict(params=params), dict(params=[bad])]):
        with pytest.raises(error, match=words):
            IVON(groups, **HP, backend="reference")
        assert _ptrs(params) == ptrs
        assert_params_equal(model, before)
        assert all(p.grad is None for p in params)


def test_an_empty_param_group_added_later_is_accepted_and_changes_nothing():
    """torch.optim accepts an empty group in add_param_group; so does IVON (an empty
    constructor list is the ValueError of tests/test_user_paths.py)."""
    model_a, opt_a = build("official")
    model_b, opt_b = build("official")
    opt_b.add_param_group({"params": []})
    train(model_a, opt_a, "official", 0, 2)
    train(model_b, opt_b, "official", 0, 2)
    assert_same_run(model_a, opt_a, model_b, opt_b)
    saved = opt_b.state_dict()
    assert [g["params"] for g in saved["param_groups"]][1] == []
    model_c, opt_c = build("official", model_seed=3, opt_seed=4)
    opt_c.add_param_group({"params": []})
    model_c.load_state_dict(model_b.state_dict())
    opt_c.load_state_dict(saved)
    train(model_b, opt_b, "official", 2, 1)
    train(model_c, opt_c, "official", 2, 1)
    assert_same_run(model_b, opt_b, model_c, opt_c)


def test_params_on_cpu_and_meta_build_but_every_call_refuses_and_nothing_moves():
    """One bucket per (device, dtype): construction accepts the meta params, and every call that
    would compute refuses with the meta-device error; the CPU params keep their values."""
    model = make_model(0)
    meta = nn.Linear(2, 2, device="meta")
    opt = IVON([*model.parameters(), *meta.parameters()], **HP, backend="reference")
    assert {device for device, _ in opt.backends} == {"cpu", "meta"}
    before = snapshot(model)
    loss_fn(model, 0).backward()
    calls = (opt.step, lambda: opt.step(lambda: None), opt.state_dict,
             lambda: opt.load_state_dict({}), lambda: opt.sampled_params(train=True).__enter__(),
             lambda: opt.sampled_params().__enter__(), lambda: opt.mean_params().__enter__())
    for call in calls:
        with pytest.raises(RuntimeError, match="meta device"):
            call()
    assert_params_equal(model, before)
    assert opt.current_step == 0


@pytest.mark.gpu
def test_params_on_cpu_and_cuda_train_like_all_on_cpu():
    """One bucket per device, each with its own launches; a non-finite gradient on one device
    skips the step on both (the skip flag is moved between devices, without a sync)."""
    xa = torch.linspace(-1, 1, 15).reshape(5, 3)
    xb = torch.linspace(0, 2, 7)

    def run(split):
        torch.manual_seed(0)
        a = nn.Parameter(torch.randn(5, 3))
        b = nn.Parameter(torch.randn(7).cuda() if split else torch.randn(7))
        opt = IVON([a, b], **HP, backend="reference", seed=SEED, skip_nonfinite=True)
        for i in range(4):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                loss = (a * xa).sin().sum() + (b * xb.to(b.device)).cos().sum().cpu()
                loss.backward()
                if i == 2:
                    b.grad.view(-1)[0] = NAN
            opt.step()
        assert opt.current_step == 3 and opt.skipped_steps == 1
        return [t.detach().cpu() for p in (a, b)
                for t in (p, opt.state[p]["mean"], opt.state[p]["hess"])], opt

    on_cpu, _ = run(False)
    split, opt = run(True)
    assert {device for device, _ in opt.backends} == {"cpu", "cuda:0"}
    for want, got in zip(on_cpu, split):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ============================================================================ 3. gradients

def _embedding_run(mode, mc, sparse, clear):
    """Two steps of an embedding; ``clear``: how gradients are cleared before each backward
    ('none': set to None, so autograd hands the step a sparse tensor; 'zero':
    ``optimizer.zero_grad()``, so autograd adds a sparse gradient into the dense one)."""
    torch.manual_seed(0)
    embedding = nn.Embedding(5, 3, sparse=sparse)
    opt = IVON(embedding.parameters(), **HP, backend="reference", seed=SEED, mc_samples=mc,
               resample_on_step=(mode == "dropin"))

    def backward(i):
        if clear == "none":
            embedding.zero_grad(set_to_none=True)
        else:
            opt.zero_grad()
        embedding(torch.tensor([1, 2, 2 + i])).pow(2).sum().backward()
        assert embedding.weight.grad.is_sparse == (sparse and clear == "none")

    for i in range(2):
        if mode == "dropin":
            backward(i)
        else:
            for _ in range(mc):
                with opt.sampled_params(train=True):
                    backward(i)
        opt.step()
    return embedding.weight.detach().clone(), opt.state_dict()


@pytest.mark.parametrize("clear", ["none", "zero"])
@pytest.mark.parametrize("mode,mc", [("official", 1), ("dropin", 1), ("official", 2)])
def test_sparse_gradients_are_densified_in_every_loop(mode, mc, clear):
    """A sparse gradient trains exactly as its dense equal does (docs/FAULTS.md), however the
    gradients were cleared."""
    sparse_weight, sparse_state = _embedding_run(mode, mc, True, clear)
    dense_weight, dense_state = _embedding_run(mode, mc, False, clear)
    assert torch.equal(sparse_weight, dense_weight)
    assert_state_dicts_equal(sparse_state, dense_state)


def test_an_error_while_a_sample_is_folded_in_discards_it_and_changes_nothing(monkeypatch):
    """With mc_samples > 1 the block's exit folds its gradient in; an error there (out of
    memory, say) leaves params and optimizer as before the block, and the step goes on."""
    model = make_model(0)
    opt = IVON(model.parameters(), **HP, backend="reference", seed=SEED, mc_samples=2)
    official_iter(model, opt, 0, mc=2)
    before = _frozen(model, opt)
    from ivon_fast._bucket import Bucket

    def out_of_memory(self):
        raise RuntimeError("out of memory (injected)")

    with monkeypatch.context() as patch:
        patch.setattr(Bucket, "gather_grads", out_of_memory)
        with pytest.raises(RuntimeError, match="injected"):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                loss_fn(model, 1).backward()
    _assert_unchanged(model, opt, before)
    assert opt.samples_taken == 0
    official_iter(model, opt, 1, mc=2)   # the step goes on as if the failed block never ran
    reference_model = make_model(0)
    reference_opt = IVON(reference_model.parameters(), **HP, backend="reference", seed=SEED,
                         mc_samples=2)
    for i in range(2):
        official_iter(reference_model, reference_opt, i, mc=2)
    assert_params_equal(model, snapshot(reference_model))


def test_a_nonfinite_gradient_is_skipped_by_default():
    model = make_model(0)
    opt = IVON(model.parameters(), **HP, backend="reference", seed=SEED)
    assert opt.skip_nonfinite is True
    official_iter(model, opt, 0)
    before = _frozen(model, opt)
    with opt.sampled_params(train=True):
        opt.zero_grad()
        loss_fn(model, 1).backward()
        model.body[0].weight.grad.view(-1)[0] = NAN
    opt.step()
    assert opt.current_step == 1 and opt.skipped_steps == 1
    assert_params_equal(model, before[0])
    after = opt.state_dict()
    for index, entry in before[1]["state"].items():
        for key in ("mean", "momentum", "hess"):
            assert torch.equal(entry[key], after["state"][index][key])


@pytest.mark.parametrize("mode,mc,at_sample", [("dropin", 1, 0), ("official", 1, 0),
                                               ("official", 2, 0), ("official", 2, 1)])
def test_a_gradscaler_skips_an_overflow_even_with_skip_nonfinite_false(mode, mc, at_sample):
    """skip_nonfinite=False removes only the optimizer's own check without a scaler: the
    scaler's found_inf (last sample) and the check of the samples folded before it still
    skip the step."""
    scale = 2.0 ** 12
    model = make_model(0)
    opt = IVON(model.parameters(), **HP, backend="reference", seed=SEED, mc_samples=mc,
               resample_on_step=(mode == "dropin"), skip_nonfinite=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10 ** 6)

    def iteration(i, poison):
        for k in range(mc):
            with (opt.sampled_params(train=True) if mode == "official"
                  else contextlib.nullcontext()):
                opt.zero_grad()
                scaler.scale(loss_fn(model, i)).backward()
                if poison and k == at_sample:
                    model.body[0].weight.grad.view(-1)[3] = INF
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()

    iteration(0, poison=False)
    before = _state_tensors(model, opt)
    iteration(1, poison=True)
    _assert_state_tensors_equal(before, _state_tensors(model, opt))
    assert opt.current_step == 1 and opt.skipped_steps == 1
    assert scaler.get_scale() == (scale / 2 if at_sample == mc - 1 else scale)


@pytest.mark.parametrize("fault", ["fresh", "no_backward", "zero_grad", "grads_set_to_none"])
def test_dropin_step_without_a_gradient_does_nothing(fault):
    """Note [a step without a gradient]: no trainable param got a gradient since the last step
    (or since construction; a backward cleared by zero_grad, of either kind, counts as none), so
    step() changes nothing, as torch.optim's step skips params without a gradient; training then
    goes on as if it had not been called."""
    def run(faulty):
        model, opt = build("dropin")
        steps = 0 if fault == "fresh" else 2
        train(model, opt, "dropin", 0, steps)
        if faulty:
            if fault in ("zero_grad", "grads_set_to_none"):
                loss_fn(model, 2).backward()
            if fault == "zero_grad":
                opt.zero_grad()
            elif fault == "grads_set_to_none":
                model.zero_grad(set_to_none=True)
            before = _frozen(model, opt)
            opt.step()
            _assert_unchanged(model, opt, before)
            assert opt.current_step == steps
        train(model, opt, "dropin", steps, 2)
        return model, opt

    assert_same_run(*run(faulty=False), *run(faulty=True))


def test_a_second_dropin_step_on_the_same_gradient_does_nothing():
    model, opt = build("dropin")
    train(model, opt, "dropin", 0, 1)
    opt.zero_grad()
    loss_fn(model, 1).backward()
    opt.step()
    before = _frozen(model, opt)
    opt.step()   # the gradient it would use is the one the last step used
    _assert_unchanged(model, opt, before)
    assert opt.current_step == 2


def test_dropin_step_with_a_zero_gradient_is_a_step():
    """A backward that computed zeros is a gradient: the step moves the mean (weight decay)."""
    model, opt = build("dropin")
    train(model, opt, "dropin", 0, 1)
    opt.zero_grad()
    (loss_fn(model, 2) * 0.0).backward()
    before = opt.posterior().mean
    opt.step()
    assert opt.current_step == 2
    assert not all(torch.equal(a, b) for a, b in zip(before, opt.posterior().mean))


def test_dropin_step_with_an_assigned_gradient_is_a_step():
    model, opt = build("dropin")
    train(model, opt, "dropin", 0, 1)
    for param in model.parameters():
        param.grad = torch.full_like(param, 0.5)   # tensors of their own, no backward
    opt.step()
    assert opt.current_step == 2


def test_dropin_step_with_a_gradient_only_for_a_param_unfrozen_since_is_a_step():
    torch.manual_seed(0)
    first, second = nn.Linear(3, 3), nn.Linear(3, 1)
    second.requires_grad_(False)
    opt = IVON(list(first.parameters()) + list(second.parameters()), **HP, backend="reference",
               seed=SEED, resample_on_step=True)
    x = torch.randn(4, 3)
    second(first(x)).sum().backward()
    opt.step()
    second.requires_grad_(True)
    first.zero_grad(set_to_none=True)
    second(first(x).detach()).sum().backward()   # only the unfrozen params get a gradient
    weight = second.weight.detach().clone()
    opt.step()
    assert opt.current_step == 2
    assert not torch.equal(second.weight, weight)


def test_official_step_without_a_sample_refuses_and_changes_nothing():
    """The official loop without a sample: plain step() and step() with a closure that computes
    nothing both refuse, with the two loops spelled out, and change nothing."""
    model, opt = build("official")
    train(model, opt, "official", 0, 2)
    before = _frozen(model, opt)
    for call in (opt.step, lambda: opt.step(lambda: None)):
        with pytest.raises(RuntimeError) as info:
            call()
        message = str(info.value)
        assert "without a gradient from a posterior sample" in message
        assert "sampled_params(train=True)" in message and "resample_on_step=True" in message
        _assert_unchanged(model, opt, before)
    assert opt.current_step == 2


def test_dropin_plain_step_with_several_samples_refuses_and_changes_nothing():
    """resample_on_step=True with mc_samples=2: a plain step() has one sample; it refuses and
    points to step(closure), which then takes the two samples."""
    model, opt = build("dropin", mc=2)
    loss_fn(model, 0).backward()
    before = snapshot(model), _state_tensors(model, opt)
    with pytest.raises(RuntimeError,
                       match=r"mc_samples=2 pass a closure: optimizer\.step\(closure\)"):
        opt.step()
    assert_params_equal(model, before[0])
    _assert_state_tensors_equal(before[1], _state_tensors(model, opt))
    assert opt.current_step == 0


def test_freezing_a_param_between_the_block_and_step_drops_its_sample_only():
    """requires_grad_(False) after the sample's backward: the frozen param keeps its state and
    gets its mean back; every other param updates exactly as without the freeze."""
    def run(freeze):
        model, opt = build("official")
        train(model, opt, "official", 0, 2)
        state = _state_tensors(model, opt)
        with opt.sampled_params(train=True):
            opt.zero_grad()
            loss_fn(model, 2).backward()
        if freeze:
            model.odd.requires_grad_(False)
        opt.step()
        return model, opt, state

    model_a, opt_a, _ = run(freeze=False)
    model_b, opt_b, before = run(freeze=True)
    params_a, params_b = list(model_a.parameters()), list(model_b.parameters())
    for pa, pb, saved in zip(params_a, params_b, before):
        if pb is model_b.odd:
            _assert_state_tensors_equal(
                [saved], [{k: opt_b.state[pb][k] for k in ("mean", "momentum", "hess")}])
            assert torch.equal(pb.detach(), saved["mean"])
        else:
            assert torch.equal(pa, pb)
            for key in ("mean", "momentum", "hess"):
                assert torch.equal(opt_a.state[pa][key], opt_b.state[pb][key]), key


# ============================================================================ 4. state dicts

def _state_dict_from(kind, model):
    """A state dict that does not fit an IVON over ``make_model(0)``'s params (one group)."""
    if kind == "numel":      # a checkpoint of a model with one layer of another size
        other = make_model(0)
        other.odd = nn.Parameter(torch.randn(3, 1, 6))   # same slot in the param order
        return IVON(other.parameters(), **HP, backend="reference").state_dict()
    if kind == "groups":
        other = make_model(0)
        return IVON([dict(params=list(other.body.parameters())),
                     dict(params=[other.scale, other.odd])], **HP,
                    backend="reference").state_dict()
    if kind == "params":
        return IVON(list(make_model(0).parameters())[:-1], **HP,
                    backend="reference").state_dict()
    if kind == "dropin":     # saved by the other training loop
        return build("dropin")[1].state_dict()
    if kind == "format":     # a future (or foreign) format of this class
        saved = build("official")[1].state_dict()
        saved["ivon"]["format"] = "ivon_fast/0"
        return saved
    if kind in ("adamw", "sgd"):
        other = make_model(0)
        opt = (torch.optim.AdamW(other.parameters()) if kind == "adamw"
               else torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9))
        loss_fn(other, 0).backward()
        opt.step()
        return opt.state_dict()
    other = make_model(0)          # ivon-opt's own optimizer
    opt = ivon.IVON(other.parameters(), **HP)
    train(other, opt, "official", 0, 1)
    return opt.state_dict()


_REFUSED_STATE_DICTS = [
    ("numel", {}, ["'mean' of parameter 1", "15 elements"]),
    ("groups", {}, ["different number of param groups"]),
    ("params", {}, ["param groups differ in size"]),
    ("dropin", {}, ["saved with resample_on_step=True",
                    "this optimizer has resample_on_step=False"]),
    ("format", {}, ["unknown state_dict format 'ivon_fast/0'"]),
    ("adamw", {}, ["neither an ivon_fast nor an ivon-opt IVON state dict"]),
    ("sgd", {}, ["neither an ivon_fast nor an ivon-opt IVON state dict"]),
    ("ivon_opt", {}, ["Invalid step", "does not record the step count", "step=<int >= 0"]),
    ("ivon_opt", {"step": -1}, ["Invalid step", "step=<int >= 0"]),
    ("ivon_opt", {"step": 1.0}, ["Invalid step"]),
]


@pytest.mark.parametrize("kind,kwargs,words", _REFUSED_STATE_DICTS,
                         ids=[f"{k}{'-step=' + str(kw['step']) if kw else ''}"
                              for k, kw, _ in _REFUSED_STATE_DICTS])
def test_a_state_dict_that_does_not_fit_is_refused_before_anything_changes(kind, kwargs, words):
    model_a, opt_a = build("official")
    train(model_a, opt_a, "official", 0, 3)
    model_b, opt_b = build("official")
    train(model_b, opt_b, "official", 0, 2)
    before = _frozen(model_b, opt_b)
    with pytest.raises(ValueError) as info:
        opt_b.load_state_dict(_state_dict_from(kind, model_b), **kwargs)
    for word in words:
        assert word in str(info.value)
    _assert_unchanged(model_b, opt_b, before)
    train(model_b, opt_b, "official", 2, 1)
    assert_same_run(model_a, opt_a, model_b, opt_b)


def test_a_state_dict_with_the_same_numel_in_another_shape_loads_in_storage_order():
    """Only element counts are compared (as torch.optim compares nothing per tensor): a (3, 2)
    param's state loads into a (2, 3) param, element i of the storage order to element i."""
    torch.manual_seed(0)
    source = [nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(2))]
    target = [nn.Parameter(torch.randn(2, 3)), nn.Parameter(torch.randn(2))]
    opt_s = IVON(source, **HP, backend="reference", seed=SEED)
    with opt_s.sampled_params(train=True):
        (source[0].sin().sum() + source[1].square().sum()).backward()
    opt_s.step()
    opt_t = IVON(target, **HP, backend="reference", seed=SEED + 1)
    opt_t.load_state_dict(opt_s.state_dict())
    for ps, pt in zip(source, target):
        for key in ("mean", "momentum", "hess"):
            assert opt_t.state[pt][key].shape == pt.shape
            assert torch.equal(opt_t.state[pt][key].reshape(-1), opt_s.state[ps][key].reshape(-1))
        assert torch.equal(pt.detach().reshape(-1), ps.detach().reshape(-1))


# ============================================================================ 5. interruptions

@pytest.mark.parametrize("kind", ["train", "eval", "mean", "closure"])
def test_a_keyboard_interrupt_inside_a_block_mid_step_leaves_everything(kind):
    """Ctrl-C is a BaseException, not an Exception: inside each block (with one sample of the
    step already folded in) and inside step(closure), params and optimizer stay exactly as they
    were, and training then goes on exactly like an uninterrupted run."""
    mc = 2

    def closure_for(model, opt, interrupt_at=None):
        calls = []

        def closure():
            calls.append(None)
            if len(calls) == interrupt_at:
                raise KeyboardInterrupt
            opt.zero_grad()
            loss = loss_fn(model, 2)
            loss.backward()
            return loss
        return closure

    def first_sample(model, opt):
        with opt.sampled_params(train=True):
            opt.zero_grad()
            loss_fn(model, 2).backward()

    def finish_step(model, opt):
        if kind == "closure":
            opt.step(closure_for(model, opt))
        else:
            first_sample(model, opt)   # the second sample of the step
            opt.step()

    model_a, opt_a = build("official", mc=mc)
    train(model_a, opt_a, "official", 0, 2, mc)
    if kind != "closure":
        first_sample(model_a, opt_a)
    finish_step(model_a, opt_a)

    model_b, opt_b = build("official", mc=mc)
    train(model_b, opt_b, "official", 0, 2, mc)
    if kind != "closure":
        first_sample(model_b, opt_b)
    before = _frozen(model_b, opt_b)
    with pytest.raises(KeyboardInterrupt):
        if kind == "closure":
            opt_b.step(closure_for(model_b, opt_b, interrupt_at=2))
        else:
            block = {"train": lambda: opt_b.sampled_params(train=True),
                     "eval": lambda: opt_b.sampled_params(train=False),
                     "mean": opt_b.mean_params}[kind]()
            with block:
                loss_fn(model_b, 3).backward()
                raise KeyboardInterrupt
    opt_b.zero_grad()   # the interrupted backward left gradients; a real loop clears them
    _assert_unchanged(model_b, opt_b, before)
    finish_step(model_b, opt_b)
    assert_same_run(model_a, opt_a, model_b, opt_b)


def test_optimizer_calls_inside_a_block_are_refused_and_change_nothing():
    """step(), step(closure), load_state_dict() and nested blocks inside a block refuse; the block
    then ends normally and the run equals one without the attempts (state_dict() inside a block:
    tests/test_user_paths.py)."""
    model_a, opt_a = build("official")
    train(model_a, opt_a, "official", 0, 3)
    model_b, opt_b = build("official")
    train(model_b, opt_b, "official", 0, 2)
    saved = opt_b.state_dict()
    with opt_b.sampled_params(train=True):
        opt_b.zero_grad()
        loss_fn(model_b, 2).backward()
        for call in (opt_b.step, lambda: opt_b.step(lambda: None),
                     lambda: opt_b.load_state_dict(saved),
                     lambda: opt_b.sampled_params(train=True).__enter__(),
                     lambda: opt_b.sampled_params().__enter__(),
                     lambda: opt_b.mean_params().__enter__()):
            with pytest.raises(RuntimeError, match="cannot be called inside sampled_params"):
                call()
    opt_b.step()
    assert_same_run(model_a, opt_a, model_b, opt_b)


# ============================================================================ 6. checkpoints

def atomic_save(obj, path, wrap=None):
    """torch.save that never leaves a half-written file at ``path``.

    Write to a temporary file in the same directory (same file system, so the rename is
    atomic), flush and fsync it, then ``os.replace`` it over ``path``; on POSIX also fsync the
    directory so the rename itself survives a power loss. A process killed at any point leaves
    either the old file or the new one at ``path`` (and at worst a stray ``*.tmp`` beside it).
    ``wrap`` (tests only) wraps the open temporary file.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f if wrap is None else wrap(f))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if os.name == "posix":
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class _Interrupted(Exception):
    pass


class _FailingWriter:
    """A file whose writes fail after ``budget`` bytes (a full disk, a lost mount)."""

    def __init__(self, file, budget):
        self.file, self.budget, self.written = file, budget, 0

    def write(self, data):
        data = bytes(data)
        if self.written + len(data) > self.budget:
            self.file.write(data[:self.budget - self.written])
            self.written = self.budget
            raise _Interrupted("the write was interrupted")
        self.written += len(data)
        return self.file.write(data)

    def flush(self):
        self.file.flush()


def _in_chain(error, kind):
    while error is not None:
        if isinstance(error, kind):
            return True
        error = error.__cause__ or error.__context__
    return False


@pytest.mark.parametrize("taken", [1, 2], ids=["after_sample_1_of_2", "after_sample_2_of_2"])
def test_a_checkpoint_between_the_samples_of_a_step_resumes_exactly(tmp_path, taken):
    """mc_samples=2, checkpointed inside a step: after the first sample (folded into the averages)
    or after the second (its gradient pending), saved to disk, loaded into a fresh model and
    optimizer built with other seeds, the rest of the step and the next step equal an
    uninterrupted run bit for bit."""
    mc = 2
    model_a, opt_a = build("official", mc=mc)
    train(model_a, opt_a, "official", 0, 4, mc)

    model_b, opt_b = build("official", mc=mc)
    train(model_b, opt_b, "official", 0, 2, mc)
    for _ in range(taken):
        with opt_b.sampled_params(train=True):
            opt_b.zero_grad()
            loss_fn(model_b, 2).backward()
    path = tmp_path / "checkpoint.pt"
    atomic_save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, path)
    del model_b, opt_b

    saved = torch.load(path)   # weights_only=True, torch's default, suffices
    entry = saved["opt"]["state"][0]
    assert "avg_grad" in entry                       # the first sample, folded in
    assert ("pending_grad" in entry) == (taken == 2)
    model_c, opt_c = build("official", model_seed=5, opt_seed=6, mc=mc)
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    for _ in range(mc - taken):
        with opt_c.sampled_params(train=True):
            opt_c.zero_grad()
            loss_fn(model_c, 2).backward()
    opt_c.step()
    train(model_c, opt_c, "official", 3, 1, mc)
    assert_same_run(model_a, opt_a, model_c, opt_c)


def test_a_truncated_checkpoint_fails_loudly_on_load(tmp_path):
    """A checkpoint cut short (the writer was killed, the disk filled up) raises on torch.load
    at every length, never returns part of the state."""
    model, opt = build("official")
    train(model, opt, "official", 0, 2)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    data = path.read_bytes()
    assert_state_dicts_equal(opt.state_dict(), torch.load(path)["opt"])   # the whole file loads
    size = len(data)
    cuts = sorted({0, 1, 2, 10, 100, size // 4, size // 2, 3 * size // 4, size - 100, size - 23,
                   size - 22, size - 21, size - 1})
    for cut in cuts:
        truncated = tmp_path / f"cut_{cut}.pt"
        truncated.write_bytes(data[:cut])
        with pytest.raises(Exception):
            torch.load(truncated)


def test_an_interrupted_atomic_save_leaves_the_old_checkpoint_intact(tmp_path):
    model, opt = build("official")
    train(model, opt, "official", 0, 1)
    path = tmp_path / "checkpoint.pt"
    # model.state_dict() holds the live params: copy what each checkpoint held
    old = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    atomic_save(old, path)
    train(model, opt, "official", 1, 1)
    new = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    budget = len(path.read_bytes()) // 2

    with pytest.raises(Exception) as info:
        atomic_save(new, path, wrap=lambda f: _FailingWriter(f, budget))
    assert _in_chain(info.value, _Interrupted)
    assert os.listdir(tmp_path) == ["checkpoint.pt"]          # no stray temporary file
    assert_state_dicts_equal(old, torch.load(path))           # the old checkpoint, whole

    # the fault the pattern protects against: the same interruption of a plain save in place
    with pytest.raises(Exception) as info:
        with open(path, "wb") as f:
            torch.save(new, _FailingWriter(f, budget))
    assert _in_chain(info.value, _Interrupted)
    with pytest.raises(Exception):
        torch.load(path)

    atomic_save(new, path)
    assert_state_dicts_equal(new, torch.load(path))


def test_a_writer_killed_mid_save_leaves_the_old_checkpoint_intact(tmp_path):
    """A real kill: a child process dies (os._exit, no cleanup, no exception handler) halfway
    through atomic_save; the old checkpoint is intact, and only a stray temporary remains."""
    path = tmp_path / "checkpoint.pt"
    old = {"w": torch.arange(4096.0)}
    atomic_save(old, path)
    budget = len(path.read_bytes()) // 2
    script = "\n".join([
        "import contextlib, os, tempfile, torch",
        textwrap.dedent(inspect.getsource(atomic_save)),
        "class Dies:",
        "    def __init__(self, f): self.f, self.n = f, 0",
        "    def write(self, b):",
        "        self.n += len(bytes(b))",
        f"        if self.n > {budget}: self.f.flush(); os._exit(9)",
        "        return self.f.write(bytes(b))",
        "    def flush(self): self.f.flush()",
        f"atomic_save({{'w': torch.zeros(4096)}}, {str(path)!r}, wrap=Dies)",
    ])
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 9, result.stderr
    assert_state_dicts_equal(old, torch.load(path))
    leftovers = [name for name in os.listdir(tmp_path) if name != "checkpoint.pt"]
    assert len(leftovers) == 1 and leftovers[0].startswith("checkpoint.pt.")
    assert leftovers[0].endswith(".tmp")


# ============================================================================ 7. user code

def test_a_write_through_dot_data_is_not_seen_and_is_lost():
    """Note [user writes to params]: ``p.data.copy_`` bumps the version counter of a new tensor
    object, not the param's, so the optimizer cannot see it: the mean stays, and the next block
    writes over the value. The same write as ``p.copy_`` under no_grad becomes the mean."""
    model, opt = build("official")
    train(model, opt, "official", 0, 2)
    index = [name for name, _ in model.named_parameters()].index("scale")
    mean = opt.state[model.scale]["mean"].clone()
    model.scale.data.copy_(torch.tensor(5.0))
    assert torch.equal(opt.state_dict()["state"][index]["mean"], mean.reshape(-1))
    with opt.mean_params():
        assert torch.equal(model.scale.detach(), mean)
    assert torch.equal(model.scale.detach(), mean)           # the 5.0 is gone

    with torch.no_grad():
        model.scale.copy_(torch.tensor(5.0))
    assert opt.state_dict()["state"][index]["mean"].item() == 5.0


def test_a_param_rebound_to_another_shape_is_refused_until_put_back():
    model_a, opt_a = build("official")
    train(model_a, opt_a, "official", 0, 3)
    model_b, opt_b = build("official")
    train(model_b, opt_b, "official", 0, 2)
    weight = model_b.body[0].weight
    held, state = weight.data, _state_tensors(model_b, opt_b)
    weight.data = torch.zeros(9, 4)
    calls = (opt_b.step, lambda: opt_b.step(lambda: None), opt_b.state_dict,
             lambda: opt_b.sampled_params(train=True).__enter__(),
             lambda: opt_b.sampled_params().__enter__(), lambda: opt_b.mean_params().__enter__())
    for call in calls:
        with pytest.raises(RuntimeError,
                           match=r"changed its shape from \(8, 4\) to \(9, 4\); build a new"):
            call()
    _assert_state_tensors_equal(state, _state_tensors(model_b, opt_b))
    weight.data = held
    train(model_b, opt_b, "official", 2, 1)
    assert_same_run(model_a, opt_a, model_b, opt_b)


def test_a_param_reshaped_in_place_is_refused_like_any_shape_change():
    model, opt = build("official")
    train(model, opt, "official", 0, 1)
    weight = model.body[0].weight
    weight.data = weight.data.view(4, 8)      # same storage, same numel, another shape
    with pytest.raises(RuntimeError, match="changed its shape"):
        opt.state_dict()
