"""The benchmark's quick mode runs end to end (a smoke test; the figures are not checked).

What is checked is what the report promises independently of the timings: every contender has a
row with a spread, the byte model of docs/DESIGN.md sections 6 and 11 (28 bytes per element for
AdamW, 32 for the drop-in step without the finite check, 36 with it: the check reads the grads
once more), the ratio against fused AdamW measured in the same run, the checked drop-in step's
cost over the unchecked one, and the host-cost section (one step() over 300 one-element tensors,
AdamW(fused=True) against the IVON steps, alternated rounds).

And the rows of bf16 optimizer state (issue 11, docs/DESIGN.md section 16): the drop-in step with
``state_dtype=torch.bfloat16`` per backend that implements it (``backends.STATE_DTYPES``; today
the reference only, which --quick leaves out, so one more tiny run in this process times it), 28
bytes per element and 8 bytes of state per fp32 param (fp32 state 12, AdamW 8); a backend without
bf16 state gets no such row, only a note.
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


def _has_bf16_state(backend: str, device: str, dtype: str) -> bool:
    return backends.unavailable_reason(backend, torch.device(device), getattr(torch, dtype),
                                       state_dtype=torch.bfloat16) is None


def _state_bytes(row: dict) -> float:
    return row["memory"]["state_bytes_per_param"]


def test_bench_quick_writes_a_report(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)], cwd=REPO,
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
    assert {(r["dtype"], r["backend"]) for r in by_kind.get(BF16, [])} == {
        (dtype, backend) for dtype, backend in timed if _has_bf16_state(backend, "cpu", dtype)}
    for row in by_kind.get(BF16, []):
        assert row["bytes_per_element"] == (28 if row["dtype"] == "float32" else 22)
        assert row["ratio_vs_adamw"] > 0 and row["state_ratio"] > 0
        if row["dtype"] == "float32":
            assert _state_bytes(row) == 8.0
    for dtype, backend in timed:
        if not _has_bf16_state(backend, "cpu", dtype):
            assert any(f"backend {backend} ({dtype}): no bf16-state row" in note
                       for note in record["notes"])
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
    """The drop-in step with bf16 state: a row per backend that implements it (the reference,
    and the kernels once backends.STATE_DTYPES lists bf16 for them), 28 B per element, 8 B of
    state per fp32 param against AdamW's 8, its ratio to AdamW, in the tables and the targets'
    lines; a backend without bf16 state gets no row but a note; --state-dtypes bfloat16 leaves
    the fp32-state rows out."""
    record = bench_main(TINY)
    out = capsys.readouterr().out
    rows = record["rows"]
    assert {row["kind"] for row in rows} == {"adamw_fused", BF16}
    bf16 = {row["backend"]: row for row in rows if row["kind"] == BF16}
    assert set(bf16) == {b for b in ("cpu", "reference") if _has_bf16_state(b, "cpu", "float32")}
    assert "reference" in bf16
    for backend, row in bf16.items():
        assert row["run"] == f"ivon_fast[{backend}] drop-in step, bf16 state"
        assert row["state_dtype"] == "bfloat16" and row["bytes_per_element"] == 28
        assert row["byte_floor_ratio_bf16_state"] == 1.0
        assert row["ratio_vs_adamw"] > 0 and row["min_ms"] <= row["median_ms"] <= row["max_ms"]
        assert _state_bytes(row) == 8.0
        assert row["memory"]["resident_bytes_per_param"] == 16.0  # + params 4, grads 4
    [adamw] = [row for row in rows if row["kind"] == "adamw_fused"]
    assert _state_bytes(adamw) == ADAMW_STATE
    if "cpu" not in bf16:
        assert any("backend cpu (float32): no bf16-state row" in note for note in record["notes"])
    assert "ivon_fast[reference] drop-in step, bf16 state" in out
    assert "bf16-state ms" in out
    assert "state memory of the drop-in step with bf16 state equal to" in out
    assert "float32 few-large 2K reference: 8.00 against AdamW's 8.00" in out
    assert "0.95x AdamW(fused=True), on a GPU at >= 64M float32 params: not checked (a cpu run)" \
        in out


def test_no_bf16_state_row_without_bf16_state(bench_main, capsys, monkeypatch):
    """A backend whose STATE_DTYPES lacks bf16 gets no bf16-state row and no error, only a note
    (as the kernels before they gain it); --state-dtypes float32 leaves the rows out."""
    from bench import __main__ as bench
    for name in ("reference", "cpu"):
        monkeypatch.setitem(backends.STATE_DTYPES, name, (torch.float32,))
    record = bench_main(TINY)
    capsys.readouterr()
    assert {row["kind"] for row in record["rows"]} == {"adamw_fused"}
    for name in ("reference", "cpu"):
        assert any(f"backend {name} (float32): no bf16-state row" in note
                   for note in record["notes"]), name
    monkeypatch.undo()
    args = type("Args", (), {"state_dtypes": "float32"})()
    assert BF16 not in bench.ivon_kinds(args, "reference", ["reference"])
    assert bench.bf16_state_backends(args, torch.device("cpu"), torch.float32,
                                     ["reference"], []) == []
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
