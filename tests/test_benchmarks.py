"""Smoke test of the benchmarks: ``python -m benchmarks.run --quick`` runs every one and writes its JSON.

Asserts the shape of the results and that every figure is a positive number;
never a timing target (those are for ``python -m benchmarks.run`` to report).
With matplotlib installed (the ``bench`` extra) it also checks the PNG plots
and that ``python -m benchmarks.report`` turns the JSON into the docs page.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = ("primary_map", "attach", "fresh_worker", "zone_ops", "control_plane", "handoff", "hugepages", "adoption",
              "heap", "channel", "cuda")
PLOTTED = ("primary_map", "attach", "control_plane", "handoff", "hugepages")
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
ROW_KEYS = {"median", "p10", "p90", "min", "max", "n", "unit", "baseline", "baseline_name", "ratio", "target",
            "target_kind", "pass"}


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.mark.timeout(180)
def test_quick_run_of_every_benchmark(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(tmp_path)], cwd=REPO,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=170)
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
        if result.get("skipped"):  # cuda, without a GPU: said so, no figures
            assert result["metrics"] == {} and result["notes"][0].startswith(f"skipped: {result['skipped']}"), result
            assert f"note ({name}): skipped" in done.stdout
            continue
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
    handoff = report["benchmarks"]["handoff"]
    assert {"hugeshmd", "shared_memory", "queue"} <= set(handoff["params"]["methods"])
    assert "plasma" in handoff["params"]["methods"] or any("plasma SKIPPED" in n for n in handoff["notes"])
    assert {r["workers"] for r in report["benchmarks"]["attach"]["details"]["concurrent"]} >= {1, 2}
    assert len(report["benchmarks"]["attach"]["details"]["by_segments"]) >= 2
    if HAVE_MATPLOTLIB:
        assert set(report["plots"]) == set(PLOTTED)
        assert all(Path(p).stat().st_size > 10_000 for p in report["plots"].values())
        docs = tmp_path / "docs"
        made = subprocess.run([sys.executable, "-m", "benchmarks.report", str(files[0]), "--docs", str(docs)],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        page = (docs / "performance.md").read_text()
        assert report["machine"]["date"] in page and "Where hugeshmd stands" in page
        assert all((docs / "plots" / f"{name}.png").exists() for name in PLOTTED)
    else:
        assert report["plots"] == {}
