"""LR schedulers that cycle momentum (Note [betas] in ivon_fast/_groups.py), and optimizer
wrappers that forward to IVON (Note [optimizer wrappers]).

Expectations: the momentum a scheduler computes, read from the same scheduler driving a torch
AdamW (its ``betas[0]``), applied by hand to IVON's ``beta1`` in a second run; and the plain loop
without a wrapper.
"""
from __future__ import annotations

import pytest
import torch

import ivon_fast
from ivon_fast import IVON

from test_optimizer import HP, assert_same_run, build, dropin_iter, loss_fn, make_model, train


def _schedulers(kind):
    if kind == "onecycle":
        return lambda opt: torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=0.05, total_steps=8, base_momentum=0.8, max_momentum=0.95)
    return lambda opt: torch.optim.lr_scheduler.CyclicLR(
        opt, base_lr=0.01, max_lr=0.05, step_size_up=3, base_momentum=0.8, max_momentum=0.95,
        cycle_momentum=True)


@pytest.mark.parametrize("kind", ["onecycle", "cyclic"])
@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_momentum_cycling_scheduler_drives_beta1(kind, mode):
    make_scheduler = _schedulers(kind)
    steps = 6
    # the schedule the scheduler computes, read off a torch AdamW it drives
    adamw = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=0.01)
    adamw_scheduler = make_scheduler(adamw)
    schedule = []
    for _ in range(steps):
        schedule.append((adamw.param_groups[0]["lr"], adamw.param_groups[0]["betas"][0]))
        adamw.step()
        adamw_scheduler.step()

    model_a, opt_a = build(mode)
    scheduler = make_scheduler(opt_a)
    model_b, opt_b = build(mode)
    for i, (lr, beta1) in enumerate(schedule):
        opt_b.param_groups[0]["lr"], opt_b.param_groups[0]["beta1"] = lr, beta1
        train(model_a, opt_a, mode, i, 1)
        train(model_b, opt_b, mode, i, 1)
        # reconciled at the step: the official name holds what the scheduler wrote
        assert opt_a.param_groups[0]["beta1"] == opt_a.param_groups[0]["betas"][0] == beta1
        scheduler.step()
    assert len({beta1 for _, beta1 in schedule}) > 2  # the momentum did cycle
    assert_same_run(model_a, opt_a, model_b, opt_b)
    assert opt_b.param_groups[0]["betas"] == (schedule[-1][1], HP["beta2"])


def test_betas_and_beta1_written_differently_is_an_error_before_any_change():
    model, opt = build("dropin")
    dropin_iter(model, opt, 0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.param_groups[0]["betas"] = (0.5, HP["beta2"])
    opt.param_groups[0]["beta1"] = 0.7
    loss_fn(model, 1).backward()
    with pytest.raises(ValueError, match="betas was set to .* and beta1, beta2 to"):
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_group_betas_fill_in_beta1_and_beta2():
    model = make_model(0)
    params = list(model.parameters())
    opt = IVON([{"params": params[:1], "betas": (0.5, 0.999)},
                {"params": params[1:], "beta1": 0.6}], **HP, backend="reference")
    assert (opt.param_groups[0]["beta1"], opt.param_groups[0]["beta2"]) == (0.5, 0.999)
    assert opt.param_groups[1]["betas"] == (0.6, HP["beta2"])
    with pytest.raises(ValueError, match="betas=.* but beta1=0.4"):
        IVON([{"params": params, "betas": (0.5, 0.999), "beta1": 0.4}], **HP)
    with pytest.raises(ValueError, match="Invalid betas"):
        IVON([{"params": params, "betas": 0.5}], **HP)
    with pytest.raises(ValueError, match="Invalid beta1"):
        IVON([{"params": params, "betas": (1.5, 0.999)}], **HP)


def test_state_dict_round_trip_keeps_betas_in_step_with_beta1():
    model, opt = build("official")
    opt.param_groups[0]["beta1"] = 0.7
    train(model, opt, "official", 0, 2)
    state = opt.state_dict()
    assert state["param_groups"][0]["betas"] == (0.7, HP["beta2"])
    model_b, opt_b = build("official")
    opt_b.load_state_dict(state)
    assert opt_b.param_groups[0]["betas"] == (0.7, HP["beta2"])
    opt_b.param_groups[0]["betas"] = (0.6, HP["beta2"])  # written after the load: it wins
    model_b.load_state_dict(model.state_dict())
    train(model_b, opt_b, "official", 2, 1)
    assert opt_b.param_groups[0]["beta1"] == 0.6


class _ForwardingWrapper:
    """What Lightning's LightningOptimizer does: an instance of a subclass of the optimizer's
    class that forwards missing attributes to the optimizer (written here to test without
    Lightning; tests/test_lightning.py runs the real one)."""

    def __init__(self, optimizer):
        self._optimizer = optimizer
        self.__class__ = type("Wrapped" + type(optimizer).__name__,
                              (_ForwardingWrapper, type(optimizer)), {})

    @property
    def optimizer(self):
        return self._optimizer

    def __getattr__(self, name):
        return getattr(self._optimizer, name)


@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_a_forwarding_subclass_wrapper_runs_the_loop_on_the_optimizer(mode):
    mc = 2 if mode == "official" else 1
    model_a, opt_a = build(mode, mc=mc)
    train(model_a, opt_a, mode, 0, 3, mc=mc)
    model_b, opt_b = build(mode, mc=mc)
    wrapped = _ForwardingWrapper(opt_b)
    assert isinstance(wrapped, IVON)
    for i in range(3):
        if mode == "official":
            for _ in range(mc):
                with wrapped.sampled_params(train=True):
                    wrapped.zero_grad()
                    loss_fn(model_b, i).backward()
            wrapped.step()
        else:
            loss_fn(model_b, i).backward()
            opt_b.step()  # Lightning's wrapper reaches the optimizer's own step
            wrapped.zero_grad()
    assert "_count" not in vars(wrapped) and "_pending_draw" not in vars(wrapped)
    assert_same_run(model_a, opt_a, model_b, opt_b)
    with wrapped.mean_params():
        assert all(torch.equal(p, opt_b.state[p]["mean"]) for p in model_b.parameters())
    assert wrapped.state_dict()["ivon"]["step"] == 3
    assert ivon_fast.unwrap(wrapped) is opt_b


def test_betas_out_of_range_from_a_scheduler_is_refused_before_any_change():
    model, opt = build("dropin")
    dropin_iter(model, opt, 0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.param_groups[0]["betas"] = (1.0, HP["beta2"])
    loss_fn(model, 1).backward()
    with pytest.raises(ValueError, match=r"Invalid beta1: 1\.0"):
        opt.step()
    assert opt.param_groups[0]["beta1"] == HP["beta1"]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_samples_taken_counts_the_samples_of_the_coming_step():
    model, opt = build("official", mc=3)
    assert opt.samples_taken == 0
    for taken in range(1, 4):
        with opt.sampled_params(train=True):
            opt.zero_grad()
            loss_fn(model, 0).backward()
        assert opt.samples_taken == taken
    opt.step()
    assert opt.samples_taken == 0
    model, opt = build("dropin")
    assert opt.samples_taken == 1  # the sample the params hold
    dropin_iter(model, opt, 0)
    assert opt.samples_taken == 1
