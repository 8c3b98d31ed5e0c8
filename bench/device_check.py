"""The Python side of bench/device_check.sh: the machine's description and the closing table.

    python -m bench.device_check env                  # date, GPU, versions, CPU (no GPU needed)
    python -m bench.device_check table STEPS.tsv [--bench BENCH.json] [--e2e E2E.json]

``table`` prints one line per step of the script (its outcome, seconds, limit and the last line
of its log), then the benchmark's short table (bench/report.py) and the end-to-end step's, from
the JSON files the steps wrote. It needs neither torch nor a GPU, so the dry run prints it too.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys

from bench import report

FAILED = ("FAILED", "TIMED OUT", "SKIPPED")
SMI_FIELDS = "name,compute_cap,memory.total,driver_version,clocks.sm,clocks.mem"


def print_environment() -> None:
    """What the record needs to say where it was measured."""
    print("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    smi = shutil.which("nvidia-smi")
    if smi:
        query = [smi, f"--query-gpu={SMI_FIELDS}", "--format=csv"]
        print(subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip())
    else:
        print("no nvidia-smi: no GPU here")
    import torch  # here, so that the table needs no torch
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    print(f"python {platform.python_version()} torch {torch.__version__} cuda "
          f"{torch.version.cuda} triton {triton_version} gpu {gpu}")
    print(f"cpu: {os.cpu_count()} cores, {cpu_model()}")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_steps(path: str) -> list:
    """The rows bench/device_check.sh wrote: name, status, rc, seconds, limit, log, last line."""
    keys = ("name", "status", "rc", "seconds", "limit", "log", "note")
    with open(path) as handle:
        return [dict(zip(keys, line.rstrip("\n").split("\t"))) for line in handle if line.strip()]


def print_steps(steps: list) -> None:
    bad = [f"{s['name']} ({s['status'].lower()})" for s in steps if s["status"] in FAILED]
    print(f"== steps: {len(steps)}, " + (f"{len(bad)} failed, timed out or skipped: "
                                         f"{', '.join(bad)}" if bad else "none failed"))
    print(f"{'step':<18} {'status':<10} {'rc':>4} {'s':>5} {'limit':>5}  log: last line")
    for s in steps:
        print(f"{s['name']:<18} {s['status']:<10} {s['rc']:>4} {s['seconds']:>5} "
              f"{s['limit']:>5}  {s['log']}: {s['note'][:90]}")


def print_e2e(record: dict) -> None:
    """The end-to-end step's rows, as bench/e2e.py measured them (medians)."""
    config = record["config"]
    print(f"\n# e2e {config['name']} on {record.get('device_name')} | batch {record['batch']} | "
          f"autocast {record['autocast']} | {record['steps']} timed steps")
    print(f"{'optimizer':<38} {'backend':<8} {'step ms':>9} {'x AdamW':>7} {'opt ms':>8} "
          f"{'opt x AdamW':>11}  loss fell")
    for row in record["rows"]:
        print(f"{row['optimizer']:<38} {row['backend']:<8} {row['step_ms']['median']:>9.2f} "
              f"{row['step_vs_adamw']:>7.3f} {row['optimizer_ms']['median']:>8.2f} "
              f"{row['optimizer_vs_adamw']:>11.2f}  {'yes' if row['loss_fell'] else 'NO'}")


def load(path: str | None) -> dict | None:
    """A step's JSON, or None when the step wrote none (it failed or was not run)."""
    if not path or not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def print_table(args) -> int:
    steps = read_steps(args.steps)
    bench, e2e = load(args.bench), load(args.e2e)
    if bench:
        report.print_short_table([bench])
    if e2e:
        print_e2e(e2e)
    print()
    print_steps(steps)  # last: the device tool returns the end of the output
    return 1 if any(s["status"] in FAILED for s in steps) else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.device_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("env", help="the machine: date, GPU, versions, CPU")
    table = sub.add_parser("table", help="the closing table")
    table.add_argument("steps", help="the steps' TSV written by bench/device_check.sh")
    table.add_argument("--bench", default=None, help="python -m bench's JSON")
    table.add_argument("--e2e", default=None, help="python -m bench.e2e's JSON")
    args = parser.parse_args(argv)
    if args.what == "env":
        print_environment()
        return 0
    return print_table(args)


if __name__ == "__main__":
    sys.exit(main())
