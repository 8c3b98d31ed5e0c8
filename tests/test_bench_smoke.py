"""The benchmark's quick mode runs end to end (a smoke test; the figures are not checked).

What is checked is what the report promises independently of the timings: every contender has a
row with a spread, the byte model of docs/DESIGN.md section 6 (28 bytes per element for AdamW,
32 for the drop-in step), and the ratio against fused AdamW measured in the same run.
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
    rows = json.load(open(report))["rows"]
    by_kind = {}
    for row in rows:
        by_kind.setdefault(row["kind"], []).append(row)
        assert row["min_ms"] <= row["median_ms"] <= row["max_ms"]
    assert {row["bytes_per_element"] for row in by_kind["adamw_fused"]
            if row["dtype"] == "float32"} == {28}
    drop_in = [row for kind, kinds in by_kind.items() if "drop" in kind for row in kinds]
    assert drop_in and all(row["ratio_vs_adamw"] > 0 for row in drop_in)
    assert {row["bytes_per_element"] for row in drop_in if row["dtype"] == "float32"} == {32}
