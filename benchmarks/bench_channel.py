"""channel: buffers handed between worker processes through a channel, against other queues.

Every figure moves *handles* between two processes forked by one worker of the
benchmark, for a fixed time, each transport in the same run:

* **hugeshmd**: heap Buffers through ``shm.channel``: ownership moves with each one.
* **multiprocessing.Queue**, **a pipe** (``os.write``/``os.read`` of 8-byte
  addresses), **faster-fifo** and **iceoryx2** (its Python bindings:
  publish-subscribe of a ``c_uint64``; its receive does not wait, so its
  receiver polls) where they are installed; they move the same 8-byte handles
  (the addresses of buffers in shared memory), so no payload is copied by any.

The pattern is a pool: the producer owns 256 buffers, sends them on ``work``,
and takes them back from ``back``, where the consumer returns each one it
received. Throughput is the messages through ``work`` per second, as the
consumer counts them, one buffer per call and in batches of 32
(``send_many``/``recv_many``; ``put_many``/``get_many`` for faster-fifo; the
others have no batch call: one message carries 32 handles for the pipe and the
queue). Targets: at least 500k buffers/s one at a time, 2M/s in batches.

Wake-up: the consumer waits in ``recv`` on an empty channel; the producer
writes ``time.perf_counter_ns()`` (CLOCK_MONOTONIC, the same clock in every
process) into a buffer and sends it, every 2 ms; the consumer takes the
difference when its ``recv`` returns. Target: median at most 10 us. Baseline: the
same through a pipe (the kernel's own wake-up).

Fan-in: four producers and one consumer, each producer with a pool of its own
and a ``back`` channel of its own, against one producer in the same run
(target: four at least as fast in total).
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

from .common import MiB, PrimaryProcess, metric, run_worker, worker_reply

SINGLE_TARGET = 500_000.0
BATCH_TARGET = 2_000_000.0
WAKE_TARGET = 10e-6
POOL = 256
BATCH = 32
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
                reply = run_worker(__name__, {**base, "op": "pair", "kind": kind, "batch": batch})
                if "missing" in reply:
                    if batch == 1:
                        notes.append(f"{kind} not measured: {reply['missing']}")
                    continue
                rates[f"{kind}/{batch}"] = reply
        wake = run_worker(__name__, {**base, "op": "wake", "count": wakes})
        fan = {n: run_worker(__name__, {**base, "op": "fan_in", "producers": n}) for n in (1, 4)}
        mode = primary.mode
    metrics: dict[str, Any] = {}
    for batch, target in ((1, SINGLE_TARGET), (BATCH, BATCH_TARGET)):
        ours = rates[f"hugeshmd/{batch}"]["rate"]
        label = "one buffer per call" if batch == 1 else f"batches of {batch}"
        metrics[f"hugeshmd channel, {label} (buffers/s)"] = metric(
            [ours], target=target, target_kind="min", quick=quick, unit="1/s",
            note=f"1 producer, 1 consumer, a pool of {POOL}")
        for kind in TRANSPORTS[1:]:
            row = rates.get(f"{kind}/{batch}")
            if row is not None:
                metrics[f"{kind}, {label} (messages/s)"] = metric(
                    [row["rate"]], baseline=[ours], baseline_name="hugeshmd channel", unit="1/s",
                    note=row.get("note", ""))
    metrics["wake-up of a blocked receiver"] = metric(wake["channel"], baseline=wake["pipe"],
                                                      baseline_name="pipe write -> read", target=WAKE_TARGET,
                                                      quick=quick, note="send until recv returns")
    metrics["fan-in, 4 producers (buffers/s)"] = metric(
        [fan[4]["rate"]], baseline=[fan[1]["rate"]], baseline_name="1 producer", target=1.0,
        target_kind="min_ratio", quick=quick, unit="1/s", note="one consumer")
    notes += ["the primary ran in fallback mode: 4 KiB pages in /dev/shm"] if mode == "fallback" else []
    return {"name": "channel", "params": {"seconds": seconds, "pool": POOL, "batch": BATCH, "mode": mode},
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
    def __init__(self, request: dict[str, Any]) -> None:
        self.request = request
        tag = f"{request['kind']}{request['batch']}{os.getpid()}"
        self.names = (f"work{tag}", f"back{tag}")

    def _open(self) -> tuple[Any, Any, Any]:
        import hugeshmd

        shm = hugeshmd.attach(self.request["prefix"], runtime_root=self.request["root"])
        return shm, shm.channel(self.names[0], 1024), shm.channel(self.names[1], 1024)

    def produce(self, batch: int, start: float, seconds: float) -> dict[str, Any]:
        import hugeshmd

        shm, work, back = self._open()
        pool = [shm.alloc(64) for _ in range(POOL)]
        _until(start)
        work.send_many(pool)
        end = start + seconds
        try:
            if batch == 1:
                while time.monotonic() < end:
                    for _ in range(100):
                        work.send(back.recv(timeout=1))
            else:
                while time.monotonic() < end:
                    work.send_many(back.recv_many(batch, timeout=1))
        except hugeshmd.ChannelTimeout:
            pass
        return {}

    def consume(self, batch: int, start: float, seconds: float) -> dict[str, Any]:
        import hugeshmd

        shm, work, back = self._open()
        _until(start)
        count = 0
        t0 = time.monotonic()
        end = start + seconds
        try:
            if batch == 1:
                while time.monotonic() < end:
                    for _ in range(100):
                        back.send(work.recv(timeout=1))
                    count += 100
            else:
                while time.monotonic() < end:
                    got = work.recv_many(batch, timeout=1)
                    back.send_many(got)
                    count += len(got)
        except hugeshmd.ChannelTimeout:
            pass
        return {"count": count, "elapsed": time.monotonic() - t0}


class _Queue(_Ends):
    """multiprocessing.Queue or faster_fifo.Queue, moving addresses (ints)."""

    def __init__(self, request: dict[str, Any]) -> None:
        if request["kind"] == "faster_fifo":
            import faster_fifo

            self.work, self.back = faster_fifo.Queue(1 << 22), faster_fifo.Queue(1 << 22)
            self.many = True
            self.note = "put_many/get_many" if request["batch"] > 1 else ""
        else:
            import multiprocessing

            ctx = multiprocessing.get_context("fork")
            self.work, self.back = ctx.Queue(), ctx.Queue()
            self.many = False
            self.note = f"one message of {request['batch']} handles" if request["batch"] > 1 else ""

    def _put(self, q: Any, items: list[int]) -> None:
        if self.many:
            q.put_many(items)
        else:
            q.put(items)

    def _get(self, q: Any, batch: int) -> list[int]:
        if self.many:
            return q.get_many(max_messages_to_get=batch, timeout=1)  # type: ignore[no-any-return]
        return q.get(timeout=1)  # type: ignore[no-any-return]

    def produce(self, batch: int, start: float, seconds: float) -> dict[str, Any]:
        import queue

        pool = [0x7F0000000000 + 64 * i for i in range(POOL)]
        _until(start)
        for at in range(0, POOL, batch):
            self._put(self.work, pool[at : at + batch])
        end = start + seconds
        try:
            while time.monotonic() < end:
                self._put(self.work, self._get(self.back, batch))
        except queue.Empty:
            pass
        return {}

    def consume(self, batch: int, start: float, seconds: float) -> dict[str, Any]:
        import queue

        _until(start)
        count = 0
        t0 = time.monotonic()
        end = start + seconds
        try:
            while time.monotonic() < end:
                got = self._get(self.work, batch)
                self._put(self.back, got)
                count += len(got)
        except queue.Empty:
            pass
        return {"count": count, "elapsed": time.monotonic() - t0}


class _Pipe(_Ends):
    note = "8 bytes per handle"

    def __init__(self, request: dict[str, Any]) -> None:
        self.work = os.pipe()
        self.back = os.pipe()

    @staticmethod
    def _read(fd: int, n: int) -> bytes:
        if not select.select([fd], [], [], 1)[0]:
            raise TimeoutError
        data = os.read(fd, n)
        while len(data) % 8:
            data += os.read(fd, 8 - len(data) % 8)
        return data

    def produce(self, batch: int, start: float, seconds: float) -> dict[str, Any]:
        pool = struct.pack(f"<{POOL}Q", *(0x7F0000000000 + 64 * i for i in range(POOL)))
        _until(start)
        os.write(self.work[1], pool)
        end = start + seconds
        try:
            while time.monotonic() < end:
                os.write(self.work[1], self._read(self.back[0], 8 * batch))
        except TimeoutError:
            pass
        return {}

    def consume(self, batch: int, start: float, seconds: float) -> dict[str, Any]:
        _until(start)
        count = 0
        t0 = time.monotonic()
        end = start + seconds
        try:
            while time.monotonic() < end:
                got = self._read(self.work[0], 8 * batch)
                os.write(self.back[1], got)
                count += len(got) // 8
        except TimeoutError:
            pass
        return {"count": count, "elapsed": time.monotonic() - t0}

    def close(self) -> None:
        for fd in (*self.work, *self.back):
            os.close(fd)


class _Iceoryx(_Ends):
    note = "c_uint64 samples; receive() polled (it does not wait)"
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

    def _ports(self) -> tuple[Any, Any]:
        import iceoryx2 as iox2

        node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
        ports = []
        for name in ("work", "back"):
            service = (node.service_builder(iox2.ServiceName.new(f"{self.tag}/{name}"))
                       .publish_subscribe(ctypes.c_uint64).subscriber_max_buffer_size(POOL)
                       .history_size(0).open_or_create())
            ports.append((service.publisher_builder().create(), service.subscriber_builder().create()))
        self.node = node
        return ports[0], ports[1]

    def produce(self, batch: int, start: float, seconds: float) -> dict[str, Any]:
        (work_pub, _), (_, back_sub) = self._ports()
        _until(start)
        for i in range(POOL):
            work_pub.loan_uninit().write_payload(ctypes.c_uint64(0x7F0000000000 + 64 * i)).send()
        end = start + seconds
        while time.monotonic() < end:
            sample = back_sub.receive()
            if sample is not None:
                value = sample.payload().contents.value
                work_pub.loan_uninit().write_payload(ctypes.c_uint64(value)).send()
        return {}

    def consume(self, batch: int, start: float, seconds: float) -> dict[str, Any]:
        (_, work_sub), (back_pub, _) = self._ports()
        _until(start)
        count = 0
        t0 = time.monotonic()
        end = start + seconds
        while time.monotonic() < end:
            sample = work_sub.receive()
            if sample is not None:
                value = sample.payload().contents.value
                back_pub.loan_uninit().write_payload(ctypes.c_uint64(value)).send()
                count += 1
        return {"count": count, "elapsed": time.monotonic() - t0}


_TRANSPORT: dict[str, Any] = {"hugeshmd": _Channel, "mp_queue": _Queue, "faster_fifo": _Queue, "pipe": _Pipe,
                              "iceoryx2": _Iceoryx}


def _wake(request: dict[str, Any]) -> dict[str, Any]:
    import hugeshmd

    count = request["count"]
    name = f"wake{os.getpid()}"
    r, w = os.pipe()

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
            return {"channel": out, "pipe": pipe}

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
    result = _join(*consumer)
    os.close(r)
    os.close(w)
    return result


def _fan_in(request: dict[str, Any]) -> dict[str, Any]:
    import hugeshmd

    producers, seconds = request["producers"], request["seconds"]
    tag = f"fan{producers}x{os.getpid()}"
    start = time.monotonic() + 0.5

    def produce(i: int) -> dict[str, Any]:
        with hugeshmd.attach(request["prefix"], runtime_root=request["root"]) as shm:
            work, back = shm.channel(f"{tag}w", 1024), shm.channel(f"{tag}b{i}", 1024)
            pool = []
            for _ in range(POOL // producers):
                buf = shm.alloc(64)
                buf.view()[0] = i
                pool.append(buf)
            _until(start)
            work.send_many(pool)
            try:
                while time.monotonic() < start + seconds:
                    work.send_many(back.recv_many(BATCH, timeout=1))
            except hugeshmd.ChannelTimeout:
                pass
        return {}

    def consume() -> dict[str, Any]:
        with hugeshmd.attach(request["prefix"], runtime_root=request["root"]) as shm:
            work = shm.channel(f"{tag}w", 1024)
            backs = [shm.channel(f"{tag}b{i}", 1024) for i in range(producers)]
            _until(start)
            count = 0
            t0 = time.monotonic()
            try:
                while time.monotonic() < start + seconds:
                    got = work.recv_many(BATCH, timeout=1)
                    for buf in got:
                        backs[buf.view()[0]].send(buf)
                    count += len(got)
            except hugeshmd.ChannelTimeout:
                pass
            return {"count": count, "elapsed": time.monotonic() - t0}

    consumer = _fork(consume)
    children = [_fork(produce, i) for i in range(producers)]
    got = _join(*consumer)
    for child in children:
        _join(*child)
    return {"rate": got["count"] / got["elapsed"], "count": got["count"]}


def worker(request: dict[str, Any]) -> dict[str, Any]:
    op = request["op"]
    if op == "pair":
        return _pair(request)
    if op == "wake":
        return _wake(request)
    return _fan_in(request)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker_reply(worker(json.loads(sys.argv[2])))
