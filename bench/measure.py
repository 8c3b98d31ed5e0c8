"""How the microbenchmark measures: alternated timing rounds, host time, copy bandwidth, memory.

Timing. Every contender of one configuration (AdamW, the IVON variants, the copy and noise probes
of the CPU floor) is timed once per round, all of them in turn, the order rotating from round to
round; a drift of the machine (clocks, neighbours on a shared host) then hits every contender
alike, and min / median / max over the rounds show the spread. On CUDA one call is timed with
device events, after a synchronize; on CPU with the wall clock (the kernels run in the calling
thread). Slow contenders (ivon-opt, the reference backend) take part in the first rounds only.

Host time (the CPU time of the Python side of one step, which a GPU training loop cannot hide when
the step's kernels are short):
  * on CUDA: the wall time of the ``step()`` call itself, measured in the same rounds, with the
    device synchronized before the call (so the launch queue is empty) and the synchronize after
    the call not counted: Python, argument checks, dispatch and the kernel launches;
  * on CPU the kernels run inside the call, so the host cost is measured apart: the time of the
    same step over the same number of tensors with one element each (`host_times_cpu`), i.e. all
    the per-step and per-tensor work without the per-element work.

Host cost against the tensor count (`host_rounds`, the benchmark's host-cost section): the same
host time of one ``step()`` (on CUDA the call's wall time after a synchronize, on CPU the wall
time of the step over one-element tensors) for N = 30, 300, 3000 tensors, every contender timed
once per round in a rotating order; one round's sample is the mean of ``inner`` calls (as many as
fill about 2 ms, at most 50), each timed alone, with Python's garbage collector paused (as timeit
does). The slope between two tensor counts is the host cost per tensor.

Noise (`verdict`, `BandwidthProbe`, `others_share`): a row's times are trusted only if the machine
stayed the same, and its own, while it was measured. Around the rounds of every configuration the
benchmark measures the copy bandwidth (a short fp32 copy, before and after) and the CPU time
other processes took (/proc/stat less this process's own); a row is "noisy" when the two copy
readings differ by more than ``BANDWIDTH_DRIFT_MAX``, when its rounds' interquartile range
exceeds ``SPREAD_MAX`` of their median (rows of fewer than ``SPREAD_MIN_ROUNDS`` rounds, the slow
contenders timed in the first rounds only, are not judged by their spread: three values give no
quartiles), or, for times taken on the CPU (CPU rows, host times), when other processes took more
than ``OTHERS_CPU_MAX`` of the machine's CPU time. A noisy
configuration is measured again, up to ``RETRIES`` times while the retries' time allows, and the
steadiest attempt is kept; what stays noisy is marked, not hidden.

Memory (`memory_of`), per param:
  * state: the optimizer's own tensors (AdamW: exp_avg, exp_avg_sq, step; ivon_fast: its flat
    mean / momentum / hess buffers, and the sample averages if allocated; ivon-opt: momentum and
    hess, and the running averages it holds between steps), each storage counted once;
  * resident: state plus the storage of the params and grads (for ivon_fast the flat param / grad
    buffers, which replace the params' own storage);
  * peak transient of one step: on CUDA ``torch.cuda.max_memory_allocated`` above the memory
    allocated before the call; on CPU the peak of torch's CPU allocations during the call, from the
    profiler's memory events (``profile_memory=True``): exact for tensors, blind to memory that
    bypasses torch's allocator (thread stacks, Python objects). The JSON also keeps the growth of
    the process's resident set (VmHWM after /proc/self/clear_refs), which is 0 whenever the C
    allocator reuses pages already resident, so it is a lower bound.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


@dataclass(eq=False)
class Contender:
    """One thing timed in the rounds of a configuration."""
    label: str
    kind: str                    # adamw_fused, adamw_foreach, drop_in_step (with the finite
                                 # check), drop_in_step_unchecked, official_iteration,
                                 # ivon_opt_iteration; or the CPU floor's probes: copy, noise
    fn: Callable[[], object]
    backend: Optional[str] = None
    optimizer: object = None     # for the memory figures
    params: list = field(default_factory=list)
    max_rounds: Optional[int] = None  # slow contenders: the first rounds only
    warmup: int = 2
    scale: float = 1.0           # probes: what one timed call stands for
    seconds: list = field(default_factory=list)
    host_seconds: list = field(default_factory=list)
    inner: int = 1               # host-cost section: calls per timed sample

    @property
    def is_probe(self) -> bool:
        return self.kind in ("copy", "noise")


def drop_in_step_call(optimizer, params: list):
    """The timed call of a drop-in step: the grads get a new gradient, as a backward writes one
    (their versions bumped; a drop-in step without one does nothing, Note [a step without a
    gradient] in ivon_fast/_layout.py), then ``optimizer.step()``. One grad per flat buffer is
    bumped: the grads are views of their bucket's buffer and share its version counter (about 1
    us a bucket)."""
    grads = list({param.grad.untyped_storage().data_ptr(): param.grad
                  for param in params}.values())

    def drop_in_step():
        torch.autograd.graph.increment_version(grads)
        optimizer.step()
    return drop_in_step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device) -> tuple:
    """(device seconds, host seconds or None) of one call."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        host_start = time.perf_counter()
        fn()
        host = time.perf_counter() - host_start
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, host
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, None


def run_rounds(contenders: list, device: torch.device, rounds: int,
               on_round: Optional[Callable[[], None]] = None) -> None:
    """Warm every contender up, then time them all once per round, in a rotating order."""
    for contender in contenders:
        for _ in range(contender.warmup):
            contender.fn()
    synchronize(device)
    for round_index in range(rounds):
        shift = round_index % max(1, len(contenders))
        for contender in contenders[shift:] + contenders[:shift]:
            if contender.max_rounds is not None and round_index >= contender.max_rounds:
                continue
            seconds, host = time_call(contender.fn, device)
            contender.seconds.append(seconds)
            if host is not None:
                contender.host_seconds.append(host)
        if on_round is not None:
            on_round()


def spread(values: list) -> tuple:
    """(min, median, max) of ``values``."""
    return min(values), statistics.median(values), max(values)


def copy_bandwidth(numel: int, device: torch.device, rounds: int) -> dict:
    """The device's copy bandwidth in GB/s (bytes read plus bytes written) of an fp32 copy of
    ``numel`` elements, over ``rounds`` rounds: min / median / max."""
    source = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    probe = Contender("copy", "copy", lambda: target.copy_(source))
    run_rounds([probe], device, rounds)
    low, mid, high = spread(probe.seconds)
    moved = 2 * 4 * numel
    return {"numel": numel, "bytes": moved, "gbs_min": moved / high / 1e9,
            "gbs_median": moved / mid / 1e9, "gbs_max": moved / low / 1e9}


def copy_probe(moved_bytes: int, device: torch.device) -> Contender:
    """A contender that copies an fp32 buffer so that ``moved_bytes`` are read plus written."""
    numel = max(1, moved_bytes // 8)
    source = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    return Contender(f"copy of {8 * numel / 1e6:.0f} MB", "copy", lambda: target.copy_(source))


def noise_probe(numel: int, threads: int) -> Optional[Contender]:
    """A contender whose time, times its ``scale``, is one draw of noise for ``numel`` elements.

    It runs the CPU kernel's ``sample`` op (theta = mean + eps * sigma: one Philox + Box-Muller
    draw and 12 bytes per element) on one thread over a buffer that stays in cache (128Ki
    elements, 1.5 MB), as many times as it takes to cover ``numel / threads`` elements: so the
    memory traffic costs next to nothing, no parallel region waits on a busy core, and ``scale``
    turns the one core's time into ``threads`` cores' share of ``numel`` elements (the kernels
    split the elements evenly across the threads). None without the CPU kernels.
    """
    from ivon_fast import cpp_backend
    if cpp_backend.unavailable_reason("cpu") is not None:
        return None
    per_thread = max(1, math.ceil(numel / threads))
    chunk = min(128 * 1024, max(1024, per_thread))
    calls = max(1, round(per_thread / chunk))
    param, mean = torch.empty(chunk), torch.randn(chunk)
    hess = torch.full((chunk,), 0.1)

    def draw():
        torch.set_num_threads(1)
        try:
            for _ in range(calls):
                cpp_backend.sample(param, mean, hess, seed=1, draw=1, ess=1e4, weight_decay=1e-4)
        finally:
            torch.set_num_threads(threads)
    return Contender(f"noise: {calls} x sample({chunk}) on 1 of {threads} threads", "noise",
                     draw, scale=numel / (calls * chunk * threads))


# ---------------------------------------------------------------------------------- noise

# When a measurement is not trusted ("noisy"). On a quiet 2-core VM the copy bandwidth stays within
# a few percent from one configuration to the next and most rows' rounds agree to within 5-10%;
# a neighbour taking a core or the memory bus moves the copy bandwidth by 2x to 4x (18.6 GB/s
# quiet, 4.8 GB/s busy) and scatters the rounds, so these limits catch it without flagging a quiet
# machine's ordinary jitter.
BANDWIDTH_DRIFT_MAX = 0.15  # copy bandwidth before vs after a configuration's rounds:
                            # |before - after| / max(before, after) above this: noisy
SPREAD_MAX = 0.10           # a row's rounds: interquartile range / median above this: noisy
SPREAD_MIN_ROUNDS = 5       # rows with fewer rounds are judged by the copy bandwidth alone
OTHERS_CPU_MAX = 0.25       # the share of the machine's CPU time that other processes (and, in
                            # a VM, other guests: steal time) took during the rounds, above
                            # this: noisy (CPU rows and host times; /proc/stat, Linux only).
                            # A uniformly busy machine keeps the rounds steady and the copy
                            # bandwidth level while every step waits for a core
RETRIES = 2                 # a noisy configuration is measured again up to this many times
RETRY_TIME_SHARE = 0.5      # ... while the retries have cost less than this share of the run's
RETRY_MIN_SECONDS = 10.0    # estimated time, or this many seconds, whichever is more


def iqr(values: list) -> float:
    """The interquartile range of ``values`` (quartiles by linear interpolation, as
    ``statistics.quantiles(method='inclusive')``); 0 for fewer than two values."""
    if len(values) < 2:
        return 0.0
    low, _, high = statistics.quantiles(values, n=4, method="inclusive")
    return high - low


def relative_spread(values: list) -> Optional[float]:
    """Interquartile range over median of ``values``; None for fewer than two values."""
    if len(values) < 2:
        return None
    middle = statistics.median(values)
    return iqr(values) / middle if middle > 0 else None


def bandwidth_drift(before: Optional[float], after: Optional[float]) -> Optional[float]:
    """How far apart two copy-bandwidth readings are: |before - after| / max(before, after)."""
    if not before or not after:
        return None
    return abs(before - after) / max(before, after)


def cpu_snapshot() -> Optional[tuple]:
    """(the machine's busy CPU seconds, all CPUs; this process's CPU seconds; wall seconds; CPU
    count) now, from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    fields = [int(v) for v in lines[0].split()[1:]]
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    # user nice system idle iowait irq softirq steal (guest time is inside user already)
    busy = sum(fields[:8]) - fields[3] - (fields[4] if len(fields) > 4 else 0)
    return (busy / os.sysconf("SC_CLK_TCK"), time.process_time(), time.perf_counter(),
            max(1, cpus))


def others_share(start: Optional[tuple], end: Optional[tuple]) -> Optional[float]:
    """The share of the machine's CPU time (all CPUs, start to end) that other processes took:
    busy time less this process's, over wall time times the CPU count; None if unknown."""
    if start is None or end is None or end[2] - start[2] <= 0.05:
        return None
    others = (end[0] - start[0]) - (end[1] - start[1])
    return min(1.0, max(0.0, others / ((end[2] - start[2]) * end[3])))


def verdict(seconds: list, before: Optional[float] = None, after: Optional[float] = None,
            min_rounds: int = SPREAD_MIN_ROUNDS, others: Optional[float] = None) -> dict:
    """Whether a row measured with ``seconds`` (its rounds), between copy-bandwidth readings
    ``before`` and ``after`` (GB/s, or None), while other processes took the share ``others``
    of the machine's CPU time (or None: not judged), is noisy, and why (``reasons``)."""
    spread, drift = relative_spread(seconds), bandwidth_drift(before, after)
    reasons = []
    if others is not None and others > OTHERS_CPU_MAX:
        reasons.append(f"other processes took {100 * others:.0f}% of the machine's CPU time "
                       f"during the rounds (limit {100 * OTHERS_CPU_MAX:.0f}%)")
    if drift is not None and drift > BANDWIDTH_DRIFT_MAX:
        reasons.append(f"copy bandwidth {before:.1f} GB/s before the rounds, {after:.1f} GB/s "
                       f"after ({100 * drift:.0f}% apart; limit {100 * BANDWIDTH_DRIFT_MAX:.0f}%)")
    if spread is not None and len(seconds) >= min_rounds and spread > SPREAD_MAX:
        reasons.append(f"rounds' interquartile range {100 * spread:.0f}% of their median "
                       f"(limit {100 * SPREAD_MAX:.0f}%)")
    return {"noisy": bool(reasons), "reasons": reasons, "rounds": len(seconds),
            "spread": spread, "spread_max": SPREAD_MAX, "bandwidth_before_gbs": before,
            "bandwidth_after_gbs": after, "bandwidth_drift": drift,
            "bandwidth_drift_max": BANDWIDTH_DRIFT_MAX, "cpu_others": others,
            "cpu_others_max": OTHERS_CPU_MAX}


def badness(verdicts: list) -> tuple:
    """Sort key of an attempt's verdicts, steadiest first: noisy rows, then the worst excess."""
    worst = 0.0
    for item in verdicts:
        if item["bandwidth_drift"] is not None:
            worst = max(worst, item["bandwidth_drift"] / BANDWIDTH_DRIFT_MAX)
        if item["spread"] is not None:
            worst = max(worst, item["spread"] / SPREAD_MAX)
        if item.get("cpu_others") is not None:
            worst = max(worst, item["cpu_others"] / OTHERS_CPU_MAX)
    return sum(item["noisy"] for item in verdicts), worst


class BandwidthProbe:
    """The machine's state between configurations: the median GB/s of a few fp32 copies of
    ``numel`` elements (bytes read plus written), its buffers allocated once."""

    def __init__(self, numel: int, device: torch.device, rounds: int = 5):
        self.device, self.rounds = device, rounds
        self.source = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
        self.target = torch.empty_like(self.source)

    def gbs(self) -> float:
        probe = Contender("copy", "copy", lambda: self.target.copy_(self.source), warmup=1)
        run_rounds([probe], self.device, self.rounds)
        return 8 * self.source.numel() / statistics.median(probe.seconds) / 1e9


# ---------------------------------------------------------------------------------- host time

def host_times_cpu(contenders: list, rounds: int, inner: int = 20) -> dict:
    """Median seconds per call of each tiny contender (label -> seconds), ``inner`` calls per
    timed round, alternated like the main rounds."""
    for contender in contenders:
        for _ in range(contender.warmup):
            contender.fn()
    per_call = {c.label: [] for c in contenders}
    for round_index in range(rounds):
        shift = round_index % max(1, len(contenders))
        for contender in contenders[shift:] + contenders[:shift]:
            start = time.perf_counter()
            for _ in range(inner):
                contender.fn()
            per_call[contender.label].append((time.perf_counter() - start) / inner)
    return {label: statistics.median(values) for label, values in per_call.items()}


def host_rounds(contenders: list, device: torch.device, rounds: int,
                sample_seconds: float = 2e-3, max_inner: int = 50,
                on_round: Optional[Callable[[], None]] = None) -> None:
    """Host seconds per call of each contender into its ``host_seconds``, one sample per round.

    Each call is timed alone: on CUDA after a synchronize (the launch queue empty) and without
    the synchronize after it, i.e. the CPU time of the call (as `time_call`); on CPU its wall
    time. A sample is the mean over ``inner`` calls, chosen from the warm-up so that a sample
    takes about ``sample_seconds``; the order of the contenders rotates from round to round and
    the garbage collector is paused while timing.
    """
    def one_call(fn) -> float:
        synchronize(device)
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for contender in contenders:
            for _ in range(contender.warmup):
                contender.fn()
            estimate = min(one_call(contender.fn) for _ in range(3))
            contender.inner = max(1, min(max_inner, math.ceil(sample_seconds / max(estimate,
                                                                                   1e-7))))
        synchronize(device)
        for round_index in range(rounds):
            shift = round_index % max(1, len(contenders))
            for contender in contenders[shift:] + contenders[:shift]:
                total = sum(one_call(contender.fn) for _ in range(contender.inner))
                contender.host_seconds.append(total / contender.inner)
            if on_round is not None:
                on_round()
        synchronize(device)
    finally:
        if was_enabled:
            gc.enable()


# ---------------------------------------------------------------------------------- memory

def _tensors_in(obj, depth: int = 0):
    if depth > 4:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors_in(value, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors_in(value, depth + 1)


def _storage_bytes(tensors) -> dict:
    """{storage pointer: bytes} of the tensors' storages, each counted once."""
    found = {}
    for tensor in tensors:
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        found[(tensor.device.type, storage.data_ptr())] = storage.nbytes()
    return found


def state_tensors(optimizer) -> list:
    """The tensors an optimizer keeps besides the params and grads."""
    tensors = list(_tensors_in(list(optimizer.state.values())))
    for group in optimizer.param_groups:
        tensors += list(_tensors_in({k: v for k, v in group.items() if k != "params"}))
    layout = getattr(optimizer, "_layout", None)  # ivon_fast: the flat state buffers
    for bucket in getattr(layout, "buckets", ()):
        tensors += [getattr(bucket, name, None) for name in ("mean", "momentum", "hess",
                                                             "avg_grad", "avg_hess_term")]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def memory_of(contender: Contender, device: torch.device, numel: int) -> dict:
    """Bytes per param: optimizer state, state + params + grads, peak transient of one call."""
    params = contender.params
    weights = [p.data for p in params] + [p.grad for p in params if p.grad is not None]
    layout = getattr(contender.optimizer, "_layout", None)
    for bucket in getattr(layout, "buckets", ()):
        weights += [getattr(bucket, name, None) for name in ("param_flat", "grad_flat")]
    weights = [t for t in weights if isinstance(t, torch.Tensor)]
    state = _storage_bytes(state_tensors(contender.optimizer))
    weight_storage = _storage_bytes(weights)
    state = {key: size for key, size in state.items() if key not in weight_storage}
    result = {"state_bytes_per_param": sum(state.values()) / numel,
              "resident_bytes_per_param": (sum(state.values()) + sum(weight_storage.values()))
              / numel}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        contender.fn()
        torch.cuda.synchronize(device)
        result["peak_transient_bytes_per_param"] = (
            torch.cuda.max_memory_allocated(device) - base) / numel
        result["peak_method"] = "torch.cuda.max_memory_allocated"
    else:
        peak = _cpu_allocator_peak(contender.fn)
        result["peak_transient_bytes_per_param"] = None if peak is None else peak / numel
        result["peak_method"] = "torch CPU allocations (profiler memory events)"
        rss = _rss_peak_growth(contender.fn)
        result["rss_peak_growth_bytes_per_param"] = None if rss is None else rss / numel
    return result


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start-up messages) for the block."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_allocator_peak(fn) -> Optional[int]:
    """Peak bytes of torch CPU allocations live during ``fn()`` above those live before it."""
    try:
        from torch.profiler import ProfilerActivity, profile
        with _quiet_stderr():
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                fn()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except Exception:  # a profiler without these (private) accessors: no figure
        return None
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        if event.device_type() != torch.autograd.DeviceType.CPU:
            continue
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def _status_kib(name: str) -> Optional[int]:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return None


def _rss_peak_growth(fn) -> Optional[int]:
    """Growth of the resident set's high-water mark during ``fn()`` (Linux; else None)."""
    try:  # no gc.collect() here: with torch._dynamo imported one takes a quarter second
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset VmHWM to the current VmRSS
        before = _status_kib("VmRSS")
        fn()
        peak = _status_kib("VmHWM")
    except OSError:
        return None
    if before is None or peak is None:
        return None
    return max(0, peak - before) * 1024
