"""handoff: a numpy array made in one process and read in full by another, by four tools.

For each size (1 MiB to 1 GiB) and tool, a long-lived producer process makes
an array of uint64 and fills it, hands it to a long-lived consumer process
(started by the producer with multiprocessing's ``spawn``), and the consumer
reads every byte (``array.sum()``, checked against the expected sum). The
figure is the time from the producer starting to make the array to the
consumer having read it all, on CLOCK_MONOTONIC (``time.monotonic``), which is
one clock for every process. It is split into *fill* (make and write the
array, in the tool's memory), *deliver* (until the consumer holds an array
over the data) and *read*. Each tool is used as its users use it:

* **hugeshmd**: the producer ``reserve``s a zone and fills ``zone.ndarray()``;
  the zone's name goes over a pipe; the consumer ``lookup``s it, reads, and
  the producer ``free``s it. The primary populated its hugepages at start.
* **hugeshmd heap**: the producer ``alloc``s (a large allocation: a zone of its
  own, owned by the producer) and fills ``buf.ndarray()``; the address goes over
  the pipe; the consumer's ``buffer(address)`` gives a handle, reads, and the
  producer frees it. Peer figures stay relative to the zone path.
* **hugeshmd array**: the producer's ``shm.empty(n, "uint64")`` (a shared array:
  a large heap allocation owned by its pins), filled and ``put`` on a
  ``multiprocessing.Queue`` as is: it pickles as a handle of about 170 bytes;
  the consumer's ``get`` gives an array over the same memory. The producer drops
  its array after the put; the memory goes when the consumer drops its own.
* **shared_memory**: ``multiprocessing.shared_memory.SharedMemory(create=True)``,
  an ndarray over its buffer; the name goes over the pipe; the consumer opens
  it by name; the producer unlinks it after. 4 KiB pages in /dev/shm, new
  (so faulted and zeroed) each time, which is how it is used.
* **queue**: a private numpy array ``put`` on a ``multiprocessing.Queue``
  (pickled, written through a pipe, unpickled: two copies). The Queue's feeder
  thread frees the last pickle only when the next object is put (~80 ms for
  1 GiB); a small untimed put after each handoff takes that cost out of the
  next handoff's figure, so the Queue's figures, if anything, flatter it.
* **plasma**: Arrow Plasma from pyarrow 11.0.0 (the last release with
  ``plasma-store-server``), in its own virtual environment with numpy<2
  (``benchmarks/.venv-plasma``, made by a full run from the package index,
  git-ignored). The store runs with ``-h -d <hugetlbfs>`` (``-h`` is a flag:
  hugepages on; ``-d`` the directory); ``create`` + fill + ``seal``, the
  object id over the pipe, ``get_buffers`` in the consumer, ``delete`` after.
  With hugepages its allocator maps memory in 1 GiB steps, so a store able
  to hold a 1 GiB object reserves 2 GiB of hugepages.

Rounds interleave the tools (the order rotates each time) after one discarded
warm-up round, with a pause after each handoff of up to 0.3 s (by size) so that
freeing a large array does not spill into the next one's time. A quick run
uses 1 and 4 MiB, and Plasma only if its venv is already there (quick mode never uses the network), without hugepages.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from .common import (
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
    summary,
)

SIZES = (1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB, 1 * GiB)
QUICK_SIZES = (1 * MiB, 4 * MiB)
METHODS = ("hugeshmd", "hugeshmd heap", "hugeshmd array", "shared_memory", "queue", "plasma")
PATTERN = 0x0101010101010101
PLASMA_VENV = REPO / "benchmarks" / ".venv-plasma"
PLASMA_REQUIREMENTS = ("pyarrow==11.0.0", "numpy<2")
PLASMA_HEADROOM = 64 * MiB
SETTLE_S = 0.3
POOL_MARGIN = 256  # pages


def expected_sum(size: int) -> int:
    return (PATTERN * (size // 8)) % (1 << 64)


def run(quick: bool) -> dict[str, Any]:
    sizes = QUICK_SIZES if quick else SIZES
    repeats = 2 if quick else 5
    notes: list[str] = []
    plasma_python = plasma_interpreter(quick, notes)
    biggest = max(sizes)
    plasma_pages = -(-(biggest + PLASMA_HEADROOM) // GiB) * (GiB // HUGEPAGE)  # 1 GiB steps with -h
    pages = biggest // HUGEPAGE + 4 + (plasma_pages if plasma_python else 0)
    # A margin over the need: other processes on the machine may take pages between the count and the mmap.
    pool = (contextlib.nullcontext(available_pages(HUGEPAGE)) if quick
            else hugepages_available(HUGEPAGE, pages + POOL_MARGIN, notes))
    samples: dict[str, dict[int, list[dict[str, Any]]]] = {}
    with pool as available, contextlib.ExitStack() as stack:
        primary = stack.enter_context(PrimaryProcess(biggest + 4 * HUGEPAGE, "try" if quick else "on"))
        if primary.mode == "fallback":
            notes.append("the hugeshmd primary ran in fallback mode: 4 KiB pages in /dev/shm")
        ours = {"prefix": primary.prefix, "root": primary.root}
        producers = {"hugeshmd": Producer(PYTHON, "hugeshmd", ours), "hugeshmd heap": Producer(PYTHON, "heap", ours),
                     "hugeshmd array": Producer(PYTHON, "array", ours),
                     "shared_memory": Producer(PYTHON, "shared_memory", {}), "queue": Producer(PYTHON, "queue", {})}
        for producer in producers.values():
            stack.callback(producer.stop)
        plasma_huge = False
        if plasma_python:
            huge = not quick and mount_of(HUGEPAGE) is not None and available - biggest // HUGEPAGE >= plasma_pages
            store = _start_plasma(plasma_python, biggest + PLASMA_HEADROOM, huge, notes)
            stack.callback(store.stop)
            plasma_huge = store.huge
            producers["plasma"] = Producer(plasma_python, "plasma", {"socket": store.socket})
            stack.callback(producers["plasma"].stop)
        for producer in producers.values():
            producer.wait_ready()
        samples = _rounds(producers, sizes, repeats)
    result = _result(samples, sizes, repeats, notes)
    result["params"]["plasma_hugepages"] = plasma_huge
    return result


def _rounds(producers: dict[str, Producer], sizes: tuple[int, ...],
            repeats: int) -> dict[str, dict[int, list[dict[str, Any]]]]:
    methods = list(producers)
    samples: dict[str, dict[int, list[dict[str, Any]]]] = {m: {s: [] for s in sizes} for m in methods}
    turn = 0
    for round_no in range(repeats + 1):  # round 0 is a warm-up
        for size in sizes:
            turn += 1
            for method in methods[turn % len(methods):] + methods[:turn % len(methods)]:
                reply = producers[method].handoff(size)
                if not reply["ok"]:
                    raise RuntimeError(f"{method} {size}: the consumer read a wrong sum: {reply}")
                if round_no:
                    samples[method][size].append(reply)
                # Let the processes give a large array's memory back before the next handoff starts:
                # the Queue's feeder thread, for one, frees its pickle after the consumer has it.
                time.sleep(min(SETTLE_S, size / GiB))
    return samples


def _result(samples: dict[str, dict[int, list[dict[str, Any]]]], sizes: tuple[int, ...], repeats: int,
            notes: list[str]) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    table = []
    for size in sizes:
        ours = [r["total"] for r in samples["hugeshmd"][size]]
        for method in samples:
            got = samples[method][size]
            total = [r["total"] for r in got]
            is_peer = method != "hugeshmd"
            metrics[f"{method} {format_size(size)}"] = metric(
                total, baseline=ours if is_peer else None, baseline_name="hugeshmd" if is_peer else None,
                note="fill + deliver + read; ratio = peer / hugeshmd" if is_peer else "fill + deliver + read")
            table.append({"method": method, "size": size, "total": summary(total),
                          **{part: median([r[part] for r in got]) for part in ("fill", "deliver", "read")},
                          "gib_per_s": size / median(total) / GiB})
    return {"name": "handoff", "params": {"sizes": list(sizes), "repeats": repeats, "methods": list(samples)},
            "notes": notes, "metrics": metrics, "details": {"by_size": table}}


# -- Plasma: its venv and its store -----------------------------------------------------------


def plasma_interpreter(quick: bool, notes: list[str]) -> str | None:
    """The plasma venv's python, made first in a full run; None (with a note) when it cannot be had."""
    python = PLASMA_VENV / "bin" / "python"
    check = [str(python), "-c", "import pyarrow.plasma, numpy; assert numpy.__version__ < '2'"]
    if python.exists() and subprocess.run(check, capture_output=True, check=False).returncode == 0:
        return str(python)
    if quick:
        notes.append(f"plasma SKIPPED: no venv at {PLASMA_VENV} (a full run makes it; a quick run never "
                     "uses the network)")
        return None
    base = getattr(sys, "_base_executable", sys.executable)
    steps = [[base, "-m", "venv", "--clear", str(PLASMA_VENV)],
             [str(python), "-m", "pip", "install", "--quiet", *PLASMA_REQUIREMENTS], check]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            notes.append(f"plasma SKIPPED: {' '.join(step[:5])} failed: {(done.stderr or done.stdout)[-300:]}")
            return None
    notes.append(f"plasma venv made at {PLASMA_VENV}: {' '.join(PLASMA_REQUIREMENTS)}")
    return str(python)


def _start_plasma(python: str, memory: int, huge: bool, notes: list[str]) -> PlasmaStore:
    """The store with -h when asked; if that cannot map its pages, without, said loudly in the notes."""
    try:
        store = PlasmaStore(python, memory, huge)
    except RuntimeError as err:
        if not huge:
            raise
        notes.append(f"plasma with -h FAILED ({str(err)[-160:]!r}, {available_pages(HUGEPAGE)} 2 MiB pages "
                     "available): plasma ran WITHOUT hugepages, 4 KiB pages in /dev/shm")
        store = PlasmaStore(python, memory, False)
    notes.append(f"plasma store: -m {memory}, " + ("-h -d " + store.directory if store.huge
                                                   else "no -h: 4 KiB pages in /dev/shm"))
    return store


class PlasmaStore:
    """``plasma-store-server`` as a subprocess, stopped by PID; its socket in a temp dir."""

    def __init__(self, python: str, memory: int, huge: bool) -> None:
        where = subprocess.run([python, "-c", "import os, pyarrow; print(os.path.dirname(pyarrow.__file__))"],
                               capture_output=True, text=True, check=True).stdout.strip()
        self.dir = tempfile.mkdtemp(prefix="hsbplasma", dir="/tmp")
        self.socket = os.path.join(self.dir, "plasma.sock")
        self.huge = huge
        self.directory = (mount_of(HUGEPAGE) or "/dev/hugepages") if huge else "/dev/shm"
        self.log = open(os.path.join(self.dir, "store.log"), "w+")  # noqa: SIM115 - closed in stop()
        cmd = [os.path.join(where, "plasma-store-server"), "-m", str(memory), "-s", self.socket,
               "-d", self.directory, *(["-h"] if huge else [])]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                output = self.log.read()
                self.stop()
                raise RuntimeError(f"plasma-store-server did not start: {output[-1000:]}")
            time.sleep(0.01)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- the producer, run as a subprocess (with the plasma venv's python for plasma) ---------------------


class Producer:
    """``python -m benchmarks.bench_handoff --producer METHOD JSON``: one handoff per line of stdin."""

    def __init__(self, python: str, method: str, request: dict[str, Any]) -> None:
        self.method = method
        self.proc = subprocess.Popen([python, "-W", "ignore::DeprecationWarning", "-m", __name__, "--producer", method,
                                      json.dumps(request)], cwd=REPO,
                                     text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.method} producer exited ({self.proc.wait()})")
        return line.strip()

    def wait_ready(self) -> None:
        if self._line() != "ready":
            raise RuntimeError(f"the {self.method} producer did not start")

    def handoff(self, size: int) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{size}\n")
        self.proc.stdin.flush()
        return json.loads(self._line())  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _Hugeshmd:
    def __init__(self, request: dict[str, Any]) -> None:
        import hugeshmd

        self.shm = hugeshmd.attach(request["prefix"], runtime_root=request["root"])
        self.count = 0

    def make(self, size: int) -> tuple[Any, list[Any]]:
        self.count += 1
        name = f"handoff{self.count}"
        zone = self.shm.reserve(name, size)
        array = zone.ndarray("uint64")
        array[:] = PATTERN
        return name, [name, zone, array]

    def release(self, keep: list[Any]) -> None:
        name = keep[0]
        keep.clear()
        self.shm.free(name)

    def open(self, handle: Any) -> tuple[Any, list[Any]]:
        zone = self.shm.lookup(handle)
        return zone.ndarray("uint64"), [zone]

    def close(self) -> None:
        self.shm.close()


class _SharedMemory:
    def __init__(self, request: dict[str, Any]) -> None:
        from multiprocessing import shared_memory

        self.module = shared_memory

    def make(self, size: int) -> tuple[Any, list[Any]]:
        import numpy

        block = self.module.SharedMemory(create=True, size=size)
        array: Any = numpy.ndarray((size // 8,), dtype=numpy.uint64, buffer=block.buf)
        array[:] = PATTERN
        return block.name, [block, array]

    def release(self, keep: list[Any]) -> None:
        block = keep[0]
        keep.clear()  # the array first: close() refuses while a view is exported
        block.close()
        block.unlink()

    def open(self, handle: Any) -> tuple[Any, list[Any]]:
        import numpy

        # Opening registers the name with the resource tracker again (CPython gh-82300); this
        # consumer was spawned by the producer and shares its tracker, where it is one entry.
        block = self.module.SharedMemory(name=handle)
        return numpy.ndarray((block.size // 8,), dtype=numpy.uint64, buffer=block.buf), [block]

    def close(self) -> None:
        pass


class _Plasma:
    def __init__(self, request: dict[str, Any]) -> None:
        import pyarrow.plasma as plasma

        self.plasma = plasma
        self.client = plasma.connect(request["socket"])

    def make(self, size: int) -> tuple[Any, list[Any]]:
        import numpy

        oid = self.plasma.ObjectID(os.urandom(20))
        buffer = self.client.create(oid, size)
        array = numpy.frombuffer(buffer, dtype=numpy.uint64)
        array[:] = PATTERN
        self.client.seal(oid)
        return oid.binary(), [oid, buffer, array]

    def release(self, keep: list[Any]) -> None:
        oid = keep[0]
        keep.clear()
        self.client.delete([oid])

    def open(self, handle: Any) -> tuple[Any, list[Any]]:
        import numpy

        [buffer] = self.client.get_buffers([self.plasma.ObjectID(handle)])
        return numpy.frombuffer(buffer, dtype=numpy.uint64), [buffer]

    def close(self) -> None:
        self.client.disconnect()


class _HugeshmdHeap(_Hugeshmd):
    def make(self, size: int) -> tuple[Any, list[Any]]:
        buf = self.shm.alloc(size)
        array = buf.ndarray("uint64")
        array[:] = PATTERN
        return buf.address, [buf, array]

    def release(self, keep: list[Any]) -> None:
        buf = keep[0]
        keep.clear()
        buf.free()

    def open(self, handle: Any) -> tuple[Any, list[Any]]:
        buf = self.shm.buffer(handle)
        return buf.ndarray("uint64"), [buf]


QUEUED = ("queue", "array")  # the array itself goes on a multiprocessing.Queue
SIDES: dict[str, Any] = {"hugeshmd": _Hugeshmd, "heap": _HugeshmdHeap, "shared_memory": _SharedMemory,
                         "plasma": _Plasma}


def consumer(method: str, request: dict[str, Any], conn: Any, queue: Any) -> None:
    """Receive a handle (or the array, for the queue), read every byte, answer (t_got, t_read, sum)."""
    side = None if method in QUEUED else SIDES[method](request)
    conn.send("ready")
    try:
        while conn.recv() is not None:  # one message per handoff: the handle, or "queue"
            if side is None:
                array, keep = queue.get(), []
            else:
                array, keep = side.open(conn.recv())
            t_got = time.monotonic()
            total = int(array.sum())
            t_read = time.monotonic()
            del array
            keep.clear()
            conn.send((t_got, t_read, total))
            if side is None:  # the producer's flush (see producer()), then say it went through
                queue.get()
                conn.send("flushed")
    finally:
        if side is not None:
            side.close()


def producer(method: str, request: dict[str, Any]) -> None:
    import multiprocessing

    import numpy

    context = multiprocessing.get_context("spawn")
    conn, child_conn = context.Pipe()
    queue = context.Queue() if method in QUEUED else None
    child = context.Process(target=consumer, args=(method, request, child_conn, queue), daemon=True)
    child.start()
    shm = None
    if method == "array":
        import hugeshmd

        shm = hugeshmd.attach(request["prefix"], runtime_root=request["root"])
    side = None if method in QUEUED else SIDES[method](request)
    try:
        if conn.recv() != "ready":
            raise RuntimeError("consumer did not start")
        print("ready", flush=True)
        for line in sys.stdin:
            size = int(line)
            t0 = time.monotonic()
            if side is None:
                array = numpy.empty(size // 8, dtype=numpy.uint64) if shm is None else shm.empty(size // 8, "uint64")
                array[:] = PATTERN
                t_filled = time.monotonic()
                conn.send("queue")
                assert queue is not None
                queue.put(array)
                keep: list[Any] = []
                del array
            else:
                handle, keep = side.make(size)
                t_filled = time.monotonic()
                conn.send("handle")
                conn.send(handle)
            t_got, t_read, total = conn.recv()
            if side is not None:
                side.release(keep)
            else:
                # Untimed: the Queue's feeder thread keeps the last pickle until the next put, so
                # freeing a large one (~80 ms for 1 GiB) would land in the next handoff's time.
                assert queue is not None
                queue.put(None)
                conn.recv()
            print(json.dumps({"size": size, "total": t_read - t0, "fill": t_filled - t0, "deliver": t_got - t_filled,
                              "read": t_read - t_got, "ok": total == expected_sum(size)}), flush=True)
    finally:
        conn.send(None)
        child.join(30)
        if child.is_alive():
            child.kill()
        if side is not None:
            side.close()
        if shm is not None:
            shm.close()


if __name__ == "__main__" and sys.argv[1:2] == ["--producer"]:
    producer(sys.argv[2], json.loads(sys.argv[3]))
