"""Microbenchmark: ivon_fast against torch.optim.AdamW and ivon-opt, per backend, size and shape.

    python -m bench                     # the default sweep on the default device (cuda, else cpu)
    python -m bench --quick             # smoke test (tiny sizes, 3 rounds; files in a temp folder)
    python -m bench --sizes 16M,64M --shapes gpt2 --dtype bfloat16 --backends triton
    python -m bench --host-only         # only the host cost against the tensor count
    python -m bench --state-dtypes float32  # leave out the bf16-state rows

What is timed, like for like, in one process on one device (for every available backend; Triton
only on GPUs, where it is not the interpreter; the reference backend up to --reference-max):
  * the drop-in step, ``IVON(..., resample_on_step=True, skip_nonfinite=True).step()`` (the
    update fused with drawing the next sample, after the on-device check of the gradients for
    inf / NaN, docs/DESIGN.md section 11), against ``AdamW(fused=True).step()`` (the anchor of
    every ratio) and ``AdamW(foreach=True).step()``;
  * the same drop-in step with ``skip_nonfinite=False`` ("no finite check"): the check's cost is
    the checked step's median over this one's ("x unchecked"; the JSON also keeps the median of
    the two's ratios round by round);
  * the same drop-in step (checked) with ``state_dtype=torch.bfloat16`` ("bf16 state",
    docs/DESIGN.md section 16: bf16 momentum and Hessian, fp32 mean; 8 bytes of state per param,
    AdamW's size, against 12), for each backend that implements bf16 state
    (``backends.unavailable_reason(name, device, dtype, state_dtype=torch.bfloat16)`` is None;
    the others get no such row, and a note says why); ``--state-dtypes`` picks the state dtypes
    timed (default float32,bfloat16: both). The JSON also keeps its median over the fp32-state
    drop-in step's ("x fp32 state", and the median of the two's ratios round by round). Its
    target (issue 11; on a GPU at >= 64M params): <= 0.95x AdamW(fused=True), with state memory
    equal to AdamW's (fp32 params); the summary's "# target" lines check it;
  * the official iteration, ``with opt.sampled_params(train=True): ...; opt.step()`` (sample,
    restore, update; ``skip_nonfinite=True``), against ivon-opt 0.1.3's official iteration (up to
    --ivon-opt-max).
``skip_nonfinite`` is always passed explicitly, whatever the optimizer's default. The gradients
are set once and never recomputed: only the optimizer is timed.

Sizes are param counts (K, M, G: powers of 10), in two model shapes (bench/shapes.py):
``few-large`` (--tensors equal 1-D tensors) and ``gpt2`` (GPT-2 small's 148 tensors scaled to the
size). Params are fp32, bf16 or fp16 (--dtype; ivon_fast keeps an fp32 mean and fp32 momentum
and Hessian, or bf16 ones in the bf16-state rows; AdamW and ivon-opt keep their state in the
params' dtype).

Every row: min / median / max milliseconds over the alternated rounds (bench/measure.py: all
contenders of a configuration timed once per round, in a rotating order; slow ones in the first
rounds only); host ms, the Python side of one step (on CUDA the wall time of the call with the
device synchronized before it and the final synchronize not counted; on CPU, where the kernels run
inside the call, the same step over the same tensors at one element each); bytes per element by
the byte model of docs/DESIGN.md section 6 (the least traffic the operation needs, not what an
implementation moves, so GB/s of AdamW(foreach) and ivon-opt are effective rates); GB/s and the
share of the device's copy bandwidth (an fp32 copy measured at the start of the same run, on CPU
too; a working set that fits in the last-level cache can exceed 100%); the ratio to
AdamW(fused=True); for official iterations, how many times faster than ivon-opt's.

Byte model, P = bytes per param element (4 fp32, 2 bf16), S = bytes per momentum / Hessian
element (4 with fp32 state, 2 with bf16 state; the mean is fp32 in both):
  AdamW step                     7P      (reads p, g, m, v; writes p, m, v; state in the param dtype)
  drop-in step, no finite check  2P + 8 + 4S = 2P + 24 (reads g P, mean 4, momentum S,
                                         hess S; writes mean 4, momentum S, hess S, theta P)
  drop-in step (checked)         3P + 24 (the finite check reads the grads once more: aminmax of
                                         each flat gradient buffer, 4 B per fp32 element)
  drop-in step, bf16 state       3P + 16 (checked; S = 2: reads g, mean 4, momentum 2, hess 2;
                                         writes mean 4, momentum 2, hess 2 and theta; the check
                                         P; unchecked it would be 2P + 16)
  official iteration (checked)   5P + 36 (sample 8 + P, restore 4 + P, check P, update 24 + 2P)
  ivon-opt official iteration    13P     (the same three ops with state in the param dtype)
So per element, fp32 params: AdamW 28; drop-in step 36 (32 unchecked); drop-in step with bf16
state 28, exactly AdamW's 28 (24 unchecked); bf16 params: AdamW 14, drop-in step 30 (28
unchecked), with bf16 state 22 (20 unchecked). bf16 state saves 8 B per element whatever the
params (momentum and Hessian, 2 B less each, read and written). The row that stands against
AdamW's 28 B is the timed one, fp32 params with the check: 28 B, the same bytes, so <= 0.95x
AdamW asks for a higher share of the copy bandwidth than fused AdamW reaches (without the check it
would be 24 B, a byte floor of 0.86x).

CPU floor (CPU only; docs/DESIGN.md section 6: a 2-core CPU is compute-bound): the step's memory
traffic plus the noise it must generate, both measured in the same rounds. The traffic: a plain
fp32 copy that moves the drop-in step's bytes (scaled by bytes for the other rows). The noise: two
draws for the IVON rows (the consumed sample's noise, regenerated for the Hessian estimate, and
the next sample's; the official iteration draws once in the sample, once in the update), none for
AdamW; one draw is timed as the CPU kernel's ``sample`` op on one core over a cache-resident
buffer, divided by the thread count (bench/measure.py ``noise_probe``); the bf16-state row is
charged the same two draws, not the stochastic rounding's bits (one Philox output per element,
no Box-Muller), so its floor is a lower bound. "x floor" is the row's median over that sum; a
kernel that overlaps its traffic with its arithmetic can go below 1 (the JSON also keeps the
fully overlapped bound, max(traffic, noise)).

Host cost against the tensor count (its own table, JSON key "host_cost" and a second PNG,
*_host.png): the host time of one step() (as above: on CUDA the call with the device synchronized
before it; on CPU the step over one-element tensors) for N = 30, 300, 3000 tensors of one element
(--host-tensors; --quick: 300 only), for AdamW(fused=True) and, per backend, the checked and
unchecked drop-in step and the official iteration, fp32 state (the reference backend up to
--reference-max tensors); alternated rounds (--host-rounds), min / median / max microseconds per
step, x AdamW, and microseconds per tensor: the slope of the medians between consecutive N (the
headline: 300 to 3000). The target: with hundreds of tensors, IVON's host time at or below
AdamW(fused=True)'s, and a per-tensor slope that does not make the step's Python work grow with
the tensor count. It runs first, so a timeout that stops the sweep keeps it.

Memory (bytes per param, at every size; the table shows the largest): the optimizer's state
tensors (fp32 params: AdamW 8, ivon_fast 12, with bf16 state 8; plus AdamW's step counters, 4 B
per tensor), state plus params and grads, and the peak transient memory of one step
(torch.cuda.max_memory_allocated on CUDA; on CPU the peak of torch's CPU allocations from the
profiler's memory events; see bench/measure.py).

Output: a progress bar (tqdm, on a terminal), the tables, a JSON record (device, versions, date,
command, every row) and a PNG plot (matplotlib) of time and ratio against size, in bench/results/
(--quick: a temporary folder) or --out. tqdm and matplotlib come with the ``bench`` extra
(``pip install -e '.[bench]'``); without them there is no bar or no plot, and a note says so.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import importlib.util
import math
import os
import platform
import shlex
import signal
import statistics
import sys
import tempfile
import time

import torch

import ivon_fast
from ivon_fast import backends

from bench import measure, report
from bench.measure import Contender
from bench.shapes import SHAPES, describe, param_shapes

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
# the state dtypes --state-dtypes takes (IVON's ``state_dtype``: momentum and hess)
STATE_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16}
# noise draws per element that the CPU floor charges (the bf16-state row: not the stochastic
# rounding's bits, so its floor is a lower bound)
DRAWS = {"adamw_fused": 0, "adamw_foreach": 0, "drop_in_step": 2, "drop_in_step_unchecked": 2,
         "drop_in_step_bf16_state": 2, "official_iteration": 2}
# kept for older callers: the byte model for fp32 params
BYTES_PER_ELEMENT = {"adamw_fused": 28, "drop_in_step": 36, "drop_in_step_unchecked": 32,
                     "drop_in_step_bf16_state": 28, "official_iteration": 56}
# the IVON contenders: kind -> (drop-in mode, skip_nonfinite, label after "ivon_fast[backend] ",
# state_dtype)
IVON_KINDS = {
    "drop_in_step": (True, True, "drop-in step", torch.float32),
    "drop_in_step_unchecked": (True, False, "drop-in step, no finite check", torch.float32),
    "drop_in_step_bf16_state": (True, True, "drop-in step, bf16 state", torch.bfloat16),
    "official_iteration": (False, True, "official iteration", torch.float32),
}
# the kind whose bytes the CPU floor's copy probe moves (other kinds scale it by their bytes)
FLOOR_KIND = "drop_in_step_unchecked"


def drop_in_bytes(param_bytes: int, state_bytes: int = 4, checked: bool = True) -> int:
    """Bytes per element of the drop-in step (the update fused with the next sample): reads the
    grad (P), mean (4, fp32 always), momentum and hess (S each); writes mean, momentum, hess and
    the next sample theta (P): 2P + 8 + 4S; the finite check reads the grads once more, + P."""
    return (3 if checked else 2) * param_bytes + 8 + 4 * state_bytes


def bytes_per_element(kind: str, param_bytes: int) -> int:
    """Bytes one element moves in ``kind`` by the byte model (docs/DESIGN.md section 6).

    The update fused with the next sample moves 2P + 24 (section 6's 32 B in fp32). With
    ``skip_nonfinite=True`` (docs/DESIGN.md section 11) the optimizer first checks the gradients
    on the device, ``torch.aminmax`` of each flat gradient buffer: one more read of the grads, P
    bytes (4 B per fp32 element against the step's 32), so the checked drop-in step is 3P + 24
    and the checked official iteration 5P + 36; ``skip_nonfinite=False`` removes that read.
    With bf16 momentum and hess (``state_dtype=torch.bfloat16``, docs/DESIGN.md section 16) the
    update moves 8 B less (2 B less for each of momentum and hess, read and written): the
    checked drop-in step with bf16 state is 3P + 16, 28 B for fp32 params (AdamW's 7P = 28).
    """
    p = param_bytes
    return {"adamw_fused": 7 * p, "adamw_foreach": 7 * p,
            "drop_in_step": drop_in_bytes(p, 4, checked=True),
            "drop_in_step_unchecked": drop_in_bytes(p, 4, checked=False),
            "drop_in_step_bf16_state": drop_in_bytes(p, 2, checked=True),
            "official_iteration": 4 * p + 36 + p, "ivon_opt_iteration": 13 * p}[kind]


def state_dtype_of(kind: str) -> torch.dtype | None:
    """The momentum / hess dtype of an IVON kind (None for the others)."""
    return IVON_KINDS[kind][3] if kind in IVON_KINDS else None


def wanted_state_dtypes(args) -> list:
    """The state dtypes of --state-dtypes (default: float32 and bfloat16)."""
    text = getattr(args, "state_dtypes", None) or "float32,bfloat16"
    wanted = [STATE_DTYPES[d.strip()] for d in text.split(",") if d.strip()]
    return list(dict.fromkeys(wanted))


def parse_size(text: str) -> int:
    text = text.strip()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1].upper(), 1)
    return int(float(text.rstrip("kKmMgG")) * scale)


# ------------------------------------------------------------------------------ the contenders

def make_shaped_params(shapes: list, device, dtype, seed: int = 0) -> list:
    """Params of the given shapes with random values and random grads (made on ``device``)."""
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        value = torch.randn(shape, generator=generator, device=device)
        grad = torch.randn(shape, generator=generator, device=device).mul_(1e-2)
        param = torch.nn.Parameter(value.to(dtype))
        param.grad = grad.to(dtype)
        params.append(param)
    return params


def make_params(numel: int, tensors: int, device, dtype, seed: int = 0) -> list:
    """``tensors`` 1-D params of about equal size with random values and random grads."""
    return make_shaped_params(param_shapes("few-large", numel, tensors), device, dtype, seed)


def adamw_contender(shapes, device, dtype, mode: str = "fused") -> Contender:
    params = make_shaped_params(shapes, device, dtype)
    optimizer = torch.optim.AdamW(params, lr=1e-3, **{mode: True})
    optimizer.step()  # fails here where the mode does not take this device and dtype
    return Contender(f"AdamW({mode}=True) step", f"adamw_{mode}", optimizer.step,
                     optimizer=optimizer, params=params)


def ivon_fast_contender(shapes, device, dtype, backend: str, mode: str) -> Contender:
    """One of ``IVON_KINDS``: the drop-in step with the finite check ('drop_in_step'), without it
    ('drop_in_step_unchecked'), with it and bf16 momentum and hess ('drop_in_step_bf16_state'),
    or the official iteration with it ('official_iteration').
    ``skip_nonfinite`` is always passed explicitly, whatever the optimizer's default."""
    resample, skip_nonfinite, what, state_dtype = IVON_KINDS[mode]
    params = make_shaped_params(shapes, device, dtype)
    grads = [p.grad.clone() for p in params]
    options = {} if state_dtype == torch.float32 else {"state_dtype": state_dtype}
    optimizer = ivon_fast.IVON(params, lr=1e-3, ess=1e6, backend=backend, seed=1234,
                               resample_on_step=resample, skip_nonfinite=skip_nonfinite,
                               **options)
    with torch.no_grad():
        for param, grad in zip(params, grads):  # the grads are views into the flat buffer now
            param.grad.copy_(grad)
    del grads
    label = f"ivon_fast[{backend}] {what}"
    if resample:
        return Contender(label, mode, optimizer.step, backend=backend, optimizer=optimizer,
                         params=params)

    def iteration():
        with optimizer.sampled_params(train=True):
            pass  # the grads are already in place
        optimizer.step()
    return Contender(label, mode, iteration, backend=backend, optimizer=optimizer, params=params)


def ivon_opt_version() -> str | None:
    if importlib.util.find_spec("ivon") is None:
        return None
    try:
        return importlib.metadata.version("ivon-opt")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def ivon_opt_contender(shapes, device, dtype) -> Contender:
    """One official ivon-opt iteration (sample, restore, step)."""
    import ivon
    params = make_shaped_params(shapes, device, dtype)
    optimizer = ivon.IVON(params, lr=1e-3, ess=1e6)

    def iteration():
        with optimizer.sampled_params(train=True):
            pass
        optimizer.step()
    return Contender(f"ivon-opt {ivon_opt_version()} official iteration", "ivon_opt_iteration",
                     iteration, optimizer=optimizer, params=params)


# Older entry points (bench/device_check.sh's Triton sweep, other scripts): few-large params.

def adamw_call(numel, tensors, device, dtype):
    """One fused AdamW step over fresh params, as a callable."""
    return adamw_contender(param_shapes("few-large", numel, tensors), device, dtype).fn


def ivon_fast_call(numel, tensors, device, dtype, backend, mode):
    """One ivon_fast drop-in step, or one official iteration (sample, restore, step)."""
    return ivon_fast_contender(param_shapes("few-large", numel, tensors), device, dtype,
                               backend, mode).fn


def ivon_opt_call(numel, tensors, device, dtype):
    """One official ivon-opt iteration (sample, restore, step)."""
    return ivon_opt_contender(param_shapes("few-large", numel, tensors), device, dtype).fn


def timed_alternating(calls: dict, device, repeats: int, warmup: int = 2) -> dict:
    """Median seconds per call of each of ``calls``, timed round by round in turn."""
    contenders = [Contender(label, "call", fn, warmup=warmup) for label, fn in calls.items()]
    measure.run_rounds(contenders, torch.device(device), repeats)
    return {c.label: statistics.median(c.seconds) for c in contenders}


def timed(fn, device, repeats: int, warmup: int = 2) -> float:
    """Median seconds per call."""
    return timed_alternating({"fn": fn}, device, repeats, warmup)["fn"]


def bench_adamw(numel, tensors, device, dtype, repeats):
    return timed(adamw_call(numel, tensors, device, dtype), device, repeats)


def bench_ivon_fast(numel, tensors, device, dtype, repeats, backend, mode):
    return timed(ivon_fast_call(numel, tensors, device, dtype, backend, mode), device, repeats)


def copy_bandwidth(numel: int, device, repeats: int) -> float:
    """Median device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    return measure.copy_bandwidth(numel, torch.device(device), repeats)["gbs_median"]


# ------------------------------------------------------------------------------ the sweep

def kernel_backends(args, device: torch.device, dtype: torch.dtype, notes: list) -> list:
    """The ivon_fast backends to time on ``device`` with ``dtype`` params."""
    if args.backends:
        wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    else:  # the backends that can serve this device (Triton on CPU is the interpreter: no perf)
        wanted = ["cuda", "triton", "reference"] if device.type == "cuda" else [
            device.type, "reference"]

    def reason(name):
        if name not in backends.BACKENDS:
            return f"unknown backend; choose from {', '.join(backends.BACKENDS)}"
        return backends.unavailable_reason(name, device, dtype)

    return _usable(wanted, reason, dtype, "skipped", notes)


def _usable(names: list, reason, dtype: torch.dtype, passed_over: str, notes: list) -> list:
    """Those of ``names`` for which ``reason(name)`` is None; each other gets the note "backend
    NAME (DTYPE): ``passed_over`` (the reason's first line)"."""
    usable = []
    for name in names:
        why = reason(name)
        if why is None:
            usable.append(name)
        else:
            notes.append(f"backend {name} ({dtype_name(dtype)}): {passed_over} "
                         f"({why.splitlines()[0]})")
    return usable


def bf16_state_backends(args, device: torch.device, dtype: torch.dtype, names: list,
                        notes: list) -> list:
    """Those of ``names`` that time the drop-in step with bf16 state on ``device`` with ``dtype``
    params (``backends.unavailable_reason(..., state_dtype=torch.bfloat16)`` is None); none when
    --state-dtypes leaves bfloat16 out. A backend without bf16 state gets a note, no row."""
    if torch.bfloat16 not in wanted_state_dtypes(args):
        return []
    return _usable(names, lambda name: backends.unavailable_reason(
        name, device, dtype, state_dtype=torch.bfloat16), dtype, "no bf16-state row", notes)


def ivon_kinds(args, name: str, bf16_names=()) -> list:
    """The IVON kinds timed for backend ``name``: the fp32-state ones when --state-dtypes has
    float32, the bf16-state drop-in step when it has bfloat16 and ``name`` is in
    ``bf16_names``."""
    wanted = wanted_state_dtypes(args)
    return [kind for kind in IVON_KINDS if state_dtype_of(kind) in wanted
            and (state_dtype_of(kind) == torch.float32 or name in bf16_names)]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def build_contenders(shapes, device, dtype, numel, args, names, notes, bf16_names=()) -> list:
    """Every contender of one configuration; the CPU floor's probes last. ``bf16_names``: the
    backends of ``names`` that also time the drop-in step with bf16 state."""
    contenders = []
    for mode in ("fused", "foreach"):
        if mode == "foreach" and not args.foreach:
            continue
        try:
            contenders.append(adamw_contender(shapes, device, dtype, mode))
        except (RuntimeError, ValueError) as error:
            if is_oom(error):
                raise
            note = f"AdamW({mode}=True) on {device.type} {dtype_name(dtype)}: {error}"
            if note not in notes:
                notes.append(note)
    slow_rounds = max(2, args.rounds // 3)
    for name in names:
        if name == "reference" and numel > args.reference_max:
            continue
        for mode in ivon_kinds(args, name, bf16_names):
            contender = ivon_fast_contender(shapes, device, dtype, name, mode)
            if name == "reference":  # the spec in plain torch: 50x to 200x AdamW on CPU
                contender.max_rounds, contender.warmup = 2, 1
            contenders.append(contender)
    if args.ivon_opt and numel <= args.ivon_opt_max:
        contender = ivon_opt_contender(shapes, device, dtype)
        contender.max_rounds, contender.warmup = slow_rounds, 1
        contenders.append(contender)
    if device.type == "cpu" and args.floor:
        numel = sum(math.prod(s) for s in shapes)
        moved = bytes_per_element(FLOOR_KIND, dtype_bytes(dtype)) * numel
        contenders.append(measure.copy_probe(moved, device))
        noise = measure.noise_probe(numel, torch.get_num_threads())
        if noise is not None:
            contenders.append(noise)
    return contenders


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def footprint(numel: int, dtype: torch.dtype, args, names: list, bf16_names=()) -> int:
    """A generous estimate of the bytes one configuration holds at once."""
    p = dtype_bytes(dtype)
    timed = [n for n in names if n != "reference" or numel <= args.reference_max]
    per = 2 * (4 * p) + (2 * p if args.foreach else 0)   # the two AdamWs, foreach temporaries
    for name in timed:                                   # ivon_fast: params, grads, clone, state
        for kind in ivon_kinds(args, name, bf16_names):
            per += 3 * p + (8 if state_dtype_of(kind) == torch.bfloat16 else 12)
    if args.ivon_opt and numel <= args.ivon_opt_max:
        per += 14 * p                                    # ivon-opt: 4P held, ~10P transient
    return int(1.15 * per * numel)


def host_table_cpu(shape_count, device, dtype, args, names, sizes, bf16_names=()) -> dict:
    """CPU host ms per contender label: the step over ``shape_count`` one-element tensors (for
    the contenders that some of ``sizes`` time)."""
    tiny_args = argparse.Namespace(**{
        **vars(args), "floor": False,
        "reference_max": math.inf if min(sizes) <= args.reference_max else -1,
        "ivon_opt_max": math.inf if min(sizes) <= args.ivon_opt_max else -1})
    contenders = build_contenders([(1,)] * shape_count, device, dtype, shape_count, tiny_args,
                                  names, [], bf16_names)
    for contender in contenders:
        contender.warmup = 3
    seconds = measure.host_times_cpu(contenders, rounds=max(3, args.rounds),
                                     inner=5 if args.quick else 20)
    return {label: s * 1e3 for label, s in seconds.items()}


def state_cost(contender: Contender, fp32_state: Contender | None) -> dict:
    """For the drop-in step with bf16 state: its median over the fp32-state drop-in step's (same
    backend, same rounds; "x fp32 state"), and the median of the two's ratios round by round."""
    if (contender.kind != "drop_in_step_bf16_state" or fp32_state is None
            or not fp32_state.seconds or not contender.seconds):
        return {}
    paired = [b / f for b, f in zip(contender.seconds, fp32_state.seconds)]
    return {"state_ratio": statistics.median(contender.seconds)
            / statistics.median(fp32_state.seconds),
            "state_ratio_paired": statistics.median(paired)}


def check_cost(contender: Contender, unchecked: Contender | None) -> dict:
    """What the finite check costs, for the checked drop-in step: its median over the unchecked
    drop-in step's (same backend, same rounds), and the median of the two's ratios round by
    round (the pair timed in the same round sees the same machine)."""
    if contender.kind != "drop_in_step" or unchecked is None or not unchecked.seconds:
        return {}
    paired = [c / u for c, u in zip(contender.seconds, unchecked.seconds)]
    return {"check_ratio": statistics.median(contender.seconds)
            / statistics.median(unchecked.seconds),
            "check_ratio_paired": statistics.median(paired),
            "check_ms": (statistics.median(contender.seconds)
                         - statistics.median(unchecked.seconds)) * 1e3}


HOST_METHOD = {
    "cuda": "host time of one step() on CUDA: the call's wall time with the device synchronized "
            "before it and the synchronize after it not counted (Python, checks, dispatch, "
            "launches)",
    "cpu": "host time of one step() on CPU: the wall time of the step over one-element tensors "
           "(the kernels run inside the call; one element each leaves the per-step and "
           "per-tensor work)",
}


def host_cost_contenders(count: int, device, dtype, args, names) -> list:
    """The host-cost section's contenders at ``count`` one-element tensors: AdamW(fused=True)
    and, per backend, the checked and unchecked drop-in step and the official iteration (fp32
    state: bf16 state runs the same Python)."""
    shapes = [(1,)] * count
    contenders = [adamw_contender(shapes, device, dtype, "fused")]
    for name in names:
        if name == "reference" and count > args.reference_max:
            continue
        contenders += [ivon_fast_contender(shapes, device, dtype, name, mode)
                       for mode in IVON_KINDS if state_dtype_of(mode) == torch.float32]
    for contender in contenders:
        contender.warmup = 3
    return contenders


def host_cost(device, dtype, args, names, progress) -> dict:
    """The host-cost section: host microseconds of one step() against the tensor count, and the
    slope (microseconds per tensor) between consecutive counts."""
    rows, slopes = [], []
    for count in args.host_tensors:
        progress.config(f"host cost: {count} tensors")
        contenders = host_cost_contenders(count, device, dtype, args, names)
        try:
            measure.host_rounds(contenders, device, args.host_rounds, on_round=progress.advance)
            anchor = statistics.median(contenders[0].host_seconds)
            for contender in contenders:
                low, mid, high = (s * 1e6 for s in measure.spread(contender.host_seconds))
                rows.append({
                    "tensors": count, "run": contender.label, "kind": contender.kind,
                    "backend": contender.backend, "rounds": len(contender.host_seconds),
                    "inner": contender.inner,
                    "times_us": [s * 1e6 for s in contender.host_seconds],
                    "min_us": low, "median_us": mid, "max_us": high,
                    "ratio_vs_adamw": mid / (anchor * 1e6)})
        finally:
            del contenders
            release(device)
    counts = sorted(set(args.host_tensors))
    runs = list(dict.fromkeys(row["run"] for row in rows))
    for run in runs:
        medians = {row["tensors"]: row for row in rows if row["run"] == run}
        for low, high in zip(counts, counts[1:]):
            if low in medians and high in medians:
                slopes.append({
                    "run": run, "kind": medians[low]["kind"], "backend": medians[low]["backend"],
                    "from_tensors": low, "to_tensors": high,
                    "us_per_tensor": (medians[high]["median_us"] - medians[low]["median_us"])
                    / (high - low)})
    return {"dtype": dtype_name(dtype), "tensors": args.host_tensors, "elements_per_tensor": 1,
            "rounds": args.host_rounds, "method": HOST_METHOD.get(device.type, HOST_METHOD["cpu"]),
            "rows": rows, "slopes": slopes}


def config_rows(contenders, size, dtype, shape, shapes, copy_gbs, host_ms) -> list:
    """The rows of one configuration (``size`` requested, the shapes' count timed)."""
    p = dtype_bytes(dtype)
    numel = sum(math.prod(s) for s in shapes)
    by_kind = {c.kind: c for c in contenders}
    anchor = by_kind.get("adamw_fused") or by_kind.get("adamw_foreach")
    anchor_ms = statistics.median(anchor.seconds) * 1e3 if anchor else None
    ivon_opt = by_kind.get("ivon_opt_iteration")
    ivon_opt_ms = statistics.median(ivon_opt.seconds) * 1e3 if ivon_opt else None
    copy, noise = by_kind.get("copy"), by_kind.get("noise")
    copy_ms = statistics.median(copy.seconds) * 1e3 if copy else None
    draw_ms = statistics.median(noise.seconds) * 1e3 * noise.scale if noise else None
    probe_bytes = bytes_per_element(FLOOR_KIND, p)       # what the copy probe moved per element
    unchecked = {c.backend: c for c in contenders if c.kind == "drop_in_step_unchecked"}
    fp32_state = {c.backend: c for c in contenders if c.kind == "drop_in_step"}
    rows = []
    for contender in contenders:
        if contender.is_probe:
            continue
        low, mid, high = (s * 1e3 for s in measure.spread(contender.seconds))
        element_bytes = bytes_per_element(contender.kind, p)
        gbs = element_bytes * numel / (mid / 1e3) / 1e9
        if contender.host_seconds:
            host = statistics.median(contender.host_seconds) * 1e3
        else:
            host = host_ms.get(contender.label)
        floor_ms = floor_memory = floor_overlap = None
        if copy_ms is not None and contender.kind in DRAWS:
            floor_memory = copy_ms * element_bytes / probe_bytes
            draws = DRAWS[contender.kind]
            if draws == 0 or draw_ms is not None:
                floor_ms = floor_memory + draws * (draw_ms or 0.0)
                floor_overlap = max(floor_memory, draws * (draw_ms or 0.0))
        rows.append({
            "dtype": dtype_name(dtype), "shape": shape, "shape_desc": describe(shape, shapes),
            "tensors": len(shapes), "size": size, "numel": numel,
            "run": contender.label, "kind": contender.kind, "backend": contender.backend,
            "state_dtype": (dtype_name(state_dtype_of(contender.kind))
                            if contender.kind in IVON_KINDS else None),
            "rounds": len(contender.seconds), "times_ms": [s * 1e3 for s in contender.seconds],
            "min_ms": low, "median_ms": mid, "max_ms": high, "host_ms": host,
            "bytes_per_element": element_bytes, "gbs": gbs,
            "copy_pct": 100 * gbs / copy_gbs if copy_gbs else None,
            "ratio_vs_adamw": mid / anchor_ms if anchor_ms else None,
            "speedup_vs_ivon_opt": (ivon_opt_ms / mid if ivon_opt_ms and contender.kind
                                    == "official_iteration" else None),
            "byte_floor_ratio": probe_bytes / bytes_per_element("adamw_fused", p),
            "byte_floor_ratio_checked": (bytes_per_element("drop_in_step", p)
                                         / bytes_per_element("adamw_fused", p)),
            "byte_floor_ratio_bf16_state": (bytes_per_element("drop_in_step_bf16_state", p)
                                            / bytes_per_element("adamw_fused", p)),
            **check_cost(contender, unchecked.get(contender.backend)),
            **state_cost(contender, fp32_state.get(contender.backend)),
            "floor_ms": floor_ms, "floor_memory_ms": floor_memory, "floor_draw_ms": draw_ms,
            "floor_draws": DRAWS.get(contender.kind), "floor_overlap_ms": floor_overlap,
            "floor_ratio": mid / floor_ms if floor_ms else None,
        })
    return rows


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or (
        "can't allocate" in text)


class Progress:
    """A tqdm bar on a terminal, else one line per configuration on stderr; nothing when not
    ``enabled``."""

    def __init__(self, total: int, enabled: bool, notes: list):
        self.bar, self.done, self.total, self.started = None, 0, total, time.time()
        self.enabled = enabled
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            notes.append("tqdm is not installed: no progress bar (pip install -e '.[bench]')")
            print("# " + notes[-1], file=sys.stderr)
            return
        if sys.stderr.isatty():
            self.bar = tqdm(total=total, unit="round", file=sys.stderr, dynamic_ncols=True)

    def config(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)
        elif self.enabled:
            print(f"# [{time.time() - self.started:6.1f} s] {text}", file=sys.stderr, flush=True)

    def advance(self, count: int = 1) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["cpu"] = cpu_model
    try:
        from ivon_fast import cpp_backend
        if cpp_backend.unavailable_reason("cpu") is None:
            info["cpu_kernels"] = cpp_backend.cpu_isa()
    except Exception:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gb=props.total_memory / 2**30,
                    capability=f"{props.major}.{props.minor}")
    else:
        info["name"] = cpu_model
    return info


def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__,
             "cuda": torch.version.cuda, "ivon_fast": ivon_fast.__version__,
             "ivon-opt": ivon_opt_version(), "platform": platform.platform()}
    for package in ("triton", "tqdm", "matplotlib"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def default_sizes(device: torch.device, quick: bool) -> str:
    if quick:
        return "64K,256K"
    return "1M,4M,16M,64M,256M" if device.type == "cuda" else "1M,4M,16M"


def sweep(plan, device, args, names_of, copy, progress, rows, host_tables, notes,
          bf16_of=None) -> None:
    """Time every (dtype, shape, size) of ``plan``, appending to ``rows``. ``bf16_of``: per
    dtype, the backends that also time the drop-in step with bf16 state."""
    for index, (dtype, shape, numel) in enumerate(plan):
        shapes = param_shapes(shape, numel, args.tensors)
        names = names_of[dtype]
        bf16_names = (bf16_of or {}).get(dtype, [])
        label = f"{dtype_name(dtype)} {shape} {report._size(numel)}"
        if device.type == "cpu" and (dtype, shape) not in host_tables:
            progress.config(f"{dtype_name(dtype)} {shape}: host time")
            host_tables[(dtype, shape)] = host_table_cpu(
                len(shapes), device, dtype, args, names,
                [n for d, s, n in plan if (d, s) == (dtype, shape)], bf16_names)
            progress.advance()
            release(device)
        progress.config(f"[{index + 1}/{len(plan)}] {label}")
        contenders, rounds_done = [], [0]

        def on_round():
            rounds_done[0] += 1
            progress.advance()
        try:
            contenders = build_contenders(shapes, device, dtype, numel, args, names, notes,
                                          bf16_names)
            measure.run_rounds(contenders, device, args.rounds, on_round=on_round)
            config = config_rows(contenders, numel, dtype, shape, shapes, copy["gbs_median"],
                                 host_tables.get((dtype, shape), {}))
            if args.memory:
                for row, contender in zip(config, [c for c in contenders if not c.is_probe]):
                    row["memory"] = measure.memory_of(contender, device, row["numel"])
            rows += config
        except Exception as error:  # noqa: BLE001 - one configuration must not end the sweep
            if not is_oom(error):
                raise
            notes.append(f"{label}: out of memory ({str(error).splitlines()[0]})")
            progress.advance(args.rounds - rounds_done[0])
        finally:
            del contenders
            release(device)


class Interrupted(BaseException):
    """SIGTERM (e.g. from `timeout`): stop the sweep, keep what was measured."""


def _on_sigterm(signum, frame):
    raise Interrupted()


def run(args) -> dict:
    """The whole sweep; returns the record (also what the JSON holds)."""
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtypes = [DTYPES[d.strip()] for d in args.dtype.split(",") if d.strip()]
    shapes_wanted = [s.strip() for s in args.shapes.split(",") if s.strip()]
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    notes: list = []
    if args.ivon_opt and ivon_opt_version() is None:
        notes.append("ivon-opt is not installed: no ivon-opt rows (pip install ivon-opt==0.1.3, "
                     "part of the test extra)")
        args.ivon_opt = False
    names_of = {dtype: kernel_backends(args, device, dtype, notes) for dtype in dtypes}
    bf16_of = {dtype: bf16_state_backends(args, device, dtype, names_of[dtype], notes)
               for dtype in dtypes}

    plan = []  # (dtype, shape, numel)
    if args.host_only:
        dtypes = []
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    for dtype in dtypes:
        for shape in shapes_wanted:
            for numel in sizes:
                need = footprint(numel, dtype, args, names_of[dtype], bf16_of[dtype])
                if free is not None and need > 0.9 * free:
                    notes.append(f"{dtype_name(dtype)} {shape} {report._size(numel)}: skipped, "
                                 f"needs about {need / 2**30:.0f} GiB of the "
                                 f"{free / 2**30:.0f} GiB free")
                    continue
                plan.append((dtype, shape, numel))
    for dtype in dtypes:  # bf16 state only in the reference, which these sizes leave out
        sizes_timed = [n for d, _, n in plan if d == dtype]
        if (bf16_of[dtype] == ["reference"] and sizes_timed
                and min(sizes_timed) > args.reference_max):
            notes.append(f"{dtype_name(dtype)}: no bf16-state rows: of the backends timed only "
                         f"the reference has bf16 state, timed up to --reference-max "
                         f"{report._size(args.reference_max)}")

    copy_numel = args.copy_size or (256 * 2**20 if device.type == "cuda"
                                    else (32 if args.quick else 64) * 2**20)
    copy = measure.copy_bandwidth(copy_numel, device, max(5, args.rounds))
    release(device)
    host_passes = {(d, s) for d, s, _ in plan} if device.type == "cpu" else set()
    host_dtype = DTYPES[args.dtype.split(",")[0].strip()]
    host_dtype = torch.float32 if torch.float32 in names_of else host_dtype
    host_rounds = len(args.host_tensors) * args.host_rounds
    progress = Progress(len(plan) * args.rounds + len(host_passes) + host_rounds, args.progress,
                        notes)
    rows, host_tables, interrupted, host = [], {}, False, None
    try:
        if args.host_tensors:  # first: short, and kept when a timeout stops the sweep
            host = host_cost(device, host_dtype, args, names_of[host_dtype], progress)
        sweep(plan, device, args, names_of, copy, progress, rows, host_tables, notes, bf16_of)
    except (KeyboardInterrupt, Interrupted) as stop:
        done = len({report.config_key(row) for row in rows})
        notes.append(f"interrupted ({type(stop).__name__}) after {done} of {len(plan)} "
                     "configurations: the record holds those")
        interrupted = True
    progress.close()
    argv = getattr(args, "argv", None)
    command = "python -m bench" + (" " + shlex.join(argv) if argv else "")
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "tool": "python -m bench", "command": command,
        "date": now.strftime("%Y-%m-%d %H:%M:%S UTC"), "stamp": now.strftime("%Y-%m-%d_%H%M%S"),
        "device": device_info(device), "versions": versions(),
        "args": {k: v for k, v in vars(args).items() if k != "argv"},
        "copy_bandwidth": copy, "notes": notes, "interrupted": interrupted,
        "methods": {"timing": measure.__doc__, "bench": __doc__}, "rows": rows,
        "host_cost": host,
    }


def main(argv=None) -> dict:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if cuda else "cpu",
                        help="cuda, cuda:N or cpu (default: cuda when available, else cpu)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: sizes 64K,256K, 3 rounds, no reference backend, files "
                             "into a temporary folder unless --out (explicit options win)")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated param counts; K, M, G are powers of 10 (default: "
                             "1M,4M,16M on CPU, 1M,4M,16M,64M,256M on CUDA, skipping what does "
                             "not fit in free memory)")
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help=f"comma-separated, of {', '.join(SHAPES)} (default: both)")
    parser.add_argument("--tensors", type=int, default=4, help="tensors of the few-large shape")
    parser.add_argument("--dtype", default="float32,bfloat16",
                        help="comma-separated param dtypes: float32, bfloat16, float16 "
                             "(default: float32,bfloat16)")
    parser.add_argument("--rounds", "--repeats", dest="rounds", type=int, default=None,
                        help="timed rounds (default 25 on CUDA, 9 on CPU, 3 with --quick)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated ivon_fast backends (default: those available; "
                             "not triton on CPU)")
    parser.add_argument("--state-dtypes", default="float32,bfloat16",
                        help="comma-separated ivon_fast state dtypes (momentum and hess): "
                             "float32 (the drop-in steps and the official iteration), bfloat16 "
                             "(the drop-in step with bf16 state, where a backend implements it) "
                             "(default: float32,bfloat16)")
    parser.add_argument("--no-foreach", dest="foreach", action="store_false",
                        help="leave out AdamW(foreach=True)")
    parser.add_argument("--no-ivon-opt", dest="ivon_opt", action="store_false",
                        help="leave out ivon-opt")
    parser.add_argument("--ivon-opt-max", type=parse_size, default=parse_size("64M"),
                        help="largest size ivon-opt is timed at (default 64M)")
    parser.add_argument("--reference-max", type=parse_size, default=None,
                        help="largest size the reference backend is timed at (default 2M; "
                             "--quick: none)")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the memory figures")
    parser.add_argument("--no-floor", dest="floor", action="store_false",
                        help="skip the CPU floor's copy and noise probes")
    parser.add_argument("--copy-size", type=parse_size, default=None,
                        help="fp32 elements of the copy-bandwidth probe (default 2^26 on CPU, "
                             "2^25 with --quick, 2^28 on CUDA)")
    parser.add_argument("--host-tensors", default=None,
                        help="comma-separated tensor counts of the host-cost section (default "
                             "30,300,3000; --quick: 300)")
    parser.add_argument("--host-rounds", type=int, default=None,
                        help="rounds of the host-cost section (default 15; --quick: 5)")
    parser.add_argument("--no-host", dest="host", action="store_false",
                        help="skip the host-cost section")
    parser.add_argument("--host-only", action="store_true",
                        help="only the host-cost section (and the copy bandwidth), no sweep")
    parser.add_argument("--out", default=None,
                        help="folder for the JSON and PNG (default bench/results/; --quick: a "
                             "new temporary folder)")
    parser.add_argument("--json", default=None, help="JSON path (default: in --out)")
    parser.add_argument("--plot", default=None, help="PNG path (default: next to the JSON)")
    parser.add_argument("--no-save", dest="save", action="store_false",
                        help="write no files")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    if args.sizes is None:
        args.sizes = default_sizes(device, args.quick)
    if args.rounds is None:
        args.rounds = 3 if args.quick else (25 if device.type == "cuda" else 9)
    if args.host_tensors is None:
        args.host_tensors = "300" if args.quick else "30,300,3000"
    args.host_tensors = sorted({int(parse_size(n)) for n in args.host_tensors.split(",")
                                if n.strip()}) if args.host else []
    if args.host_rounds is None:
        args.host_rounds = 5 if args.quick else 15
    if args.reference_max is None:  # the reference is the spec, not a fast path: slow to time
        args.reference_max = 0 if args.quick else parse_size("2M")
    bad = [d for d in args.dtype.split(",") if d.strip() and d.strip() not in DTYPES]
    if bad:
        parser.error(f"--dtype: unknown {bad}; use float32, bfloat16, float16")
    bad = [d for d in args.state_dtypes.split(",") if d.strip() and d.strip() not in STATE_DTYPES]
    if bad or not args.state_dtypes.strip(", "):
        parser.error(f"--state-dtypes: {f'unknown {bad}' if bad else 'none given'}; use float32, "
                     "bfloat16 or both")
    bad = [s for s in args.shapes.split(",") if s.strip() and s.strip() not in SHAPES]
    if bad:
        parser.error(f"--shapes: unknown {bad}; use {', '.join(SHAPES)}")

    signal.signal(signal.SIGTERM, _on_sigterm)
    record = run(args)
    print(f"# ivon_fast {ivon_fast.__version__} | torch {torch.__version__} | {device.type}: "
          f"{record['device']['name']} | {record['device']['threads']} threads | "
          f"copy {record['copy_bandwidth']['gbs_median']:.1f} GB/s "
          f"(min {record['copy_bandwidth']['gbs_min']:.1f}, max "
          f"{record['copy_bandwidth']['gbs_max']:.1f}) | {record['date']}")
    report.print_table(record)
    report.print_memory_table(record)
    report.print_host_table(record)
    for note in record["notes"]:
        print(f"# note: {note}")
    if args.save:
        out = args.out or (tempfile.mkdtemp(prefix="ivon_bench_") if args.quick else RESULTS_DIR)
        stem = f"bench_{record['stamp']}_{device.type}" + ("_quick" if args.quick else "")
        json_path = args.json or os.path.join(out, stem + ".json")
        plot_path = args.plot or os.path.splitext(json_path)[0] + ".png"
        report.write_json(record, json_path)
        print(f"# results: {json_path}")
        if record["rows"]:
            problem = report.plot(record, plot_path)
            print(f"# {problem}" if problem else f"# plot: {plot_path}")
        if record.get("host_cost"):
            host_path = os.path.splitext(plot_path)[0] + "_host.png"
            problem = report.plot_host(record, host_path)
            print(f"# {problem}" if problem else f"# host-cost plot: {host_path}")
    report.print_short_table([record])
    return record


if __name__ == "__main__":
    sys.exit(1 if main()["interrupted"] else 0)
