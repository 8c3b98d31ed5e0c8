"""Every kernel backend trains the same IVON trajectory as the reference, through ivon_fast.IVON."""
import pytest
import torch

import ivon_fast
from ivon_fast import backends

KERNEL_BACKENDS = ["triton", "cpu", "cuda"]


def _device_for(backend):
    return torch.device("cuda" if backend == "cuda" or (
        backend == "triton" and torch.cuda.is_available()) else "cpu")


def _model(device, dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 33), torch.nn.Tanh(), torch.nn.Linear(33, 3))
    model.scale = torch.nn.Parameter(torch.tensor(0.7))  # a scalar: later offsets are unaligned
    return model.to(device, dtype)


def _train(backend, mode, mc_samples, hess_approx, dtype=torch.float32, steps=6):
    """The params under mean_params() after ``steps`` steps, and the optimizer's state per param
    (the fp32 master mean, momentum and hess)."""
    device = _device_for(backend)
    model = _model(device, dtype)
    groups = [{"params": [model.scale, *model[0].parameters()], "lr": 0.05},
              {"params": model[2].parameters(), "weight_decay": 1e-3, "clip_radius": 0.5}]
    optimizer = ivon_fast.IVON(groups, lr=0.1, ess=500.0, mc_samples=mc_samples,
                               hess_approx=hess_approx, backend=backend, seed=1234,
                               resample_on_step=(mode == "drop_in"))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(32, 7, generator=generator).to(device, dtype)
    y = torch.randn(32, 3, generator=generator).to(device, dtype)

    def closure():
        optimizer.zero_grad()
        loss = ((model(x) * model.scale - y) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(steps):
        if mode == "drop_in":
            optimizer.step(closure)
        else:
            for _ in range(mc_samples):
                with optimizer.sampled_params(train=True):
                    closure()
            optimizer.step()
    with optimizer.mean_params():
        params = [p.detach().float().cpu().clone() for p in model.parameters()]
    state = optimizer.state_dict()["state"]
    return params, [{k: v.cpu() for k, v in state[i].items()} for i in range(len(params))]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode,mc_samples", [("official", 1), ("official", 3), ("drop_in", 1),
                                             ("drop_in", 2)])
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
def test_backend_follows_the_reference_trajectory(backend, mode, mc_samples, hess_approx):
    reason = backends.unavailable_reason(backend, _device_for(backend))
    if reason is not None:
        pytest.skip(reason)
    expected, _ = _train("reference", mode, mc_samples, hess_approx)
    initial = [p.detach().float().cpu() for p in _model("cpu", torch.float32).parameters()]
    actual, _ = _train(backend, mode, mc_samples, hess_approx)
    for want, got, start in zip(expected, actual, initial):
        assert not torch.equal(want, start)  # training moved it: the comparison means something
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_auto_picks_the_fastest_backend_present():
    """CPU tensors: the C++ kernel. CUDA tensors: Triton (measured fastest), then the CUDA kernel."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preference = ["triton", "cuda"] if device.type == "cuda" else ["cpu"]
    present = [b for b in preference if backends.unavailable_reason(b, device) is None]
    optimizer = ivon_fast.IVON([torch.nn.Parameter(torch.ones(3, device=device))], lr=0.1, ess=1.0)
    assert set(optimizer.backends.values()) == {present[0] if present else "reference"}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", ["official", "drop_in"])
def test_backend_follows_the_reference_with_bf16_params(backend, mode):
    """bf16 params, fp32 master state. Every backend rounds the bf16 samples to nearest even from
    (nearly) the same fp32 values, so the master state follows the reference to the fp32 bound of
    docs/DESIGN.md section 7. The bf16 params themselves moved only a few bf16 ulps in these steps:
    compared at bf16 precision, a state that never moved would pass, so the master state is what
    this test compares, and it checks that the state moved far more than the bound."""
    reason = backends.unavailable_reason(backend, _device_for(backend), torch.bfloat16)
    if reason is not None:
        pytest.skip(reason)
    expected_params, expected = _train("reference", mode, 1, "price", dtype=torch.bfloat16,
                                       steps=3)
    actual_params, actual = _train(backend, mode, 1, "price", dtype=torch.bfloat16, steps=3)
    initial = [p.detach().float().cpu() for p in _model("cpu", torch.bfloat16).parameters()]
    for want, got, start in zip(expected, actual, initial):
        for key in ("mean", "momentum", "hess"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, key=key: f"{key}: {m}")
        moved = (want["mean"] - start.reshape(want["mean"].shape)).abs()
        assert moved.median() > 10 * (1e-6 + 1e-5 * want["mean"].abs().max())
    for want, got in zip(expected_params, actual_params):  # one bf16 rounding step apart at most
        torch.testing.assert_close(got, want, rtol=2 ** -7, atol=0)
