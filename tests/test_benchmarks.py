"""Smoke test of the benchmarks: ``python -m benchmarks.run --quick`` runs every one and writes its JSON.

Asserts the shape of the results and that every figure is a positive number;
never a timing target (those are for ``python -m benchmarks.run`` to report).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = ("primary_map", "attach", "fresh_worker", "zone_ops")
ROW_KEYS = {"median", "p10", "p90", "min", "max", "n", "unit", "baseline", "baseline_name", "ratio", "target",
            "target_kind", "pass"}


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.mark.timeout(60)
def test_quick_run_of_every_benchmark(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(tmp_path)], cwd=REPO,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=55)
    assert done.returncode == 0, done.stdout + done.stderr
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1, files
    report = json.loads(files[0].read_text())

    assert report["quick"] is True
    assert report["errors"] == {}
    assert report["leftovers"] == []
    assert {"kernel", "cpu", "cores", "python", "date"} <= set(report["machine"])
    assert set(report["benchmarks"]) == set(BENCHMARKS)
    for name, result in report["benchmarks"].items():
        assert result["name"] == name
        assert result["metrics"], name
        for key, row in result["metrics"].items():
            where = f"{name}/{key}"
            assert ROW_KEYS <= set(row), where
            assert row["n"] >= 1, where
            for field in ("median", "p10", "p90", "min", "max"):
                assert _positive(row[field]), (where, field, row[field])
            assert row["min"] <= row["median"] <= row["max"], where
            if row["baseline_name"] is not None:
                assert _positive(row["baseline"]) and _positive(row["ratio"]), where
            assert row["pass"] is None, where  # quick mode gives no verdicts
        assert f"{name}" in done.stdout  # the table names every benchmark
    zone_ops = report["benchmarks"]["zone_ops"]["metrics"]
    assert {"lookup", "reserve", "free"} <= set(zone_ops)
    assert report["benchmarks"]["fresh_worker"]["details"]["worker_check"]["ok"] is True
