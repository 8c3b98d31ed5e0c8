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
