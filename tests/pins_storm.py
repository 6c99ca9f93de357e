"""A kill -9 storm on shared arrays: ``python pins_storm.py PREFIX ROOT MAKERS TAKERS KILLS SECONDS``.

Makers create shared arrays (``shm.empty``, 64 B to 300 KiB), stamp them, pickle them
(a handle: the array stays in the heap) and send the pickle, in a small heap buffer, on
channel ``parcels``; they keep a few arrays a while, and drop the rest. Takers receive
the parcels, unpickle (the same memory, or NotFound if every process that held it is
gone: its maker died before the pickle was taken), check the stamp, and keep a few arrays
a while. The zygote SIGKILLs a random worker every few milliseconds, at whatever
instruction it is at (inside the pin table's lock too), and forks a new one in its role.

A stamp that changed while pinned means memory freed under a holder. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import struct
import sys

from storm import storm

import hugeshmd

STAMP = struct.Struct("<QQ")  # maker pid, sequence number: the first 16 bytes of every array


def maker(prefix: str, root: str, report: int) -> None:
    rng = random.Random()
    shm = hugeshmd.attach(prefix, runtime_root=root)
    parcels = shm.channel("parcels", 64)
    pid = os.getpid()
    kept: list[object] = []
    seq = 0
    while True:
        seq += 1
        a = shm.empty((rng.choice((16, 200, 4096, 40000)),), "uint64")
        a[0], a[1] = pid, seq
        blob = pickle.dumps(a)
        carrier = shm.alloc(len(blob) + 8)
        carrier.view()[:8] = len(blob).to_bytes(8, "little")
        carrier.view()[8 : 8 + len(blob)] = blob
        try:
            parcels.send(carrier, timeout=0.05)
        except hugeshmd.ChannelTimeout:
            carrier.free()
        if rng.random() < 0.3:
            kept.append((a, pid, seq))
        del a
        while len(kept) > 8:
            held, p, n = kept.pop(0)  # type: ignore[misc]
            if (int(held[0]), int(held[1])) != (p, n):
                fail(report, f"maker {pid}: its array {n} changed while it held it: {held[:2]}")


def taker(prefix: str, root: str, report: int) -> None:
    rng = random.Random()
    shm = hugeshmd.attach(prefix, runtime_root=root)
    parcels = shm.channel("parcels", 64)
    pid = os.getpid()
    kept: list[tuple[object, int, int]] = []
    while True:
        try:
            got = parcels.recv_many(8, timeout=0.05)
        except hugeshmd.ChannelTimeout:
            continue
        for carrier in got:
            size = int.from_bytes(carrier.view()[:8], "little")
            blob = bytes(carrier.view()[8 : 8 + size])
            carrier.free()
            try:
                a = pickle.loads(blob)
            except hugeshmd.NotFound:
                continue  # its maker died before this was taken: freed, never a view of freed memory
            stamp = (int(a[0]), int(a[1]))
            if rng.random() < 0.5:
                kept.append((a, *stamp))
        while len(kept) > 16:
            held, p, n = kept.pop(0)
            if (int(held[0]), int(held[1])) != (p, n):  # type: ignore[index]
                fail(report, f"taker {pid}: an array it held changed: {held[:2]} instead of {(p, n)}")  # type: ignore[index]


def fail(report: int, what: str) -> None:
    os.write(report, (what + "\n").encode())
    os._exit(3)


def main() -> None:
    prefix, root = sys.argv[1], sys.argv[2]
    makers, takers = int(sys.argv[3]), int(sys.argv[4])
    kills_wanted, seconds = int(sys.argv[5]), float(sys.argv[6])

    def work(role: str, report: int) -> None:
        (maker if role == "maker" else taker)(prefix, root, report)

    result = storm(["maker"] * makers + ["taker"] * takers, work, kills_wanted, seconds, (0.002, 0.015))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
