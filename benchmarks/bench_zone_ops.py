"""zone_ops: ``lookup`` and ``reserve``/``free`` in a worker, against a ZeroMQ round trip and a bare flock.

One worker process attaches to a primary on this machine and reserves 100
zones of 4 KiB first, then measures:

* ``lookup`` of one of them: ``timeit`` loops (``repeat`` x ``number`` calls),
  per-call median of the repeats. Target <= 1 us. Baseline: the same timeit
  over a plain dict's ``__getitem__``, the floor of any Python lookup.
* ``lookup`` right after another table handle (what another worker holds)
  committed a change: every lookup then refreshes from the shared table, which
  is the cost a busy fleet pays.
* ``reserve`` and ``free``, each call timed with ``perf_counter_ns`` over
  pairs with a new name each time (the table stays at 100 zones). Target
  reserve <= 25 us. Baselines: a ZeroMQ round trip of the primary's ``hello``
  through ``hugeshmd.wire.client.Control`` (what a reserve would cost if the primary
  did it; DESIGN.md says ~90 us), and a bare ``fcntl.flock`` lock/unlock pair.
* ``lookup`` while another worker reserves and frees in a loop: every call timed,
  p50 and p99 (target p99 <= 10 us), at 100 and 1,000 zones, against lookups with no
  writer in the same run.
* ``reserve`` when the table holds ~900 zones, and ``reserve`` with a new size
  each time, to show how the cost grows.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from .common import MiB, PrimaryProcess, metric, percentile, run_worker, worker_reply

LOOKUP_TARGET = 1e-6
CHURN_P99_TARGET = 10e-6
RESERVE_TARGET = 25e-6
ZONES = 100
ZONE_SIZE = 4096


def run(quick: bool) -> dict[str, Any]:
    request = {"zones": ZONES, "pairs": 200 if quick else 2000, "repeat": 3 if quick else 7,
               "number": 20_000 if quick else 200_000, "rtts": 50 if quick else 1000,
               "grow_to": 300 if quick else 900, "distinct": 50 if quick else 300,
               "foreign": 50 if quick else 1000}
    memory = 16 * MiB if quick else 64 * MiB
    with PrimaryProcess(memory, "try" if quick else "on") as primary:
        reply = run_worker(__name__, {**request, "prefix": primary.prefix, "root": primary.root})
        churn = {zones: _lookups_under_churn(primary, zones, 0.5 if quick else 2.0) for zones in (100, 1000)}
        mode = primary.mode
    flock, zmq_rtt = reply["flock"], reply["zmq_hello"]
    grown = f"reserve at {reply['grown_zones']} zones"
    metrics = {
        "lookup": metric(reply["lookup"], baseline=reply["dict_getitem"], baseline_name="dict.__getitem__",
                         target=LOOKUP_TARGET, quick=quick, note=f"timeit, {ZONES} zones present"),
        "lookup after a foreign change": metric(reply["lookup_after_change"], baseline=reply["lookup"],
                                                baseline_name="lookup", note="refresh from the shared table"),
        "reserve": metric(reply["reserve"], baseline=zmq_rtt, baseline_name="ZeroMQ hello round trip",
                          target=RESERVE_TARGET, quick=quick, note=f"{ZONE_SIZE} B, {ZONES} zones present"),
        "free": metric(reply["free"], baseline=flock, baseline_name="flock lock+unlock"),
        "reserve+free pair": metric(reply["pair"], baseline=zmq_rtt, baseline_name="ZeroMQ hello round trip"),
        grown: metric(reply["reserve_grown"], baseline=reply["reserve"], baseline_name=f"reserve at {ZONES} zones",
                      note="growth with the number of zones"),
        "reserve, a new size each call": metric(reply["reserve_distinct"], baseline=reply["reserve"],
                                                baseline_name="reserve, same size",
                                                note="a ctypes type is made per new size"),
        "baseline: ZeroMQ hello round trip": metric(zmq_rtt, note="hugeshmd.wire.client.Control.request('hello')"),
        "baseline: flock lock+unlock": metric(flock, note="fcntl.flock on a file in the runtime dir"),
    }
    for zones, got in churn.items():
        p99 = percentile(got["churn"], 99)
        metrics[f"lookup p99 while another worker reserves and frees, {zones} zones"] = metric(
            [p99], baseline=[percentile(got["quiet"], 99)], baseline_name="lookup p99, no writer",
            target=CHURN_P99_TARGET, quick=quick,
            note=f"p50 {percentile(got['churn'], 50) * 1e6:.2f} us, p99.9 {percentile(got['churn'], 99.9) * 1e6:.1f} "
                 f"us, max {max(got['churn']) * 1e6:.0f} us; {got['commits']} commits during "
                 f"{len(got['churn'])} lookups")
    notes = ["the primary ran in fallback mode: 4 KiB pages in /dev/shm"] if mode == "fallback" else []
    return {"name": "zone_ops", "params": {**request, "memory": memory, "mode": mode}, "notes": notes,
            "metrics": metrics, "details": {"zmq_import_s": reply["zmq_import"]}}


def _lookups_under_churn(primary: PrimaryProcess, zones: int, seconds: float) -> dict[str, Any]:
    """Lookups timed one by one with no writer, then while another process reserves and frees."""
    return run_worker(__name__, {"prefix": primary.prefix, "root": primary.root, "op": "lookups", "zones": zones,
                                 "seconds": seconds})


def _churn(request: dict[str, Any]) -> dict[str, Any]:
    """Reserve and free, after "go", until stdin closes; how many commits."""
    import select

    import hugeshmd

    with hugeshmd.attach(request["prefix"], runtime_root=request["root"]) as shm:
        print("ready", flush=True)
        if sys.stdin.readline().strip() != "go":
            return {"commits": 0}
        commits = 0
        while not select.select([sys.stdin], [], [], 0)[0]:
            for i in range(20):
                shm.reserve(f"churn{i}", ZONE_SIZE)
                shm.free(f"churn{i}")
            commits += 40
        return {"commits": commits}


def _lookups(request: dict[str, Any]) -> dict[str, Any]:
    """Quiet lookups, then lookups while a churn writer (started here) commits."""
    import subprocess

    import hugeshmd

    from .common import PYTHON, REPO

    with hugeshmd.attach(request["prefix"], runtime_root=request["root"]) as shm:
        for i in range(max(0, request["zones"] - len(shm.zones))):  # top the table up to that many zones
            try:
                shm.reserve(f"bg{i:04d}", ZONE_SIZE)
            except hugeshmd.AlreadyExists:
                pass
        name = shm.zones[len(shm.zones) // 2].name

        def timed(seconds: float) -> list[float]:
            out, clock, lookup = [], time.perf_counter_ns, shm.lookup
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                for _ in range(1000):
                    t0 = clock()
                    lookup(name)
                    out.append(clock() - t0)
            return [x * 1e-9 for x in out]

        quiet = timed(request["seconds"] / 2)
        writer = subprocess.Popen([PYTHON, "-m", "benchmarks.bench_zone_ops", "--worker",
                                   json.dumps({**request, "op": "churn"})], cwd=REPO, text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert writer.stdin is not None and writer.stdout is not None
            if writer.stdout.readline().strip() != "ready":
                raise RuntimeError("the churn writer did not start")
            writer.stdin.write("go\n")
            writer.stdin.flush()
            churn = timed(request["seconds"])
            writer.stdin.close()
            commits = json.loads(writer.stdout.read().strip().splitlines()[-1])["commits"]
        finally:
            if writer.poll() is None:
                writer.kill()
            writer.wait()
        return {"quiet": quiet, "churn": churn, "commits": commits, "zones": len(shm.zones)}


# -- the worker -----------------------------------------------------------------------


def _timed_calls(call: Any, names: list[str]) -> list[float]:
    out = []
    for name in names:
        t0 = time.perf_counter_ns()
        call(name)
        out.append((time.perf_counter_ns() - t0) * 1e-9)
    return out


def _lookup_loops(shm: Any, name: str, repeat: int, number: int) -> tuple[list[float], list[float]]:
    import timeit

    plain = {f"zone{i:04d}": object() for i in range(ZONES)}
    lookup = timeit.Timer("lookup(name)", globals={"lookup": shm.lookup, "name": name})
    getitem = timeit.Timer("get(name)", globals={"get": plain.__getitem__, "name": name})
    return ([t / number for t in lookup.repeat(repeat, number)],
            [t / number for t in getitem.repeat(repeat, number)])


def _reserve_free_pairs(shm: Any, tag: str, count: int, sizes: list[int] | None = None) -> dict[str, list[float]]:
    reserve, free, pair = [], [], []
    for i in range(count):
        name, size = f"{tag}{i:05d}", sizes[i] if sizes else ZONE_SIZE
        t0 = time.perf_counter_ns()
        shm.reserve(name, size)
        t1 = time.perf_counter_ns()
        shm.free(name)
        t2 = time.perf_counter_ns()
        reserve.append((t1 - t0) * 1e-9)
        free.append((t2 - t1) * 1e-9)
        pair.append((t2 - t0) * 1e-9)
    return {"reserve": reserve, "free": free, "pair": pair}


def _lookup_after_change(shm: Any, prefix: str, root: str, count: int) -> list[float]:
    """lookup() right after a change committed through a second handle of the table (as by another worker)."""
    from hugeshmd.shm import zones
    from hugeshmd.shm.paths import RuntimePaths
    from hugeshmd.shm.table import Table

    other = Table.open(RuntimePaths.for_prefix(prefix, root).table)
    out = []
    try:
        for i in range(count):
            zones.reserve(other, f"other{i:05d}", ZONE_SIZE, 64)
            t0 = time.perf_counter_ns()
            shm.lookup("zone0050")
            out.append((time.perf_counter_ns() - t0) * 1e-9)
            zones.free(other, f"other{i:05d}")
    finally:
        other.close()
    return out


def _flock_pairs(directory: str, count: int) -> list[float]:
    import fcntl
    import os

    path = os.path.join(directory, "bench.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    out = []
    try:
        for _ in range(count):
            t0 = time.perf_counter_ns()
            fcntl.flock(fd, fcntl.LOCK_EX)
            fcntl.flock(fd, fcntl.LOCK_UN)
            out.append((time.perf_counter_ns() - t0) * 1e-9)
    finally:
        os.close(fd)
        os.unlink(path)
    return out


def _zmq_hello(prefix: str, root: str, count: int) -> tuple[list[float], float]:
    t0 = time.perf_counter()
    from hugeshmd.shm.paths import RuntimePaths
    from hugeshmd.wire.client import Control

    imported = time.perf_counter() - t0
    out = []
    with Control(RuntimePaths.for_prefix(prefix, root)) as control:
        for _ in range(20):  # connect and warm up
            control.request("hello")
        for _ in range(count):
            t0 = time.perf_counter_ns()
            control.request("hello")
            out.append((time.perf_counter_ns() - t0) * 1e-9)
    return out, imported


def worker(request: dict[str, Any]) -> dict[str, Any]:
    import tempfile

    import hugeshmd

    prefix, root = request["prefix"], request["root"]
    reply: dict[str, Any] = {}
    with hugeshmd.attach(prefix, runtime_root=root) as shm:
        for i in range(request["zones"]):
            shm.reserve(f"zone{i:04d}", ZONE_SIZE)
        reply["lookup"], reply["dict_getitem"] = _lookup_loops(shm, "zone0050", request["repeat"], request["number"])
        _reserve_free_pairs(shm, "warm", 50)
        reply.update(_reserve_free_pairs(shm, "r", request["pairs"]))
        reply["lookup_after_change"] = _lookup_after_change(shm, prefix, root, request["foreign"])
        sizes = [ZONE_SIZE + 64 * (i + 1) for i in range(request["distinct"])]
        reply["reserve_distinct"] = _reserve_free_pairs(shm, "d", request["distinct"], sizes)["reserve"]
        for i in range(request["zones"], request["grow_to"]):
            shm.reserve(f"zone{i:04d}", ZONE_SIZE)
        reply["grown_zones"] = len(shm.zones)
        reply["reserve_grown"] = _reserve_free_pairs(shm, "g", min(request["pairs"], 500))["reserve"]
    with tempfile.TemporaryDirectory(dir=root) as directory:
        reply["flock"] = _flock_pairs(directory, request["pairs"])
    reply["zmq_hello"], reply["zmq_import"] = _zmq_hello(prefix, root, request["rtts"])
    return reply


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _request = json.loads(sys.argv[2])
    worker_reply({"churn": _churn, "lookups": _lookups}.get(_request.get("op", ""), worker)(_request))
