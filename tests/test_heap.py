"""Unit tests of the shared heap (hugeshmd.shm.heap, buffer, heapcheck) in one process.

Each test builds a real table in tmp_path whose one segment is an anonymous
mmap of this process, so arenas, state bytes and OFD locks are the real ones.
Two Heaps over one table stand for two workers: each has its own lock
description, so their arena locks meet as two processes' would. A worker's
death is its lock description closing (what the kernel does at exit).
"""

from __future__ import annotations

import mmap
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from factories import layout, segment_record

from hugeshmd.errors import InvalidArgument, NotFound, TableCorrupt, TableFull
from hugeshmd.shm import heap as heapmod
from hugeshmd.shm.heap import (
    ARENA,
    BLOCKS,
    CLASS_AT,
    CLASS_SIZES,
    DISOWNED,
    E_FREE,
    E_OWNED,
    FREE,
    LIVE,
    MAX_SMALL,
    REMOTE,
    STATE_AT,
    Arena,
    Directory,
    Heap,
    arena_name,
    class_for,
    liveness,
    reclaim_arena,
)
from hugeshmd.shm.heapcheck import walk
from hugeshmd.shm.layout import ZONE_DISOWNED, ZONE_HEAP, Owner
from hugeshmd.shm.lock import ByteLock
from hugeshmd.shm.table import Table

MiB = 1 << 20
SEGMENT = 24 * MiB


class Instance:
    """A table in tmp_path over one anonymous mapping of this process: heaps made on it share it."""

    def __init__(self, path: str) -> None:
        self.mm = mmap.mmap(-1, SEGMENT + ARENA)
        import ctypes

        raw = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))
        self.base = (raw + ARENA - 1) & ~(ARENA - 1)
        seg = segment_record(address=self.base, length=SEGMENT)
        self.table = Table.create(path, layout(base=self.base, window=SEGMENT, max_zones=64), segments=(seg,))
        self.heaps: list[Heap] = []

    def heap(self, pid: int = 0) -> Heap:
        tag = len(self.heaps)
        owner = Owner(tag, 1, pid or os.getpid(), 1000 + tag)
        made = Heap(self.table, self.mm, self.base, SEGMENT, lambda: owner, self.table.snapshot)
        self.heaps.append(made)
        return made

    def directory(self) -> Directory:
        return Directory(self.table.snapshot().by_name[".heap"], self.mm)

    def arena(self, i: int) -> Arena:
        return Arena(i, self.directory().entry(i)[0], self.mm)


def die(heap: Heap) -> None:
    """What the kernel does when a worker dies: its lock description closes."""
    assert heap._locks is not None
    heap._locks.close()


@pytest.fixture
def inst(tmp_path: Any) -> Iterator[Instance]:
    made = Instance(str(tmp_path / "table"))
    yield made
    for h in made.heaps:
        if h._locks is not None:
            h._locks.close()


def state_of(inst: Instance, address: int) -> int:
    base = address & ~(ARENA - 1)
    directory = inst.directory()
    i = next(i for i, e in directory.entries() if e[0] == base)
    arena = inst.arena(i)
    found = arena.locate(address)
    assert found is not None
    return arena.state[found[0]]


# -- size classes -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 63, 64, 65, 100, 128, 129, 1000, 4097, 40000, 65535, MAX_SMALL])
def test_class_is_the_smallest_that_holds_the_size(size: int) -> None:
    c = class_for(size, 64)
    assert c is not None
    assert CLASS_SIZES[c] >= size
    assert c == 0 or CLASS_SIZES[c - 1] < size


def test_alignment_picks_a_class_that_is_a_multiple_of_it() -> None:
    c = class_for(100, 4096)
    assert c is not None and CLASS_SIZES[c] % 4096 == 0
    assert class_for(100, 1 << 17) is None  # no class: a large allocation
    assert class_for(MAX_SMALL + 1, 64) is None


# -- allocating and freeing in one's own arena -------------------------------------------------


def test_alloc_gives_aligned_writable_memory_of_the_size_asked(inst: Instance) -> None:
    h = inst.heap()
    bufs = [h.alloc(size) for size in (1, 64, 100, 5000, MAX_SMALL)]
    for buf in bufs:
        assert buf.address % 64 == 0
        assert len(buf.view()) == buf.size
        buf.view()[:] = bytes([buf.size % 251]) * buf.size
    for buf in bufs:
        assert bytes(buf.view()) == bytes([buf.size % 251]) * buf.size
    spans = sorted((b.address, b.address + b.size) for b in bufs)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))


def test_free_makes_the_block_free_and_a_double_free_changes_nothing(inst: Instance) -> None:
    h = inst.heap()
    buf = h.alloc(200)
    twin = h.buffer(buf.address)
    assert state_of(inst, buf.address) == LIVE
    buf.free()
    assert state_of(inst, buf.address) == FREE
    with pytest.raises(InvalidArgument, match="already free"):
        twin.free()
    with pytest.raises(InvalidArgument, match="already freed through this Buffer"):
        buf.free()
    assert state_of(inst, buf.address) == FREE
    assert h.alloc(200).address == buf.address  # the freed block is the next one handed out


def test_context_manager_frees(inst: Instance) -> None:
    h = inst.heap()
    with h.alloc(64) as buf:
        address = buf.address
    assert buf.freed and state_of(inst, address) == FREE


def test_buffer_from_an_address_has_the_size_asked_and_the_same_memory(inst: Instance) -> None:
    h = inst.heap()
    buf = h.alloc(333)
    buf.view()[:3] = b"abc"
    found = inst.heap().buffer(buf.address)
    assert (found.address, found.size) == (buf.address, 333)
    assert bytes(found.view()[:3]) == b"abc"


def test_buffer_of_an_address_that_is_no_live_allocation_is_refused(inst: Instance) -> None:
    h = inst.heap()
    buf = h.alloc(256)
    with pytest.raises(NotFound, match="not at the start"):
        h.buffer(buf.address + 64)
    with pytest.raises(NotFound):
        h.buffer(buf.address + BLOCKS * 256)  # a block of the span never handed out
    buf.free()
    with pytest.raises(NotFound, match="not live"):
        h.buffer(buf.address)
    with pytest.raises(NotFound):
        h.buffer(inst.base + SEGMENT - 64)  # no arena there
    with pytest.raises(InvalidArgument):
        h.buffer("0x10")  # type: ignore[arg-type]


@pytest.mark.parametrize("size, align", [(0, None), (-1, None), (2**63, None), ("8", None), (True, None),
                                         (8, 3), (8, 0), (8, 4 * MiB), (8, "64"), (8, True)])
def test_bad_sizes_and_alignments_are_refused_and_change_nothing(inst: Instance, size: Any, align: Any) -> None:
    h = inst.heap()
    keep = h.alloc(64)
    before = (inst.table.generation, walk(inst.table, inst.mm).figures()["allocations"])
    with pytest.raises(InvalidArgument):
        h.alloc(size, align)
    assert (inst.table.generation, walk(inst.table, inst.mm).figures()["allocations"]) == before
    keep.free()


def test_alignment_up_to_the_page_size_is_kept(inst: Instance) -> None:
    h = inst.heap()
    for align in (128, 4096, 65536, 2 * MiB):
        buf = h.alloc(100, align)
        assert buf.address % align == 0, (align, hex(buf.address))
        buf.free()


def test_a_span_is_carved_with_zeroed_states_and_published_last(inst: Instance) -> None:
    h = inst.heap()
    buf = h.alloc(64)
    arena = inst.arena(0)
    span = (buf.address - arena.base) >> 16
    assert arena.span_class(span) == 0
    assert arena.state[span * BLOCKS : (span + 1) * BLOCKS].tobytes().count(LIVE) == 1


def test_arena_full_claims_another_arena(inst: Instance) -> None:
    h = inst.heap()
    bufs = [h.alloc(MAX_SMALL) for _ in range(31)]  # 30 data spans of one block each, then one more
    bases = {b.address & ~(ARENA - 1) for b in bufs}
    assert len(bases) == 2
    assert [e[1] for _, e in list(inst.directory().entries())[:2]] == [E_OWNED, E_OWNED]


# -- other workers -----------------------------------------------------------------------------------


def test_remote_free_marks_the_block_and_its_owner_takes_it_back(inst: Instance) -> None:
    a, b = inst.heap(), inst.heap()
    mine = a.alloc(64)
    b.buffer(mine.address).free()
    assert state_of(inst, mine.address) == REMOTE
    seen = set()
    for _ in range(BLOCKS + 1):  # the list runs dry, the owner collects the remote free
        buf = a.alloc(64)
        if buf.address == mine.address:
            break
        seen.add(buf.address)
    else:
        pytest.fail("the remotely freed block never came back")
    assert state_of(inst, mine.address) == LIVE


def test_only_the_owner_disowns(inst: Instance) -> None:
    a, b = inst.heap(), inst.heap()
    buf = a.alloc(64)
    with pytest.raises(InvalidArgument, match="only the process"):
        b.buffer(buf.address).disown()
    buf.disown()
    assert state_of(inst, buf.address) == DISOWNED
    b.buffer(buf.address).free()  # anyone frees a disowned allocation
    assert state_of(inst, buf.address) == REMOTE


def test_a_live_owners_arena_is_never_taken(inst: Instance) -> None:
    a, b = inst.heap(), inst.heap()
    x, y = a.alloc(64), b.alloc(64)
    assert x.address & ~(ARENA - 1) != y.address & ~(ARENA - 1)
    assert state_of(inst, x.address) == LIVE


# -- death and reclaim ----------------------------------------------------------------------------


def test_reclaim_frees_live_and_remote_blocks_and_keeps_disowned_ones(inst: Instance) -> None:
    a, b = inst.heap(), inst.heap()
    live = [a.alloc(100) for _ in range(10)]
    kept = a.alloc(100)
    kept.disown()
    b.buffer(live[0].address).free()  # remote: REMOTE
    die(a)
    locks = ByteLock(inst.table._fd)
    try:
        assert locks.try_exclusive(liveness(0))  # the dead owner's lock is free
        count, freed = reclaim_arena(inst.directory(), inst.arena(0), locks)
    finally:
        locks.close()
    assert (count, freed) == (9, 900)  # the remote free was already done: not counted again
    assert [state_of(inst, x.address) for x in live] == [FREE] * 10
    assert state_of(inst, kept.address) == DISOWNED
    entry = inst.directory().entry(0)
    assert (entry[1], entry[4], entry[8], entry[9]) == (E_FREE, 0, 9, 900)


def test_reclaim_is_idempotent(inst: Instance) -> None:
    a = inst.heap()
    [a.alloc(64) for _ in range(3)]
    die(a)
    locks = ByteLock(inst.table._fd)
    try:
        assert locks.try_exclusive(liveness(0))
        assert reclaim_arena(inst.directory(), inst.arena(0), locks) == (3, 192)
        assert reclaim_arena(inst.directory(), inst.arena(0), locks) == (0, 0)
    finally:
        locks.close()


def test_a_dead_owners_arena_is_reclaimed_and_reused_by_the_next_claimer(inst: Instance) -> None:
    a = inst.heap()
    gone = [a.alloc(64) for _ in range(5)]
    die(a)
    b = inst.heap()
    buf = b.alloc(64)
    assert buf.address & ~(ARENA - 1) == gone[0].address & ~(ARENA - 1)
    assert inst.directory().entry(0)[8] == 5  # the claimer reclaimed them
    assert sum(state_of(inst, g.address) == LIVE for g in gone) == 1  # only b's new block


def _commit_unpublished_arena(inst: Instance, heap: Heap, i: int) -> Any:
    """What a claimer killed between committing arena ``i``'s zone and publishing it leaves."""
    with inst.table.locked() as base:
        base, _ = heap._ensure_directory(base)
        record = heapmod.place(base, arena_name(i), ARENA, ARENA, inst.table.iova_of, heapmod.NOBODY,
                               heapmod.ZONE_HEAP_META)
        Arena.initialize(record.address, i)
        inst.table.commit(base, insert=record)
    return record


def test_a_claimer_killed_before_publishing_its_arena_leaves_it_to_the_next(inst: Instance) -> None:
    record = _commit_unpublished_arena(inst, inst.heap(), 0)
    report = walk(inst.table, inst.mm)
    assert report.ok and any("died before publishing" in p for p in report.pending)
    b = inst.heap()
    buf = b.alloc(64)
    assert buf.address & ~(ARENA - 1) == record.address  # the same zone, not a leak
    assert walk(inst.table, inst.mm).ok


def test_an_unpublished_arena_that_was_used_is_never_wiped(inst: Instance) -> None:
    record = _commit_unpublished_arena(inst, inst.heap(), 0)
    arena = Arena(0, record.address, inst.mm)
    arena.meta[CLASS_AT + 5] = 1  # carved: someone used it, whatever the directory says
    arena.state[5 * BLOCKS] = DISOWNED
    with pytest.raises(TableCorrupt, match="is in no entry of the directory but has span 5 carved"):
        inst.heap().alloc(64)
    assert arena.state[5 * BLOCKS] == DISOWNED


def test_a_directory_zone_that_holds_no_directory_is_damage_not_wiped(inst: Instance) -> None:
    with inst.table.locked() as base:
        record = heapmod.place(base, ".heap", 4096 + 64, 4096, inst.table.iova_of, heapmod.NOBODY,
                               heapmod.ZONE_HEAP_META)
        inst.table.commit(base, insert=record)
    with pytest.raises(TableCorrupt, match="is not one"):
        inst.heap().alloc(64)
    assert not walk(inst.table, inst.mm).ok


def test_arenas_run_out_with_a_clear_error(inst: Instance, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heapmod, "max_arenas_for", lambda window: 1)
    inst.heap().alloc(64)
    with pytest.raises(TableFull, match="arenas"):
        inst.heap().alloc(64)


# -- large allocations ------------------------------------------------------------------------------


def test_a_large_allocation_is_a_zone_of_its_own(inst: Instance) -> None:
    h = inst.heap()
    buf = h.alloc(MAX_SMALL + 1)
    record = inst.table.snapshot().by_name[next(n for n in inst.table.snapshot().by_name if n.startswith(".h."))]
    assert (record.address, record.size, record.flags) == (buf.address, MAX_SMALL + 1, ZONE_HEAP)
    assert inst.heap().buffer(buf.address).size == MAX_SMALL + 1
    buf.disown()
    assert inst.table.snapshot().by_name[record.name].flags == ZONE_HEAP | ZONE_DISOWNED
    inst.heap().buffer(buf.address).free()
    with pytest.raises(InvalidArgument, match="already"):
        buf.free()
    assert record.name not in inst.table.snapshot().by_name



@pytest.mark.process
def test_a_forked_childs_large_allocation_is_the_childs_not_its_parents(inst: Instance) -> None:
    """The owner token is made once per process: a child forked after its parent made one makes
    its own, so its large allocations are reclaimed when it dies, not when its parent does."""
    h = Heap(inst.table, inst.mm, inst.base, SEGMENT, lambda: Owner(0, 1, os.getpid(), 1000), inst.table.snapshot)
    inst.heaps.append(h)
    h.alloc(MAX_SMALL + 1)  # the parent's token, made
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            address = h.alloc(MAX_SMALL + 1).address
            record = inst.table.snapshot().zone_at(address)
            os.write(w, f"{record.owner.pid} {record.name}".encode() if record is not None else b"none")
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as got:
        owner_pid, name = got.read().split()
    os.waitpid(pid, 0)
    assert int(owner_pid) == pid and name.startswith(f".h.{pid}."), (owner_pid, name, pid)

# -- the checker ---------------------------------------------------------------------------------------


def test_checker_passes_a_busy_heap_and_counts_it(inst: Instance) -> None:
    a, b = inst.heap(), inst.heap()
    kept = [a.alloc(s) for s in (64, 300, 5000)] + [b.alloc(100)] + [a.alloc(200 * 1024)]
    kept[0].free()
    report = walk(inst.table, inst.mm)
    assert report.violations == []
    f = report.figures()
    assert (f["allocations"], f["large_allocations"], f["arenas"]) == (4, 1, 2)
    assert f["used"] == 384 + 6144 + 128 + 200 * 1024


@pytest.mark.parametrize("damage, said", [
    ("state", "unknown state bytes"),
    ("class", "unknown class"),
    ("meta_span", "holds the arena's metadata"),
    ("live_in_free", "owned by no one but holds"),
    ("slack", "slack"),
    ("past_end", "past its"),
])
def test_checker_reports_each_broken_rule(inst: Instance, damage: str, said: str) -> None:
    h = inst.heap()
    buf = h.alloc(4096)
    arena = inst.arena(0)
    k, c = arena.locate(buf.address)  # type: ignore[misc]
    span = k // BLOCKS
    if damage == "state":
        arena.state[k] = 9
    elif damage == "class":
        arena.meta[CLASS_AT + span] = 200
    elif damage == "meta_span":
        arena.meta[CLASS_AT + 0] = 1
    elif damage == "live_in_free":
        inst.directory().write(0, state=E_FREE)
    elif damage == "slack":
        arena.slack[k] = 4096
    elif damage == "past_end":
        arena.meta[STATE_AT + span * BLOCKS + BLOCKS - 1] = LIVE
    report = walk(inst.table, inst.mm)
    assert any(said in v for v in report.violations), report.violations


def test_user_zones_may_not_take_the_heaps_names(inst: Instance) -> None:
    from hugeshmd.shm.zones import check_user_name

    with pytest.raises(InvalidArgument, match="hugeshmd's own"):
        check_user_name(".heap")
    assert check_user_name("heap") == "heap"


def test_a_dead_owners_arena_with_no_room_left_sends_the_claimer_to_another(inst: Instance) -> None:
    a = inst.heap()
    full = [a.alloc(MAX_SMALL) for _ in range(28)]  # every data span of arena 0
    for buf in full:
        buf.disown()  # outlives a: arena 0 stays full
    die(a)
    b = inst.heap()
    buf = b.alloc(MAX_SMALL)  # claims arena 0 first (reclaimed), finds no room, claims arena 1
    assert buf.address & ~(ARENA - 1) != full[0].address & ~(ARENA - 1)
    assert [state_of(inst, f.address) for f in full] == [DISOWNED] * 28


def test_the_primary_publishes_an_arena_whose_claimer_died_before_publishing_it(inst: Instance) -> None:
    from hugeshmd.daemon.reclaim import Reclaimer

    record = _commit_unpublished_arena(inst, inst.heap(), 0)
    reclaimer = Reclaimer(inst.table, inst.mm)
    try:
        reclaimer.reclaim_dead()
    finally:
        reclaimer.close()
    assert inst.directory().entry(0)[:2] == (record.address, E_FREE)
    report = walk(inst.table, inst.mm)
    assert report.ok and report.pending == []


def test_threads_share_a_heap_and_no_block_goes_to_two_of_them(inst: Instance) -> None:
    import struct
    import threading

    h = inst.heap()
    failures: list[str] = []

    def churn(tag: int) -> None:
        rng = __import__("random").Random(tag)
        mine = []
        for n in range(4000):
            if mine and rng.random() < 0.5:
                buf, seq = mine.pop(rng.randrange(len(mine)))
                if struct.unpack_from("<QQ", buf.view()) != (tag, seq):
                    failures.append(f"thread {tag}: block {buf.address:#x} overwritten")
                buf.free()
            else:
                buf = h.alloc(rng.choice((16, 100, 3000, 40000)))
                struct.pack_into("<QQ", buf.view(), 0, tag, n)
                mine.append((buf, n))

    threads = [threading.Thread(target=churn, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert walk(inst.table, inst.mm).ok


def test_a_disowned_buffer_is_not_freed_by_its_context_manager(inst: Instance) -> None:
    h = inst.heap()
    with h.alloc(64) as small:
        small.disown()
    with h.alloc(MAX_SMALL + 1) as large:
        large.disown()
    assert state_of(inst, small.address) == DISOWNED
    assert h.buffer(large.address).size == MAX_SMALL + 1
    assert small.disowned and large.disowned


def test_a_thread_unlocking_the_gate_does_not_drop_another_threads_hold(inst: Instance) -> None:
    import threading

    owner, other = inst.heap(), inst.heap()
    x = owner.alloc(64)
    held = threading.Event()
    release = threading.Event()

    def hold_gate() -> None:  # a remote free in progress in another thread of `other`
        locks = other._thread_locks()
        assert locks.within(heapmod.gate(0), 1.0, exclusive=False)
        held.set()
        release.wait(5)
        locks.unlock(heapmod.gate(0))

    t = threading.Thread(target=hold_gate)
    t.start()
    held.wait(5)
    other.buffer(owner.alloc(64).address).free()  # this thread's remote free takes and drops the gate too
    probe = ByteLock(inst.table._fd)
    try:
        assert probe.held_elsewhere(heapmod.gate(0))  # the first thread's hold is still there
        release.set()
        t.join()
        assert not probe.held_elsewhere(heapmod.gate(0))
    finally:
        probe.close()
    assert state_of(inst, x.address) == LIVE


def test_a_claim_skips_a_dead_owners_arena_whose_gate_is_held_and_leaves_it_free(inst: Instance) -> None:
    import time

    a = inst.heap()
    a.alloc(64)
    die(a)
    freer = ByteLock(inst.table._fd)  # a remote free in progress (or frozen) in arena 0
    probe = ByteLock(inst.table._fd)
    try:
        assert freer.try_shared(heapmod.gate(0))
        t0 = time.monotonic()
        buf = inst.heap().alloc(64)
        assert time.monotonic() - t0 < 0.5  # did not wait out the gate under the writer lock
        assert buf.address & ~(ARENA - 1) != inst.arena(0).base  # took another arena
        assert not probe.held_elsewhere(liveness(0))  # and gave arena 0's L back
    finally:
        freer.close()
        probe.close()


def test_the_primary_reclaims_only_on_proof_of_death() -> None:
    from hugeshmd.daemon.reclaim import _dead
    from hugeshmd.shm.identity import own_start_time

    me, start = os.getpid(), own_start_time()
    assert not _dead(me, start)
    assert not _dead(me, 0)  # a token without a start time: alive while the pid is
    assert _dead(me, start + 1)  # the pid is someone else's now
    assert _dead(2**22 + 12345, 1)  # no such process (above pid_max's default)
    assert _dead(0, 0)  # no process at all (signal 0 to pid 0 would reach this process's group)


def test_an_arena_whose_reclaimer_died_before_its_last_store_is_settled_by_the_primary(inst: Instance) -> None:
    """A reclaim ends by writing the entry's owner (nobody), then its state (free). A reclaimer
    killed between the two leaves a reclaiming entry of pid 0: the primary finishes it."""
    from hugeshmd.daemon.reclaim import Reclaimer

    a = inst.heap()
    a.alloc(64)
    die(a)
    directory = inst.directory()
    directory.write(0, state=heapmod.E_RECLAIMING)
    directory.write(0, owner=heapmod.NOBODY)  # killed here: no state store
    assert walk(inst.table, inst.mm).pending  # an owner that is gone, not yet reclaimed
    reclaimer = Reclaimer(inst.table, inst.mm)
    try:
        reclaimer.reclaim_dead()
    finally:
        reclaimer.close()
    assert directory.entry(0)[1] == E_FREE
    report = walk(inst.table, inst.mm)
    assert report.ok and report.pending == [], report


def test_the_owner_collects_remote_frees_whatever_their_count(inst: Instance) -> None:
    """1,024 remote frees between two looks of the owner (a multiple of 256, which a byte-wide
    counter would read as none) are collected: the owner reuses them and carves nothing new."""
    a, b = inst.heap(), inst.heap()
    first = [a.alloc(64) for _ in range(1024)]  # one span of 64-byte blocks, exactly
    for buf in first:
        b.buffer(buf.address).free()
    again = [a.alloc(64) for _ in range(1024)]
    assert sorted(x.address for x in again) == sorted(x.address for x in first)


@pytest.mark.process
def test_an_entry_being_rewritten_never_reads_as_empty_in_another_process(inst: Instance) -> None:
    """``buffer()`` finds arenas in the directory without a lock, while claims and reclaims
    rewrite entries. No read may see an entry empty meanwhile: ``struct.pack_into`` zeroes its
    target before it fills it, and a writer killed in that window left an arena in no entry,
    its blocks unfindable (the heap storm found it). Another process rewrites an entry with its
    own values while this one reads it."""
    inst.heap().alloc(64)  # claims an arena: its entry is written
    directory = inst.directory()
    i, entry = next((i, e) for i, e in directory.entries() if e[0])
    child = os.fork()
    if child == 0:
        try:
            for _ in range(200_000):
                directory.write(i, state=entry[1], reclaimed=(0, 0))
        finally:
            os._exit(0)
    reads = empty = 0
    deadline = time.monotonic() + 60
    try:
        while os.waitpid(child, os.WNOHANG) == (0, 0) and time.monotonic() < deadline:
            for _ in range(1000):
                empty += directory.entry(i)[0] != entry[0]
            reads += 1000
    finally:
        try:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
        except (ProcessLookupError, ChildProcessError):
            pass  # it ended, and was reaped above
    assert reads and empty == 0, f"{empty} of {reads} reads saw the entry without its arena"


def test_buffer_of_a_large_allocation_is_right_while_another_thread_allocates(inst: Instance) -> None:
    """``buffer()`` of a live large allocation, while another thread of the process commits
    allocations placed before it: never NotFound, never another allocation's buffer (it looked
    in an index that the other thread's commit was changing: 31 NotFound in 650,000 lookups)."""
    import sys
    import threading

    h = inst.heap()
    first, target, _last = (h.alloc(100_000) for _ in range(3))
    first.free()  # a hole before the target, which the other thread's allocations fill
    stop = threading.Event()
    wrong: list[str] = []

    def churn() -> None:
        while not stop.is_set():
            h.alloc(70_000).free()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    other = threading.Thread(target=churn)
    other.start()
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and len(wrong) < 5:
            for _ in range(1000):
                try:
                    got = h.buffer(target.address)
                except NotFound as err:
                    wrong.append(str(err))
                    continue
                if got.address != target.address:
                    wrong.append(f"a buffer at {got.address:#x}")
    finally:
        stop.set()
        other.join()
        sys.setswitchinterval(interval)
    assert wrong == []
