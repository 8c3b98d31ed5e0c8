"""The microbenchmark's output: the tables, the JSON record and the plot.

    python -m bench.report RESULTS.json [...]           # the short table of recorded results
    python -m bench.report --plot RESULTS.json [...]    # (re)draw RESULTS_time.png and
                                                        # RESULTS_ratio.png next to each JSON
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
ANCHOR_LABEL = "AdamW(fused=True)"
BF16_STATE = "drop_in_step_bf16_state"
# the target for the drop-in step with bf16 state (docs/DESIGN.md section 16): on a GPU,
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


def _ratio(value, noisy, width: int, spec: str = ".2f", suffix: str = "") -> str:
    """A ratio for the tables: "~" before it when its row is noisy (not reliable)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return f"{'-':>{width}}"
    return f"{('~' if noisy else '') + format(value, spec) + suffix:>{width}}"


def noise_tag(row: dict) -> str:
    """Why a row is noisy, in a few characters (the tables' ``noisy`` column); "" if steady."""
    noise = row.get("noise") or {}
    if not row.get("noisy"):
        return ""
    tags = []
    drift, spread = noise.get("bandwidth_drift"), noise.get("spread")
    if drift is not None and drift > noise.get("bandwidth_drift_max", 0.15):
        tags.append(f"bw {100 * drift:.0f}%")
    if (spread is not None and spread > noise.get("spread_max", 0.10)
            and any("interquartile" in r and not r.startswith("its anchor")
                    for r in noise.get("reasons", []))):
        tags.append(f"iqr {100 * spread:.0f}%")
    others = noise.get("cpu_others")
    if others is not None and others > noise.get("cpu_others_max", 0.25):
        tags.append(f"cpu {100 * others:.0f}%")
    if any(r.startswith("its anchor") for r in noise.get("reasons", [])):
        tags.append("anchor")
    return ",".join(tags) or "yes"


def print_table(record: dict, file=None) -> None:
    """Every row, one block per (dtype, shape, size); "~" marks the ratios of a noisy row (the
    ``noisy`` column says why: bw, the copy bandwidth moved; iqr, the rounds spread; cpu, other
    processes took that share of the machine's CPU time; anchor, fused AdamW's row is noisy)."""
    file = sys.stdout if file is None else file  # the stdout of the call
    cpu = record["device"]["type"] == "cpu"
    header = (f"{'run':<50} {'min ms':>9} {'med ms':>9} {'max ms':>9} {'host ms':>8} {'B/el':>5} "
              f"{'GB/s':>7} {'%copy':>6} {'xAdamW':>7} {'xivon-opt':>9}")
    if cpu:
        header += f" {'floor ms':>9} {'xfloor':>6}"
    header += "  noisy"
    blocks: dict = {}
    for row in record["rows"]:
        blocks.setdefault(config_key(row), []).append(row)
    for (dtype, shape, size), rows in blocks.items():
        first = rows[0]
        attempts = (first.get("noise") or {}).get("attempts")
        print(f"\n== {dtype} | {first['shape_desc']} | {_size(first['numel'])} params "
              f"({first['numel']:,})" + (f" | measured {attempts} times" if attempts and attempts
                                         > 1 else ""), file=file)
        print(header, file=file)
        for row in rows:
            noisy = row.get("noisy")
            speedup = row.get("speedup_vs_ivon_opt")
            line = (f"{row['run']:<50} {row['min_ms']:>9.3f} {row['median_ms']:>9.3f} "
                    f"{row['max_ms']:>9.3f} {_fmt(row['host_ms'], '8.3f'):>8} "
                    f"{row['bytes_per_element']:>5g} {_fmt(row['gbs'], '7.1f'):>7} "
                    f"{_fmt(row['copy_pct'], '6.0f'):>6} "
                    f"{_ratio(row['ratio_vs_adamw'], noisy, 7)} "
                    f"{_ratio(speedup, noisy, 9, '.1f', 'x')}")
            if cpu:
                line += (f" {_fmt(row.get('floor_ms'), '9.3f'):>9} "
                         f"{_ratio(row.get('floor_ratio'), noisy, 6)}")
            line += f"  {noise_tag(row)}"
            print(line.rstrip(), file=file)


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
        if not record["rows"]:
            continue
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
            d_noisy = bool(drop and drop.get("noisy"))
            l_noisy = bool(low and low.get("noisy"))
            o_noisy = bool(official and official.get("noisy"))
            line = (f"{dtype:<9} {shape:<10} {_size(numel):>7} {backend:<9} "
                    f"{_fmt(drop and drop['median_ms'], '10.3f'):>10} "
                    f"{_ratio(drop and drop['ratio_vs_adamw'], d_noisy, 7)} "
                    f"{_fmt(drop and drop['copy_pct'], '6.0f'):>6}")
            if cpu:
                line += f" {_ratio(drop and drop.get('floor_ratio'), d_noisy, 6)}"
            line += f" {_ratio(drop and drop.get('check_ratio'), d_noisy, 6, '.3f')}"
            line += (f" {_fmt(low and low['median_ms'], '13.3f'):>13}"
                     f" {_ratio(low and low['ratio_vs_adamw'], l_noisy, 7)}")
            line += (f" {_fmt(official and official['median_ms'], '11.3f'):>11} "
                     f"{_ratio(official and official['ratio_vs_adamw'], o_noisy, 7)} "
                     f"{_ratio(speedup, o_noisy, 9, '.1f', 'x')}")
            print(line, file=file)
        if any(entry.get("drop_in_step", {}).get("check_ratio")
               for _, entry in short_rows(record["rows"])):
            print("# xunchk: the drop-in step (skip_nonfinite=True) over the same step without the "
                  "finite check, medians of the same rounds", file=file)
        if any(row.get("noisy") for row in record["rows"]):
            print("# ~: measured on a busy machine, not reliable (see the warning below)",
                  file=file)
        if any(BF16_STATE in entry for _, entry in short_rows(record["rows"])):
            print("# bf16-state: the drop-in step (checked) with state_dtype=torch.bfloat16 "
                  "(bf16 momentum and hess, fp32 mean)", file=file)
        for line in target_lines(record):
            print(line, file=file)


def _state_bytes(row: dict | None):
    memory = (row or {}).get("memory") or {}
    return memory.get("state_bytes_per_param")


def target_lines(record: dict) -> list:
    """The target for the drop-in step with bf16 state (``BF16_STATE_TARGET``): a line
    on its step time (on a GPU, at >= 64M fp32 params: <= 0.95x AdamW(fused=True), each
    configuration and backend below it) and one on its state memory (fp32 params: equal to
    AdamW's). Nothing when the record has no bf16-state row."""
    target = BF16_STATE_TARGET
    rows = [r for r in record["rows"] if r["kind"] == BF16_STATE]
    if not rows:
        return []
    lines = []
    what = (f"# target: the drop-in step with bf16 state <= {target['max_ratio']:.2f}x fused "
            f"AdamW on a GPU at >= {_size(target['min_size'])} {target['dtype']} params")
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
            noisy = "; noisy: not reliable" if row.get("noisy") else ""
            lines.append(f"#   {row['dtype']} {row['shape']} {_size(row['numel'])} "
                         f"{row['backend']}: {'~' if noisy else ''}"
                         f"{_fmt(row['ratio_vs_adamw'], '.3f')}x AdamW "
                         f"({'met' if ok else 'not met'}{noisy})")
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
    what = (f"# target: the state memory of the drop-in step with bf16 state equal to fused "
            f"AdamW's, {target['dtype']} params")
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


def _slope_text(slope: dict | None) -> str:
    """A per-tensor slope for the host table: "<" its noise when the difference is below it."""
    if slope is None:
        return "-"
    if slope.get("below_noise"):
        return f"<{slope.get('us_per_tensor_noise', 0.0):.3f}"
    return f"{slope['us_per_tensor']:.3f}"


def print_host_table(record: dict, file=None) -> None:
    """The host-cost section: microseconds of one step() per tensor count, and per tensor."""
    file = sys.stdout if file is None else file  # the stdout of the call
    host = record.get("host_cost")
    if not host or not host.get("rows"):
        return
    slopes = {(s["run"], s["to_tensors"]): s for s in host["slopes"]}
    print(f"\n== host cost of one step(), {host['dtype']}, N one-element tensors, "
          f"{host['rounds']} alternated rounds [{host['method']}]", file=file)
    print(f"{'N':>5} {'run':<50} {'min us':>9} {'med us':>9} {'max us':>9} {'xAdamW':>7} "
          f"{'us/tensor':>9}  noisy", file=file)
    previous = None
    for row in host["rows"]:
        if previous is not None and row["tensors"] != previous:
            print(file=file)
        previous = row["tensors"]
        line = (f"{row['tensors']:>5} {row['run']:<50} {row['min_us']:>9.1f} "
                f"{row['median_us']:>9.1f} {row['max_us']:>9.1f} "
                f"{_ratio(row['ratio_vs_adamw'], row.get('noisy'), 7)} "
                f"{_slope_text(slopes.get((row['run'], row['tensors']))):>9}  {noise_tag(row)}")
        print(line.rstrip(), file=file)
    if host["slopes"]:
        print("# us/tensor: (median at N - median at the previous N) / (N - previous N); "
              "\"<x\": the difference is below its noise (the two medians' interquartile "
              "ranges, x per tensor), so no per-tensor cost is resolved", file=file)


def noise_lines(record: dict) -> list:
    """The closing verdict on the machine: which rows were measured on a busy machine (their
    ratios are not reliable) and why, or that all were steady. Nothing for a record without
    noise verdicts (written before they existed)."""
    rows = record.get("rows") or []
    host = record.get("host_cost") or {}
    host_rows = host.get("rows") or []
    if not any("noisy" in row for row in rows + host_rows):
        return []
    limits = record.get("noise_limits") or {}
    drift_max = 100 * limits.get("bandwidth_drift_max", 0.15)
    spread_max = 100 * limits.get("spread_max", 0.10)
    lines = []
    noisy = [row for row in rows if row.get("noisy")]
    if noisy:
        lines.append(f"# WARNING: {len(noisy)} of {len(rows)} rows were measured on a busy "
                     "machine; their ratios are not reliable (marked ~ in the tables, hollow "
                     "in the plots):")
        groups: dict = {}
        for row in noisy:
            groups.setdefault(config_key(row), []).append(row)
        for key, members in groups.items():
            first = members[0]
            common = [r for r in first["noise"]["reasons"]
                      if all(r in m["noise"]["reasons"] for m in members)]
            total = sum(1 for row in rows if config_key(row) == key)
            attempts = first["noise"].get("attempts", 1)
            head = (f"#   {first['dtype']} {first['shape']} {_size(first['numel'])} "
                    f"({len(members)} of {total} rows; measured {attempts} time"
                    f"{'s' if attempts != 1 else ''})")
            lines.append(head + (": " + "; ".join(common) if common else ":"))
            through_anchor = []
            for row in members:
                extra = [r for r in row["noise"]["reasons"] if r not in common]
                own = [r for r in extra if not r.startswith("its anchor")]
                if own:
                    lines.append(f"#     {row['run']}: {'; '.join(own)}")
                elif extra:
                    through_anchor.append(row["run"])
            if through_anchor:
                lines.append(f"#     through their anchor, {ANCHOR_LABEL}: "
                             + ", ".join(through_anchor))
    elif rows:
        others_max = 100 * limits.get("cpu_others_max", 0.25)
        lines.append(f"# noise: all {len(rows)} rows steady (copy bandwidth within "
                     f"{drift_max:.0f}% before and after each configuration, rounds' "
                     f"interquartile range within {spread_max:.0f}% of the median, other "
                     f"processes under {others_max:.0f}% of the CPU time)")
    noisy_host = [row for row in host_rows if row.get("noisy")]
    if noisy_host:
        lines.append(f"# WARNING: {len(noisy_host)} of {len(host_rows)} host-cost rows were "
                     "measured on a busy machine; their times are not reliable (iqr: the "
                     "rounds' spread; cpu: other processes' share of the CPU time):")
        for count in dict.fromkeys(row["tensors"] for row in noisy_host):
            lines.append(f"#   {count} tensors: " + ", ".join(
                f"{row['run']} ({noise_tag(row)})" for row in noisy_host
                if row["tensors"] == count))
    if noisy or noisy_host:
        lines.append("# for figures to keep, run again with nothing else running on the machine")
    below = [s for s in host.get("slopes") or [] if s.get("below_noise")]
    if below:
        lines.append(f"# host cost: {len(below)} of {len(host['slopes'])} per-tensor slopes are "
                     "below their noise (printed as <x): "
                     + ", ".join(f"{s['run']} {s['from_tensors']}->{s['to_tensors']}"
                                 for s in below))
    return lines


def write_json(record: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(record, handle, indent=1)



# One colour per contender, (kind, backend), the same in every plot: AdamW black (fused) and
# grey (foreach), ivon-opt red, each ivon_fast backend a hue (cpu blue, cuda green, triton orange,
# reference brown) with one shade per step kind.
COLOURS = {
    ("adamw_fused", None): "#000000", ("adamw_foreach", None): "#8c8c8c",
    ("ivon_opt_iteration", None): "#d62728",
    ("drop_in_step", "cpu"): "#1f77b4", ("drop_in_step_unchecked", "cpu"): "#9ecae1",
    (BF16_STATE, "cpu"): "#17becf", ("official_iteration", "cpu"): "#5e3c99",
    ("drop_in_step", "cuda"): "#2ca02c", ("drop_in_step_unchecked", "cuda"): "#a1d99b",
    (BF16_STATE, "cuda"): "#bcbd22", ("official_iteration", "cuda"): "#00441b",
    ("drop_in_step", "triton"): "#ff7f0e", ("drop_in_step_unchecked", "triton"): "#fdd0a2",
    (BF16_STATE, "triton"): "#d6a000", ("official_iteration", "triton"): "#8c2d04",
    ("drop_in_step", "reference"): "#8c564b", ("drop_in_step_unchecked", "reference"): "#c49c94",
    (BF16_STATE, "reference"): "#e377c2", ("official_iteration", "reference"): "#7f2704",
}
SPARE_COLOURS = ("#7f7f00", "#006d77", "#c51b7d", "#4d4d4d", "#b35806", "#1b9e77")
# the model shape: marker and line style (the colour is the contender's)
SHAPE_STYLE = {"few-large": ("o", "-"), "gpt2": ("s", "--")}
CONTENDER_ORDER = ("adamw_fused", "adamw_foreach", "drop_in_step", "drop_in_step_unchecked",
                   BF16_STATE, "official_iteration", "ivon_opt_iteration")


def contender_key(row: dict) -> tuple:
    return (row["kind"], row.get("backend"))


def colours_for(keys) -> dict:
    """A colour per contender key: ``COLOURS``, then spare colours for unknown ones, all
    distinct."""
    colours, spare = {}, [c for c in SPARE_COLOURS]
    for key in keys:
        colour = COLOURS.get(key)
        if colour is None or colour in colours.values():
            colour = spare.pop(0) if spare else f"C{len(colours) % 10}"
        colours[key] = colour
    return colours


def _sorted_keys(rows: list) -> list:
    keys = list(dict.fromkeys(contender_key(r) for r in rows))
    order = {kind: i for i, kind in enumerate(CONTENDER_ORDER)}
    return sorted(keys, key=lambda k: (order.get(k[0], 99), str(k[1])))


def _lone_point_notes(record: dict, rows: list) -> list:
    """Why a contender has fewer points than the others (the reference backend and ivon-opt stop
    at their --*-max size), in words."""
    args = record.get("args") or {}
    notes = []
    panels: dict = {}
    for row in rows:
        panels.setdefault((row["dtype"], row["shape"]), []).append(row)
    for members in panels.values():
        sizes = {r["size"] for r in members}
        for key in _sorted_keys(members):
            mine = {r["size"] for r in members if contender_key(r) == key}
            if mine >= sizes:
                continue
            if key[1] == "reference":
                limit = args.get("reference_max")
                text = ("reference backend (the specification in plain torch, 50x-200x slower): "
                        f"timed only up to --reference-max {_size(limit) if limit else '?'}")
            elif key[0] == "ivon_opt_iteration":
                limit = args.get("ivon_opt_max")
                text = (f"ivon-opt: timed only up to --ivon-opt-max "
                        f"{_size(limit) if limit else '?'}")
            else:
                run = next(r["run"] for r in members if contender_key(r) == key)
                text = f"{run}: only at {', '.join(_size(n) for n in sorted(mine))}"
            if text not in notes:
                notes.append(text)
    return notes


def _series(ax, rows: list, x_key: str, y_key: str, low_high, colour: str, shape: str,
            gid: str) -> None:
    """One contender in one shape: a line through the medians with error bars (``low_high``
    gives each row's (low, high)), markers filled where steady and hollow where noisy."""
    marker, style = SHAPE_STYLE.get(shape, ("^", ":"))
    points = sorted(rows, key=lambda r: r[x_key])
    xs, ys = [r[x_key] for r in points], [r[y_key] for r in points]
    bounds = [low_high(r) for r in points]
    yerr = [[max(0.0, y - lo) for y, (lo, _) in zip(ys, bounds)],
            [max(0.0, hi - y) for y, (_, hi) in zip(ys, bounds)]]
    ax.errorbar(xs, ys, yerr=yerr, color=colour, linestyle=style, lw=1.2, capsize=2.5,
                elinewidth=0.9, marker="none")
    steady = [(x, y) for x, y, r in zip(xs, ys, points) if not r.get("noisy")]
    noisy = [(x, y) for x, y, r in zip(xs, ys, points) if r.get("noisy")]
    if steady:
        line, = ax.plot(*zip(*steady), marker=marker, linestyle="none", color=colour, ms=5)
        line.set_gid(gid)
    if noisy:
        line, = ax.plot(*zip(*noisy), marker=marker, linestyle="none", color=colour, ms=6,
                        markerfacecolor="white", markeredgewidth=1.3)
        line.set_gid(gid)


def _legend_handles(labels: dict, colours: dict, shapes: list, noisy: bool, extra=()) -> tuple:
    from matplotlib.lines import Line2D
    handles, names = [], []
    for key, label in labels.items():
        handles.append(Line2D([], [], color=colours[key], marker="o", lw=2))
        names.append(label)
    for shape in shapes:
        marker, style = SHAPE_STYLE.get(shape, ("^", ":"))
        handles.append(Line2D([], [], color="#555555", marker=marker, linestyle=style))
        names.append(f"shape: {shape}")
    if noisy:
        handles.append(Line2D([], [], color="#555555", marker="o", markerfacecolor="white",
                              linestyle="none"))
        names.append("hollow: busy machine, not reliable")
    for handle, name in extra:
        handles.append(handle)
        names.append(name)
    return handles, names


def _figure(plt, panels: int, title: str, notes: list):
    """A figure of ``panels`` axes side by side with room on the right for the legend and at
    the top for the title and notes; returns (fig, axes, legend x in figure coordinates)."""
    panel_w, legend_w, height = 5.4, 4.2, 5.0
    width = panel_w * panels + legend_w
    note_lines = max(1, len(notes))
    top_in = 0.55 + 0.19 * note_lines
    fig, axes = plt.subplots(1, panels, figsize=(width, height + top_in), squeeze=False)
    right = (panel_w * panels) / width
    fig.subplots_adjust(left=1.0 / width, right=right, wspace=0.3, bottom=0.11,
                        top=1 - (top_in + 0.35) / (height + top_in))
    fig.suptitle(title, fontsize=11, y=1 - 0.15 / (height + top_in), va="top")
    if notes:
        fig.text(0.5 * right, 1 - 0.5 / (height + top_in), "\n".join(notes), ha="center",
                 va="top", fontsize=8, color="#333333")
    return fig, list(axes[0]), right + 0.012


def _size_axis(ax, values) -> None:
    """A log x axis of param (or tensor) counts, ticks at the values timed, named as 64K, 1M."""
    ax.set_xscale("log")
    ticks = sorted(set(values))
    ax.set_xticks(ticks)
    ax.set_xticklabels([_size(v) for v in ticks])
    ax.minorticks_off()
    if len(ticks) == 1:
        ax.set_xlim(ticks[0] / 2, ticks[0] * 2)


def _style(record: dict) -> dict:
    """What both plots of a record share: the rows, dtypes (one panel each), shapes (line
    styles), contenders with their colours and labels, notes on lone points, the title's
    where."""
    rows = record["rows"]
    device = record["device"]
    keys = _sorted_keys(rows)
    return {"rows": rows, "dtypes": list(dict.fromkeys(r["dtype"] for r in rows)),
            "shapes": list(dict.fromkeys(r["shape"] for r in rows)), "keys": keys,
            "colours": colours_for(keys),
            "labels": {key: next(r["run"] for r in rows if contender_key(r) == key)
                       for key in keys},
            "noisy": any(r.get("noisy") for r in rows),
            "lone": _lone_point_notes(record, rows),
            "where": f"{device.get('name', device['type'])} ({device['type']}), "
                     f"{record.get('date', '')}"}


def _draw_panels(axes, style: dict, keys: list, y_key: str, low_high) -> dict:
    """Every contender of ``keys`` in every shape, one panel per dtype; the y values per dtype."""
    values: dict = {}
    for ax, dtype in zip(axes, style["dtypes"]):
        for key in keys:
            for shape in style["shapes"]:
                series = [r for r in style["rows"] if r["dtype"] == dtype
                          and r["shape"] == shape and contender_key(r) == key
                          and r.get(y_key)]
                if series:
                    _series(ax, series, "numel", y_key, low_high, style["colours"][key], shape,
                            style["labels"][key])
                    values.setdefault(dtype, []).extend(r[y_key] for r in series)
        _size_axis(ax, [r["numel"] for r in style["rows"] if r["dtype"] == dtype])
        ax.set_xlabel("params")
        ax.set_title(f"{dtype} params", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    return values


def time_figure(record: dict, plt):
    """Time per step against size per contender: median, min-max bars."""
    style = _style(record)
    fig, axes, legend_x = _figure(plt, len(style["dtypes"]),
                                  f"Time per optimizer step: {style['where']}",
                                  style["lone"] + ["bars: min to max over the rounds"])
    _draw_panels(axes, style, style["keys"], "median_ms", lambda r: (r["min_ms"], r["max_ms"]))
    for ax in axes:
        ax.set_yscale("log")
        ax.set_ylabel("ms per step (median)")
    handles, names = _legend_handles(style["labels"], style["colours"], style["shapes"],
                                     style["noisy"])
    fig.legend(handles, names, loc="center left", bbox_to_anchor=(legend_x, 0.5), fontsize=8,
               frameon=False)
    return fig


def ratio_figure(record: dict, plt):
    """The ratio to AdamW(fused=True) against size per contender: median over median, bars the
    interquartile range of the round-by-round ratios; the byte model's floors as grey lines."""
    from matplotlib.lines import Line2D
    style = _style(record)
    keys = [k for k in style["keys"] if k[0] != ANCHOR]
    anchor_colour = style["colours"].get((ANCHOR, None), "#000000")
    fig, axes, legend_x = _figure(
        plt, len(style["dtypes"]), f"Ratio to AdamW(fused=True): {style['where']}",
        style["lone"] + ["bars: interquartile range of the round-by-round ratios (each pair "
                         "timed in the same round)"])
    values = _draw_panels(axes, style, keys, "ratio_vs_adamw",
                          lambda r: (r.get("ratio_q1", r["ratio_vs_adamw"]),
                                     r.get("ratio_q3", r["ratio_vs_adamw"])))
    floors = {}
    for ax, dtype in zip(axes, style["dtypes"]):
        ax.axhline(1.0, color=anchor_colour, lw=1.0, alpha=0.6)
        first = next(r for r in style["rows"] if r["dtype"] == dtype)
        kinds = {r["kind"] for r in style["rows"] if r["dtype"] == dtype}
        for kind, field, line in (("drop_in_step", "byte_floor_ratio_checked", "-."),
                                  (BF16_STATE, "byte_floor_ratio_bf16_state", ":")):
            if kind in kinds and first.get(field):
                ax.axhline(first[field], color="#777777", lw=0.9, ls=line)
                ax.annotate(f"{first[field]:.2f}", xy=(1.0, first[field]),
                            xycoords=("axes fraction", "data"), xytext=(3, 0),
                            textcoords="offset points", fontsize=7, color="#555555",
                            va="center")
                floors[kind] = line
        seen = values.get(dtype, []) + [1.0]
        if max(seen) / min(seen) > 20:
            ax.set_yscale("log")
        ax.set_ylabel("x AdamW(fused=True) (median / median)")
    extra = [(Line2D([], [], color=anchor_colour, lw=1.0, alpha=0.6), "AdamW(fused=True) = 1")]
    for kind, line in floors.items():
        what = "drop-in step" if kind == "drop_in_step" else "drop-in step, bf16 state"
        extra.append((Line2D([], [], color="#777777", lw=0.9, ls=line),
                      f"byte model: {what} / AdamW"))
    handles, names = _legend_handles({k: style["labels"][k] for k in keys}, style["colours"],
                                     style["shapes"], style["noisy"], extra)
    fig.legend(handles, names, loc="center left", bbox_to_anchor=(legend_x, 0.5), fontsize=8,
               frameon=False)
    return fig


def figures(record: dict) -> dict:
    """The two plots of a record, as matplotlib figures: "time" (``time_figure``) and "ratio"
    (``ratio_figure``). One panel per param dtype, the model shapes as line styles, one colour
    per contender (``COLOURS``, the same in both), hollow markers for noisy rows, the legend
    right of the panels, notes under the title for contenders with fewer points. Needs
    matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return {"time": time_figure(record, plt), "ratio": ratio_figure(record, plt)}


def plot_paths(path: str) -> list:
    """The files ``plot`` writes for ``path`` (PATH.png): PATH_time.png and PATH_ratio.png."""
    base = os.path.splitext(path)[0]
    return [base + "_time.png", base + "_ratio.png"]


def plot(record: dict, path: str) -> str | None:
    """Draw the time and ratio plots (``figures``) into ``plot_paths(path)``; returns None, or
    why no plot was drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return ("matplotlib is not installed: no plot (pip install -e '.[bench]', or draw it "
                f"later with `python -m bench.report --plot {os.path.splitext(path)[0]}.json`)")
    if not record["rows"]:
        return "no rows to plot"
    import matplotlib.pyplot as plt
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    made = figures(record)
    for (name, fig), target in zip(made.items(), plot_paths(path)):
        fig.savefig(target, dpi=110)
        plt.close(fig)
    return None


def host_figure(record: dict):
    """Host microseconds per step against the tensor count (log-log), one colour per contender
    (as in ``figures``), the legend right of the axes. Needs matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    host = record["host_cost"]
    rows = host["rows"]
    device = record["device"]
    keys = _sorted_keys(rows)
    colours = colours_for(keys)
    labels = {key: next(r["run"] for r in rows if contender_key(r) == key) for key in keys}
    below = [s for s in host.get("slopes") or [] if s.get("below_noise")]
    notes = ["bars: min to max over the rounds"]
    if below:
        notes.append(f"{len(below)} per-tensor slopes are below their noise (see the table)")
    fig, axes, legend_x = _figure(
        plt, 1, f"Host cost of one step(), {host['dtype']}: {device.get('name', '')} "
        f"({device['type']}), {record.get('date', '')}", notes)
    ax = axes[0]
    for key in keys:
        series = [r for r in rows if contender_key(r) == key]
        _series(ax, series, "tensors", "median_us", lambda r: (r["min_us"], r["max_us"]),
                colours[key], "few-large", labels[key])
    _size_axis(ax, [r["tensors"] for r in rows])
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_xlabel("tensors (one element each)")
    ax.set_ylabel("host us per step() (median)")
    handles, names = _legend_handles(labels, colours, [], any(r.get("noisy") for r in rows))
    fig.legend(handles, names, loc="center left", bbox_to_anchor=(legend_x, 0.5), fontsize=8,
               frameon=False)
    return fig


def plot_host(record: dict, path: str) -> str | None:
    """Draw ``host_figure`` into ``path``; None, or why no plot."""
    host = record.get("host_cost")
    if not host or not host.get("rows"):
        return "no host-cost rows to plot"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return ("matplotlib is not installed: no host-cost plot (pip install -e '.[bench]', or "
                f"draw it later with `python -m bench.report --plot {path[:-9]}.json`)")
    import matplotlib.pyplot as plt
    fig = host_figure(record)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="JSON records written by python -m bench")
    parser.add_argument("--plot", action="store_true",
                        help="draw FILE_time.png and FILE_ratio.png (and FILE_host.png) next to "
                             "each FILE.json")
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
                print(problem or f"plots: {', '.join(plot_paths(target))}", file=sys.stderr)
            if record.get("host_cost"):
                host_target = os.path.splitext(target)[0] + "_host.png"
                problem = plot_host(record, host_target)
                print(problem or f"host-cost plot: {host_target}", file=sys.stderr)
    print_short_table(records)
    for record in records:
        for line in noise_lines(record):
            print(line)


if __name__ == "__main__":
    main()
