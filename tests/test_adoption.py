"""Restart adoption with real processes: a primary killed with -9 (or stopped keeping its
instance) is replaced by one that adopts every zone, and workers never notice but for the pid.

Also the refusals: a damaged table, a missing or truncated segment file, another shape of
instance in the configuration; and kill -9 at random points of a start-up.
"""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import time
import zlib
from typing import Any

import pytest
from conftest import PYTHON, free_hugepages, leftovers, needs_hugepages

from hugeshmd.daemon.config import default_base_address
from hugeshmd.shm.layout import Layout
from hugeshmd.shm.paths import RuntimePaths

pytestmark = [needs_hugepages, pytest.mark.process]

HUGE = ("--memory", "8M", "--huge-pages", "on")


def zone_bytes(name: str, size: int) -> bytes:
    """What a test writes into zone ``name``: its name's CRC repeated, so a swap shows."""
    seed = struct.pack("<I", zlib.crc32(name.encode()))
    return (seed * (size // 4 + 1))[:size]


def fill(worker: Any, name: str, size: int = 4096) -> None:
    worker.ok("reserve", name=name, size=size)
    worker.ok("write", name=name, offset=0, hex=zone_bytes(name, size).hex())


def content(worker: Any, name: str, size: int = 4096) -> bytes:
    return bytes.fromhex(worker.ok("read", name=name, offset=0, length=size)["hex"])


def wait_for_pid(worker: Any, pid: int, within: float) -> float:
    """Seconds until ``worker`` sees ``pid`` as its live, ready primary; fails after ``within``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        seen = worker.ok("primary")
        if seen["pid"] == pid and seen["alive"] and seen["state"] == "ready":
            return time.monotonic() - t0
        time.sleep(0.01)
    raise AssertionError(f"the worker still sees {worker.ok('primary')} after {within} s, not pid {pid}")


def test_a_primary_killed_with_9_is_adopted_with_every_zone_and_byte(start_primary, prefix, root, workers):
    first = start_primary(*HUGE)
    old = workers()
    base = old.ok("attach", prefix=prefix)
    for name in ("a", "b", "c"):
        fill(old, name)
    first.stop(signal.SIGKILL)
    fill(old, "made-while-down")  # a worker never needed the primary to reserve
    old.ok("free", name="b")
    second = start_primary(*HUGE)
    assert "adopted prefix" in second.text and "1 segments, 3 zones" in second.text, second.text
    assert wait_for_pid(old, second.proc.pid, 1.0) < 1.0
    new = workers()
    assert new.ok("attach", prefix=prefix)["base"] == base["base"]
    for worker in (old, new):
        assert sorted(z["name"] for z in worker.ok("zones")["zones"]) == ["a", "c", "made-while-down"]
        for name in ("a", "c", "made-while-down"):
            assert content(worker, name) == zone_bytes(name, 4096)
    assert old.ok("lookup", name="a")["address"] == new.ok("lookup", name="a")["address"]
    assert old.ok("primary")["adoptions"] == 1
    shown = json.loads(subprocess.run([PYTHON, "-m", "hugeshmd", "status", "--prefix", prefix, "--runtime-root", root,
                                       "--json"], capture_output=True, text=True, check=True).stdout)
    assert shown["adoptions"] == 1 and shown["pid"] == second.proc.pid and shown["zones"] == 3
    assert shown["created"] < shown["started"] <= time.time()  # the instance is older than its primary
    fill(new, "after")  # and the adopted instance goes on as any other
    assert content(old, "after") == zone_bytes("after", 4096)


def test_twenty_kill_9_restarts_lose_no_zone_and_change_no_byte(start_primary, prefix, workers):
    """Two workers write checksummed zones while the primary is killed and restarted 20 times."""
    free_before = free_hugepages()
    primary = start_primary(*HUGE)
    pair = [workers(), workers()]
    for worker in pair:
        worker.ok("attach", prefix=prefix)
    made: dict[str, int] = {}
    allocated: list[tuple[int, int, str]] = []  # heap allocations: (owner, address, content)
    rng = random.Random(7)
    for round_ in range(20):
        for i, worker in enumerate(pair):
            name = f"r{round_}-w{i}"
            size = rng.choice([64, 4096, 65536])
            fill(worker, name, size)
            made[name] = size
            content = zone_bytes(name, 16).hex()
            allocated.append((i, worker.ok("alloc", size=rng.choice([100, 3000, 100_000]), hex=content)["address"],
                              content))
        primary.stop(signal.SIGKILL)
        primary = start_primary(*HUGE)
        assert f"adoption {round_ + 1})" in primary.text, primary.text
    expected = {name: zlib.crc32(zone_bytes(name, size)) for name, size in made.items()}
    for i, address, content in allocated:  # every heap allocation too, read by the worker that did not make it
        assert pair[1 - i].ok("heap_read", address=address, length=16)["hex"] == content
    for worker in pair:
        assert worker.ok("checksums")["zones"] == expected  # every zone, every byte, no re-attach
        assert worker.ok("primary")["adoptions"] == 20
        worker.stop()
    assert primary.stop() == 0
    assert free_hugepages() >= free_before  # every page back (the fixture checks the files)


def test_a_subscription_follows_the_adopting_primary_within_a_heartbeat(start_primary, prefix, root):
    from hugeshmd.wire.client import Subscription

    first = start_primary(*HUGE)
    subscription = Subscription(RuntimePaths(prefix, root))
    try:
        assert subscription.snapshot["pid"] == first.proc.pid
        first.stop(signal.SIGKILL)
        second = start_primary(*HUGE)
        ready = time.monotonic()
        while subscription.snapshot["pid"] != second.proc.pid:
            subscription.poll(0.1)
            assert time.monotonic() - ready < 2.0, "no resync within two heartbeats"
        assert subscription.snapshot["adoptions"] == 1
    finally:
        subscription.close()


CHURN = """
import hugeshmd, itertools, sys, zlib
shm = hugeshmd.attach(sys.argv[1])
print("ready", flush=True)
for i in itertools.count():
    zone = shm.reserve(f"c{i}", 4096)
    zone[:4] = zlib.crc32(zone.name.encode()).to_bytes(4, "little")
    if i % 2:
        shm.free(f"c{i - 1}")
"""


def test_workers_killed_mid_change_then_the_primary_leave_the_last_committed_version(
        start_primary, prefix, root, workers):
    """kill -9 of writers at random points of their changes, then of the primary: the next
    primary adopts (adopt = require: it must verify) what was last committed, and nothing else."""
    from conftest import kill_session, spawn_worker

    primary = start_primary(*HUGE)
    rng = random.Random(3)
    for _ in range(5):
        churner = spawn_worker(["-c", CHURN, prefix], root, stdout=subprocess.PIPE)
        assert churner.stdout is not None and churner.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.01, 0.1))  # a random point of a reserve or a free
        kill_session(churner)
        churner.stdout.close()
    primary.stop(signal.SIGKILL)
    start_primary(*HUGE, "--adopt", "require")
    reader = workers()
    reader.ok("attach", prefix=prefix)
    zones = reader.ok("zones")["zones"]  # decoded and verified: the last committed version, whole
    spans = sorted((z["address"], z["address"] + z["size"]) for z in zones)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert len({z["name"] for z in zones}) == len(zones) > 0
    fill(reader, "after")  # and it takes changes


def test_sigusr2_and_on_stop_keep_leave_the_instance_for_the_next_primary(start_primary, prefix, root, workers):
    first = start_primary(*HUGE)
    worker = workers()
    worker.ok("attach", prefix=prefix)
    fill(worker, "kept")
    first.stop(signal.SIGUSR2)
    assert first.proc.returncode == 0 and "kept for the next primary to adopt" in first.text
    assert worker.ok("reserve", name="while-down", size=64)  # not told to stop: nothing stopped for good
    second = start_primary(*HUGE, "--on-stop", "keep")
    assert second.stop() == 0 and "kept for the next primary" in second.text
    third = start_primary(*HUGE)
    assert "adoption 2)" in third.text
    assert content(worker, "kept") == zone_bytes("kept", 4096)
    assert third.stop() == 0  # SIGTERM with on_stop = release: the instance goes
    assert worker.call("lookup", name="kept")["error"] == "PrimaryStopped"
    assert leftovers(prefix, root) == []


def corrupt_a_zone_record(root: str, prefix: str) -> None:
    """Flip a byte in the first committed zone record, as a failing disk or a stray write would."""
    path = RuntimePaths(prefix, root).table
    with open(path, "r+b") as table:
        layout = Layout.unpack(table.read(4096), path)
        table.seek(512)
        generation = struct.unpack("<Q", table.read(8))[0]
        at = layout.zones_at(generation & 1) + 20
        table.seek(at)
        byte = table.read(1)
        table.seek(at)
        table.write(bytes([byte[0] ^ 0x40]))


def test_a_damaged_table_is_refused_under_adopt_require_and_its_files_kept(start_primary, prefix, root, workers):
    first = start_primary(*HUGE)
    worker = workers()
    worker.ok("attach", prefix=prefix)
    fill(worker, "z")
    worker.stop()
    first.stop(signal.SIGKILL)
    corrupt_a_zone_record(root, prefix)
    kept = sorted(leftovers(prefix, root))
    refused = start_primary(*HUGE, "--adopt", "require", wait=False)
    assert refused.wait_exit() == 1
    assert "cannot adopt the instance a dead primary of prefix" in refused.text
    assert "the checksum of zone record 0" in refused.text and "hugeshmd hugepages cleanup" in refused.text
    assert sorted(leftovers(prefix, root)) == kept  # kept for inspection
    fresh = start_primary(*HUGE)  # adopt = auto: one line says why, then a clean start
    assert "starting afresh (adopt = auto)" in fresh.text
    again = workers()
    again.ok("attach", prefix=prefix)
    assert again.call("lookup", name="z")["error"] == "NotFound"


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_missing_or_truncated_segment_file_refuses_adoption(start_primary, prefix, root, damage):
    first = start_primary(*HUGE)
    first.stop(signal.SIGKILL)
    segment = next(p for p in leftovers(prefix, root) if ".seg0" in p)
    if damage == "missing":
        os.unlink(segment)
    else:
        os.truncate(segment, 2 << 20)  # one page of four
    refused = start_primary(*HUGE, "--adopt", "require", wait=False)
    assert refused.wait_exit() == 1
    expected = "cannot be opened" if damage == "missing" else "its segment needs 8388608: truncated"
    assert f"segment file {segment}" in refused.text and expected in refused.text, refused.text
    start_primary(*HUGE)  # auto: starts afresh, and the fixture checks nothing is left at the end


def test_another_shape_in_the_configuration_refuses_adoption(start_primary, prefix, root):
    first = start_primary(*HUGE)
    first.stop(signal.SIGKILL)
    elsewhere = hex(default_base_address(prefix) ^ (1 << 40))  # the slot beside the prefix's own
    refused = start_primary(*HUGE, "--adopt", "require", "--base-address", elsewhere, wait=False)
    assert refused.wait_exit() == 1
    assert f"base_address is {elsewhere}" in refused.text
    start_primary(*HUGE)


def test_kill_9_at_random_points_of_start_up_leaves_something_adopted_or_cleaned(start_primary, prefix, root):
    """However far a start got, the next start adopts it or removes it, and the last stop leaves nothing."""
    rng = random.Random(11)
    for _ in range(6):
        starting = start_primary(*HUGE, wait=False)
        time.sleep(rng.uniform(0.05, 0.6))  # a random point of start-up (or of serving)
        starting.stop(signal.SIGKILL)
    last = start_primary(*HUGE)
    assert last.stop() == 0
    assert leftovers(prefix, root) == []

