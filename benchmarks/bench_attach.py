"""attach: ``hugeshmd.attach()`` timed inside a worker, and how it grows with the memory mapped.

A worker process (started once per table, its imports done before timing)
times ``attach()`` with ``time.perf_counter`` and then ``close()``, many times;
the first attach of the process is reported apart. It is measured against a
small table (64 MiB, 32 pages) and a large one (1 GiB, 512 pages): the core
maps the whole memory as one segment, so attach costs one ``mmap`` per
segment and must not grow with pages. A third run has 100 zones in the large
table, since attach builds one Zone object per zone. Target: median <= 0.25 ms
for the 1 GiB table.

Baseline, in the same worker: the bare syscalls an attach cannot avoid, through
ctypes: reserve the window (PROT_NONE, MAP_FIXED_NOREPLACE), open the segment's
file, map it MAP_SHARED|MAP_FIXED, close; then munmap.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from .common import (
    HUGEPAGE,
    MiB,
    PrimaryProcess,
    format_size,
    free_hugepages,
    hugetlbfs_mount,
    metric,
    run_worker,
    worker_reply,
)

TARGET = 0.25e-3
SMALL, LARGE = 64 * MiB, 1024 * MiB
QUICK_SMALL, QUICK_LARGE = 4 * MiB, 16 * MiB
ZONES = 100


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
    small, large, huge_pages, notes = _sizes(quick)
    repeats = 50 if quick else 1000
    results = {
        "small": _measure(small, huge_pages, repeats, 0),
        "large": _measure(large, huge_pages, repeats, 0),
        "large_zones": _measure(large, huge_pages, repeats, ZONES),
    }
    if any(r["mode"] == "fallback" for r in results.values()):
        notes.append("the primaries ran in fallback mode: 4 KiB pages in /dev/shm")
    s, big, bz = results["small"], results["large"], results["large_zones"]
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
        f"close {label}": metric(big["close"], note="Secondary.close(), window unmapped"),
    }
    return {
        "name": "attach",
        "params": {"small": small, "large": large, "huge_pages": huge_pages, "repeats": repeats, "zones": ZONES,
                   "modes": sorted({r["mode"] for r in results.values()})},
        "notes": notes,
        "metrics": metrics,
        "details": {k: {"first_attach": r["first"], "segments": r["segments"], "pages": r["pages"],
                        "mode": r["mode"]} for k, r in results.items()},
    }


# -- the worker -----------------------------------------------------------------------


def _bare_attach(base: int, window: int, path: str, address: int, length: int) -> float:
    """The syscalls of an attach with no hugeshmd code around them; seconds."""
    import ctypes
    import os

    libc = _libc()
    t0 = time.perf_counter()
    got = libc.mmap(base, window, 0, 0x02 | 0x20 | 0x4000 | 0x100000, -1, 0)  # PROT_NONE, NOREPLACE
    if got != base:  # never MAP_FIXED over something that is not ours
        if got not in (None, ctypes.c_void_p(-1).value):
            libc.munmap(got, window)
        raise OSError(ctypes.get_errno(), f"bare attach: {base:#x} is taken (was the last window released?)")
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    mapped = libc.mmap(address, length, 0x3, 0x01 | 0x10, fd, 0)  # MAP_SHARED|MAP_FIXED
    os.close(fd)
    t1 = time.perf_counter()
    libc.munmap(base, window)
    if mapped != address:
        raise OSError(ctypes.get_errno(), "bare attach: mapping the segment failed")
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
                shm.reserve(f"zone{i:04d}", 4096)
    t0 = time.perf_counter()
    shm = hugeshmd.attach(prefix, runtime_root=root)
    first = time.perf_counter() - t0
    segments, page_size, base, window = shm.segments, shm.page_size, shm.base, _window_of(shm)
    shm.close()
    del shm
    attach, close, bare = [], [], []
    seg = segments[0]
    for _ in range(repeats):
        t0 = time.perf_counter()
        shm = hugeshmd.attach(prefix, runtime_root=root)
        t1 = time.perf_counter()
        shm.close()
        t2 = time.perf_counter()
        del shm
        attach.append(t1 - t0)
        close.append(t2 - t1)
        bare.append(_bare_attach(base, window, seg.path, seg.address, seg.length))
    return {"first": first, "attach": attach, "close": close, "bare": bare, "segments": len(segments),
            "pages": sum(s.length for s in segments) // page_size}


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker_reply(worker(json.loads(sys.argv[2])))
