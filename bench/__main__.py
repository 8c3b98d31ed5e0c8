"""Microbenchmark: one IVON iteration per backend against torch.optim.AdamW(fused=True).

    python -m bench                         # the default device (cuda if present, else cpu)
    python -m bench --sizes 16M,64M,256M --json results.json

For every size it times, in one process and on the same device:
  * AdamW(fused=True).step()                              (the anchor, 28 bytes / element)
  * ivon_fast drop-in step (update fused with resampling) (32 bytes / element)
  * ivon_fast official iteration: sample, restore, step   (52 bytes / element)
  * ivon-opt's official iteration (sample, restore, step), where it is fast enough to time
AdamW and the kernel backends are timed round by round in turn, so drift hits them alike. It prints
time, effective GB/s by the byte budget of docs/DESIGN.md, and the ratio to fused AdamW. On a GPU
it also measures device copy bandwidth and prints each run's share of it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

import ivon_fast
from ivon_fast import backends

BYTES_PER_ELEMENT = {"adamw_fused": 28, "drop_in_step": 32, "official_iteration": 52}


def parse_size(text: str) -> int:
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1].upper(), 1)
    return int(float(text.rstrip("kKmMgG")) * scale)


def time_once(fn, device: torch.device) -> float:
    """Seconds of one call (device events on CUDA)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds per call."""
    return timed_alternating({"fn": fn}, device, repeats, warmup)["fn"]


def timed_alternating(calls: dict, device: torch.device, repeats: int, warmup: int = 2) -> dict:
    """Median seconds per call of each of ``calls``, timed round by round in turn.

    Alternating makes a drift of the machine (clocks, memory placement, neighbours on a shared
    host) hit every contender alike, so the ratios stay meaningful.
    """
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times = {label: [] for label in calls}
    for _ in range(repeats):
        for label, fn in calls.items():
            times[label].append(time_once(fn, device))
    return {label: statistics.median(values) for label, values in times.items()}


def make_params(numel: int, tensors: int, device, dtype, seed: int = 0):
    """``tensors`` params of about equal size with random values and random grads."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    sizes = [numel // tensors + (1 if i < numel % tensors else 0) for i in range(tensors)]
    params = []
    for size in sizes:
        param = torch.nn.Parameter(torch.randn(size, generator=generator).to(device, dtype))
        param.grad = torch.randn(size, generator=generator).to(device, dtype) * 1e-2
        params.append(param)
    return params


def copy_bandwidth(numel: int, device: torch.device, repeats: int) -> float:
    """Device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    source = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    seconds = timed(lambda: target.copy_(source), device, repeats)
    return 2 * 4 * numel / seconds / 1e9


def adamw_call(numel, tensors, device, dtype):
    """One fused AdamW step over fresh params, as a callable."""
    optimizer = torch.optim.AdamW(make_params(numel, tensors, device, dtype), lr=1e-3, fused=True)
    return optimizer.step


def ivon_fast_call(numel, tensors, device, dtype, backend, mode):
    """One ivon_fast drop-in step, or one official iteration (sample, restore, step)."""
    params = make_params(numel, tensors, device, dtype)
    grads = [p.grad.clone() for p in params]
    resample = mode == "drop_in_step"
    optimizer = ivon_fast.IVON(params, lr=1e-3, ess=1e6, backend=backend,
                               resample_on_step=resample)
    for param, grad in zip(params, grads):  # the grads are views into the flat buffer now
        param.grad.copy_(grad)
    if resample:
        return optimizer.step

    def iteration():
        with optimizer.sampled_params(train=True):
            pass  # the grads are already in place
        optimizer.step()
    return iteration


def ivon_opt_call(numel, tensors, device, dtype):
    """One official ivon-opt iteration (sample, restore, step)."""
    import ivon
    optimizer = ivon.IVON(make_params(numel, tensors, device, dtype), lr=1e-3, ess=1e6)

    def iteration():
        with optimizer.sampled_params(train=True):
            pass
        optimizer.step()
    return iteration


def bench_adamw(numel, tensors, device, dtype, repeats):
    return timed(adamw_call(numel, tensors, device, dtype), device, repeats)


def bench_ivon_fast(numel, tensors, device, dtype, repeats, backend, mode):
    return timed(ivon_fast_call(numel, tensors, device, dtype, backend, mode), device, repeats)


def run(args) -> list:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    rows = []
    names = args.backends.split(",") if args.backends else [
        b for b in ("cuda", "triton", "cpu", "reference")
        if backends.unavailable_reason(b, device) is None
        and not (b == "triton" and device.type != "cuda")]  # the interpreter is no perf path
    for name in backends.BACKENDS:
        if name not in names:
            reason = backends.unavailable_reason(name, device) or "not selected"
            print(f"# backend {name}: skipped ({reason.splitlines()[0]})", file=sys.stderr)
    for numel in [parse_size(s) for s in args.sizes.split(",")]:
        copy_gbs = copy_bandwidth(numel * 4, device, args.repeats) if device.type == "cuda" else None
        # the kernel backends are timed round by round against AdamW (timed_alternating)
        calls, kinds = {"torch AdamW(fused=True)": adamw_call(numel, args.tensors, device, dtype)}, {}
        kinds["torch AdamW(fused=True)"] = "adamw_fused"
        slow = []
        for name in names:
            if name == "reference" and numel > args.reference_max:
                continue
            for mode in ("drop_in_step", "official_iteration"):
                label = f"ivon_fast[{name}] {mode.replace('_', ' ')}"
                kinds[label] = mode
                call = ivon_fast_call(numel, args.tensors, device, dtype, name, mode)
                if name == "reference":
                    slow.append((label, call, 1))
                else:
                    calls[label] = call
        if args.ivon_opt and numel <= args.ivon_opt_max:
            label = "ivon-opt 0.1.3 official iteration"
            kinds[label] = "official_iteration"
            slow.append((label, ivon_opt_call(numel, args.tensors, device, dtype),
                         max(1, args.repeats // 4)))
        seconds_of = timed_alternating(calls, device, args.repeats)
        for label, call, repeats in slow:
            seconds_of[label] = timed(call, device, repeats, warmup=1)
        del calls, slow
        adamw = seconds_of["torch AdamW(fused=True)"]
        results = [(label, kinds[label], seconds) for label, seconds in seconds_of.items()]
        element_bytes = torch.empty((), dtype=dtype).element_size()
        for label, kind, seconds in results:
            gbs = BYTES_PER_ELEMENT[kind] * numel / seconds / 1e9 if element_bytes == 4 else None
            rows.append(dict(numel=numel, run=label, ms=seconds * 1e3, gbs=gbs,
                             copy_pct=(100 * gbs / copy_gbs) if copy_gbs and gbs else None,
                             ratio_vs_adamw=seconds / adamw, copy_gbs=copy_gbs))
    return rows


def print_table(rows, header: str) -> None:
    print(header)
    print(f"{'params':>8}  {'run':<46} {'ms':>9} {'GB/s':>8} {'%copy':>6} {'x AdamW':>8}")
    for row in rows:
        gbs = f"{row['gbs']:.0f}" if row["gbs"] else "-"
        pct = f"{row['copy_pct']:.0f}" if row["copy_pct"] else "-"
        print(f"{row['numel'] / 1e6:>7.4g}M  {row['run']:<46} {row['ms']:>9.3f} {gbs:>8} "
              f"{pct:>6} {row['ratio_vs_adamw']:>8.2f}")


def main(argv=None) -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--sizes", default="16M,64M,256M" if cuda else "10M",
                        help="comma-separated param counts; K, M, G are powers of 10")
    parser.add_argument("--tensors", type=int, default=4, help="params per size (default 4)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=20 if cuda else 7)
    parser.add_argument("--backends", default=None, help="comma-separated (default: available)")
    parser.add_argument("--no-ivon-opt", dest="ivon_opt", action="store_false")
    parser.add_argument("--ivon-opt-max", type=parse_size, default=parse_size("64M"))
    parser.add_argument("--reference-max", type=parse_size, default=parse_size("2M"))
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else (
        platform.processor() or platform.machine())
    header = (f"# ivon_fast {ivon_fast.__version__} | torch {torch.__version__} | {args.device}: "
              f"{device_name} | {os.cpu_count()} CPUs | dtype {args.dtype} | "
              f"{time.strftime('%Y-%m-%d')}")
    rows = run(args)
    print_table(rows, header)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"header": header, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
