"""The op contract on every kernel backend (docs/DESIGN.md sections 3 and 5): the noise, sample,
accumulate and update against ``ivon_fast.reference`` element by element with the same noise,
and the properties every backend, the reference included, must have (device scalars, priors,
device draws; docs/DESIGN.md sections 11, 13, 14).

Backends: tests/kernel_backends.py, one line each (reference, triton, cpu, cuda, and
cuda_on_cpu: the CUDA source compiled for the CPU, which tests/test_cuda_on_cpu.py runs under the
sanitizers in a process of its own; skipped anywhere else). A check against the reference runs
on every backend but the reference itself (it could not fail there; the reference is checked
against ivon-opt and hand computations in tests/test_reference.py); a property runs on all. Cases: tests/kernel_cases.py, covering arrays in which every kernel
instance runs (test_every_kernel_instance_runs proves it) plus the known risky combinations.
bf16 state and the rounding of low-precision stores: tests/test_kernels_state.py; what concerns
one backend's build or launch: tests/test_kernels_builds.py.

The long grids (the full cross of the flags, about 4000 update cases, ten minutes and more on two
cores) are opt-in, and not even collected by default:

    python -m pytest tests/test_kernels.py tests/test_kernels_state.py --nightly
    IVON_FAST_NIGHTLY=1 python -m pytest tests/test_kernels*.py -m nightly   # only those

Every expectation comes from the reference (plain torch), published Philox answers or a property
of the op itself, never from the code under test.
"""
import pytest
import torch

from ivon_fast import reference
from ivon_fast.scalars import StepScalars

import kernel_cases as kc
from covering import NIGHTLY, cover, label, missing
from kernel_backends import ALL, COMPARED
from kernel_cases import BIG_SEED, DTYPES, EVAL_DRAW, assert_close, call, run_rows, same_bits
from kernel_checks import PRIOR_SCALARS, device_draws, one, prior_inputs, prior_state
from state_checks import bf16_state

# the interpreter's numpy warns about skipped steps' inf and NaN arithmetic and fp16 overflows
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")


# ---------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------
# (n, offset, seed, draw): segments inside a quad, across quad boundaries, long ones, quads across
# 2^31 (int32's sign), global offsets from 2^34 (the high word of the quad counter), across its
# carry and beyond 2^62; seed and draw 0, 1 (Triton folds integer arguments equal to 1 into the
# kernel), and above 2^63
NOISE_CASES = [
    (1, 0, 0, 0), (3, 1, 1, 1), (5, 3, BIG_SEED, EVAL_DRAW), (6, 5, 0, 0), (6, 5, 1, 1),
    (4097, 2, BIG_SEED, EVAL_DRAW), (4097, 4099, 1, 1), (4097, (1 << 34) + 3, 0, 0),
    (4097, (1 << 34) - 4093, BIG_SEED, EVAL_DRAW), (4097, (1 << 62) + 1, 12345, 7),
    (8001, (1 << 33) - 4000, BIG_SEED, EVAL_DRAW), (65_536, 0, (1 << 64) - 1, (1 << 64) - 1),
]


@pytest.mark.parametrize("backend", COMPARED)
def test_noise_matches_reference(backend):
    """sample with sigma = 1 and mean 0 writes the noise itself: the reference's Philox normals
    (docs/DESIGN.md section 3) for every segment, offset and 64-bit seed / draw; a long segment's
    noise is standard normal and another draw's is other noise."""
    device = backend.device
    for n, offset, seed, draw in NOISE_CASES:
        param = torch.full((n,), float("nan"), device=device)
        mean, hess = torch.zeros(n, device=device), torch.ones(n, device=device)
        kw = dict(seed=seed, offset=offset, ess=1.0, weight_decay=0.0)
        backend.module.sample(param, mean, hess, draw=draw, **kw)
        expected = reference.philox_normal(seed, draw, offset, n, device)
        assert_close(param, expected, msg=f"n={n} offset={offset} seed={seed} draw={draw}")
        if n > 60_000:
            assert abs(param.mean().item()) < 0.02 and abs(param.std().item() - 1) < 0.02
            other = torch.empty_like(param)
            backend.module.sample(other, mean, hess, draw=(draw + 1) % (1 << 64), **kw)
            assert (other - param).abs().mean() > 0.5
            backend.module.sample(other, mean, hess, draw=draw ^ (1 << 63), **kw)
            assert (other - param).abs().mean() > 0.5  # training and evaluation streams


# ---------------------------------------------------------------------------------------------
# sample, accumulate, update: every instance against the reference (kernel_cases' tables)
# ---------------------------------------------------------------------------------------------
SAMPLE_CHUNKS = kc.chunks(kc.sample_rows(), ["ptype"],
                          kc.full_grid(kc.SAMPLE_FACTORS) if NIGHTLY else ())
ACCUMULATE_CHUNKS = kc.chunks(kc.accumulate_rows(), ["ptype"],
                              kc.full_grid(kc.ACCUMULATE_FACTORS) if NIGHTLY else ())
UPDATE_CHUNKS = kc.chunks(kc.update_rows(), ["ptype", "state"],
                          kc.update_nightly_rows() if NIGHTLY else ())


@pytest.mark.parametrize("backend", COMPARED)
@pytest.mark.parametrize("rows", SAMPLE_CHUNKS)
def test_sample_matches_reference(backend, rows):
    """Every sample instance (param dtype, prior precision, bf16 hess, device draw) on odd
    segments and Triton blocks, as the reference, the prior precision mattering."""
    run_rows(backend, "sample", rows)


@pytest.mark.parametrize("backend", COMPARED)
@pytest.mark.parametrize("rows", ACCUMULATE_CHUNKS)
def test_accumulate_matches_reference(backend, rows):
    """Every accumulate instance (param dtype, price / gradsq, first sample or not, prior
    precision, bf16 hess, device draw) as the reference; 'gradsq' ignores the prior
    precision."""
    run_rows(backend, "accumulate", rows)


@pytest.mark.parametrize("backend", COMPARED)
@pytest.mark.parametrize("rows", UPDATE_CHUNKS)
def test_update_every_instance(backend, rows):
    """Every update instance (param dtype, price / gradsq, GradMode, next sample, grad_scale,
    prior mean and precision) with both state dtypes, every device scalar, found_inf value,
    clip and segment pairwise, as the reference; skipped steps keep the state; the averages are
    never written."""
    run_rows(backend, "update", rows)


# ---- long and far segments --------------------------------------------------------------------
LONG_FACTORS = {
    "op": ["update", "sample", "accumulate"],
    "segment": kc.LONG_SEGMENTS,
    "ptype": kc.PARAM_TYPES,
    "state": kc.STATE_TYPES,
    "prior_precision": [False, True],
    "prior_mean": [False, True],
    "found": ["absent", "zero", "one"],
    "device": [False, True],
    "next": [True, False],
    "hess_approx": ["price", "gradsq"],
    "draw": ["eval", "train"],
}


def _long_row(row):
    """A LONG_FACTORS row as the op's table row: the pending grad and two earlier samples
    (kGradAvg reads every input), every device input or none."""
    device = row["device"]
    return dict(ptype=row["ptype"], state=row["state"], segment=row["segment"],
                prior_precision=row["prior_precision"], prior_mean=row["prior_mean"],
                hess_approx=row["hess_approx"], draw=row["draw"], device_draws=device,
                count=3, grad=True, next=row["next"], scaled=device, scale=3.0,
                found=row["found"], device_lr=device, device_debias=device, clip="inf",
                avgs="given", block="default")


LONG_ROWS = cover(LONG_FACTORS)


@pytest.mark.parametrize("backend", COMPARED)
@pytest.mark.parametrize("op", ["sample", "accumulate", "update"])
def test_ops_on_long_and_far_segments(backend, op):
    """Each op on many quads, several CPU threads, CUDA's vector path, Triton's many programs,
    and at global offsets whose quad counter needs its high word (across its carry, beyond 2^62
    elements), with priors, bf16 state and device inputs, as the reference."""
    factors = {"sample": kc.SAMPLE_FACTORS, "accumulate": kc.ACCUMULATE_FACTORS,
               "update": kc.UPDATE_FACTORS}[op]
    rows = [{k: v for k, v in _long_row(row).items() if k in factors}
            for row in LONG_ROWS if row["op"] == op]
    run_rows(backend, op, rows)


# ---------------------------------------------------------------------------------------------
# The proof that every kernel instance runs
# ---------------------------------------------------------------------------------------------
def _parametrized_rows(test, argname="rows"):
    """The rows a test's parametrization hands its cases (the suite's cases themselves)."""
    for mark in test.pytestmark:
        if mark.name == "parametrize" and mark.args[0] == argname:
            return kc.rows_of(mark.args[1])
    raise AssertionError(f"{test.__name__} is not parametrized over {argname}")


def test_every_kernel_instance_runs():
    """The rows the op tests run hold every kernel instance the dispatchers can select
    (kernel_cases' module docstring: C++ template instances and run-time paths, Triton
    variants), and every pair of levels of their flags."""
    sample = _parametrized_rows(test_sample_matches_reference)
    accumulate = _parametrized_rows(test_accumulate_matches_reference)
    update = _parametrized_rows(test_update_every_instance)
    # Note [prior flags] in csrc/dispatch_flags.h: the prior precision adds 3 sample and 6
    # accumulate instances to the 3 and 12 without it; the update's rare inputs (Note [rare
    # inputs of an update] in csrc/cpu_kernels.h) add 216 run-time paths to the 72 without them
    assert (len(kc.CPP_SAMPLE_INSTANCES), len(kc.CPP_ACCUMULATE_INSTANCES),
            len(kc.CPP_UPDATE_INSTANCES)) == (3 + 3, 12 + 6, 72 + 216)
    for rows, key, reachable in [
            (sample, kc.cpp_sample_instance, kc.CPP_SAMPLE_INSTANCES),
            (sample, kc.triton_sample_variant, kc.TRITON_SAMPLE_VARIANTS),
            (accumulate, kc.cpp_accumulate_instance, kc.CPP_ACCUMULATE_INSTANCES),
            (accumulate, kc.triton_accumulate_variant, kc.TRITON_ACCUMULATE_VARIANTS),
            (update, kc.cpp_update_instance, kc.CPP_UPDATE_INSTANCES),
            (update, kc.triton_update_variant, kc.TRITON_UPDATE_VARIANTS)]:
        ran = {key(row) for row in rows}
        assert reachable <= ran, (key.__name__, sorted(reachable - ran, key=repr)[:5])
        assert ran <= reachable, (key.__name__, sorted(ran - reachable, key=repr)[:5])
    paths = set().union(*(kc.cpp_update_paths(row) for row in update))
    assert kc.CPP_UPDATE_PATHS <= paths, sorted(kc.CPP_UPDATE_PATHS - paths)
    # the flags pairwise (what is not crossed above: LEAD, blocks, device inputs, found_inf)
    for rows, factors, valid in [(sample, kc.SAMPLE_FACTORS, kc._block_fits),
                                 (accumulate, kc.ACCUMULATE_FACTORS, kc._block_fits),
                                 (update, kc.UPDATE_FACTORS, kc._update_valid)]:
        names = list(factors)
        pairs = [{a: x, b: y} for i, a in enumerate(names) for b in names[i + 1:]
                 for x in factors[a] for y in factors[b]]
        absent = [pair for pair in missing(rows, pairs) if valid(pair)]
        assert not absent, absent[:5]
    # Triton's LEAD (offset & 3) with every param dtype
    for rows in (sample, accumulate, update):
        leads = {(row["ptype"], kc.segment(row)[1] & 3) for row in rows}
        assert leads == {(p, lead) for p in kc.PARAM_TYPES for lead in range(4)}, leads


# ---------------------------------------------------------------------------------------------
# Properties of every backend (the reference included)
# ---------------------------------------------------------------------------------------------
N, OFFSET = 37, 4099  # a partial quad at both ends


def _state(n=N, ptype=torch.float32, state="float32", hess_approx="price", device="cpu",
           seed=30):
    st = prior_state(n, ptype, device, hess_approx, seed=seed)
    return bf16_state(st) if state == "bfloat16" else st


def _update(module, st, *, grad=True, count=3, hess_approx="price", next_draw=7,
            scalars=PRIOR_SCALARS, **kw):
    tensors = dict(st)
    if not grad:
        tensors["grad"] = None
    return call(module, "update", tensors,
                dict(seed=BIG_SEED, draw=6, next_draw=next_draw, offset=OFFSET, count=count,
                     hess_approx=hess_approx, scalars=scalars, round_draw=kw.pop("round_draw", 5)),
                kw)


def _assert_same(a, b, keys=kc.UPDATE_OUTPUTS, what=""):
    for key in keys:
        assert same_bits(a[key], b[key]), f"{what}{key}"


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
def test_accumulate_of_the_first_sample_never_reads_the_averages(backend, hess_approx):
    """count == 1 starts the running means afresh whatever the averages held (NaN here): the
    optimizer does not clear them between steps."""
    st = _state(hess_approx=hess_approx, device=backend.device)
    kw = dict(seed=12345, draw=4, offset=OFFSET, count=1, ess=30.0, weight_decay=1e-3,
              hess_approx=hess_approx)
    fresh = call(backend.module, "accumulate", st, kw)
    stale = dict(st, avg_grad=torch.full_like(st["avg_grad"], float("nan")),
                 avg_hess_term=torch.full_like(st["avg_hess_term"], float("nan")))
    got = call(backend.module, "accumulate", stale, kw)
    _assert_same(got, fresh, ("avg_grad", "avg_hess_term"))
    assert got["avg_grad"].isfinite().all() and got["avg_hess_term"].isfinite().all()


MODE_FACTOR = {"mode": ["grad_only", "grad_avg", "avg_only"]}
GRAD_SCALE_ROWS = cover({"hess_approx": ["price", "gradsq"], **MODE_FACTOR,
                         "scale": [1024.0, 3.0], "state": kc.STATE_TYPES, "prior": [False, True],
                         "next": [True, False]})


def _mode(row):
    return dict(kc.MODES[row["mode"]], count=kc.MODES[row["mode"]].get("count", 3))


@pytest.mark.parametrize("backend", ALL)
def test_update_grad_scale_is_a_true_division(backend):
    """fp32: grad_scale gives the bits of the update of the inputs divided by torch first (true
    divisions, not a reciprocal multiply; the 'gradsq' average twice, it holds squares), and the
    scale matters."""
    for row in GRAD_SCALE_ROWS:
        scale, hess_approx = row["scale"], row["hess_approx"]
        mode = _mode(row)
        st = _state(state=row["state"], hess_approx=hess_approx, device=backend.device)
        priors = prior_inputs("both" if row["prior"] else None, N, backend.device)
        scaled = dict(st, grad=st["grad"] * scale, avg_grad=st["avg_grad"] * scale,
                      avg_hess_term=st["avg_hess_term"] * scale
                      * (scale if hess_approx == "gradsq" else 1.0), **priors)
        kw = dict(hess_approx=hess_approx, next_draw=7 if row["next"] else None, **mode)
        got = _update(backend.module, scaled, grad_scale=one(scale, backend.device), **kw)
        term = scaled["avg_hess_term"] / scale
        divided = dict(scaled, grad=scaled["grad"] / scale, avg_grad=scaled["avg_grad"] / scale,
                       avg_hess_term=term / scale if hess_approx == "gradsq" else term)
        _assert_same(got, _update(backend.module, divided, **kw), what=f"{label(row)}: ")
        ignored = _update(backend.module, scaled, **kw)
        assert not torch.allclose(ignored["hess"].float(), got["hess"].float(), rtol=1e-3,
                                  atol=0), label(row)


SKIP_ROWS = cover({"ptype": ["float32", "bfloat16"], "hess_approx": ["price", "gradsq"],
                   **MODE_FACTOR, "next": [False, True], "found": [1.0, "nan", "-inf"],
                   "prior": [None, "mean", "precision", "both"], "state": kc.STATE_TYPES},
                  explicit=[dict(prior="precision", next=True, state="bfloat16"),
                            dict(prior="both", next=True, found="nan")])


@pytest.mark.parametrize("backend", ALL)
def test_a_skipped_step_keeps_the_state(backend):
    """A nonzero or NaN found_inf: mean, momentum, hess and the averages keep their bits (bf16
    state too: a bf16 value rounds to itself), non-finite grads never reach them, and the param
    gets the old mean, or the sample op's sample of the next draw around the old state, with the
    prior precision (the same bits)."""
    device = backend.device
    for row in SKIP_ROWS:
        ptype = DTYPES[row["ptype"]]
        st = _state(ptype=ptype, state=row["state"], hess_approx=row["hess_approx"],
                    device=device, seed=7)
        if row["mode"] != "avg_only":
            st["grad"][::7] = float("inf")
        st["avg_grad"][1::5] = float("nan")
        priors = prior_inputs(row["prior"], N, device)
        next_draw = 7 if row["next"] else None
        got = _update(backend.module, dict(st, **priors), hess_approx=row["hess_approx"],
                      next_draw=next_draw, found_inf=one(float(row["found"]), device),
                      grad_scale=one(3.0, device), **_mode(row))
        for key in ("mean", "momentum", "hess", "avg_grad", "avg_hess_term", "grad"):
            if got[key] is not None:
                assert same_bits(got[key], st[key]), f"{label(row)}: {key}"
        if next_draw is None:
            assert same_bits(got["param"], st["mean"].to(ptype)), label(row)
        else:
            sampled = call(backend.module, "sample",
                           dict(param=st["param"], mean=st["mean"], hess=st["hess"],
                                **{k: v for k, v in priors.items() if k == "prior_precision"}),
                           dict(seed=BIG_SEED, draw=next_draw, offset=OFFSET,
                                ess=PRIOR_SCALARS.ess, weight_decay=PRIOR_SCALARS.weight_decay))
            assert same_bits(got["param"], sampled["param"]), label(row)


FOUND_ZERO_ROWS = cover({"hess_approx": ["price", "gradsq"], **MODE_FACTOR,
                         "state": kc.STATE_TYPES, "ptype": ["float32", "float16"]})


@pytest.mark.parametrize("backend", ALL)
def test_update_found_inf_zero_takes_the_step(backend):
    """found_inf = 0 is the step without found_inf, bit for bit."""
    for row in FOUND_ZERO_ROWS:
        st = _state(ptype=DTYPES[row["ptype"]], state=row["state"],
                    hess_approx=row["hess_approx"], device=backend.device)
        kw = dict(hess_approx=row["hess_approx"], **_mode(row))
        got = _update(backend.module, st, found_inf=one(0.0, backend.device), **kw)
        _assert_same(got, _update(backend.module, st, **kw), what=f"{label(row)}: ")
        assert not same_bits(got["mean"], st["mean"]), label(row)  # the step was taken


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("ptype", ["float32", "float16"])
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
def test_update_device_lr_and_debias_replace_the_scalars(backend, ptype, hess_approx):
    """device_lr / device_debias holding the scalars' values give the scalars' bits; other
    values give the bits of scalars with those values (each alone and both): the kernel reads
    them, not the host's."""
    device = backend.device
    st = _state(ptype=DTYPES[ptype], hess_approx=hess_approx, device=device, seed=9)

    def scalars(lr, debias):
        return StepScalars.of(lr=lr, ess=30.0, weight_decay=0.05, beta1=0.9, beta2=0.95,
                              debias=debias)

    base = scalars(0.05, 0.271)
    for lr, debias in [(0.05, 0.271), (0.2, 0.5), (0.2, None), (None, 0.5)]:
        dev = {}
        if lr is not None:
            dev["device_lr"] = one(lr, device)
        if debias is not None:
            dev["device_debias"] = one(debias, device)
        got = _update(backend.module, st, hess_approx=hess_approx, scalars=base, **dev)
        want = _update(backend.module, st, hess_approx=hess_approx,
                       scalars=scalars(0.05 if lr is None else lr,
                                       0.271 if debias is None else debias))
        _assert_same(got, want, what=f"lr={lr} debias={debias}: ")
        if (lr, debias) != (0.05, 0.271):
            assert not same_bits(got["mean"], _update(backend.module, st,
                                                      hess_approx=hess_approx)["mean"])


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("next_draw", [7, None])
def test_update_without_debiasing(backend, next_draw):
    """debias exactly 1.0 (debias=False, and every step after about 165 with beta1 = 0.9),
    where the kernels skip the division by it: as a scalar and as device_debias, the bits of
    each other, as the reference (x / 1 is x)."""
    device = backend.device
    st = _state(device=device, seed=11)
    s = PRIOR_SCALARS
    unbiased = StepScalars.of(lr=s.lr, ess=s.ess, weight_decay=s.weight_decay, beta1=s.beta1,
                              beta2=s.beta2, debias=1.0)
    got = _update(backend.module, st, scalars=unbiased, next_draw=next_draw)
    on_device = _update(backend.module, st, next_draw=next_draw, device_debias=one(1.0, device))
    _assert_same(on_device, got)
    want = _update(reference, {k: v.cpu() for k, v in st.items()}, scalars=unbiased,
                   next_draw=next_draw)
    for key in kc.UPDATE_OUTPUTS:
        assert_close(got[key].cpu().float(), want[key].float(), msg=key)
    assert not same_bits(got["mean"], _update(backend.module, st, next_draw=next_draw)["mean"])


DRAW_ROWS = cover({"op": ["update", "sample", "accumulate"], "state": kc.STATE_TYPES,
                   "next": [True, False], "draw": ["train", "eval"],
                   "ptype": kc.PARAM_TYPES})


@pytest.mark.parametrize("backend", ALL)
def test_device_draws_replace_the_host_draws(backend):
    """With device_draws the ops read the draws there (sample / accumulate: the draw; update:
    the draw and the next draw, the latter also bf16 state's rounding index) and ignore the
    host's: the bits of the same ops with those draws given on the host."""
    device = backend.device
    for row in DRAW_ROWS:
        draw, second = 3, kc.DRAWS[row["draw"]]
        st = _state(ptype=DTYPES[row["ptype"]], state=row["state"], device=device)
        common = dict(seed=BIG_SEED, offset=OFFSET, ess=30.0, weight_decay=1e-3)
        if row["op"] == "sample":
            tensors, kw = dict(param=st["param"], mean=st["mean"], hess=st["hess"]), common
        elif row["op"] == "accumulate":
            tensors = dict(grad=st["grad"], hess=st["hess"], avg_grad=st["avg_grad"],
                           avg_hess_term=st["avg_hess_term"])
            kw = dict(common, count=2, hess_approx="price")
        if row["op"] != "update":
            got = call(backend.module, row["op"], tensors, dict(kw, draw=999),
                       dict(device_draws=device_draws([second], device)))
            want = call(backend.module, row["op"], tensors, dict(kw, draw=second))
            _assert_same(got, want, kc.OUTPUTS[row["op"]], f"{label(row)}: ")
            continue
        got = _update(backend.module, st, next_draw=998 if row["next"] else None,
                      round_draw=997, device_draws=device_draws([draw, second], device))
        want = call(backend.module, "update", dict(st),
                    dict(seed=BIG_SEED, draw=draw, next_draw=second if row["next"] else None,
                         offset=OFFSET, count=3, hess_approx="price", scalars=PRIOR_SCALARS,
                         round_draw=second))
        _assert_same(got, want, what=f"{label(row)}: ")


NEUTRAL_ROWS = cover({"hess_approx": ["price", "gradsq"], **MODE_FACTOR,
                      "ptype": kc.PARAM_TYPES, "state": kc.STATE_TYPES})


@pytest.mark.parametrize("backend", ALL)
def test_a_neutral_prior_is_the_weight_decay_bit_for_bit(backend):
    """A prior of mean 0 and precision weight_decay (rounded to fp32, as the kernels round the
    scalar) in every element: the variants with the prior inputs compute the bits of the
    variants without them (sample, accumulate, update)."""
    device = backend.device
    wd = PRIOR_SCALARS.weight_decay
    precision = dict(prior_precision=torch.full((N,), wd, dtype=torch.float32, device=device))
    for row in NEUTRAL_ROWS:
        st = _state(ptype=DTYPES[row["ptype"]], state=row["state"],
                    hess_approx=row["hess_approx"], device=device)
        mode = _mode(row)
        neutral = dict(precision, prior_mean=torch.zeros(N, device=device))
        kw = dict(hess_approx=row["hess_approx"], **mode)
        _assert_same(_update(backend.module, dict(st, **neutral), **kw),
                     _update(backend.module, st, **kw), what=f"update {label(row)}: ")
        common = dict(seed=BIG_SEED, draw=2, offset=OFFSET, ess=PRIOR_SCALARS.ess,
                      weight_decay=wd)
        acc = dict(grad=st["grad"], hess=st["hess"], avg_grad=st["avg_grad"],
                   avg_hess_term=st["avg_hess_term"])
        acc_kw = dict(common, count=mode["count"], hess_approx=row["hess_approx"])
        _assert_same(call(backend.module, "accumulate", dict(acc, **precision), acc_kw),
                     call(backend.module, "accumulate", acc, acc_kw),
                     kc.OUTPUTS["accumulate"], f"accumulate {label(row)}: ")
        smp = dict(param=st["param"], mean=st["mean"], hess=st["hess"])
        _assert_same(call(backend.module, "sample", dict(smp, **precision), common),
                     call(backend.module, "sample", smp, common), ("param",),
                     f"sample {label(row)}: ")


# ---------------------------------------------------------------------------------------------
# A trajectory: the ops chained over several steps as the optimizer chains them
# ---------------------------------------------------------------------------------------------
def _loss_grad(theta, target):
    """The gradient of a quadratic with a sine term, so each step depends on the sample."""
    x = theta.float()
    return (x - target + 0.3 * torch.sin(3 * x)).to(theta.dtype)


def trajectory(ops, device, dtype, n, offset, mc, hess_approx, steps):
    """(param, mean, momentum, hess) after ``steps`` IVON iterations of ``mc`` samples with the
    ops of the module ``ops``."""
    gen = torch.Generator().manual_seed(3)
    target = torch.randn(n, generator=gen).to(device)
    mean = (0.1 * torch.randn(n, generator=gen)).to(device)
    hess = torch.full((n,), 0.2, device=device)
    momentum = torch.zeros(n, device=device)
    avg_grad, avg_term = torch.zeros(n, device=device), torch.zeros(n, device=device)
    param = torch.zeros(n, dtype=dtype, device=device)
    hyper = dict(ess=50.0, weight_decay=1e-4)
    common = dict(seed=BIG_SEED, offset=offset, **hyper)
    clip_radius = 1e-3 if hess_approx == "price" else float("inf")
    draw = 0
    ops.sample(param, mean, hess, draw=draw, **common)
    for step in range(1, steps + 1):
        for s in range(1, mc):  # all but the last sample go through accumulate
            ops.accumulate(_loss_grad(param, target), hess, avg_grad, avg_term, draw=draw,
                           count=s, hess_approx=hess_approx, **common)
            draw += 1
            ops.sample(param, mean, hess, draw=draw, **common)
        last = step == steps
        scalars = StepScalars.for_group(
            dict(lr=0.1, hess_init=0.2, beta1=0.9, beta2=0.99999, clip_radius=clip_radius,
                 **hyper), step, rescale_lr=True, debias=True)
        ops.update(param, _loss_grad(param, target), mean, momentum, hess, avg_grad, avg_term,
                   draw=draw, next_draw=None if last else draw + 1, count=mc,
                   hess_approx=hess_approx, scalars=scalars, seed=BIG_SEED, offset=offset)
        draw += 1
    return param, mean, momentum, hess


@pytest.mark.parametrize("backend", COMPARED)
@pytest.mark.parametrize("ptype,mc,hess_approx", [("float32", 1, "price"),
                                                  ("float32", 3, "gradsq"),
                                                  ("bfloat16", 3, "price"),
                                                  ("float16", 2, "gradsq")])
def test_trajectory(backend, ptype, mc, hess_approx):
    """Six steps chained as the optimizer chains them: the fp32 master state follows the
    reference to the docs/DESIGN.md section 7 bound, the params to one rounding step of their
    dtype; the bound is far below what the steps changed. Low-precision params: a sample whose
    fp32 value lies at a rounding boundary may round the other way when the noise differs by an
    fp32 ulp (the C++ kernels' transcendental functions are not torch's), and feed back a grad
    one rounding step apart: the bound holds on 99.5% of the elements, 100 times the bound on
    all."""
    n, offset, steps, device = 3001, 4099, 6, backend.device
    dtype = DTYPES[ptype]
    got = trajectory(backend.module, device, dtype, n, offset, mc, hess_approx, steps)
    expected = trajectory(reference, device, dtype, n, offset, mc, hess_approx, steps)
    initial = trajectory(reference, device, dtype, n, offset, mc, hess_approx, 0)
    for name, a, e, start in zip(("param", "mean", "momentum", "hess"), got, expected, initial):
        rtol, atol = kc.TOLERANCE[dtype if name == "param" else torch.float32]
        a, e, start = a.float(), e.float(), start.float()
        bound = atol + rtol * e.abs()
        apart = (a - e).abs()
        if dtype == torch.float32:
            torch.testing.assert_close(a, e, rtol=rtol, atol=atol,
                                       msg=lambda m, name=name: f"{name}: {m}")
        else:
            assert (apart <= bound).float().mean() >= 0.995, name
            assert (apart <= 100 * bound).all(), (name, apart.max().item())
        moved = (e - start).abs()
        assert (moved > 10 * bound).float().mean() > 0.5, name
