"""The benchmark's quick mode runs end to end (a smoke test; the figures are not checked).

What is checked is what the report promises independently of the timings: every contender has a
row with a spread, the byte model of docs/DESIGN.md sections 6 and 11 (28 bytes per element for
AdamW, 32 for the drop-in step without the finite check, 36 with it: the check reads the grads
once more), the ratio against fused AdamW measured in the same run, the checked drop-in step's
cost over the unchecked one, and the host-cost section (one step() over 300 one-element tensors,
AdamW(fused=True) against the IVON steps, alternated rounds).
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
