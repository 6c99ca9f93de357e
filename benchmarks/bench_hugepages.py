"""hugepages: what hugepages buy a reader: random gathers, and the first read in a fresh worker.

* **Random 8-byte gathers** over an array of 1, 2 and 4 GiB of uint64:
  ``numpy.take(array, index)`` with 4 Mi random indices (fixed per size),
  nanoseconds per gather. The same worker holds the array three ways and
  alternates between them each round: in a hugeshmd zone of 2 MiB pages, in a
  hugeshmd zone of 1 GiB pages (when the kernel grants enough 1 GiB pages), and
  in 4 KiB shared memory (a file in /dev/shm, mapped MAP_SHARED, as
  ``multiprocessing.shared_memory`` does; this machine's tmpfs has
  transparent hugepages off, see ``shmem_enabled`` in the notes). Beyond what
  the TLB covers, each gather misses it: a 4 KiB page costs a 4-level page walk
  whose upper levels also miss the caches; a 2 MiB page one level less and 512
  times fewer entries.
* **First full read in a fresh worker**: a new process attaches (or opens the
  /dev/shm file), then reads every byte of a 256 MiB array once
  (``array.sum()``), then again. The first read takes the page faults that map
  the pages into the new process (the pages themselves exist already): 128 of
  2 MiB against 65,536 of 4 KiB; the second is the read alone. Minor faults are
  counted with ``getrusage``. Rounds alternate hugeshmd and /dev/shm.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from typing import Any

from .common import (
    GIGAPAGE,
    HUGEPAGE,
    PYTHON,
    REPO,
    GiB,
    MiB,
    PrimaryProcess,
    available_pages,
    format_size,
    hugepages_available,
    median,
    metric,
    mount_of,
    run_worker,
    unique_prefix,
    worker_reply,
)

GATHER_SIZES, QUICK_GATHER_SIZES = (1 * GiB, 2 * GiB, 4 * GiB), (16 * MiB,)
GATHERS, QUICK_GATHERS = 1 << 22, 1 << 16
FRESH, QUICK_FRESH = 256 * MiB, 16 * MiB
POOL_MARGIN = 256  # 2 MiB pages over the need: others on the machine may take some meanwhile
THP_SHMEM = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"  # [never]: /dev/shm has 4 KiB pages only


def run(quick: bool) -> dict[str, Any]:
    notes = [f"{THP_SHMEM}: {_read(THP_SHMEM)}"]
    sizes = QUICK_GATHER_SIZES if quick else GATHER_SIZES
    fresh = QUICK_FRESH if quick else FRESH
    with contextlib.ExitStack() as stack:
        if quick:
            huge_2m, huge_1g = available_pages(HUGEPAGE), 0
        else:
            need = max(max(sizes), fresh) // HUGEPAGE + 2 + POOL_MARGIN
            huge_2m = stack.enter_context(hugepages_available(HUGEPAGE, need, notes))
            huge_1g = (stack.enter_context(hugepages_available(GIGAPAGE, max(sizes) // GIGAPAGE, notes))
                       if mount_of(GIGAPAGE) else 0)
        gathers = [_gathers(size, quick, huge_2m, huge_1g, notes) for size in sizes]
        reads = _fresh_reads(fresh, quick)
    metrics: dict[str, Any] = {}
    for row in gathers:
        shm = row["ns"].get("shm 4 KiB")
        for backing, ns in row["ns"].items():
            if backing == "shm 4 KiB":
                continue
            metrics[f"gather, {backing} pages, {format_size(row['size'])}"] = metric(
                [x * 1e-9 for x in ns], baseline=[x * 1e-9 for x in shm] if shm else None,
                baseline_name="4 KiB shared memory", note="seconds per 8-byte gather; ratio < 1: hugepages win")
        if shm:
            metrics[f"gather, shm 4 KiB pages, {format_size(row['size'])}"] = metric(
                [x * 1e-9 for x in shm], note="seconds per 8-byte gather")
    label = format_size(fresh)
    metrics[f"first read {label}, fresh worker, hugeshmd"] = metric(
        reads["hugeshmd"]["first"], baseline=reads["shm"]["first"], baseline_name="4 KiB /dev/shm",
        note=f"{median(reads['hugeshmd']['faults']):.0f} vs {median(reads['shm']['faults']):.0f} minor faults")
    metrics[f"second read {label}, fresh worker, hugeshmd"] = metric(
        reads["hugeshmd"]["second"], baseline=reads["shm"]["second"], baseline_name="4 KiB /dev/shm",
        note="no faults: the read alone")
    metrics[f"attach + lookup, fresh worker, hugeshmd {label}"] = metric(
        reads["hugeshmd"]["open"], baseline=reads["shm"]["open"], baseline_name="open + mmap of /dev/shm",
        note="before the first read")
    return {"name": "hugepages",
            "params": {"gather_sizes": list(sizes), "gathers": QUICK_GATHERS if quick else GATHERS,
                       "fresh_bytes": fresh},
            "notes": notes, "metrics": metrics,
            "details": {"gathers": [{"size": r["size"], "rounds": r["rounds"],
                                     "ns_median": {b: median(v) for b, v in r["ns"].items()}} for r in gathers],
                        "fresh": {k: {m: median(v) for m, v in r.items()} for k, r in reads.items()}}}


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "unreadable"


def _gathers(size: int, quick: bool, huge_2m: int, huge_1g: int, notes: list[str]) -> dict[str, Any]:
    """One worker, the array held up to three ways, gathers alternating between them."""
    with contextlib.ExitStack() as stack:
        primaries = {}
        if huge_2m >= size // HUGEPAGE or quick:
            primaries["hugeshmd 2 MiB"] = stack.enter_context(PrimaryProcess(size, "try" if quick else "on"))
            if primaries["hugeshmd 2 MiB"].mode == "fallback":
                notes.append(f"gathers {format_size(size)}: the 2 MiB primary fell back to 4 KiB pages")
        else:
            notes.append(f"gathers {format_size(size)}: {huge_2m} 2 MiB pages available: no 2 MiB zone")
        if huge_1g >= size // GIGAPAGE and size >= GIGAPAGE:
            args = ["--page-size", "1G"]
            if "hugeshmd 2 MiB" in primaries:  # one worker attaches both: their windows must not meet (1 in 63)
                args += ["--base-address", hex(_other_slot(primaries["hugeshmd 2 MiB"].prefix))]
            primaries["hugeshmd 1 GiB"] = stack.enter_context(PrimaryProcess(size, "on", args=args))
        elif not quick:
            notes.append(f"gathers {format_size(size)}: {huge_1g} 1 GiB pages available: no 1 GiB zone")
        rounds = 3 if quick else 5
        request = {"size": size, "gathers": QUICK_GATHERS if quick else GATHERS, "rounds": rounds,
                   "zones": {k: [p.prefix, p.root] for k, p in primaries.items()}}
        reply = run_worker(__name__, request, timeout=900)
    return {"size": size, "rounds": rounds, "ns": reply}


def _other_slot(prefix: str) -> int:
    """A base address whose window cannot meet the default window of instance ``prefix``: the
    next 1 TiB slot of the defaults."""
    from hugeshmd.daemon.config import BASE_SLOT, DEFAULT_BASE_ADDRESS, default_base_address

    slot = (default_base_address(prefix) - DEFAULT_BASE_ADDRESS) // BASE_SLOT
    return DEFAULT_BASE_ADDRESS + (1 + slot % 63) * BASE_SLOT


def _fresh_reads(size: int, quick: bool) -> dict[str, dict[str, list[float]]]:
    """Alternating fresh workers: hugeshmd zone vs /dev/shm file, each first read, second read, faults."""
    shm_path = f"/dev/shm/hsbench-{unique_prefix()}"
    with PrimaryProcess(size + HUGEPAGE, "try" if quick else "on") as primary:
        run_worker(__name__, {"setup": True, "prefix": primary.prefix, "root": primary.root, "size": size})
        fd = os.open(shm_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            _fill(fd, size)
            codes = {"hugeshmd": FRESH_HUGESHMD.format(prefix=primary.prefix, root=primary.root),
                     "shm": FRESH_SHM.format(path=shm_path, size=size)}
            out: dict[str, dict[str, list[float]]] = {k: {"open": [], "first": [], "second": [], "faults": []}
                                                      for k in codes}
            for round_no in range((3 if quick else 9) + 1):
                for kind, code in codes.items():
                    done = subprocess.run([PYTHON, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
                    reply = json.loads(done.stdout.strip().splitlines()[-1])
                    if reply["sum"] != size // 8 or not round_no:  # round 0: warm-up
                        if reply["sum"] != size // 8:
                            raise RuntimeError(f"fresh {kind} worker read a wrong sum: {reply}")
                        continue
                    for key in out[kind]:
                        out[kind][key].append(reply[key])
        finally:
            os.close(fd)
            os.unlink(shm_path)
    return out


def _fill(fd: int, size: int) -> None:
    import mmap

    import numpy

    with mmap.mmap(fd, size) as m:
        array = numpy.frombuffer(m, dtype=numpy.uint64)
        array[:] = 1
        del array


READ_TWICE = """\
t1 = time.perf_counter()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
total = int(array.sum())
t2 = time.perf_counter()
f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
array.sum()
t3 = time.perf_counter()
print(json.dumps({{"open": t1 - t0, "first": t2 - t1, "second": t3 - t2, "faults": f1 - f0, "sum": total}}))
"""
FRESH_HUGESHMD = """\
import json, resource, time
import numpy, hugeshmd
t0 = time.perf_counter()
shm = hugeshmd.attach({prefix!r}, runtime_root={root!r})
array = shm.lookup("fresh").ndarray("uint64")
""" + READ_TWICE
FRESH_SHM = """\
import json, mmap, os, resource, time
import numpy
t0 = time.perf_counter()
fd = os.open({path!r}, os.O_RDWR)
m = mmap.mmap(fd, {size})
os.close(fd)
array = numpy.frombuffer(m, dtype=numpy.uint64)
""" + READ_TWICE


# -- the workers -----------------------------------------------------------------------


def _setup(request: dict[str, Any]) -> dict[str, Any]:
    import hugeshmd

    with hugeshmd.attach(request["prefix"], runtime_root=request["root"]) as shm:
        align = HUGEPAGE if shm.page_size >= HUGEPAGE else 4096
        array = shm.reserve("fresh", request["size"], align=align).ndarray("uint64")
        array[:] = 1
        del array
    return {}


def _shm_array(size: int, keep: list[Any]) -> Any:
    """``size`` bytes of 4 KiB shared memory: a /dev/shm file, mapped, unlinked at once (nothing left behind)."""
    import mmap

    import numpy

    path = f"/dev/shm/hsbench-{unique_prefix()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.unlink(path)
        os.ftruncate(fd, size)
        m = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    keep.append(m)
    return numpy.frombuffer(m, dtype=numpy.uint64)


def worker(request: dict[str, Any]) -> dict[str, Any]:
    if request.get("setup"):
        return _setup(request)
    import numpy

    import hugeshmd

    size, keep = request["size"], []
    arrays = {}
    for backing, (prefix, root) in request["zones"].items():
        shm = hugeshmd.attach(prefix, runtime_root=root)
        keep.append(shm)
        arrays[backing] = shm.reserve("gather", size, align=shm.page_size).ndarray("uint64")
    arrays["shm 4 KiB"] = _shm_array(size, keep)
    for array in arrays.values():
        array[:] = numpy.arange(array.size, dtype=numpy.uint64)  # every page touched, before timing
    index = numpy.random.default_rng(size).integers(0, size // 8, request["gathers"])
    ns: dict[str, list[float]] = {k: [] for k in arrays}
    for round_no in range(request["rounds"] + 1):  # round 0: warm-up
        for backing, array in arrays.items():
            t0 = time.perf_counter_ns()
            picked = numpy.take(array, index)
            elapsed = time.perf_counter_ns() - t0
            if not numpy.array_equal(picked, index.astype(numpy.uint64)):
                raise RuntimeError(f"{backing}: a gather read a wrong value")
            if round_no:
                ns[backing].append(elapsed / len(index))
    arrays.clear()
    return ns


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker_reply(worker(json.loads(sys.argv[2])))
