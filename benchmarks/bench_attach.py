"""attach: ``hugeshmd.attach()`` timed inside a worker, and how it grows with the memory mapped.

A worker process (started once per table, its imports done before timing)
times ``attach()`` with ``time.perf_counter`` and then ``close()``, many times;
the first attach of the process is reported apart. It is measured against a
small table (64 MiB, 32 pages) and a large one (1 GiB, 512 pages): the core
maps the whole memory as one segment, so attach costs one ``mmap`` per
segment and must not grow with pages. Two more runs have 100 and 1,000 zones
in the large table: a worker's first version of the table checks each zone
record when it first reads it, so attach should barely grow with zones (target
for 1,000 zones: <= 1 ms, issue 10); with 1,000 zones, ``attach`` followed by
one ``lookup`` is timed too (the lookup builds the index of names). The zones
are of 96 KiB, records of the shared table: zones of up to 64 KiB are blocks of
the heap named in the name index (hugeshmd.shm.names), which attach never
reads, and the table is what attach must decode. Target:
median <= 0.25 ms for the 1 GiB table.

Baseline, in the same worker: the bare syscalls an attach cannot avoid, through
ctypes: reserve the window (PROT_NONE, MAP_FIXED_NOREPLACE), open the segment's
file, map it MAP_SHARED|MAP_FIXED, close; then munmap.

Attach against the number of segments: today's primary maps its memory as one
segment and has no option for more (one page size, one mapping), so tables of
1 to 256 segments are *built* by the benchmark in a scratch runtime dir with
the package's own table code (``Layout.plan``, ``Table.create``, one
``commit`` of N ``SegmentRecord``), each segment a real hugetlbfs file of one
2 MiB page (populated, as a primary's), the state set ready with this process
as the owner. That is the table a growing or multi-page-size primary will
publish; the worker cannot tell it from a primary's. The bare baseline then
maps the same N files.

Concurrent attach: K = 1, 2, 8, 32 worker processes, each started and
imported first, then released together each round (a line on every stdin):
each times one ``attach()`` and ``close()``, and answers. p50 and p99 over
every worker's attaches of every round.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from .common import (
    HUGEPAGE,
    PYTHON,
    REPO,
    MiB,
    PrimaryProcess,
    available_pages,
    check_leftovers,
    format_size,
    free_hugepages,
    hugepages_available,
    hugetlbfs_mount,
    metric,
    percentile,
    run_worker,
    unique_prefix,
    worker_reply,
)

TARGET = 0.25e-3
SMALL, LARGE = 64 * MiB, 1024 * MiB
QUICK_SMALL, QUICK_LARGE = 4 * MiB, 16 * MiB
ZONES = 100
MANY_ZONES, QUICK_MANY_ZONES = 1000, 120  # quick: 120 zones of TABLE_ZONE fit its 16 MiB
MANY_ZONES_TARGET = 1e-3  # issue 10: attach with 1,000 zones
TABLE_ZONE = 96 << 10  # over 64 KiB: a record of the shared table, not a block of the heap
SEGMENT_COUNTS, QUICK_SEGMENT_COUNTS = (1, 4, 16, 64, 256), (1, 4, 16)
CONCURRENCY, QUICK_CONCURRENCY = (1, 2, 8, 32), (1, 2, 8)


def _sizes(quick: bool) -> tuple[int, int, str, list[str]]:
    """(small bytes, large bytes, --huge-pages, notes)."""
    if quick:
        return QUICK_SMALL, QUICK_LARGE, "try", []
    free = free_hugepages()
    if hugetlbfs_mount() is None or free < SMALL // HUGEPAGE * 2:
        return SMALL, LARGE, "off", [f"too few free hugepages ({free}): fallback mode, 4 KiB pages in /dev/shm"]
    if free < LARGE // HUGEPAGE:
        large = (1 << (free.bit_length() - 1)) * HUGEPAGE
        return SMALL, large, "on", [f"only {free} free hugepages: large table SCALED DOWN to {large >> 20} MiB"]
    return SMALL, LARGE, "on", []


def _measure(memory: int, huge_pages: str, repeats: int, zones: int) -> dict[str, Any]:
    with PrimaryProcess(memory, huge_pages) as primary:
        request = {"prefix": primary.prefix, "root": primary.root, "repeats": repeats, "zones": zones}
        reply = run_worker(__name__, request)
        reply["mode"] = primary.mode
    return reply


def run(quick: bool) -> dict[str, Any]:
    result = _run_sizes(quick)
    notes = result["notes"]
    counts = QUICK_SEGMENT_COUNTS if quick else SEGMENT_COUNTS
    with _segment_pool(quick, max(counts), notes) as available:
        by_segments = [_measure_segments(n, 50 if quick else 300, available, notes) for n in counts]
    huge_pages = result["params"]["huge_pages"]
    memory = 16 * MiB if quick else 64 * MiB
    with PrimaryProcess(memory, huge_pages) as primary:
        concurrent = [_concurrent(primary, k, 5 if quick else max(20, 400 // k))
                      for k in (QUICK_CONCURRENCY if quick else CONCURRENCY)]
    for row in by_segments:
        result["metrics"][f"attach, {row['segments']} segments"] = metric(
            row["attach"], baseline=row["bare"], baseline_name=f"bare reserve+{row['segments']}x(open+mmap+close)",
            note=f"built table, {row['page_size'] >> 10} KiB pages")
    for row in concurrent:
        result["metrics"][f"attach, {row['workers']} workers at once"] = metric(
            row["attach"], baseline=concurrent[0]["attach"], baseline_name="attach, 1 worker",
            note=f"{row['rounds']} rounds, p99 {percentile(row['attach'], 99) * 1e6:.0f} us")
    result["details"]["by_segments"] = [{k: v for k, v in r.items() if k not in ("attach", "bare", "close")}
                                        | {"attach_p50": percentile(r["attach"], 50),
                                           "attach_p99": percentile(r["attach"], 99),
                                           "bare_p50": percentile(r["bare"], 50),
                                           "bare_p99": percentile(r["bare"], 99)} for r in by_segments]
    result["details"]["concurrent"] = [{"workers": r["workers"], "rounds": r["rounds"], "samples": len(r["attach"]),
                                        "attach_p50": percentile(r["attach"], 50),
                                        "attach_p99": percentile(r["attach"], 99),
                                        "per_worker_p50": r["per_worker_p50"]} for r in concurrent]
    return result


def _run_sizes(quick: bool) -> dict[str, Any]:
    small, large, huge_pages, notes = _sizes(quick)
    repeats = 50 if quick else 1000
    results = {
        "small": _measure(small, huge_pages, repeats, 0),
        "large": _measure(large, huge_pages, repeats, 0),
        "large_zones": _measure(large, huge_pages, repeats, ZONES),
        "large_many_zones": _measure(large, huge_pages, repeats // 2, QUICK_MANY_ZONES if quick else MANY_ZONES),
    }
    if any(r["mode"] == "fallback" for r in results.values()):
        notes.append("the primaries ran in fallback mode: 4 KiB pages in /dev/shm")
    s, big, bz, many = results["small"], results["large"], results["large_zones"], results["large_many_zones"]
    n_many = QUICK_MANY_ZONES if quick else MANY_ZONES
    label, small_label = format_size(large), format_size(small)
    metrics = {
        f"attach {label}": metric(big["attach"], baseline=big["bare"], baseline_name="bare reserve+open+mmap+close",
                                  target=TARGET, quick=quick, note=f"{big['segments']} segment, {big['pages']} pages"),
        f"attach {small_label}": metric(s["attach"], baseline=s["bare"],
                                            baseline_name="bare reserve+open+mmap+close",
                                            note=f"{s['segments']} segment, {s['pages']} pages"),
        f"attach {label} vs {small_label}": metric(big["attach"], baseline=s["attach"],
                                                       baseline_name=f"attach {small_label}",
                                                       note="growth with pages (ratio ~1 expected)"),
        f"attach {label} + {ZONES} zones": metric(bz["attach"], baseline=big["attach"],
                                                  baseline_name=f"attach {label}, 0 zones",
                                                  note="growth with zones"),
        f"attach {label} + {n_many:,} zones": metric(many["attach"], baseline=big["attach"],
                                                     baseline_name=f"attach {label}, 0 zones",
                                                     target=MANY_ZONES_TARGET, quick=quick,
                                                     note="records checked as they are read"),
        f"attach + first lookup, {n_many:,} zones": metric(many["attach_lookup"], baseline=many["attach"],
                                                         baseline_name=f"attach, {n_many:,} zones",
                                                         note="the lookup builds the index of names"),
        f"close {label}": metric(big["close"], note="Secondary.close(), window unmapped"),
    }
    return {
        "name": "attach",
        "params": {"small": small, "large": large, "huge_pages": huge_pages, "repeats": repeats, "zones": ZONES,
                   "many_zones": n_many, "modes": sorted({r["mode"] for r in results.values()})},
        "notes": notes,
        "metrics": metrics,
        "details": {k: {"first_attach": r["first"], "segments": r["segments"], "pages": r["pages"],
                        "mode": r["mode"]} for k, r in results.items()},
    }


# -- tables of N segments ---------------------------------------------------------------


def _segment_pool(quick: bool, pages: int, notes: list[str]) -> Any:
    import contextlib

    if quick:
        return contextlib.nullcontext(available_pages(HUGEPAGE))
    return hugepages_available(HUGEPAGE, pages + 64, notes)  # a margin: others may take pages meanwhile


class BuiltTable:
    """A runtime dir whose table lists ``count`` segments, each a real file of one page. Remove with :meth:`remove`.

    Made with the package's table code; this process is recorded as the table's
    (live) owner, so workers attach to it as to a primary's.
    """

    def __init__(self, count: int, huge: bool) -> None:
        from hugeshmd.daemon.config import MIN_WINDOW, default_base_address
        from hugeshmd.shm.identity import own_start_time
        from hugeshmd.shm.layout import MODE_HUGETLBFS, MODE_SHM, STATE_READY, Layout, SegmentRecord
        from hugeshmd.shm.paths import RuntimePaths
        from hugeshmd.shm.table import Table

        self.prefix = unique_prefix()
        self.root = tempfile.mkdtemp(prefix="hsb", dir="/tmp")
        self.page_size = HUGEPAGE if huge else 4096
        directory = hugetlbfs_mount() if huge else "/dev/shm"
        assert directory is not None
        paths = RuntimePaths.for_prefix(self.prefix, self.root)
        self.files: list[str] = []
        self.table: Any = None
        try:
            os.makedirs(paths.dir)
            base = default_base_address(self.prefix)
            layout = Layout.plan(base=base, window=MIN_WINDOW, page_size=self.page_size,
                                 mode=MODE_HUGETLBFS if huge else MODE_SHM, prefix=self.prefix,
                                 max_segments=max(256, count))
            self.table = Table.create(paths.table, layout)
            records = []
            for i in range(count):
                path = os.path.join(directory, paths.segment_name(i))
                self._make_file(path)
                address = base + 2 * i * self.page_size  # a hole between segments: one mapping each
                records.append(SegmentRecord(i, address, self.page_size, self.page_size, 0, -1, address, 0, 0, path))
            with self.table.locked() as snap:
                self.table.commit(snap, segments=tuple(records))
            self.table.set_state(STATE_READY, os.getpid(), own_start_time())
        except BaseException:
            self.remove()
            raise

    def _make_file(self, path: str) -> None:
        """A file of one page, populated (a hugetlbfs page is reserved and zeroed here, as a primary does)."""
        import mmap

        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.files.append(path)
        try:
            os.ftruncate(fd, self.page_size)
            with mmap.mmap(fd, self.page_size) as m:
                m[0] = 1
        finally:
            os.close(fd)

    def remove(self) -> None:
        if self.table is not None:
            self.table.close()
        for path in self.files:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)
        check_leftovers(self.prefix, None)


def _measure_segments(count: int, repeats: int, available: int, notes: list[str]) -> dict[str, Any]:
    huge = hugetlbfs_mount() is not None and available >= count
    if not huge:
        notes.append(f"{count} segments: {available} free 2 MiB pages: 4 KiB files in /dev/shm instead")
    built = BuiltTable(count, huge)
    try:
        reply = run_worker(__name__, {"prefix": built.prefix, "root": built.root, "repeats": repeats, "zones": 0,
                                      "bare_all": True})
    finally:
        built.remove()
    return {"segments": count, "page_size": built.page_size, "repeats": repeats, **reply}


# -- K workers attaching at once ------------------------------------------------------------


def _concurrent(primary: PrimaryProcess, workers: int, rounds: int) -> dict[str, Any]:
    """K long-lived workers, released together each round; every attach() time."""
    request = json.dumps({"prefix": primary.prefix, "root": primary.root})
    procs = [subprocess.Popen([PYTHON, "-m", __name__, "--round-worker", request], cwd=REPO, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(workers)]
    samples: list[list[float]] = [[] for _ in procs]
    try:
        for proc in procs:  # each says "ready" once imported and warmed up
            _expect(proc, "ready")
        for _ in range(rounds + 1):  # the first round is a warm-up
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            for i, proc in enumerate(procs):
                samples[i].append(float(_expect(proc, None)))
    finally:
        for proc in procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    kept = [s[1:] for s in samples]
    return {"workers": workers, "rounds": rounds, "attach": [x for s in kept for x in s],
            "per_worker_p50": [percentile(s, 50) for s in kept]}


def _expect(proc: subprocess.Popen[str], word: str | None) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line or (word is not None and line != word):
        raise RuntimeError(f"attach round worker {proc.pid} said {line!r} (exit {proc.poll()})")
    return line


def round_worker(request: dict[str, Any]) -> None:
    """Wait for a line, attach, close, print the attach's seconds; until stdin closes."""
    import hugeshmd

    prefix, root = request["prefix"], request["root"]
    hugeshmd.attach(prefix, runtime_root=root).close()
    print("ready", flush=True)
    for _ in sys.stdin:
        t0 = time.perf_counter()
        shm = hugeshmd.attach(prefix, runtime_root=root)
        t1 = time.perf_counter()
        shm.close()
        del shm
        print(repr(t1 - t0), flush=True)


# -- the worker -----------------------------------------------------------------------


def _bare_attach(base: int, window: int, segments: list[tuple[str, int, int]]) -> float:
    """The syscalls of an attach with no hugeshmd code around them; seconds.

    ``segments`` are (path, address, length): one open+mmap+close each.
    """
    import ctypes
    import os

    libc = _libc()
    t0 = time.perf_counter()
    got = libc.mmap(base, window, 0, 0x02 | 0x20 | 0x4000 | 0x100000, -1, 0)  # PROT_NONE, NOREPLACE
    if got != base:  # never MAP_FIXED over something that is not ours
        if got not in (None, ctypes.c_void_p(-1).value):
            libc.munmap(got, window)
        raise OSError(ctypes.get_errno(), f"bare attach: {base:#x} is taken (was the last window released?)")
    failed = 0
    for path, address, length in segments:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        mapped = libc.mmap(address, length, 0x3, 0x01 | 0x10, fd, 0)  # MAP_SHARED|MAP_FIXED
        os.close(fd)
        failed += mapped != address
    t1 = time.perf_counter()
    libc.munmap(base, window)
    if failed:
        raise OSError(ctypes.get_errno(), "bare attach: mapping a segment failed")
    return t1 - t0


_LIBC: Any = None


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        import ctypes

        _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
        _LIBC.mmap.restype = ctypes.c_void_p
        _LIBC.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                               ctypes.c_long)
        _LIBC.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    return _LIBC


def _window_of(shm: Any) -> int:
    """The size of the instance's address window: the table's layout, else /proc/self/maps."""
    layout = getattr(getattr(shm, "_table", None), "layout", None)
    if layout is not None:
        return int(layout.window)
    end = shm.base
    with open("/proc/self/maps") as lines:
        for line in lines:
            start, stop = (int(x, 16) for x in line.split(" ", 1)[0].split("-"))
            if start == end:
                end = stop
    return end - shm.base


def worker(request: dict[str, Any]) -> dict[str, Any]:
    import hugeshmd

    prefix, root, repeats = request["prefix"], request["root"], request["repeats"]
    if request["zones"]:
        with hugeshmd.attach(prefix, runtime_root=root) as shm:
            for i in range(request["zones"]):
                shm.reserve(f"zone{i:04d}", TABLE_ZONE)
    t0 = time.perf_counter()
    shm = hugeshmd.attach(prefix, runtime_root=root)
    first = time.perf_counter() - t0
    segments, page_size, base, window = shm.segments, shm.page_size, shm.base, _window_of(shm)
    shm.close()
    del shm
    attach, close, bare, attach_lookup = [], [], [], []
    probe = f"zone{request['zones'] // 2:04d}"
    runs = [(s.path, s.address, s.length) for s in (segments if request.get("bare_all") else segments[:1])]
    for _ in range(repeats):
        t0 = time.perf_counter()
        shm = hugeshmd.attach(prefix, runtime_root=root)
        t1 = time.perf_counter()
        shm.close()
        t2 = time.perf_counter()
        del shm
        attach.append(t1 - t0)
        close.append(t2 - t1)
        bare.append(_bare_attach(base, window, runs))
        if request["zones"]:
            t0 = time.perf_counter()
            shm = hugeshmd.attach(prefix, runtime_root=root)
            shm.lookup(probe)
            attach_lookup.append(time.perf_counter() - t0)
            shm.close()
            del shm
    return {"first": first, "attach": attach, "attach_lookup": attach_lookup, "close": close, "bare": bare,
            "segments": len(segments),
            "pages": sum(s.length for s in segments) // page_size}


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker_reply(worker(json.loads(sys.argv[2])))
elif __name__ == "__main__" and sys.argv[1:2] == ["--round-worker"]:
    round_worker(json.loads(sys.argv[2]))
