"""Low-precision optimizer state (``IVON(state_dtype=torch.bfloat16)``, docs/DESIGN.md section 16):
momentum and Hessian in bf16, stored by stochastic rounding from the noise's Philox stream.

Expectations: the rounding's definition checked exhaustively over its random bits (exact
unbiasedness), the Philox words computed from ``philox4x32_10`` by hand, the float32 update then
rounded by hand, and float32 state's trajectory within the rounding's spread.

Every backend implements bf16 state: 'auto' picks for it what it picks for float32 state.
Capturable bf16 state: tests/test_capturable.py; sharded: tests/test_fsdp.py.
"""
from __future__ import annotations

import copy

import pytest
import torch

from ivon_fast import IVON, backends, reference
from ivon_fast.reference import ROUND_DRAW_BASE, rounding_bits, stochastic_round_bf16
from ivon_fast.scalars import StepScalars

from test_priors import Quadratic, train_quadratic

BF16 = torch.bfloat16


def test_stochastic_rounding_is_exactly_unbiased_over_its_random_bits():
    """Over all 2^16 values of the random bits the rounded values average to x exactly: the
    rounding goes up with probability (x - down) / (up - down)."""
    values = torch.tensor([1.0 + 2 ** -9, -3.14159, 1e-30, 6.1e4, 0.1, -2.0 ** -130, 1.0],
                          dtype=torch.float32)
    random16 = torch.arange(1 << 16, dtype=torch.int64)
    for x in values:
        rounded = stochastic_round_bf16(x.expand(1 << 16), random16).double()
        assert rounded.mean().item() == x.double().item()
        down, up = rounded.min(), rounded.max()
        assert set(rounded.unique().tolist()) <= {down.item(), up.item()}
        # the two neighbours in bf16 around x (the same when x is a bf16 value)
        assert torch.nextafter(down.to(BF16), torch.tensor(float("inf"), dtype=BF16)) >= up.to(BF16)


def test_stochastic_rounding_keeps_specials_and_exact_values():
    specials = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1.5])
    for r in (0, 1, 0x7FFF, 0xFFFF):
        rounded = stochastic_round_bf16(specials, torch.full((6,), r, dtype=torch.int64))
        assert rounded[0].item() == float("inf") and rounded[1].item() == -float("inf")
        assert torch.isnan(rounded[2])
        assert torch.equal(rounded[3:].float(), specials[3:])
        assert torch.signbit(rounded[4])


def test_rounding_bits_are_philox_at_the_rounding_draws():
    seed, offset, n, round_draw = (1 << 40) + 12345, 4097, 11, 5
    got = rounding_bits(seed, round_draw, offset, n)
    draw = ROUND_DRAW_BASE + round_draw
    for k in range(n):
        i = offset + k
        words = reference.philox4x32_10(
            torch.tensor(i >> 2), torch.tensor(0), torch.tensor(draw & 0xFFFFFFFF),
            torch.tensor(draw >> 32), seed & 0xFFFFFFFF, seed >> 32)
        assert got[k].item() == words[i & 3].item()
    device_draw = rounding_bits(seed, torch.tensor([round_draw]), offset, n)
    assert torch.equal(device_draw, got)
    assert not torch.equal(rounding_bits(seed, round_draw + 1, offset, n), got)


def _update_inputs(n=37, seed=4):
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, generator=gen)
    momentum = (torch.randn(n, generator=gen) * 0.1).to(BF16)
    hess = (torch.rand(n, generator=gen) + 0.5).to(BF16)
    grad = torch.randn(n, generator=gen)
    return mean, momentum, hess, grad


def test_update_with_bf16_state_is_the_float32_update_rounded_stochastically():
    scalars = StepScalars.of(lr=0.05, ess=40.0, weight_decay=0.01, beta1=0.9, beta2=0.99,
                             clip_radius=float("inf"), debias=0.5)
    mean, momentum, hess, grad = _update_inputs()
    seed, offset, round_draw = 99, 13, 7
    kwargs = dict(seed=seed, draw=3, offset=offset, count=1, hess_approx="price",
                  scalars=scalars)
    # float32 state holding the bf16 values exactly: the update in float32
    want = dict(param=torch.empty_like(mean), mean=mean.clone(), momentum=momentum.float(),
                hess=hess.float())
    reference.update(want["param"], grad, want["mean"], want["momentum"], want["hess"], None,
                     None, **kwargs)
    got = dict(param=torch.empty_like(mean), mean=mean.clone(), momentum=momentum.clone(),
               hess=hess.clone())
    reference.update(got["param"], grad, got["mean"], got["momentum"], got["hess"], None, None,
                     round_draw=round_draw, **kwargs)
    bits = rounding_bits(seed, round_draw, offset, mean.numel())
    assert torch.equal(got["mean"], want["mean"])  # computed from the same values in float32
    assert torch.equal(got["momentum"], stochastic_round_bf16(want["momentum"], bits & 0xFFFF))
    assert torch.equal(got["hess"], stochastic_round_bf16(want["hess"], bits >> 16))
    assert got["momentum"].dtype == got["hess"].dtype == BF16
    # a skipped step stores the old bf16 values
    skipped = dict(param=torch.empty_like(mean), mean=mean.clone(), momentum=momentum.clone(),
                   hess=hess.clone())
    reference.update(skipped["param"], grad, skipped["mean"], skipped["momentum"],
                     skipped["hess"], None, None, round_draw=round_draw,
                     found_inf=torch.ones(1), **kwargs)
    assert torch.equal(skipped["momentum"], momentum) and torch.equal(skipped["hess"], hess)


def _run(state_dtype, dropin, steps=30, seed=5, **kwargs):
    model = Quadratic()
    opt = IVON(model.parameters(), lr=0.05, ess=50.0, hess_init=0.5, beta2=0.99,
               weight_decay=1e-2, seed=seed, resample_on_step=dropin, state_dtype=state_dtype,
               mc_samples=1 if dropin else 2, **kwargs)
    train_quadratic(model, opt, steps, dropin)
    return model, opt


@pytest.mark.parametrize("dropin", [False, True], ids=["official", "dropin"])
def test_bf16_state_follows_float32_state_and_is_deterministic(dropin):
    """Same seed, same noise: the bf16 run's mean stays within a tenth of what another seed
    changes (the posterior's own Monte-Carlo spread), its std within 3% (bf16 keeps 8 bits)."""
    _, opt32 = _run(torch.float32, dropin)
    _, other_seed = _run(torch.float32, dropin, seed=6)
    model, opt16 = _run(BF16, dropin)
    _, again = _run(BF16, dropin)
    post32, post16 = opt32.posterior(), opt16.posterior()
    spread = max((p - q).abs().max() for p, q in zip(post32.mean, other_seed.posterior().mean))
    for p, q, r in zip(post32.mean, post16.mean, again.posterior().mean):
        assert torch.equal(q, r)  # the rounding is deterministic
        assert (q - p).abs().max() < 0.1 * spread
    for p, q in zip(post32.std, post16.std):
        torch.testing.assert_close(q, p, rtol=3e-2, atol=0)
    for p in model.parameters():
        assert opt16.state[p]["momentum"].dtype == opt16.state[p]["hess"].dtype == BF16
        assert opt16.state[p]["mean"].dtype == torch.float32


@pytest.mark.parametrize("dropin", [False, True], ids=["official", "dropin"])
def test_bf16_state_resumes_exactly_and_converts_from_and_to_float32(dropin):
    model_a, opt_a = _run(BF16, dropin, steps=3)
    checkpoint = copy.deepcopy({"model": model_a.state_dict(), "opt": opt_a.state_dict()})
    assert checkpoint["opt"]["ivon"]["state_dtype"] == "bfloat16"
    assert checkpoint["opt"]["state"][0]["hess"].dtype == BF16
    _, opt_full = _run(BF16, dropin, steps=6)
    model_b, opt_b = _run(BF16, dropin, steps=0, seed=123)
    model_b.load_state_dict(checkpoint["model"])
    opt_b.load_state_dict(checkpoint["opt"])
    train_quadratic(model_b, opt_b, 3, dropin)
    for p, q in zip(opt_full.posterior().mean, opt_b.posterior().mean):
        assert torch.equal(p, q)
    # float32 state into a bf16 optimizer: rounded to nearest; and back: exact
    _, opt32 = _run(torch.float32, dropin, steps=3)
    _, into16 = _run(BF16, dropin, steps=0)
    into16.load_state_dict(opt32.state_dict())
    for p32, p16 in zip(opt32.param_groups[0]["params"], into16.param_groups[0]["params"]):
        for key in ("momentum", "hess"):
            assert torch.equal(into16.state[p16][key], opt32.state[p32][key].to(BF16))
    _, back = _run(torch.float32, dropin, steps=0)
    back.load_state_dict(into16.state_dict())
    for p16, p32 in zip(into16.param_groups[0]["params"], back.param_groups[0]["params"]):
        assert torch.equal(back.state[p32]["hess"], into16.state[p16]["hess"].float())


def test_each_update_rounds_with_fresh_bits():
    """Two updates from the same float32 values round with different bits: the rounding index
    advances with the training draws."""
    model, opt = _run(BF16, dropin=True, steps=1, backend="reference")
    calls = []
    original = reference.update

    def spy(*args, **kwargs):
        calls.append(kwargs["round_draw"])
        return original(*args, **kwargs)

    reference.update = spy
    try:
        for _ in range(3):
            model.loss().backward()
            opt.step()
            opt.zero_grad()
    finally:
        reference.update = original
    assert len(set(calls)) == 3 and calls == sorted(calls)


def _with_bf16_state(names):
    """Backends parametrized by name, each skipped where it cannot run on CPU (every backend
    implements bf16 state)."""
    params = []
    for name in names:
        reason = backends.unavailable_reason(name, torch.device("cpu"), torch.float32)
        params.append(pytest.param(name, id=name, marks=pytest.mark.skipif(
            reason is not None, reason=str(reason))))
    return params


@pytest.mark.parametrize("dropin", [False, True], ids=["official", "dropin"])
@pytest.mark.parametrize("backend", _with_bf16_state(("reference", "cpu", "triton")))
def test_bf16_state_trains_on_every_backend_that_implements_it(backend, dropin):
    """An explicit backend with bf16 state serves every bucket, keeps bf16 state and follows the
    reference's bf16 run: exactly on the reference, within a bf16 ulp of the state (the same
    rounding bits; a value an ulp of float32 away may round the other way) on a kernel."""
    model, opt = _run(BF16, dropin, steps=4, backend=backend)
    _, want = _run(BF16, dropin, steps=4, backend="reference")
    assert set(opt.backends.values()) == {backend}
    for p, q in zip(opt.param_groups[0]["params"], want.param_groups[0]["params"]):
        for key in ("momentum", "hess"):
            assert opt.state[p][key].dtype == BF16
            if backend == "reference":
                assert torch.equal(opt.state[p][key], want.state[q][key])
            else:
                torch.testing.assert_close(opt.state[p][key].float(), want.state[q][key].float(),
                                           rtol=2 ** -7, atol=1e-6)
        if backend == "reference":
            assert torch.equal(opt.state[p]["mean"], want.state[q]["mean"])
        else:
            torch.testing.assert_close(opt.state[p]["mean"], want.state[q]["mean"], rtol=1e-3,
                                       atol=1e-3)


def test_auto_picks_the_same_backend_for_either_state_dtype():
    """Every backend implements bf16 state, so 'auto' resolves a bucket to the fastest backend
    that runs there whatever the state dtype (the C++ kernels on CPU when built)."""
    want = backends.resolve("auto", torch.device("cpu"), torch.float32)
    for state_dtype in (torch.float32, BF16):
        opt = IVON(Quadratic().parameters(), lr=0.1, ess=10.0, state_dtype=state_dtype)
        assert set(opt.backends.values()) == {want}
    if backends.unavailable_reason("cpu", torch.device("cpu")) is None:
        assert want == "cpu"


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_explicit_backend_that_cannot_run_is_refused_before_anything_moves(backend):
    """With bf16 state, an explicit backend that cannot run on the params' device is a
    ValueError naming the backend, raised before any param is moved into the flat layout."""
    cpu = torch.device("cpu")
    if backends.unavailable_reason(backend, cpu) is None:
        pytest.skip(f"backend={backend!r} runs here")
    model = Quadratic()
    before = [p.data_ptr() for p in model.parameters()]
    match = "Invalid backend"
    with pytest.raises(ValueError, match=match):
        IVON(model.parameters(), lr=0.1, ess=10.0, state_dtype=BF16, backend=backend,
             resample_on_step=True)
    assert [p.data_ptr() for p in model.parameters()] == before
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("bad, match", [
    (dict(state_dtype=torch.float16), "Invalid state_dtype"),
    (dict(state_dtype=torch.float64), "Invalid state_dtype"),
    (dict(state_dtype="bf16"), "Invalid state_dtype"),
])
def test_bad_state_dtype_options_are_refused(bad, match):
    model = Quadratic()
    before = [p.data_ptr() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        IVON(model.parameters(), lr=0.1, ess=10.0, **bad)
    assert [p.data_ptr() for p in model.parameters()] == before


@pytest.mark.parametrize("backend", ["auto", "reference", "cpu"])
def test_float64_params_are_refused_with_bf16_state(backend):
    """float64 params keep float64 state: bf16 state is refused for them (naming state_dtype,
    whatever the backend), at construction and in add_param_group, before anything moves."""
    with pytest.raises(ValueError, match="Invalid state_dtype.*float64 params"):
        IVON(Quadratic().double().parameters(), lr=0.1, ess=10.0, state_dtype=BF16,
             backend=backend)
    opt = IVON([torch.nn.Parameter(torch.randn(3))], lr=0.1, ess=10.0, state_dtype=BF16)
    extra = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    before = extra.data_ptr()
    with pytest.raises(ValueError, match="Invalid state_dtype.*float64 params"):
        opt.add_param_group({"params": [extra]})
    assert extra.data_ptr() == before and len(opt.param_groups) == 1
    # float32 state: float64 params train on the reference ('auto'), as before
    opt = IVON(Quadratic().double().parameters(), lr=0.1, ess=10.0)
    assert set(opt.backends.values()) == {"reference"}
