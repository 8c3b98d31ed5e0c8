"""Predictive distributions and calibration (``ivon_fast.predictive``).

Expectations are independent of the code under test: model outputs by hand at the posterior's
values (``torch.func.functional_call``), samples regenerated from the documented draw order,
metrics computed by hand from explicit numbers, and training runs compared bit for bit with
runs that never called ``predict``.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from ivon_fast import IVON, Posterior
from ivon_fast.predictive import NLL_FLOOR, calibration, predict, reliability

N, FEATURES, CLASSES = 20, 4, 3


def make_model(seed=0, frozen=False, dropout=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(FEATURES, 8), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(0.2))
    layers.append(nn.Linear(8, CLASSES))
    model = nn.Sequential(*layers)
    if frozen:
        model[0].bias.requires_grad_(False)
    return model


def make_data(seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(N, FEATURES, generator=generator)
    y = torch.randint(0, CLASSES, (N,), generator=generator)
    return x, y


def make_loader(x, y):
    return DataLoader(TensorDataset(x, y), batch_size=6, shuffle=False)  # 6, 6, 6, 2


def make_ivon(params, mode="official"):
    return IVON(params, lr=0.1, ess=100.0, backend="reference", seed=3,
                resample_on_step=(mode == "dropin"))


def train_step(model, opt, mode, x, y, between=None):
    """One training step; ``between`` runs after the gradient, before ``step()``."""
    loss_fn = nn.functional.cross_entropy
    if mode == "official":
        with opt.sampled_params(train=True):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
        if between is not None:
            between()
        opt.step()
    else:
        loss_fn(model(x), y).backward()
        if between is not None:
            between()
        opt.step()
        opt.zero_grad()


def trained(mode="official", frozen=False, groups=None, steps=3, dropout=False):
    model = make_model(frozen=frozen, dropout=dropout)
    opt = make_ivon(model.parameters() if groups is None else groups(model), mode)
    x, y = make_data()
    for _ in range(steps):
        train_step(model, opt, mode, x, y)
    return model, opt


def opt_params(opt):
    return [p for group in opt.param_groups for p in group["params"]]


def probs_at(model, params, values, x):
    """softmax(model(x)) with each param of ``params`` at the given value, by hand."""
    names = {id(p): name for name, p in model.named_parameters()}
    state = {names[id(p)]: v.to(p.dtype) for p, v in zip(params, values)}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return functional_call(model, state, (x,)).float().softmax(-1)
    finally:
        model.train(was_training)


def snapshot(model):
    return [(p.data_ptr(), p.detach().clone()) for p in model.parameters()]


def assert_same_params(model, before):
    for p, (ptr, saved) in zip(model.parameters(), before):
        assert p.data_ptr() == ptr
        assert torch.equal(p.detach().view(torch.uint8), saved.view(torch.uint8))  # bitwise


def reversed_groups(model):
    """Two groups in the reverse of the model's order (the posterior's order differs)."""
    return [{"params": list(model[2].parameters())},
            {"params": list(model[0].parameters()), "ess": 50.0}]


# ---------------------------------------------------------------------------- predict

@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_mean_pass_equals_model_at_posterior_mean(mode):
    model, opt = trained(mode, groups=reversed_groups)
    x, y = make_data()
    posterior = opt.posterior()
    probs, targets = predict(model, opt, make_loader(x, y), progress=False)
    assert probs.dtype == torch.float32 and probs.device.type == "cpu"
    assert targets.dtype == torch.int64 and torch.equal(targets, y)
    expected = probs_at(model, opt_params(opt), posterior.mean, x)
    torch.testing.assert_close(probs, expected, rtol=1e-6, atol=1e-7)
    if mode == "dropin":  # the params hold a sample, not the mean: the pass must not use them
        with torch.no_grad():
            assert not torch.allclose(model(x).softmax(-1), expected)


def test_samples_average_regenerated_by_hand():
    model, opt = trained(frozen=True, groups=reversed_groups)
    x, y = make_data()
    posterior = opt.posterior()
    assert any(bool((s == 0).all()) for s in posterior.std)  # the frozen bias
    samples, seed = 3, 7
    probs, _ = predict(model, opt, make_loader(x, y), samples=samples, seed=seed, progress=False)

    generator = torch.Generator().manual_seed(seed)
    by_hand = torch.zeros(N, CLASSES, dtype=torch.float64)
    for _ in range(samples):  # sample by sample, param by param, frozen params draw too
        values = [torch.where(s == 0, m, m + s * torch.randn(m.shape, dtype=m.dtype,
                                                             generator=generator))
                  for m, s in zip(posterior.mean, posterior.std)]
        by_hand += probs_at(model, opt_params(opt), values, x).double()
    torch.testing.assert_close(probs, (by_hand / samples).float(), rtol=1e-6, atol=1e-7)
    mean_probs, _ = predict(model, opt, make_loader(x, y), progress=False)
    assert not torch.allclose(probs, mean_probs)  # the samples moved something


def test_bf16_params_use_the_fp32_mean_rounded():
    model = make_model().to(torch.bfloat16)
    opt = make_ivon(model.parameters())
    x, y = make_data()
    for _ in range(2):
        train_step(model, opt, "official", x.bfloat16(), y)
    posterior = opt.posterior()
    assert posterior.mean[0].dtype == torch.float32  # the master mean
    before = snapshot(model)
    bf16_forward = lambda m, b: (m(b[0].bfloat16()), b[1])  # noqa: E731
    probs, _ = predict(model, opt, make_loader(x, y), progress=False, forward=bf16_forward)
    assert_same_params(model, before)
    expected = probs_at(model, opt_params(opt), posterior.mean, x.bfloat16())
    torch.testing.assert_close(probs, expected, rtol=1e-6, atol=1e-7)
    probs, _ = predict(model, opt, make_loader(x, y), samples=2, progress=False,
                       forward=bf16_forward)
    generator = torch.Generator().manual_seed(0)
    by_hand = 0
    for _ in range(2):
        values = [m + s * torch.randn(m.shape, dtype=m.dtype, generator=generator)
                  for m, s in zip(posterior.mean, posterior.std)]
        by_hand = by_hand + probs_at(model, opt_params(opt), values, x.bfloat16()).double() / 2
    torch.testing.assert_close(probs, by_hand.float(), rtol=1e-6, atol=1e-7)
    assert_same_params(model, before)


def test_deterministic_given_seed():
    model, opt = trained()
    loader = make_loader(*make_data())
    run = lambda **kw: predict(model, opt, loader, progress=False, **kw)[0]  # noqa: E731
    assert torch.equal(run(samples=2, seed=5), run(samples=2, seed=5))
    assert not torch.equal(run(samples=2, seed=5), run(samples=2, seed=6))
    assert torch.equal(run(samples=0, seed=5), run(samples=0, seed=6))  # the mean has no noise
    torch.manual_seed(123)  # torch's global generator plays no part
    first = run(samples=2, seed=5)
    torch.manual_seed(456)
    assert torch.equal(first, run(samples=2, seed=5))


def test_posterior_source_matches_optimizer_source():
    model, opt = trained()  # one group in model order: the Posterior lines up with parameters()
    loader = make_loader(*make_data())
    posterior = opt.posterior()
    for samples in (0, 2):
        from_opt = predict(model, opt, loader, samples=samples, progress=False)[0]
        from_posterior = predict(model, posterior, loader, samples=samples, progress=False)[0]
        assert torch.equal(from_opt, from_posterior)

    class Wrapper:  # what Lightning's and accelerate's wrappers look like
        def __init__(self, optimizer):
            self.optimizer = optimizer

    assert torch.equal(predict(model, Wrapper(opt), loader, progress=False)[0],
                       predict(model, opt, loader, progress=False)[0])


@pytest.mark.parametrize("mode", ["official", "dropin"])
@pytest.mark.parametrize("where", ["between_steps", "mid_step"])
def test_restores_params_and_leaves_training_unaffected(mode, where):
    x, y = make_data()
    loader = make_loader(x, y)

    def failing_forward(model, batch):
        failing_forward.calls += 1
        if failing_forward.calls == 6:  # in the second pass
            raise RuntimeError("boom")
        return model(batch[0]), batch[1]

    def predict_calls(model, opt):
        model[2].eval()  # a submodule in another mode than its parent: each flag comes back
        before, rng = snapshot(model), torch.get_rng_state()
        predict(model, opt, loader, samples=2, seed=1, progress=False)
        predict(model, opt, loader, samples=0, progress=False)
        failing_forward.calls = 0
        with pytest.raises(RuntimeError, match="boom"):
            predict(model, opt, loader, samples=3, progress=False, forward=failing_forward)
        assert failing_forward.calls == 6
        assert_same_params(model, before)
        assert model.training and model[0].training and not model[2].training
        assert torch.equal(torch.get_rng_state(), rng)
        model[2].train()

    runs = []
    for call in (False, True):
        model = make_model(dropout=True)  # dropout: the next step reads torch's global RNG
        opt = make_ivon(model.parameters(), mode)
        model.train()
        torch.manual_seed(0)
        for step in range(4):
            between = None
            if call and where == "mid_step" and step in (1, 2):
                between = lambda: predict_calls(model, opt)  # noqa: E731
            if call and where == "between_steps" and step in (1, 2):
                predict_calls(model, opt)
            train_step(model, opt, mode, x, y, between)
        runs.append((model, opt))
    (model_a, opt_a), (model_b, opt_b) = runs
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(opt_params(opt_a), opt_params(opt_b)):
        for key in ("mean", "momentum", "hess"):
            assert torch.equal(opt_a.state[p][key], opt_b.state[q][key])


def test_frozen_param_untouched():
    model, opt = trained(frozen=True)
    frozen = model[0].bias
    original = frozen.detach().clone()
    index = next(i for i, p in enumerate(opt_params(opt)) if p is frozen)
    assert bool((opt.posterior().std[index] == 0).all())
    seen = []
    model[0].register_forward_hook(lambda module, args, out: seen.append(module.bias.clone()))
    predict(model, opt, make_loader(*make_data()), samples=3, progress=False)
    assert len(seen) == 3 * 4
    assert all(torch.equal(value, original) for value in seen)
    assert torch.equal(frozen, original)
    weights_seen = []
    model[2].register_forward_hook(lambda module, args, out:
                                   weights_seen.append(module.weight.clone()))
    predict(model, opt, make_loader(*make_data()), samples=2, progress=False)
    assert not torch.equal(weights_seen[0], weights_seen[-1])  # trainable ones do move


def test_posterior_source_that_does_not_fit_is_refused_naming_the_param():
    """A named posterior is matched by name (a param model lacks, or of another shape, is
    named); an unnamed one only to the live params it was built from; nothing moves."""
    model, opt = trained()
    loader = make_loader(*make_data())
    posterior = opt.posterior(model)
    before = snapshot(model)
    unnamed = Posterior(mean=posterior.mean, std=posterior.std)
    with pytest.raises(ValueError, match="no param names"):
        predict(model, unnamed, loader, progress=False)
    swapped = Posterior(mean=posterior.mean[::-1], std=posterior.std[::-1], names=posterior.names)
    with pytest.raises(ValueError, match=f"param '{posterior.names[0]}' has shape"):
        predict(model, swapped, loader, progress=False)
    renamed = posterior.with_names(["x." + name for name in posterior.names])
    with pytest.raises(ValueError, match="'x.0.weight' is not a parameter of model"):
        predict(model, renamed, loader, progress=False)
    other = make_model(seed=1)
    other_opt = make_ivon(other.parameters())
    with pytest.raises(ValueError, match="not a parameter of model"):
        predict(model, other_opt, loader, progress=False)
    with pytest.raises(ValueError, match="Invalid source"):
        predict(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, progress=False)
    assert_same_params(model, before)


@dataclass
class Output:
    logits: torch.Tensor


class Keyworded(nn.Module):
    """A model called with keyword inputs, returning an object with ``.logits``."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, features, scale):
        return Output(logits=self.body(features) * scale)


def test_dict_batch_with_labels_and_logits_output():
    model, opt = trained()
    x, y = make_data()
    wrapped = Keyworded(model)
    batches = [{"features": x[i:i + 6], "scale": torch.tensor(1.0), "labels": y[i:i + 6]}
               for i in range(0, N, 6)]
    probs, targets = predict(wrapped, opt, batches, samples=2, progress=False)
    expected, expected_targets = predict(model, opt, make_loader(x, y), samples=2,
                                         progress=False)
    assert torch.equal(targets, expected_targets)
    torch.testing.assert_close(probs, expected, rtol=0, atol=0)


def test_custom_forward_and_device():
    model, opt = trained()
    x, y = make_data()
    batches = [(x[i:i + 6], y[i:i + 6], "extra") for i in range(0, N, 6)]
    with pytest.raises(ValueError, match="forward="):
        predict(model, opt, batches, progress=False)
    probs, targets = predict(model, opt, batches, progress=False, device="cpu",
                             forward=lambda m, b: (m(b[0]), b[1]))
    assert torch.equal(targets, y)
    torch.testing.assert_close(probs, predict(model, opt, make_loader(x, y), progress=False)[0])
    with pytest.raises(ValueError, match="logits must be a floating tensor"):
        predict(model, opt, batches, progress=False, forward=lambda m, b: (m(b[0])[:, 0], b[1]))


def test_loader_that_changes_order_is_an_error():
    model, opt = trained()
    x, y = make_data()
    before = snapshot(model)
    shuffled = DataLoader(TensorDataset(x, y), batch_size=6, shuffle=True)
    with pytest.raises(ValueError, match="same order"):
        predict(model, opt, shuffled, samples=2, progress=False)

    class Shrinking:  # fewer batches on the second pass
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            return iter(list(make_loader(x, y))[: 5 - self.passes])

    with pytest.raises(ValueError, match="same order"):
        predict(model, opt, Shrinking(), samples=2, progress=False)
    with pytest.raises(ValueError, match="no batches"):
        predict(model, opt, [], progress=False)
    assert_same_params(model, before)


@pytest.mark.parametrize("kwargs, match", [
    ({"samples": -1}, "samples: expected an int >= 0"),
    ({"samples": 1.5}, "samples"),
    ({"samples": True}, "samples"),
    ({"seed": -1}, r"seed: expected an int in \[0, 2\*\*64 - 1\]"),
    ({"progress": "yes"}, "progress"),
    ({"forward": 3}, "forward"),
])
def test_predict_argument_errors(kwargs, match):
    model, opt = trained()
    calls = []
    loader = [calls.append(1)]  # touched only if predict runs
    with pytest.raises(ValueError, match=match):
        predict(model, opt, loader, **kwargs)


def test_progress_bar_with_and_without_tqdm(monkeypatch, capsys):
    model, opt = trained()
    loader = make_loader(*make_data())
    expected = predict(model, opt, loader, samples=2, progress=False)[0]
    assert torch.equal(predict(model, opt, loader, samples=2, progress=True)[0], expected)
    assert "8/8" in capsys.readouterr().err  # 2 passes x 4 batches
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails
    assert torch.equal(predict(model, opt, loader, samples=2, progress=True)[0], expected)
    assert "8/8" not in capsys.readouterr().err


# ---------------------------------------------------------------------------- calibration

# conf and bin (n_bins=5: [0, .2), [.2, .4), [.4, .6), [.6, .8), [.8, 1]), correct?
PROBS = torch.tensor([[0.70, 0.20, 0.10],    # .70, bin 3, target 0: right
                      [0.25, 0.65, 0.10],    # .65, bin 3, target 2: wrong
                      [0.50, 0.30, 0.20],    # .50, bin 2, target 0: right
                      [0.05, 0.05, 0.90],    # .90, bin 4, target 2: right
                      [0.45, 0.35, 0.20],    # .45, bin 2, target 1: wrong
                      [1.00, 0.00, 0.00]])   # 1.0, bin 4, target 1: wrong, p[target] = 0
TARGETS = torch.tensor([0, 2, 0, 2, 1, 1])


def test_calibration_by_hand():
    result = calibration(PROBS, TARGETS, n_bins=5)
    assert set(result) == {"accuracy", "nll", "ece", "brier"}
    assert all(type(value) is float for value in result.values())
    assert result["accuracy"] == pytest.approx(3 / 6)
    nll = -(math.log(0.7) + math.log(0.1) + math.log(0.5) + math.log(0.9) + math.log(0.35)
            + math.log(NLL_FLOOR)) / 6
    assert result["nll"] == pytest.approx(nll, rel=1e-6)
    brier = (0.14 + 1.295 + 0.38 + 0.015 + 0.665 + 2.0) / 6
    assert result["brier"] == pytest.approx(brier, rel=1e-6)
    # bins 2, 3, 4: (conf .475, acc .5), (.675, .5), (.95, .5), two examples each
    ece = (2 * 0.025 + 2 * 0.175 + 2 * 0.45) / 6
    assert result["ece"] == pytest.approx(ece, rel=1e-6)


def test_ece_agrees_with_torchmetrics_below_confidence_one():
    from torchmetrics.functional.classification import multiclass_calibration_error

    probs, targets = PROBS[:5], TARGETS[:5]  # no confidence of exactly 1.0
    ece = (2 * 0.025 + 2 * 0.175 + 1 * 0.1) / 5
    assert calibration(probs, targets, n_bins=5)["ece"] == pytest.approx(ece, rel=1e-6)
    generator = torch.Generator().manual_seed(0)
    probs = torch.randn(200, 4, generator=generator).mul(3).softmax(-1)
    targets = torch.randint(0, 4, (200,), generator=generator)
    for n_bins in (1, 7, 15):
        ours = calibration(probs, targets, n_bins=n_bins)["ece"]
        theirs = multiclass_calibration_error(probs, targets, num_classes=4, n_bins=n_bins,
                                              norm="l1")
        assert ours == pytest.approx(float(theirs), abs=1e-6)


def test_reliability_by_hand():
    bins = reliability(PROBS, TARGETS, n_bins=5)
    assert set(bins) == {"confidence", "accuracy", "count", "edges"}
    torch.testing.assert_close(bins["edges"], torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8, 1.0]))
    assert bins["count"].tolist() == [0, 0, 2, 2, 2]
    torch.testing.assert_close(bins["confidence"],
                               torch.tensor([0, 0, 0.475, 0.675, 0.95], dtype=torch.float64))
    torch.testing.assert_close(bins["accuracy"],
                               torch.tensor([0, 0, 0.5, 0.5, 0.5], dtype=torch.float64))
    one_bin = reliability(PROBS, TARGETS, n_bins=1)
    assert one_bin["count"].tolist() == [6]
    torch.testing.assert_close(one_bin["accuracy"], torch.tensor([0.5], dtype=torch.float64))


def test_calibration_of_predict_output():
    model, opt = trained()
    probs, targets = predict(model, opt, make_loader(*make_data()), samples=2, progress=False)
    result = calibration(probs, targets)
    assert 0 <= result["accuracy"] <= 1 and result["nll"] > 0 and 0 <= result["ece"] <= 1
    bins = reliability(probs, targets)
    assert int(bins["count"].sum()) == N


@pytest.mark.parametrize("probs, targets, n_bins, match", [
    (PROBS, TARGETS, 0, r"n_bins: expected an int >= 1"),
    (PROBS, TARGETS, 2.0, "n_bins"),
    (PROBS[0], TARGETS[:1], 5, r"probs: expected a floating tensor \[N, C\]"),
    (PROBS * 2, TARGETS, 5, "probs"),
    (torch.tensor([[0.5, 0.4]]), torch.tensor([0]), 5, "sum to 1"),
    (PROBS, torch.tensor([0, 2, 0, 2, 1, 3]), 5, r"targets: class indices must be in \[0, 2\]"),
    (PROBS, TARGETS[:5], 5, "targets"),
    (PROBS, TARGETS.float(), 5, "targets"),
])
def test_metric_argument_errors(probs, targets, n_bins, match):
    for function in (calibration, reliability):
        with pytest.raises(ValueError, match=match):
            function(probs, targets, n_bins=n_bins)


def test_missing_torchmetrics_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchmetrics", None)
    monkeypatch.setitem(sys.modules, "torchmetrics.functional", None)
    monkeypatch.setitem(sys.modules, "torchmetrics.functional.classification", None)
    with pytest.raises(ImportError, match="pip install torchmetrics"):
        calibration(PROBS, TARGETS)
    reliability(PROBS, TARGETS)  # needs no torchmetrics


@pytest.mark.parametrize("named", [True, False])
def test_a_saved_posterior_in_group_order_evaluates_the_right_weights(tmp_path, named):
    """Layer-wise lr groups listed top layer first put the posterior in another order than
    model.parameters(), with equal shapes in both orders: a named posterior, saved and loaded,
    predicts exactly what the optimizer does; an unnamed one is refused, never silently
    matched by order (it used to give the wrong weights)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(CLASSES, CLASSES), nn.Tanh(), nn.Linear(CLASSES, CLASSES))
    groups = [{"params": list(model[2].named_parameters(prefix="2")), "lr": 0.05},
              {"params": list(model[0].named_parameters(prefix="0")), "lr": 0.01}]
    if not named:
        groups = [{**g, "params": [p for _, p in g["params"]]} for g in groups]
    opt = IVON(groups, lr=0.1, ess=float(N), backend="reference")
    x = torch.randn(N, CLASSES, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, CLASSES, (N,), generator=torch.Generator().manual_seed(4))
    for _ in range(3):
        with opt.sampled_params(train=True):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    path = tmp_path / "posterior.pt"
    opt.posterior().save(path)
    loaded = Posterior.load(path)
    loader = make_loader(x, y)
    if not named:
        with pytest.raises(ValueError, match="no param names"):
            predict(model, loaded, loader, progress=False)
        return
    assert loaded.names == ["2.weight", "2.bias", "0.weight", "0.bias"]
    want = predict(model, opt, loader, samples=2, seed=5, progress=False)[0]
    assert torch.equal(predict(model, loaded, loader, samples=2, seed=5, progress=False)[0], want)


def test_a_confidence_exactly_on_a_bin_edge_goes_to_the_bin_it_opens():
    """Bin b is [edges[b], edges[b + 1]): a confidence equal to an inner edge (as float32, the
    dtype of the edges and of the binning) counts in the bin above it, 1.0 in the last bin."""
    n_bins = 5
    edges = torch.linspace(0, 1, n_bins + 1)
    confidences = [float(edges[b]) for b in range(3, n_bins)] + [1.0]   # >= 0.5: a top class
    probs = torch.tensor([[c, 1.0 - c] for c in confidences], dtype=torch.float32)
    targets = torch.zeros(len(confidences), dtype=torch.int64)
    bins = reliability(probs, targets, n_bins)
    assert bins["count"].tolist() == [0, 0, 0, 1, 2]
    ece = calibration(probs, targets, n_bins)["ece"]
    by_hand = (abs(1 - confidences[0]) + 2 * abs(1 - (confidences[1] + 1.0) / 2)) / 3
    assert ece == pytest.approx(by_hand, rel=1e-12)
