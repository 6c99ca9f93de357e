"""A kill -9 storm on channels: ``python channel_storm.py PREFIX ROOT PRODUCERS CONSUMERS KILLS SECONDS``.

A zygote (this process, which never attaches) forks PRODUCERS producers and
CONSUMERS consumers. A producer allocates buffers (16 B to 300 KiB, a few
large ones), stamps each (its pid, a sequence number, an empty claim word) and
sends it, one at a time or in batches, on channel ``work``; it also takes back
buffers from channel ``back`` and frees them. A consumer receives from
``work`` (one at a time or in batches), checks the stamp (a claim word already
set means a second delivery; a sequence number that goes back, per producer,
means the order broke), sets the claim word to its pid, and then frees the
buffer, keeps it a while, or sends it on ``back``. The zygote SIGKILLs a random
worker every few milliseconds, at whatever instruction it is at, and forks a
new one in its role, until KILLS kills or SECONDS seconds.

Prints one JSON line: kills, workers that exited other than by the storm's
SIGKILL, what failing workers said, messages sent and received (counted by the
survivors only: a killed worker's counts die with it).
"""

from __future__ import annotations

import json
import os
import random
import struct
import sys

from storm import storm

import hugeshmd

STAMP = struct.Struct("<QQQ")  # producer pid, sequence number, claim (the consumer's pid once received)


def size_of(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.75:
        return rng.randint(STAMP.size, 2048)
    if roll < 0.97:
        return rng.randint(2049, 65536)
    return rng.randint(65537, 300 * 1024)


def producer(prefix: str, root: str, report: int) -> None:
    rng = random.Random()
    shm = hugeshmd.attach(prefix, runtime_root=root)
    work, back = shm.channel("work", 64), shm.channel("back", 64)
    pid = os.getpid()
    seq = 0
    while True:
        if rng.random() < 0.3:
            try:
                for buf in back.recv_many(16, timeout=0):
                    _, _, claim = STAMP.unpack_from(buf.view(), 0)
                    if not claim:
                        fail(report, f"producer {pid}: a buffer came back unclaimed")
                    buf.free()
            except hugeshmd.ChannelTimeout:
                pass
        batch = []
        for _ in range(rng.choice((1, 1, 1, 8))):
            seq += 1
            buf = shm.alloc(size_of(rng))
            STAMP.pack_into(buf.view(), 0, pid, seq, 0)
            batch.append(buf)
        try:
            work.send_many(batch, timeout=0.05)
        except hugeshmd.ChannelTimeout:
            for buf in batch:
                if not buf.sent:
                    buf.free()


def consumer(prefix: str, root: str, report: int) -> None:
    rng = random.Random()
    shm = hugeshmd.attach(prefix, runtime_root=root)
    work, back = shm.channel("work", 64), shm.channel("back", 64)
    pid = os.getpid()
    last: dict[int, int] = {}
    kept: list[object] = []
    while True:
        try:
            got = work.recv_many(rng.choice((1, 1, 16)), timeout=0.05)
        except hugeshmd.ChannelTimeout:
            continue
        for buf in got:
            maker, seq, claim = STAMP.unpack_from(buf.view(), 0)
            if claim:
                fail(report, f"consumer {pid}: buffer {buf.address:#x} (producer {maker}, seq {seq}) was delivered "
                             f"before, to {claim}")
            if seq <= last.get(maker, 0):
                fail(report, f"consumer {pid}: producer {maker}'s seq {seq} came after {last[maker]}")
            last[maker] = seq
            STAMP.pack_into(buf.view(), 0, maker, seq, pid)
            roll = rng.random()
            if roll < 0.5:
                buf.free()
            elif roll < 0.8:
                try:
                    back.send(buf, timeout=0)
                except hugeshmd.ChannelTimeout:
                    buf.free()
            else:
                kept.append(buf)
        while len(kept) > 20:
            kept.pop(0).free()  # type: ignore[attr-defined]


def fail(report: int, what: str) -> None:
    os.write(report, (what + "\n").encode())
    os._exit(3)


def main() -> None:
    prefix, root = sys.argv[1], sys.argv[2]
    producers, consumers = int(sys.argv[3]), int(sys.argv[4])
    kills_wanted, seconds = int(sys.argv[5]), float(sys.argv[6])

    def work(role: str, report: int) -> None:
        (producer if role == "producer" else consumer)(prefix, root, report)

    result = storm(["producer"] * producers + ["consumer"] * consumers, work, kills_wanted, seconds, (0.001, 0.012))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
