"""Gradient accumulation under the real ``accelerate.Accelerator.accumulate()`` (Note [gradient
accumulation] in ``ivon_fast/optimizer.py``).

accelerate divides each micro-batch's loss by the accumulation steps and skips the optimizer's
``step()`` and ``zero_grad()`` until the last micro-batch. The expectation is the hand-written
loop that accumulates the micro-batches' scaled losses into one sample's gradient, bit for bit.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import ivon_fast
from ivon_fast import IVON

accelerate = pytest.importorskip("accelerate")

MICRO = 2
X = torch.randn(4 * MICRO * 3, 5, generator=torch.Generator().manual_seed(0))


def build(mode: str, mc: int = 1):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = IVON(model.parameters(), lr=0.05, ess=50.0, mc_samples=mc, seed=3,
               resample_on_step=mode == "dropin", backend="reference")
    return model, opt


def micro_batches(step: int):
    return [X[(step * MICRO + i) * 4:(step * MICRO + i + 1) * 4] for i in range(MICRO)]


def loss_of(model, batch):
    return model(batch).pow(2).mean()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps its gradient state in a process-wide singleton."""
    yield
    accelerate.state.GradientState._reset_state()
    accelerate.state.AcceleratorState._reset_state(True)


def with_accelerate(mode: str, steps: int, mc: int = 1, zero_grad_in_block: bool = False):
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=MICRO)
    model, opt = accelerator.prepare(*build(mode, mc))
    for step in range(steps):
        for batch in micro_batches(step):
            with accelerator.accumulate(model):
                if mode == "official":
                    with ivon_fast.sampled_params(opt, train=True):
                        if zero_grad_in_block:
                            opt.zero_grad()
                        accelerator.backward(loss_of(model, batch))
                else:
                    accelerator.backward(loss_of(model, batch))
                opt.step()
                opt.zero_grad()   # accelerate's pattern: after the step
    return accelerator.unwrap_model(model), ivon_fast.unwrap(opt)


def by_hand(mode: str, steps: int):
    """One sample per step; its gradient is the micro-batches' scaled losses, accumulated."""
    model, opt = build(mode)
    for step in range(steps):
        if mode == "official":
            with opt.sampled_params(train=True):
                opt.zero_grad()
                for batch in micro_batches(step):
                    (loss_of(model, batch) / MICRO).backward()
        else:
            for batch in micro_batches(step):
                (loss_of(model, batch) / MICRO).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_accumulate_trains_like_one_sample_over_the_micro_batches(mode):
    model, opt = with_accelerate(mode, 3)
    expected, expected_opt = by_hand(mode, 3)
    assert opt.current_step == expected_opt.current_step == 3
    for a, b in zip(model.parameters(), expected.parameters()):
        assert torch.equal(a, b)


def test_accumulate_with_several_samples_is_an_error_that_shows_the_pattern():
    with pytest.raises(RuntimeError, match="gradient accumulation") as caught:
        with_accelerate("official", 1, mc=2)
    assert "for micro_batch in micro_batches" in str(caught.value)


def test_zero_grad_inside_a_later_micro_batch_block_is_an_error_that_shows_the_pattern():
    """The official loop's habit (zero_grad() first in the block) would clear the earlier
    micro-batches' gradient on the last micro-batch, where accelerate lets zero_grad() through."""
    with pytest.raises(RuntimeError, match="clear the gradient of the step's earlier") as caught:
        with_accelerate("official", 1, zero_grad_in_block=True)
    assert "optimizer.zero_grad()" in str(caught.value).splitlines()[-1]


def test_more_training_samples_than_mc_samples_warn_without_accumulate():
    """Two blocks and mc_samples=1, no accumulate(): two Monte Carlo samples (as ivon-opt), with
    a warning that names gradient accumulation and its pattern."""
    model, opt = build("official")
    with pytest.warns(UserWarning, match="training sample 2 for one step with mc_samples=1"):
        for batch in micro_batches(0):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                loss_of(model, batch).backward()
    opt.step()
    assert opt.current_step == 1
