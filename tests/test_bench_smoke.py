"""The benchmark's quick mode runs end to end (a smoke test; the figures are not checked).

What is checked is what the report promises independently of the timings: every contender has a
row with a spread, the byte model of docs/DESIGN.md sections 6 and 11 (28 bytes per element for
AdamW, 32 for the drop-in step without the finite check, 36 with it: the check reads the grads
once more), the ratio against fused AdamW measured in the same run, the checked drop-in step's
cost over the unchecked one, and the host-cost section (one step() over 300 one-element tensors,
AdamW(fused=True) against the IVON steps, alternated rounds).

And the rows of bf16 optimizer state (docs/DESIGN.md section 16): the drop-in step with
``state_dtype=torch.bfloat16`` per backend timed (every backend implements it; one more tiny run
in this process times the reference, which --quick leaves out), 28 bytes per element and 8 bytes
of state per fp32 param (fp32 state 12, AdamW 8).

And what a user meets first: the default sweep sized to the device (on a CPU an estimate under two
minutes, the contenders users compare, the reference behind --reference / --full), the plan and
its estimate said up front and the time taken at the end, the noise verdicts (a row is noisy when
the copy bandwidth before and after its rounds differs by more than 15% or its rounds'
interquartile range exceeds 10% of their median; noisy configurations are measured again, and
what stays noisy is marked and warned about), results in the ignored bench/out/ unless --record,
two plots with one colour per contender, and no internal words in the output.
"""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from ivon_fast import backends

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BF16 = "drop_in_step_bf16_state"
# AdamW's state bytes per fp32 param: m and v (8) and a 4-byte step counter per tensor
ADAMW_STATE = pytest.approx(8.0, abs=0.02)


def _state_bytes(row: dict) -> float:
    return row["memory"]["state_bytes_per_param"]


def _lines_naming_an_issue(text: str) -> list:
    """Output lines that name an issue (internal tracker words users cannot see)."""
    return [line for line in text.splitlines() if "issue" in line.lower()]


def test_bench_quick_writes_a_report(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--retries", "0", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    [report] = glob.glob(str(tmp_path / "*.json"))
    record = json.load(open(report))
    rows = record["rows"]
    by_kind = {}
    for row in rows:
        by_kind.setdefault(row["kind"], []).append(row)
        assert row["min_ms"] <= row["median_ms"] <= row["max_ms"]
    assert {row["bytes_per_element"] for row in by_kind["adamw_fused"]
            if row["dtype"] == "float32"} == {28}
    checked, unchecked = by_kind["drop_in_step"], by_kind["drop_in_step_unchecked"]
    assert all(row["ratio_vs_adamw"] > 0 for row in checked + unchecked)
    assert {row["bytes_per_element"] for row in checked if row["dtype"] == "float32"} == {36}
    assert {row["bytes_per_element"] for row in unchecked if row["dtype"] == "float32"} == {32}
    assert "no finite check" in unchecked[0]["run"]
    # every configuration times both, and the checked row carries the check's cost
    configs = {(r["dtype"], r["shape"], r["size"], r["backend"]) for r in checked}
    assert configs == {(r["dtype"], r["shape"], r["size"], r["backend"]) for r in unchecked}
    assert all(row["check_ratio"] > 0 and row["check_ratio_paired"] > 0 for row in checked)

    host = record["host_cost"]
    assert host["tensors"] == [300] and host["elements_per_tensor"] == 1
    host_kinds = {row["kind"] for row in host["rows"]}
    assert {"adamw_fused", "drop_in_step", "drop_in_step_unchecked"} <= host_kinds
    for row in host["rows"]:
        assert row["tensors"] == 300 and row["rounds"] == host["rounds"] >= 3
        assert 0 < row["min_us"] <= row["median_us"] <= row["max_us"]
        assert row["ratio_vs_adamw"] > 0
    assert "== host cost of one step()" in result.stdout
    assert "drop-in step, no finite check" in result.stdout
    # the plan and its estimate first, the time taken last; the noise verdicts in every row
    lines = result.stdout.splitlines()
    assert lines[0].startswith("# plan: cpu") and "sizes 64K, 256K" in lines[0]
    assert any(line.startswith("# estimate: about ") for line in lines[:5])
    assert lines[-1].startswith("# took ")
    assert record["timing"]["estimate_s"] > 0 and record["timing"]["elapsed_s"] > 0
    assert all(isinstance(row["noisy"], bool) and row["noise"]["attempts"] >= 1 for row in rows)
    assert all(isinstance(row["noisy"], bool) for row in host["rows"])
    assert all(slope["us_per_tensor"] >= 0 for slope in host["slopes"])
    assert not _lines_naming_an_issue(result.stdout + result.stderr)
    plots = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "*.png")))
    stem = os.path.splitext(os.path.basename(report))[0]
    assert plots == [f"{stem}_host.png", f"{stem}_ratio.png", f"{stem}_time.png"]

    # state memory: fp32 state 12 B per fp32 param, AdamW 8; bf16 state (where a timed backend
    # has it; --quick leaves the reference out) 8 B, a 28-byte step, beside the fp32-state rows
    fp32 = [row for row in rows if row["dtype"] == "float32"]
    assert {_state_bytes(row) for row in fp32 if row["kind"] in (
        "drop_in_step", "drop_in_step_unchecked", "official_iteration")} == {12.0}
    assert all(_state_bytes(row) == ADAMW_STATE for row in fp32 if row["kind"] == "adamw_fused")
    for row in rows:
        if row["kind"] in ("drop_in_step", "drop_in_step_unchecked", "official_iteration"):
            assert row["state_dtype"] == "float32"
        assert (row["kind"] == BF16) == (row["state_dtype"] == "bfloat16")
    timed = {(r["dtype"], r["backend"]) for r in checked}
    assert {(r["dtype"], r["backend"]) for r in by_kind.get(BF16, [])} == timed
    for row in by_kind.get(BF16, []):
        assert row["bytes_per_element"] == (28 if row["dtype"] == "float32" else 22)
        assert row["ratio_vs_adamw"] > 0 and row["state_ratio"] > 0
        if row["dtype"] == "float32":
            assert _state_bytes(row) == 8.0
    assert "bf16-state ms" in result.stdout


@pytest.fixture
def bench_main():
    """``python -m bench``'s main in this process (its SIGTERM handler put back afterwards)."""
    from bench.__main__ import main
    handler = signal.getsignal(signal.SIGTERM)
    yield main
    signal.signal(signal.SIGTERM, handler)


# one tiny configuration: the bf16-state rows only, AdamW(fused=True) the anchor, no probes
TINY = ["--quick", "--sizes", "2K", "--shapes", "few-large", "--tensors", "1", "--dtype",
        "float32", "--backends", "cpu,reference", "--reference-max", "2K", "--state-dtypes",
        "bfloat16", "--rounds", "2", "--copy-size", "64K", "--no-host", "--no-ivon-opt",
        "--no-foreach", "--no-floor", "--no-save", "--no-progress"]


def test_bench_times_the_bf16_state_drop_in_step(bench_main, capsys):
    """The drop-in step with bf16 state: a row per backend timed, 28 B per element, 8 B of state
    per fp32 param against AdamW's 8, its ratio to AdamW, in the tables and the targets' lines;
    --state-dtypes bfloat16 leaves the fp32-state rows out."""
    record = bench_main(TINY)
    out = capsys.readouterr().out
    rows = record["rows"]
    assert {row["kind"] for row in rows} == {"adamw_fused", BF16}
    bf16 = {row["backend"]: row for row in rows if row["kind"] == BF16}
    usable = {b for b in ("cpu", "reference") if backends.unavailable_reason(b, "cpu") is None}
    assert set(bf16) == usable and "reference" in bf16
    for backend, row in bf16.items():
        assert row["run"] == f"ivon_fast[{backend}] drop-in step, bf16 state"
        assert row["state_dtype"] == "bfloat16" and row["bytes_per_element"] == 28
        assert row["byte_floor_ratio_bf16_state"] == 1.0
        assert row["ratio_vs_adamw"] > 0 and row["min_ms"] <= row["median_ms"] <= row["max_ms"]
        assert _state_bytes(row) == 8.0
        assert row["memory"]["resident_bytes_per_param"] == 16.0  # + params 4, grads 4
    [adamw] = [row for row in rows if row["kind"] == "adamw_fused"]
    assert _state_bytes(adamw) == ADAMW_STATE
    assert "ivon_fast[reference] drop-in step, bf16 state" in out
    assert "bf16-state ms" in out
    assert "state memory of the drop-in step with bf16 state equal to" in out
    assert "float32 few-large 2K reference: 8.00 against AdamW's 8.00" in out
    assert ("# target: the drop-in step with bf16 state <= 0.95x fused AdamW on a GPU at >= 64M "
            "float32 params: not checked (a cpu run)") in out
    assert not _lines_naming_an_issue(out)


@pytest.mark.parametrize("kind", ["drop_in_step", "drop_in_step_unchecked",
                                  "drop_in_step_bf16_state", "official_iteration"])
def test_every_timed_ivon_call_is_a_whole_step(kind):
    """Each call of an IVON contender updates the mean and writes new params, call after call:
    a drop-in step() without a new gradient does nothing (Note [a step without a gradient]), so
    a contender that only called step() again would time nothing (about 0.02x AdamW)."""
    from bench.__main__ import ivon_fast_contender, param_shapes
    contender = ivon_fast_contender(param_shapes("gpt2", 10_000, 4), "cpu", torch.float32,
                                    "reference", kind)
    layout = contender.optimizer._layout
    for _ in range(3):
        means = [bucket.mean.clone() for bucket in layout.buckets]
        params = [param.detach().clone() for param in contender.params]
        contender.fn()
        assert all(not torch.equal(m, b.mean) for m, b in zip(means, layout.buckets))
        assert all(not torch.equal(p, q.detach()) for p, q in zip(params, contender.params))


def test_state_dtypes_choose_the_bf16_state_rows():
    """--state-dtypes float32 leaves the bf16-state rows out; with bfloat16 every backend timed
    gets one."""
    from bench import __main__ as bench
    args = type("Args", (), {"state_dtypes": "float32"})()
    assert BF16 not in bench.ivon_kinds(args, "reference", ["reference"])
    assert bench.bf16_state_backends(args, ["reference"]) == []
    args.state_dtypes = "float32,bfloat16"
    assert bench.ivon_kinds(args, "reference", ["reference"]) == list(bench.IVON_KINDS)
    assert BF16 not in bench.ivon_kinds(args, "cpu", ["reference"])


def test_byte_model_of_the_bf16_state_rows():
    """docs/DESIGN.md section 6 with bf16 momentum and hess: 8 B less than fp32 state; the
    checked drop-in step 3P + 16 (28 B for fp32 params: AdamW's 28), unchecked 2P + 16."""
    from bench import __main__ as bench
    for p in (4, 2):
        assert bench.bytes_per_element(BF16, p) == 3 * p + 16
        assert bench.bytes_per_element("drop_in_step", p) - bench.bytes_per_element(BF16, p) == 8
        assert bench.drop_in_bytes(p, 2, checked=False) == 2 * p + 16
    assert bench.bytes_per_element(BF16, 4) == bench.bytes_per_element("adamw_fused", 4) == 28
    assert bench.BYTES_PER_ELEMENT == {k: bench.bytes_per_element(k, 4)
                                       for k in bench.BYTES_PER_ELEMENT}


def test_target_lines_of_a_gpu_record():
    """The summary's target lines (bench/report.py ``target_lines``) on a made-up GPU record:
    the bf16-state drop-in step's ratio to fused AdamW against 0.95 at >= 64M fp32 params, each
    configuration and backend listed; its state bytes per param against AdamW's."""
    from bench import report

    def row(kind, backend, size, ratio, state):
        return {"dtype": "float32", "shape": "few-large", "size": size, "numel": size,
                "kind": kind, "backend": backend, "ratio_vs_adamw": ratio,
                "memory": {"state_bytes_per_param": state}}
    rows = []
    for size in (16 * 10**6, 64 * 10**6, 256 * 10**6):
        rows += [row("adamw_fused", None, size, 1.0, 8.0000001),
                 row("drop_in_step", "triton", size, 1.1, 12.0),
                 row(BF16, "triton", size, 0.93, 8.0), row(BF16, "cuda", size, 0.97, 8.0)]
    record = {"device": {"type": "cuda"}, "rows": rows}
    lines = report.target_lines(record)
    assert lines[0].endswith("params: NOT met (2 of 4)")
    assert "#   float32 few-large 64M triton: 0.930x AdamW (met)" in lines
    assert "#   float32 few-large 256M cuda: 0.970x AdamW (not met)" in lines
    assert not any(" 16M " in line for line in lines[:5])  # below 64M: not judged
    assert any(line.endswith("float32 params: met (bytes per param; at every size, the largest "
                             "shown)") for line in lines)
    assert "#   float32 few-large 256M triton: 8.00 against AdamW's 8.00 (met; with fp32 state " \
        "12.00)" in lines
    record["rows"] = [r for r in rows if r["backend"] != "cuda" or r["kind"] != BF16]
    assert report.target_lines(record)[0].endswith("params: met (2 of 2)")
    record["device"]["type"] = "cpu"
    assert report.target_lines(record)[0].endswith("not checked (a cpu run)")
    assert report.target_lines({"device": {"type": "cuda"}, "rows": rows[:2]}) == []


# ------------------------------------------------------------------------------ noise

def test_noise_verdict_flags_a_moving_copy_bandwidth():
    """A row is noisy when the copy bandwidth before and after its rounds differs by more than
    15% (|before - after| / max); the reason gives the numbers."""
    from bench import measure
    steady = [1.0, 1.01, 0.99, 1.0, 1.02, 1.0, 0.995]
    assert measure.BANDWIDTH_DRIFT_MAX == 0.15 and measure.SPREAD_MAX == 0.10
    calm = measure.verdict(steady, 18.6, 18.0)
    assert not calm["noisy"] and calm["reasons"] == []
    busy = measure.verdict(steady, 18.6, 4.8)
    assert busy["noisy"] and busy["bandwidth_drift"] == pytest.approx(1 - 4.8 / 18.6)
    [reason] = busy["reasons"]
    assert "18.6 GB/s before" in reason and "4.8 GB/s after" in reason and "74%" in reason
    assert measure.verdict(steady, 4.8, 18.6)["noisy"]            # either way round
    assert measure.verdict(steady, 10.0, 8.4)["noisy"]            # 16% apart
    assert not measure.verdict(steady, 10.0, 8.6)["noisy"]        # 14% apart
    assert not measure.verdict(steady)["noisy"]                    # no readings: spread only


def test_noise_verdict_flags_rounds_that_spread():
    """A row is noisy when its rounds' interquartile range exceeds 10% of their median; rows of
    fewer than SPREAD_MIN_ROUNDS rounds (the slow contenders) are judged by the bandwidth only."""
    from bench import measure
    wide = [1.0, 1.0, 1.3, 1.0, 1.3, 1.3, 1.0, 1.3, 1.15]
    assert measure.relative_spread(wide) > 0.10
    verdict = measure.verdict(wide, 18.6, 18.6)
    assert verdict["noisy"] and "interquartile range" in verdict["reasons"][0]
    assert verdict["spread"] == pytest.approx(measure.iqr(wide) / 1.15)
    narrow = [1.0, 1.02, 1.05, 0.98, 1.01, 1.5, 1.0]                # one outlier: IQR 4%
    assert not measure.verdict(narrow, 18.6, 18.6)["noisy"]
    assert not measure.verdict([1.0, 1.3, 1.0], 18.6, 18.6)["noisy"]  # 3 rounds: not judged
    assert measure.verdict([1.0, 1.3, 1.0], 18.6, 4.8)["noisy"]
    # the steadier of two attempts is kept: fewer noisy rows, then the smaller excess
    calm, busy = measure.verdict(narrow, 18.6, 18.0), measure.verdict(wide, 18.6, 18.0)
    assert measure.badness([calm, calm]) < measure.badness([calm, busy])


def test_noise_verdict_flags_other_processes_taking_the_cpu():
    """A machine busy all along keeps the rounds steady and the copy bandwidth level while each
    step waits for a core: a CPU row is noisy when other processes took more than 25% of the
    machine's CPU time during its rounds (from /proc/stat, less this process's own time)."""
    from bench import measure
    steady = [1.0, 1.01, 0.99, 1.0, 1.02, 1.0, 0.995]
    assert measure.OTHERS_CPU_MAX == 0.25
    busy = measure.verdict(steady, 18.6, 18.6, others=0.62)
    assert busy["noisy"] and busy["cpu_others"] == 0.62
    assert "other processes took 62% of the machine's CPU time" in busy["reasons"][0]
    assert not measure.verdict(steady, 18.6, 18.6, others=0.1)["noisy"]
    # the share: busy CPU seconds less this process's, over wall seconds times the CPU count
    start, end = (100.0, 5.0, 10.0, 2), (103.0, 6.0, 12.0, 2)
    assert measure.others_share(start, end) == pytest.approx((3.0 - 1.0) / (2.0 * 2))
    assert measure.others_share(None, end) is None
    snapshot = measure.cpu_snapshot()
    if snapshot is not None:                                # Linux
        assert snapshot[3] >= 1 and snapshot[0] > 0


def test_host_slope_below_its_noise_is_not_a_negative_cost():
    """A per-tensor host cost whose difference is below the two rows' interquartile ranges is
    flagged (printed as "<" the noise), and never negative."""
    from bench import report
    from bench.__main__ import host_slope

    def row(tensors, median, iqr):
        return {"run": "r", "kind": "drop_in_step", "backend": "cpu", "tensors": tensors,
                "median_us": median, "iqr_us": iqr}
    slope = host_slope(row(300, 500.0, 60.0), row(3000, 420.0, 50.0))   # -0.03 us per tensor
    assert slope["below_noise"] and slope["us_per_tensor"] == 0.0
    assert slope["us_per_tensor_raw"] < 0 and slope["us_per_tensor_noise"] > 0
    assert report._slope_text(slope) == f"<{110 / 2700:.3f}"
    slope = host_slope(row(300, 500.0, 10.0), row(3000, 9000.0, 40.0))
    assert not slope["below_noise"] and slope["us_per_tensor"] == pytest.approx(8500 / 2700)


# one tiny configuration, fast: the drop-in step of the C++ kernel against fused AdamW
SMALL = ["--sizes", "2K", "--shapes", "few-large", "--tensors", "1", "--dtype", "float32",
         "--backends", "cpu", "--kinds", "drop_in_step", "--rounds", "6", "--copy-size", "64K",
         "--no-host", "--no-ivon-opt", "--no-foreach", "--no-floor", "--no-memory",
         "--no-progress"]


def test_the_odd_group_shape_pads_its_second_bucket(bench_main):
    """--shapes odd-group: a 3-element param group before the few-large tensors, so the second
    group's bucket starts at an odd global offset (Note [quads in the buffers]); its rows say
    so, and the optimizer timed has the two groups, the second bucket after a pad of 1."""
    from bench import __main__ as bench
    from bench.shapes import param_groups, param_shapes
    shapes = param_shapes("odd-group", 2000, 1)
    assert [len(g["params"]) for g in param_groups(shapes, list(range(len(shapes))))] == [1, 1]
    contender = bench.ivon_fast_contender(shapes, "cpu", torch.float32, "reference",
                                          "drop_in_step")
    second = contender.optimizer._layout.buckets[1]
    assert second.offsets[0] == 3 and second.starts[0] == 3
    record = bench_main(["--sizes", "2K", "--shapes", "odd-group", "--tensors", "1", "--dtype",
                         "float32", "--backends", "reference", "--kinds", "drop_in_step",
                         "--rounds", "2", "--copy-size", "64K", "--no-host", "--no-ivon-opt",
                         "--no-foreach", "--no-floor", "--no-memory", "--no-save",
                         "--no-progress"])
    rows = record["rows"]
    assert {row["shape"] for row in rows} == {"odd-group"}
    assert {row["shape_desc"] for row in rows} == {"odd-group (1 + 1 tensors in two param groups)"}
    assert {row["numel"] for row in rows} == {2000}


def test_a_busy_machine_is_measured_again_and_flagged(bench_main, capsys, monkeypatch, tmp_path):
    """A neighbour that takes the memory bus during the rounds (simulated: the copy bandwidth
    reads 18.6 GB/s before and 4.8 GB/s after every configuration's rounds): the configuration
    is measured again, twice; its rows stay noisy, with the reason and numbers in the JSON, "~"
    before their ratios in the tables, and a closing warning."""
    from bench import measure
    readings = iter([18.6, 4.8] * 10)
    monkeypatch.setattr(measure.BandwidthProbe, "gbs", lambda self: next(readings))
    monkeypatch.setattr(measure, "others_share", lambda start, end: 0.0)  # this neighbour only
    record = bench_main(SMALL + ["--out", str(tmp_path)])
    out = capsys.readouterr().out
    rows = record["rows"]
    assert {row["kind"] for row in rows} == {"adamw_fused", "drop_in_step"}
    for row in rows:
        assert row["noisy"] is True
        noise = row["noise"]
        assert noise["attempts"] == 1 + measure.RETRIES == 3
        assert noise["bandwidth_before_gbs"] == 18.6 and noise["bandwidth_after_gbs"] == 4.8
        assert any("copy bandwidth 18.6 GB/s before the rounds, 4.8 GB/s after" in reason
                   for reason in noise["reasons"])
    [saved] = glob.glob(str(tmp_path / "*.json"))
    assert all(row["noisy"] for row in json.load(open(saved))["rows"])
    assert "# WARNING: 2 of 2 rows were measured on a busy machine; their ratios are not " \
        "reliable" in out
    assert "float32 few-large 2K (2 of 2 rows; measured 3 times): copy bandwidth 18.6 GB/s" in out
    [line] = [line for line in out.splitlines() if line.startswith("ivon_fast[cpu] drop-in step")]
    assert " ~" in line and "  bw 74%" in line    # the noisy column says why
    assert not _lines_naming_an_issue(out)


def test_a_quiet_machine_is_measured_once(bench_main, capsys, monkeypatch):
    """The same run on a machine whose copy bandwidth holds and whose rounds agree (simulated:
    the readings constant, the rounds' spread taken as nil): one attempt, no row flagged, and
    the closing line says all rows were steady."""
    from bench import measure
    real = measure.verdict
    monkeypatch.setattr(measure.BandwidthProbe, "gbs", lambda self: 18.6)
    monkeypatch.setattr(measure, "relative_spread", lambda values: 0.0)
    monkeypatch.setattr(measure, "others_share", lambda start, end: 0.02)
    record = bench_main(SMALL + ["--no-save"])
    out = capsys.readouterr().out
    assert measure.verdict is real
    assert all(not row["noisy"] and row["noise"]["attempts"] == 1 for row in record["rows"])
    assert "# noise: all 2 rows steady" in out and "WARNING" not in out


# ------------------------------------------------------------------------------ the plan

def _plan(argv: list):
    from bench import __main__ as bench
    args = bench.parse_args(argv)
    device = torch.device(args.device)
    plan, names_of, bf16_of = bench.plan_of(args, device, [])
    planned = {item for dtype, _, numel in plan
               for item in bench.planned_contenders(numel, device, args, names_of[dtype],
                                                    bf16_of[dtype])}
    # a quiet 2-core VM: 18.6 GB/s of copy bandwidth, the model's pace
    estimated = bench.estimate(plan, device, args, names_of, bf16_of, copy_gbs=18.6, threads=2)
    return args, plan, planned, estimated


def test_the_default_cpu_sweep_fits_in_two_minutes():
    """`python -m bench` on a CPU: fp32 params, both shapes, 1M to 16M, the contenders users
    compare (fused and foreach AdamW, the C++ kernel's drop-in step and official iteration,
    ivon-opt; the CPU floor's probes beside them), no reference backend; its estimate on a
    quiet 2-core machine is at most 120 s, the noisy configurations' retries included.
    --reference adds the reference; --full is the long sweep (every kind, bf16 params)."""
    from bench import __main__ as bench
    if backends.unavailable_reason("cpu", "cpu") is not None:
        pytest.skip("no C++ CPU kernels in this build")
    args, plan, planned, estimated = _plan(["--device", "cpu"])
    assert {dtype for dtype, _, _ in plan} == {torch.float32}
    assert {shape for _, shape, _ in plan} == {"few-large", "gpt2"}
    assert {numel for _, _, numel in plan} == {10**6, 4 * 10**6, 16 * 10**6}
    assert planned == {("adamw_fused", None), ("adamw_foreach", None), ("drop_in_step", "cpu"),
                       ("official_iteration", "cpu"), ("ivon_opt_iteration", None),
                       ("copy", None), ("noise", None)}
    assert 10 < estimated["seconds"] <= 120
    assert estimated["seconds"] + bench.retry_budget(estimated["seconds"]) <= 120
    assert args.host_tensors == [30, 300, 3000] and args.rounds == 9

    _, _, with_reference, more = _plan(["--device", "cpu", "--reference"])
    assert ("drop_in_step", "reference") in with_reference
    assert more["seconds"] > estimated["seconds"]
    _, full_plan, everything, full = _plan(["--device", "cpu", "--full"])
    assert {dtype for dtype, _, _ in full_plan} == {torch.float32, torch.bfloat16}
    assert {(kind, "cpu") for kind in bench.IVON_KINDS} <= everything
    assert ("official_iteration", "reference") in everything
    assert full["seconds"] > 2 * estimated["seconds"]


def test_gpu_and_quick_defaults():
    """On a GPU the default sweep reaches 256M params (the GPU targets are judged at >= 64M)
    with every step kind and both param dtypes, no reference; --quick is the tiny smoke run."""
    from bench import __main__ as bench
    assert bench.default_sizes(torch.device("cuda"), quick=False) == "1M,16M,64M,256M"
    args = bench.parse_args(["--device", "cuda"])
    assert args.rounds == 15 and args.dtype == "float32,bfloat16" and args.kinds is None
    assert not args.reference
    assert bench.kernel_backends(args, torch.device("cuda"), torch.float32, []) in (
        [], ["cuda"], ["triton"], ["cuda", "triton"])
    args, plan, planned, estimated = _plan(["--device", "cpu", "--quick"])
    assert {numel for _, _, numel in plan} == {64 * 10**3, 256 * 10**3}
    assert args.rounds == 3 and not any(backend == "reference" for _, backend in planned)
    assert estimated["seconds"] < 30


def test_results_go_to_an_ignored_folder_unless_recorded(bench_main, capsys, monkeypatch,
                                                         tmp_path):
    """By default the JSON and plots go to bench/out/ (ignored by git: `git status` stays
    clean); --record writes them into bench/results/ with the date and the device in the name."""
    from bench import __main__ as bench
    from bench import report
    out, results = tmp_path / "out", tmp_path / "results"
    monkeypatch.setattr(report, "plot", lambda record, path: None)      # the JSON is enough
    monkeypatch.setattr(report, "plot_paths", lambda path: [])
    monkeypatch.setattr(bench, "OUT_DIR", str(out))
    monkeypatch.setattr(bench, "RESULTS_DIR", str(results))
    tiny = [arg for arg in SMALL if arg != "--no-memory"] + ["--rounds", "2", "--retries", "0"]
    bench_main(tiny)
    assert len(glob.glob(str(out / "*.json"))) == 1 and not results.exists()
    record = bench_main(tiny + ["--record"])
    capsys.readouterr()
    [recorded] = glob.glob(str(results / "*.json"))
    name = os.path.basename(recorded)
    assert name.startswith(f"bench_{record['stamp'][:10]}_") and "_cpu-" in name
    assert name.endswith(f"-{record['device']['threads']}t.json")
    assert len(glob.glob(str(out / "*.json"))) == 1
    # the real folders: bench/out/ is ignored, bench/results/ is tracked
    assert bench.OUT_DIR != bench.RESULTS_DIR
    ignored = subprocess.run(["git", "check-ignore", "-q", "bench/out/bench_x_cpu.json"],
                             cwd=REPO, capture_output=True)
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.returncode == 0
    tracked = subprocess.run(["git", "check-ignore", "-q", "bench/results/bench_x_cpu.json"],
                             cwd=REPO, capture_output=True)
    assert tracked.returncode == 1


# ------------------------------------------------------------------------------ the plots

def _row(kind, backend, run, numel, dtype="float32", shape="few-large", ratio=1.0, noisy=False):
    return {"dtype": dtype, "shape": shape, "size": numel, "numel": numel, "kind": kind,
            "backend": backend, "run": run, "min_ms": 0.9 * ratio, "median_ms": ratio,
            "max_ms": 1.2 * ratio, "ratio_vs_adamw": ratio, "ratio_q1": 0.95 * ratio,
            "ratio_q3": 1.05 * ratio, "noisy": noisy, "byte_floor_ratio_checked": 36 / 28,
            "byte_floor_ratio_bf16_state": 1.0}


def test_the_two_plots_give_each_contender_its_own_colour():
    """The time plot and the ratio plot: one colour per contender (the same in both), the
    legend outside the panels, hollow markers for noisy rows, and a note on the reference
    backend's lone points."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from bench import report
    contenders = [("adamw_fused", None, "AdamW(fused=True) step", 1.0),
                  ("adamw_foreach", None, "AdamW(foreach=True) step", 2.5),
                  ("ivon_opt_iteration", None, "ivon-opt 0.1.3 official iteration", 30.0),
                  ("drop_in_step", "cpu", "ivon_fast[cpu] drop-in step", 1.6),
                  ("official_iteration", "cpu", "ivon_fast[cpu] official iteration", 2.0),
                  (BF16, "cpu", "ivon_fast[cpu] drop-in step, bf16 state", 1.5),
                  ("drop_in_step", "reference", "ivon_fast[reference] drop-in step", 90.0)]
    rows = []
    for numel in (10**6, 4 * 10**6, 16 * 10**6):
        for shape in ("few-large", "gpt2"):
            for kind, backend, run, ratio in contenders:
                if backend == "reference" and numel > 10**6:
                    continue
                rows.append(_row(kind, backend, run, numel, shape=shape, ratio=ratio,
                                 noisy=(numel == 4 * 10**6 and kind == "drop_in_step")))
    record = {"rows": rows, "device": {"type": "cpu", "name": "test CPU"}, "date": "today",
              "args": {"reference_max": 2 * 10**6, "ivon_opt_max": 64 * 10**6}}
    figures = report.figures(record)
    assert set(figures) == {"time", "ratio"}
    colours = {}
    for name, fig in figures.items():
        fig.canvas.draw()
        mine = {}
        for ax in fig.axes:
            assert ax.get_legend() is None                  # no legend over the data
            for line in ax.get_lines():
                if line.get_gid():
                    mine.setdefault(line.get_gid(), set()).add(
                        matplotlib.colors.to_hex(line.get_color()))
        assert all(len(found) == 1 for found in mine.values()), mine
        mine = {gid: found.pop() for gid, found in mine.items()}
        assert len(set(mine.values())) == len(mine)         # a colour per contender
        for gid, colour in mine.items():                    # the same in both plots
            assert colours.setdefault(gid, colour) == colour
        [legend] = fig.legends
        box = legend.get_window_extent()
        for ax in fig.axes:
            assert box.x0 >= ax.get_window_extent().x1     # right of every panel
        texts = " ".join(t.get_text() for t in fig.texts)
        assert "reference backend" in texts and "--reference-max 2M" in texts
        hollow = [line for ax in fig.axes for line in ax.get_lines()
                  if line.get_gid() == "ivon_fast[cpu] drop-in step"
                  and line.get_markerfacecolor() in ("white", "w", (1, 1, 1, 1))]
        assert hollow                                       # the noisy point
        labels = [t.get_text() for t in legend.get_texts()]
        assert "hollow: busy machine, not reliable" in labels
    expected = {run for _, _, run, _ in contenders}
    assert set(colours) == expected
    assert len(set(colours.values())) == len(expected)
    assert colours["AdamW(fused=True) step"] != colours["ivon-opt 0.1.3 official iteration"]
    plt.close("all")


def test_memory_bench_measures_the_step_peak_and_what_frozen_params_cost(tmp_path, capsys):
    """python -m bench.memory: both tables; IVON's frozen params cost nothing (the same bytes
    whether the whole model or its trainable params are given: mean, momentum, hess and the
    gradient, 16 B per trainable fp32 element), AdamW's 12 B."""
    from bench import memory
    out = tmp_path / "memory.json"
    assert memory.main(["--device", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    peaks = {row["optimizer"]: row for row in result["step_peaks"]}
    assert peaks["AdamW"]["peak_vs_adamw"] == 1.0
    assert peaks["IVON"]["peak_bytes"] >= peaks["IVON"]["held_between_steps"] > 0
    for row in result["frozen_costs"]:   # (AdamW also keeps a step count per param)
        per_element = 16 if row["optimizer"] == "IVON" else 12
        assert row["state_and_grad_bytes"] // row["trainable"] == per_element, row
    ivon = [row for row in result["frozen_costs"] if row["optimizer"] == "IVON"]
    assert ivon[0]["state_and_grad_bytes"] == ivon[1]["state_and_grad_bytes"]
    assert "held between steps MB" in capsys.readouterr().out
