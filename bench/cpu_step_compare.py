"""The CPU drop-in step of this checkout against a baseline build, alternated, fused AdamW as the
yardstick (issue 19: the CPU drop-in step <= 2.5 ns per element per core on an AVX-512 machine).

    python bench/cpu_step_compare.py                      # baseline: the commit before issue 19's CPU work
    python bench/cpu_step_compare.py --baseline DIR       # a checkout with a built extension
    python bench/cpu_step_compare.py --baseline-rev REV   # build REV's CPU kernels first (minutes)

One thread (torch.set_num_threads(1)), --numel fp32 elements (10M). Each process (a child of this
one, importing ivon_fast from its checkout) alternates one torch.optim.AdamW(fused=True) step
over the same number of params (4 tensors) with one ivon_fast drop-in step (update with grad,
count=1, hess_approx='price', next_draw: the update fused with the next sample), --steps times.
The two kernels cannot live in one process (both register the same torch ops), so the processes
alternate too: --rounds rounds of (baseline, this checkout), the order flipped every round.
Reported per kernel: ns per element of the step (time / numel, one core), min / median / max over
all its steps, by wall clock and by the thread's CPU time (which leaves out time the thread was
descheduled: on a shared machine the steadier of the two), AdamW's in the same processes, and the
median of IVON / AdamW over the alternated pairs. Differences of a few percent are noise on a
busy machine; judge on a quiet one.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# main at the branch point of issue 19's CPU work (its CPU kernels unchanged since issue 11)
DEFAULT_BASELINE_REV = "dfc271e"


def child(numel: int, steps: int) -> None:
    """Measure in this process and print one JSON line (ns per element per step)."""
    import torch

    torch.set_num_threads(1)
    from cpu_kernel import drop_in_contenders  # this script's folder, bench/
    from ivon_fast import cpp_backend

    reason = cpp_backend.unavailable_reason("cpu")
    if reason is not None:
        raise SystemExit(reason)
    n = numel
    adamw_step, ivon_step, _, _ = drop_in_contenders(n)

    def timed(fn):
        wall, cpu = time.perf_counter(), time.thread_time()
        fn()
        return ((time.perf_counter() - wall) * 1e9 / n, (time.thread_time() - cpu) * 1e9 / n)

    adamw_step()
    ivon_step()
    out = {"isa": cpp_backend.cpu_isa(), "ivon": [], "adamw": [],
           "ivon_file": cpp_backend.__file__}
    for _ in range(steps):
        out["adamw"].append(timed(adamw_step))
        out["ivon"].append(timed(ivon_step))
    print(json.dumps(out))


def built(checkout: str) -> bool:
    pkg = os.path.join(checkout, "ivon_fast")
    return bool(glob.glob(os.path.join(pkg, "_C*.so"))) and os.path.exists(
        os.path.join(pkg, "_build_info.py"))


def build_baseline(rev: str) -> str:
    """The sources of `rev` (git archive) under build/, their CPU kernels built in place (once)."""
    path = os.path.join(ROOT, "build", f"baseline-{rev}")
    if not os.path.isdir(path):
        os.makedirs(path)
        archive = subprocess.run(["git", "-C", ROOT, "archive", rev], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", path], input=archive, check=True)
    if not built(path):
        env = dict(os.environ, IVON_FAST_NO_CUDA="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
        print(f"building the baseline's CPU kernels in {path} (minutes) ...", flush=True)
        subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=path,
                       env=env, check=True, stdout=subprocess.DEVNULL)
    return path


def run_child(checkout: str, args) -> dict:
    env = dict(os.environ, PYTHONPATH=checkout)
    if args.isa:
        env["IVON_FAST_CPU_ISA"] = args.isa
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                          "--numel", str(args.numel), "--steps", str(args.steps)],
                         cwd=checkout, env=env, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def spread(xs) -> str:
    return f"{min(xs):6.3f} {statistics.median(xs):6.3f} {max(xs):6.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="a checkout with a built extension")
    parser.add_argument("--baseline-rev", default=DEFAULT_BASELINE_REV,
                        help="else: build this revision's CPU kernels under build/ (default "
                             f"{DEFAULT_BASELINE_REV}, before issue 19)")
    parser.add_argument("--numel", type=int, default=10_000_000)
    parser.add_argument("--steps", type=int, default=15, help="alternated steps per process")
    parser.add_argument("--rounds", type=int, default=4, help="process pairs")
    parser.add_argument("--isa", default="", help="force a lower CPU build: avx2 | generic")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.numel, args.steps)
    baseline = os.path.abspath(args.baseline) if args.baseline else build_baseline(
        args.baseline_rev)
    if not built(baseline) or not built(ROOT):
        raise SystemExit("build both extensions first (setup.py build_ext --inplace)")
    variants = {"baseline": baseline, "this": ROOT}
    samples = {name: [] for name in variants}
    isa = {}
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            got = run_child(variants[name], args)
            isa[name] = got["isa"]
            samples[name].append(got)
    print(f"{args.numel:,} fp32 elements, 1 thread, {args.rounds} x {args.steps} steps per kernel;"
          f" ns per element per core, min / median / max")
    print(f"{'':9s} {'isa':7s} {'IVON wall':^20s} {'IVON cpu':^20s} {'AdamW cpu':^20s}  IVON/AdamW")
    medians = {}
    for name, runs in samples.items():
        ivon = [s for run in runs for s in run["ivon"]]
        adamw = [s for run in runs for s in run["adamw"]]
        ratio = [i[1] / a[1] for run in runs for i, a in zip(run["ivon"], run["adamw"])]
        medians[name] = statistics.median(s[1] for s in ivon)
        print(f"{name:9s} {isa[name]:7s} {spread([s[0] for s in ivon])} "
              f"{spread([s[1] for s in ivon])} {spread([s[1] for s in adamw])}  "
              f"{statistics.median(ratio):.2f}x")
    print(f"this / baseline (median IVON cpu): {medians['this'] / medians['baseline']:.3f}")


if __name__ == "__main__":
    main()
