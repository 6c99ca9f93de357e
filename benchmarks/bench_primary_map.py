"""primary_map: how long a primary takes to map and populate its memory, against a bare populate.

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

import ctypes
import ctypes.util
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

from .common import HUGEPAGE, GiB, MiB, check_leftovers, free_hugepages, hugetlbfs_mount, median, metric, unique_prefix

TARGET_RATIO = 1.10
FULL_SIZE = 1 * GiB
QUICK_SIZE = 16 * MiB

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
_PRIMARY_STEPS = ("_remove_stale", "_choose_backing", "_map_first_segment", "_create_table", "_bind")
_MODULE_STEPS = (("_sys", "populate"), ("_sys", "physical_addresses"), ("backing", "numa_node"))


class _Instrumented:
    """Wraps the primary's steps and a few package functions with timers, and undoes it."""

    def __init__(self) -> None:
        import hugeshmd.primary

        self.phases: dict[str, float] = {}
        self._undo: list[tuple[object, str, object]] = []
        for name in _PRIMARY_STEPS:
            self._wrap(hugeshmd.primary.Primary, name, name.strip("_"))
        for module_name, name in _MODULE_STEPS:
            module = getattr(hugeshmd, module_name, None)
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


def hugeshmd_start(length: int, huge_pages: str, root: str) -> dict[str, Any]:
    """One Primary.start() + shutdown() in this process: seconds of each, phases, mode."""
    from hugeshmd import config as hconfig
    from hugeshmd.primary import Primary

    prefix = unique_prefix()
    conf = hconfig.load(None, {"prefix": prefix, "memory": length, "huge_pages": huge_pages, "runtime_root": root})
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


def _plan(quick: bool) -> tuple[int, str, str | None, list[str]]:
    """(bytes to map, --huge-pages value, hugetlbfs mount or None for /dev/shm, notes)."""
    notes = []
    mount, free = hugetlbfs_mount(), free_hugepages()
    wanted = QUICK_SIZE if quick else FULL_SIZE
    if mount is None or free < 8:
        notes.append(f"no hugetlbfs mount or < 8 free 2 MiB pages ({free}): fallback, 4 KiB pages in /dev/shm")
        return wanted, "try" if quick else "off", None, notes
    pages = wanted // HUGEPAGE
    if free < pages:
        pages = 1 << (free.bit_length() - 1)  # the largest power of two that is free
        notes.append(f"only {free} free 2 MiB hugepages: SCALED DOWN from {wanted >> 20} MiB "
                     f"to {pages * 2} MiB")
    return pages * HUGEPAGE, "try" if quick else "on", mount, notes


def run(quick: bool) -> dict[str, Any]:
    length, huge_pages, mount, notes = _plan(quick)
    repeats = 3 if quick else 7
    directory = mount or "/dev/shm"
    root = tempfile.mkdtemp(prefix="hsb", dir="/tmp")
    base_setup: list[float] = []
    base_teardown: list[float] = []
    runs: list[dict[str, Any]] = []
    try:
        bare_populate(directory, length)  # warm-ups, discarded
        hugeshmd_start(length, huge_pages, root)
        for _ in range(repeats):
            setup, teardown = bare_populate(directory, length)
            base_setup.append(setup)
            base_teardown.append(teardown)
            runs.append(hugeshmd_start(length, huge_pages, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    modes = sorted({r["mode"] for r in runs})
    if modes != (["hugepages"] if mount else ["fallback"]):
        notes.append(f"the baseline used {directory} but hugeshmd ran in mode {modes}: the ratio compares unlike pages")
    phases = sorted({p for r in runs for p in r["phases"]})
    phase_medians = {p: median([r["phases"].get(p, 0.0) for r in runs]) for p in phases}
    start = [r["start"] for r in runs]
    mapped = [r["phases"]["map_first_segment"] for r in runs if "map_first_segment" in r["phases"]]
    metrics = {
        "start": metric(start, baseline=base_setup, baseline_name="open+ftruncate+mmap(MAP_POPULATE)",
                        target=TARGET_RATIO, target_kind="ratio", quick=quick,
                        note="Primary.start() vs bare populate"),
        "shutdown": metric([r["shutdown"] for r in runs], baseline=base_teardown,
                           baseline_name="munmap+close+unlink", quick=quick, note="Primary.shutdown()"),
    }
    if mapped:
        metrics["map_phase"] = metric(mapped, baseline=base_setup, baseline_name="open+ftruncate+mmap(MAP_POPULATE)",
                                      quick=quick, note="backing.create: map, populate, pagemap, numa_maps")
    return {
        "name": "primary_map",
        "params": {"bytes": length, "pages": length // (HUGEPAGE if mount else 4096), "repeats": repeats,
                   "huge_pages": huge_pages, "directory": directory, "modes": modes},
        "notes": notes,
        "metrics": metrics,
        "details": {"phase_medians": phase_medians,
                    "non_map_overhead": median(start) - median(mapped) if mapped else None,
                    "leftovers": [p for r in runs for p in r["leftovers"]]},
    }
