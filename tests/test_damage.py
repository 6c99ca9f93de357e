"""A damaged table or a frozen writer kills and freezes no one (real processes, real signals).

The table truncated, extended, flipped and forged under a live primary and live workers: every
process lives, says TableCorrupt, and `hugeshmd status` reports the damage and exits non-zero.
A writer frozen (SIGSTOP) at random points of its reserves makes no other worker wait past its
bound, and TableBusy names it.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from typing import Any

import pytest
from conftest import PYTHON, kill_session, spawn_worker
from factories import zone_record

from hugeshmd.shm.layout import ZONE, Owner, SegmentRecord
from hugeshmd.shm.paths import RuntimePaths
from hugeshmd.shm.table import Table

pytestmark = pytest.mark.process

SHM = ("--memory", "4M", "--huge-pages", "off")
TABLE_ZONE = 96 << 10  # over 64 KiB: a record of the shared table (smaller zones are heap blocks, hugeshmd.shm.names)


def status(prefix: str, root: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "hugeshmd", "status", "--prefix", prefix, "--runtime-root", root],
                          capture_output=True, text=True, timeout=30)


def attached(workers: Any, prefix: str, n: int = 2) -> list[Any]:
    made = [workers() for _ in range(n)]
    for i, worker in enumerate(made):
        worker.ok("attach", prefix=prefix)
        worker.ok("reserve", name=f"w{i}", size=TABLE_ZONE)
    return made


def everyone_lives(primary: Any, workers: list[Any]) -> None:
    assert primary.proc.poll() is None, primary.text
    for worker in workers:
        assert worker.proc.poll() is None
        assert worker.call("maps", base=0, size=1) is not None  # still answers


def test_a_truncated_table_kills_no_process(start_primary, prefix, root, workers):
    primary = start_primary(*SHM)
    pair = attached(workers, prefix)
    os.truncate(RuntimePaths(prefix, root).table, 0)
    for worker in pair:
        told = worker.call("reserve", name="after", size=64)
        assert told["error"] == "TableCorrupt" and "truncated by another process" in told["message"], told
        assert worker.call("lookup", name="w0")["error"] == "TableCorrupt"
    damaged = status(prefix, root)
    assert damaged.returncode == 1 and "is damaged" in damaged.stderr, damaged.stderr
    everyone_lives(primary, pair)
    assert primary.stop() == 0  # and the stop still removes everything (the fixture checks)


def test_an_extended_table_refuses_new_workers_and_is_reported(start_primary, prefix, root, workers):
    primary = start_primary(*SHM)
    pair = attached(workers, prefix)
    path = RuntimePaths(prefix, root).table
    os.truncate(path, os.stat(path).st_size + 4096)
    late = workers()
    refused = late.call("attach", prefix=prefix, timeout=1)
    assert refused["error"] == "TableCorrupt" and "size" in refused["message"], refused
    assert pair[0].ok("reserve", name="still", size=64)  # those attached go on with what they mapped
    damaged = status(prefix, root)
    assert damaged.returncode == 1 and "its header says" in damaged.stderr, damaged.stderr
    everyone_lives(primary, pair)


def flip_committed_zone_byte(path: str, name: str = "w0") -> int:
    """Flip a bit of the name in zone ``name``'s committed record; the record's index."""
    table = Table.open(path)
    try:
        index = [z.name for z in table.snapshot().zones].index(name)
        at = table.layout.zones_at(table.generation & 1) + index * ZONE.size + 30  # inside the record's name
        table.memory[at] ^= 0x20
        return index
    finally:
        table.close()


def test_a_flipped_record_is_never_committed_again(start_primary, prefix, root, workers):
    primary = start_primary(*SHM)
    pair = attached(workers, prefix)
    index = flip_committed_zone_byte(RuntimePaths(prefix, root).table)
    late = workers()
    late.ok("attach", prefix=prefix)  # a new worker checks each zone record when it first reads it
    assert late.ok("lookup", name="w1")["name"] == "w1"
    for _ in range(2):  # and again: the damage stays an error, not a crash
        refused = late.call("lookup", name="w0")
        assert refused["error"] == "TableCorrupt" and "checksum of the zone record at" in refused["message"], refused
    refused = late.call("zones")
    assert refused["error"] == "TableCorrupt" and f"checksum of zone record {index}" in refused["message"], refused
    assert status(prefix, root).returncode == 1
    # An attached worker commits the next version from the records it verified, not the flipped bytes,
    # and the new worker reads that version afresh (not the damaged bytes it had, with the change applied):
    pair[1].ok("reserve", name="heals", size=TABLE_ZONE)
    assert late.ok("lookup", name="w0")["name"] == "w0"
    assert sorted(z["name"] for z in late.ok("zones")["zones"]) == ["heals", "w0", "w1"]
    assert status(prefix, root).returncode == 0
    everyone_lives(primary, pair + [late])


def forge(path: str, **change: Any) -> None:
    """Commit a version whose records have valid checksums but lie (what a forger could write)."""
    table = Table.open(path)
    try:
        with table.locked() as base:
            if "zone" in change:
                table.commit(base, insert=change["zone"])
            else:
                table.commit(base, segments=(base.segments[0]._replace(**change["segment"]),))
    finally:
        table.close()


@pytest.mark.parametrize("lie", ["zone outside its segment", "segment naming another file",
                                 "segment outside the window"])
def test_forged_records_are_rejected_at_decode_and_kill_no_one(start_primary, prefix, root, workers, lie):
    primary = start_primary(*SHM)
    pair = attached(workers, prefix)
    path = RuntimePaths(prefix, root).table
    segment: SegmentRecord = Table.open(path).snapshot().segments[0]
    if lie == "zone outside its segment":
        forge(path, zone=zone_record("evil", address=segment.end + 4096, size=4096, owner=Owner(0, 0, 1, 1)))
        expected = "lies outside its segment"
    elif lie == "segment naming another file":
        forge(path, segment={"path": "/etc/passwd"})
        expected = "not a segment file of prefix"
    else:
        forge(path, segment={"address": segment.address + (1 << 50)})
        expected = "outside the window"
    for worker in pair:
        told = worker.call("lookup", name="w0")
        assert told["error"] == "TableCorrupt" and expected in told["message"], told
    damaged = status(prefix, root)
    assert damaged.returncode == 1 and expected in damaged.stderr
    everyone_lives(primary, pair)


CHURN = """
import hugeshmd, itertools, sys
shm = hugeshmd.attach(sys.argv[1])
print("ready", flush=True)
for i in itertools.count():
    shm.reserve(f"churn-{i}", 96 << 10)  # a record of the shared table: its writer lock is what is frozen
    shm.free(f"churn-{i}")
"""


def test_a_frozen_writer_never_makes_another_wait_past_its_bound(start_primary, prefix, root, workers):
    start_primary(*SHM)
    churner = spawn_worker(["-c", CHURN, prefix], root, stdout=subprocess.PIPE)
    try:
        assert churner.stdout is not None and churner.stdout.readline().strip() == "ready"
        other = workers()
        other.ok("attach", prefix=prefix, lock_timeout=0.3)
        rng, busy = random.Random(5), 0
        for i in range(25):
            time.sleep(rng.uniform(0, 0.02))  # a random point of the churner's reserve/free
            os.kill(churner.pid, signal.SIGSTOP)
            t0 = time.monotonic()
            reply = other.call("reserve", name=f"o{i}", size=TABLE_ZONE)
            waited = time.monotonic() - t0
            assert waited < 0.3 + 0.5, waited  # the bound, and some slack for a loaded machine
            if "error" in reply:
                busy += 1
                assert reply["error"] == "TableBusy", reply
                assert reply["fields"].get("pid") == churner.pid and reply["fields"].get("stopped") is True, reply
                assert f"pid {churner.pid} (stopped)" in reply["message"]
            else:
                other.ok("free", name=f"o{i}")  # the 4 MiB hold few of these
            os.kill(churner.pid, signal.SIGCONT)
            other.ok("reserve", name=f"after{i}", size=TABLE_ZONE)  # the holder resumed: the next call succeeds
            other.ok("free", name=f"after{i}")
        assert busy > 0  # the churner was caught holding the lock at least once
        os.kill(churner.pid, signal.SIGSTOP)
        kill_session(churner)  # frozen, then killed: the kernel releases its lock
        other.ok("reserve", name="after-death", size=TABLE_ZONE)
    finally:
        kill_session(churner)
        if churner.stdout is not None:
            churner.stdout.close()
