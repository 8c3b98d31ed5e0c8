"""The posterior as an object (``IVON.posterior()``, ``ivon_fast.Posterior``), merging, and the
module-level helpers that see through optimizer wrappers.

Expectations: sigma = 1 / sqrt(ess (h + delta)) by hand from the optimizer's state, the
evaluation samples regenerated from the noise spec (``reference.philox_normal``), and merges
computed by hand from explicit numbers.
"""
from __future__ import annotations

import math

import pytest
import torch

import ivon_fast
from ivon_fast import IVON, Posterior, merge, reference
from ivon_fast.noise import EVAL_DRAW_BASE

from test_optimizer import HP, loss_fn, make_model, train


def _trained(mode="official", steps=3, frozen=False, two_groups=False):
    model = make_model(0, frozen=frozen)
    if two_groups:
        params = [{"params": [model.scale, model.odd], "ess": 50.0, "weight_decay": 1e-2},
                  {"params": list(model.body.parameters())}]
        if frozen:
            params[1]["params"].append(model.frozen)
    else:
        params = model.parameters()
    opt = IVON(params, **HP, backend="reference", seed=5, resample_on_step=(mode == "dropin"))
    train(model, opt, mode, 0, steps)
    return model, opt


def _params_in_order(opt):
    return [p for group in opt.param_groups for p in group["params"]]


@pytest.mark.parametrize("two_groups", [False, True])
def test_posterior_holds_the_mean_and_sigma_by_hand(two_groups):
    model, opt = _trained(two_groups=two_groups, frozen=True)
    posterior = opt.posterior()
    params = _params_in_order(opt)
    assert len(posterior.mean) == len(posterior.std) == len(params)
    for group in opt.param_groups:
        for p in group["params"]:
            index = next(i for i, q in enumerate(params) if q is p)
            state = opt.state.get(p, {})
            assert posterior.mean[index].shape == p.shape
            # a param frozen at construction has no state (it waits): its mean is its value
            assert torch.equal(posterior.mean[index], state["mean"] if p.requires_grad else p)
            if p.requires_grad:
                by_hand = 1.0 / torch.sqrt(group["ess"] * (state["hess"].double()
                                                           + group["weight_decay"]))
                torch.testing.assert_close(posterior.std[index].double(), by_hand, rtol=1e-6,
                                           atol=0)
            else:
                assert torch.equal(posterior.std[index], torch.zeros_like(p))


def test_a_param_frozen_after_training_has_no_spread():
    """Frozen, it is never perturbed again: its posterior is its value, with std 0."""
    model, opt = _trained()
    param = _params_in_order(opt)[0]
    param.requires_grad_(False)
    posterior = opt.posterior()
    assert torch.equal(posterior.std[0], torch.zeros_like(param))
    assert torch.equal(posterior.mean[0], param.detach())


def test_posterior_is_a_copy():
    model, opt = _trained()
    posterior = opt.posterior()
    saved = [m.clone() for m in posterior.mean], [s.clone() for s in posterior.std]
    train(model, opt, "official", 3, 2)
    assert all(torch.equal(a, b) for a, b in zip(saved[0], posterior.mean))
    assert all(torch.equal(a, b) for a, b in zip(saved[1], posterior.std))
    assert not torch.equal(opt.posterior().mean[2], posterior.mean[2])


@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_posterior_std_is_the_spread_the_optimizer_samples_with(mode):
    """An evaluation sample is mean + eps * std with eps from the noise spec."""
    model, opt = _trained(mode)
    posterior = opt.posterior()
    with opt.sampled_params():
        samples = [p.detach().clone() for p in _params_in_order(opt)]
    offset = 0
    for sample, mean, std in zip(samples, posterior.mean, posterior.std):
        eps = reference.philox_normal(opt.seed, EVAL_DRAW_BASE, offset, mean.numel())
        torch.testing.assert_close(sample.reshape(-1), (mean + eps.reshape(mean.shape) * std)
                                   .reshape(-1), rtol=1e-5, atol=1e-6)
        offset += mean.numel()


def test_posterior_inside_a_block_is_an_error():
    model, opt = _trained()
    with opt.sampled_params():
        with pytest.raises(RuntimeError, match="posterior"):
            opt.posterior()


def test_save_and_load_round_trip(tmp_path):
    """Means, stds and names come back; a posterior saved before names (format /1) loads
    without them."""
    model, opt = _trained(frozen=True)
    posterior = opt.posterior(model)
    assert posterior.names == [name for name, _ in model.named_parameters()]
    path = tmp_path / "posterior.pt"
    posterior.save(path)
    loaded = Posterior.load(path)
    assert all(torch.equal(a, b) for a, b in zip(posterior.mean, loaded.mean))
    assert all(torch.equal(a, b) for a, b in zip(posterior.std, loaded.std))
    assert loaded.names == posterior.names and loaded.live_params() is None
    assert [p.name for p in tmp_path.iterdir()] == ["posterior.pt"]  # no temporary left
    torch.save({"format": "ivon_fast.Posterior/1", "mean": loaded.mean, "std": loaded.std}, path)
    assert Posterior.load(path).names is None


def test_names_come_from_the_model_or_from_named_parameters():
    """opt.posterior(model) names each param by model.named_parameters(); an optimizer built
    from named_parameters() knows them itself; otherwise a posterior has no names."""
    model = make_model(0)
    named = IVON(model.named_parameters(), lr=0.1, ess=10.0, backend="reference")
    want = [name for name, _ in model.named_parameters()]
    assert named.posterior().names == want
    plain = IVON(make_model(0).parameters(), lr=0.1, ess=10.0, backend="reference")
    assert plain.posterior().names is None
    with pytest.raises(ValueError, match="not a parameter of model"):
        plain.posterior(model)


def test_loading_something_else_is_a_clear_error(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(make_model(0).state_dict(), path)
    with pytest.raises(ValueError, match="Posterior"):
        Posterior.load(path)


def test_a_posterior_checks_its_shapes():
    with pytest.raises(ValueError, match="2 means but 1"):
        Posterior(mean=[torch.zeros(2), torch.zeros(3)], std=[torch.ones(2)])
    with pytest.raises(ValueError, match="shape"):
        Posterior(mean=[torch.zeros(2)], std=[torch.ones(3)])


# ----------------------------------------------------------------------------- merging

def test_merge_is_precision_weighted_by_hand():
    # element 0: m = 1, s = 1 (precision 1) and m = 3, s = 0.5 (precision 4):
    #   mean = (1 * 1 + 3 * 4) / 5 = 2.6, std = 1 / sqrt(5)
    # element 1: equal precisions 4 and 4: the plain average 0, std 1 / sqrt(8)
    a = Posterior(mean=[torch.tensor([1.0, -1.0])], std=[torch.tensor([1.0, 0.5])], names=["w"])
    b = Posterior(mean=[torch.tensor([3.0, 1.0])], std=[torch.tensor([0.5, 0.5])], names=["w"])
    merged = merge([a, b])
    torch.testing.assert_close(merged.mean[0], torch.tensor([2.6, 0.0]))
    torch.testing.assert_close(merged.std[0], torch.tensor([1 / math.sqrt(5), 1 / math.sqrt(8)]))


def test_merge_of_one_posterior_is_itself_and_of_copies_keeps_the_mean():
    model, opt = _trained()
    full = opt.posterior(model)
    posterior = Posterior(mean=full.mean[1:], std=full.std[1:], names=full.names[1:])
    alone = merge([posterior])
    for a, b in zip(alone.mean, posterior.mean):
        torch.testing.assert_close(a, b)
    twice = merge([posterior, posterior])
    for merged_std, std in zip(twice.std, posterior.std):
        torch.testing.assert_close(merged_std, std / math.sqrt(2))


def test_merging_models_fine_tuned_from_one_base():
    """Two runs from one base on different data: the merged mean lies between them, nearer
    the more certain one, element by element (the hand formula on the optimizers' state)."""
    posteriors = []
    for offset in (0, 2):
        model, opt = _trained()
        train(model, opt, "official", 10 + offset, 3)
        posteriors.append(opt.posterior(model))
    merged = merge(posteriors)
    for index in range(len(merged.mean)):
        (m1, s1), (m2, s2) = [(p.mean[index].double(), p.std[index].double())
                              for p in posteriors]
        w1, w2 = s1 ** -2, s2 ** -2
        torch.testing.assert_close(merged.mean[index].double(), (w1 * m1 + w2 * m2) / (w1 + w2),
                                   rtol=1e-6, atol=1e-7)


def test_merge_refuses_what_does_not_fit():
    """merge aligns by name and names the first param that does not fit; posteriors without
    names cannot be aligned safely and are refused."""
    one = Posterior(mean=[torch.zeros(2)], std=[torch.ones(2)], names=["a"])
    with pytest.raises(ValueError, match="at least one"):
        merge([])
    with pytest.raises(ValueError, match="extra 'b'"):
        merge([one, Posterior(mean=[torch.zeros(2)] * 2, std=[torch.ones(2)] * 2,
                              names=["a", "b"])])
    with pytest.raises(ValueError, match="missing 'a'"):
        merge([one, Posterior(mean=[torch.zeros(2)], std=[torch.ones(2)], names=["b"])])
    with pytest.raises(ValueError, match="param 'a' has shape"):
        merge([one, Posterior(mean=[torch.zeros(3)], std=[torch.ones(3)], names=["a"])])
    with pytest.raises(ValueError, match="frozen"):
        merge([one, Posterior(mean=[torch.zeros(2)], std=[torch.zeros(2)], names=["a"])])
    with pytest.raises(ValueError, match="not an ivon_fast.Posterior"):
        merge([one, {"mean": []}])
    with pytest.raises(ValueError, match="no param names"):
        merge([one, Posterior(mean=[torch.zeros(2)], std=[torch.ones(2)])])


def test_merge_aligns_by_name_not_by_order():
    """Two posteriors listing the same params in different orders merge param by param."""
    a = Posterior(mean=[torch.zeros(2), torch.ones(2)], std=[torch.ones(2)] * 2, names=["x", "y"])
    b = Posterior(mean=[torch.ones(2), torch.zeros(2)], std=[torch.ones(2)] * 2, names=["y", "x"])
    merged = merge([a, b])
    assert merged.names == ["x", "y"]
    assert torch.equal(merged.mean[0], torch.zeros(2)) and torch.equal(merged.mean[1],
                                                                         torch.ones(2))


# ----------------------------------------------------------------------------- wrappers

class _Wrapper:
    """What accelerate's AcceleratedOptimizer and Lightning's LightningOptimizer expose."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def step(self, closure=None):
        return self.optimizer.step(closure)


def test_helpers_see_through_wrappers():
    model, opt = _trained()
    wrapped = _Wrapper(_Wrapper(opt))
    assert ivon_fast.unwrap(wrapped) is opt
    with ivon_fast.mean_params(wrapped):
        assert all(torch.equal(p, opt.state[p]["mean"]) for p in model.parameters())
    with ivon_fast.sampled_params(wrapped, train=True):
        opt.zero_grad()
        loss_fn(model, 0).backward()
    wrapped.step()
    assert opt.current_step == 4
    assert torch.equal(ivon_fast.unwrap(wrapped).posterior().mean[0],
                       opt.state[_params_in_order(opt)[0]]["mean"])


def test_unwrap_refuses_other_optimizers():
    sgd = torch.optim.SGD(make_model(0).parameters(), lr=0.1)
    with pytest.raises(TypeError, match="SGD"):
        ivon_fast.unwrap(_Wrapper(sgd))
