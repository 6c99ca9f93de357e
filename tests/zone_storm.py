"""A kill -9 storm on named zones: ``python zone_storm.py PREFIX ROOT WORKERS KILLS SECONDS``.

A zygote (this process, which never attaches) forks WORKERS workers. Each
reserves, looks up and frees zones, most of them small (blocks of its arena,
named in the name index, hugeshmd.shm.names), a few large (records of the
shared table), from two pools of names:

* its role's own names, which no other worker frees: it stamps each zone it
  reserves (its pid, a sequence number, the zone's address) and checks the
  stamp before it frees it. A block that became another zone meanwhile (handed
  out twice) shows as a stamp that changed;
* names shared by every role, reserved and freed by whoever comes first, so
  that workers meet in the same shards and race for the same names.

The zygote SIGKILLs a random worker every few milliseconds, at whatever
instruction it is at (holding a shard's lock, half way through a reserve or a
free), and forks a new one in its role, until KILLS kills or SECONDS seconds.
A failure makes the worker exit 3, saying what it saw. Prints one JSON line:
kills, workers that exited other than by SIGKILL, what failing workers said.
"""

from __future__ import annotations

import json
import os
import random
import struct
import sys

from storm import storm

import hugeshmd

STAMP = struct.Struct("<QQQ")  # pid, sequence number, the zone's address
OWN, SHARED = 24, 48  # names per role, names for all


def size_of(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.9:
        return rng.randint(STAMP.size, 8192)
    if roll < 0.97:
        return rng.randint(8193, 65536)
    return rng.randint(65537, 200 * 1024)  # a zone of the shared table


def worker(prefix: str, root: str, role: int, report: int) -> None:
    rng = random.Random()
    shm = hugeshmd.attach(prefix, runtime_root=root)
    pid = os.getpid()
    seq = 0
    mine: dict[str, tuple[int, int]] = {}  # own names this process reserved: (sequence number, address)
    while True:
        roll = rng.random()
        if roll < 0.5:
            name = f"r{role}.{rng.randrange(OWN)}"
            stamped = mine.pop(name, None)
            if stamped is not None:
                zone = shm.lookup(name)
                got = STAMP.unpack_from(memoryview(zone), 0)
                if got != (pid, stamped[0], stamped[1]) or zone.address != stamped[1]:
                    fail(report, f"worker {pid}: zone {name} at {zone.address:#x} reads {got}, not what it wrote "
                                 f"({pid}, {stamped[0]}, {stamped[1]:#x}): its memory went to another zone")
                shm.free(name)
                continue
            try:
                zone = shm.reserve(name, size_of(rng))
            except hugeshmd.AlreadyExists:  # reserved by a worker of this role that was killed since
                shm.free(name)
                continue
            seq += 1
            STAMP.pack_into(memoryview(zone), 0, pid, seq, zone.address)
            mine[name] = (seq, zone.address)
        else:
            name = f"s.{rng.randrange(SHARED)}"
            try:
                if roll < 0.75:
                    shm.reserve(name, size_of(rng))
                elif roll < 0.9:
                    shm.free(name)
                else:
                    memoryview(shm.lookup(name))[0]
            except (hugeshmd.AlreadyExists, hugeshmd.NotFound):
                pass


def fail(report: int, what: str) -> None:
    os.write(report, (what + "\n").encode())
    os._exit(3)


def main() -> None:
    prefix, root = sys.argv[1], sys.argv[2]
    workers, kills_wanted, seconds = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])

    def work(role: int, report: int) -> None:
        worker(prefix, root, role, report)

    result = storm(list(range(workers)), work, kills_wanted, seconds, (0.001, 0.012))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
