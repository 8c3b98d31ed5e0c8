"""The buckets' flat buffers keep local and global index congruent modulo 4 (Note [quads in the
buffers] in ivon_fast/_bucket.py): every quad of the noise is one aligned 16-byte word of fp32
state, also after an odd-sized param group, an odd-sized waiting param or a param of another
dtype. Pads belong to no param: the kernels never write them, no state dict holds them, and a
layout without a reason to pad has none.
"""
import pytest
import torch

import ivon_fast
from ivon_fast import backends

BACKENDS = [name for name in ("reference", "triton")
            if backends.unavailable_reason(name, "cpu") is None]


def _odd_model():
    torch.manual_seed(0)
    return torch.nn.ModuleDict({
        "first": torch.nn.Linear(3, 3),       # 12 elements
        "odd": torch.nn.Linear(2, 1),         # 3 elements: what follows starts mid-quad
        "tiny": torch.nn.Linear(1, 1),        # 2 elements
        "last": torch.nn.Linear(4, 5)})       # 25 elements


def _optimizer(model, case, backend):
    if case == "a param group of odd size first":
        groups = [{"params": [*model["first"].parameters(), *model["odd"].parameters()]},
                  {"params": [*model["tiny"].parameters(), *model["last"].parameters()],
                   "weight_decay": 1e-3}]
    elif case == "an odd waiting param":
        model["odd"].requires_grad_(False)  # waits outside the bucket, keeps its index
        groups = [{"params": list(model.parameters())}]
    else:  # "a param of another dtype"
        model["odd"].bfloat16()
        groups = [{"params": list(model.parameters())}]
    return ivon_fast.IVON(groups, lr=0.05, ess=100.0, backend=backend, seed=7,
                          resample_on_step=True)


def _step(model, optimizer, steps=3):
    x = torch.linspace(-1, 1, 12).reshape(3, 4)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = (model["last"](x) ** 2).sum() + sum(
            (p.double() ** 2).sum() for name, p in model.named_parameters()
            if not name.startswith("last")).float()
        loss.backward()
        optimizer.step()


CASES = ["a param group of odd size first", "an odd waiting param", "a param of another dtype"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_quads_stay_aligned_in_the_buffers(backend, case):
    """Each param's first element lies at a place congruent to its global offset modulo 4, the
    params own exactly their bytes there, the pads stay zero through training, and the state
    dict holds each param's own elements only."""
    model = _odd_model()
    optimizer = _optimizer(model, case, backend)
    buckets = optimizer._layout.buckets
    assert any(bucket.starts[0] != 0 or bucket.starts != sorted(bucket.starts)
               or bucket.param_flat.numel() > sum(p.numel() for p in bucket.params)
               for bucket in buckets), "the case was meant to pad"
    _step(model, optimizer)
    for bucket in buckets:
        covered = torch.zeros(bucket.param_flat.numel(), dtype=torch.bool)
        for index, param in enumerate(bucket.params):
            start = bucket.starts[index]
            assert start % 4 == bucket.offsets[index] % 4
            assert param.data_ptr() == (bucket.param_flat.data_ptr()
                                        + start * bucket.param_flat.element_size())
            covered[start:start + param.numel()] = True
        for name in ("param_flat", "grad_flat", "mean", "momentum", "hess"):
            pads = getattr(bucket, name)[~covered]
            assert torch.equal(pads, torch.zeros_like(pads)), name
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, state in optimizer.state_dict()["state"].items():
        for name in ("mean", "momentum", "hess"):
            assert state[name].numel() == params[index].numel(), name


@pytest.mark.parametrize("case", CASES)
def test_padded_layouts_train_as_the_reference(case):
    """The Triton backend (its segments that start mid-quad run from their quads) trains the
    reference's trajectory on padded layouts."""
    if "triton" not in BACKENDS:
        pytest.skip("the Triton backend is unavailable")
    results = {}
    for backend in ("reference", "triton"):
        model = _odd_model()
        optimizer = _optimizer(model, case, backend)
        _step(model, optimizer)
        results[backend] = [p.detach().clone() for p in model.parameters()]
    for got, want in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_layout_without_a_reason_to_pad_has_none():
    """One group of params of one dtype, all training: the buffers are the params back to
    back, as before there were pads."""
    model = _odd_model()
    optimizer = ivon_fast.IVON(model.parameters(), lr=0.05, ess=100.0, backend="reference")
    [bucket] = optimizer._layout.buckets
    sizes = [p.numel() for p in bucket.params]
    assert bucket.starts == [sum(sizes[:i]) for i in range(len(sizes))]
    assert bucket.param_flat.numel() == sum(sizes)
