"""Reference IVON: the op contract of docs/DESIGN.md section 5 in plain torch.

This module is the specification every kernel backend (Triton, CUDA, CPU C++) is tested against,
element by element. It is written for clarity, not speed, and runs in float32 or float64.

The ops work on one *segment*: flat 1-D tensors of equal length ``n`` whose element ``k`` has the
index ``offset + k`` in the optimizer's global flat index space. Every backend module exposes the
same three functions with the same keyword arguments:

    sample(param, mean, hess, *, seed, draw, offset, ess, weight_decay, prior_precision=None)
        param <- mean + eps * sigma,   sigma = 1 / sqrt(ess * (hess + weight_decay))

    accumulate(grad, hess, avg_grad, avg_hess_term, *, seed, draw, offset, count, ess,
               weight_decay, hess_approx, prior_precision=None)
        fold the gradient of sample number ``count`` (drawn with ``draw``) into running means:
        avg = new if count == 1 else avg + (new - avg) / count, where new is grad for avg_grad
        and noise * grad ('price') or grad ** 2 ('gradsq') for avg_hess_term.

    update(param, grad, mean, momentum, hess, avg_grad, avg_hess_term, *, seed, draw, next_draw,
           offset, count, hess_approx, scalars, prior_mean=None, prior_precision=None)
        the update of docs/DESIGN.md section 2. ``count`` is the number of MC samples in this step.
        With ``grad`` given, it is the gradient of the last sample (drawn with ``draw``) and the
        averages hold the first ``count - 1`` samples (unused when count == 1). With
        ``grad=None`` the averages already hold all ``count`` samples. Writes mean, momentum and
        hess, and param <- the new mean (``next_draw=None``) or directly the sample of
        ``next_draw`` around the new mean and hess. ``scalars`` is the group's
        ``ivon_fast.scalars.StepScalars`` of this step: the effective lr (rescaled by
        hess_init + weight_decay when rescale_lr), ess, weight_decay, the betas, clip_radius, the
        debias factor 1 - beta1 ** step (or 1) and the combinations 1 - beta1, 1 - beta2 and
        0.5 (1 - beta2)^2, all formed once in double on the host.

        Three optional device tensors let the step run without the host knowing its outcome
        (docs/DESIGN.md section 11; no backend reads them on the host):
          ``grad_scale``: 1 element, float32: the gradients (the pending ``grad`` and the
              averages) were multiplied by it (``torch.amp.GradScaler``); they are divided by it
              before use, the 'gradsq' average twice. None: no division at all.
          ``found_inf``: 1 element, float32: when nonzero, the step is skipped: mean, momentum
              and hess keep their values, and param <- the (unchanged) mean, or the sample of
              ``next_draw`` around it.
          ``device_lr``, ``device_debias``: 1 element each, in the state dtype: they replace
              ``scalars.lr`` / ``scalars.debias`` (a step count that only the device knows, an
              lr a CUDA graph replays with).

    A per-element Gaussian prior N(mu0_i, 1 / (ess * delta_i)) generalizes weight decay, the
    precision delta of a zero-mean prior shared by the group (the posterior's precision is
    ess * (hess + delta)). Two optional flat tensors of the segment's length, in the state dtype,
    on the params' device, give it; with both None (the default) every op computes what it
    computes without them, bit for bit (ivon-opt's arithmetic):
      ``prior_precision`` (sample, accumulate, update): delta_i replaces ``weight_decay`` in
          every per-element use: sigma = 1 / sqrt(ess * (hess + delta_i)) (the sample, the
          'price' noise of accumulate and of update's pending grad, the next sample),
          'price''s nll_hess = (hess_term * (hess + delta_i)) * ess, the denominator
          (hess + delta_i) of the hessian correction, and the step's delta (below).
          ``scalars.lr`` stays as the host formed it (rescale_lr multiplies by the scalar
          hess_init + weight_decay).
      ``prior_mean`` (update only): mu0_i, the point the step pulls toward (0 without it):
              mean <- mean - lr * clip((momentum / debias + delta_i * (mean - mu0_i))
                                       / (hess + delta_i), -rho, rho)
          with the new momentum and hess; without prior_mean the prior term stays
          delta_i * mean, literally, and delta_i is ``weight_decay`` without prior_precision.
      Each tensor enters the expressions in place of the scalar, in the same association order,
      so a kernel that reads it keeps the reference's rounding; a kernel reads neither when it
      is absent (one more read per element only for an input that is given).

    Low-precision state (docs/DESIGN.md section 16): ``momentum`` and ``hess`` may be bfloat16
    (``IVON(state_dtype=torch.bfloat16)``) while the mean and the averages stay float32. Every op
    then computes in float32 from the bf16 values as stored, exactly as with float32 state, and
    update stores the new momentum and hess by stochastic rounding (``stochastic_round_bf16``)
    with the random bits of ``rounding_bits(seed, round_draw, offset, n)``: Philox at the draw
    ``ROUND_DRAW_BASE + round_draw``, a stream of its own, one 32-bit word per element (the low
    16 bits round the momentum, the high 16 the hess). ``round_draw`` (update's keyword) is the
    update's rounding index; with ``device_draws``, ``device_draws[1]`` replaces it. A skipped
    step stores the old values, which round to themselves.

    Every op also takes ``device_draws``: an int64 tensor on the params' device holding the
    training draw numbers (their uint64 bits), read by the kernel in place of the host's ``draw``
    (sample, accumulate: 1 element) or ``draw`` and ``next_draw`` (update: 2 elements; the second
    is read only when ``next_draw`` is not None, which still says whether a next sample is
    written). The host values are then ignored, so one launch with the same arguments replays
    with fresh draws when the tensor advances (capturable steps, CUDA graphs).

Restore (param <- mean) is a plain ``param.copy_(mean)`` for every backend.

State tensors (mean, momentum, hess, averages) are float32 for float32 / bfloat16 / float16
params and float64 for float64 params. Grads have the param's dtype. Hyperparameters are Python
floats (double); no backend combines them itself, so every backend rounds the same doubles. The
reference ops additionally accept the standard normal ``eps`` (and ``next_eps``) explicitly,
which is how the optimizer reproduces ivon-opt's ``torch.randn`` noise bit for bit.

Every op checks its arguments against the rules of ``ivon_fast._contract``, which every backend
shares (and csrc/ops.cpp states too): contiguous segment tensors of one length on one device,
the dtypes above, seeds and draws in [0, 2**64), count >= 1, ... The reference differs from the
kernels only where it does more: float64 params and state, and the explicit noise.

Note [bitwise equality with ivon-opt]: the arithmetic below is written op for op as ivon-opt 0.1.3
writes it: Python scalars combined in double on the host, true divisions, the same association
order. Changing ``a / sqrt(b)`` into ``a * rsqrt(b)``, or regrouping a sum, breaks equality.
"""
from __future__ import annotations

import torch

from . import _contract
from .scalars import StepScalars

__all__ = [
    "philox4x32_10", "philox_normal", "state_dtype", "moment_dtype", "sample", "accumulate",
    "update", "rounding_bits", "stochastic_round_bf16", "EVAL_DRAW_BASE", "ROUND_DRAW_BASE",
]

# Evaluation / posterior-predictive draws live in the upper half of the 64-bit draw space, so they
# can never collide with (or shift) the training draws 0, 1, 2, ...
EVAL_DRAW_BASE = 1 << 63
# The random bits of stochastic rounding (low-precision state) live in [2^62, 2^63): apart from
# the training draws below and the evaluation draws above
ROUND_DRAW_BASE = 1 << 62

_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_UINT_TO_UNIFORM = 4.6566127342e-10
_TWO_PI = 6.283185307179586


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of the 64-bit product of a 32-bit constant and uint32 values (int64).

    The product needs 64 unsigned bits, which int64 cannot hold, so ``b`` is split in 16-bit halves
    and the partial products (each < 2^48) are recombined.
    """
    b_lo, b_hi = b & 0xFFFF, b >> 16
    p_lo = a * b_lo
    mid = a * b_hi + (p_lo >> 16)
    hi = mid >> 16
    lo = ((mid & 0xFFFF) << 16) | (p_lo & 0xFFFF)
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Random123's Philox4x32 with 10 rounds.

    Counters are int64 tensors holding uint32 values (broadcastable); the key is two uint32 ints.
    Returns the four uint32 outputs as int64 tensors.
    """
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in (c0, c1, c2, c3))
    for round_index in range(10):
        if round_index > 0:
            k0 = (k0 + _PHILOX_W0) & _MASK32
            k1 = (k1 + _PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _uint32_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float: the bits read as int32, folded to [0, 2^31), scaled."""
    signed = torch.where(x >= 1 << 31, x - (1 << 32), x)
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.float32) * _UINT_TO_UNIFORM


def _box_muller(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    radius = torch.sqrt(-2.0 * torch.log(torch.clamp(a, min=1e-7)))
    theta = _TWO_PI * b
    return radius * torch.cos(theta), radius * torch.sin(theta)


def philox_normal(seed: int, draw, offset: int, numel: int, device=None) -> torch.Tensor:
    """Standard normal noise eps[k] for global indices offset .. offset + numel - 1 (float32).

    ``draw``: an int, or a one-element int64 tensor holding the draw's uint64 bits.

    docs/DESIGN.md section 3: element i uses output (i & 3) of Philox4x32-10 with counter
    (lo32(i >> 2), hi32(i >> 2), lo32(draw), hi32(draw)) and key (lo32(seed), hi32(seed)),
    turned into normals by Box-Muller on the output pairs (0, 1) and (2, 3).
    """
    if numel == 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    x0, x1, x2, x3 = _philox_quads(seed, draw, offset, numel, device)
    n0, n1 = _box_muller(_uint32_to_uniform(x0), _uint32_to_uniform(x1))
    n2, n3 = _box_muller(_uint32_to_uniform(x2), _uint32_to_uniform(x3))
    return _per_element((n0, n1, n2, n3), offset, numel)


def _philox_quads(seed: int, draw, offset: int, numel: int, device):
    """The four Philox outputs of every quad that global indices offset .. offset + numel - 1
    touch (``draw``: an int, or a one-element int64 tensor holding its uint64 bits)."""
    first_quad, last_quad = offset >> 2, (offset + numel - 1) >> 2
    quad = torch.arange(first_quad, last_quad + 1, dtype=torch.int64, device=device)
    if isinstance(draw, torch.Tensor):  # a device draw: its int64 bits, read without the host
        draw = draw.reshape(()).to(device=quad.device, dtype=torch.int64)
        draw_lo, draw_hi = draw & _MASK32, (draw >> 32) & _MASK32
    else:
        draw_lo, draw_hi = draw & _MASK32, draw >> 32
    return philox4x32_10(quad & _MASK32, quad >> 32, draw_lo, draw_hi, seed & _MASK32,
                         seed >> 32)


def _per_element(outputs: tuple, offset: int, numel: int) -> torch.Tensor:
    """Element i's value is output (i & 3) of its quad."""
    per_quad = torch.stack(outputs, dim=1).reshape(-1)
    start = offset & 3
    return per_quad[start:start + numel]


def rounding_bits(seed: int, round_draw, offset: int, numel: int, device=None) -> torch.Tensor:
    """The 32 random bits of each element's stochastic rounding (uint32 values in int64): output
    (i & 3) of Philox4x32-10 at draw ROUND_DRAW_BASE + round_draw (an int, or a one-element int64
    tensor), the noise's counter and key otherwise (docs/DESIGN.md section 16)."""
    if numel == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    draw = ROUND_DRAW_BASE + round_draw
    return _per_element(_philox_quads(seed, draw, offset, numel, device), offset, numel)


def stochastic_round_bf16(values: torch.Tensor, random16: torch.Tensor) -> torch.Tensor:
    """float32 ``values`` rounded to bfloat16 up or down with probabilities that make the result
    unbiased: the 16 bits below bf16's mantissa plus a uniform 16-bit ``random16``, carried into
    the kept bits and truncated. ``(bits + r) >> 16`` rounds the magnitude up exactly when
    r >= 2^16 - low, i.e. with probability low / 2^16. inf stays inf; NaN becomes a quiet NaN
    (as the round-to-nearest conversion does)."""
    bits = values.float().view(torch.int32).to(torch.int64) & _MASK32
    rounded = (bits + random16) >> 16
    rounded = torch.where(values.isnan(), (bits >> 16) | 0x40, rounded)
    signed = torch.where(rounded >= 1 << 15, rounded - (1 << 16), rounded)
    return signed.to(torch.int16).view(torch.bfloat16)


def _store_state(stored: torch.Tensor, values: torch.Tensor, random16) -> None:
    """Write a state tensor: as is, or into bf16 state by stochastic rounding."""
    if stored.dtype == torch.bfloat16:
        stored.copy_(stochastic_round_bf16(values, random16))
    else:
        stored.copy_(values)


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """fp32 master state for low-precision params, the param's own dtype for fp32 / fp64."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def moment_dtype(param_dtype: torch.dtype, low_precision: torch.dtype) -> torch.dtype:
    """The dtype of momentum and hess: ``low_precision`` (IVON's ``state_dtype``: float32 or
    bfloat16) for float32 / bf16 / fp16 params; float64 params keep float64 state."""
    return torch.float64 if param_dtype == torch.float64 else low_precision


def _eps(eps, seed, draw, offset, like: torch.Tensor) -> torch.Tensor:
    if eps is None:
        eps = philox_normal(seed, draw, offset, like.numel(), like.device)
    return eps.to(like.dtype)


def _noise(eps: torch.Tensor, hess: torch.Tensor, ess: float, weight_decay) -> torch.Tensor:
    # written as ivon-opt writes it: randn / (ess * (hess + wd)).sqrt(); ``weight_decay`` is the
    # group's float or the per-element prior precision (a tensor, which replaces it in every
    # per-element use)
    return eps / (ess * (hess + weight_decay)).sqrt()


def _hess_term(grad, noise, hess_approx: str) -> torch.Tensor:
    return noise * grad if hess_approx == "price" else grad.square()


def _running_mean(avg: torch.Tensor, new: torch.Tensor, count: int) -> torch.Tensor:
    return new if count == 1 else avg + (new - avg) / count


def _draws(device_draws, draw, next_draw=None, round_draw=0) -> tuple:
    """An op's (checked) draw, next draw and rounding index: as ints, or read from its device
    draws (0-d int64 tensors, on the device; update's next draw and rounding index are the
    second one, the next draw only where one is wanted)."""
    if device_draws is None:
        return int(draw), None if next_draw is None else int(next_draw), int(round_draw)
    draws = device_draws.reshape(-1)
    return draws[0], None if next_draw is None else draws[1], draws[-1]


@torch.no_grad()
def sample(param, mean, hess, *, seed=0, draw=0, offset=0, ess, weight_decay, eps=None,
           device_draws=None, prior_precision=None):
    _contract.sample(param, mean, hess, seed=seed, draw=draw, offset=offset,
                     device_draws=device_draws, prior_precision=prior_precision, eps=eps,
                     reference=True)
    draw = _draws(device_draws, draw)[0]
    _sample(param, mean, hess, seed=int(seed), draw=draw, offset=int(offset), ess=ess,
            weight_decay=weight_decay, eps=eps, prior_precision=prior_precision)


def _sample(param, mean, hess, *, seed, draw, offset, ess, weight_decay, eps, prior_precision):
    """``sample`` of checked arguments (``draw``: an int or a device draw)."""
    hess = hess.to(mean.dtype)  # bf16 state is computed with in float32
    # the prior precision replaces weight_decay wherever it multiplies or adds per element
    delta = weight_decay if prior_precision is None else prior_precision
    noise = _noise(_eps(eps, seed, draw, offset, mean), hess, ess, delta)
    param.copy_(mean + noise)


@torch.no_grad()
def accumulate(grad, hess, avg_grad, avg_hess_term, *, seed=0, draw=0, offset=0, count, ess,
               weight_decay, hess_approx, eps=None, device_draws=None, prior_precision=None):
    _contract.accumulate(grad, hess, avg_grad, avg_hess_term, seed=seed, draw=draw,
                         offset=offset, count=count, hess_approx=hess_approx,
                         device_draws=device_draws, prior_precision=prior_precision, eps=eps,
                         reference=True)
    seed, draw, offset, count = int(seed), _draws(device_draws, draw)[0], int(offset), int(count)
    hess = hess.to(avg_grad.dtype)  # bf16 state is computed with in float32
    grad = grad.to(hess.dtype)
    delta = weight_decay if prior_precision is None else prior_precision
    noise = _noise(_eps(eps, seed, draw, offset, hess), hess, ess, delta)
    avg_grad.copy_(_running_mean(avg_grad, grad, count))
    avg_hess_term.copy_(_running_mean(avg_hess_term, _hess_term(grad, noise, hess_approx), count))


def _unscaled(gradients: torch.Tensor, grad_scale, times: int) -> torch.Tensor:
    """Gradient values divided ``times`` times by the GradScaler's scale (as it multiplied)."""
    if grad_scale is None:
        return gradients
    scale = grad_scale.to(gradients.dtype)
    for _ in range(times):
        gradients = gradients / scale
    return gradients


@torch.no_grad()
def update(param, grad, mean, momentum, hess, avg_grad, avg_hess_term, *, seed=0, draw=0,
           next_draw=None, offset=0, count, hess_approx, scalars: StepScalars, eps=None,
           next_eps=None, grad_scale=None, found_inf=None, device_lr=None,
           device_debias=None, device_draws=None, prior_mean=None, prior_precision=None,
           round_draw=0):
    _contract.update(param, grad, mean, momentum, hess, avg_grad, avg_hess_term, seed=seed,
                     draw=draw, next_draw=next_draw, offset=offset, count=count,
                     hess_approx=hess_approx, round_draw=round_draw, grad_scale=grad_scale,
                     found_inf=found_inf, device_lr=device_lr, device_debias=device_debias,
                     device_draws=device_draws, prior_mean=prior_mean,
                     prior_precision=prior_precision, eps=eps, next_eps=next_eps,
                     reference=True)
    draw, next_draw, round_draw = _draws(device_draws, draw, next_draw, round_draw)
    _update(param, grad, mean, momentum, hess, avg_grad, avg_hess_term, seed=int(seed), draw=draw,
            next_draw=next_draw, offset=int(offset), count=int(count), hess_approx=hess_approx,
            scalars=scalars, eps=eps, next_eps=next_eps, grad_scale=grad_scale,
            found_inf=found_inf, device_lr=device_lr, device_debias=device_debias,
            prior_mean=prior_mean, prior_precision=prior_precision, round_draw=round_draw)


def _update(param, grad, mean, momentum, hess, avg_grad, avg_hess_term, *, seed, draw, next_draw,
            offset, count, hess_approx, scalars, eps, next_eps, grad_scale, found_inf, device_lr,
            device_debias, prior_mean, prior_precision, round_draw):
    """``update`` of checked arguments (draws: ints or device draws)."""
    # bf16 momentum / hess: computed with in float32 (the mean's dtype) and stored rounded
    stored_momentum, stored_hess = momentum, hess
    momentum, hess = momentum.to(mean.dtype), hess.to(mean.dtype)
    s = scalars
    # the prior precision replaces s.weight_decay wherever it multiplies or adds per element
    delta = s.weight_decay if prior_precision is None else prior_precision
    # the hess-term average of 'gradsq' holds squared (so twice scaled) gradients
    term_scaled = 2 if hess_approx == "gradsq" else 1
    if grad is None:
        grad_mean = _unscaled(avg_grad, grad_scale, 1)
        hess_term = _unscaled(avg_hess_term, grad_scale, term_scaled)
    else:
        grad = _unscaled(grad.to(hess.dtype), grad_scale, 1)
        noise = _noise(_eps(eps, seed, draw, offset, hess), hess, s.ess, delta)
        if count > 1:
            avg_grad = _unscaled(avg_grad, grad_scale, 1)
            avg_hess_term = _unscaled(avg_hess_term, grad_scale, term_scaled)
        grad_mean = _running_mean(avg_grad, grad, count)
        hess_term = _running_mean(avg_hess_term, _hess_term(grad, noise, hess_approx), count)
    lr = s.lr if device_lr is None else device_lr.reshape(())
    debias = s.debias if device_debias is None else device_debias.reshape(())

    # the update, op for op as ivon-opt 0.1.3 (see the module's Note); ivon-opt's (1 - beta1) and
    # 0.5 * (1 - beta2) ** 2 are the same doubles as s.one_minus_beta1 and s.hess_coef
    new_momentum = s.beta1 * momentum + s.one_minus_beta1 * grad_mean
    if hess_approx == "price":
        nll_hess = (hess_term * (hess + delta)) * s.ess
    else:
        nll_hess = hess_term * s.ess
    new_hess = (s.beta2 * hess + s.one_minus_beta2 * nll_hess
                + s.hess_coef * (hess - nll_hess).square() / (hess + delta))
    if prior_mean is None:  # ivon-opt's pull toward 0, op for op (delta is s.weight_decay)
        prior_term = delta * mean
    else:
        prior_term = delta * (mean - prior_mean)
    new_mean = mean - lr * torch.clip(
        (new_momentum / debias + prior_term) / (new_hess + delta),
        min=-s.clip_radius, max=s.clip_radius)

    if found_inf is not None:  # a skipped step keeps the state (no host sync to decide it)
        skip = found_inf.reshape(()) != 0
        new_momentum = torch.where(skip, momentum, new_momentum)
        new_hess = torch.where(skip, hess, new_hess)
        new_mean = torch.where(skip, mean, new_mean)
    random = (rounding_bits(seed, round_draw, offset, mean.numel(), mean.device)
              if torch.bfloat16 in (stored_momentum.dtype, stored_hess.dtype) else None)
    _store_state(stored_momentum, new_momentum, None if random is None else random & 0xFFFF)
    _store_state(stored_hess, new_hess, None if random is None else random >> 16)
    mean.copy_(new_mean)
    if next_draw is None and next_eps is None:
        param.copy_(new_mean)
    else:
        _sample(param, mean, stored_hess, seed=seed, draw=next_draw, offset=offset, ess=s.ess,
                weight_decay=s.weight_decay, eps=next_eps, prior_precision=prior_precision)
