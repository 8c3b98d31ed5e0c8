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
        return [p.detach().float().cpu().clone() for p in model.parameters()]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode,mc_samples", [("official", 1), ("official", 3), ("drop_in", 1),
                                             ("drop_in", 2)])
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
def test_backend_follows_the_reference_trajectory(backend, mode, mc_samples, hess_approx):
    reason = backends.unavailable_reason(backend, _device_for(backend))
    if reason is not None:
        pytest.skip(reason)
    expected = _train("reference", mode, mc_samples, hess_approx)
    initial = [p.detach().float().cpu() for p in _model("cpu", torch.float32).parameters()]
    actual = _train(backend, mode, mc_samples, hess_approx)
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
    """bf16 params, fp32 master state: a one-ulp rounding difference of a bf16 sample feeds back
    through the gradients, so the trajectories agree to bf16 precision, not fp32's."""
    reason = backends.unavailable_reason(backend, _device_for(backend), torch.bfloat16)
    if reason is not None:
        pytest.skip(reason)
    expected = _train("reference", mode, 1, "price", dtype=torch.bfloat16, steps=3)
    actual = _train(backend, mode, 1, "price", dtype=torch.bfloat16, steps=3)
    for want, got in zip(expected, actual):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
