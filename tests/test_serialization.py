"""Serialization tools see each param as a tensor of its own (Note [params own their storage] in
``ivon_fast/_bucket.py``), with the real packages: safetensors, accelerate, transformers.

Expectations: the model's own values (every tensor written, each equal to the param it came
from), the bytes a module's params hold, and an uninterrupted run (a resumed run continues it
bit for bit).
"""
from __future__ import annotations

import contextlib
import io
import os

import pytest
import torch
import torch.nn as nn

import ivon_fast
from ivon_fast import IVON

safetensors_torch = pytest.importorskip("safetensors.torch")

DTYPES = [torch.float32, torch.bfloat16]
X = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Linear(64, 64))
        self.head = nn.Linear(64, 3)

    def forward(self, x):
        return self.head(self.body(x))


def build(mode: str, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    model = Net().to(dtype)
    opt = IVON(model.parameters(), lr=0.05, ess=100.0, resample_on_step=mode == "dropin",
               seed=11)
    return model, opt


def train(model, opt, mode: str, steps: int, backward=None) -> None:
    backward = backward or (lambda loss: loss.backward())
    for _ in range(steps):
        if mode == "official":
            with ivon_fast.sampled_params(opt, train=True):   # opt may be wrapped
                opt.zero_grad()
                backward(model(X.to(next(model.parameters()).dtype)).float().pow(2).mean())
        else:
            opt.zero_grad()
            backward(model(X.to(next(model.parameters()).dtype)).float().pow(2).mean())
        opt.step()


def tensors_of(model) -> dict:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_safetensors_save_model_and_load_model_round_trip(tmp_path, mode, dtype):
    model, opt = build(mode, dtype)
    train(model, opt, mode, 2)
    path = str(tmp_path / "model.safetensors")
    safetensors_torch.save_model(model, path)
    assert_same(safetensors_torch.load_file(path), tensors_of(model))  # every tensor written
    fresh, fresh_opt = build(mode, dtype, seed=1)   # a model with an optimizer over it
    safetensors_torch.load_model(fresh, path)
    assert_same(tensors_of(fresh), tensors_of(model))


def test_torch_save_of_a_sub_module_writes_only_its_bytes():
    model, opt = build("official", torch.float32)
    train(model, opt, "official", 1)
    buffer = io.BytesIO()
    torch.save(model.head.state_dict(), buffer)
    head_bytes = sum(p.numel() * p.element_size() for p in model.head.parameters())
    whole_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert buffer.tell() < head_bytes + 2048 < whole_bytes   # the head's 780 B, plus the zip
    buffer.seek(0)
    assert_same(torch.load(buffer), tensors_of(model.head))


def test_params_outlive_the_optimizer():
    model, opt = build("dropin", torch.float32)
    train(model, opt, "dropin", 1)
    values = tensors_of(model)
    del opt
    import gc
    gc.collect()
    torch.randn(1 << 16)   # memory freed by the optimizer would be reused here
    assert_same(tensors_of(model), values)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_accelerate_save_model_writes_every_tensor(tmp_path, mode, dtype):
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    model, opt = accelerator.prepare(*build(mode, dtype))
    train(model, opt, mode, 2, accelerator.backward)
    accelerator.save_model(model, str(tmp_path))   # safetensors, accelerate's default
    saved = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    assert_same(saved, tensors_of(accelerator.unwrap_model(model)))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_accelerate_save_state_and_load_state_resume_exactly(tmp_path, mode, dtype):
    accelerate = pytest.importorskip("accelerate")

    def prepared():
        accelerator = accelerate.Accelerator(cpu=True)
        return (accelerator, *accelerator.prepare(*build(mode, dtype)))

    accelerator, model, opt = prepared()
    train(model, opt, mode, 2, accelerator.backward)
    accelerator.save_state(str(tmp_path / "state"))   # its defaults: safetensors model file
    train(model, opt, mode, 2, accelerator.backward)

    accelerator, resumed, resumed_opt = prepared()
    accelerator.load_state(str(tmp_path / "state"))
    train(resumed, resumed_opt, mode, 2, accelerator.backward)
    assert_same(tensors_of(resumed), tensors_of(model))
    assert torch.equal(torch.cat([m.reshape(-1) for m in resumed_opt.optimizer.posterior().mean]),
                       torch.cat([m.reshape(-1) for m in opt.optimizer.posterior().mean]))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_hf_save_pretrained_and_from_pretrained_round_trip(tmp_path, mode, dtype):
    """Official loop: the params hold the mean between steps; drop-in: saved inside
    mean_params(), the file holds the mean."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).to(dtype)
    opt = IVON(model.parameters(), lr=0.05, ess=100.0, seed=3, resample_on_step=mode == "dropin")
    ids = torch.randint(0, 16, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        with opt.sampled_params(train=True) if mode == "official" else contextlib.nullcontext():
            opt.zero_grad()
            model(ids, labels=ids).loss.backward()
        opt.step()
    with opt.mean_params() if mode == "dropin" else contextlib.nullcontext():
        model.save_pretrained(str(tmp_path))
        mean = tensors_of(model)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path), dtype=dtype)
    assert_same(tensors_of(loaded), mean)
