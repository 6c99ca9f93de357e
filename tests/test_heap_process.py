"""The shared heap with real processes: workers that allocate, hand addresses over, free each
other's memory, die by kill -9 (one at a time, and in a storm of a thousand), and a primary that
reclaims what the dead owned (woken by their pidfds) and adopts the heap across its own kill -9.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from typing import Any

import pytest
from conftest import PYTHON, needs_hugepages, run_python, start_storm, storm_result

pytestmark = [needs_hugepages, pytest.mark.process]

HUGE = ("--memory", "64M", "--huge-pages", "on")


def check(prefix: str, root: str) -> dict[str, Any]:
    """``hugeshmd check --json`` of the instance."""
    done = subprocess.run([PYTHON, "-m", "hugeshmd", "check", "--prefix", prefix, "--runtime-root", root, "--json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def settled(prefix: str, root: str, within: float = 10.0) -> dict[str, Any]:
    """The checker's report once nothing is pending (every dead owner reclaimed)."""
    deadline = time.monotonic() + within
    while True:
        report = check(prefix, root)
        if not report["pending"] or time.monotonic() > deadline:
            return report
        time.sleep(0.05)


def gone(worker: Any, address: int, within: float = 10.0) -> float:
    """Seconds until no live allocation starts at ``address`` as ``worker`` sees it."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        reply = worker.call("heap_read", address=address, length=1)
        if reply.get("error") == "NotFound":
            return time.monotonic() - t0
        time.sleep(0.002)
    raise AssertionError(f"the allocation at {address:#x} is still live after {within} s")


def test_an_address_names_the_same_allocation_in_every_worker(start_primary, prefix, workers):
    start_primary(*HUGE)
    a, b = workers(), workers()
    a.ok("attach", prefix=prefix)
    b.ok("attach", prefix=prefix)
    small = a.ok("alloc", size=100, hex="68656c6c6f")
    large = a.ok("alloc", size=3 << 20, hex="776f726c64")
    assert b.ok("heap_read", address=small["address"], length=5) == {"hex": "68656c6c6f", "size": 100}
    assert b.ok("heap_read", address=large["address"], length=5) == {"hex": "776f726c64", "size": 3 << 20}
    b.ok("heap_free", address=small["address"])  # any worker frees any allocation
    b.ok("heap_free", address=large["address"])
    assert a.call("heap_read", address=small["address"], length=1)["error"] == "NotFound"
    assert a.call("heap_free", address=small["address"])["error"] == "InvalidArgument"  # a double free
    assert a.call("heap_read", address=large["address"], length=1)["error"] == "NotFound"


def test_a_killed_workers_allocations_are_reclaimed_and_disowned_ones_kept(start_primary, prefix, root, workers):
    primary = start_primary(*HUGE)
    doomed, other = workers(), workers()
    doomed.ok("attach", prefix=prefix)
    other.ok("attach", prefix=prefix)
    first = doomed.ok("alloc_many", count=10_000, size=64)["addresses"][0]
    large = doomed.ok("alloc", size=1 << 20)["address"]
    kept = doomed.ok("alloc", size=200, hex="6b657074")["address"]
    doomed.ok("disown", address=kept)
    doomed.proc.kill()
    doomed.proc.wait()
    gone(other, first)
    gone(other, large)
    assert other.ok("heap_read", address=kept, length=4)["hex"] == "6b657074"
    report = settled(prefix, root)
    assert report["ok"] and report["pending"] == [], report
    figures = report["figures"]
    assert (figures["allocations"], figures["disowned"]) == (1, 1)
    assert figures["reclaimed_allocations"] == 10_001
    assert "reclaimed 10001 allocations" in primary.text


def test_a_forked_child_neither_keeps_its_parents_memory_nor_uses_its_arenas(start_primary, prefix, root, workers):
    start_primary(*HUGE)
    parent, other = workers(), workers()
    parent.ok("attach", prefix=prefix)
    other.ok("attach", prefix=prefix)
    mine = parent.ok("alloc", size=64)["address"]
    child = parent.ok("fork_sleeper", seconds=60)["pid"]
    try:
        parent.proc.kill()
        parent.proc.wait()
        gone(other, mine)  # the sleeping child closed its copy of the lock description
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_storm_of_kill_9_loses_no_block_and_hands_none_out_twice(start_primary, prefix, root):
    start_primary("--memory", "128M", "--huge-pages", "on")
    result = storm_result(start_storm("heap_storm.py", prefix, root, "3", "1000", "90"))
    assert result["kills"] >= 300, result  # a slow machine may not reach 1000 in the time
    report = settled(prefix, root)
    assert report["violations"] == [] and report["pending"] == [], report
    figures = report["figures"]
    # No LIVE block is left: what remains was disowned (handed over, or lost to a kill between
    # disown and handing over: at most one per kill, or in the mailbox: 64 per worker).
    assert figures["allocations"] == figures["disowned"] <= result["kills"] + 3 * 64, figures
    assert figures["arenas_owned"] == 0, figures


def test_the_heap_survives_a_primary_kill_9_and_adoption_reclaims_the_dead(start_primary, prefix, root, workers):
    first = start_primary(*HUGE)
    keeper, doomed = workers(), workers()
    keeper.ok("attach", prefix=prefix)
    doomed.ok("attach", prefix=prefix)
    small = keeper.ok("alloc", size=300, hex="aa" * 300)["address"]
    large = keeper.ok("alloc", size=1 << 20, hex="bb" * 64)["address"]
    lost = doomed.ok("alloc", size=64)["address"]
    first.stop(signal.SIGKILL)
    doomed.proc.kill()  # dies while no primary runs: nothing reclaims it yet
    doomed.proc.wait()
    made_while_down = keeper.ok("alloc", size=100, hex="cc")["address"]
    assert keeper.ok("heap_read", address=lost, length=1)  # still live: no primary to reclaim
    second = start_primary(*HUGE)
    assert "adopted prefix" in second.text, second.text
    gone(keeper, lost, within=5.0)  # reclaimed at adoption
    assert keeper.ok("heap_read", address=small, length=300)["hex"] == "aa" * 300
    assert keeper.ok("heap_read", address=large, length=64)["hex"] == "bb" * 64
    assert keeper.ok("heap_read", address=made_while_down, length=1)["hex"] == "cc"
    report = settled(prefix, root)
    assert report["ok"] and report["figures"]["allocations"] == 3, report
    keeper.proc.kill()  # and the keeper's, once it dies, are reclaimed by the adopting primary
    keeper.proc.wait()
    report = settled(prefix, root)
    assert report["figures"]["allocations"] == 0, report


def test_the_instance_grows_when_full_and_other_workers_map_the_new_segment_lazily(start_primary, prefix, root,
                                                                                    workers):
    first = start_primary("--memory", "32M", "--max-memory", "160M", "--huge-pages", "on")
    a, b = workers(), workers()
    a.ok("attach", prefix=prefix)
    b.ok("attach", prefix=prefix)
    made = [a.ok("alloc", size=1 << 20, hex=f"{i:02x}") for i in range(40)]  # more than the 32 MiB mapped
    assert len(a.ok("attach_info")["segments"]) == 2
    assert b.ok("heap_read", address=made[-1]["address"], length=1)["hex"] == "27"  # b maps segment 1 on meeting it
    grown = subprocess.run([PYTHON, "-m", "hugeshmd", "grow", "64M", "--prefix", prefix, "--runtime-root", root],
                           capture_output=True, text=True, timeout=60)
    assert grown.returncode == 0 and "segment 2 of 64 MiB" in grown.stdout, grown.stderr
    refused = a.call("alloc", size=128 << 20)
    assert refused["error"] == "OutOfMemory" and "max_memory" in refused["message"], refused
    status = json.loads(subprocess.run([PYTHON, "-m", "hugeshmd", "status", "--prefix", prefix, "--runtime-root",
                                        root, "--json"], capture_output=True, text=True, check=True).stdout)
    assert (status["segments"], status["memory"], status["heap"]["growths"]) == (3, 128 << 20, 2)
    assert (status["zones"], status["heap"]["large_allocations"]) == (0, 40)  # the heap's zones are not zones
    first.stop(signal.SIGKILL)  # and a grown instance is adopted whole
    second = start_primary("--memory", "32M", "--max-memory", "160M", "--huge-pages", "on")
    assert "3 segments" in second.text, second.text
    assert b.ok("heap_read", address=made[0]["address"], length=1)["hex"] == "00"


def test_without_max_memory_a_full_instance_says_how_to_let_it_grow(start_primary, prefix, workers):
    start_primary("--memory", "8M", "--huge-pages", "on")
    a = workers()
    a.ok("attach", prefix=prefix)
    refused = a.call("alloc", size=16 << 20)
    assert refused["error"] == "OutOfMemory" and "max_memory" in refused["message"], refused
    assert a.call("alloc", size=64)["address"]  # the heap still serves what fits


def test_check_reports_a_broken_rule_and_exits_1(start_primary, prefix, root, workers):
    start_primary(*HUGE)
    a = workers()
    a.ok("attach", prefix=prefix)
    a.ok("alloc", size=64)
    assert check(prefix, root)["ok"]
    arena = a.ok("lookup", name=".arena.0")  # the heap's own zones can be looked up, not reserved
    a.ok("write", name=".arena.0", offset=1024 + 4 * 1024 + 5, hex="09")  # a state byte no rule allows
    report = check(prefix, root)
    assert not report["ok"] and any("unknown state bytes [9]" in v for v in report["violations"]), report
    done = subprocess.run([PYTHON, "-m", "hugeshmd", "check", "--prefix", prefix, "--runtime-root", root],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "violation: arena 0 span 4" in done.stdout, done.stdout
    assert arena["size"] == 2 << 20


def test_a_forked_child_allocates_in_an_arena_of_its_own_and_frees_its_parents_remotely(start_primary, prefix, root):
    start_primary(*HUGE)
    done = run_python(f"""
import os, hugeshmd
shm = hugeshmd.attach({prefix!r})
mine = shm.alloc(64)
pid = os.fork()
if pid == 0:
    theirs = shm.alloc(64)  # the child owns none of its parent's arenas
    same = theirs.address >> 21 == mine.address >> 21
    shm.buffer(mine.address).free()  # a free of the parent's block: remote
    os._exit(3 if same else 0)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
try:
    shm.buffer(mine.address)
except hugeshmd.NotFound:
    print("freed by the child")
print(shm.alloc(64).address != 0)
""", root)
    assert done.stdout.split("\n")[:2] == ["freed by the child", "True"], done.stdout + done.stderr


def test_a_worker_that_allocated_unmaps_its_window_at_close_without_the_garbage_collector(start_primary, prefix, root):
    """The heap and its arenas held each other, so the window they keep mapped stayed until the
    collector's next pass; a close lets go of them, and the window goes with the last buffer."""
    start_primary(*HUGE)
    done = run_python(f"""
import gc, hugeshmd
gc.disable()
shm = hugeshmd.attach({prefix!r}, runtime_root={root!r})
base = shm.base
buf = shm.alloc(100)
buf.free()
kept = shm.alloc(200)
shm.close()

def mapped():
    with open("/proc/self/maps") as maps:
        return any(base <= int(line.split("-")[0], 16) < base + (1 << 36) for line in maps)

before = mapped()
kept.free()  # after close: still this worker's to free
del buf, kept
print(before, mapped())
""", root)
    assert done.stdout.split() == ["True", "False"], done.stdout
