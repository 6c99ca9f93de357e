"""control_plane: ``reserve``, ``lookup`` and ``free`` from 1 to 8 concurrent workers, by two paths.

* **worker API** (the path hugeshmd's workers take): ``Secondary.reserve``,
  ``lookup`` and ``free`` in the worker itself. The zones are of 4 KiB: each
  is a block of the worker's own arena, named in the name index
  (:mod:`hugeshmd.shm.names`) under the lock of its name's shard, so workers
  meet only when their names share one of its 64 shards; ``lookup`` is a local
  read. (Zones over 64 KiB are records of the shared table, committed under its
  flock, which every worker shares.)
* **primary over ZeroMQ** (what a design that sends every change to the primary
  would cost, and what tools use): ``reserve``, ``lookup`` and ``free``
  requests through ``hugeshmd.wire.client.Control`` (a REQ socket on the primary's
  ``ipc://`` control endpoint), one request in flight per client.

N = 1, 2, 4, 8 worker processes, each started, attached (or connected) and
warmed up before it is released together with the others by a line on its
stdin. Each then runs a fixed number of cycles (reserve a new name, look it up,
free it), timing every call with ``perf_counter_ns``. p50 and p99 of each
operation over every worker's calls; throughput is all calls divided by the
wall time from the first worker's start to the last one's end (CLOCK_MONOTONIC,
comparable across processes). For the ZeroMQ path that throughput is the
primary's requests per second, checked against its own request counter
(``status``). With 2 vCPUs, more than two busy processes share the cores: the
rise of p99 with N is mostly scheduling, which is what a user of such a
machine gets.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from .common import PYTHON, REPO, MiB, PrimaryProcess, metric, percentile, release_together

WORKERS, QUICK_WORKERS = (1, 2, 4, 8), (1, 2, 4)
OPS = ("reserve", "lookup", "free")
ZONE_SIZE = 4096
RUNS = 3


def run(quick: bool) -> dict[str, Any]:
    cycles = {"api": 100 if quick else 2000, "zmq": 50 if quick else 500}
    repeats = 1 if quick else RUNS
    runs: list[dict[str, Any]] = []
    with PrimaryProcess(16 * MiB if quick else 64 * MiB, "try" if quick else "on") as primary:
        for _ in range(repeats):  # interleaved: every run does each N by both paths, back to back
            for workers in QUICK_WORKERS if quick else WORKERS:
                for path in ("api", "zmq"):
                    runs.append(_round(primary, path, workers, cycles[path]))
        mode = primary.mode
    rows = _merge(runs)
    metrics: dict[str, Any] = {}
    for row in rows:
        label = "worker API" if row["path"] == "api" else "primary over ZeroMQ"
        for op in OPS:
            metrics[f"{op}, {label}, {row['workers']} workers"] = metric(
                row["samples"][op], note=f"p99 {percentile(row['samples'][op], 99) * 1e6:.1f} us")
        metrics[f"throughput, {label}, {row['workers']} workers"] = metric(
            row["ops_per_s"], unit="ops/s", note=f"all calls / wall time, median of {len(row['ops_per_s'])} runs")
    details = [{k: v for k, v in r.items() if k != "samples"}
               | {f"{op}_{p}": percentile(r["samples"][op], q) for op in OPS for p, q in (("p50", 50), ("p99", 99))}
               for r in rows]
    notes = ["the primary ran in fallback mode: 4 KiB pages in /dev/shm"] if mode == "fallback" else []
    return {"name": "control_plane", "params": {"cycles": cycles, "zone_size": ZONE_SIZE, "mode": mode},
            "notes": notes, "metrics": metrics, "details": {"rounds": details}}


def _merge(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (path, workers): samples pooled over the runs, one throughput per run."""
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for r in runs:
        row = rows.setdefault((r["path"], r["workers"]), {"path": r["path"], "workers": r["workers"],
                                                           "cycles": r["cycles"], "ops_per_s": [],
                                                           "primary_requests": [], "calls": [],
                                                           "samples": {op: [] for op in OPS}})
        row["ops_per_s"].append(r["ops_per_s"])
        row["calls"].append(r["calls"])
        row["primary_requests"].append(r.get("primary_requests"))
        for op in OPS:
            row["samples"][op] += r["samples"][op]
    return list(rows.values())


def _round(primary: PrimaryProcess, path: str, workers: int, cycles: int) -> dict[str, Any]:
    """One run of ``workers`` processes released together; their samples and the throughput."""
    requests_before = _primary_requests(primary) if path == "zmq" else 0
    procs = []
    try:
        for i in range(workers):
            request = {"prefix": primary.prefix, "root": primary.root, "path": path, "cycles": cycles,
                       "tag": f"{path}{workers}w{i}"}
            procs.append(subprocess.Popen([PYTHON, "-m", __name__, "--worker", json.dumps(request)], cwd=REPO,
                                          text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE))
        release_together(procs, "control-plane")
        replies = []
        for proc in procs:
            out, _ = proc.communicate(timeout=300)
            if proc.returncode != 0:
                raise RuntimeError(f"control-plane worker {proc.pid} failed (exit {proc.returncode})")
            replies.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    samples = {op: [x for r in replies for x in r[op]] for op in OPS}
    calls = sum(len(v) for v in samples.values())
    wall = max(r["end"] for r in replies) - min(r["start"] for r in replies)
    row = {"path": path, "workers": workers, "cycles": cycles, "calls": calls, "wall_s": wall,
           "ops_per_s": calls / wall, "samples": samples}
    if path == "zmq":
        row["primary_requests"] = _primary_requests(primary) - requests_before - 1  # less the status call itself
    return row


def _primary_requests(primary: PrimaryProcess) -> int:
    from hugeshmd.shm.paths import RuntimePaths
    from hugeshmd.wire.client import Control

    with Control(RuntimePaths.for_prefix(primary.prefix, primary.root)) as control:
        return int(control.request("status")["requests"])


# -- the worker -----------------------------------------------------------------------


def _api_calls(request: dict[str, Any]) -> tuple[Any, Any]:
    import hugeshmd

    shm = hugeshmd.attach(request["prefix"], runtime_root=request["root"])
    return shm, {"reserve": lambda n: shm.reserve(n, ZONE_SIZE), "lookup": shm.lookup, "free": shm.free}


def _zmq_calls(request: dict[str, Any]) -> tuple[Any, Any]:
    from hugeshmd.shm.paths import RuntimePaths
    from hugeshmd.wire.client import Control

    control = Control(RuntimePaths.for_prefix(request["prefix"], request["root"]))
    return control, {"reserve": lambda n: control.request("reserve", name=n, size=ZONE_SIZE),
                     "lookup": lambda n: control.request("lookup", name=n),
                     "free": lambda n: control.request("free", name=n)}


def worker(request: dict[str, Any]) -> dict[str, Any]:
    handle, calls = (_api_calls if request["path"] == "api" else _zmq_calls)(request)
    tag, cycles = request["tag"], request["cycles"]
    try:
        for i in range(20):  # warm-up: connect, first Zone types, caches
            for op in OPS:
                calls[op](f"{tag}warm{i}")
        print("ready", flush=True)
        sys.stdin.readline()
        out: dict[str, Any] = {op: [] for op in OPS}
        out["start"] = time.monotonic()
        for i in range(cycles):
            name = f"{tag}-{i}"
            for op in OPS:
                t0 = time.perf_counter_ns()
                calls[op](name)
                out[op].append((time.perf_counter_ns() - t0) * 1e-9)
        out["end"] = time.monotonic()
    finally:
        handle.close()
    return out


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    print(json.dumps(worker(json.loads(sys.argv[2]))), flush=True)
