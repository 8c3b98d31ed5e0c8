"""The case tables of the kernel suite (tests/test_kernels*.py): which flag combinations run.

Each op's table is a covering array (tests/covering.py) over its flag dimensions: every pair of
levels appears, every kernel instance the dispatchers can select appears (``required``), and the
known risky combinations get rows of their own (``explicit``, each with why). With
``--nightly`` / ``IVON_FAST_NIGHTLY=1`` the suites add the long grids (``nightly_rows``), marked
``nightly``.

Kernel instances (what "every instance runs" means; ``*_instance`` below derive the keys from a
row, with the dispatchers' own rules, and ``*_INSTANCES`` enumerate the reachable ones):

- C++ (cpu and cuda): the template instances of csrc/dispatch_flags.h, which both the CPU
  (cpu_kernels.h) and the CUDA kernels (cuda_kernels.cuh) call: ``dispatch_sample`` (param type,
  prec), ``dispatch_accumulate`` (param type, price, first, prec; 'gradsq' gets no instance with
  prec), ``dispatch_update`` (param type, price, GradMode, next, rare), where ops.cpp sets first =
  (count == 1), GradMode = kAvgOnly without grad, else kGradOnly for count == 1 and kGradAvg
  above, next = next_draw given, prec = prior_precision given, and rare = any of grad_scale,
  prior_precision, prior_mean given. The rare instance reads all three, with neutral values for
  those not given (Note [rare inputs of an update] in csrc/cpu_kernels.h), so each combination
  of the three (scaled, prec, pmean) is a run-time path of it: ``CPP_UPDATE_INSTANCES`` holds
  them all (param type, price, GradMode, next, scaled, prec, pmean). Run-time paths inside an
  update instance with code of their own: the skipped step (found_inf nonzero;
  ``skipped_update_range_t``) and bf16 state (the widened buffers and ``round_state_block`` on
  the CPU, a run-time branch of the same kernel on CUDA): required for every (param type, next,
  prec) and, for bf16 state, with every instance flag but ``scaled`` (below). On AVX-512 the
  instances without a rare input also have the noise pipeline (Note [where the noise is
  pipelined]), which runs only in a thread's range of at least two whole blocks of 256 elements
  (LONG_SEGMENTS). The CUDA kernels take a subset of
  these flags as template parameters (the ``*_cuda`` dispatchers: sample the param type,
  accumulate (param type, price, first), update (param type, price, GradMode, next);
  ``CUDA_*_INSTANCES``) and test the others at run time (Note [CUDA run-time flags] in
  csrc/cuda_kernels.cuh), so the rows that hold every C++ instance hold every CUDA one, with
  each of its run-time paths.
- Triton: a compiled variant per constexpr flags and pointer element types. The flags that
  select code inside the tile: the param dtype, the state dtype (momentum / hess: bf16 is the
  pointer-typed variant), and sample: HAS_PRIOR_PRECISION; accumulate: FIRST, PRICE,
  HAS_PRIOR_PRECISION (forced off for 'gradsq'); update: HAS_GRAD + FIRST (the GradMode), PRICE,
  RESAMPLE, HAS_GRAD_SCALE, HAS_PRIOR_MEAN, HAS_PRIOR_PRECISION, HAS_FOUND_INF. The others only
  change how a scalar reaches the kernel (HAS_DEVICE_DRAWS, HAS_DEVICE_LR, HAS_DEVICE_DEBIAS: one
  load before the tile) or where tiles start (LEAD = offset & 3, BLOCK). Required: sample, every
  combination of (param dtype, state dtype, HAS_DEVICE_DRAWS, HAS_PRIOR_PRECISION); accumulate,
  every (param dtype, state dtype, FIRST, PRICE, HAS_PRIOR_PRECISION); update, every (param
  dtype, state dtype, GradMode, PRICE, RESAMPLE, HAS_PRIOR_MEAN, HAS_PRIOR_PRECISION), and
  HAS_GRAD_SCALE with all of these but the state dtype (every C++ instance is a row). The rest,
  HAS_FOUND_INF and the found_inf values, the device flags, LEAD and BLOCK, pairwise with every
  other flag (as all flags are: every table is a pairwise covering array). Crossing them all
  would be about 37 000 update variants.

``test_every_kernel_instance_runs`` (tests/test_kernels.py) checks the tables the tests use
against these sets, computed independently from the dispatchers' rules.
"""
from __future__ import annotations

import itertools
import os
from contextlib import contextmanager

import pytest
import torch

from ivon_fast.reference import EVAL_DRAW_BASE
from ivon_fast.scalars import StepScalars

from covering import cover, label, product
from kernel_checks import PRIOR_SCALARS, device_draws, one, prior_inputs, prior_state
from state_checks import assert_rounded_alike, bf16_state

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PARAM_TYPES = list(DTYPES)
STATE_TYPES = ["float32", "bfloat16"]
BIG_SEED = (1 << 64) - 12345          # above 2^63: the top bit must survive the launch
EVAL_DRAW = EVAL_DRAW_BASE + 17       # an evaluation draw (bit 63 set)
TRAIN_DRAW, NEXT_DRAW = 11, 12
DRAWS = {"train": NEXT_DRAW, "eval": EVAL_DRAW}  # the next draw (update) or the draw (others)

# (rtol, atol) of values written in each dtype: fp32 allows a few ulps of the transcendental
# functions in the noise; bf16 / fp16 outputs may round one ulp differently when the fp32 values
# they are rounded from differ by an ulp (docs/DESIGN.md section 7)
TOLERANCE = {
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (8e-3, 1e-5),
    torch.float16: (1e-3, 1e-5),
}


def assert_close(actual, expected, dtype=torch.float32, msg=None):
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol,
                               msg=None if msg is None else (lambda m: f"{msg}: {m}"))


# ---- segments: n@offset ---------------------------------------------------------------------
# Small ones for the flag tables (the Triton interpreter pays per program and per launch): the
# first is the cheap default (a partial quad at both ends, LEAD 2); 1 and 3 elements inside one
# quad; 6 across a quad boundary; 37 at LEAD 3 makes a masked, a full and a masked tile with
# Triton's 16-element block; 64 at a multiple of 4 is whole quads only (CUDA's vector path, all
# Triton tiles full with block 16).
SMALL_SEGMENTS = ["13@4098", "1@0", "3@1", "6@3", "37@4099", "64@4096"]
# Long and far ones (test_kernels.py's segment tests): many quads; CUDA's vector path; several CPU
# threads (Note [thread split over quads] in cpu_dispatch.cpp); many Triton programs; global
# offsets from 2^34 elements (2^32 quads) put the high word of the noise counter to work, the
# second across its carry, the third beyond 2^62 elements.
LONG_SEGMENTS = ["4097@4099", "4097@4", "70001@1", "70001@4", "4097@17179869187",
                 "4097@17179865091", "4097@4611686018427387905"]


def segment(row):
    n, offset = row["segment"].split("@")
    return int(n), int(offset)


def _block_fits(row):
    """Triton's 16-element block only on segments of a few tiles (the interpreter pays per
    program)."""
    if row.get("block", "default") == "default" or "segment" not in row:
        return True
    return 16 <= segment(row)[0] <= 64


@contextmanager
def launch_block(backend, row):
    """The row's Triton block (``IVON_TRITON_BLOCK``) for the Triton backend under the
    interpreter; on the GPU the default block already makes many programs (and each other block
    would compile every variant again)."""
    block = row.get("block", "default")
    if block == "default" or not backend.triton or backend.device != "cpu":
        yield
        return
    saved = os.environ.get("IVON_TRITON_BLOCK")
    os.environ["IVON_TRITON_BLOCK"] = str(block)
    try:
        yield
    finally:
        if saved is None:
            del os.environ["IVON_TRITON_BLOCK"]
        else:
            os.environ["IVON_TRITON_BLOCK"] = saved


# ---- sample ---------------------------------------------------------------------------------
SAMPLE_FACTORS = {
    "ptype": PARAM_TYPES,
    "prior_precision": [False, True],
    "state": STATE_TYPES,
    "device_draws": [False, True],
    "draw": ["train", "eval"],
    "segment": SMALL_SEGMENTS,
    "block": ["default", 16],
}
SAMPLE_REQUIRED = product(SAMPLE_FACTORS, ["ptype", "prior_precision", "state", "device_draws"])
SAMPLE_EXPLICIT = [
    # the device draw is an evaluation draw (bit 63 set): the int64 tensor holds a negative value
    dict(device_draws=True, draw="eval", prior_precision=True, state="bfloat16"),
]


def sample_rows():
    return cover(SAMPLE_FACTORS, required=SAMPLE_REQUIRED, explicit=SAMPLE_EXPLICIT,
                 valid=_block_fits)


# ---- accumulate -----------------------------------------------------------------------------
ACCUMULATE_FACTORS = {
    "ptype": PARAM_TYPES,
    "hess_approx": ["price", "gradsq"],
    "count": [1, 3],
    "prior_precision": [False, True],
    "state": STATE_TYPES,
    "device_draws": [False, True],
    "draw": ["train", "eval"],
    "segment": SMALL_SEGMENTS,
    "block": ["default", 16],
}
ACCUMULATE_REQUIRED = product(ACCUMULATE_FACTORS,
                              ["ptype", "hess_approx", "count", "prior_precision", "state"])
ACCUMULATE_EXPLICIT = [
    # 'gradsq' with a prior precision: its hess term has no noise, so the precision cannot
    # matter (no instance reads it), with the device draw and bf16 hess as well
    dict(hess_approx="gradsq", prior_precision=True, device_draws=True, state="bfloat16",
         count=3),
]


def accumulate_rows():
    return cover(ACCUMULATE_FACTORS, required=ACCUMULATE_REQUIRED, explicit=ACCUMULATE_EXPLICIT,
                 valid=_block_fits)


# ---- update ---------------------------------------------------------------------------------
# grad + count are the GradMode (ops.cpp: kAvgOnly without grad, kGradOnly for count 1, kGradAvg
# above; Triton: HAS_GRAD, FIRST); the found_inf values: absent, 0 (the step is taken), nonzero
# and NaN (skipped, NaN != 0); avgs: the averages given, None, or NaN (kGradOnly must not read
# them); draw: the kind of the next draw (and of device_draws[1], bf16 state's rounding index)
UPDATE_FACTORS = {
    "ptype": PARAM_TYPES,
    "hess_approx": ["price", "gradsq"],
    "grad": [True, False],
    "count": [1, 3],
    "next": [False, True],
    "scaled": [False, True],
    "prior_precision": [False, True],
    "prior_mean": [False, True],
    "state": STATE_TYPES,
    "found": ["absent", "zero", "one", "nan", "-inf"],
    "scale": [1024.0, 3.0],
    "draw": ["train", "eval"],
    "device_lr": [False, True],
    "device_debias": [False, True],
    "device_draws": [False, True],
    "clip": ["inf", "finite"],
    "avgs": ["given", "none", "nan"],
    "segment": SMALL_SEGMENTS,
    "block": ["default", 16],
}
MODES = {"grad_only": dict(grad=True, count=1), "grad_avg": dict(grad=True, count=3),
         "avg_only": dict(grad=False)}


def grad_mode(row):
    """ops.cpp's GradMode of a row."""
    if not row["grad"]:
        return "avg_only"
    return "grad_only" if row["count"] == 1 else "grad_avg"


def _update_valid(row):
    # the averages may be missing or garbage only where nothing reads them (kGradOnly)
    if row.get("avgs", "given") != "given" and (row.get("grad") is False or row.get("count") == 3):
        return False
    return _block_fits(row)


def _update_required(flags):
    """One partial row per combination of GradMode and the factors ``flags``."""
    out = []
    for mode, combo in itertools.product(MODES.values(), product(UPDATE_FACTORS, flags)):
        out.append({**mode, **combo})
    return out


_INSTANCE_FLAGS = ["ptype", "hess_approx", "next", "scaled", "prior_precision", "prior_mean"]
UPDATE_REQUIRED = (
    # every C++ update instance (dispatch_update's flags)
    _update_required(_INSTANCE_FLAGS)
    # every Triton tile variant but grad_scale's, with fp32 and with bf16 state
    + _update_required(["ptype", "hess_approx", "next", "prior_precision", "prior_mean",
                        "state"])
    # the C++ skipped step, per (PT, NEXT) of skipped_update_range_t, with a prior precision
    # and without
    + product(UPDATE_FACTORS, ["ptype", "next", "prior_precision", "found"], found=["one"]))
UPDATE_EXPLICIT = [
    # a skipped step with bf16 state and a next sample: the rounding pass stores the old values
    # (they must round to themselves) and the sample is drawn around the old hess
    dict(found="-inf", state="bfloat16", next=True, ptype="bfloat16", segment="37@4099",
         block=16),
    # a skipped step's next sample with the prior precision (C++ samples it in a separate loop)
    dict(found="nan", next=True, prior_precision=True, prior_mean=True, ptype="float16"),
    # 'gradsq' without grad, count 1 and a grad_scale: its average is unscaled twice, also when
    # the averages hold the only sample
    dict(hess_approx="gradsq", grad=False, count=1, scaled=True, scale=3.0),
    # kGradOnly with no averages at all, and with NaN averages: nothing may read them
    dict(grad=True, count=1, avgs="none", next=True, hess_approx="price", state="bfloat16"),
    dict(grad=True, count=1, avgs="nan", scaled=True, hess_approx="gradsq", found="zero"),
    # bf16 state's rounding index from device_draws[1] without a next sample, and an evaluation
    # draw there: ROUND_DRAW_BASE + draws[1] wraps mod 2^64 (an int64 sum in the kernels)
    dict(device_draws=True, next=False, state="bfloat16", draw="eval"),
    dict(device_draws=True, next=True, state="bfloat16", draw="eval", found="zero"),
    # both priors with every device input (the capturable AMP step with a prior), bf16 params
    dict(prior_precision=True, prior_mean=True, scaled=True, found="zero", device_lr=True,
         device_debias=True, device_draws=True, next=True, ptype="bfloat16", grad=True,
         count=3, segment="64@4096", block=16),
    # 'price' with the pending grad, the prior precision and a grad_scale: the grad is unscaled
    # before it multiplies the noise, whose sigma uses the prior precision
    dict(hess_approx="price", grad=True, count=3, prior_precision=True, scaled=True,
         scale=1024.0, clip="inf", ptype="float16"),
    # a clip that binds, with device_lr and device_debias replacing the scalars it scales
    dict(clip="finite", device_lr=True, device_debias=True, found="zero", next=False),
]


def update_rows():
    return cover(UPDATE_FACTORS, required=UPDATE_REQUIRED, explicit=UPDATE_EXPLICIT,
                 valid=_update_valid)


def update_nightly_rows():
    """The long grid: every GradMode (also without grad and count 1), next, grad_scale, prior,
    state and found_inf combination for every param dtype and hess approximation (3840 rows),
    the other factors pairwise."""
    grid = [{**combo, **mode}
            for mode in (dict(grad=True, count=1), dict(grad=True, count=3),
                         dict(grad=False, count=1), dict(grad=False, count=3))
            for combo in product(UPDATE_FACTORS, ["ptype", "hess_approx", "next", "scaled",
                                                  "prior_precision", "prior_mean", "state",
                                                  "found"])]
    return cover(UPDATE_FACTORS, required=grid, valid=_update_valid)


def full_grid(factors):
    """Every combination of the factors' levels that a Triton block fits (the nightly grids of
    sample and accumulate: 576 and 2304 rows)."""
    return [row for row in product(factors) if _block_fits(row)]


# ---- instance keys (the dispatchers' rules, written out independently of the tables) ----------
def cpp_sample_instance(row):
    return (row["ptype"], row["prior_precision"])


def cpp_accumulate_instance(row):
    price = row["hess_approx"] == "price"
    return (row["ptype"], price, row["count"] == 1, price and row["prior_precision"])


def cpp_update_instance(row):
    return (row["ptype"], row["hess_approx"] == "price", grad_mode(row), row["next"],
            row["scaled"], row["prior_precision"], row["prior_mean"])


def cpp_update_paths(row):
    """The run-time paths of an update instance: skipped (found_inf nonzero) or bf16 state,
    keyed as their templates are (PT, NEXT, PREC)."""
    paths = set()
    key = (row["ptype"], row["next"], row["prior_precision"])
    if row["found"] in ("one", "nan", "-inf"):
        paths.add(("skipped",) + key)
    if row["state"] == "bfloat16":
        paths.add(("bf16_state",) + key)
    return paths


def triton_sample_variant(row):
    return (row["ptype"], row["state"], row["device_draws"], row["prior_precision"])


def triton_accumulate_variant(row):
    price = row["hess_approx"] == "price"
    return (row["ptype"], row["state"], row["count"] == 1, price, price and row["prior_precision"])


def triton_update_variant(row):
    """The tile flags but HAS_GRAD_SCALE and HAS_FOUND_INF (see the module docstring)."""
    return (row["ptype"], row["state"], row["grad"], row["grad"] and row["count"] == 1,
            row["hess_approx"] == "price", row["next"], row["prior_mean"],
            row["prior_precision"])


B = [False, True]
CPP_SAMPLE_INSTANCES = set(itertools.product(PARAM_TYPES, B))
CPP_ACCUMULATE_INSTANCES = ({(p, True, f, prec) for p in PARAM_TYPES for f in B for prec in B}
                            | {(p, False, f, False) for p in PARAM_TYPES for f in B})
CPP_UPDATE_INSTANCES = set(itertools.product(PARAM_TYPES, B, ["grad_only", "grad_avg",
                                                               "avg_only"], B, B, B, B))
# the CUDA kernels' instances: the C++ keys without the flags they test at run time
CUDA_SAMPLE_INSTANCES = {(p,) for p in PARAM_TYPES}
CUDA_ACCUMULATE_INSTANCES = set(itertools.product(PARAM_TYPES, B, B))
CUDA_UPDATE_INSTANCES = set(itertools.product(PARAM_TYPES, B, ["grad_only", "grad_avg",
                                                                "avg_only"], B))
CPP_UPDATE_PATHS = {(path, p, nxt, prec) for path in ("skipped", "bf16_state")
                    for p in PARAM_TYPES for nxt in B for prec in B}
TRITON_SAMPLE_VARIANTS = set(itertools.product(PARAM_TYPES, STATE_TYPES, B, B))
TRITON_ACCUMULATE_VARIANTS = (
    {(p, s, f, True, prec) for p in PARAM_TYPES for s in STATE_TYPES for f in B for prec in B}
    | {(p, s, f, False, False) for p in PARAM_TYPES for s in STATE_TYPES for f in B})
TRITON_UPDATE_VARIANTS = {(p, s, g, g and first, price, nxt, pm, pp)
                          for p in PARAM_TYPES for s in STATE_TYPES
                          for g, first in ((True, True), (True, False), (False, False))
                          for price in B for nxt in B for pm in B for pp in B}


# ---- chunks: a table split into test cases --------------------------------------------------
def chunks(rows, names, nightly_rows=(), prefix=""):
    """pytest.param per value of the factors ``names``: the rows with those values (a test case
    loops over them, naming the row on failure); then the nightly rows likewise, marked
    ``nightly``."""
    params = []
    for rows_, marks, tag in ((rows, (), ""), (nightly_rows, (pytest.mark.nightly,), "nightly-")):
        groups = {}
        for row in rows_:
            groups.setdefault(tuple(row[name] for name in names), []).append(row)
        for values, group in groups.items():
            # name_value: -k expressions cannot hold "="
            ident = tag + prefix + "-".join(f"{name}_{value}" for name, value in zip(names, values))
            params.append(pytest.param(group, id=ident, marks=marks))
    return params


def rows_of(params):
    """The rows of ``chunks``' params (those the test cases loop over)."""
    return [row for param in params for row in param.values[0]]


# ---- inputs of a row ------------------------------------------------------------------------
FOUND = {"absent": None, "zero": 0.0, "one": 1.0, "nan": float("nan"), "-inf": float("-inf")}
CLIP = {"inf": float("inf"), "finite": 1e-3}


def scalars_of(row):
    clip = CLIP[row.get("clip", "inf")]
    s = PRIOR_SCALARS
    return StepScalars.of(lr=s.lr, ess=s.ess, weight_decay=s.weight_decay, beta1=s.beta1,
                          beta2=s.beta2, clip_radius=clip, debias=s.debias)


def _priors_of(row, n, device):
    """The row's prior inputs (kernel_checks.prior_inputs)."""
    mean, precision = row.get("prior_mean", False), row.get("prior_precision", False)
    name = {(False, False): None, (True, False): "mean", (False, True): "precision",
            (True, True): "both"}[(mean, precision)]
    return prior_inputs(name, n, device)


def _update_inputs(row, st, priors, device):
    """update's (tensors, kwargs, device inputs) for the row: the averages given, None or NaN;
    the gradients as a GradScaler leaves them (the 'gradsq' average holds squares) with the
    grad_scale; found_inf, device_lr, device_debias and the device draws when the row says so,
    the host's draws then different ones, which must be ignored."""
    ptype, hess_approx = DTYPES[row["ptype"]], row["hess_approx"]
    tensors = dict(st, grad=st["grad"] if row["grad"] else None, **priors)
    if row["avgs"] == "none":
        tensors["avg_grad"] = tensors["avg_hess_term"] = None
    elif row["avgs"] == "nan":
        tensors["avg_grad"] = torch.full_like(st["avg_grad"], float("nan"))
        tensors["avg_hess_term"] = torch.full_like(st["avg_hess_term"], float("nan"))
    dev = {}
    if row["scaled"]:
        scale = row["scale"]
        if tensors["grad"] is not None:
            tensors["grad"] = (tensors["grad"].float() * scale).to(ptype)
        if row["avgs"] == "given":
            tensors["avg_grad"] = tensors["avg_grad"] * scale
            tensors["avg_hess_term"] = tensors["avg_hess_term"] * (
                scale ** 2 if hess_approx == "gradsq" else scale)
        dev["grad_scale"] = one(scale, device)
    second = DRAWS[row["draw"]]  # the next draw, and bf16 state's rounding index
    kw = dict(seed=BIG_SEED, draw=TRAIN_DRAW, offset=segment(row)[1],
              next_draw=second if row["next"] else None, count=row["count"],
              hess_approx=hess_approx, scalars=scalars_of(row), round_draw=second)
    if row["found"] != "absent":
        dev["found_inf"] = one(FOUND[row["found"]], device)
    if row["device_lr"]:
        dev["device_lr"] = one(0.1, device)
    if row["device_debias"]:
        dev["device_debias"] = one(0.4, device)
    if row["device_draws"]:
        dev["device_draws"] = device_draws([TRAIN_DRAW, second], device)
        kw.update(draw=999, next_draw=998 if row["next"] else None, round_draw=997)
    return tensors, kw, dev


def op_inputs(op, row, device, seed=30):
    """(tensors, kwargs, device inputs) of the row's op call on ``device``: the tensors as a
    dict (kernel_checks.prior_state's, bf16 momentum / hess for bf16 state, the prior inputs),
    the keyword arguments and the device tensor arguments apart."""
    n, offset = segment(row)
    st = prior_state(n, DTYPES[row["ptype"]], device, row.get("hess_approx", "price"), seed=seed)
    if row["state"] == "bfloat16":
        st = bf16_state(st)
    priors = _priors_of(row, n, device)
    if op == "update":
        return _update_inputs(row, st, priors, device)
    priors.pop("prior_mean", None)  # update's alone
    draw = DRAWS[row["draw"]]
    kw = dict(seed=BIG_SEED if op == "sample" else (1 << 64) - 777, draw=draw, offset=offset,
              ess=PRIOR_SCALARS.ess, weight_decay=PRIOR_SCALARS.weight_decay)
    if op == "sample":
        tensors = dict(param=st["param"], mean=st["mean"], hess=st["hess"], **priors)
    else:
        tensors = dict(grad=st["grad"], hess=st["hess"], avg_grad=st["avg_grad"],
                       avg_hess_term=st["avg_hess_term"], **priors)
        kw.update(count=row["count"], hess_approx=row["hess_approx"])
    dev = {}
    if row["device_draws"]:
        dev["device_draws"] = device_draws([draw], device)
        kw["draw"] = 999  # the host's draw, which must be ignored
    return tensors, kw, dev


UPDATE_OUTPUTS = ("param", "mean", "momentum", "hess")
OUTPUTS = {"sample": ("param",), "accumulate": ("avg_grad", "avg_hess_term"),
           "update": UPDATE_OUTPUTS}


def call(backend_module, op, tensors, kw, dev=None, copy=torch.clone):
    """The op on copies of ``tensors`` (made by ``copy``); returns the copies (outputs
    included)."""
    t = {k: None if v is None else copy(v) for k, v in tensors.items()}
    args = {"sample": ("param", "mean", "hess"),
            "accumulate": ("grad", "hess", "avg_grad", "avg_hess_term"),
            "update": ("param", "grad", "mean", "momentum", "hess", "avg_grad",
                       "avg_hess_term")}[op]
    priors = {k: t[k] for k in ("prior_mean", "prior_precision") if k in t}
    getattr(backend_module, op)(*(t[a] for a in args), **kw, **(dev or {}), **priors)
    return t


# ---- checks of one row against the reference --------------------------------------------------
_REFERENCE = {}


def reference_result(op, row, device):
    """ivon_fast.reference's outputs for the row (computed once per row and device, shared by
    every backend's test; never modified by the callers)."""
    from ivon_fast import reference
    key = (op, tuple(sorted(row.items(), key=lambda item: item[0])), str(device))
    if key not in _REFERENCE:
        tensors, kw, dev = op_inputs(op, row, device)
        _REFERENCE[key] = call(reference, op, tensors, kw, dev)
    return _REFERENCE[key]


def bits(tensor):
    """The tensor's bits as integers: equal bits compare equal, NaNs included."""
    return tensor.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[tensor.element_size()])


def same_bits(a, b):
    return a.dtype == b.dtype and torch.equal(bits(a.cpu()), bits(b.cpu()))


def compare_outputs(op, got, want, row):
    """The backend's outputs against the reference's: the param within its dtype's tolerance,
    fp32 state within fp32's, bf16 momentum / hess rounded alike (the param then where the
    stored hess, which the next sample is drawn around, agrees)."""
    ptype = DTYPES[row["ptype"]]
    where = None
    if op == "update" and row["state"] == "bfloat16":
        assert_rounded_alike(got["momentum"], want["momentum"], "momentum")
        where = assert_rounded_alike(got["hess"], want["hess"], "hess").to(got["hess"].device)
    for key in OUTPUTS[op]:
        if where is not None and key in ("momentum", "hess"):
            continue
        a, e = got[key].float(), want[key].float()
        if key == "param" and where is not None:
            a, e = a[where], e[where]
        assert_close(a, e, ptype if key == "param" else torch.float32, msg=key)


def _differs(a, b, keys):
    """Which of ``keys`` differ beyond 100 times the fp32 tolerance."""
    return {key: not torch.allclose(a[key].float(), b[key].float(), rtol=1e-3, atol=1e-4,
                                    equal_nan=True) for key in keys}


def skipped(row):
    return row.get("found") in ("one", "nan", "-inf")


def noise_free(op, row):
    """The reference draws no noise (its fp32 arithmetic is then a kernel's, op for op)."""
    if op == "sample":
        return False
    if op == "accumulate":
        return row["hess_approx"] == "gradsq"
    return not row["next"] and not (row["hess_approx"] == "price" and row["grad"])


def check_row(backend, op, row):
    """``backend``'s op on the row's inputs against the reference, and what each row must also
    show: an update never writes the averages; a skipped update keeps mean, momentum and hess
    bit for bit; a finite clip binds somewhere (or the row would not test it); a prior input
    matters (the reference without it differs: a backend that dropped it fails), except the
    prior precision of 'gradsq' accumulate, which must not; where the reference draws no noise
    the CPU kernels give its bits."""
    tensors, kw, dev = op_inputs(op, row, backend.device)
    with launch_block(backend, row):
        got = call(backend.module, op, tensors, kw, dev)
    want = reference_result(op, row, backend.device)
    compare_outputs(op, got, want, row)
    if op == "update":
        for key in ("avg_grad", "avg_hess_term"):
            if tensors[key] is not None:
                assert same_bits(got[key], tensors[key]), f"update wrote {key}"
        if skipped(row):
            for key in ("mean", "momentum", "hess"):
                assert same_bits(got[key], tensors[key]), f"a skipped step changed {key}"
        elif row["clip"] == "finite":
            lr = 0.1 if row["device_lr"] else kw["scalars"].lr
            bound = lr * CLIP["finite"]
            step = (want["mean"] - tensors["mean"]).abs()
            assert ((step - bound).abs() < 1e-3 * bound).any(), "the clip never binds"
    if row.get("prior_precision") or (op == "update" and row.get("prior_mean")):
        free = (op == "update" and (skipped(row) or row["clip"] == "finite"))
        if not free:
            without = reference_result(op, {**row, "prior_precision": False,
                                            **({"prior_mean": False} if "prior_mean" in row
                                               else {})}, backend.device)
            moved = _differs(want, without, OUTPUTS[op])
            matters = not (op == "accumulate" and row["hess_approx"] == "gradsq")
            assert any(moved.values()) == matters, moved
    if noise_free(op, row) and backend.device == "cpu":
        for key in OUTPUTS[op]:
            assert same_bits(got[key], want[key]), f"{key}: not the reference's bits"
    return got, want


def run_rows(backend, op, rows, check=check_row):
    """``check`` on every row; a failure names the row."""
    for row in rows:
        try:
            check(backend, op, row)
        except AssertionError as error:
            raise AssertionError(f"{op} row {label(row)}: {error}") from error
