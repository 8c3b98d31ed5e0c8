"""The compiled C++/CUDA backend: the op contract of ``ivon_fast.reference`` over torch.ops.ivon_fast.

The kernels live in the extension ``ivon_fast._C`` (sources in csrc/), which registers the ops
``torch.ops.ivon_fast.sample / accumulate / update`` for CPU and, when built with CUDA, for CUDA
tensors. This module imports without the extension; ``unavailable_reason`` then says why.

Differences from the reference (``ivon_fast._contract`` has the rules every backend shares):
the noise is always the counter-based Philox noise (no ``eps`` arguments), and params must be
float32 / bfloat16 / float16 with float32 state (momentum and hess may be bfloat16, both,
docs/DESIGN.md section 16). Seeds and draws are uint64 (evaluation draws have bit 63 set); they
travel through the int64 schema arguments as the same 64 bits (see Note [uint64 seeds and
draws] in csrc/ops.cpp).
"""
from __future__ import annotations

import torch

from ivon_fast import _contract, _extension

__all__ = ["sample", "accumulate", "update", "unavailable_reason", "cpu_isa", "set_cpu_isa"]

# The Python values are checked here (``ivon_fast._contract``'s ``*_arguments``: the rules the
# ops' schema states in its own way), the tensors by the ops (csrc/ops.cpp; the fake kernels)
_check = _contract.raise_check

# load_error() imports ivon_fast._C (registering torch.ops.ivon_fast.*) unless it was built for
# another torch or not at all
if _extension.load_error() is None:
    from ivon_fast import _fake_ops  # noqa: F401  (fake kernels for torch.compile)


# The torch library whose ops the wrappers below call. The tests run a second instance of this
# module over the test build of the CUDA source on the CPU, whose ops have the same schemas
# (tests/cuda_on_cpu_backend.py)
LIBRARY = "ivon_fast"


def _library():
    return getattr(torch.ops, LIBRARY)


def unavailable_reason(device) -> str | None:
    """None when the compiled ops can run on ``device``, else why not."""
    device = torch.device(device)
    error = _extension.load_error()
    if error is not None:
        return f"the ivon_fast._C extension is not available ({error}); {_extension.BUILD_HINT}"
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not torch.ops.ivon_fast._built_with_cuda():
            return ("the ivon_fast._C extension was built without CUDA kernels (torch without CUDA, "
                    "no nvcc found, or IVON_FAST_NO_CUDA=1); rebuild with nvcc found (CUDA_HOME "
                    "set, or nvcc on PATH)")
        return None
    return f"the compiled ivon_fast ops run on cpu and cuda tensors, not {device.type}"


def cpu_isa() -> str:
    """The instruction-set build of the CPU kernels in use: 'avx512', 'avx2' or 'generic'."""
    return torch.ops.ivon_fast._cpu_isa()


def set_cpu_isa(name: str = "") -> None:
    """Force a CPU kernel build ('avx2', 'generic', ...; '' = the best the CPU supports)."""
    if not torch.ops.ivon_fast._set_cpu_isa(name):
        raise ValueError(f"CPU kernel build {name!r} is unknown or not supported by this CPU")


def _i64(value: int) -> int:
    """A checked uint64 (``ivon_fast._contract``'s "uint64" rule) as the int64 with the same
    64 bits."""
    return _contract.int64_bits(int(value))


def sample(param, mean, hess, *, seed=0, draw=0, offset=0, ess, weight_decay, eps=None,
           device_draws=None, prior_precision=None):
    _contract.sample_arguments(_check, param, mean, hess, seed=seed, draw=draw, offset=offset,
                               device_draws=device_draws, prior_precision=prior_precision,
                               eps=eps)
    _library().sample(param, mean, hess, seed=_i64(seed), draw=_i64(draw), offset=int(offset),
                      ess=float(ess), weight_decay=float(weight_decay),
                      device_draws=device_draws, prior_precision=prior_precision)


def accumulate(grad, hess, avg_grad, avg_hess_term, *, seed=0, draw=0, offset=0, count, ess,
               weight_decay, hess_approx, eps=None, device_draws=None, prior_precision=None):
    _contract.accumulate_arguments(_check, grad, hess, avg_grad, avg_hess_term, seed=seed,
                                   draw=draw, offset=offset, count=count,
                                   device_draws=device_draws, prior_precision=prior_precision,
                                   eps=eps)
    _library().accumulate(grad, hess, avg_grad, avg_hess_term, seed=_i64(seed), draw=_i64(draw),
                          offset=int(offset), count=int(count), ess=float(ess),
                          weight_decay=float(weight_decay), hess_approx=hess_approx,
                          device_draws=device_draws, prior_precision=prior_precision)


def update(param, grad, mean, momentum, hess, avg_grad, avg_hess_term, *, seed=0, draw=0,
           next_draw=None, offset=0, count, hess_approx, scalars, eps=None, next_eps=None,
           grad_scale=None, found_inf=None, device_lr=None, device_debias=None,
           device_draws=None, prior_mean=None, prior_precision=None, round_draw=0):
    """Reference ``update``; ``scalars`` (an ``ivon_fast.scalars.StepScalars``) reaches the
    kernel field by field, so the C++ side combines no hyperparameters itself. The optional
    device scalars (1-element float32 tensors on the params' device) go to the kernel as
    pointers and are read there, never here; so are the draws of ``device_draws`` (int64, 2
    elements: draw, next_draw). ``prior_mean`` / ``prior_precision`` (flat float32 tensors of
    the segment) go as pointers too; an absent one selects a kernel that never reads it."""
    _contract.update_arguments(_check, param, grad, mean, momentum, hess, avg_grad,
                               avg_hess_term, seed=seed, draw=draw, next_draw=next_draw,
                               offset=offset, count=count, round_draw=round_draw,
                               grad_scale=grad_scale, found_inf=found_inf, device_lr=device_lr,
                               device_debias=device_debias, device_draws=device_draws,
                               prior_mean=prior_mean, prior_precision=prior_precision, eps=eps,
                               next_eps=next_eps)
    s = scalars
    _library().update(
        param, grad, mean, momentum, hess, avg_grad, avg_hess_term, seed=_i64(seed),
        draw=_i64(draw), next_draw=None if next_draw is None else _i64(next_draw),
        offset=int(offset), count=int(count), hess_approx=hess_approx, lr=s.lr, ess=s.ess,
        weight_decay=s.weight_decay, beta1=s.beta1, one_minus_beta1=s.one_minus_beta1,
        beta2=s.beta2, one_minus_beta2=s.one_minus_beta2, hess_coef=s.hess_coef,
        clip_radius=s.clip_radius, debias=s.debias, grad_scale=grad_scale, found_inf=found_inf,
        device_lr=device_lr, device_debias=device_debias, device_draws=device_draws,
        prior_mean=prior_mean, prior_precision=prior_precision, round_draw=_i64(round_draw))
