"""A kill -9 storm on the heap: ``python heap_storm.py PREFIX ROOT WORKERS KILLS SECONDS``.

A zygote (this process, which never attaches) forks WORKERS workers, each in a
*role*. A worker allocates (sizes from 1 byte to 300 KiB), writes its pid and a
sequence number into each block, frees its own blocks after checking that the
number is still there, and hands some blocks to the next role through a
single-producer single-consumer mailbox in a zone (disowned first, so that the
block outlives its maker; the receiver checks the number and frees it). The
zygote SIGKILLs a random worker every few milliseconds, at whatever
instruction it is at, and forks a new one in its role, until KILLS kills or
SECONDS seconds.

A block handed out twice shows up as a number that changed under its owner;
a handed-over block that vanished, as a NotFound. Either makes the worker exit
3, saying what it saw on stderr. Prints one JSON line: kills, workers that
exited other than by the storm's SIGKILL (with their messages), operations.
"""

from __future__ import annotations

import json
import os
import random
import struct
import sys

from storm import storm

import hugeshmd

SIG = struct.Struct("<QQ")  # pid, sequence number: the first 16 bytes of every block
SLOTS = 64
MAIL = struct.Struct("<QQ")  # address (0: empty), sequence number
MAILBOX = "storm.mail"


def size_of(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.7:
        return rng.randint(16, 1024)
    if roll < 1.0 - float(os.environ.get("STORM_LARGE", "0.03")):
        return rng.randint(1025, 65536)
    return rng.randint(65537, 300 * 1024)


def where(shm: object, address: int) -> str:
    """What the heap says of ``address``: its arena's entry, its span's class, its state byte."""
    try:
        heap = shm._heap  # type: ignore[attr-defined]
        arena = heap._arena_at(address)
        if arena is None:
            directory = heap.directory()
            entries = [(i, hex(e[0]), e[1], e[4], e[5]) for i, e in directory.entries() if any(e)] if directory else []
            return f"in no arena; the directory's entries (index, address, state, pid, claims): {entries}"
        entry = heap.directory().entry(arena.index)
        span = (address - arena.base) >> 16
        state = arena.state[span * 1024 : span * 1024 + 1024].tobytes()
        return (f"arena {arena.index} entry {entry}, span {span} class {arena.span_class(span)}, "
                f"span states {sorted(set(state))} ({state.count(2)} disowned)")
    except Exception as err:  # noqa: BLE001 - a diagnosis must not hide the failure
        return f"(no diagnosis: {err!r})"


def worker(prefix: str, root: str, role: int, roles: int, report: int) -> None:
    rng = random.Random()
    shm = hugeshmd.attach(prefix, runtime_root=root)
    mail = shm.lookup(MAILBOX).view()
    inbox = role * SLOTS * MAIL.size
    outbox = ((role + 1) % roles) * SLOTS * MAIL.size
    pid = os.getpid()
    mine: list[tuple[object, int]] = []
    seq = 0
    ops = 0

    def fail(what: str) -> None:
        arenas = [a.index for a in shm._heap._own] if shm._heap is not None else []  # type: ignore[attr-defined]
        os.write(report, f"pid {pid} role {role} (owns arenas {arenas}): {what}\n".encode())
        os._exit(3)

    while True:
        ops += 1
        roll = rng.random()
        if roll < 0.45 or not mine:
            seq += 1
            buf = shm.alloc(size_of(rng))
            SIG.pack_into(buf.view(), 0, pid, seq)
            mine.append((buf, seq))
        elif roll < 0.85:
            buf, n = mine.pop(rng.randrange(len(mine)))
            got = SIG.unpack_from(buf.view(), 0)  # type: ignore[attr-defined]
            if got != (pid, n):
                fail(f"block {buf.address:#x} ({buf.size} B) was overwritten while mine: "  # type: ignore[attr-defined]
                     f"{got} instead of {(pid, n)}: handed out twice")
            buf.free()  # type: ignore[attr-defined]
        elif roll < 0.93:
            j = rng.randrange(SLOTS)
            at = outbox + j * MAIL.size
            if MAIL.unpack_from(mail, at)[0] == 0:
                buf, n = mine.pop(rng.randrange(len(mine)))
                buf.disown()  # type: ignore[attr-defined]
                struct.pack_into("<Q", mail, at + 8, n)
                struct.pack_into("<Q", mail, at, buf.address)  # type: ignore[attr-defined]  # published last
        else:
            for j in range(SLOTS):
                at = inbox + j * MAIL.size
                address, n = MAIL.unpack_from(mail, at)
                if address:
                    struct.pack_into("<Q", mail, at, 0)  # cleared first: a kill after it leaks, never frees twice
                    try:
                        got = shm.buffer(address)
                    except hugeshmd.NotFound as err:
                        fail(f"handed-over block {address:#x} (seq {n}) vanished: {err}; {where(shm, address)}")
                    if SIG.unpack_from(got.view(), 0)[1] != n:
                        fail(f"handed-over block {address:#x} holds {SIG.unpack_from(got.view(), 0)}, not seq {n}")
                    got.free()


def main() -> None:
    prefix, root = sys.argv[1], sys.argv[2]
    roles, kills_wanted, seconds = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    with hugeshmd.attach(prefix, runtime_root=root) as shm:
        try:
            shm.reserve(MAILBOX, roles * SLOTS * MAIL.size)
        except hugeshmd.AlreadyExists:
            pass

    def work(role: int, report: int) -> None:
        worker(prefix, root, role, roles, report)

    result = json.dumps(storm(range(roles), work, kills_wanted, seconds, (0.0005, 0.006)))
    if os.environ.get("STORM_OUT"):
        with open(os.environ["STORM_OUT"], "a") as out:
            out.write(result + "\n")
    print(result, flush=True)


if __name__ == "__main__":
    main()
