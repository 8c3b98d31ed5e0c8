"""Micro-benchmark of the compiled CPU kernels against torch.optim.AdamW(fused=True).

    python bench/cpu_kernel.py [--numel 10000000] [--repeats 15]

Times (median of --repeats, same process): one fused AdamW step over `numel` fp32 params in 4
tensors, and one ivon_fast update (grad given, count=1, hess_approx='price', next_draw given: the
fused drop-in step), plus sample and the update without resampling, for each CPU kernel build the
CPU supports. The headline ratio alternates AdamW and IVON steps round by round, so a shift of the
machine's memory bandwidth during the run (shared hosts) affects both alike.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from ivon_fast import cpp_backend
from ivon_fast.scalars import StepScalars


def median_ms(fn, repeats: int) -> float:
    fn()  # warm up (first touch, thread pool)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def drop_in_contenders(n: int):
    """(fused AdamW's step over n fp32 params in 4 tensors; the CPU kernel's drop-in update over
    n elements: grad given, count=1, hess_approx='price', a next draw each call; the state it
    works on, a dict; its scalars)."""
    params = [torch.randn(n // 4) for _ in range(4)]
    for p in params:
        p.grad = torch.randn_like(p)
    adamw = torch.optim.AdamW(params, lr=1e-3, fused=True)
    state = dict(param=torch.randn(n), grad=torch.randn(n), mean=torch.randn(n),
                 momentum=torch.zeros(n), hess=torch.full((n,), 0.1))
    scalars = StepScalars.of(lr=0.1, ess=1e4, weight_decay=1e-4, beta1=0.9, beta2=0.99999,
                             clip_radius=1e-3)
    draw = [0]

    def ivon_step():
        draw[0] += 2
        cpp_backend.update(state["param"], state["grad"], state["mean"], state["momentum"],
                           state["hess"], None, None, seed=1, draw=draw[0],
                           next_draw=draw[0] + 1, count=1, hess_approx="price", scalars=scalars)
    return adamw.step, ivon_step, state, scalars


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--numel", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    n = args.numel
    reason = cpp_backend.unavailable_reason("cpu")
    if reason is not None:
        raise SystemExit(reason)

    adamw_step, ivon_step, st, scalars = drop_in_contenders(n)
    adamw_ms = median_ms(adamw_step, args.repeats)

    def plain_update():
        cpp_backend.update(st["param"], st["grad"], st["mean"], st["momentum"], st["hess"], None,
                           None, seed=1, draw=1, count=1, hess_approx="price", scalars=scalars)

    def sample():
        cpp_backend.sample(st["param"], st["mean"], st["hess"], seed=1, draw=1, ess=1e4,
                           weight_decay=1e-4)

    # alternate the two steps, round by round
    pairs = []
    ivon_step()
    for _ in range(args.repeats):
        start = time.perf_counter()
        adamw_step()
        middle = time.perf_counter()
        ivon_step()
        pairs.append((middle - start, time.perf_counter() - middle))
    adamw_alt = statistics.median(p[0] for p in pairs) * 1e3
    ivon_alt = statistics.median(p[1] for p in pairs) * 1e3

    print(f"{n:,} fp32 elements, {torch.get_num_threads()} threads, CPU kernels: "
          f"{cpp_backend.cpu_isa()}")
    print(f"  alternating: AdamW(fused=True) {adamw_alt:.2f} ms, IVON fused step {ivon_alt:.2f} ms"
          f"  -> {ivon_alt / adamw_alt:.2f}x")
    print(f"  AdamW(fused=True) step             {adamw_ms:8.2f} ms")
    for isa in ("avx512", "avx2", "generic"):
        try:
            cpp_backend.set_cpu_isa(isa)
        except ValueError:
            continue
        ivon_ms = median_ms(ivon_step, args.repeats)
        print(f"  [{isa:7s}] update + next sample      {ivon_ms:8.2f} ms  "
              f"({ivon_ms / adamw_ms:.2f}x AdamW)")
        print(f"  [{isa:7s}] update (param <- mean)    {median_ms(plain_update, args.repeats):8.2f} ms")
        print(f"  [{isa:7s}] sample                    {median_ms(sample, args.repeats):8.2f} ms")
    cpp_backend.set_cpu_isa("")


if __name__ == "__main__":
    main()
