"""primary_map: how long a primary takes to map and populate its memory, against a bare populate.

Sizes from 256 MiB to 8 GiB of 2 MiB pages, and 1 to 8 GiB of 1 GiB pages
where the kernel grants them: a full run raises each pool's nr_hugepages by
what is missing for its largest size (read back: the kernel may grant less,
and sizes above what it granted are skipped, with a note), and sets it back
after that page size's runs.

hugeshmd: ``Primary(config).start()`` in this process, timed around ``start()``
(lock, stale-file sweep, backing choice, window, map + populate, pagemap,
table, sockets), then ``shutdown()`` timed on its own. The phases are timed
too, by wrapping the primary's own steps, so a miss can be placed.

Baseline, with no hugeshmd code: open a file in the same hugetlbfs mount (or
/dev/shm in fallback), ``ftruncate``, ``mmap(MAP_SHARED|MAP_POPULATE)`` through
ctypes; then ``munmap``, close, unlink, timed apart as the baseline of
``shutdown()``. Runs alternate (baseline, hugeshmd, baseline, ...) after one
discarded warm-up of each, so drift hits both alike. Target: start/baseline <= 1.10.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from hugeshmd.errors import HugeshmdError

from .common import (
    GIGAPAGE,
    HUGEPAGE,
    GiB,
    MiB,
    available_pages,
    check_leftovers,
    format_size,
    hugepages_available,
    median,
    metric,
    mount_of,
    summary,
    unique_prefix,
)

TARGET_RATIO = 1.10
FULL_SIZE = 1 * GiB  # the size of the target's verdict
QUICK_SIZE = 16 * MiB
FULL_SIZES = {HUGEPAGE: [256 * MiB, 512 * MiB, 1 * GiB, 2 * GiB, 4 * GiB, 8 * GiB],
              GIGAPAGE: [1 * GiB, 2 * GiB, 4 * GiB, 8 * GiB]}
QUICK_SIZES = {HUGEPAGE: [4 * MiB, QUICK_SIZE]}  # no 1 GiB pages in a smoke run

_PROT_RW = 0x1 | 0x2
_MAP_SHARED = 0x01
_MAP_POPULATE = 0x8000
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value


def bare_populate(directory: str, length: int) -> tuple[float, float]:
    """(setup, teardown) seconds: open+ftruncate+mmap(MAP_POPULATE), then munmap+close+unlink."""
    path = os.path.join(directory, f"hsbench-baseline.{os.getpid()}.{unique_prefix('')}")
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, length)
        address = _libc.mmap(None, length, _PROT_RW, _MAP_SHARED | _MAP_POPULATE, fd, 0)
        if address is None or address == _MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, f"baseline mmap of {length} bytes in {directory}: {os.strerror(err)}")
        t1 = time.perf_counter()
        if _libc.munmap(address, length) != 0:
            raise OSError(ctypes.get_errno(), "baseline munmap")
    finally:
        os.close(fd)
        os.unlink(path)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def _timed(phases: dict[str, float], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0
    return wrapper


# The primary's steps, in start-up order, and module functions under them; a
# name the package no longer has is skipped (the total is still measured).
_PRIMARY_STEPS = ("_clear_predecessor", "_map_first_segment", "_create_table", "_bind")
_MODULE_STEPS = (("_sys", "populate"), ("_sys", "physical_addresses"), ("daemon.backing", "numa_node"),
                 ("daemon.backing", "choose"))


class _Instrumented:
    """Wraps the primary's steps and a few package functions with timers, and undoes it."""

    def __init__(self) -> None:
        import hugeshmd.daemon.primary

        self.phases: dict[str, float] = {}
        self._undo: list[tuple[object, str, object]] = []
        for name in _PRIMARY_STEPS:
            self._wrap(hugeshmd.daemon.primary.Primary, name, name.strip("_"))
        for module_name, name in _MODULE_STEPS:
            module = sys.modules.get(f"hugeshmd.{module_name}")
            self._wrap(module, name, name)

    def _wrap(self, owner: object, attr: str, label: str) -> None:
        original = getattr(owner, attr, None) if owner is not None else None
        if original is None:
            return
        self._undo.append((owner, attr, original))
        setattr(owner, attr, _timed(self.phases, label, original))

    def restore(self) -> None:
        for owner, attr, original in reversed(self._undo):
            setattr(owner, attr, original)


def hugeshmd_start(length: int, huge_pages: str, root: str, page_size: int = HUGEPAGE) -> dict[str, Any]:
    """One Primary.start() + shutdown() in this process: seconds of each, phases, mode."""
    from hugeshmd.daemon import config as hconfig
    from hugeshmd.daemon.primary import Primary

    prefix = unique_prefix()
    conf = hconfig.load(None, {"prefix": prefix, "memory": length, "huge_pages": huge_pages, "runtime_root": root,
                               "page_size": page_size})
    timers = _Instrumented()
    try:
        primary = Primary(conf)
        t0 = time.perf_counter()
        try:
            primary.start()
            t1 = time.perf_counter()
            mode = "hugepages" if primary.fallback_reason is None and primary.backing.page_size > 4096 else "fallback"
            memory = sum(s.length for s in primary.table.snapshot().segments)
        finally:
            t2 = time.perf_counter()
            primary.shutdown()
            t3 = time.perf_counter()
    finally:
        timers.restore()
        leftovers = check_leftovers(prefix, root)
    return {"start": t1 - t0, "shutdown": t3 - t2, "phases": dict(timers.phases), "mode": mode,
            "memory": memory, "leftovers": leftovers}


def _series(length: int, page_size: int, huge_pages: str, directory: str, repeats: int,
            root: str) -> dict[str, Any]:
    """Alternating runs of the bare populate and of Primary.start(), after one discarded warm-up of each."""
    bare_populate(directory, length)
    hugeshmd_start(length, huge_pages, root, page_size)
    base_setup: list[float] = []
    base_teardown: list[float] = []
    runs: list[dict[str, Any]] = []
    for _ in range(repeats):
        setup, teardown = bare_populate(directory, length)
        base_setup.append(setup)
        base_teardown.append(teardown)
        runs.append(hugeshmd_start(length, huge_pages, root, page_size))
    return {"bytes": length, "page_size": page_size, "directory": directory, "huge_pages": huge_pages,
            "bare": base_setup, "bare_teardown": base_teardown, "runs": runs}


def _plan(quick: bool, page_size: int, available: int) -> tuple[list[int], str, str | None, list[str]]:
    """(sizes, --huge-pages value, hugetlbfs mount or None for /dev/shm, notes) for one page size."""
    wanted = (QUICK_SIZES if quick else FULL_SIZES)[page_size]
    label = format_size(page_size)
    mount = mount_of(page_size)
    if mount is None or available * page_size < wanted[0]:
        why = f"no hugetlbfs mount of {label} pages" if mount is None else f"only {available} free {label} pages"
        if page_size != HUGEPAGE:
            return [], "on", None, [f"{label} pages skipped: {why}"]
        return wanted, "try" if quick else "off", None, [f"{why}: fallback, 4 KiB pages in /dev/shm"]
    sizes = [size for size in wanted if size <= available * page_size]
    notes = []
    if len(sizes) < len(wanted):
        notes.append(f"{label} pages: only {available} available after raising the pool: sizes above "
                     f"{format_size(sizes[-1])} skipped")
    return sizes, "try" if quick else "on", mount, notes


def run(quick: bool) -> dict[str, Any]:
    notes: list[str] = []
    series: list[dict[str, Any]] = []
    root = tempfile.mkdtemp(prefix="hsb", dir="/tmp")
    try:
        for page_size in (QUICK_SIZES if quick else FULL_SIZES):
            want = max((QUICK_SIZES if quick else FULL_SIZES)[page_size]) // page_size
            with _pool(quick, page_size, want, notes) as available:
                sizes, huge_pages, mount, plan_notes = _plan(quick, page_size, available)
                notes += plan_notes
                for size in sizes:
                    repeats = 3 if quick else (5 if size >= 8 * GiB else 7)
                    try:
                        series.append(_series(size, page_size, huge_pages, mount or "/dev/shm", repeats, root))
                    except (OSError, HugeshmdError) as err:  # other processes took pages since the plan
                        notes.append(f"{format_size(size)} of {format_size(page_size)} pages SKIPPED: "
                                     f"{err} ({available_pages(page_size)} pages available now)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return _result(series, quick, notes)


def _pool(quick: bool, page_size: int, pages: int, notes: list[str]) -> Any:
    """In a full run, grow the pool for the largest size; quick runs use what is free."""
    if quick:
        return contextlib.nullcontext(available_pages(page_size))
    return hugepages_available(page_size, pages, notes)


def _label(s: dict[str, Any]) -> str:
    pages = "4 KiB pages, fallback" if s["directory"] == "/dev/shm" else f"{format_size(s['page_size'])} pages"
    return f"{format_size(s['bytes'])} ({pages})"


def _result(series: list[dict[str, Any]], quick: bool, notes: list[str]) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    reference = None
    for s in series:
        runs = s["runs"]
        modes = sorted({r["mode"] for r in runs})
        if modes != (["fallback"] if s["directory"] == "/dev/shm" else ["hugepages"]):
            notes.append(f"{_label(s)}: the baseline used {s['directory']} but hugeshmd ran in mode {modes}")
        is_reference = s["bytes"] == (QUICK_SIZE if quick else FULL_SIZE) and s["page_size"] == HUGEPAGE
        metrics[f"start {_label(s)}"] = metric(
            [r["start"] for r in runs], baseline=s["bare"], baseline_name="open+ftruncate+mmap(MAP_POPULATE)",
            target=TARGET_RATIO if is_reference else None, target_kind="ratio", quick=quick,
            note="Primary.start() vs bare populate")
        if is_reference:
            reference = s
    if reference is not None:
        runs = reference["runs"]
        mapped = [r["phases"]["map_first_segment"] for r in runs if "map_first_segment" in r["phases"]]
        metrics["shutdown " + _label(reference)] = metric(
            [r["shutdown"] for r in runs], baseline=reference["bare_teardown"], baseline_name="munmap+close+unlink",
            quick=quick, note="Primary.shutdown()")
        if mapped:
            metrics["map phase " + _label(reference)] = metric(
                mapped, baseline=reference["bare"], baseline_name="open+ftruncate+mmap(MAP_POPULATE)",
                quick=quick, note="backing.create: map, populate, pagemap, numa_maps")
    details = []
    for s in series:
        runs = s["runs"]
        phases = sorted({p for r in runs for p in r["phases"]})
        start = [r["start"] for r in runs]
        mapped = [r["phases"]["map_first_segment"] for r in runs if "map_first_segment" in r["phases"]]
        details.append({"bytes": s["bytes"], "page_size": s["page_size"], "directory": s["directory"],
                        "repeats": len(runs), "modes": sorted({r["mode"] for r in runs}),
                        "start": summary(start), "bare": summary(s["bare"]),
                        "ratio": median(start) / median(s["bare"]),
                        "phase_medians": {p: median([r["phases"].get(p, 0.0) for r in runs]) for p in phases},
                        "non_map_overhead": median(start) - median(mapped) if mapped else None,
                        "leftovers": [p for r in runs for p in r["leftovers"]]})
    return {"name": "primary_map",
            "params": {"sizes": [[s["bytes"], s["page_size"]] for s in series]},
            "notes": notes, "metrics": metrics, "details": {"series": details}}
