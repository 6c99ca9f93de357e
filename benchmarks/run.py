"""Run the benchmarks, print a table, write the figures as JSON.

    python -m benchmarks.run [--quick] [--only NAME ...] [--out DIR]

Writes DIR/<time>.json and, with matplotlib installed (``pip install -e .[bench]``),
one PNG per benchmark of issue 4 next to it (DIR/<time>-<benchmark>.png).

Exit status: 0 when every benchmark ran and left nothing behind, 1 otherwise.
A missed target does not change the exit status: targets are reported, never asserted.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import sys
import time
import traceback
from typing import Any

from . import common

BENCHMARKS = {
    "primary_map": "benchmarks.bench_primary_map",
    "attach": "benchmarks.bench_attach",
    "fresh_worker": "benchmarks.bench_fresh_worker",
    "zone_ops": "benchmarks.bench_zone_ops",
    "control_plane": "benchmarks.bench_control",
    "handoff": "benchmarks.bench_handoff",
    "hugepages": "benchmarks.bench_hugepages",
    "adoption": "benchmarks.bench_adoption",
    "heap": "benchmarks.bench_heap",
    "channel": "benchmarks.bench_channel",
    "cuda": "benchmarks.bench_cuda",
}
RESULTS = common.REPO / "benchmarks" / "results"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    names = args.only or list(BENCHMARKS)
    report: dict[str, Any] = {"machine": common.machine_label(), "code": common.code_label(),
                              "quick": args.quick, "argv": sys.argv[1:],
                              "benchmarks": {}, "errors": {}}
    for name in names:
        print(f"== {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            result = importlib.import_module(BENCHMARKS[name]).run(args.quick)
        except Exception:
            report["errors"][name] = traceback.format_exc()
            print(report["errors"][name], file=sys.stderr)
            continue
        result["elapsed_s"] = time.perf_counter() - t0
        report["benchmarks"][name] = result
    report["leftovers"] = list(common.LEFTOVERS)
    report["hugepages_free_after"] = common.free_hugepages()
    report["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    report["pool_changes"] = list(common.POOL_CHANGES)
    path = _path(args.out, args.quick)
    report["plots"] = _plots(report, os.path.dirname(path), os.path.basename(path)[: -len(".json")] + "-")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    print(format_table(report))
    print(f"\nresults: {path}")
    for png in report["plots"].values():
        print(f"plot: {png}")
    return 1 if report["errors"] or report["leftovers"] else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few repeats (a smoke run; works without hugepages)")
    parser.add_argument("--only", action="append", choices=list(BENCHMARKS), metavar="NAME",
                        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    parser.add_argument("--out", default=str(RESULTS),
                        help="directory for the JSON file and the PNG plots (default: %(default)s)")
    return parser


def _path(directory: str, quick: bool) -> str:
    """A new results file name in ``directory``: the local time, ``-quick`` for a smoke run."""
    os.makedirs(directory, exist_ok=True)
    stem = datetime.datetime.now().strftime("%Y%m%dT%H%M%S") + ("-quick" if quick else "")
    path = os.path.join(directory, f"{stem}.json")
    n = 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(directory, f"{stem}-{n}.json")
    return path


def _plots(report: dict[str, Any], directory: str, stem: str) -> dict[str, str]:
    """PNGs next to the JSON; none (with a note on stderr) without matplotlib."""
    from . import plots  # the standard library only, until it draws

    try:
        return plots.write_plots(report, directory, stem)
    except ImportError as err:
        print(f"benchmarks: plots skipped: {err} (pip install -e .[bench])", file=sys.stderr)
        report.setdefault("notes", []).append(f"plots skipped: {err}")
        return {}


def format_target(row: dict[str, Any]) -> str:
    if row.get("target") is None:
        return "-"
    if row["target_kind"] == "ratio":
        return f"ratio <= {row['target']:.2f}"
    if row["target_kind"] == "min_ratio":
        return f"ratio >= {row['target']:.2f}"
    if row["target_kind"] == "min":
        return f">= {row['target']:,.0f}/s"
    return f"<= {common.format_seconds(row['target'])}"


def _verdict(row: dict[str, Any]) -> str:
    if row.get("pass") is None:
        return "-" if row.get("target") is None else "(quick)"
    return "PASS" if row["pass"] else "FAIL"


def format_value(row: dict[str, Any], key: str) -> str:
    """A row's figure in its unit: seconds scaled to ns/us/ms/s, anything else as a plain number."""
    value = row.get(key)
    if row.get("unit", "s") == "s" or value is None:
        return common.format_seconds(value)
    return f"{value:,.0f} {row['unit']}" if value >= 100 else f"{value:.3g} {row['unit']}"


def format_table(report: dict[str, Any]) -> str:
    """The human-readable table: one row per metric."""
    m = report["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}, "
             f"{m['hugepages_free']} free 2 MiB hugepages, hugetlbfs {m['hugetlbfs'] or 'not mounted'}, {m['date']}"
             + ("  [QUICK: tiny sizes, no verdicts]" if report["quick"] else "")]
    c = report["code"]
    lines.append(f"load average before: {m['loadavg']}, after: {report.get('loadavg_after')}")
    dirty = " + uncommitted changes in hugeshmd/" if c["hugeshmd_modified"] else ""
    lines.append(f"code: commit {(c['commit'] or '?')[:12]}{dirty} (sources sha256 {c['hugeshmd_sha256']})")
    header = ("benchmark", "metric", "median", "p90", "n", "baseline", "baseline median", "ratio", "target", "result")
    rows = [header]
    for name, result in report["benchmarks"].items():
        for key, row in result["metrics"].items():
            rows.append((name, key, format_value(row, "median"), format_value(row, "p90"),
                         str(row["n"]), row["baseline_name"] or "-", format_value(row, "baseline"),
                         "-" if row["ratio"] is None else f"{row['ratio']:.2f}", format_target(row), _verdict(row)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for i, r in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    for name, result in report["benchmarks"].items():
        for note in result.get("notes", []):
            lines.append(f"note ({name}): {note}")
    for name in report["errors"]:
        lines.append(f"ERROR ({name}): see the traceback above")
    if report.get("leftovers"):
        lines.append(f"LEFTOVERS (removed): {report['leftovers']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
