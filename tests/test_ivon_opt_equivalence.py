"""ivon_fast's reference backend with rng='torch' equals ivon-opt 0.1.3 bit for bit (fp32)."""
import itertools

import pytest
import torch

import ivon
import ivon_fast


class SmallNet(torch.nn.Module):
    """A real little model with a scalar param and odd-shaped params."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(3, 5, kernel_size=3)
        self.fc1 = torch.nn.Linear(5 * 7, 13)
        self.fc2 = torch.nn.Linear(13, 4)
        self.temperature = torch.nn.Parameter(torch.tensor(1.3))

    def forward(self, x):
        hidden = torch.tanh(self.conv(x)).flatten(1)
        return self.fc2(torch.tanh(self.fc1(hidden))) * self.temperature


def _data():
    generator = torch.Generator().manual_seed(123)
    x = torch.randn(24, 3, 9, generator=generator)
    y = torch.randint(0, 4, (24,), generator=generator)
    return x, y


def _param_groups(model, grouped):
    if not grouped:
        return model.parameters()
    return [
        {"params": list(model.conv.parameters()) + [model.temperature], "lr": 0.05,
         "weight_decay": 0.0, "ess": 50.0},
        {"params": model.fc1.parameters(), "beta1": 0.8, "hess_init": 0.5},
        {"params": model.fc2.parameters(), "beta2": 0.999, "clip_radius": 0.01},
    ]


def _train(optimizer_class, steps, mc_samples, grouped, **options):
    torch.manual_seed(0)
    model = SmallNet()
    optimizer = optimizer_class(_param_groups(model, grouped), lr=0.1, ess=200.0,
                                mc_samples=mc_samples, **options)
    x, y = _data()
    torch.manual_seed(1)
    for _ in range(steps):
        for _ in range(mc_samples):
            with optimizer.sampled_params(train=True):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model._optimizer = optimizer  # for the export tests
    return model


OPTIONS = [
    dict(hess_approx=hess_approx, debias=debias, rescale_lr=rescale_lr)
    for hess_approx, debias, rescale_lr in itertools.product(
        ("price", "gradsq"), (True, False), (True, False))
]


@pytest.mark.parametrize("mc_samples", [1, 3])
@pytest.mark.parametrize("grouped", [False, True], ids=["one_group", "three_groups"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_trajectory_equals_ivon_opt_bitwise(options, grouped, mc_samples):
    expected = _train(ivon.IVON, 10, mc_samples, grouped, **options)
    actual = _train(ivon_fast.IVON, 10, mc_samples, grouped, backend="reference", rng="torch",
                    **options)
    for (name, want), got in zip(expected.named_parameters(), actual.parameters()):
        assert torch.equal(want, got), f"{name} differs by {(want - got).abs().max().item()}"


@pytest.mark.parametrize("extra", [dict(clip_radius=1e-3), dict(weight_decay=0.0),
                                   dict(clip_radius=0.05, weight_decay=0.0, hess_approx="gradsq")])
def test_finite_clip_radius_and_zero_weight_decay_bitwise(extra):
    expected = _train(ivon.IVON, 12, 1, False, **extra)
    actual = _train(ivon_fast.IVON, 12, 1, False, backend="reference", rng="torch", **extra)
    for want, got in zip(expected.parameters(), actual.parameters()):
        assert torch.equal(want, got)


def test_training_moves_the_params_so_equality_is_not_trivial():
    torch.manual_seed(0)
    initial = [p.detach().clone() for p in SmallNet().parameters()]
    trained = _train(ivon_fast.IVON, 10, 1, False, backend="reference", rng="torch")
    assert all(not torch.equal(a, b) for a, b in zip(initial, trained.parameters()))


def _continue(model, optimizer, steps, mc_samples, x, y, seed=2):
    torch.manual_seed(seed)
    for _ in range(steps):
        for _ in range(mc_samples):
            with optimizer.sampled_params(train=True):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def _sample(model, optimizer, x, y, seed):
    torch.manual_seed(seed)
    with optimizer.sampled_params(train=True):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize("taken", [0, 1, 2], ids=["between_steps", "one_of_two_samples",
                                                  "before_the_step"])
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
def test_ivon_opt_takes_our_exported_state_and_continues_bit_for_bit(hess_approx, taken):
    """Trained by us (ivon-opt's noise), exported, loaded into ivon-opt: ivon-opt's next steps
    equal ours, three param groups; exported between steps or after some of a step's samples
    (the last one still pending in our optimizer: the export folds it in, as ivon-opt has)."""
    x, y = _data()
    ours = _train(ivon_fast.IVON, 3, 2, True, backend="reference", rng="torch",
                  hess_approx=hess_approx)
    ours_opt = ours._optimizer
    for sample in range(taken):
        _sample(ours, ours_opt, x, y, seed=5 + sample)
    exported = ours_opt.ivon_opt_state_dict()
    theirs = SmallNet()
    theirs.load_state_dict(ours.state_dict())   # the params are the mean
    theirs_opt = ivon.IVON(_param_groups(theirs, True), lr=0.1, ess=200.0, mc_samples=2,
                           hess_approx=hess_approx)
    theirs_opt.load_state_dict(exported)
    theirs_opt.current_step = ours_opt.current_step
    assert theirs_opt.state["count"] == taken
    for model, optimizer in ((ours, ours_opt), (theirs, theirs_opt)):
        for sample in range(taken, 2 if taken else 0):   # the rest of the step
            _sample(model, optimizer, x, y, seed=5 + sample)
        if taken:
            optimizer.step()
        _continue(model, optimizer, 2, 2, x, y)
    for (name, want), got in zip(theirs.named_parameters(), ours.parameters()):
        assert torch.equal(want, got), name


def test_an_export_ivon_opt_cannot_hold_is_refused():
    model = SmallNet()
    prior = [torch.zeros_like(p) for p in model.parameters()]
    opt = ivon_fast.IVON(model.parameters(), lr=0.1, ess=10.0, prior_mean=prior)
    with pytest.raises(RuntimeError, match="prior_mean or prior_precision; ivon-opt"):
        opt.ivon_opt_state_dict()
    mixed = ivon_fast.IVON([{"params": model.fc1.parameters()},
                            {"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))]}],
                           lr=0.1, ess=10.0)
    with pytest.raises(RuntimeError, match="several dtypes or devices"):
        mixed.ivon_opt_state_dict()
