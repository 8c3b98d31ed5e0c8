"""Microbenchmark: ivon_fast against torch.optim.AdamW and ivon-opt, per backend, size and shape.

    python -m bench                     # the default sweep, sized to the device (cuda, else cpu)
    python -m bench --quick             # smoke test (tiny sizes, 3 rounds; files in a temp folder)
    python -m bench --full              # the long sweep: every step kind, bf16 params too, and
                                        # the reference backend (minutes on a CPU)
    python -m bench --reference         # add the reference backend (up to --reference-max)
    python -m bench --record            # keep the results in bench/results/ (date and device in
                                        # the file names); without it they go to bench/out/
    python -m bench --sizes 16M,64M --shapes gpt2 --dtype bfloat16 --backends triton
    python -m bench --kinds drop_in_step,drop_in_step_bf16_state   # pick the IVON step kinds
    python -m bench --host-only         # only the host cost against the tensor count

The default sweep. On a CPU (about a minute on 2 cores): fp32 params, both model shapes, 1M, 4M
and 16M params, the contenders users compare: AdamW(fused=True), AdamW(foreach=True), the C++
kernel's drop-in step and official iteration, and ivon-opt's official iteration. On a GPU (a few
minutes): fp32 and bf16 params, both shapes, 1M to 256M params (the GPU targets are judged at
>= 64M), every step kind of every GPU backend, and ivon-opt up to 64M. It says first what it will
time and about how long that takes (an estimate from the byte model below and the copy bandwidth
it measures first), and at the end how long it took.

Noise. Around each configuration's rounds the copy bandwidth is measured again (before and
after), and on a CPU the share of the machine's CPU time other processes took meanwhile; a row
whose copy bandwidth moved by more than 15%, whose rounds' interquartile range exceeds 10% of
their median, or (CPU) during whose rounds other processes took more than 25% of the CPU time
(bench/measure.py: ``BANDWIDTH_DRIFT_MAX``, ``SPREAD_MAX``, ``OTHERS_CPU_MAX``) was measured on a
busy machine: its configuration is measured again (--retries, default 2, while the retries cost
less than half the estimate), and a row still noisy is marked: "~" before its ratios and a
``noisy`` column in the tables, ``"noisy": true`` with the reasons and the numbers in the JSON,
hollow markers in the plots, and a closing warning that lists them. Host times are judged the
same way (their spread and the CPU share), and a per-tensor host cost below its own noise is
printed as such, never as a negative number.

What is timed, like for like, in one process on one device (for every available backend; Triton
only on GPUs, where it is not the interpreter; the reference backend with --reference or --full,
up to --reference-max; the step kinds of --kinds):
  * the drop-in step, ``IVON(..., resample_on_step=True, skip_nonfinite=True).step()`` (the
    update fused with drawing the next sample, after the on-device check of the gradients for
    inf / NaN, docs/DESIGN.md section 11), against ``AdamW(fused=True).step()`` (the anchor of
    every ratio) and ``AdamW(foreach=True).step()``;
  * the same drop-in step with ``skip_nonfinite=False`` ("no finite check"): the check's cost is
    the checked step's median over this one's ("x unchecked"; the JSON also keeps the median of
    the two's ratios round by round);
  * the same drop-in step (checked) with ``state_dtype=torch.bfloat16`` ("bf16 state",
    docs/DESIGN.md section 16: bf16 momentum and Hessian, fp32 mean; 8 bytes of state per param,
    AdamW's size, against 12), for each backend timed (every backend implements bf16 state);
    ``--state-dtypes`` picks the state dtypes
    timed (default float32,bfloat16: both). The JSON also keeps its median over the fp32-state
    drop-in step's ("x fp32 state", and the median of the two's ratios round by round). Its
    target (on a GPU at >= 64M fp32 params): <= 0.95x AdamW(fused=True), with state memory
    equal to AdamW's; the summary's "# target" lines check it;
  * the official iteration, ``with opt.sampled_params(train=True): ...; opt.step()`` (sample,
    restore, update; ``skip_nonfinite=True``), against ivon-opt 0.1.3's official iteration (up to
    --ivon-opt-max).
``skip_nonfinite`` is always passed explicitly, whatever the optimizer's default. The gradients
are set once and never recomputed: only the optimizer is timed.

Sizes are param counts (K, M, G: powers of 10), in two model shapes (bench/shapes.py):
``few-large`` (--tensors equal 1-D tensors) and ``gpt2`` (GPT-2 small's 148 tensors scaled to the
size); ``--shapes odd-group`` adds few-large after a 3-element param group (its bucket starts at
an odd offset: issue 19's lead pad). Params are fp32, bf16 or fp16 (--dtype; ivon_fast keeps an
fp32 mean and fp32 momentum and Hessian, or bf16 ones in the bf16-state rows; AdamW and ivon-opt
keep their state in the params' dtype).

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
unchecked drop-in step and the official iteration, fp32 state (those of --kinds; the reference
backend up to --reference-max tensors); alternated rounds (--host-rounds), min / median / max microseconds per
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
command, every row, the noise verdicts, the estimate and the time taken) and two PNG plots
(matplotlib): *_time.png, time against size per contender, and *_ratio.png, the ratio to
AdamW(fused=True) with its spread; in bench/out/ (ignored by git; --quick: a temporary folder),
bench/results/ with --record, or --out. tqdm and matplotlib come with the ``bench`` extra
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
from bench.shapes import DEFAULT_SHAPES, SHAPES, describe, param_groups, param_shapes

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")   # tracked: --record writes here
OUT_DIR = os.path.join(HERE, "out")           # ignored by git: the default
# the IVON step kinds the default CPU sweep times (--kinds; --quick, --full and GPUs: all)
CPU_DEFAULT_KINDS = ("drop_in_step", "official_iteration")
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


def wanted_kinds(args) -> list:
    """The IVON kinds of --kinds (default: all of ``IVON_KINDS``)."""
    text = getattr(args, "kinds", None)
    if not text:
        return list(IVON_KINDS)
    return [kind for kind in IVON_KINDS if kind in {k.strip() for k in text.split(",")}]


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
    optimizer = ivon_fast.IVON(param_groups(shapes, params), lr=1e-3, ess=1e6, backend=backend,
                               seed=1234, resample_on_step=resample,
                               skip_nonfinite=skip_nonfinite, **options)
    with torch.no_grad():
        for param, grad in zip(params, grads):  # the grads are views into the flat buffer now
            param.grad.copy_(grad)
    del grads
    label = f"ivon_fast[{backend}] {what}"
    if resample:
        return Contender(label, mode, measure.drop_in_step_call(optimizer, params),
                         backend=backend, optimizer=optimizer, params=params)

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
    else:  # the backends that can serve this device (Triton on CPU is the interpreter: no perf;
        # the reference, the specification in plain torch, only with --reference: it is slow)
        wanted = ["cuda", "triton"] if device.type == "cuda" else [device.type]
        if getattr(args, "reference", False):
            wanted.append("reference")

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


def bf16_state_backends(args, names: list) -> list:
    """Those of ``names`` that time the drop-in step with bf16 state: all of them (every backend
    implements it), none when --state-dtypes leaves bfloat16 out."""
    return list(names) if torch.bfloat16 in wanted_state_dtypes(args) else []


def ivon_kinds(args, name: str, bf16_names=()) -> list:
    """The IVON kinds timed for backend ``name``: the fp32-state ones when --state-dtypes has
    float32, the bf16-state drop-in step when it has bfloat16 and ``name`` is in
    ``bf16_names``."""
    wanted, kinds = wanted_state_dtypes(args), wanted_kinds(args)
    return [kind for kind in kinds if state_dtype_of(kind) in wanted
            and (state_dtype_of(kind) == torch.float32 or name in bf16_names)]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def planned_contenders(numel: int, device: torch.device, args, names: list,
                       bf16_names=()) -> list:
    """The (kind, backend) of every contender one configuration of ``numel`` params times, in
    order: the AdamWs, the IVON kinds per backend, ivon-opt, and on CPU the floor's probes."""
    planned = [("adamw_fused", None)] + ([("adamw_foreach", None)] if args.foreach else [])
    for name in names:
        if name == "reference" and numel > args.reference_max:
            continue
        planned += [(kind, name) for kind in ivon_kinds(args, name, bf16_names)]
    if args.ivon_opt and numel <= args.ivon_opt_max:
        planned.append(("ivon_opt_iteration", None))
    if device.type == "cpu" and args.floor:
        planned += [("copy", None), ("noise", None)]
    return planned


def build_contenders(shapes, device, dtype, numel, args, names, notes, bf16_names=()) -> list:
    """Every contender of one configuration (``planned_contenders``); the CPU floor's probes
    last. ``bf16_names``: the backends of ``names`` that also time the drop-in step with bf16
    state."""
    contenders = []
    slow_rounds = max(2, args.rounds // 3)
    for kind, backend in planned_contenders(numel, device, args, names, bf16_names):
        if kind.startswith("adamw_"):
            mode = kind.split("_", 1)[1]
            try:
                contenders.append(adamw_contender(shapes, device, dtype, mode))
            except (RuntimeError, ValueError) as error:
                if is_oom(error):
                    raise
                note = f"AdamW({mode}=True) on {device.type} {dtype_name(dtype)}: {error}"
                if note not in notes:
                    notes.append(note)
        elif kind in IVON_KINDS:
            contender = ivon_fast_contender(shapes, device, dtype, backend, kind)
            if backend == "reference":  # the spec in plain torch: 50x to 200x AdamW on CPU
                contender.max_rounds, contender.warmup = 2, 1
            contenders.append(contender)
        elif kind == "ivon_opt_iteration":
            contender = ivon_opt_contender(shapes, device, dtype)
            contender.max_rounds, contender.warmup = slow_rounds, 1
            contenders.append(contender)
        elif kind == "copy":
            count = sum(math.prod(s) for s in shapes)
            moved = bytes_per_element(FLOOR_KIND, dtype_bytes(dtype)) * count
            contenders.append(measure.copy_probe(moved, device))
        elif kind == "noise":
            noise = measure.noise_probe(sum(math.prod(s) for s in shapes),
                                        torch.get_num_threads())
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


# ------------------------------------------------------------------------------ the estimate

# The time estimate (``estimate``) models one call of a contender as PACE times the time its bytes
# (the byte model above) take to copy at the copy bandwidth measured at the start, plus
# PER_TENSOR_US per tensor and CALL_US per call. PACE from quiet runs: on a 2-core VM the IVON
# kernels are compute-bound (about 2x their bytes' copy time; the noise's share falls with more
# cores, so the excess over 1 is scaled by 2 / threads), ivon-opt takes 15x to 25x, the reference
# 100x to 200x; on a GPU the fused kernels reach most of the copy bandwidth.
PACE = {
    "cpu": {"adamw_fused": 1.0, "adamw_foreach": 2.5, "drop_in_step": 2.2,
            "drop_in_step_unchecked": 2.0, "drop_in_step_bf16_state": 3.0,
            "official_iteration": 1.8, "ivon_opt_iteration": 20.0, "reference": 150.0,
            "copy": 1.0},
    "cuda": {"adamw_fused": 1.3, "adamw_foreach": 2.0, "drop_in_step": 1.3,
             "drop_in_step_unchecked": 1.3, "drop_in_step_bf16_state": 1.4,
             "official_iteration": 1.5, "ivon_opt_iteration": 4.0, "reference": 10.0,
             "copy": 1.0},
}
PER_TENSOR_US = {
    "cpu": {"adamw_fused": 15, "adamw_foreach": 50, "ivon": 8, "official_iteration": 12,
            "ivon_opt_iteration": 40, "reference": 1000},
    "cuda": {"adamw_fused": 3, "adamw_foreach": 5, "ivon": 5, "official_iteration": 10,
             "ivon_opt_iteration": 40, "reference": 150},
}
CALL_US = {"cpu": 20.0, "cuda": 40.0}
# building a contender: random params and grads, then AdamW's first step or ivon_fast's flat
# buffers, state and first sample (ns per param, ivon_fast / the others), and per tensor
BUILD_NS_PER_PARAM = {"cpu": (65.0, 40.0), "cuda": (0.5, 0.3)}
BUILD_US_PER_TENSOR = 30.0
MEMORY_FIGURE_S = 0.03                            # the profiler around the memory figures' call
FIRST_USE_S = {"triton": 3.0, "cuda": 0.3}        # per (backend, kind, dtype): compiling, JIT
DRAW_NS_PER_PARAM = 2.1                           # one noise draw, one core (the CPU floor's probe)
REPORT_S = 4.0                                    # tables, JSON and plots at the end


def _call_seconds(kind: str, backend, numel: int, tensors: int, dtype: torch.dtype,
                  device_type: str, copy_gbs: float, threads: int) -> float:
    """The estimate of one call of contender (``kind``, ``backend``)."""
    place = "cuda" if device_type == "cuda" else "cpu"
    p = dtype_bytes(dtype)
    if kind == "noise":
        return DRAW_NS_PER_PARAM * numel / max(1, threads) * 1e-9
    moved = (bytes_per_element(FLOOR_KIND, p) if kind == "copy" else
             bytes_per_element(kind, p)) * numel
    pace = PACE[place]["reference" if backend == "reference" else kind]
    if place == "cpu":
        pace = 1 + (pace - 1) * min(1.0, 2 / max(1, threads))
    per_tensor = PER_TENSOR_US[place]
    tensor_us = (0.0 if kind == "copy" else per_tensor.get(
        "reference" if backend == "reference" else kind, per_tensor["ivon"]))
    return pace * moved / (copy_gbs * 1e9) + (CALL_US[place] + tensor_us * tensors) * 1e-6


CALIBRATION = ("gpt2", 256_000)  # the test step: fused AdamW over GPT-2's 148 tensors, 256K params


def calibrate(device: torch.device, copy_gbs: float, threads: int) -> dict:
    """How much slower than the estimate's model this machine runs now: one fused AdamW step
    over ``CALIBRATION``'s params (per-call, per-tensor and per-byte costs together), its median
    over 7 calls against ``_call_seconds``' prediction (clamped to 1..20: the model is a quiet
    machine's, and a small step can beat it from the cache). A copy bandwidth already lowered by
    a busy machine is in the prediction, so only the rest shows here."""
    shape, numel = CALIBRATION
    shapes = param_shapes(shape, numel)
    contender = adamw_contender(shapes, device, torch.float32)
    measure.run_rounds([contender], device, 7)
    count = sum(math.prod(s) for s in shapes)
    predicted = _call_seconds("adamw_fused", None, count, len(shapes), torch.float32,
                              device.type, copy_gbs, threads)
    measured = statistics.median(contender.seconds)
    del contender
    return {"test_step_s": measured, "predicted_s": predicted,
            "scale": min(20.0, max(1.0, measured / predicted))}


def estimate(plan: list, device: torch.device, args, names_of: dict, bf16_of: dict,
             copy_gbs: float, threads: int | None = None, scale: float = 1.0) -> dict:
    """About how long the run of ``plan`` takes after the first copy-bandwidth measurement, in
    seconds: every configuration's rounds (warm-up, timed rounds, the memory figures' calls, the
    copy-bandwidth readings around them), building its contenders, the host-cost section, and
    the report; all of it times ``scale`` (``calibrate``: 1 on a machine as fast as the model).
    Retries of noisy configurations come on top (``retry_budget``)."""
    threads = threads or torch.get_num_threads()
    place = "cuda" if device.type == "cuda" else "cpu"
    total_rounds = args.rounds
    configs, seen_first, host_tables = [], set(), set()
    probe_numel = bandwidth_probe_numel(args, device)
    probe_s = 2 * 6 * 8 * probe_numel / (copy_gbs * 1e9)
    for dtype, shape, numel in plan:
        shapes = param_shapes(shape, numel, args.tensors)
        count, tensors = sum(math.prod(s) for s in shapes), len(shapes)
        seconds = probe_s
        planned = planned_contenders(numel, device, args, names_of[dtype], bf16_of[dtype])
        for kind, backend in planned:
            call = _call_seconds(kind, backend, count, tensors, dtype, device.type, copy_gbs,
                                 threads)
            if backend == "reference":
                calls = 1 + min(2, total_rounds)
            elif kind == "ivon_opt_iteration":
                calls = 1 + min(max(2, total_rounds // 3), total_rounds)
            else:
                calls = 2 + total_rounds
            if args.memory and kind not in ("copy", "noise"):
                calls += 2 if place == "cpu" else 1
                seconds += MEMORY_FIGURE_S
            seconds += calls * call
            if kind not in ("copy", "noise"):
                build = BUILD_NS_PER_PARAM[place][0 if kind in IVON_KINDS else 1]
                seconds += build * count * 1e-9 + BUILD_US_PER_TENSOR * tensors * 1e-6
                if (kind, backend, dtype) not in seen_first and place == "cuda":
                    seen_first.add((kind, backend, dtype))
                    seconds += FIRST_USE_S.get(backend, 0.0)
        if place == "cpu" and (dtype, shape) not in host_tables:  # the per-shape host column
            host_tables.add((dtype, shape))
            inner = 5 if args.quick else 20
            for kind, backend in planned:
                if kind in ("copy", "noise"):
                    continue
                call = _call_seconds(kind, backend, tensors, tensors, dtype, device.type,
                                     copy_gbs, threads)
                seconds += (3 + max(3, args.rounds) * inner) * call
        configs.append(((dtype, shape, numel), seconds))
    host = 0.0
    host_dtype = host_dtype_of(args, names_of)
    for count in args.host_tensors:
        kinds = [("adamw_fused", None)] + [
            (kind, name) for name in names_of.get(host_dtype, [])
            if name != "reference" or count <= args.reference_max
            for kind in host_kinds(args)]
        for kind, backend in kinds:
            call = _call_seconds(kind, backend, count, count, host_dtype, device.type, copy_gbs,
                                 threads)
            inner = max(1, min(50, math.ceil(2e-3 / call)))
            host += BUILD_US_PER_TENSOR * count * 1e-6 + 6 * call
            host += args.host_rounds * inner * call
    sweep_s = scale * sum(seconds for _, seconds in configs)
    host *= scale
    return {"seconds": sweep_s + host + (REPORT_S if args.save else 0.0), "sweep_s": sweep_s,
            "host_s": host, "copy_gbs": copy_gbs, "threads": threads, "scale": scale,
            "configs": [{"dtype": dtype_name(d), "shape": sh, "size": n,
                         "seconds": scale * sec} for (d, sh, n), sec in configs]}


def host_dtype_of(args, names_of: dict) -> torch.dtype:
    """The param dtype of the host-cost section: float32 if timed, else the first of --dtype."""
    return torch.float32 if torch.float32 in names_of else DTYPES[args.dtype.split(",")[0].strip()]


def retry_budget(estimated: float) -> float:
    """Seconds the retries of noisy configurations may take in all."""
    return max(measure.RETRY_MIN_SECONDS, measure.RETRY_TIME_SHARE * estimated)


def bandwidth_probe_numel(args, device: torch.device) -> int:
    """fp32 elements of the copy-bandwidth reading around each configuration: a quarter of the
    start's probe (--copy-size), at most 2^24 on a CPU (64 MB: past its last-level cache) and
    2^26 on a GPU; it only has to compare the machine before and after."""
    cap = 2**26 if device.type == "cuda" else 2**24
    return max(1, min(cap, args.copy_numel // 4))


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


def host_kinds(args) -> list:
    """The IVON kinds of the host-cost section: those of --kinds with fp32 state (bf16 state runs
    the same Python)."""
    return [kind for kind in wanted_kinds(args) if state_dtype_of(kind) == torch.float32]


def host_cost_contenders(count: int, device, dtype, args, names) -> list:
    """The host-cost section's contenders at ``count`` one-element tensors: AdamW(fused=True)
    and, per backend, the IVON kinds of ``host_kinds`` (by default the checked and unchecked
    drop-in step and the official iteration)."""
    shapes = [(1,)] * count
    contenders = [adamw_contender(shapes, device, dtype, "fused")]
    for name in names:
        if name == "reference" and count > args.reference_max:
            continue
        contenders += [ivon_fast_contender(shapes, device, dtype, name, mode)
                       for mode in host_kinds(args)]
    for contender in contenders:
        contender.warmup = 3
    return contenders


def host_cost(device, dtype, args, names, progress, budget=None) -> dict:
    """The host-cost section: host microseconds of one step() against the tensor count, and the
    slope (microseconds per tensor) between consecutive counts. A tensor count whose rounds
    spread too widely (``measure.verdict``) is measured again, like a configuration of the
    sweep; a slope smaller than its own noise (the two medians' interquartile ranges) is
    reported as below the noise, never as a negative cost."""
    rows, slopes = [], []
    for count in args.host_tensors:
        progress.config(f"host cost: {count} tensors")
        contenders = host_cost_contenders(count, device, dtype, args, names)
        try:
            attempts = measure_attempts(
                contenders, args, budget, progress, f"host cost at {count} tensors",
                lambda on_round: measure.host_rounds(contenders, device, args.host_rounds,
                                                     on_round=on_round),
                host=True)
            anchor = statistics.median(contenders[0].host_seconds)
            for contender in contenders:
                low, mid, high = (s * 1e6 for s in measure.spread(contender.host_seconds))
                noise = attempts["verdicts"][contender.label]
                rows.append({
                    "tensors": count, "run": contender.label, "kind": contender.kind,
                    "backend": contender.backend, "rounds": len(contender.host_seconds),
                    "inner": contender.inner,
                    "times_us": [s * 1e6 for s in contender.host_seconds],
                    "min_us": low, "median_us": mid, "max_us": high,
                    "iqr_us": measure.iqr(contender.host_seconds) * 1e6,
                    "ratio_vs_adamw": mid / (anchor * 1e6),
                    "noisy": noise["noisy"],
                    "noise": {**noise, "attempts": attempts["attempts"]}})
        finally:
            del contenders
            release(device)
    counts = sorted(set(args.host_tensors))
    runs = list(dict.fromkeys(row["run"] for row in rows))
    for run in runs:
        medians = {row["tensors"]: row for row in rows if row["run"] == run}
        for low, high in zip(counts, counts[1:]):
            if low in medians and high in medians:
                slopes.append(host_slope(medians[low], medians[high]))
    return {"dtype": dtype_name(dtype), "tensors": args.host_tensors, "elements_per_tensor": 1,
            "rounds": args.host_rounds, "method": HOST_METHOD.get(device.type, HOST_METHOD["cpu"]),
            "rows": rows, "slopes": slopes}


def host_slope(low: dict, high: dict) -> dict:
    """Microseconds per tensor between two host-cost rows of one contender: the difference of
    the medians over the difference of the tensor counts. Its noise is the sum of the two rows'
    interquartile ranges (per tensor); a difference not above it (negative ones included) is
    "below the noise" (``below_noise``, and the tables print "<" the noise, not the value);
    ``us_per_tensor`` is never negative (clamped at 0; ``us_per_tensor_raw`` keeps the value)."""
    span = high["tensors"] - low["tensors"]
    raw = (high["median_us"] - low["median_us"]) / span
    noise = (low.get("iqr_us", 0.0) + high.get("iqr_us", 0.0)) / span
    below = raw <= noise
    return {"run": low["run"], "kind": low["kind"], "backend": low["backend"],
            "from_tensors": low["tensors"], "to_tensors": high["tensors"],
            "us_per_tensor": max(0.0, raw), "us_per_tensor_raw": raw,
            "us_per_tensor_noise": noise, "below_noise": below}


def paired_ratios(seconds: list, anchor: list) -> dict:
    """The ratio to the anchor round by round (the pair timed in the same round): quartiles
    and extremes, for the plots' error bars."""
    ratios = [s / a for s, a in zip(seconds, anchor) if a > 0]
    if not ratios:
        return {}
    if len(ratios) >= 2:
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    else:
        q1 = q3 = ratios[0]
    return {"ratio_min": min(ratios), "ratio_q1": q1, "ratio_q3": q3, "ratio_max": max(ratios)}


def row_noise(contender, anchor, attempts: dict | None) -> dict:
    """A row's noise verdict: its own (``measure.verdict`` of the kept attempt) and, as every
    ratio is taken against it, the anchor's."""
    if not attempts:
        return {"noisy": False, "noise": None}
    verdicts = attempts["verdicts"]
    own = verdicts.get(contender.label) or measure.verdict(contender.seconds)
    reasons = list(own["reasons"])
    anchor_verdict = verdicts.get(anchor.label) if anchor is not None else None
    if anchor is not contender and anchor_verdict and anchor_verdict["noisy"]:
        if any(r not in reasons for r in anchor_verdict["reasons"]):  # its own row says why
            reasons.append(f"its anchor, {anchor.label}, is noisy")
    return {"noisy": bool(reasons),
            "noise": {**own, "noisy": bool(reasons), "reasons": reasons,
                      "attempts": attempts["attempts"], "attempt_used": attempts["used"]}}


def config_rows(contenders, size, dtype, shape, shapes, copy_gbs, host_ms,
                attempts: dict | None = None) -> list:
    """The rows of one configuration (``size`` requested, the shapes' count timed);
    ``attempts``: what ``measure_attempts`` returned (the noise verdicts)."""
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
            **(paired_ratios(contender.seconds, anchor.seconds) if anchor else {}),
            **row_noise(contender, anchor, attempts),
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

    def extend(self, count: int) -> None:
        """``count`` more steps than planned (a noisy configuration measured again)."""
        self.total += count
        if self.bar is not None:
            self.bar.total += count
            self.bar.refresh()

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


def default_sizes(device: torch.device, quick: bool, full: bool = False) -> str:
    """The sizes of the sweep: tiny with --quick; on a GPU up to 256M (the GPU targets are
    judged at >= 64M; --full adds 4M); on a CPU 1M to 16M."""
    if quick:
        return "64K,256K"
    if device.type == "cuda":
        return "1M,4M,16M,64M,256M" if full else "1M,16M,64M,256M"
    return "1M,4M,16M"


def device_slug(info: dict) -> str:
    """The device in a file name: the GPU's name, or cpu, its model and thread count."""
    if info["type"] == "cuda":
        text = info.get("name", "cuda")
    else:
        model = " ".join(info.get("cpu", "").replace("(R)", "").replace("(TM)", "").split()[:3])
        text = f"cpu {model} {info.get('threads', '')}t"
    return "-".join("".join(c if c.isalnum() else " " for c in text.lower()).split()) or "device"


class RetryBudget:
    """The seconds that re-measuring noisy configurations may take in all (``retry_budget``)."""

    def __init__(self, seconds: float):
        self.seconds, self.spent, self.refused = seconds, 0.0, []

    def take(self, cost: float, what: str) -> bool:
        """Whether one more attempt costing about ``cost`` seconds fits; books it if so."""
        if self.spent + cost > self.seconds:
            self.refused.append(what)
            return False
        self.spent += cost
        return True


def measure_attempts(contenders: list, args, budget, progress, what: str, run_once,
                     host: bool = False, probe=None, cpu_bound: bool = True) -> dict:
    """Measure ``contenders`` with ``run_once(on_round)`` (their rounds), reading the copy
    bandwidth with ``probe`` before and after, and (``cpu_bound``: times taken on the CPU) the
    CPU time other processes took meanwhile; while some row is noisy (``measure.verdict`` of
    its rounds, ``host_seconds`` if ``host``), measure again, up to --retries times while
    ``budget`` allows. The steadiest attempt's times are kept in the contenders (``badness``:
    fewest noisy rows, then the smallest excess). Returns the attempts made, the kept attempt's
    verdicts per contender label and its bandwidth readings."""
    timed = [c for c in contenders if not c.is_probe]
    rounds = args.host_rounds if host else args.rounds
    tries = []
    for attempt in range(1 + max(0, args.retries)):
        if attempt:
            for contender in contenders:
                contender.seconds, contender.host_seconds = [], []
            progress.extend(rounds)
        started = time.perf_counter()
        before = probe.gbs() if probe is not None else None
        cpu_before = measure.cpu_snapshot() if cpu_bound else None
        run_once(progress.advance)
        others = measure.others_share(cpu_before, measure.cpu_snapshot()) if cpu_bound else None
        after = probe.gbs() if probe is not None else None
        took = time.perf_counter() - started
        verdicts = {c.label: measure.verdict(c.host_seconds if host else c.seconds, before, after,
                                             others=others)
                    for c in timed}
        tries.append((measure.badness(list(verdicts.values())), attempt,
                      [(list(c.seconds), list(c.host_seconds)) for c in contenders],
                      verdicts, before, after))
        if not any(v["noisy"] for v in verdicts.values()) or attempt == args.retries:
            break
        if budget is not None and not budget.take(took, what):
            break
        progress.config(f"{what}: noisy, measuring again ({attempt + 2} of {args.retries + 1})")
    _, used, times, verdicts, before, after = min(tries, key=lambda item: item[:2])
    for contender, (seconds, host_seconds) in zip(contenders, times):
        contender.seconds, contender.host_seconds = seconds, host_seconds
    return {"attempts": len(tries), "used": used + 1, "verdicts": verdicts,
            "bandwidth_before_gbs": before, "bandwidth_after_gbs": after}


def sweep(plan, device, args, names_of, copy, progress, rows, host_tables, notes,
          bf16_of=None, probe=None, budget=None) -> None:
    """Time every (dtype, shape, size) of ``plan``, appending to ``rows``. ``bf16_of``: per
    dtype, the backends that also time the drop-in step with bf16 state. ``probe``: the copy
    bandwidth read around each configuration's rounds; a noisy configuration is measured again
    (``measure_attempts``, within ``budget``)."""
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
            attempts = measure_attempts(
                contenders, args, budget, progress, label,
                lambda advance: measure.run_rounds(contenders, device, args.rounds,
                                                   on_round=on_round if advance else None),
                probe=probe, cpu_bound=device.type == "cpu")
            config = config_rows(contenders, numel, dtype, shape, shapes, copy["gbs_median"],
                                 host_tables.get((dtype, shape), {}), attempts)
            if args.memory:
                for row, contender in zip(config, [c for c in contenders if not c.is_probe]):
                    row["memory"] = measure.memory_of(contender, device, row["numel"])
            rows += config
        except Exception as error:  # noqa: BLE001 - one configuration must not end the sweep
            if not is_oom(error):
                raise
            notes.append(f"{label}: out of memory ({str(error).splitlines()[0]})")
            progress.advance(max(0, args.rounds - rounds_done[0]))
        finally:
            del contenders
            release(device)


class Interrupted(BaseException):
    """SIGTERM (e.g. from `timeout`): stop the sweep, keep what was measured."""


def _on_sigterm(signum, frame):
    raise Interrupted()


def plan_of(args, device: torch.device, notes: list) -> tuple:
    """The configurations to time, (dtype, shape, numel) each, and per dtype the backends timed
    and those that also time bf16 state: (plan, names_of, bf16_of)."""
    dtypes = [DTYPES[d.strip()] for d in args.dtype.split(",") if d.strip()]
    shapes_wanted = [s.strip() for s in args.shapes.split(",") if s.strip()]
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    names_of = {dtype: kernel_backends(args, device, dtype, notes) for dtype in dtypes}
    bf16_of = {dtype: bf16_state_backends(args, names_of[dtype]) for dtype in dtypes}
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
    return plan, names_of, bf16_of


def contender_names(plan: list, device: torch.device, args, names_of: dict,
                    bf16_of: dict) -> list:
    """The contenders of ``plan`` in words, each once, with the sizes it stops at."""
    seen: dict = {}
    largest = max((n for _, _, n in plan), default=0)
    for dtype, _, numel in plan:
        for kind, backend in planned_contenders(numel, device, args, names_of[dtype],
                                                bf16_of[dtype]):
            if kind in ("copy", "noise"):
                seen.setdefault("probes", "the CPU floor's copy and noise probes")
                continue
            if kind.startswith("adamw_"):
                name = f"AdamW({kind.split('_', 1)[1]}=True)"
            elif kind == "ivon_opt_iteration":
                name = "ivon-opt official iteration"
                if args.ivon_opt_max < largest:
                    name += f" (up to --ivon-opt-max {report._size(args.ivon_opt_max)})"
            else:
                name = f"ivon_fast[{backend}] {IVON_KINDS[kind][2]}"
                if backend == "reference" and args.reference_max < largest:
                    name += f" (up to --reference-max {report._size(args.reference_max)})"
            seen.setdefault((kind, backend), name)
    probes = seen.pop("probes", None)
    return list(seen.values()) + ([probes] if probes else [])


def plan_lines(plan: list, device: torch.device, args, names_of: dict, bf16_of: dict,
               estimated: dict, copy: dict) -> list:
    """What the run will time and about how long it takes, said before it starts."""
    lines = []
    threads = estimated["threads"]
    if plan:
        dtypes = list(dict.fromkeys(dtype_name(d) for d, _, _ in plan))
        shapes = list(dict.fromkeys(s for _, s, _ in plan))
        sizes = [report._size(n) for n in sorted({n for _, _, n in plan})]
        lines.append(f"# plan: {device.type} ({threads} threads): {', '.join(dtypes)} params; "
                     f"shapes {', '.join(shapes)}; sizes {', '.join(sizes)}: {len(plan)} "
                     f"configurations x {args.rounds} rounds")
        lines.append("# contenders: " + ", ".join(contender_names(plan, device, args, names_of,
                                                                   bf16_of)))
    if args.host_tensors:
        lines.append(f"# host cost: {', '.join(map(str, args.host_tensors))} one-element tensors "
                     f"x {args.host_rounds} rounds")
    retry = retry_budget(estimated["seconds"])
    scale = estimated.get("scale", 1.0)
    pace = (f", a test step {scale:.1f}x the model's time" if abs(scale - 1) > 0.25 else "")
    lines.append(f"# estimate: about {estimated['seconds']:.0f} s (the byte model at the copy "
                 f"bandwidth measured now, {copy['gbs_median']:.1f} GB/s{pace}); a configuration "
                 f"measured on a busy machine is measured again (--retries {args.retries}), for "
                 f"at most {retry:.0f} s more")
    others = estimated.get("cpu_others_at_start")
    if others is not None and others > measure.OTHERS_CPU_MAX:
        lines.append(f"# busy machine: other processes took {100 * others:.0f}% of its CPU time "
                     "while the copy bandwidth was measured; expect a longer run than estimated "
                     "and rows flagged as noisy")
    if not (args.full or args.quick):
        lines.append("# more: --full (every step kind, bf16 params, the reference backend), "
                     "--reference, --sizes, --kinds; python -m bench --help")
    return lines


def run(args) -> dict:
    """The whole sweep; returns the record (also what the JSON holds)."""
    started = getattr(args, "started", None) or time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    notes: list = []
    if args.ivon_opt and ivon_opt_version() is None:
        notes.append("ivon-opt is not installed: no ivon-opt rows (pip install ivon-opt==0.1.3, "
                     "part of the test extra)")
        args.ivon_opt = False
    plan, names_of, bf16_of = plan_of(args, device, notes)

    cpu_start = measure.cpu_snapshot()
    copy = measure.copy_bandwidth(args.copy_numel, device, max(5, args.rounds))
    release(device)
    threads = torch.get_num_threads()
    calibration = calibrate(device, copy["gbs_median"], threads)
    estimated = estimate(plan, device, args, names_of, bf16_of, copy["gbs_median"], threads,
                         calibration["scale"])
    estimated["calibration"] = calibration
    estimated["cpu_others_at_start"] = measure.others_share(cpu_start, measure.cpu_snapshot())
    for line in plan_lines(plan, device, args, names_of, bf16_of, estimated, copy):
        print(line, flush=True)
    budget = RetryBudget(retry_budget(estimated["seconds"]))
    probe = measure.BandwidthProbe(bandwidth_probe_numel(args, device), device) if plan else None
    host_passes = {(d, s) for d, s, _ in plan} if device.type == "cpu" else set()
    host_dtype = host_dtype_of(args, names_of)
    host_rounds = len(args.host_tensors) * args.host_rounds
    progress = Progress(len(plan) * args.rounds + len(host_passes) + host_rounds, args.progress,
                        notes)
    rows, host_tables, interrupted, host = [], {}, False, None
    try:
        if args.host_tensors:  # first: short, and kept when a timeout stops the sweep
            host = host_cost(device, host_dtype, args, names_of[host_dtype], progress, budget)
        sweep(plan, device, args, names_of, copy, progress, rows, host_tables, notes, bf16_of,
              probe, budget)
    except (KeyboardInterrupt, Interrupted) as stop:
        done = len({report.config_key(row) for row in rows})
        notes.append(f"interrupted ({type(stop).__name__}) after {done} of {len(plan)} "
                     "configurations: the record holds those")
        interrupted = True
    progress.close()
    del probe
    release(device)
    if budget.refused:
        notes.append(f"not measured again, the retries' time ({budget.seconds:.0f} s) being "
                     f"spent: {', '.join(budget.refused)}")
    argv = getattr(args, "argv", None)
    command = "python -m bench" + (" " + shlex.join(argv) if argv else "")
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "tool": "python -m bench", "command": command,
        "date": now.strftime("%Y-%m-%d %H:%M:%S UTC"), "stamp": now.strftime("%Y-%m-%d_%H%M%S"),
        "device": device_info(device), "versions": versions(),
        "args": {k: v for k, v in vars(args).items() if k not in ("argv", "started")},
        "copy_bandwidth": copy, "notes": notes, "interrupted": interrupted,
        "methods": {"timing": measure.__doc__, "bench": __doc__}, "rows": rows,
        "host_cost": host,
        "noise_limits": {"bandwidth_drift_max": measure.BANDWIDTH_DRIFT_MAX,
                         "spread_max": measure.SPREAD_MAX,
                         "cpu_others_max": measure.OTHERS_CPU_MAX,
                         "spread_min_rounds": measure.SPREAD_MIN_ROUNDS,
                         "retries": args.retries},
        "timing": {"estimate_s": estimated["seconds"], "estimate": estimated,
                   "retry_budget_s": budget.seconds, "retries_s": budget.spent,
                   "elapsed_s": time.perf_counter() - started},
    }


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, with the defaults that depend on the device and the mode filled in."""
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if cuda else "cpu",
                        help="cuda, cuda:N or cpu (default: cuda when available, else cpu)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: sizes 64K,256K, 3 rounds, every step kind, no reference "
                             "backend, files into a temporary folder unless --out or --record "
                             "(explicit options win)")
    parser.add_argument("--full", action="store_true",
                        help="the long sweep: every step kind, fp32 and bf16 params, the reference "
                             "backend up to --reference-max, 25 rounds on a GPU (minutes on a "
                             "CPU; the estimate says how many)")
    parser.add_argument("--reference", action="store_true",
                        help="also time the reference backend (the specification in plain torch; "
                             "50x to 200x slower than AdamW on a CPU) up to --reference-max")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated param counts; K, M, G are powers of 10 (default: "
                             "1M,4M,16M on CPU, 1M,16M,64M,256M on CUDA (--full: and 4M), "
                             "skipping what does not fit in free memory)")
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                        help=f"comma-separated, of {', '.join(SHAPES)} (default: "
                             f"{', '.join(DEFAULT_SHAPES)})")
    parser.add_argument("--tensors", type=int, default=4, help="tensors of the few-large shape")
    parser.add_argument("--dtype", default=None,
                        help="comma-separated param dtypes: float32, bfloat16, float16 "
                             "(default: float32 on CPU; float32,bfloat16 on CUDA, with --quick "
                             "and with --full)")
    parser.add_argument("--rounds", "--repeats", dest="rounds", type=int, default=None,
                        help="timed rounds (default 15 on CUDA (--full: 25), 9 on CPU, 3 with "
                             "--quick)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated ivon_fast backends (default: those available, "
                             "not triton on CPU, the reference only with --reference or --full)")
    parser.add_argument("--kinds", default=None,
                        help=f"comma-separated IVON step kinds, of {', '.join(IVON_KINDS)} "
                             f"(default: {','.join(CPU_DEFAULT_KINDS)} on CPU; all on CUDA, with "
                             "--quick, --full or --state-dtypes)")
    parser.add_argument("--state-dtypes", default=None,
                        help="comma-separated ivon_fast state dtypes (momentum and hess): "
                             "float32 (the drop-in steps and the official iteration), bfloat16 "
                             "(the drop-in step with bf16 state) (default: float32,bfloat16)")
    parser.add_argument("--no-foreach", dest="foreach", action="store_false",
                        help="leave out AdamW(foreach=True)")
    parser.add_argument("--no-ivon-opt", dest="ivon_opt", action="store_false",
                        help="leave out ivon-opt")
    parser.add_argument("--ivon-opt-max", type=parse_size, default=parse_size("64M"),
                        help="largest size ivon-opt is timed at (default 64M)")
    parser.add_argument("--reference-max", type=parse_size, default=None,
                        help="largest size the reference backend is timed at (default 2M; "
                             "--quick: none)")
    parser.add_argument("--retries", type=int, default=measure.RETRIES,
                        help="times a configuration measured on a busy machine is measured again "
                             f"(default {measure.RETRIES}; 0: never)")
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
    parser.add_argument("--record", action="store_true",
                        help="write the JSON and plots into bench/results/ (tracked by git), the "
                             "date and device in their names")
    parser.add_argument("--out", default=None,
                        help="folder for the JSON and PNGs (default bench/out/, which git "
                             "ignores; --record: bench/results/; --quick: a new temporary "
                             "folder)")
    parser.add_argument("--json", default=None, help="JSON path (default: in --out)")
    parser.add_argument("--plot", default=None,
                        help="PNG path; the plots are PATH_time.png and PATH_ratio.png "
                             "(default: next to the JSON)")
    parser.add_argument("--no-save", dest="save", action="store_false",
                        help="write no files")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    wide = args.quick or args.full or gpu   # every step kind and both param dtypes
    if args.full:
        args.reference = True
    if args.sizes is None:
        args.sizes = default_sizes(device, args.quick, args.full)
    if args.dtype is None:
        args.dtype = "float32,bfloat16" if wide else "float32"
    if args.rounds is None:
        args.rounds = 3 if args.quick else ((25 if args.full else 15) if gpu else 9)
    if args.kinds is None and not wide and args.state_dtypes is None:
        args.kinds = ",".join(CPU_DEFAULT_KINDS)
    if args.state_dtypes is None:
        args.state_dtypes = "float32,bfloat16"
    if args.host_tensors is None:
        args.host_tensors = "300" if args.quick else "30,300,3000"
    args.host_tensors = sorted({int(parse_size(n)) for n in args.host_tensors.split(",")
                                if n.strip()}) if args.host else []
    if args.host_rounds is None:
        args.host_rounds = 5 if args.quick else 15
    if args.reference_max is None:  # the reference is the spec, not a fast path: slow to time
        args.reference_max = 0 if args.quick else parse_size("2M")
    args.copy_numel = args.copy_size or (256 * 2**20 if gpu else
                                         (32 if args.quick else 64) * 2**20)
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
    bad = [k for k in (args.kinds or "").split(",") if k.strip() and k.strip() not in IVON_KINDS]
    if bad:
        parser.error(f"--kinds: unknown {bad}; use {', '.join(IVON_KINDS)}")
    return args


def output_paths(record: dict, args) -> tuple:
    """(JSON path, PNG base path) of a run: bench/out/ by default (ignored by git), bench/results/
    with --record (date, time and device in the name), a temporary folder with --quick, or
    --out; --json and --plot win."""
    if args.out:
        out = args.out
    elif args.record:
        out = RESULTS_DIR
    elif args.quick:
        out = tempfile.mkdtemp(prefix="ivon_bench_")
    else:
        out = OUT_DIR
    stem = (f"bench_{record['stamp']}_{device_slug(record['device'])}"
            + ("_quick" if args.quick else ""))
    json_path = args.json or os.path.join(out, stem + ".json")
    plot_path = args.plot or os.path.splitext(json_path)[0] + ".png"
    return json_path, plot_path


def main(argv=None) -> dict:
    started = time.perf_counter()
    args = parse_args(argv)
    args.started = started
    device = torch.device(args.device)
    signal.signal(signal.SIGTERM, _on_sigterm)
    record = run(args)
    copy = record["copy_bandwidth"]
    readings = [row["noise"][key] for row in record["rows"] if row.get("noise")
                for key in ("bandwidth_before_gbs", "bandwidth_after_gbs")
                if row["noise"].get(key)]
    around = (f"; around the configurations {min(readings):.1f} to {max(readings):.1f}"
              if readings else "")
    print(f"# ivon_fast {ivon_fast.__version__} | torch {torch.__version__} | {device.type}: "
          f"{record['device']['name']} | {record['device']['threads']} threads | "
          f"copy {copy['gbs_median']:.1f} GB/s (min {copy['gbs_min']:.1f}, max "
          f"{copy['gbs_max']:.1f}{around}) | {record['date']}")
    report.print_table(record)
    report.print_memory_table(record)
    report.print_host_table(record)
    for note in record["notes"]:
        print(f"# note: {note}")
    if args.save:
        json_path, plot_path = output_paths(record, args)
        record["timing"]["elapsed_s"] = time.perf_counter() - started
        report.write_json(record, json_path)
        print(f"# results: {json_path}")
        if record["rows"]:
            problem = report.plot(record, plot_path)
            print(f"# {problem}" if problem else
                  f"# plots: {', '.join(report.plot_paths(plot_path))}")
        if record.get("host_cost"):
            host_path = os.path.splitext(plot_path)[0] + "_host.png"
            problem = report.plot_host(record, host_path)
            print(f"# {problem}" if problem else f"# host-cost plot: {host_path}")
    report.print_short_table([record])
    for line in report.noise_lines(record):
        print(line)
    took = time.perf_counter() - started
    record["timing"]["elapsed_s"] = took
    retried = record["timing"]["retries_s"]
    print(f"# took {took:.0f} s (the estimate said about {record['timing']['estimate_s']:.0f} s"
          + (f"; about {retried:.0f} s went to measuring noisy configurations again"
             if retried else "") + ")")
    return record


if __name__ == "__main__":
    sys.exit(1 if main()["interrupted"] else 0)
