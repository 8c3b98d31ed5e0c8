"""The microbenchmark's output: the tables, the JSON record and the plot.

    python -m bench.report RESULTS.json [...]           # the short table of recorded results
    python -m bench.report --plot RESULTS.json [...]    # (re)draw RESULTS.png next to each JSON
    python -m bench.report --plot --out DIR RESULTS.json # ... into DIR instead
    python -m bench.report --host RESULTS.json [...]    # the host-cost tables too

The plot needs matplotlib (the ``bench`` extra: ``pip install -e '.[bench]'``); without it the
benchmark still writes its JSON and says so, and the plot can be drawn later from the JSON on any
machine with ``--plot``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

ANCHOR = "adamw_fused"
BF16_STATE = "drop_in_step_bf16_state"
# issue 11's target for the drop-in step with bf16 state (docs/DESIGN.md section 16): on a GPU,
# at >= 64M fp32 params, <= 0.95x AdamW(fused=True), with state bytes per param equal to AdamW's
# (fp32 params: 8 B, the mean fp32 and momentum and hess bf16, against AdamW's fp32 m and v;
# "equal" to within 1%, AdamW's per-tensor step counters). bf16 params have no such target:
# AdamW keeps bf16 state there (4 B per param, 14 B moved per element against 22).
BF16_STATE_TARGET = {"device": "cuda", "dtype": "float32", "min_size": 64 * 10**6,
                     "max_ratio": 0.95, "memory_tolerance": 0.01}


def _fmt(value, spec: str, empty: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return empty
    return format(value, spec)


def _size(numel: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if numel >= scale:
            return f"{numel / scale:.4g}{unit}"
    return str(numel)


def config_key(row: dict) -> tuple:
    return (row["dtype"], row["shape"], row["size"])


def print_table(record: dict, file=None) -> None:
    """Every row, one block per (dtype, shape, size)."""
    file = sys.stdout if file is None else file  # the stdout of the call
    cpu = record["device"]["type"] == "cpu"
    header = (f"{'run':<50} {'min ms':>9} {'med ms':>9} {'max ms':>9} {'host ms':>8} {'B/el':>5} "
              f"{'GB/s':>7} {'%copy':>6} {'xAdamW':>7} {'xivon-opt':>9}")
    if cpu:
        header += f" {'floor ms':>9} {'xfloor':>6}"
    blocks: dict = {}
    for row in record["rows"]:
        blocks.setdefault(config_key(row), []).append(row)
    for (dtype, shape, size), rows in blocks.items():
        first = rows[0]
        print(f"\n== {dtype} | {first['shape_desc']} | {_size(first['numel'])} params "
              f"({first['numel']:,})", file=file)
        print(header, file=file)
        for row in rows:
            speedup = row.get("speedup_vs_ivon_opt")
            line = (f"{row['run']:<50} {row['min_ms']:>9.3f} {row['median_ms']:>9.3f} "
                    f"{row['max_ms']:>9.3f} {_fmt(row['host_ms'], '8.3f'):>8} "
                    f"{row['bytes_per_element']:>5g} {_fmt(row['gbs'], '7.1f'):>7} "
                    f"{_fmt(row['copy_pct'], '6.0f'):>6} {row['ratio_vs_adamw']:>7.2f} "
                    f"{_fmt(speedup, '8.1f') + ('x' if speedup else ''):>9}")
            if cpu:
                line += (f" {_fmt(row.get('floor_ms'), '9.3f'):>9} "
                         f"{_fmt(row.get('floor_ratio'), '6.2f'):>6}")
            print(line, file=file)


def print_memory_table(record: dict, file=None) -> None:
    """Bytes per param at the largest size of each (dtype, shape)."""
    file = sys.stdout if file is None else file  # the stdout of the call
    largest: dict = {}
    for row in record["rows"]:
        if row.get("memory") is None:
            continue
        key = (row["dtype"], row["shape"])
        if key not in largest or row["numel"] > largest[key]:
            largest[key] = row["numel"]
    if not largest:
        return
    method = next(r["memory"]["peak_method"] for r in record["rows"] if r.get("memory"))
    print(f"\n== memory, bytes per param: optimizer state; resident (state + params + grads); "
          f"peak transient of one step [{method}]", file=file)
    print(f"{'dtype':<9} {'shape':<10} {'params':>7}  {'run':<50} {'state':>7} {'resident':>9} "
          f"{'peak':>7}", file=file)
    for row in record["rows"]:
        memory = row.get("memory")
        if memory is None or largest.get((row["dtype"], row["shape"])) != row["numel"]:
            continue
        print(f"{row['dtype']:<9} {row['shape']:<10} {_size(row['numel']):>7}  {row['run']:<50} "
              f"{memory['state_bytes_per_param']:>7.2f} {memory['resident_bytes_per_param']:>9.2f} "
              f"{_fmt(memory['peak_transient_bytes_per_param'], '7.2f'):>7}", file=file)


IVON_KINDS = ("drop_in_step", "drop_in_step_unchecked", BF16_STATE, "official_iteration")


def short_rows(rows: list) -> list:
    """One line per (dtype, shape, size, backend): the drop-in (checked and unchecked, fp32 and
    bf16 state) and official IVON rows."""
    table: dict = {}
    for row in rows:
        if row["kind"] not in IVON_KINDS:
            continue
        key = (row["dtype"], row["shape"], row["numel"], row["backend"])
        entry = table.setdefault(key, {})
        entry[row["kind"]] = row
    return [(key, entry) for key, entry in table.items()]


def print_short_table(records: list, file=None) -> None:
    """The headline figures: per size and backend, the drop-in step (with the finite check)
    against fused AdamW, what the check costs (x unchecked: the checked step's median over the
    unchecked one's), the drop-in step with bf16 state against fused AdamW, and the official
    iteration against ivon-opt's; then the targets' lines (``target_lines``)."""
    file = sys.stdout if file is None else file  # the stdout of the call
    for record in records:
        device = record["device"]
        cpu = device["type"] == "cpu"
        print(f"\n# {device['name']} ({device['type']}, {device.get('threads', '?')} threads) | "
              f"{record['date']} | copy {record['copy_bandwidth']['gbs_median']:.0f} GB/s | "
              f"{record['command']}", file=file)
        print(f"{'dtype':<9} {'shape':<10} {'params':>7} {'backend':<9} {'drop-in ms':>10} "
              f"{'xAdamW':>7} {'%copy':>6}{' xfloor' if cpu else ''} {'xunchk':>6} "
              f"{'bf16-state ms':>13} {'xAdamW':>7} "
              f"{'official ms':>11} "
              f"{'xAdamW':>7} {'xivon-opt':>9}", file=file)
        for (dtype, shape, numel, backend), entry in short_rows(record["rows"]):
            drop, official = entry.get("drop_in_step"), entry.get("official_iteration")
            low = entry.get(BF16_STATE)
            speedup = official.get("speedup_vs_ivon_opt") if official else None
            line = (f"{dtype:<9} {shape:<10} {_size(numel):>7} {backend:<9} "
                    f"{_fmt(drop and drop['median_ms'], '10.3f'):>10} "
                    f"{_fmt(drop and drop['ratio_vs_adamw'], '7.2f'):>7} "
                    f"{_fmt(drop and drop['copy_pct'], '6.0f'):>6}")
            if cpu:
                line += f" {_fmt(drop and drop.get('floor_ratio'), '6.2f'):>6}"
            line += f" {_fmt(drop and drop.get('check_ratio'), '6.3f'):>6}"
            line += (f" {_fmt(low and low['median_ms'], '13.3f'):>13}"
                     f" {_fmt(low and low['ratio_vs_adamw'], '7.2f'):>7}")
            line += (f" {_fmt(official and official['median_ms'], '11.3f'):>11} "
                     f"{_fmt(official and official['ratio_vs_adamw'], '7.2f'):>7} "
                     f"{_fmt(speedup, '8.1f') + ('x' if speedup else ''):>9}")
            print(line, file=file)
        if any(entry.get("drop_in_step", {}).get("check_ratio")
               for _, entry in short_rows(record["rows"])):
            print("# xunchk: the drop-in step (skip_nonfinite=True) over the same step without the "
                  "finite check, medians of the same rounds", file=file)
        if any(BF16_STATE in entry for _, entry in short_rows(record["rows"])):
            print("# bf16-state: the drop-in step (checked) with state_dtype=torch.bfloat16 "
                  "(bf16 momentum and hess, fp32 mean)", file=file)
        for line in target_lines(record):
            print(line, file=file)


def _state_bytes(row: dict | None):
    memory = (row or {}).get("memory") or {}
    return memory.get("state_bytes_per_param")


def target_lines(record: dict) -> list:
    """Issue 11's target for the drop-in step with bf16 state (``BF16_STATE_TARGET``): a line
    on its step time (on a GPU, at >= 64M fp32 params: <= 0.95x AdamW(fused=True), each
    configuration and backend below it) and one on its state memory (fp32 params: equal to
    AdamW's). Nothing when the record has no bf16-state row."""
    target = BF16_STATE_TARGET
    rows = [r for r in record["rows"] if r["kind"] == BF16_STATE]
    if not rows:
        return []
    lines = []
    what = (f"# target (issue 11): drop-in step with bf16 state <= {target['max_ratio']:.2f}x "
            f"AdamW(fused=True), on a GPU at >= {_size(target['min_size'])} "
            f"{target['dtype']} params")
    device = record["device"]["type"]
    big = [r for r in rows if r["dtype"] == target["dtype"] and r["size"] >= target["min_size"]]
    if device != target["device"]:
        lines.append(f"{what}: not checked (a {device} run)")
    elif not big:
        lines.append(f"{what}: not checked (no {target['dtype']} size >= "
                     f"{_size(target['min_size'])} timed)")
    else:
        met = [r["ratio_vs_adamw"] is not None and r["ratio_vs_adamw"] <= target["max_ratio"]
               for r in big]
        lines.append(f"{what}: {'met' if all(met) else 'NOT met'} ({sum(met)} of {len(big)})")
        for row, ok in zip(big, met):
            lines.append(f"#   {row['dtype']} {row['shape']} {_size(row['numel'])} "
                         f"{row['backend']}: {_fmt(row['ratio_vs_adamw'], '.3f')}x AdamW "
                         f"({'met' if ok else 'not met'})")
    anchors = {config_key(r): r for r in record["rows"] if r["kind"] == ANCHOR}
    fp32_state = {config_key(r) + (r["backend"],): r for r in record["rows"]
                  if r["kind"] == "drop_in_step"}
    checked = []
    for row in rows:
        ours, theirs = _state_bytes(row), _state_bytes(anchors.get(config_key(row)))
        if row["dtype"] != target["dtype"] or ours is None or theirs is None:
            continue
        ok = abs(ours - theirs) <= target["memory_tolerance"] * theirs
        before = _state_bytes(fp32_state.get(config_key(row) + (row["backend"],)))
        checked.append((row, ours, theirs, before, ok))
    what = (f"# target (issue 11): state memory of the drop-in step with bf16 state equal to "
            f"AdamW(fused=True)'s, {target['dtype']} params")
    if not checked:
        lines.append(f"{what}: not checked (no memory figures of {target['dtype']} params)")
        return lines
    largest = {}
    for item in checked:  # the largest size per (shape, backend), as the memory table
        key = (item[0]["shape"], item[0]["backend"])
        if key not in largest or item[0]["numel"] > largest[key][0]["numel"]:
            largest[key] = item
    ok = all(item[4] for item in checked)
    lines.append(f"{what}: {'met' if ok else 'NOT met'} (bytes per param; at every size, the "
                 "largest shown)")
    for row, ours, theirs, before, good in largest.values():
        fp32_note = "" if before is None else f"; with fp32 state {before:.2f}"
        lines.append(f"#   {row['dtype']} {row['shape']} {_size(row['numel'])} {row['backend']}: "
                     f"{ours:.2f} against AdamW's {theirs:.2f} ({'met' if good else 'not met'}"
                     f"{fp32_note})")
    return lines


def print_host_table(record: dict, file=None) -> None:
    """The host-cost section: microseconds of one step() per tensor count, and per tensor."""
    file = sys.stdout if file is None else file  # the stdout of the call
    host = record.get("host_cost")
    if not host or not host.get("rows"):
        return
    slopes = {(s["run"], s["to_tensors"]): s["us_per_tensor"] for s in host["slopes"]}
    print(f"\n== host cost of one step(), {host['dtype']}, N one-element tensors, "
          f"{host['rounds']} alternated rounds [{host['method']}]", file=file)
    print(f"{'N':>5} {'run':<50} {'min us':>9} {'med us':>9} {'max us':>9} {'xAdamW':>7} "
          f"{'us/tensor':>9}", file=file)
    previous = None
    for row in host["rows"]:
        if previous is not None and row["tensors"] != previous:
            print(file=file)
        previous = row["tensors"]
        print(f"{row['tensors']:>5} {row['run']:<50} {row['min_us']:>9.1f} "
              f"{row['median_us']:>9.1f} {row['max_us']:>9.1f} {row['ratio_vs_adamw']:>7.2f} "
              f"{_fmt(slopes.get((row['run'], row['tensors'])), '9.3f'):>9}", file=file)
    if host["slopes"]:
        print("# us/tensor: (median at N - median at the previous N) / (N - previous N)",
              file=file)


def write_json(record: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(record, handle, indent=1)



def _line_style(kind: str) -> str:
    """AdamW dashed, the drop-in step without the finite check dotted, with bf16 state
    dash-dotted, the rest solid."""
    if kind.startswith("adamw"):
        return "--"
    if kind == BF16_STATE:
        return "-."
    return ":" if kind.endswith("unchecked") else "-"


def _errorbar_runs(ax, rows: list, x_key: str, unit: str) -> dict:
    """One line per run: the median against ``x_key`` with a min..max bar; the runs, sorted."""
    runs: dict = {}
    for row in rows:
        runs.setdefault(row["run"], []).append(row)
    for run, points in runs.items():
        points.sort(key=lambda r: r[x_key])
        median = [r[f"median_{unit}"] for r in points]
        spread = [[m - r[f"min_{unit}"] for m, r in zip(median, points)],
                  [r[f"max_{unit}"] - m for m, r in zip(median, points)]]
        ax.errorbar([r[x_key] for r in points], median, yerr=spread,
                    fmt="o" + _line_style(points[0]["kind"]), capsize=3, label=run, ms=4)
    return runs

def plot(record: dict, path: str) -> str | None:
    """Draw time and ratio against size; returns None, or why no plot was drawn."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ("matplotlib is not installed: no plot (pip install -e '.[bench]', or draw it "
                f"later with `python -m bench.report --plot {path[:-4]}.json`)")
    panels: dict = {}
    for row in record["rows"]:
        panels.setdefault((row["dtype"], row["shape"]), []).append(row)
    if not panels:
        return "no rows to plot"
    fig, axes = plt.subplots(len(panels), 2, figsize=(13, 4.2 * len(panels)), squeeze=False)
    for (dtype, shape), rows in panels.items():
        time_ax, ratio_ax = axes[list(panels).index((dtype, shape))]
        runs = _errorbar_runs(time_ax, rows, "numel", "ms")
        for run, points in runs.items():
            if points[0]["kind"] != "ivon_opt_iteration":
                ratio_ax.plot([r["numel"] for r in points],
                              [r["ratio_vs_adamw"] for r in points],
                              "o" + _line_style(points[0]["kind"]), label=run, ms=4)
        byte_floor = rows[0].get("byte_floor_ratio")
        checked_floor = rows[0].get("byte_floor_ratio_checked")
        ratio_ax.axhline(1.0, color="gray", lw=0.8)
        if byte_floor:
            ratio_ax.axhline(byte_floor, color="gray", lw=0.8, ls=":",
                             label=f"byte model, drop-in / AdamW = {byte_floor:.2f}")
        if checked_floor:
            ratio_ax.axhline(checked_floor, color="gray", lw=0.8, ls="-.",
                             label=f"byte model, checked drop-in / AdamW = {checked_floor:.2f}")
        bf16_floor = rows[0].get("byte_floor_ratio_bf16_state")
        if bf16_floor and any(r["kind"] == BF16_STATE for r in rows):
            ratio_ax.axhline(bf16_floor, color="tab:brown", lw=0.8, ls="-.",
                             label=f"byte model, drop-in bf16 state / AdamW = {bf16_floor:.2f}")
        for ax in (time_ax, ratio_ax):
            ax.set_xscale("log")
            ax.set_xlabel("params")
            ax.grid(True, which="both", alpha=0.3)
        time_ax.set_yscale("log")
        time_ax.set_ylabel("ms per step (median, min-max)")
        time_ax.set_title(f"{dtype}, {rows[0]['shape_desc'].split(' (')[0]}: time")
        ratios = [r["ratio_vs_adamw"] for r in rows if r["kind"] != "ivon_opt_iteration"
                  and r["ratio_vs_adamw"]]
        if ratios and max(ratios) / min(ratios) > 20:
            ratio_ax.set_yscale("log")
        ratio_ax.set_ylabel("x AdamW(fused=True) (median)")
        ratio_ax.set_title(f"{dtype}, {shape}: ratio to fused AdamW")
        time_ax.legend(fontsize=7)
        ratio_ax.legend(fontsize=7)
    device = record["device"]
    fig.suptitle(f"ivon_fast microbenchmark: {device['name']} ({device['type']}), "
                 f"{record['date']}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (4.2 * len(panels))))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def plot_host(record: dict, path: str) -> str | None:
    """Host microseconds per step against the tensor count (log-log); None, or why no plot."""
    host = record.get("host_cost")
    if not host or not host.get("rows"):
        return "no host-cost rows to plot"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ("matplotlib is not installed: no host-cost plot (pip install -e '.[bench]', or "
                f"draw it later with `python -m bench.report --plot {path[:-9]}.json`)")
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    _errorbar_runs(ax, host["rows"], "tensors", "us")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_xlabel("tensors (one element each)")
    ax.set_ylabel("host us per step() (median, min-max)")
    device = record["device"]
    ax.set_title(f"host cost of one step(), {host['dtype']}: {device['name']} "
                 f"({device['type']}), {record['date']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="JSON records written by python -m bench")
    parser.add_argument("--plot", action="store_true", help="draw FILE.png next to each FILE.json")
    parser.add_argument("--out", default=None, help="folder for the plots (default: the JSON's)")
    parser.add_argument("--full", action="store_true", help="print the full tables too")
    parser.add_argument("--host", action="store_true", help="print the host-cost tables too")
    args = parser.parse_args(argv)
    records = []
    for name in args.files:
        with open(name) as handle:
            record = json.load(handle)
        records.append(record)
        if args.full:
            print_table(record)
            print_memory_table(record)
        if args.full or args.host:
            print_host_table(record)
        if args.plot:
            target = os.path.splitext(name)[0] + ".png"
            if args.out:
                os.makedirs(args.out, exist_ok=True)
                target = os.path.join(args.out, os.path.basename(target))
            if record["rows"]:
                problem = plot(record, target)
                print(problem or f"plot: {target}", file=sys.stderr)
            if record.get("host_cost"):
                host_target = os.path.splitext(target)[0] + "_host.png"
                problem = plot_host(record, host_target)
                print(problem or f"host-cost plot: {host_target}", file=sys.stderr)
    print_short_table(records)


if __name__ == "__main__":
    main()
