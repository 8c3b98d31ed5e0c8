"""Copies of a model and its optimizer (``copy.deepcopy``, pickle), as torch.optim.AdamW allows.

The expectation is the original itself: a copied (model, optimizer) pair trains bit for bit as the
original goes on training, a lone copy of the optimizer has the original's state dict, and no
integration leaves something on the model that cannot be copied.
"""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn

from ivon_fast import IVON

X, Y = torch.randn(16, 5, generator=torch.Generator().manual_seed(1)), None


def build(mode: str, backend: str = "reference", rng: str = "philox"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    model.extra = nn.Parameter(torch.randn(3))   # a second param group, its own bucket
    groups = [{"params": list(model[0].parameters()) + list(model[2].parameters())},
              {"params": [model.extra], "lr": 0.05}]
    opt = IVON(groups, lr=0.1, ess=50.0, mc_samples=2 if mode == "official" else 1,
               resample_on_step=mode == "dropin", backend=backend, rng=rng, seed=7)
    return model, opt


def loss_of(model):
    return ((model(X) - 1.0) ** 2).mean() + (model.extra ** 2).sum()


def train(model, opt, mode: str, steps: int) -> None:
    for _ in range(steps):
        if mode == "official":
            for _ in range(opt.mc_samples):
                with opt.sampled_params(train=True):
                    opt.zero_grad()
                    loss_of(model).backward()
        else:
            opt.zero_grad()
            loss_of(model).backward()
        opt.step()


def pickled(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)  # pickle, with torch's tensor handling
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {"deepcopy": copy.deepcopy, "pickle": pickled,
          "plain_pickle": lambda obj: pickle.loads(pickle.dumps(obj))}


def assert_same_state(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index in a["state"]:
        for name, value in a["state"][index].items():
            other = b["state"][index][name]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, name


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("mode", ["official", "dropin"])
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=pytest.mark.cpp)])
def test_a_copied_pair_trains_bit_for_bit_as_the_original(mode, backend, how):
    model, opt = build(mode, backend)
    train(model, opt, mode, 2)
    model_copy, opt_copy = COPIES[how]((model, opt))
    train(model, opt, mode, 3)
    train(model_copy, opt_copy, mode, 3)
    copies = dict(model_copy.named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(param, copies[name]), name
        for key, value in opt.state[param].items():  # torch.optim's per-param state, live
            assert torch.equal(value, opt_copy.state[copies[name]][key]), (name, key)
    assert_same_state(opt.state_dict(), opt_copy.state_dict())


@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_a_copy_made_between_backward_and_step_takes_the_same_step(mode):
    """The gradient lives in the optimizer's buffer: the copy has it (a copied Parameter alone
    has none); official loop: after the sampled blocks, one sample pending."""
    model, opt = build(mode)
    train(model, opt, mode, 1)
    for _ in range(opt.mc_samples if mode == "official" else 0):
        with opt.sampled_params(train=True):
            opt.zero_grad()
            loss_of(model).backward()
    if mode == "dropin":
        opt.zero_grad()
        loss_of(model).backward()
    model_copy, opt_copy = copy.deepcopy((model, opt))
    opt.step()
    opt_copy.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model_copy.parameters()))


def test_a_copy_made_at_rest_knows_that_no_gradient_arrived():
    """Note [a step without a gradient]: a copy's gradient versions start afresh, yet a step
    without a backward does nothing in the copy as in the original."""
    model, opt = build("dropin")
    train(model, opt, "dropin", 2)
    model_copy, opt_copy = copy.deepcopy((model, opt))
    for one_model, one_opt in ((model, opt), (model_copy, opt_copy)):
        before = [p.detach().clone() for p in one_model.parameters()]
        one_opt.step()
        assert one_opt.current_step == 2
        assert all(torch.equal(p, b) for p, b in zip(one_model.parameters(), before))


def test_a_copy_keeps_a_write_it_has_not_seen_yet():
    """A write to a param before the copy becomes the copy's mean, as it does the original's."""
    model, opt = build("official")
    train(model, opt, "official", 1)
    with torch.no_grad():
        model[0].bias.fill_(0.25)
    model_copy, opt_copy = copy.deepcopy((model, opt))
    train(model, opt, "official", 1)
    train(model_copy, opt_copy, "official", 1)
    assert torch.equal(model[0].bias, model_copy[0].bias)
    assert_same_state(opt.state_dict(), opt_copy.state_dict())


def test_the_copy_is_independent_and_its_params_own_their_storage():
    model, opt = build("dropin")
    train(model, opt, "dropin", 1)
    model_copy, opt_copy = copy.deepcopy((model, opt))
    # the copy's params and grads are where its buffers expect them: the step's fast path
    assert opt_copy._layout.unchanged()
    before = [p.detach().clone() for p in model.parameters()]
    train(model_copy, opt_copy, "dropin", 2)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    storages = {p.untyped_storage().data_ptr() for p in model_copy.parameters()}
    assert len(storages) == len(list(model_copy.parameters()))
    for param in model_copy.parameters():
        assert param.untyped_storage().nbytes() == param.numel() * param.element_size()


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_lone_copy_has_the_original_state_dict(how):
    model, opt = build("official")
    train(model, opt, "official", 2)
    assert_same_state(opt.state_dict(), COPIES[how](opt).state_dict())


def test_a_copy_with_ivon_opt_noise_draws_the_same_noise():
    """rng='torch' draws from torch's generator: both runs start from one generator state."""
    model, opt = build("official", rng="torch")
    train(model, opt, "official", 1)
    model_copy, opt_copy = copy.deepcopy((model, opt))
    state = torch.get_rng_state()
    train(model, opt, "official", 2)
    torch.set_rng_state(state)
    train(model_copy, opt_copy, "official", 2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model_copy.parameters()))


def test_torch_hooks_are_left_out_of_a_copy_as_torch_optim_leaves_them():
    model, opt = build("dropin")
    opt.register_step_post_hook(lambda *args: None)  # a lambda cannot be pickled
    copied = pickle.loads(pickle.dumps(opt))
    assert not copied._optimizer_step_post_hooks
    train(model, opt, "dropin", 1)  # the original keeps its hook
    assert opt._optimizer_step_post_hooks


class Points(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        return {"x": X[index], "labels": torch.tensor(index % 2)}


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(5, 2)

    def forward(self, x, labels=None):
        logits = self.layer(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def test_a_model_trained_with_the_hf_callback_can_be_copied(tmp_path):
    transformers = pytest.importorskip("transformers")
    from ivon_fast.integrations.hf import IVONCallback

    model = Classifier()
    opt = IVON(model.parameters(), lr=0.05, ess=100.0, resample_on_step=True, seed=1)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, use_cpu=True,
        report_to=[], save_strategy="no", disable_tqdm=True)
    callback = IVONCallback()
    transformers.Trainer(model=model, args=args, train_dataset=Points(), optimizers=(opt, None),
                         callbacks=[callback]).train()
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(copied.layer.weight, model.layer.weight)  # the mean, after training
        copied.load_state_dict(model.state_dict())   # the copy's hook does nothing
    assert callback._phase is not None   # the original's evaluation phase is still open
    model.load_state_dict(model.state_dict())   # the original's hook ends it
    assert callback._phase is None
