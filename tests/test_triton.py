"""The Triton backend against ivon_fast.reference, element by element with the same noise.

On CPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before anything defines a kernel); the tests marked gpu repeat the comparisons on CUDA tensors.
Every expectation comes from the reference (plain torch) or from published Philox answers, never
from the code under test.
"""
import pytest
import torch

from ivon_fast import reference
from ivon_fast import triton_backend as tb

triton = pytest.importorskip("triton")
tl = triton.language

pytestmark = pytest.mark.triton

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        tb.unavailable_reason("cpu") is not None, reason=str(tb.unavailable_reason("cpu")))),
    pytest.param("cuda", marks=pytest.mark.gpu),
]

# (rtol, atol) for values written in each dtype. State is always fp32. fp32 allows a few ulps of
# the transcendental functions in the noise; bf16 / fp16 outputs may round one ulp differently
# when the fp32 values they are rounded from differ by an ulp.
TOLERANCE = {
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (8e-3, 1e-5),
    torch.float16: (1e-3, 1e-5),
}
# after several chained steps
TRAJECTORY_TOLERANCE = {
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (3e-2, 1e-2),
    torch.float16: (4e-3, 2e-3),
}

BIG_SEED = (1 << 64) - 12345          # above 2^63: the top bit must survive the launch
EVAL_DRAW = reference.EVAL_DRAW_BASE + 17
HYPER = dict(ess=40.0, weight_decay=1e-3)


def assert_close(actual, expected, dtype=torch.float32):
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=False)


def make_state(n, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, generator=gen)
    momentum = 0.1 * torch.randn(n, generator=gen)
    hess = 0.5 + torch.rand(n, generator=gen)
    avg_grad = torch.randn(n, generator=gen)
    avg_term = 0.1 * torch.randn(n, generator=gen)
    return [t.to(device) for t in (mean, momentum, hess, avg_grad, avg_term)]


def make_grad(n, dtype, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen).to(device=device, dtype=dtype)


def clones(tensors):
    return [None if t is None else t.clone() for t in tensors]


# ---------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------
@triton.jit
def _philox_probe(out_ptr, seed, draw, quad_base, QUADS: tl.constexpr):
    """Stores the four raw Philox outputs (as int64 holding uint32) of quads quad_base + q."""
    q = tl.arange(0, QUADS)
    x0, x1, x2, x3 = tb._philox(seed, draw, quad_base + q.to(tl.int64))
    tl.store(out_ptr + 4 * q + 0, x0.to(tl.int64) & 0xFFFFFFFF)
    tl.store(out_ptr + 4 * q + 1, x1.to(tl.int64) & 0xFFFFFFFF)
    tl.store(out_ptr + 4 * q + 2, x2.to(tl.int64) & 0xFFFFFFFF)
    tl.store(out_ptr + 4 * q + 3, x3.to(tl.int64) & 0xFFFFFFFF)


def _probe(seed, draw, quad, quads, device):
    out = torch.zeros(4 * quads, dtype=torch.int64, device=device)
    _philox_probe[(1,)](out, tb._u64_bits(seed, "seed"), tb._u64_bits(draw, "draw"),
                        tb._u64_bits(quad, "quad"), QUADS=quads)
    return out.view(quads, 4).cpu()


@pytest.mark.parametrize("device", DEVICES)
def test_philox_known_answers(device):
    """Random123's published answers (DESIGN.md section 3): counter (c0 c1 c2 c3), key (k0 k1)."""
    cases = [  # (quad = c1:c0, draw = c3:c2, seed = k1:k0) -> outputs
        (0, 0, 0, [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ((1 << 64) - 1, (1 << 64) - 1, (1 << 64) - 1,
         [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        (0x85A308D3243F6A88, 0x0370734413198A2E, 0x299F31D0A4093822,
         [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
    ]
    for quad, draw, seed, expected in cases:
        assert _probe(seed, draw, quad, 1, device)[0].tolist() == expected


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed,draw,quad", [
    (0, 0, 0), (12345, 7, (1 << 32) - 3), (BIG_SEED, EVAL_DRAW, (1 << 40) + 5),
    ((1 << 64) - 1, (1 << 64) - 1, (1 << 62) + 1), (1 << 63, 1 << 32, 1)])
def test_philox_integers_match_reference(device, seed, draw, quad):
    quads = 64  # crosses a 2^32 boundary of the quad counter for the second case
    got = _probe(seed, draw, quad, quads, device)
    q = torch.arange(quad, quad + quads, dtype=torch.int64)
    expected = reference.philox4x32_10(q & 0xFFFFFFFF, q >> 32, draw & 0xFFFFFFFF, draw >> 32,
                                       seed & 0xFFFFFFFF, seed >> 32)
    assert torch.equal(got, torch.stack(expected, dim=1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,offset", [(1, 0), (3, 1), (5, 3), (6, 5), (4097, 2), (4097, 4099),
                                      (300_003, 1 << 33)])
# 1 is in here because triton folds integer arguments equal to 1 into the compiled kernel
@pytest.mark.parametrize("seed,draw", [(0, 0), (1, 1), (BIG_SEED, EVAL_DRAW)])
def test_noise_matches_reference(device, n, offset, seed, draw):
    # mean 0, ess 1, hess 1, wd 0: sigma = 1 and the sample is the noise itself
    param = torch.full((n,), float("nan"), device=device)
    mean = torch.zeros(n, device=device)
    hess = torch.ones(n, device=device)
    tb.sample(param, mean, hess, seed=seed, draw=draw, offset=offset, ess=1.0, weight_decay=0.0)
    expected = reference.philox_normal(seed, draw, offset, n, device)
    assert_close(param, expected)
    if n > 1000:  # a standard normal, and other draws give other noise
        assert abs(param.mean().item()) < 0.1 and abs(param.std().item() - 1) < 0.1
        other = torch.empty_like(param)
        tb.sample(other, mean, hess, seed=seed, draw=draw + 1, offset=offset, ess=1.0,
                  weight_decay=0.0)
        assert (other - param).abs().mean() > 0.5


# ---------------------------------------------------------------------------------------------
# The ops, one at a time
# ---------------------------------------------------------------------------------------------
SEGMENTS = [(1, 0), (3, 2), (5, 1), (5, 3), (4097, 0), (4097, 3), (4097, 4099), (200_001, 1)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=[None, 64], ids=["block_default", "block_64"])
def block(request, monkeypatch):
    """Also run with tiny blocks, so that many programs (and tile edges) are exercised under the
    interpreter (on GPU the default block already makes many programs; compiles are the cost)."""
    if request.param is not None and request.getfixturevalue("device") == "cuda":
        pytest.skip("the default block covers many programs on GPU")
    if request.param is not None:
        monkeypatch.setenv("IVON_TRITON_BLOCK", str(request.param))
    return request.param


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,offset", SEGMENTS)
def test_sample(device, dtype, n, offset, block):
    if block is not None and n > 10_000:
        pytest.skip("tiny blocks on big segments are slow under the interpreter")
    mean, _, hess, _, _ = make_state(n, device)
    got = torch.zeros(n, dtype=dtype, device=device)
    expected = torch.zeros(n, dtype=dtype, device=device)
    kw = dict(seed=BIG_SEED, draw=EVAL_DRAW, offset=offset, **HYPER)
    tb.sample(got, mean, hess, **kw)
    reference.sample(expected, mean, hess, **kw)
    assert_close(got.float(), expected.float(), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,offset", SEGMENTS)
def test_accumulate(device, hess_approx, count, dtype, n, offset):
    _, _, hess, avg_grad, avg_term = make_state(n, device)
    grad = make_grad(n, dtype, device)
    got, expected = clones([avg_grad, avg_term]), clones([avg_grad, avg_term])
    kw = dict(seed=12345, draw=4, offset=offset, count=count, hess_approx=hess_approx, **HYPER)
    tb.accumulate(grad, hess, *got, **kw)
    reference.accumulate(grad, hess, *expected, **kw)
    for a, e in zip(got, expected):
        assert_close(a, e)


UPDATE_HYPER = dict(lr=0.05, beta1=0.9, beta2=0.99, debias=1 - 0.9 ** 3, **HYPER)


def _run_update(device, dtype, n, offset, *, with_grad, count, hess_approx, clip_radius,
                next_draw, avgs_none=False, **overrides):
    state = make_state(n, device)
    grad = make_grad(n, dtype, device) if with_grad else None
    got_state, expected_state = clones(state), clones(state)
    if avgs_none:
        got_state[3] = got_state[4] = None
    got = torch.zeros(n, dtype=dtype, device=device)
    expected = torch.zeros(n, dtype=dtype, device=device)
    kw = dict(UPDATE_HYPER, seed=BIG_SEED, draw=6, next_draw=next_draw, offset=offset,
              count=count, hess_approx=hess_approx, clip_radius=clip_radius)
    kw.update(overrides)
    tb.update(got, grad, *got_state, **kw)
    reference.update(expected, grad, *expected_state, **kw)
    assert_close(got.float(), expected.float(), dtype)
    for a, e in zip(got_state, expected_state):
        if a is not None:  # mean, momentum, hess updated; averages left as they were
            assert_close(a, e)
    return got_state, expected_state


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("next_draw", [None, 7, EVAL_DRAW])
@pytest.mark.parametrize("clip_radius", [1e-3, float("inf")])
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
@pytest.mark.parametrize("with_grad,count", [(True, 1), (True, 3), (False, 1), (False, 3)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_update_flags(device, dtype, with_grad, count, hess_approx, clip_radius, next_draw):
    got, expected = _run_update(device, dtype, 4097, 4099, with_grad=with_grad, count=count,
                                hess_approx=hess_approx, clip_radius=clip_radius,
                                next_draw=next_draw)
    if clip_radius != float("inf"):  # the clip must actually bind somewhere
        step = (expected[0] - make_state(4097, device)[0]).abs()
        bound = UPDATE_HYPER["lr"] * clip_radius
        assert ((step - bound).abs() < 1e-3 * bound).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,offset", SEGMENTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_segments(device, n, offset, dtype, block):
    if block is not None and n > 10_000:
        pytest.skip("tiny blocks on big segments are slow under the interpreter")
    _run_update(device, dtype, n, offset, with_grad=True, count=3, hess_approx="price",
                clip_radius=0.1, next_draw=9)


@pytest.mark.parametrize("device", DEVICES)
def test_update_count_one_needs_no_averages(device):
    _run_update(device, torch.float32, 4097, 1, with_grad=True, count=1, hess_approx="price",
                clip_radius=float("inf"), next_draw=3, avgs_none=True)


# ---------------------------------------------------------------------------------------------
# Capturable scalars
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
def test_tensor_scalars_equal_python_scalars(device, hess_approx):
    n, offset = 4097, 2

    def as_tensor(value, dtype):
        if dtype == torch.int64:
            value = tb._u64_bits(value, "draw")
        return torch.tensor(value, dtype=dtype, device=device)

    runs = []
    for tensors in (False, True):
        draw = as_tensor(EVAL_DRAW, torch.int64) if tensors else EVAL_DRAW
        next_draw = as_tensor(11, torch.int64) if tensors else 11
        lr = as_tensor(0.05, torch.float32) if tensors else 0.05
        debias = as_tensor(0.271, torch.float32) if tensors else 0.271
        state = make_state(n, device)
        grad = make_grad(n, torch.bfloat16, device)
        param = torch.zeros(n, dtype=torch.bfloat16, device=device)
        common = dict(seed=BIG_SEED, offset=offset, **HYPER)
        tb.sample(param, state[0], state[2], draw=draw, **common)
        sampled = param.clone()
        tb.accumulate(grad, state[2], state[3], state[4], draw=draw, count=2,
                      hess_approx=hess_approx, **common)
        tb.update(param, grad, *state, draw=draw, next_draw=next_draw, count=3,
                  hess_approx=hess_approx, lr=lr, beta1=0.9, beta2=0.99, clip_radius=0.2,
                  debias=debias, **common)
        runs.append([sampled, param] + state)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    # and both equal the reference with Python scalars
    state = make_state(n, device)
    grad = make_grad(n, torch.bfloat16, device)
    param = torch.zeros(n, dtype=torch.bfloat16, device=device)
    common = dict(seed=BIG_SEED, offset=offset, **HYPER)
    reference.accumulate(grad, state[2], state[3], state[4], draw=EVAL_DRAW, count=2,
                         hess_approx=hess_approx, **common)
    reference.update(param, grad, *state, draw=EVAL_DRAW, next_draw=11, count=3,
                     hess_approx=hess_approx, lr=0.05, beta1=0.9, beta2=0.99, clip_radius=0.2,
                     debias=0.271, **common)
    assert_close(runs[1][1].float(), param.float(), torch.bfloat16)
    for a, e in zip(runs[1][2:], state):
        assert_close(a, e)


# ---------------------------------------------------------------------------------------------
# A trajectory: the ops chained over several steps as the optimizer chains them
# ---------------------------------------------------------------------------------------------
def _loss_grad(theta, target):
    """The gradient of a quadratic with a sine term, so each step depends on the sample."""
    x = theta.float()
    return (x - target + 0.3 * torch.sin(3 * x)).to(theta.dtype)


def _trajectory(ops, device, dtype, n, offset, mc, hess_approx, steps):
    gen = torch.Generator().manual_seed(3)
    target = torch.randn(n, generator=gen).to(device)
    mean = (0.1 * torch.randn(n, generator=gen)).to(device)
    hess = torch.full((n,), 0.2, device=device)
    momentum = torch.zeros(n, device=device)
    avg_grad, avg_term = torch.zeros(n, device=device), torch.zeros(n, device=device)
    param = torch.zeros(n, dtype=dtype, device=device)
    common = dict(seed=BIG_SEED, offset=offset, ess=50.0, weight_decay=1e-4)
    draw = 0
    ops.sample(param, mean, hess, draw=draw, **common)
    for step in range(1, steps + 1):
        for s in range(1, mc):  # all but the last sample go through accumulate
            ops.accumulate(_loss_grad(param, target), hess, avg_grad, avg_term, draw=draw,
                           count=s, hess_approx=hess_approx, **common)
            draw += 1
            ops.sample(param, mean, hess, draw=draw, **common)
        last = step == steps
        ops.update(param, _loss_grad(param, target), mean, momentum, hess, avg_grad, avg_term,
                   draw=draw, next_draw=None if last else draw + 1, count=mc,
                   hess_approx=hess_approx, lr=0.1 * (0.2 + 1e-4), beta1=0.9, beta2=0.99999,
                   clip_radius=1e-3 if hess_approx == "price" else float("inf"),
                   debias=1 - 0.9 ** step, **common)
        draw += 1
    return param, mean, momentum, hess


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mc,hess_approx", [(1, "price"), (3, "price"), (2, "gradsq")])
def test_trajectory(device, dtype, mc, hess_approx):
    n, offset, steps = 3001, 4099, 6
    got = _trajectory(tb, device, dtype, n, offset, mc, hess_approx, steps)
    expected = _trajectory(reference, device, dtype, n, offset, mc, hess_approx, steps)
    # fp32: the DESIGN.md section 7 bound. Low-precision samples feed one-ulp rounding flips back
    # into the grads, so those trajectories agree only to a few ulps of the param dtype.
    rtol, atol = TRAJECTORY_TOLERANCE[dtype]
    for a, e in zip(got, expected):
        torch.testing.assert_close(a.float(), e.float(), rtol=rtol, atol=atol)
    assert not torch.equal(got[1], _trajectory(tb, device, dtype, n, offset, mc, hess_approx,
                                               1)[1]), "the steps must move the mean"


# ---------------------------------------------------------------------------------------------
# Availability, knobs, kernel signatures
# ---------------------------------------------------------------------------------------------
def test_unavailable_reason(monkeypatch):
    assert tb.unavailable_reason(torch.device("cuda")) is None
    assert isinstance(tb.unavailable_reason(torch.device("meta")), str)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in tb.unavailable_reason(torch.device("cpu"))


@pytest.mark.parametrize("knob,value", [("IVON_TRITON_BLOCK", "48"), ("IVON_TRITON_BLOCK", "2"),
                                        ("IVON_TRITON_WARPS", "3")])
def test_bad_knobs_rejected(monkeypatch, knob, value):
    monkeypatch.setenv(knob, value)
    with pytest.raises(ValueError, match="power of two"):
        tb.sample(torch.zeros(8), torch.zeros(8), torch.ones(8), ess=1.0, weight_decay=0.0)


def test_rejects_fp64_and_bad_draws():
    x = torch.zeros(8, dtype=torch.float64)
    with pytest.raises(TypeError):
        tb.sample(x, x, x, ess=1.0, weight_decay=0.0)
    y = torch.zeros(8)
    with pytest.raises(ValueError):
        tb.sample(y, y, y + 1, draw=1 << 64, ess=1.0, weight_decay=0.0)
    with pytest.raises(ValueError):
        tb.sample(y, y, y + 1, draw=torch.tensor(1.0), ess=1.0, weight_decay=0.0)


@pytest.mark.parametrize("kernel", ["_sample_kernel", "_accumulate_kernel", "_update_kernel"])
def test_hyperparameters_are_runtime_arguments(kernel):
    """Changing lr or the step must not recompile: only the UPPERCASE flags are constexpr."""
    fn = getattr(tb, kernel).fn
    constexprs = {name for name, ann in fn.__annotations__.items() if "constexpr" in str(ann)}
    assert constexprs == {name for name in fn.__code__.co_varnames[:fn.__code__.co_argcount]
                          if name.isupper()}
    assert "BLOCK" in constexprs and "LEAD" in constexprs


# ---------------------------------------------------------------------------------------------
# GPU only: CUDA-graph capture of update with lr and draws in device memory
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replay_matches_eager(dtype):
    n, offset, device = 100_003, 3, "cuda"
    state = make_state(n, device)
    grad = make_grad(n, dtype, device)
    param = torch.zeros(n, dtype=dtype, device=device)
    eager_state, eager_param = clones(state), param.clone()
    lr = torch.tensor(0.0, device=device)
    draw = torch.tensor(0, dtype=torch.int64, device=device)
    next_draw = torch.tensor(0, dtype=torch.int64, device=device)
    debias = torch.tensor(1.0, device=device)
    kw = dict(seed=BIG_SEED, offset=offset, count=1, hess_approx="price", beta1=0.9, beta2=0.99,
              clip_radius=0.5, **HYPER)

    def step():
        tb.update(param, grad, *state, draw=draw, next_draw=next_draw, lr=lr, debias=debias,
                  **kw)

    warm = clones(state)  # compile outside the capture, on throwaway state
    tb.update(param.clone(), grad, *warm, draw=draw, next_draw=next_draw, lr=lr, debias=debias,
              **kw)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for i, (lr_i, draw_i) in enumerate([(0.05, 5), (0.01, 6), (0.2, EVAL_DRAW)]):
        lr.fill_(lr_i)
        draw.fill_(tb._u64_bits(draw_i, "draw"))
        next_draw.fill_(tb._u64_bits(draw_i + 1, "draw"))
        debias.fill_(1 - 0.9 ** (i + 1))
        graph.replay()
        tb.update(eager_param, grad, *eager_state, draw=draw_i, next_draw=draw_i + 1, lr=lr_i,
                  debias=1 - 0.9 ** (i + 1), **kw)
        torch.cuda.synchronize()
        assert torch.equal(param, eager_param)
        for a, e in zip(state, eager_state):
            assert torch.equal(a, e)
