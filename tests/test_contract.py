"""The op contract's argument rules (ivon_fast/_contract.py) in every backend.

One table, ``ROWS``: a call of an op with one bad argument (the rest good), the rule it breaks and
the message it must raise. Every row runs through every backend available: the reference, the
Triton backend (on CPU under the Triton interpreter), the compiled ops (the CPU kernels; CUDA in
the test marked gpu) and the fake kernels (the compiled backend's call on FakeTensorMode's
tensors). Each must refuse the call with the same text: the Python backends raise the rule's
TypeError / ValueError, the compiled ops and the fake kernels a RuntimeError with the ops'
"ivon_fast: " prefix, except for the rules of the Python values (``_contract.PYTHON_ONLY``), which
the compiled backend's Python wrapper checks. Where the reference deliberately does more (float64
state, explicit noise) a row says what it does instead. Good arguments, including the edge cases
of each rule, are accepted by all.

The compiled backend's calls are redispatched straight to the CPU (CUDA) kernel, so that a meta
tensor among the arguments (this table's tensor on a foreign device) reaches the kernel's own
checks: the dispatcher would send the call to the fake kernel.

A second test reads csrc/ops.cpp: every TORCH_CHECK message must be the text of a shared rule
(or one of ``_contract.CPP_ONLY``, which are no argument rules), and every shared rule must be
one of its messages, so that a rule added on one side only fails here.

Expectations: the messages are written out below, not formed by ivon_fast._contract.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable
from unittest import mock

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ivon_fast import _contract
from ivon_fast import cpp_backend as cpp
from ivon_fast import reference
from ivon_fast import triton_backend as tb
from ivon_fast.scalars import StepScalars

OPS_CPP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc",
                       "ops.cpp")

N = 8
SCALARS = StepScalars.of(lr=0.05, ess=30.0, weight_decay=1e-3, beta1=0.9, beta2=0.99,
                         debias=0.19)
POSITIONAL = {"sample": ("param", "mean", "hess"),
              "accumulate": ("grad", "hess", "avg_grad", "avg_hess_term"),
              "update": ("param", "grad", "mean", "momentum", "hess", "avg_grad",
                         "avg_hess_term")}
SCALAR_NAMES = ("grad_scale", "found_inf", "device_lr", "device_debias")


def good(op, device, dtype=torch.float32):
    """Good arguments of ``op``: a segment of N elements at offset 5 (fp32 state)."""
    gen = torch.Generator().manual_seed(3)

    def rnd(scale=1.0, as_dtype=torch.float32):
        return (torch.randn(N, generator=gen) * scale).to(device=device, dtype=as_dtype)

    hess = (torch.rand(N, generator=gen) * 0.5 + 0.1).to(device)
    common = dict(seed=(1 << 64) - 3, draw=4, offset=5)
    if op == "sample":
        return dict(param=torch.zeros(N, dtype=dtype, device=device), mean=rnd(), hess=hess,
                    ess=30.0, weight_decay=1e-3, **common)
    if op == "accumulate":
        return dict(grad=rnd(as_dtype=dtype), hess=hess, avg_grad=rnd(), avg_hess_term=rnd(0.1),
                    count=2, ess=30.0, weight_decay=1e-3, hess_approx="price", **common)
    return dict(param=torch.zeros(N, dtype=dtype, device=device), grad=rnd(as_dtype=dtype),
                mean=rnd(), momentum=rnd(0.1), hess=hess, avg_grad=rnd(), avg_hess_term=rnd(0.1),
                next_draw=5, count=2, hess_approx="price", scalars=SCALARS, round_draw=6,
                **common)


def _float64(args):
    """The arguments with every floating tensor in float64 (the reference's float64 state)."""
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in args.items()}


SAME = "same"  # a row's reference outcome: the kernels'


@dataclass(frozen=True)
class Row:
    id: str
    op: str
    change: Callable  # (good args, foreign device) -> the arguments to replace
    rule: str         # the rule of ivon_fast._contract the kernels' refusal states
    message: str      # its text; {device}: the params' device, {other}: the foreign one
    reference: object = SAME  # SAME, None (the reference accepts), or (rule, message)


def _scalar_rows():
    rows = []
    for name in SCALAR_NAMES:
        rows += [
            Row(f"scalar_numel-{name}", "update", lambda a, o, n=name: {n: torch.ones(2)},
                "scalar_numel", f"{name} must be a tensor of 1 element, got 2 elements"),
            Row(f"scalar_dtype-{name}", "update",
                lambda a, o, n=name: {n: torch.ones(1, dtype=torch.float64)},
                "scalar_dtype", f"{name} must be float32, got Double"),
            Row(f"on_params_device-{name}", "update",
                lambda a, o, n=name: {n: torch.ones(1, device=o)}, "on_params_device",
                f"{name} must be on the params' device {{device}}, got {{other}}"),
        ]
    return rows


ROWS = [
    # ---- the segment (csrc/ops.cpp: check_common, param_type, check_tensor) ----
    Row("device-mean", "update", lambda a, o: {"mean": torch.zeros(N, device=o)}, "device",
        "mean is on {other} but param is on {device}"),
    Row("length-hess", "sample", lambda a, o: {"hess": a["hess"][:7]}, "length",
        "hess has 7 elements but param has 8"),
    Row("length-accumulate", "accumulate", lambda a, o: {"avg_hess_term": torch.zeros(9)},
        "length", "avg_hess_term has 9 elements but grad has 8"),
    Row("contiguous-momentum", "update", lambda a, o: {"momentum": torch.zeros(2 * N)[::2]},
        "contiguous", "momentum must be contiguous"),
    Row("contiguous-mean", "sample", lambda a, o: {"mean": torch.zeros(2 * N)[::2]},
        "contiguous", "mean must be contiguous"),
    Row("contiguous-param", "update", lambda a, o: {"param": torch.zeros(2 * N)[::2]},
        "contiguous", "param must be contiguous"),
    # accumulate's lead tensor is its grad; the C++ ops call the lead tensor "param"
    Row("contiguous-accumulate-grad", "accumulate", lambda a, o: {"grad": torch.zeros(2 * N)[::2]},
        "contiguous", "param must be contiguous"),
    Row("param_dtype-long", "update",
        lambda a, o: {"param": torch.zeros(N, dtype=torch.int64),
                      "grad": torch.zeros(N, dtype=torch.int64)},
        "param_dtype", "param must be float32, bfloat16 or float16, got Long",
        reference=("reference_param_dtype",
                   "param must be float32, bfloat16, float16 or float64, got Long")),
    Row("param_dtype-float64", "sample", lambda a, o: {"param": torch.zeros(N).double()},
        "param_dtype", "param must be float32, bfloat16 or float16, got Double",
        reference=("dtype", "mean must be Double, got Float")),
    Row("param_dtype-float64-accumulate", "accumulate", lambda a, o: _float64(a),
        "param_dtype", "param must be float32, bfloat16 or float16, got Double",
        reference=None),
    Row("dtype-grad", "update", lambda a, o: {"grad": a["grad"].half()}, "dtype",
        "grad must be Float, got Half"),
    Row("dtype-mean-with-bf16-moments", "update",
        lambda a, o: {k: a[k].bfloat16() for k in ("mean", "momentum", "hess")}, "dtype",
        "mean must be Float, got BFloat16"),
    Row("dtype-avg-grad", "accumulate", lambda a, o: {"avg_grad": a["avg_grad"].double()},
        "dtype", "avg_grad must be Float, got Double"),
    Row("dtype-avg-grad-update", "update", lambda a, o: {"avg_grad": a["avg_grad"].bfloat16()},
        "dtype", "avg_grad must be Float, got BFloat16"),
    # ---- momentum and hess (check_state) ----
    Row("moment_dtype-sample-hess", "sample", lambda a, o: {"hess": a["hess"].half()},
        "moment_dtype", "hess must be float32 or bfloat16 (the state dtype), got Half"),
    Row("moment_dtype-accumulate-hess", "accumulate", lambda a, o: {"hess": a["hess"].half()},
        "moment_dtype", "hess must be float32 or bfloat16 (the state dtype), got Half"),
    Row("moment_dtype-momentum", "update", lambda a, o: {"momentum": a["momentum"].double()},
        "moment_dtype", "momentum must be float32 or bfloat16 (the state dtype), got Double"),
    Row("moment_dtype-both-fp16", "update",
        lambda a, o: {"momentum": a["momentum"].half(), "hess": a["hess"].half()},
        "moment_dtype", "momentum must be float32 or bfloat16 (the state dtype), got Half"),
    Row("moment_pair-momentum-bf16", "update",
        lambda a, o: {"momentum": a["momentum"].bfloat16()}, "moment_pair",
        "momentum and hess must have the same dtype, got BFloat16 and Float"),
    Row("moment_pair-hess-bf16", "update", lambda a, o: {"hess": a["hess"].bfloat16()},
        "moment_pair", "momentum and hess must have the same dtype, got Float and BFloat16"),
    # ---- offset, count, hess_approx, update's averages ----
    Row("offset-negative", "sample", lambda a, o: {"offset": -1}, "offset",
        "offset must be >= 0, got -1"),
    Row("offset_overflow", "update", lambda a, o: {"offset": (1 << 63) - 8}, "offset_overflow",
        "offset + numel overflows int64"),
    Row("count-accumulate", "accumulate", lambda a, o: {"count": 0}, "count",
        "count must be >= 1, got 0"),
    Row("count-update", "update", lambda a, o: {"count": 0}, "count",
        "count must be >= 1, got 0"),
    Row("hess_approx-accumulate", "accumulate", lambda a, o: {"hess_approx": "diag"},
        "hess_approx", "hess_approx must be 'price' or 'gradsq', got 'diag'"),
    # the reference used to take it as 'gradsq' when it computed no hess term (grad=None)
    Row("hess_approx-update-averages-only", "update",
        lambda a, o: {"grad": None, "hess_approx": "diag"}, "hess_approx",
        "hess_approx must be 'price' or 'gradsq', got 'diag'"),
    Row("required-avg-grad", "update", lambda a, o: {"avg_grad": None}, "required",
        "avg_grad is required (count > 1 folds grad into the averages)"),
    Row("required-avg-hess-term", "update", lambda a, o: {"grad": None, "avg_hess_term": None},
        "required", "avg_hess_term is required (grad=None: the averages hold all samples)"),
    # ---- update's device scalars (device_scalar) ----
    *_scalar_rows(),
    Row("optional_tensor-device-debias", "update", lambda a, o: {"device_debias": 0.5},
        "optional_tensor", "device_debias must be a tensor or None, got float"),
    # ---- device_draws (device_draws_of) ----
    Row("draws_numel", "update", lambda a, o: {"device_draws": torch.tensor([1])},
        "draws_numel", "device_draws must be a tensor of 2 element(s), got 1 elements"),
    Row("draws_numel-three", "update", lambda a, o: {"device_draws": torch.zeros(3).long()},
        "draws_numel", "device_draws must be a tensor of 2 element(s), got 3 elements"),
    Row("draws_dtype", "sample",
        lambda a, o: {"device_draws": torch.tensor([1], dtype=torch.int32)}, "draws_dtype",
        "device_draws must be int64, got Int"),
    Row("draws_dtype-float32", "update", lambda a, o: {"device_draws": torch.zeros(2)},
        "draws_dtype", "device_draws must be int64, got Float"),
    Row("contiguous-draws", "update", lambda a, o: {"device_draws": torch.arange(4)[::2]},
        "contiguous", "device_draws must be contiguous"),
    Row("on_params_device-draws", "accumulate",
        lambda a, o: {"device_draws": torch.tensor([1], device=o)}, "on_params_device",
        "device_draws must be on the params' device {device}, got {other}"),
    Row("optional_tensor-draws", "sample", lambda a, o: {"device_draws": [1]},
        "optional_tensor", "device_draws must be a tensor or None, got list"),
    # ---- the prior inputs (prior_input) ----
    Row("length-prior-mean", "update", lambda a, o: {"prior_mean": torch.zeros(7)}, "length",
        "prior_mean has 7 elements but param has 8"),
    Row("length-prior-precision-gradsq", "accumulate",
        lambda a, o: {"prior_precision": torch.zeros(9), "hess_approx": "gradsq"}, "length",
        "prior_precision has 9 elements but grad has 8"),
    Row("dtype-prior-precision", "update",
        lambda a, o: {"prior_precision": torch.zeros(N, dtype=torch.float64)}, "dtype",
        "prior_precision must be Float, got Double"),
    Row("dtype-prior-precision-accumulate", "accumulate",
        lambda a, o: {"prior_precision": torch.zeros(N, dtype=torch.half)}, "dtype",
        "prior_precision must be Float, got Half"),
    Row("contiguous-prior-precision", "sample",
        lambda a, o: {"prior_precision": torch.zeros(2 * N)[::2]}, "contiguous",
        "prior_precision must be contiguous"),
    Row("device-prior-mean", "update", lambda a, o: {"prior_mean": torch.zeros(N, device=o)},
        "device", "prior_mean is on {other} but param is on {device}"),
    Row("optional_tensor-prior-precision", "update", lambda a, o: {"prior_precision": 0.5},
        "optional_tensor", "prior_precision must be a tensor or None, got float"),
    # ---- the Python values ----
    Row("tensor-mean", "sample", lambda a, o: {"mean": None}, "tensor",
        "mean must be a tensor, got NoneType"),
    Row("tensor-avg-grad", "accumulate", lambda a, o: {"avg_grad": None}, "tensor",
        "avg_grad must be a tensor, got NoneType"),
    Row("integer-count", "accumulate", lambda a, o: {"count": 2.5}, "integer",
        "count must be an integer, got 2.5"),
    Row("integer-offset", "sample", lambda a, o: {"offset": 1.5}, "integer",
        "offset must be an integer, got 1.5"),
    Row("integer-seed", "update", lambda a, o: {"seed": "1"}, "integer",
        "seed must be an integer, got '1'"),
    Row("uint64-seed", "sample", lambda a, o: {"seed": 1 << 64}, "uint64",
        "seed must be in [0, 2**64), got 18446744073709551616"),
    Row("uint64-draw", "accumulate", lambda a, o: {"draw": -1}, "uint64",
        "draw must be in [0, 2**64), got -1"),
    Row("uint64-next-draw", "update", lambda a, o: {"next_draw": 1 << 64}, "uint64",
        "next_draw must be in [0, 2**64), got 18446744073709551616"),
    # checked with device_draws too, which replace its value
    Row("uint64-round-draw", "update",
        lambda a, o: {"round_draw": -1, "device_draws": torch.tensor([4, 5])}, "uint64",
        "round_draw must be in [0, 2**64), got -1"),
    # ---- the noise: reference-only ----
    Row("eps_reference_only-eps", "sample", lambda a, o: {"eps": torch.randn(N)},
        "eps_reference_only",
        "eps / next_eps are reference-only: the kernel backends generate their own Philox "
        "noise", reference=None),
    Row("eps_reference_only-next-eps", "update", lambda a, o: {"next_eps": torch.randn(N)},
        "eps_reference_only",
        "eps / next_eps are reference-only: the kernel backends generate their own Philox "
        "noise", reference=None),
    Row("length-eps", "accumulate", lambda a, o: {"eps": torch.randn(7)}, "eps_reference_only",
        "eps / next_eps are reference-only: the kernel backends generate their own Philox "
        "noise", reference=("length", "eps has 7 elements but grad has 8")),
    Row("device-next-eps", "update", lambda a, o: {"next_eps": torch.randn(N, device=o)},
        "eps_reference_only",
        "eps / next_eps are reference-only: the kernel backends generate their own Philox "
        "noise", reference=("device", "next_eps is on {other} but param is on {device}")),
    # ---- float64 state: the reference's own rules ----
    Row("float64_state-moments", "update",
        lambda a, o: {**_float64(a), "momentum": a["momentum"].bfloat16(),
                      "hess": a["hess"].bfloat16()},
        "param_dtype", "param must be float32, bfloat16 or float16, got Double",
        reference=("float64_state",
                   "momentum must be float64 (the state dtype of float64 params), got BFloat16")),
    Row("float64_state-device-lr", "update",
        lambda a, o: {**_float64(a), "device_lr": torch.ones(1)},
        "param_dtype", "param must be float32, bfloat16 or float16, got Double",
        reference=("float64_state",
                   "device_lr must be float64 (the state dtype of float64 params), got Float")),
]


# ---- running a call through each backend ------------------------------------------------------

def _backends(device):
    """The backends available for tensors on ``device``."""
    names = ["reference"]
    if tb.unavailable_reason(device) is None:
        names.append("triton")
    if cpp.unavailable_reason(device) is None:
        names += ["compiled", "fake"]
    return names


def _call(backend, op, args):
    """``op`` of ``backend`` on ``args``; None, or the exception it raised."""
    module = {"reference": reference, "triton": tb, "compiled": cpp, "fake": cpp}[backend]
    args = dict(args)
    if backend == "fake":
        mode = FakeTensorMode()
        args = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v
                for k, v in args.items()}
    positional = [args.pop(name) for name in POSITIONAL[op]]
    try:
        if backend == "fake":
            with mode:
                getattr(module, op)(*positional, **args)
        elif backend == "compiled":  # straight to the device's kernel, whatever else is given
            packet = getattr(torch.ops.ivon_fast, op)
            keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA if positional[0].is_cuda
                                           else torch._C.DispatchKey.CPU)
            with mock.patch.object(torch.ops.ivon_fast, op,
                                   lambda *a, **k: packet.default.redispatch(keys, *a, **k)):
                getattr(module, op)(*positional, **args)
        else:
            getattr(module, op)(*positional, **args)
    except Exception as error:  # noqa: BLE001 (what each backend raises is the point)
        return error
    return None


def _expected(backend, row):
    """None (accepted), or (exception type, text) of ``row`` in ``backend``."""
    outcome = (row.rule, row.message) if backend != "reference" or row.reference == SAME \
        else row.reference
    if outcome is None:
        return None
    rule, text = outcome
    if backend in ("compiled", "fake") and rule not in _contract.PYTHON_ONLY:
        return RuntimeError, _contract.CPP_PREFIX + text
    return _contract.RULES[rule].error, text


def _run_row(row, device, foreign):
    """``row`` through every backend, with params on ``device``."""
    lead = "grad" if row.op == "accumulate" else "param"
    for backend in _backends(device):
        args = good(row.op, device)
        with torch.device(device):  # the row's new tensors, unless it puts them on ``foreign``
            args.update(row.change(args, foreign))
        error = _call(backend, row.op, args)
        got = None if error is None else (type(error), str(error).split("\n")[0])
        expected = _expected(backend, row)
        if expected is not None:
            expected = (expected[0], expected[1].format(device=args[lead].device, other=foreign))
        assert got == expected, f"{backend}: {row.id}: got {got}, expected {expected}"


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_every_backend_refuses_alike(row):
    _run_row(row, "cpu", "meta")


@pytest.mark.gpu
def test_every_backend_refuses_alike_on_cuda():
    """The table with CUDA params, and CPU tensors where the rows put a foreign one."""
    for row in ROWS:
        _run_row(row, "cuda", "cpu")


def test_the_table_runs_through_every_backend():
    """Every backend of this machine takes part (the compiled ones where the extension is built:
    required with IVON_FAST_EXPECT_EXT=1, as in tests/test_cpp.py)."""
    names = _backends("cpu")
    if os.environ.get("IVON_FAST_EXPECT_EXT") == "1":
        assert "compiled" in names and "fake" in names, cpp.unavailable_reason("cpu")
    missing = {"triton", "compiled", "fake"} - set(names)
    if missing:
        pytest.skip(f"not available here: {sorted(missing)}")


def test_every_rule_has_a_row():
    assert {row.rule for row in ROWS} | {row.reference[0] for row in ROWS
                                          if row.reference not in (SAME, None)} \
        == set(_contract.RULES)


# ---- good arguments, at the edges of the rules ------------------------------------------------

def _accepted(op, device, change=lambda a: {}, dtype=torch.float32):
    for backend in _backends(device):
        args = good(op, device, dtype)
        args.update(change(args))
        error = _call(backend, op, args)
        assert error is None, f"{backend}: {op}: {error!r}"


def _all_inputs(a, draws):
    dev = a["hess"].device
    inputs = {"device_draws": torch.tensor(draws, device=dev),
              "prior_precision": torch.rand(N, device=dev)}
    if "momentum" in a:
        inputs.update(prior_mean=torch.randn(N, device=dev), grad_scale=torch.ones(1, device=dev),
                      found_inf=torch.zeros(1, device=dev), device_lr=torch.ones(1, device=dev),
                      device_debias=torch.ones(1, device=dev))
    return inputs


GOOD = {
    "sample-every-input": ("sample", lambda a: _all_inputs(a, [7])),
    "accumulate-every-input": ("accumulate", lambda a: _all_inputs(a, [7])),
    "update-every-input": ("update", lambda a: _all_inputs(a, [7, 8])),
    # a 0-d tensor is one element too
    "update-0d-device-scalars": ("update", lambda a: {
        "found_inf": torch.zeros((), device=a["hess"].device),
        "device_lr": torch.tensor(0.1, device=a["hess"].device)}),
    # grad given and count 1: the averages are neither read nor checked
    "update-first-sample-without-averages": ("update", lambda a: {
        "count": 1, "avg_grad": None, "avg_hess_term": None}),
    "update-first-sample-ignores-the-averages": ("update", lambda a: {
        "count": 1, "avg_grad": torch.zeros(3, dtype=torch.float64)[::2],
        "avg_hess_term": torch.zeros(1, device="meta")}),
    "update-bf16-state": ("update", lambda a: {
        "momentum": a["momentum"].bfloat16(), "hess": a["hess"].bfloat16()}),
    "update-averages-only": ("update", lambda a: {"grad": None, "hess_approx": "gradsq",
                                                  "avg_hess_term": a["avg_hess_term"].abs()}),
    # the largest offset, seed and draws
    "sample-at-the-int64-limit": ("sample", lambda a: {
        "offset": (1 << 63) - 1 - N, "seed": (1 << 64) - 1, "draw": (1 << 64) - 1}),
}


@pytest.mark.parametrize("case", GOOD)
def test_good_arguments_are_accepted(case):
    op, change = GOOD[case]
    _accepted(op, "cpu", change)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_are_accepted(dtype):
    for op in ("sample", "accumulate", "update"):
        _accepted(op, "cpu", dtype=dtype)


def test_the_reference_takes_float64_state_and_explicit_noise():
    args = _float64(good("update", "cpu"))
    args.update(device_lr=torch.ones(1, dtype=torch.float64), grad_scale=torch.ones(1),
                prior_mean=torch.zeros(N, dtype=torch.float64), eps=torch.randn(3 * N)[::3],
                next_eps=torch.randn(N, dtype=torch.float64))
    assert _call("reference", "update", args) is None


@pytest.mark.gpu
def test_good_arguments_are_accepted_on_cuda():
    for op, change in GOOD.values():
        _accepted(op, "cuda", change)


# ---- the C++ ops state the same rules ----------------------------------------------------------

def _cpp_messages():
    """Every TORCH_CHECK message of csrc/ops.cpp, its prefix dropped and each argument that is
    no string literal written as {}."""
    source = open(OPS_CPP).read()
    messages = []
    for match in re.finditer(r"\bTORCH_CHECK\(", source):
        arguments, depth, start, i = [], 0, match.end(), match.end()
        while True:  # split the call's arguments at top-level commas, skipping string literals
            char = source[i]
            if char == '"':
                i = source.index('"', i + 1)
                while source[i - 1] == "\\":
                    i = source.index('"', i + 1)
            elif char in "([{":
                depth += 1
            elif char in ")]}" and depth > 0:
                depth -= 1
            elif char in ",)" and depth == 0:
                arguments.append(source[start:i].strip())
                start = i + 1
                if char == ")":
                    break
            i += 1
        text = ""
        for argument in arguments[1:]:
            literals = re.fullmatch(r'(?:\s*"(?:[^"\\]|\\.)*"\s*)+', argument)
            text += ("".join(re.findall(r'"((?:[^"\\]|\\.)*)"', argument)) if literals
                     else "{}")
        assert text.startswith(_contract.CPP_PREFIX), text
        messages.append(text[len(_contract.CPP_PREFIX):])
    return messages


def _matches(rule, cpp_message):
    """The rule's text is the C++ message, a field standing for a {} or for a name."""
    parts = [re.escape(part) for part in _contract.template_of(rule).split("{}")]
    return re.fullmatch(r"(?:\{\}|[a-z_]+)".join(parts), cpp_message) is not None


def test_the_cpp_ops_state_the_shared_rules():
    messages = _cpp_messages()
    assert len(messages) > 20
    for rule in _contract.SHARED:
        assert any(_matches(rule, m) for m in messages), f"rule {rule!r} is not in ops.cpp"
    for rule in (*_contract.PYTHON_ONLY, *_contract.REFERENCE_ONLY):
        assert not any(_matches(rule, m) for m in messages), f"{rule!r} is in ops.cpp"
    for cpp_message in messages:
        shared = [rule for rule in _contract.SHARED if _matches(rule, cpp_message)]
        assert shared or cpp_message in _contract.CPP_ONLY, \
            f"ops.cpp checks {cpp_message!r}, which is no rule of ivon_fast/_contract.py"
    assert set(_contract.CPP_ONLY) <= set(messages)
    source = open(OPS_CPP).read()
    for why in _contract.WHY_REQUIRED.values():
        assert f'"{why}"' in source
