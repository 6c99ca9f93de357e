"""Named zones of the heap (hugeshmd.shm.names) with real processes: small zones are blocks of the
reserving worker's arena named in a sharded index; a name is unique across the index and the shared
table; a lookup never returns a zone another worker freed; a worker killed at each step of a
reserve or free leaves what the next taker of the shard's lock (or the primary's heartbeat)
finishes; a storm of kill -9s leaves the checker clean; the zones survive the primary's kill -9.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from typing import Any

import pytest
from conftest import kill_session, needs_hugepages, run_python, spawn_worker, start_storm, storm_result
from test_heap_process import HUGE, check, settled

from hugeshmd.errors import HugeshmdError
from hugeshmd.shm.paths import RuntimePaths
from hugeshmd.wire.client import Control

pytestmark = [needs_hugepages, pytest.mark.process]


def control(prefix: str, root: str, op: str, **args: Any) -> dict[str, Any]:
    """The primary's reply to ``op`` over ZeroMQ, or {"error": the error's class name}."""
    with Control(RuntimePaths.for_prefix(prefix, root)) as client:
        try:
            return client.request(op, **args)
        except HugeshmdError as err:
            return {"error": type(err).__name__}


def script(prefix: str, root: str, body: str) -> dict[str, Any]:
    """Run ``body`` in a fresh worker with ``shm`` attached and ``out`` a dict it fills; that dict."""
    done = run_python(f"""
import json, os, hugeshmd
from hugeshmd.shm import names as N
shm = hugeshmd.attach({prefix!r}, runtime_root={root!r})
out = {{}}
{body}
print(json.dumps(out))
""", root)
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_a_small_zone_is_a_block_of_the_makers_arena_named_in_the_index(start_primary, prefix, root):
    start_primary(*HUGE)
    made = script(prefix, root, """
zone = shm.reserve("small", 3000)
zone[0:5] = b"hello"
big = shm.reserve("big", 200 << 10)
heap = shm._heap
arena = heap._arena_at(zone.address)
k, c = arena.locate(zone.address)
out.update(small=zone.address, big=big.address, in_arena=arena.heap is heap, holder=arena.holder[k],
           table=[z.name for z in shm._table.snapshot().zones if not z.name.startswith(".")],
           listed=[z.name for z in shm.zones])
""")
    assert made["in_arena"] and made["holder"] >> 31 == 1 and made["holder"] & 0xFFF == 4094, made
    assert made["table"] == ["big"] and sorted(made["listed"]) == ["big", "small"], made
    seen = script(prefix, root, """
zone = shm.lookup("small")
out.update(address=zone.address, data=bytes(zone[0:5]).decode(), size=zone.size)
shm.free("small")
shm.free("big")
""")
    assert seen == {"address": made["small"], "data": "hello", "size": 3000}
    report = settled(prefix, root)
    assert report["ok"] and report["pending"] == [] and report["figures"]["named_zones"] == 0, report


def test_a_name_is_unique_across_the_index_and_the_table(start_primary, prefix, root):
    start_primary(*HUGE)
    out = script(prefix, root, """
for first, second in ((64, 1 << 20), (1 << 20, 64), (64, 64), (1 << 20, 1 << 20)):
    shm.reserve("x", first)
    try:
        shm.reserve("x", second)
        out[f"{first}/{second}"] = "reserved twice"
    except hugeshmd.AlreadyExists:
        out[f"{first}/{second}"] = "AlreadyExists"
    shm.free("x")
shm.reserve("y", 64)
""")
    assert set(out.values()) == {"AlreadyExists"}, out
    reply = control(prefix, root, "reserve", name="y", size=4096)
    assert reply["error"] == "AlreadyExists", reply
    assert control(prefix, root, "lookup", name="y")["size"] == 64
    assert [z["name"] for z in control(prefix, root, "zones")["zones"] if not z["name"].startswith(".")] == ["y"]
    assert control(prefix, root, "status")["zones"] == 1
    assert control(prefix, root, "free", name="y")["name"] == "y"
    assert control(prefix, root, "lookup", name="y")["error"] == "NotFound"
    assert settled(prefix, root)["ok"]


def test_a_lookup_never_returns_a_zone_another_worker_freed(start_primary, prefix, root):
    start_primary(*HUGE)
    out = script(prefix, root, """
other = hugeshmd.attach({prefix!r}, runtime_root={root!r})
first = shm.reserve("z", 64)
assert other.lookup("z").address == first.address  # cached in other from here
shm.free("z")
try:
    other.lookup("z")
    out["after free"] = "found"
except hugeshmd.NotFound:
    out["after free"] = "NotFound"
keep = shm.reserve("pad", 64)  # so the name's next block is another
again = shm.reserve("z", 64)
out["moved"] = again.address != first.address
out["again"] = other.lookup("z").address == again.address
""".replace("{prefix!r}", repr(prefix)).replace("{root!r}", repr(root)))
    assert out == {"after free": "NotFound", "moved": True, "again": True}, out


def test_a_named_zone_outlives_its_maker(start_primary, prefix, root, workers):
    start_primary(*HUGE)
    maker = workers()
    maker.ok("attach", prefix=prefix)
    address = maker.ok("reserve", name="kept", size=1000)["address"]
    maker.ok("write", name="kept", offset=0, hex="ab" * 8)
    maker.proc.kill()
    maker.proc.wait()
    report = settled(prefix, root)  # the maker's arena reclaimed: the zone's block is not its to lose
    assert report["ok"] and report["figures"]["named_zones"] == 1, report
    out = script(prefix, root, """
zone = shm.lookup("kept")
out.update(address=zone.address, data=bytes(zone[0:8]).hex())
for n in range(200):  # the reclaimed arena goes to the next claimer: its blocks must not include the zone's
    b = shm.alloc(1000)
    b.view()[0:8] = b"\\0" * 8
out["after"] = bytes(shm.lookup("kept")[0:8]).hex()
""")
    assert out == {"address": address, "data": "ab" * 8, "after": "ab" * 8}, out


@pytest.mark.parametrize("step", ["body", "inserting", "held", "freeing", "released"])
def test_a_worker_killed_at_each_step_leaves_what_the_next_taker_finishes(start_primary, prefix, root, step):
    """The steps of a reserve (body, inserting, held) and a free (freeing, released), each cut by an
    exit holding the shard's lock; the next reserve in that shard repairs it."""
    start_primary(*HUGE)
    cut = run_python(f"""
import os, time, hugeshmd
from hugeshmd.shm import names as N
from hugeshmd.shm.layout import NOBODY, ZoneRecord
shm = hugeshmd.attach({prefix!r}, runtime_root={root!r})
step = {step!r}
if step in ("freeing", "released"):
    shm.reserve("victim", 500)
index = shm._names_index(make=True)
field = index.field("victim")
shard = index.shard_of(field)
index.lock(shard, shm._repair_names)
if step in ("freeing", "released"):
    entry, record = index.find(field, shm._table.snapshot().segments)
    index.set_state(entry, N.FREEING)
    if step == "released":
        index._release(entry, shm._heap._arena_at)
else:
    buf = shm.alloc(500)
    entry = index.probe(field)[1]  # a vacant entry of the shard
    seg = shm._table.snapshot().segments[0]
    record = ZoneRecord("victim", buf.address, 500, buf.address, 64, seg.id, NOBODY, time.time_ns(), 0)
    index.write(entry, record)
    if step != "body":
        index.set_state(entry, N.INSERTING)
    if step == "held":
        buf._slot[2].holder[buf._slot[1]] = N.zone_custody(entry)
print(record.address, flush=True)
os._exit(0)  # holding the shard's lock
""", root)
    address = int(cut.stdout.split()[0])
    out = script(prefix, root, """
try:
    shm.reserve("victim", 64)  # takes the shard's lock: EOWNERDEAD, so the repair runs first
    out["reserve"] = "reserved"
except hugeshmd.AlreadyExists:
    out["reserve"] = "AlreadyExists"
out["size"] = shm.lookup("victim").size
out["same"] = shm.lookup("victim").address == ADDRESS
""".replace("ADDRESS", str(address)))
    if step == "held":  # a reserve that got as far as the block's holder is rolled forward
        assert out == {"reserve": "AlreadyExists", "size": 500, "same": True}, (step, out)
    else:  # undone (reserve), or finished (free): the name is free again
        assert out["reserve"] == "reserved" and out["size"] == 64, (step, out)
    report = settled(prefix, root)
    assert report["ok"] and report["pending"] == [], (step, report)
    assert report["figures"]["named_zones"] == 1, (step, report)


def test_the_primary_finishes_a_dead_workers_change_at_its_heartbeat(start_primary, prefix, root):
    start_primary(*HUGE)
    run_python(f"""
import os, hugeshmd
from hugeshmd.shm import names as N
shm = hugeshmd.attach({prefix!r}, runtime_root={root!r})
shm.reserve("gone", 700)
index = shm._names_index(make=False)
field = index.field("gone")
index.lock(index.shard_of(field), shm._repair_names)
entry, record = index.find(field, shm._table.snapshot().segments)
index.set_state(entry, N.FREEING)
os._exit(0)  # holding the shard's lock, the free half done
""", root)
    report = settled(prefix, root, within=5.0)  # no other worker touches that shard: the primary heals it
    assert report["ok"] and report["pending"] == [] and report["figures"]["named_zones"] == 0, report
    out = script(prefix, root, """
try:
    shm.lookup("gone")
    out["lookup"] = "found"
except hugeshmd.NotFound:
    out["lookup"] = "NotFound"
""")
    assert out == {"lookup": "NotFound"}


def test_a_full_shard_makes_zones_of_the_shared_table(start_primary, prefix, root):
    start_primary(*HUGE, "--max-zones", "64")  # 8 entries per shard
    out = script(prefix, root, """
index = shm._names_index(make=True)
shard = index.shard_of(index.field("n0"))
same = [n for n in (f"n{i}" for i in range(20000)) if index.shard_of(index.field(n)) == shard][:10]
for n in same:
    shm.reserve(n, 128)
table = {z.name for z in shm._table.snapshot().zones}
out.update(per_shard=index.per_shard, in_table=sum(n in table for n in same),
           listed=sorted(z.name for z in shm.zones) == sorted(same))
for n in same:
    shm.free(n)
""")
    assert out == {"per_shard": 8, "in_table": 2, "listed": True}, out
    assert settled(prefix, root)["ok"]


def test_a_damaged_entry_is_an_error_for_its_name_and_a_violation_not_a_crash(start_primary, prefix, root):
    start_primary(*HUGE)
    out = script(prefix, root, """
shm.reserve("hurt", 64)
shm.reserve("fine", 64)
index = shm._names_index(make=False)
entry, _ = index.find(index.field("hurt"), shm._table.snapshot().segments)
at = index._at(entry)
index.mem[at + 8] ^= 0xFF  # the low byte of its address: its checksum fails
other = hugeshmd.attach({prefix!r}, runtime_root={root!r})
try:
    other.lookup("hurt")
    out["hurt"] = "found"
except hugeshmd.TableCorrupt as err:
    out["hurt"] = "TableCorrupt"
out["fine"] = other.lookup("fine").size
""".replace("{prefix!r}", repr(prefix)).replace("{root!r}", repr(root)))
    assert out == {"hurt": "TableCorrupt", "fine": 64}, out
    report = check(prefix, root)
    assert any("fails its checksum" in v for v in report["violations"]), report


def test_a_storm_of_kill_9_on_named_zones_leaves_the_checker_clean(start_primary, prefix, root):
    start_primary("--memory", "128M", "--huge-pages", "on")
    result = storm_result(start_storm("zone_storm.py", prefix, root, "3", "600", "60"))
    assert result["kills"] >= 200, result
    assert result["bad"] == [] and result["said"] == "", result
    report = settled(prefix, root)
    assert report["violations"] == [] and report["pending"] == [], report
    out = script(prefix, root, """
zones = sorted(shm.zones, key=lambda z: z.address)
out["overlaps"] = [(a.name, b.name) for a, b in zip(zones, zones[1:]) if a.address + a.size > b.address]
out["count"] = len(zones)
for z in zones:
    shm.free(z.name)
""")
    assert out["overlaps"] == [], out
    report = settled(prefix, root)
    assert report["ok"] and report["figures"]["named_zones"] == 0, report


def test_named_zones_survive_a_primary_kill_9_and_adoption(start_primary, prefix, root):
    first = start_primary(*HUGE)
    script(prefix, root, """
z = shm.reserve("stay", 2048)
z[0:4] = b"keep"
""")
    first.stop(signal.SIGKILL)
    second = start_primary(*HUGE)
    assert "adopted prefix" in second.text, second.text
    deadline = time.monotonic() + 5
    while control(prefix, root, "status")["zones"] != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    out = script(prefix, root, """
out["data"] = bytes(shm.lookup("stay")[0:4]).decode()
shm.free("stay")
""")
    assert out == {"data": "keep"}
    assert settled(prefix, root)["ok"]


HOLDER = """
import hugeshmd, sys, time
shm = hugeshmd.attach(sys.argv[1])
index = shm._names_index(make=True)
index.lock(index.shard_of(index.field("contested")), shm._repair_names)
print("holding", flush=True)
time.sleep(600)
"""


def test_a_frozen_holder_of_a_shard_makes_no_one_wait_past_the_bound(start_primary, prefix, root, workers):
    start_primary(*HUGE)
    holder = spawn_worker(["-c", HOLDER, prefix], root, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        os.kill(holder.pid, signal.SIGSTOP)
        other = workers()
        other.ok("attach", prefix=prefix, lock_timeout=0.3)
        other.ok("reserve", name="elsewhere", size=64)  # another shard: no wait at all
        t0 = time.monotonic()
        reply = other.call("reserve", name="contested", size=64)
        assert time.monotonic() - t0 < 0.3 + 0.5  # the bound, and some slack for a loaded machine
        assert reply["error"] == "TableBusy", reply
        assert reply["fields"]["pid"] == holder.pid and reply["fields"]["stopped"] is True, reply
        kill_session(holder)  # frozen, then killed: the kernel hands the mutex on, marked owner-died
        assert other.ok("reserve", name="contested", size=64)["size"] == 64
    finally:
        kill_session(holder)
        if holder.stdout is not None:
            holder.stdout.close()
    assert settled(prefix, root)["ok"]


# -- what a review found (each test failed before its fix) -----------------------------------------

SAME_SHARD = """
from hugeshmd.shm import names as N
index = shm._names_index(make=True)
shard = index.shard_of(index.field("victim"))
peers = [n for n in (f"p{i}" for i in range(100000)) if index.shard_of(index.field(n)) == shard]
def die_mid_free(name):
    # a worker killed between FREEING and the bump of the shard's frees, holding the lock
    pid = os.fork()
    if pid == 0:
        index.lock(shard, shm._repair_names)
        entry, _ = index.find(index.field(name), shm._table.snapshot().segments)
        index.set_state(entry, N.FREEING)
        os._exit(0)
    os.waitpid(pid, 0)
"""


def test_a_free_finished_by_a_repair_makes_cached_lookups_look_again(start_primary, prefix, root):
    start_primary(*HUGE)
    out = script(prefix, root, SAME_SHARD + """
other = hugeshmd.attach(shm.prefix, runtime_root=os.environ["HUGESHMD_RUNTIME_ROOT"])
z = shm.reserve("victim", 500)
assert other.lookup("victim").address == z.address      # cached, with the shard's frees
die_mid_free("victim")
shm.reserve(peers[0], 64)                                # takes the lock: EOWNERDEAD, repair
try:
    shm.lookup("victim"); out["fresh"] = "found"
except hugeshmd.NotFound:
    out["fresh"] = "NotFound"
third = hugeshmd.attach(shm.prefix, runtime_root=os.environ["HUGESHMD_RUNTIME_ROOT"])
try:
    third.lookup("victim"); out["third"] = "found"
except hugeshmd.NotFound:
    out["third"] = "NotFound"
try:
    out["cached"] = hex(other.lookup("victim").address)
except hugeshmd.NotFound:
    out["cached"] = "NotFound"
""")
    assert out == {"fresh": "NotFound", "third": "NotFound", "cached": "NotFound"}, out


def test_a_free_never_erases_the_zone_that_took_its_entry_meanwhile(start_primary, prefix, root):
    start_primary(*HUGE)
    out = script(prefix, root, SAME_SHARD + """
other = hugeshmd.attach(shm.prefix, runtime_root=os.environ["HUGESHMD_RUNTIME_ROOT"])
shm.reserve("victim", 500)
real = N.Names.lock
hook = []
def lock(self, *a, **k):
    if hook:
        hook.pop()()
    return real(self, *a, **k)
N.Names.lock = lock
def meanwhile():   # after other's unlocked find of "victim", before it takes the lock
    die_mid_free("victim")
    shm.reserve(peers[0], 64)     # repairs (victim EMPTY, frees unchanged), then takes victim's entry
hook.append(meanwhile)
try:
    other.free("victim")          # the repair bumped the shard's frees: it looks again, and finds none
    out["free"] = "freed"
except hugeshmd.NotFound:
    out["free"] = "NotFound"
try:
    out["peer"] = shm.lookup(peers[0]).size
except hugeshmd.NotFound:
    out["peer"] = "NotFound"
from hugeshmd.shm.heapcheck import walk
out["violations"] = walk(shm._table, shm._window).violations
""")
    assert out == {"free": "NotFound", "peer": 64, "violations": []}, out


def test_a_small_zone_aligned_past_the_page_size_is_a_zone_of_the_table(start_primary, prefix, root):
    start_primary("--memory", "16M", "--huge-pages", "off")
    out = script(prefix, root, """
try:
    out["zone"] = shm.reserve("aligned", 100, align=8192).address % 8192
except hugeshmd.HugeshmdError as err:
    out["zone"] = f"{type(err).__name__}: {err}"
""")
    assert out == {"zone": 0}, out


def test_a_small_zone_is_a_zone_of_the_table_when_the_index_does_not_fit(start_primary, prefix, root):
    start_primary("--memory", "4M", "--huge-pages", "off")
    out = script(prefix, root, """
big = shm.reserve("big", (4 << 20) - (128 << 10))
try:
    out["small"] = shm.reserve("small", 64).size
except hugeshmd.HugeshmdError as err:
    out["small"] = f"{type(err).__name__}: {err}"
""")
    assert out == {"small": 64}, out


def test_the_checker_sees_no_violation_when_a_zone_is_freed_while_it_walks(start_primary, prefix, root):
    start_primary(*HUGE)
    run_python(f"""
import os, hugeshmd
shm = hugeshmd.attach({prefix!r}, runtime_root={root!r})
shm.reserve("kept", 1000)
os._exit(0)
""", root)
    settled(prefix, root)  # the maker's arena reclaimed: E_FREE, the zone's block LIVE and named
    out = script(prefix, root, """
from hugeshmd.shm import heapcheck
real = heapcheck._arena_figures
once = [1]
base = shm.lookup("kept").address & ~((2 << 20) - 1)
def figures(*a):
    got = real(*a)
    if once and a[0].base == base:
        once.pop()
        shm.free("kept")          # a free by another worker, while the checker walks
    return got
heapcheck._arena_figures = figures
out["violations"] = heapcheck.walk(shm._table, shm._window).violations
""")
    assert out["violations"] == [], out


def test_a_change_given_up_by_an_exception_is_finished_by_the_next_taker(start_primary, prefix, root):
    """A free that raised half way (its process lives on, the shard's lock released normally)
    leaves FREEING: the next taker of that shard's lock finishes it, as after a death."""
    start_primary(*HUGE)
    out = script(prefix, root, SAME_SHARD + """
shm.reserve("victim", 500)
real = N.Names._release
def boom(self, *a):
    raise RuntimeError("given up half way")
N.Names._release = boom
try:
    shm.free("victim")
except RuntimeError:
    out["raised"] = True
N.Names._release = real
index.lock(shard, shm._repair_names)  # a free lock, an abandoned entry: repaired
index.unlock(shard)
try:
    shm.lookup("victim")
    out["lookup"] = "found"
except hugeshmd.NotFound:
    out["lookup"] = "NotFound"
from hugeshmd.shm.heapcheck import walk
report = walk(shm._table, shm._window)
out.update(violations=report.violations, pending=report.pending, named=report.named_zones)
""")
    assert out == {"raised": True, "lookup": "NotFound", "violations": [], "pending": [], "named": 0}, out


def test_a_read_only_worker_looks_up_named_zones_and_changes_none(start_primary, prefix, root):
    start_primary(*HUGE)
    script(prefix, root, """
z = shm.reserve("shown", 300)
z[0:4] = b"seen"
""")
    done = run_python(f"""
import hugeshmd
shm = hugeshmd.attach({prefix!r}, runtime_root={root!r}, read_only=True)
zone = shm.lookup("shown")
print(type(zone).__name__, bytes(zone.view()[0:4]).decode(), [z.name for z in shm.zones])
for call in (lambda: shm.reserve("more", 64), lambda: shm.free("shown")):
    try:
        call()
    except hugeshmd.AccessDenied:
        print("AccessDenied")
""", root)
    assert done.stdout.split() == ["ReadOnlyZone", "seen", "['shown']", "AccessDenied", "AccessDenied"], done.stdout
    assert settled(prefix, root)["figures"]["named_zones"] == 1


def test_threads_and_a_forked_child_reserve_and_free_names_of_one_shard(start_primary, prefix, root):
    """Threads of one process meet on a shard's mutex as processes do; a forked child reserves
    in arenas of its own and frees its parent's zones."""
    start_primary(*HUGE)
    out = script(prefix, root, SAME_SHARD + """
import threading
names = peers[:40]
errors = []
def work(part):
    try:
        for _ in range(20):
            for n in part:
                shm.reserve(n, 128)
            for n in part:
                shm.free(n)
    except Exception as err:
        errors.append(repr(err))
threads = [threading.Thread(target=work, args=(names[i::4],)) for i in range(4)]
for t in threads: t.start()
for t in threads: t.join()
out["errors"] = errors
kept = shm.reserve("parents", 64)
pid = os.fork()
if pid == 0:
    mine = shm.reserve("childs", 64)
    ok = mine.address & ~((2 << 20) - 1) != kept.address & ~((2 << 20) - 1)  # another arena
    shm.free("parents")
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
out["child"] = os.waitstatus_to_exitcode(status)
try:
    shm.lookup("parents")
    out["parents"] = "found"
except hugeshmd.NotFound:
    out["parents"] = "NotFound"
out["childs"] = shm.lookup("childs").size
from hugeshmd.shm.heapcheck import walk
out["violations"] = walk(shm._table, shm._window).violations
""")
    assert out == {"errors": [], "child": 0, "parents": "NotFound", "childs": 64, "violations": []}, out


def test_a_repair_killed_after_it_emptied_the_entry_leaves_cached_lookups_looking_again(start_primary, prefix,
                                                                                          root):
    """The frees counter is bumped before the entry goes EMPTY, by a free and by a repair alike: a
    repairer killed between the two left the counter as it was, and a worker's cached lookup
    returned the freed zone for good (a second review)."""
    start_primary(*HUGE)
    out = script(prefix, root, SAME_SHARD + """
other = hugeshmd.attach(shm.prefix, runtime_root=os.environ["HUGESHMD_RUNTIME_ROOT"])
shm.reserve("victim", 500)
assert other.lookup("victim")              # cached, with the shard's frees
die_mid_free("victim")
pid = os.fork()
if pid == 0:                               # the repairer, killed right after it empties the entry
    real = N.Names.set_state
    def set_state(self, entry, state):
        real(self, entry, state)
        if state == N.EMPTY:
            os._exit(0)
    N.Names.set_state = set_state
    index.lock(shard, shm._repair_names)
    os._exit(1)
os.waitpid(pid, 0)
try:
    other.lookup("victim")
    out["cached"] = "found"
except hugeshmd.NotFound:
    out["cached"] = "NotFound"
""")
    assert out == {"cached": "NotFound"}, out


def test_a_repair_never_marks_freed_a_block_its_owner_took_back(start_primary, prefix, root):
    """A remover stopped after it freed the block (REMOTE): the owner may collect it and hand it
    out again before the repair reads the block; the repair must not store REMOTE over it then
    (a second review: the block would have gone to two users)."""
    start_primary(*HUGE)
    out = script(prefix, root, SAME_SHARD + """
zone = shm.reserve("victim", 500)
address = zone.address
pid = os.fork()
if pid == 0:                               # a remover stopped after its REMOTE store
    index.lock(shard, shm._repair_names)
    entry = index.probe(index.field("victim"))[0]
    index.set_state(entry, N.FREEING)
    index._release(entry, shm._heap._arena_at)
    os._exit(0)
os.waitpid(pid, 0)
heap = shm._heap
arena = heap._arena_at(address)
taken = []

class Holders:                             # the owner collects and reallocates right after the repair's read
    def __init__(self, real):
        self.real = real
    def __getitem__(self, k):
        word = self.real[k]
        if not taken:
            heap._collect(arena)
            for _ in range(64):
                taken.append(shm.alloc(500))
                if taken[-1].address == address:
                    break
        return word
    def __setitem__(self, k, v):
        self.real[k] = v

class Sneaky:
    def __init__(self, real):
        self.real, self.holder = real, Holders(real.holder)
    def __getattr__(self, name):
        return getattr(self.real, name)

def repair(s):                             # the next taker of the lock (EOWNERDEAD) repairs, with the owner racing it
    index.repair(s, lambda a: Sneaky(arena) if a == address else heap._arena_at(a), shm._table.snapshot().segments)

index.lock(shard, repair)
index.unlock(shard)
k = arena.locate(address)[0]
out["reused"] = any(b.address == address for b in taken)
out["state"] = arena.state[k]              # 1: LIVE, its new user's
""")
    assert out == {"reused": True, "state": 1}, out


def test_a_damaged_state_word_is_an_error_for_its_name_and_frees_nothing(start_primary, prefix, root):
    """A state word that is none of the four (a flipped bit) is damage: the zone is neither freed
    under its users by the next taker of the shard nor named twice; its name's calls raise
    TableCorrupt and the checker reports it (a second review)."""
    start_primary(*HUGE)
    out = script(prefix, root, SAME_SHARD + """
zone = shm.reserve("victim", 500)
zone[0:4] = b"kept"
entry = index.probe(index.field("victim"))[0]
index.set_state(entry, N.PUBLISHED | 0x100)
fresh = hugeshmd.attach(shm.prefix, runtime_root=os.environ["HUGESHMD_RUNTIME_ROOT"])  # nothing cached
for call in (lambda: shm.reserve("victim", 64), lambda: shm.free("victim"), lambda: fresh.lookup("victim")):
    try:
        call()
        out.setdefault("calls", []).append("done")
    except hugeshmd.TableCorrupt:
        out.setdefault("calls", []).append("TableCorrupt")
shm.reserve(peers[0], 64)  # another name of the shard: its lock taken, nothing repaired
heap = shm._heap
arena = heap._arena_at(zone.address)
out["block"] = arena.state[arena.locate(zone.address)[0]]
out["data"] = bytes(zone[0:4]).decode()
from hugeshmd.shm.heapcheck import walk
out["reported"] = any("unknown state" in v for v in walk(shm._table, shm._window).violations)
""")
    assert out == {"calls": ["TableCorrupt"] * 3, "block": 1, "data": "kept", "reported": True}, out
