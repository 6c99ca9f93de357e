"""channel: buffers handed between worker processes through a channel, against other queues.

Every figure moves *handles* between two processes forked by one worker of the
benchmark, for a fixed time, each transport in the same run:

* **hugeshmd**: heap Buffers through ``shm.channel``: ownership moves with each one.
* **multiprocessing.Queue**, **a pipe** (``os.write``/``os.read`` of 8-byte
  addresses), **faster-fifo** and **iceoryx2** (its Python bindings:
  publish-subscribe of a ``c_uint64``; its receive does not wait, so its
  receiver polls) where they are installed; they move the same 8-byte handles
  (the addresses of buffers in shared memory), so no payload is copied by any.

One way, as a pipeline runs: the producer allocates each buffer (64 B) and
sends it; the consumer receives it and frees it (the other transports send an
address and receive it). Throughput is what the consumer received per second,
one buffer per call and in batches of 32 (``send_many``/``recv_many``;
``put_many``/``get_many`` for faster-fifo; the pipe and the queue carry 32
handles in one message; iceoryx2 has no batch call and is measured one at a
time). Targets: at least 500k buffers/s one at a time, 2M/s in batches.

Wake-up: the consumer waits in ``recv`` on an empty channel; the producer
writes ``time.perf_counter_ns()`` (CLOCK_MONOTONIC, the same clock in every
process) into a buffer and sends it, every 2 ms; the consumer takes the
difference when its ``recv`` returns. Target: median at most 10 us. Baselines: the
same through a pipe (the kernel's own wake-up), and through a bare futex (a word in
shared memory, ``futex_wait`` on it through ctypes as the channel does, no lock,
no ring): what the kernel alone costs for the channel's way of waiting, the floor
the channel's figure sits on.

Fan-in: four producers and one consumer, in batches, against one producer in
the same run, three rounds of each in turn, medians (target: four at least as
fast in total).
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import struct
import sys
import time
from typing import Any

from .common import MiB, PrimaryProcess, median, metric, run_worker, worker_reply

SINGLE_TARGET = 500_000.0
BATCH_TARGET = 2_000_000.0
WAKE_TARGET = 10e-6
BATCH = 32
FAN_ROUNDS = 3
TRANSPORTS = ("hugeshmd", "mp_queue", "pipe", "faster_fifo", "iceoryx2")


def run(quick: bool) -> dict[str, Any]:
    seconds = 0.5 if quick else 2.0
    wakes = 100 if quick else 500
    with PrimaryProcess(64 * MiB if quick else 128 * MiB, "try" if quick else "on") as primary:
        base = {"prefix": primary.prefix, "root": primary.root, "seconds": seconds}
        rates: dict[str, dict[str, Any]] = {}
        notes: list[str] = []
        for batch in (1, BATCH):
            for kind in TRANSPORTS:
                if batch > 1 and kind == "iceoryx2":
                    continue  # no batch call
                reply = run_worker(__name__, {**base, "op": "pair", "kind": kind, "batch": batch})
                if "missing" in reply:
                    if batch == 1:
                        notes.append(f"{kind} not measured: {reply['missing']}")
                    continue
                rates[f"{kind}/{batch}"] = reply
        wake = run_worker(__name__, {**base, "op": "wake", "count": wakes})
        fan: dict[int, list[dict[str, Any]]] = {1: [], 4: []}
        for _ in range(1 if quick else FAN_ROUNDS):  # in turn: one pair of runs swung 0.58x-0.99x here
            for n in fan:
                fan[n].append(run_worker(__name__, {**base, "op": "fan_in", "producers": n}))
        mode = primary.mode
    metrics: dict[str, Any] = {}
    for batch, target in ((1, SINGLE_TARGET), (BATCH, BATCH_TARGET)):
        ours = rates[f"hugeshmd/{batch}"]["rate"]
        label = "one buffer per call" if batch == 1 else f"batches of {batch}"
        metrics[f"hugeshmd channel, {label} (buffers/s)"] = metric(
            [ours], target=target, target_kind="min", quick=quick, unit="1/s",
            note="1 producer (alloc + send), 1 consumer (recv + free)")
        for kind in TRANSPORTS[1:]:
            row = rates.get(f"{kind}/{batch}")
            if row is not None:
                metrics[f"{kind}, {label} (messages/s)"] = metric(
                    [row["rate"]], baseline=[ours], baseline_name="hugeshmd channel", unit="1/s",
                    note=row.get("note", ""))
    metrics["wake-up of a blocked receiver"] = metric(wake["channel"], baseline=wake["pipe"],
                                                      baseline_name="pipe write -> read", target=WAKE_TARGET,
                                                      quick=quick, note="send until recv returns")
    metrics["wake-up through a bare futex (the kernel's floor)"] = metric(
        wake["futex"], baseline=wake["channel"], baseline_name="hugeshmd channel",
        note="store + futex_wake until futex_wait returns, between the same two processes")
    metrics["fan-in, 4 producers (buffers/s)"] = metric(
        [r["rate"] for r in fan[4]], baseline=[r["rate"] for r in fan[1]], baseline_name="1 producer", target=1.0,
        target_kind="min_ratio", quick=quick, unit="1/s",
        note=f"one consumer; {len(fan[1])} rounds in turn; the consumer had "
             f"{median([r['consumer_cpu_share'] for r in fan[4]]):.0%} of a CPU with 4 producers, "
             f"{median([r['consumer_cpu_share'] for r in fan[1]]):.0%} with 1 (2 vCPUs: 5 processes share them)")
    notes += ["the primary ran in fallback mode: 4 KiB pages in /dev/shm"] if mode == "fallback" else []
    return {"name": "channel", "params": {"seconds": seconds, "batch": BATCH, "mode": mode},
            "notes": notes, "metrics": metrics, "details": {"pairs": rates, "fan_in": fan}}


# -- the worker: forks a producer and a consumer ------------------------------------------------


def _fork(target: Any, *args: Any) -> tuple[int, int]:
    """Run ``target(*args)`` in a forked child; (pid, the read end of a pipe its JSON result comes on)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            result = target(*args)
            os.write(w, json.dumps(result).encode())
        except BaseException as err:  # noqa: BLE001 - report, then leave without the parent's cleanup
            os.write(w, json.dumps({"error": f"{type(err).__name__}: {err}"}).encode())
            code = 1
        os._exit(code)
    os.close(w)
    return pid, r


def _join(pid: int, r: int) -> dict[str, Any]:
    chunks = []
    while True:
        chunk = os.read(r, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    result: dict[str, Any] = json.loads(b"".join(chunks) or b"{}")
    if "error" in result:
        raise RuntimeError(result["error"])
    return result


def _pair(request: dict[str, Any]) -> dict[str, Any]:
    kind, batch, seconds = request["kind"], request["batch"], request["seconds"]
    try:
        ends = _TRANSPORT[kind](request)
    except ImportError as err:
        return {"missing": f"not installed ({err.name})"}
    start = time.monotonic() + 0.3  # both children are running by then
    consumer = _fork(ends.consume, batch, start, seconds)
    producer = _fork(ends.produce, batch, start, seconds)
    got = _join(*consumer)
    _join(*producer)
    ends.close()
    return {"rate": got["count"] / got["elapsed"], "count": got["count"], "note": ends.note}


class _Ends:
    note = ""

    def produce(self, batch: int, start: float, seconds: float) -> dict[str, Any]:
        raise NotImplementedError

    def consume(self, batch: int, start: float, seconds: float) -> dict[str, Any]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _until(start: float) -> None:
    while time.monotonic() < start:
        time.sleep(0.001)


class _Channel(_Ends):
    """hugeshmd: the producer allocates each buffer and sends it; the consumer receives it and frees it."""

    note = "alloc + send, recv + free"

    def __init__(self, request: dict[str, Any]) -> None:
        self.request = request
        self.name = f"pair{request['batch']}x{os.getpid()}"

    def _open(self) -> tuple[Any, Any]:
        import hugeshmd

        shm = hugeshmd.attach(self.request["prefix"], runtime_root=self.request["root"])
        return shm, shm.channel(self.name, 1024)

    def produce(self, batch: int, start: float, seconds: float) -> dict[str, Any]:
        import hugeshmd

        shm, work = self._open()
        alloc = shm.alloc
        _until(start)
        end = start + seconds + 0.5  # outlasts the consumer: it never waits for lack of messages
        try:
            if batch == 1:
                while time.monotonic() < end:
                    for _ in range(100):
                        work.send(alloc(64))
            else:
                while time.monotonic() < end:
                    work.send_many([alloc(64) for _ in range(batch)], timeout=1)
        except hugeshmd.ChannelTimeout:
            pass
        return {}

    def consume(self, batch: int, start: float, seconds: float) -> dict[str, Any]:
        shm, work = self._open()
        _until(start)
        count = 0
        t0 = time.monotonic()
        end = t0 + seconds
        if batch == 1:
            recv = work.recv
            while time.monotonic() < end:
                for _ in range(100):
                    recv(timeout=1).free()
                count += 100
        else:
            while time.monotonic() < end:
                got = work.recv_many(batch, timeout=1)
                for buf in got:
                    buf.free()
                count += len(got)
        elapsed = time.monotonic() - t0
        while True:  # drain, so that the producer is never left waiting for room
            try:
                for buf in work.recv_many(1024, timeout=0.2):
                    buf.free()
            except Exception:  # noqa: BLE001 - ChannelTimeout: drained
                break
        return {"count": count, "elapsed": elapsed}


class _Queue(_Ends):
    """multiprocessing.Queue or faster_fifo.Queue, moving addresses (ints)."""

    def __init__(self, request: dict[str, Any]) -> None:
        if request["kind"] == "faster_fifo":
            import faster_fifo

            self.work = faster_fifo.Queue(1 << 20)
            self.many = True
            self.note = "put_many/get_many" if request["batch"] > 1 else ""
        else:
            import multiprocessing

            self.work = multiprocessing.get_context("fork").Queue(1024)
            self.many = False
            self.note = f"one message of {request['batch']} handles" if request["batch"] > 1 else ""

    def produce(self, batch: int, start: float, seconds: float) -> dict[str, Any]:
        import queue

        handles = [0x7F0000000000 + 64 * i for i in range(batch)]
        put = self.work.put_many if self.many and batch > 1 else self.work.put
        one = handles if batch > 1 else handles[0]
        _until(start)
        end = start + seconds + 0.5
        try:
            while time.monotonic() < end:
                for _ in range(10):
                    put(one, timeout=1)
        except queue.Full:
            pass
        return {}

    def consume(self, batch: int, start: float, seconds: float) -> dict[str, Any]:
        import queue

        q = self.work
        _until(start)
        count = 0
        t0 = time.monotonic()
        end = t0 + seconds
        try:
            while time.monotonic() < end:
                if self.many and batch > 1:
                    count += len(q.get_many(max_messages_to_get=batch, timeout=1))
                else:
                    got = q.get(timeout=1)
                    count += len(got) if batch > 1 else 1
        except queue.Empty:
            pass
        elapsed = time.monotonic() - t0
        try:
            while True:
                q.get(timeout=0.2)
        except queue.Empty:
            pass
        return {"count": count, "elapsed": elapsed}


class _Pipe(_Ends):
    note = "8 bytes per handle"

    def __init__(self, request: dict[str, Any]) -> None:
        self.work = os.pipe()

    def produce(self, batch: int, start: float, seconds: float) -> dict[str, Any]:
        data = struct.pack(f"<{batch}Q", *(0x7F0000000000 + 64 * i for i in range(batch)))
        _until(start)
        end = start + seconds + 0.5
        fd = self.work[1]
        os.set_blocking(fd, False)
        while time.monotonic() < end:
            try:
                os.write(fd, data)
            except BlockingIOError:
                select.select([], [fd], [], 0.1)
        return {}

    def consume(self, batch: int, start: float, seconds: float) -> dict[str, Any]:
        _until(start)
        count = 0
        t0 = time.monotonic()
        end = t0 + seconds
        fd = self.work[0]
        while time.monotonic() < end:
            if not select.select([fd], [], [], 1)[0]:
                break
            data = os.read(fd, 8 * batch)
            while len(data) % 8:
                data += os.read(fd, 8 - len(data) % 8)
            count += len(data) // 8
        elapsed = time.monotonic() - t0
        os.set_blocking(fd, False)
        while select.select([fd], [], [], 0.2)[0]:
            if not os.read(fd, 1 << 16):
                break
        return {"count": count, "elapsed": elapsed}

    def close(self) -> None:
        for fd in self.work:
            os.close(fd)


class _Iceoryx(_Ends):
    note = "c_uint64 samples; receive() polled (it does not wait); a full subscriber drops the oldest"
    ROOT = "/tmp/iceoryx2"  # where iceoryx2 keeps its nodes and services

    def __init__(self, request: dict[str, Any]) -> None:
        import iceoryx2  # noqa: F401 - missing: not measured

        self.tag = f"hugeshmd-bench-{os.getpid()}"
        self.shm_before = set(os.listdir("/dev/shm"))
        self.root_before = os.path.exists(self.ROOT)

    def close(self) -> None:
        """Remove what iceoryx2 left: its shared-memory files and, if it made it, its directory."""
        import shutil

        for name in set(os.listdir("/dev/shm")) - self.shm_before:
            if name.startswith("iox2_"):
                os.unlink(os.path.join("/dev/shm", name))
        if not self.root_before:
            shutil.rmtree(self.ROOT, ignore_errors=True)

    def _service(self) -> Any:
        import iceoryx2 as iox2

        self.node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
        return (self.node.service_builder(iox2.ServiceName.new(f"{self.tag}/work"))
                .publish_subscribe(ctypes.c_uint64).subscriber_max_buffer_size(1024).history_size(0)
                .open_or_create())

    def produce(self, batch: int, start: float, seconds: float) -> dict[str, Any]:
        publisher = self._service().publisher_builder().create()
        _until(start)
        end = start + seconds + 0.5
        while time.monotonic() < end:
            for _ in range(100):
                publisher.loan_uninit().write_payload(ctypes.c_uint64(0x7F0000000000)).send()
        return {}

    def consume(self, batch: int, start: float, seconds: float) -> dict[str, Any]:
        subscriber = self._service().subscriber_builder().create()
        _until(start)
        count = 0
        t0 = time.monotonic()
        end = t0 + seconds
        while time.monotonic() < end:
            sample = subscriber.receive()
            if sample is not None:
                sample.payload().contents.value  # noqa: B018 - read the handle, as a user would
                count += 1
        return {"count": count, "elapsed": time.monotonic() - t0}


_TRANSPORT: dict[str, Any] = {"hugeshmd": _Channel, "mp_queue": _Queue, "faster_fifo": _Queue, "pipe": _Pipe,
                              "iceoryx2": _Iceoryx}


def _wake(request: dict[str, Any]) -> dict[str, Any]:
    import mmap

    import hugeshmd
    from hugeshmd import _sys

    count = request["count"]
    name = f"wake{os.getpid()}"
    r, w = os.pipe()
    shared = mmap.mmap(-1, 4096)  # MAP_SHARED | MAP_ANONYMOUS: the forked consumer sees the same page
    word_at = ctypes.addressof(ctypes.c_char.from_buffer(shared))
    word, stamp = ctypes.c_uint32.from_address(word_at), ctypes.c_uint64.from_address(word_at + 64)

    def consume() -> dict[str, Any]:
        with hugeshmd.attach(request["prefix"], runtime_root=request["root"]) as shm:
            ch = shm.channel(name, 16)
            out = []
            for _ in range(count):
                buf = ch.recv(timeout=5)
                now = time.perf_counter_ns()
                out.append((now - struct.unpack_from("<Q", buf.view())[0]) * 1e-9)
                buf.free()
            pipe = []
            for _ in range(count):
                data = os.read(r, 8)
                pipe.append((time.perf_counter_ns() - struct.unpack("<Q", data)[0]) * 1e-9)
            futex = []
            for i in range(count):
                while word.value == i:
                    _sys.futex_wait(word_at, i, 5.0)
                futex.append((time.perf_counter_ns() - stamp.value) * 1e-9)
            return {"channel": out, "pipe": pipe, "futex": futex}

    consumer = _fork(consume)
    with hugeshmd.attach(request["prefix"], runtime_root=request["root"]) as shm:
        ch = shm.channel(name, 16)
        for _ in range(count):
            time.sleep(0.002)  # the receiver is asleep in recv by then
            buf = shm.alloc(64)
            struct.pack_into("<Q", buf.view(), 0, time.perf_counter_ns())
            ch.send(buf)
        for _ in range(count):
            time.sleep(0.002)
            os.write(w, struct.pack("<Q", time.perf_counter_ns()))
        for i in range(count):
            time.sleep(0.002)
            stamp.value = time.perf_counter_ns()
            word.value = i + 1
            _sys.futex_wake(word_at)
    result = _join(*consumer)
    os.close(r)
    os.close(w)
    shared.close()  # word and stamp are plain addresses into it (from_address exports nothing)
    return result


def _fan_in(request: dict[str, Any]) -> dict[str, Any]:
    """Producers allocate and send in batches; one consumer receives in batches and frees."""
    import hugeshmd

    producers, seconds = request["producers"], request["seconds"]
    name = f"fan{producers}x{os.getpid()}"
    start = time.monotonic() + 0.5

    def produce() -> dict[str, Any]:
        with hugeshmd.attach(request["prefix"], runtime_root=request["root"]) as shm:
            work, alloc = shm.channel(name, 1024), shm.alloc
            _until(start)
            try:
                while time.monotonic() < start + seconds + 0.5:
                    work.send_many([alloc(64) for _ in range(BATCH)], timeout=1)
            except hugeshmd.ChannelTimeout:
                pass
        return {}

    def consume() -> dict[str, Any]:
        with hugeshmd.attach(request["prefix"], runtime_root=request["root"]) as shm:
            work = shm.channel(name, 1024)
            _until(start)
            count = 0
            t0, cpu0 = time.monotonic(), time.process_time()
            while time.monotonic() < t0 + seconds:
                got = work.recv_many(BATCH, timeout=1)
                for buf in got:
                    buf.free()
                count += len(got)
            elapsed, cpu = time.monotonic() - t0, time.process_time() - cpu0
            try:
                while True:
                    for buf in work.recv_many(1024, timeout=0.2):
                        buf.free()
            except hugeshmd.ChannelTimeout:
                pass
            return {"count": count, "elapsed": elapsed, "cpu": cpu}

    consumer = _fork(consume)
    children = [_fork(produce) for _ in range(producers)]
    got = _join(*consumer)
    for child in children:
        _join(*child)
    return {"rate": got["count"] / got["elapsed"], "count": got["count"],
            "consumer_cpu_share": got["cpu"] / got["elapsed"]}


def worker(request: dict[str, Any]) -> dict[str, Any]:
    op = request["op"]
    if op == "pair":
        return _pair(request)
    if op == "wake":
        return _wake(request)
    return _fan_in(request)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker_reply(worker(json.loads(sys.argv[2])))
