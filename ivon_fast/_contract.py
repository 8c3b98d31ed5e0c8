"""The op contract's argument rules (docs/DESIGN.md section 5), decided once for every backend.

Every backend checks the arguments of ``sample``, ``accumulate`` and ``update`` against the rules
below before it touches memory: the reference (``ivon_fast.reference``, the spec) and the Triton
backend run all of them, the compiled backend's Python wrapper (``ivon_fast.cpp_backend``) runs
the ones the ops' schema cannot state, and the fake kernels (``ivon_fast._fake_ops``) run the
ones the C++ ops state, which csrc/ops.cpp's TORCH_CHECKs state too, with the same text
(tests/test_contract.py holds the two to each other and runs one table of bad arguments through
every backend).

A rule is data: its exception type and its message (``RULES``). The checks are small functions
that hand each rule's condition, name and message fields to a ``check`` callback, in the order
csrc/ops.cpp checks them, so that the first broken rule is the same one everywhere. Each is
written ``ok = <condition>`` then ``ok is True or check(ok, rule, **fields)``: the callback (and
the forming of its fields) runs only for a condition that is not plainly true, a broken rule or
a symbolic condition in a traced graph, which keeps the checks of a call at a few microseconds.
The callbacks:

- ``raise_check`` (the Python backends) raises the rule's TypeError (a wrong type or dtype) or
  ValueError (a wrong value, size or device) with the bare message;
- ``torch_check`` (the fake kernels, which may see symbolic sizes under torch.compile) passes
  the condition to ``torch._check`` and raises what the C++ op raises: a RuntimeError with the
  message after the ops' "ivon_fast: " prefix.

Two stages: ``*_arguments`` (the Python values: tensors where tensors go, integer seeds, draws,
offsets and counts, the reference-only noise) and ``*_tensors`` (what the C++ op checks: the
segment, the state dtypes, the optional device inputs, count, hess_approx). ``sample``,
``accumulate`` and ``update`` run both.

Deliberate differences between the backends, each decided here:

- The reference also runs float64 params with float64 state (mean, averages, momentum, hess,
  priors, device_lr and device_debias in float64): ``REFERENCE_ONLY``'s rules replace the kernel
  dtype rules for it. Its state dtype is ``state_dtype(param dtype)`` as for the kernels.
- The reference takes the noise explicitly (``eps``, ``next_eps``: None, or tensors of the
  segment's length on the params' device, of any dtype, contiguous or not: it converts them);
  the kernel backends refuse them (``eps_reference_only``).
- The device a backend runs on is not an argument rule: the C++ ops refuse tensors outside cpu
  and cuda (``CPP_ONLY``), the Triton backend runs where ``unavailable_reason`` says, the
  reference on any device, the fake kernels on meta and fake tensors.
- The C++ ops name the segment's lead tensor "param" in its contiguity and dtype messages, also
  in ``accumulate``, whose lead tensor is its grad (``check_common`` / ``param_type`` in
  csrc/ops.cpp); the rules here say the same, so that every backend gives one text.

What the backends disagreed on before this module (each copy had its own checks), and what was
kept (normally the C++ rule: it guards raw pointers):

- contiguity: the reference took non-contiguous segments, device_draws and priors; the fake
  kernels non-contiguous device_draws. Now every tensor the kernels read must be contiguous
  (device scalars excepted: one element).
- segment length and device: the reference broadcast mismatched tensors (or failed in torch);
  Triton gave one combined message. Now ``length`` and ``device`` with the C++ text.
- grads: the reference took any grad dtype. Now the param's dtype.
- update's averages: Triton checked them when given even where unused (grad given, count 1),
  and handed them to the kernel; the C++ op reads and checks them only where used. Kept the C++
  rule (Triton now hands the kernel another tensor there). The reference failed on a missing one
  only when it got to it, Triton had its own text: now ``required``.
- the fake kernels checked only the device scalars, device_draws and priors; now everything the
  C++ op checks but the device it runs on.
- types: the reference and Triton said "must be a tensor or None" for the optional device inputs
  only; the compiled wrapper left every wrong type to the schema's error. Now ``tensor`` and
  ``optional_tensor`` for every tensor argument, in every backend.
- device scalars: the reference checked nothing (and moved found_inf to the params' device).
  device_draws: the reference had one combined message and no contiguity rule.
- priors: the reference, Triton and the fake kernels checked in other orders with other texts
  (dtype as torch.float32 or float32); now the C++ order and text (``length``, ``device``...).
- offset: only the C++ ops checked it (>= 0, no int64 overflow); Triton took any offset (and
  the compiled wrapper truncated 1.5 to 1, as it did a count of 2.5). count: the reference checked
  nothing, Triton "a positive integer", C++ ">= 1" (its schema: an int). hess_approx: the
  reference checked it only where it computed a hess term (not for update's grad=None).
- seeds and draws: Triton required [0, 2**64) (but not for round_draw with device_draws), the
  compiled wrapper also took negative int64 bit patterns, the reference nothing. Now [0, 2**64)
  everywhere, for seed, draw, next_draw and round_draw.
- messages: dtypes are written as the C++ ops write them (Float, BFloat16, Double), never
  "torch.float32"; exception types TypeError / ValueError in Python as above.
"""
from __future__ import annotations

import string
from dataclasses import dataclass

import torch

__all__ = ["RULES", "SHARED", "PYTHON_ONLY", "REFERENCE_ONLY", "CPP_ONLY", "CPP_PREFIX",
           "WHY_REQUIRED", "raise_check", "torch_check", "message", "template_of", "dtype_name",
           "uint64", "int64_bits",
           "sample", "accumulate", "update", "sample_arguments", "accumulate_arguments",
           "update_arguments", "sample_tensors", "accumulate_tensors", "update_tensors"]


@dataclass(frozen=True)
class Rule:
    error: type    # what the Python backends raise: TypeError or ValueError
    message: str   # a str.format template; dtypes are shown by ``dtype_name``


# The rules the C++ ops state too: the text of csrc/ops.cpp's TORCH_CHECK after its prefix.
SHARED = {
    # every segment tensor against the lead tensor (check_tensor)
    "device": Rule(ValueError, "{name} is on {device} but {like} is on {like_device}"),
    "length": Rule(ValueError, "{name} has {numel} elements but {like} has {like_numel}"),
    "contiguous": Rule(ValueError, "{name} must be contiguous"),
    "dtype": Rule(TypeError, "{name} must be {dtype}, got {got}"),
    # the segment (check_common, param_type)
    "param_dtype": Rule(TypeError, "param must be float32, bfloat16 or float16, got {got}"),
    "offset": Rule(ValueError, "offset must be >= 0, got {offset}"),
    "offset_overflow": Rule(ValueError, "offset + numel overflows int64"),
    # momentum and hess (check_state)
    "moment_dtype": Rule(TypeError, "{name} must be float32 or bfloat16 (the state dtype), "
                                    "got {got}"),
    "moment_pair": Rule(TypeError, "momentum and hess must have the same dtype, got {momentum} "
                                   "and {hess}"),
    # the op's numbers (accumulate, update, parse_hess_approx)
    "count": Rule(ValueError, "count must be >= 1, got {count}"),
    "hess_approx": Rule(ValueError, "hess_approx must be 'price' or 'gradsq', got "
                                    "'{hess_approx}'"),
    # update's averages: needed unless grad is given and count == 1
    "required": Rule(ValueError, "{name} is required{why}"),
    # update's device scalars (device_scalar); device_draws (device_draws_of)
    "scalar_numel": Rule(ValueError, "{name} must be a tensor of 1 element, got {numel} elements"),
    "scalar_dtype": Rule(TypeError, "{name} must be float32, got {got}"),
    "on_params_device": Rule(ValueError, "{name} must be on the params' device {device}, got "
                                         "{got}"),
    "draws_numel": Rule(ValueError, "device_draws must be a tensor of {count} element(s), got "
                                    "{numel} elements"),
    "draws_dtype": Rule(TypeError, "device_draws must be int64, got {got}"),
}

# The rules of the Python values, which the ops' schema states in its own way (its types: Tensor,
# Tensor?, int). The compiled backend's wrapper checks them before it calls an op.
PYTHON_ONLY = {
    "tensor": Rule(TypeError, "{name} must be a tensor, got {got}"),
    "optional_tensor": Rule(TypeError, "{name} must be a tensor or None, got {got}"),
    "integer": Rule(TypeError, "{name} must be an integer, got {value!r}"),
    # seeds and draws are uint64 (evaluation draws have bit 63 set); the schema's int64 carries
    # their bits (Note [uint64 seeds and draws] in csrc/ops.cpp)
    "uint64": Rule(ValueError, "{name} must be in [0, 2**64), got {value}"),
    "eps_reference_only": Rule(ValueError, "eps / next_eps are reference-only: the kernel "
                                           "backends generate their own Philox noise"),
}

# What the reference runs beyond the kernels: float64 params with float64 state.
REFERENCE_ONLY = {
    "reference_param_dtype": Rule(TypeError, "param must be float32, bfloat16, float16 or "
                                             "float64, got {got}"),
    "float64_state": Rule(TypeError, "{name} must be float64 (the state dtype of float64 "
                                     "params), got {got}"),
}

RULES = {**SHARED, **PYTHON_ONLY, **REFERENCE_ONLY}

# csrc/ops.cpp's TORCH_CHECK texts that are no rule of the contract (as tests/test_contract.py
# writes them: its prefix dropped, each argument that is no string literal as {}), and why.
CPP_ONLY = {
    # the devices the compiled ops run on: backend availability (backends.unavailable_reason),
    # not an argument rule; the reference runs anywhere, the fake kernels on meta tensors
    "tensors must be on cpu or cuda, got {}": "the compiled ops' devices",
    # an undefined at::Tensor cannot come from Python: None for a Tensor argument fails the
    # schema, and the wrapper's "tensor" rule before it
    "{} is undefined": "no undefined tensors from Python",
    # failures of a launch or of the build, not of the arguments
    "CUDA kernel launch failed: {}": "a launch failure",
    "the extension was built without CUDA": "a build without CUDA",
}

CPP_PREFIX = "ivon_fast: "  # what every TORCH_CHECK message of csrc/ops.cpp starts with

# update's averages are required (rule "required") for one of two reasons (csrc/ops.cpp)
WHY_REQUIRED = {True: " (count > 1 folds grad into the averages)",
                False: " (grad=None: the averages hold all samples)"}

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REFERENCE_PARAM_DTYPES = (*PARAM_DTYPES, torch.float64)
# momentum and hess: IVON's state_dtype (docs/DESIGN.md section 16)
MOMENT_DTYPES = (torch.float32, torch.bfloat16)
HESS_APPROXES = ("price", "gradsq")
INT64_MAX = (1 << 63) - 1

# dtypes as c10 writes them in the C++ messages (ScalarType names)
_DTYPE_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
    torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int", torch.int16: "Short",
    torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool", torch.complex32: "ComplexHalf",
    torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
    torch.uint16: "UInt16", torch.uint32: "UInt32", torch.uint64: "UInt64",
    torch.float8_e4m3fn: "Float8_e4m3fn", torch.float8_e5m2: "Float8_e5m2",
}


def dtype_name(dtype: torch.dtype) -> str:
    """``dtype`` as the C++ ops write it: Float, BFloat16, Double, ..."""
    return _DTYPE_NAMES.get(dtype) or str(dtype).removeprefix("torch.").capitalize()


def message(rule: str, **fields) -> str:
    """Rule ``rule``'s message with ``fields`` (dtypes written as the C++ ops write them)."""
    shown = {key: dtype_name(value) if isinstance(value, torch.dtype) else value
             for key, value in fields.items()}
    return RULES[rule].message.format(**shown)


def raise_check(ok, rule: str, **fields) -> None:
    """The Python backends' check: raise the rule's TypeError / ValueError unless ``ok``."""
    if not ok:
        raise RULES[rule].error(message(rule, **fields))


def torch_check(ok, rule: str, **fields) -> None:
    """The fake kernels' check: ``torch._check`` (``ok`` may be a symbolic bool in a traced
    graph), raising what the C++ op raises, a RuntimeError with its prefix."""
    torch._check(ok, lambda: CPP_PREFIX + message(rule, **fields))


def template_of(rule: str) -> str:
    """The rule's message with every field as {} (how tests/test_contract.py compares it with
    csrc/ops.cpp's texts)."""
    return "".join(text + ("{}" if field is not None else "")
                   for text, field, _, _ in string.Formatter().parse(RULES[rule].message))


# ---- the Python values (the ``*_arguments`` stage) ---------------------------------------------

def _integral(value):
    """``value`` as an int when it is an integer (or a number equal to one), else None."""
    try:
        as_int = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return as_int if as_int == value else None


def _integer(check, value, name: str) -> None:
    ok = type(value) is int or _integral(value) is not None
    ok is True or check(ok, "integer", name=name, value=value)


def uint64(check, value, name: str) -> int:
    """A seed or draw number: an integer in [0, 2**64); returns it as an int."""
    if type(value) is not int:
        _integer(check, value, name)
        value = int(value)
    ok = 0 <= value < 1 << 64
    ok is True or check(ok, "uint64", name=name, value=value)
    return value


def int64_bits(value: int) -> int:
    """A uint64 as the int64 with the same 64 bits (the ops' and the Triton kernels' int64)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _tensors(check, required: tuple, optional: tuple) -> None:
    for name, value in required:
        ok = isinstance(value, torch.Tensor)
        ok is True or check(ok, "tensor", name=name, got=type(value).__name__)
    for name, value in optional:
        ok = value is None or isinstance(value, torch.Tensor)
        ok is True or check(ok, "optional_tensor", name=name, got=type(value).__name__)


def _numbers(check, offset, draws: tuple, count=None) -> None:
    _integer(check, offset, "offset")
    if count is not None:
        _integer(check, count, "count")
    for name, value in draws:
        if value is not None:
            uint64(check, value, name)


def _noise(check, eps: tuple, reference: bool) -> None:
    for _, value in eps:
        ok = reference or value is None
        ok is True or check(ok, "eps_reference_only")


def sample_arguments(check, param, mean, hess, *, seed, draw, offset, device_draws=None,
                     prior_precision=None, eps=None, reference=False) -> None:
    _tensors(check, (("param", param), ("mean", mean), ("hess", hess)),
             (("device_draws", device_draws), ("prior_precision", prior_precision),
              ("eps", eps)))
    _numbers(check, offset, (("seed", seed), ("draw", draw)))
    _noise(check, (("eps", eps),), reference)


def accumulate_arguments(check, grad, hess, avg_grad, avg_hess_term, *, seed, draw, offset,
                         count, device_draws=None, prior_precision=None, eps=None,
                         reference=False) -> None:
    _tensors(check, (("grad", grad), ("hess", hess), ("avg_grad", avg_grad),
                     ("avg_hess_term", avg_hess_term)),
             (("device_draws", device_draws), ("prior_precision", prior_precision),
              ("eps", eps)))
    _numbers(check, offset, (("seed", seed), ("draw", draw)), count)
    _noise(check, (("eps", eps),), reference)


def update_arguments(check, param, grad, mean, momentum, hess, avg_grad, avg_hess_term, *, seed,
                     draw, next_draw, offset, count, round_draw=0, grad_scale=None,
                     found_inf=None, device_lr=None, device_debias=None, device_draws=None,
                     prior_mean=None, prior_precision=None, eps=None, next_eps=None,
                     reference=False) -> None:
    _tensors(check, (("param", param), ("mean", mean), ("momentum", momentum), ("hess", hess)),
             (("grad", grad), ("avg_grad", avg_grad), ("avg_hess_term", avg_hess_term),
              ("grad_scale", grad_scale), ("found_inf", found_inf), ("device_lr", device_lr),
              ("device_debias", device_debias), ("device_draws", device_draws),
              ("prior_mean", prior_mean), ("prior_precision", prior_precision), ("eps", eps),
              ("next_eps", next_eps)))
    _numbers(check, offset, (("seed", seed), ("draw", draw), ("next_draw", next_draw),
                             ("round_draw", round_draw)), count)
    _noise(check, (("eps", eps), ("next_eps", next_eps)), reference)


# ---- the tensors (the ``*_tensors`` stage: what the C++ ops check) -----------------------------

def _placed(check, tensor, name: str, like, like_name: str) -> None:
    """On ``like``'s device and as long."""
    ok = tensor.device == like.device
    ok is True or check(ok, "device", name=name, device=tensor.device, like=like_name,
                        like_device=like.device)
    ok = tensor.numel() == like.numel()
    ok is True or check(ok, "length", name=name, numel=tensor.numel(), like=like_name,
                        like_numel=like.numel())


def _segment(check, tensor, name: str, like, like_name: str, dtype=None) -> None:
    """A tensor of the segment (check_tensor): on ``like``'s device, as long, contiguous, and of
    ``dtype`` (None: checked by the caller)."""
    _placed(check, tensor, name, like, like_name)
    ok = tensor.is_contiguous()
    ok is True or check(ok, "contiguous", name=name)
    if dtype is not None:
        ok = tensor.dtype == dtype
        ok is True or check(ok, "dtype", name=name, dtype=dtype, got=tensor.dtype)


def _lead(check, lead, offset, reference: bool) -> torch.dtype:
    """The segment's lead tensor (param; accumulate's grad) and its offset (check_common,
    param_type); returns the state dtype."""
    ok = lead.is_contiguous()
    ok is True or check(ok, "contiguous", name="param")
    ok = offset >= 0
    ok is True or check(ok, "offset", offset=offset)
    ok = offset <= INT64_MAX - lead.numel()
    ok is True or check(ok, "offset_overflow")
    if reference:
        ok = lead.dtype in REFERENCE_PARAM_DTYPES
        ok is True or check(ok, "reference_param_dtype", got=lead.dtype)
        if lead.dtype == torch.float64:
            return torch.float64
    else:
        ok = lead.dtype in PARAM_DTYPES
        ok is True or check(ok, "param_dtype", got=lead.dtype)
    return torch.float32


def _moment(check, tensor, name: str, like, like_name: str, state: torch.dtype,
            momentum=None) -> None:
    """momentum or hess (check_state): float32 or bfloat16 (float64 with float64 state), the
    hess of an update in the momentum's dtype."""
    if state == torch.float64:
        ok = tensor.dtype == torch.float64
        ok is True or check(ok, "float64_state", name=name, got=tensor.dtype)
    else:
        ok = tensor.dtype in MOMENT_DTYPES
        ok is True or check(ok, "moment_dtype", name=name, got=tensor.dtype)
    if momentum is not None:
        ok = tensor.dtype == momentum.dtype
        ok is True or check(ok, "moment_pair", momentum=momentum.dtype, hess=tensor.dtype)
    _segment(check, tensor, name, like, like_name)


def _device_draws(check, tensor, count: int, like) -> None:
    """An op's optional device draws (device_draws_of): ``count`` int64 elements, contiguous, on
    the params' device."""
    if tensor is None:
        return
    ok = tensor.numel() == count
    ok is True or check(ok, "draws_numel", count=count, numel=tensor.numel())
    ok = tensor.dtype == torch.int64
    ok is True or check(ok, "draws_dtype", got=tensor.dtype)
    ok = tensor.is_contiguous()
    ok is True or check(ok, "contiguous", name="device_draws")
    ok = tensor.device == like.device
    ok is True or check(ok, "on_params_device", name="device_draws", device=like.device,
                        got=tensor.device)


def _prior(check, tensor, name: str, like, like_name: str, state: torch.dtype) -> None:
    """An optional prior input (prior_input): a segment tensor in the state dtype."""
    if tensor is not None:
        _segment(check, tensor, name, like, like_name, state)


def _device_scalar(check, tensor, name: str, like, dtype: torch.dtype) -> None:
    """An optional device scalar of update (device_scalar): 1 element of ``dtype`` (float32; the
    state dtype for device_lr / device_debias) on the params' device."""
    if tensor is None:
        return
    ok = tensor.numel() == 1
    ok is True or check(ok, "scalar_numel", name=name, numel=tensor.numel())
    if dtype == torch.float64:
        ok = tensor.dtype == torch.float64
        ok is True or check(ok, "float64_state", name=name, got=tensor.dtype)
    else:
        ok = tensor.dtype == torch.float32
        ok is True or check(ok, "scalar_dtype", name=name, got=tensor.dtype)
    ok = tensor.device == like.device
    ok is True or check(ok, "on_params_device", name=name, device=like.device,
                        got=tensor.device)


def _eps_tensors(check, eps: tuple, like, like_name: str) -> None:
    """The reference's explicit noise: of the segment's length, on its device (any dtype and
    strides: the reference converts it)."""
    for name, tensor in eps:
        if tensor is not None:
            _placed(check, tensor, name, like, like_name)


def sample_tensors(check, param, mean, hess, *, offset, device_draws=None, prior_precision=None,
                   eps=None, reference=False) -> None:
    state = _lead(check, param, offset, reference)
    _device_draws(check, device_draws, 1, param)
    _segment(check, mean, "mean", param, "param", state)
    _moment(check, hess, "hess", param, "param", state)
    _prior(check, prior_precision, "prior_precision", param, "param", state)
    _eps_tensors(check, (("eps", eps),), param, "param")


def accumulate_tensors(check, grad, hess, avg_grad, avg_hess_term, *, offset, count, hess_approx,
                       device_draws=None, prior_precision=None, eps=None,
                       reference=False) -> None:
    state = _lead(check, grad, offset, reference)
    _device_draws(check, device_draws, 1, grad)
    _moment(check, hess, "hess", grad, "grad", state)
    _segment(check, avg_grad, "avg_grad", grad, "grad", state)
    _segment(check, avg_hess_term, "avg_hess_term", grad, "grad", state)
    # checked for 'gradsq' too, whose kernels do not read it
    _prior(check, prior_precision, "prior_precision", grad, "grad", state)
    ok = count >= 1
    ok is True or check(ok, "count", count=count)
    ok = hess_approx in HESS_APPROXES
    ok is True or check(ok, "hess_approx", hess_approx=hess_approx)
    _eps_tensors(check, (("eps", eps),), grad, "grad")


def update_tensors(check, param, grad, mean, momentum, hess, avg_grad, avg_hess_term, *, offset,
                   count, hess_approx, grad_scale=None, found_inf=None, device_lr=None,
                   device_debias=None, device_draws=None, prior_mean=None, prior_precision=None,
                   eps=None, next_eps=None, reference=False) -> None:
    state = _lead(check, param, offset, reference)
    _device_draws(check, device_draws, 2, param)
    _segment(check, mean, "mean", param, "param", state)
    _moment(check, momentum, "momentum", param, "param", state)
    _moment(check, hess, "hess", param, "param", state, momentum=momentum)
    _prior(check, prior_mean, "prior_mean", param, "param", state)
    _prior(check, prior_precision, "prior_precision", param, "param", state)
    ok = count >= 1
    ok is True or check(ok, "count", count=count)
    if grad is not None:
        _segment(check, grad, "grad", param, "param", param.dtype)
    if grad is None or count != 1:  # the averages are read (and only then checked)
        why = WHY_REQUIRED[grad is not None]
        ok = avg_grad is not None
        ok is True or check(ok, "required", name="avg_grad", why=why)
        ok = avg_hess_term is not None
        ok is True or check(ok, "required", name="avg_hess_term", why=why)
        _segment(check, avg_grad, "avg_grad", param, "param", state)
        _segment(check, avg_hess_term, "avg_hess_term", param, "param", state)
    ok = hess_approx in HESS_APPROXES
    ok is True or check(ok, "hess_approx", hess_approx=hess_approx)
    for name, tensor, dtype in (("grad_scale", grad_scale, torch.float32),
                                ("found_inf", found_inf, torch.float32),
                                ("device_lr", device_lr, state),
                                ("device_debias", device_debias, state)):
        _device_scalar(check, tensor, name, param, dtype)
    _eps_tensors(check, (("eps", eps), ("next_eps", next_eps)), param, "param")


# ---- both stages (the reference and the Triton backend) ----------------------------------------

def sample(param, mean, hess, *, seed, draw, offset, device_draws=None, prior_precision=None,
           eps=None, reference=False, check=raise_check) -> None:
    sample_arguments(check, param, mean, hess, seed=seed, draw=draw, offset=offset,
                     device_draws=device_draws, prior_precision=prior_precision, eps=eps,
                     reference=reference)
    sample_tensors(check, param, mean, hess, offset=int(offset), device_draws=device_draws,
                   prior_precision=prior_precision, eps=eps, reference=reference)


def accumulate(grad, hess, avg_grad, avg_hess_term, *, seed, draw, offset, count, hess_approx,
               device_draws=None, prior_precision=None, eps=None, reference=False,
               check=raise_check) -> None:
    accumulate_arguments(check, grad, hess, avg_grad, avg_hess_term, seed=seed, draw=draw,
                         offset=offset, count=count, device_draws=device_draws,
                         prior_precision=prior_precision, eps=eps, reference=reference)
    accumulate_tensors(check, grad, hess, avg_grad, avg_hess_term, offset=int(offset),
                       count=int(count), hess_approx=hess_approx, device_draws=device_draws,
                       prior_precision=prior_precision, eps=eps, reference=reference)


def update(param, grad, mean, momentum, hess, avg_grad, avg_hess_term, *, seed, draw, next_draw,
           offset, count, hess_approx, round_draw=0, grad_scale=None, found_inf=None,
           device_lr=None, device_debias=None, device_draws=None, prior_mean=None,
           prior_precision=None, eps=None, next_eps=None, reference=False,
           check=raise_check) -> None:
    optional = dict(grad_scale=grad_scale, found_inf=found_inf, device_lr=device_lr,
                    device_debias=device_debias, device_draws=device_draws,
                    prior_mean=prior_mean, prior_precision=prior_precision, eps=eps,
                    next_eps=next_eps, reference=reference)
    update_arguments(check, param, grad, mean, momentum, hess, avg_grad, avg_hess_term,
                     seed=seed, draw=draw, next_draw=next_draw, offset=offset, count=count,
                     round_draw=round_draw, **optional)
    update_tensors(check, param, grad, mean, momentum, hess, avg_grad, avg_hess_term,
                   offset=int(offset), count=int(count), hess_approx=hess_approx, **optional)
