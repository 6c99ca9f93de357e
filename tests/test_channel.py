"""Unit tests of channels (hugeshmd.shm.channel) in one process.

As in test_heap, a real table in tmp_path over an anonymous mapping of this
process stands for an instance, and two Heaps over it for two workers. A worker
that dies holding a channel's lock is a thread that takes the robust mutex and
exits without releasing it: the kernel's robust-list walk at the thread's exit is
the same one it does at a process's death, so the next taker gets EOWNERDEAD.
"""

from __future__ import annotations

import asyncio
import gc
import os
import struct
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
from test_heap import Instance, die

from hugeshmd import _sys
from hugeshmd.errors import ChannelBusy, ChannelTimeout, HandleClosed, InvalidArgument, NotFound
from hugeshmd.shm.channel import (
    CLOCK_AT,
    HEAD_AT,
    REMOVER_AT,
    RWAIT_AT,
    SLOT,
    SLOTS_AT,
    TAIL_AT,
    Channel,
    Openings,
    open_channel,
    remove_channel,
)
from hugeshmd.shm.heap import MAX_SMALL, Heap, custody
from hugeshmd.shm.heapcheck import walk
from hugeshmd.shm.layout import ZONE_HANDED

pytestmark = pytest.mark.pure


@pytest.fixture
def inst(tmp_path: Any) -> Iterator[Instance]:
    made = Instance(str(tmp_path / "table"))
    yield made
    for h in made.heaps:
        if h._locks is not None:
            h._locks.close()


def chan(inst: Instance, heap: Heap, capacity: int | None = 8, name: str = "q") -> Channel:
    return open_channel(heap, inst.table, name, capacity, inst.mm, 1.0)


def holder(buf_address: int, heap: Heap) -> int:
    arena = heap._arena_at(buf_address)
    assert arena is not None
    found = arena.locate(buf_address)
    assert found is not None
    return int(arena.holder[found[0]])


def checked(inst: Instance) -> Any:
    report = walk(inst.table, inst.mm)
    assert report.ok, report.violations
    return report


def held_by_dead(report: Any) -> list[str]:
    """The checker's pending lines about blocks held by dead workers (these tests' workers have
    made-up start times, so the checker takes every arena owner for dead: those lines are ignored)."""
    return [p for p in report.pending if "held by a worker that exited" in p]


# -- moving buffers ----------------------------------------------------------------------------


def test_a_sent_buffer_is_the_receivers_and_no_longer_the_senders(inst: Instance) -> None:
    a, b = inst.heap(), inst.heap()
    ca, cb = chan(inst, a), chan(inst, b, None)
    buf = a.alloc(100)
    buf.view()[:5] = b"hello"
    ca.send(buf)
    assert buf.sent and not buf.freed
    assert holder(buf.address, a) == custody(ca._index, 0)
    with pytest.raises(InvalidArgument, match="sent through a channel"):
        buf.free()
    with pytest.raises(InvalidArgument, match="sent already"):
        ca.send(buf)
    got = cb.recv(timeout=0)
    assert (got.address, got.size, bytes(got.view()[:5])) == (buf.address, 100, b"hello")
    assert holder(got.address, a) == b.holder != 0
    assert checked(inst).handed == 1
    with pytest.raises(InvalidArgument, match="held by the worker that received it"):
        a.buffer(got.address).free()  # the maker, through a stale handle: refused, nothing changed
    got.free()  # the holder frees it (remotely, into a's arena)
    report = checked(inst)
    assert (report.handed, report.allocations) == (0, 0)


def test_a_buffer_that_comes_back_to_its_maker_is_plainly_its_own_again(inst: Instance) -> None:
    a, b = inst.heap(), inst.heap()
    ca, cb = chan(inst, a), chan(inst, b)
    cb.send(_roundtrip(ca, cb, a.alloc(64)))
    back = ca.recv(0)
    assert holder(back.address, a) == 0
    back.free()  # the owner's fast path
    assert checked(inst).allocations == 0


def _roundtrip(ca: Channel, cb: Channel, buf: Any) -> Any:
    ca.send(buf)
    return cb.recv(0)


def test_large_buffers_move_by_their_zone_records_owner(inst: Instance) -> None:
    a, b = inst.heap(), inst.heap()
    ca, cb = chan(inst, a), chan(inst, b)
    big = a.alloc(MAX_SMALL + 1)
    big.view()[-3:] = b"end"
    ca.send(big)
    record = inst.table.snapshot().by_name[_large_name(inst, big.address)]
    assert record.flags & ZONE_HANDED and record.owner.pid == 0
    assert checked(inst).handed == 1
    got = cb.recv(0)
    assert got._record.owner == b.owner_token() and not got._record.flags & ZONE_HANDED
    assert bytes(got.view()[-3:]) == b"end"
    got.free()
    assert checked(inst).large_allocations == 0


def _handle_of_freed(heap: Heap, address: int) -> Any:
    """A Buffer handle whose block was freed through another handle (a stale handle)."""
    from hugeshmd.shm.buffer import Buffer

    arena = heap._arena_at(address)
    assert arena is not None
    found = arena.locate(address)
    assert found is not None
    return Buffer(heap, address, 64, (address, found[0], arena, found[1]), None)


def _large_name(inst: Instance, address: int) -> str:
    return next(z.name for z in inst.table.snapshot().zones if z.address == address)


def test_order_is_kept_and_batches_move_many(inst: Instance) -> None:
    a, b = inst.heap(), inst.heap()
    ca, cb = chan(inst, a, 64), chan(inst, b, None)
    bufs = [a.alloc(64) for _ in range(40)]
    for n, buf in enumerate(bufs):
        struct.pack_into("<Q", buf.view(), 0, n)
    assert ca.send_many(bufs[:30]) == 30
    for buf in bufs[30:]:
        ca.send(buf)
    assert len(cb) == 40
    got = cb.recv_many(25) + cb.recv_many(100)
    assert [struct.unpack_from("<Q", g.view())[0] for g in got] == list(range(40))
    for g in got:
        g.free()
    assert checked(inst).allocations == 0


def test_full_and_empty_wait_their_timeout_then_say_so(inst: Instance) -> None:
    a = inst.heap()
    ca = chan(inst, a, 2)
    with pytest.raises(ChannelTimeout, match="stayed empty") as empty:
        ca.recv(timeout=0.05)
    assert empty.value.full is False and empty.value.channel == "q"
    ca.send_many([a.alloc(64), a.alloc(64)])
    extra = a.alloc(64)
    t0 = time.monotonic()
    with pytest.raises(ChannelTimeout, match="stayed full"):
        ca.send(extra, timeout=0.05)
    assert time.monotonic() - t0 >= 0.05
    assert not extra.sent and len(ca) == 2  # nothing sent
    with pytest.raises(ChannelTimeout):
        ca.send(extra, timeout=0)


def test_a_blocked_receiver_wakes_when_a_sender_sends(inst: Instance) -> None:
    a, b = inst.heap(), inst.heap()
    ca, cb = chan(inst, a), chan(inst, b)
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(cb.recv(timeout=5)))
    t.start()
    while not ca._words[320 // 8]:  # the receiver counted itself asleep
        time.sleep(0.001)
    t0 = time.monotonic()
    ca.send(a.alloc(64))
    t.join(5)
    assert got and time.monotonic() - t0 < 1.0


def test_a_blocked_sender_wakes_when_a_receiver_makes_room(inst: Instance) -> None:
    a, b = inst.heap(), inst.heap()
    ca, cb = chan(inst, a, 1), chan(inst, b, None)
    ca.send(a.alloc(64))
    second = a.alloc(64)
    t = threading.Thread(target=ca.send, args=(second, 5))
    t.start()
    while not ca._words[384 // 8]:
        time.sleep(0.001)
    cb.recv(0)
    t.join(5)
    assert second.sent


def blocked_sender(inst: Instance) -> tuple[Channel, Channel, Any, threading.Thread]:
    """A channel of 8 made full by one worker, whose thread then sends one more (timeout 20 s)
    and is asleep for room: the sender's handle, a receiver's, the buffer, the thread."""
    a, b = inst.heap(), inst.heap()
    ca, cb = chan(inst, a, 8), chan(inst, b, 8)
    for _ in range(8):
        ca.send(a.alloc(64))
    last = a.alloc(64)
    t = threading.Thread(target=ca.send, args=(last, 20))
    t.start()
    waiting = f"{ca._address + HEAD_AT:#x}"  # counted asleep is not yet asleep: wait for its futex_wait
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/self/task/{t.native_id}/syscall") as call:
            fields = call.read().split()  # the system call it sleeps in, then its arguments
        if fields[1:2] == [waiting]:
            break
        time.sleep(0.001)
    return ca, cb, last, t


def test_a_sender_asleep_for_room_is_woken_once_half_the_ring_is_free(inst: Instance, monkeypatch: Any) -> None:
    """A receive wakes a sender asleep on a full ring only when it leaves half the ring free:
    woken for each slot, a sender ran for one message and slept again, a futex wake and a
    wake-up per message (40k of each a second in a one-producer pipeline)."""
    from hugeshmd.shm import channel as module

    monkeypatch.setattr(module, "ROOM_NAP", 30.0)  # woken only by a receive, for this test
    wakes: list[int] = []
    real_wake = _sys.futex_wake
    monkeypatch.setattr(_sys, "futex_wake", lambda at, n=0x7FFFFFFF: (wakes.append(at), real_wake(at, n))[1])
    ca, cb, last, t = blocked_sender(inst)
    got = [cb.recv(0) for _ in range(3)]  # 5 of 8 left: more than half full
    t.join(0.2)
    assert t.is_alive() and not last.sent
    assert ca._address + HEAD_AT not in wakes
    got.append(cb.recv(0))  # 4 of 8 left: half the ring free
    t.join(5)
    assert last.sent and wakes.count(ca._address + HEAD_AT) == 1
    got += cb.recv_many(8, 0)
    assert len(got) == 9
    for buf in got:
        buf.free()


def test_a_sender_asleep_for_room_looks_again_within_its_nap(inst: Instance) -> None:
    """A receiver that takes less than half a full ring and stops wakes no one: the sender sees
    the room when its nap (ROOM_NAP) ends, well before its timeout."""
    from hugeshmd.shm.channel import ROOM_NAP

    ca, cb, last, t = blocked_sender(inst)
    t0 = time.monotonic()
    cb.recv(0).free()
    t.join(5)
    assert last.sent and time.monotonic() - t0 < ROOM_NAP + 1.0
    for buf in cb.recv_many(8, 0):
        buf.free()


def test_arecv_waits_without_blocking_the_loop(inst: Instance) -> None:
    a, b = inst.heap(), inst.heap()
    ca, cb = chan(inst, a), chan(inst, b)

    async def main() -> tuple[Any, int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        ticker = asyncio.ensure_future(tick())
        threading.Timer(0.1, lambda: ca.send(a.alloc(64))).start()
        got = await cb.arecv(timeout=5)
        ticker.cancel()
        with pytest.raises(ChannelTimeout):
            await cb.arecv(timeout=0.05)
        return got, ticks

    got, ticks = asyncio.run(main())
    assert got.size == 64 and ticks > 10


def test_a_handle_that_waited_in_arecv_is_not_kept_alive_by_its_waker(inst: Instance) -> None:
    """The waker's index forgets a waker whose thread stopped: a handle dropped after arecv is
    collected (it was kept for good before: its opener word stayed set until detach)."""
    a, b = inst.heap(), inst.heap()
    ca, cb = chan(inst, a), chan(inst, b)

    async def main(ch: Channel) -> Any:
        threading.Timer(0.05, lambda: ca.send(a.alloc(64))).start()
        return await ch.arecv(timeout=5)

    asyncio.run(main(cb)).free()
    for thread in threading.enumerate():
        if thread.name.startswith("hugeshmd-arecv-"):
            thread.join(5)
    from hugeshmd.shm._waker import _wakers

    assert not any(w.channel is cb for w in _wakers.values())
    handle = weakref.ref(cb)
    del cb
    gc.collect()
    assert handle() is None


def test_sleeper_counts_forget_the_dead_two_periods_on(inst: Instance, monkeypatch: Any) -> None:
    """A sleeper counts itself in the half of its period; a count two periods older than the
    latest is a dead sleeper's (a live one counts itself anew within a second): the next sleeper
    clears it, and wakers stop waking for it; an uncount after its half was cleared does nothing."""
    from hugeshmd.shm import channel as module

    ca = chan(inst, inst.heap())
    now = [1000]
    monkeypatch.setattr(module, "_period", lambda: now[0])
    i = RWAIT_AT // 4

    def counts() -> tuple[int, int]:
        return ca._u32[i], ca._u32[i + 1]

    dead, live = ca._sleep_in(RWAIT_AT), ca._sleep_in(RWAIT_AT)
    assert counts() == (2, 0)
    now[0] = 1001
    assert ca._asleep(RWAIT_AT)  # a period on: a live sleeper may still be asleep
    odd = ca._sleep_in(RWAIT_AT)
    assert counts() == (2, 1)  # the other half: the even one is kept
    ca._sleep_out(RWAIT_AT, live)
    assert counts() == (1, 1)
    now[0] = 1002
    even = ca._sleep_in(RWAIT_AT)
    assert counts() == (1, 1)  # the dead sleeper's count (period 1000) cleared, this one counted
    ca._sleep_out(RWAIT_AT, odd)
    ca._sleep_out(RWAIT_AT, dead)  # had it lived: its half was cleared, nothing to take back
    assert counts() == (1, 0)
    now[0] = 1004
    assert not ca._asleep(RWAIT_AT)  # the latest count is two periods old: no live sleeper left
    now[0] = 1002
    ca._sleep_out(RWAIT_AT, even)
    assert counts() == (0, 0)


def test_send_many_wakes_the_receiver_before_it_waits_for_room(inst: Instance) -> None:
    """A batch that fills the channel half way through wakes the sleeping receiver for what it
    sent before it sleeps for room: it used to wake it only at its end, so with the receiver
    asleep both waited, until the receiver's one-second sleep ran out (with no timeout: for good)."""
    a, b = inst.heap(), inst.heap()
    ca, cb = chan(inst, a, capacity=1), chan(inst, b, capacity=1)
    got: list[Any] = []
    t = threading.Thread(target=lambda: [got.extend(cb.recv_many(4, timeout=30)) for _ in range(2)])
    t.start()
    while not ca._words[RWAIT_AT // 8]:  # the receiver counted itself asleep
        time.sleep(0.001)
    t0 = time.monotonic()
    assert ca.send_many([a.alloc(64), a.alloc(64)]) == 2
    elapsed = time.monotonic() - t0
    t.join(5)
    assert len(got) == 2
    for buf in got:
        buf.free()
    assert elapsed < 0.8, elapsed  # a receiver left asleep sleeps out its second


# -- bad input -----------------------------------------------------------------------------------


def test_bad_arguments_are_refused_and_change_nothing(inst: Instance) -> None:
    a = inst.heap()
    ca = chan(inst, a, 4)
    with pytest.raises(InvalidArgument, match="capacity 4"):
        chan(inst, a, 5)
    for capacity in (0, -1, True, 1 << 19, "8"):
        with pytest.raises(InvalidArgument):
            chan(inst, a, capacity, name="other")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        ca.send(b"bytes")  # type: ignore[arg-type]
    freed = a.alloc(64)
    freed.free()
    with pytest.raises(InvalidArgument, match="was freed"):
        ca.send(freed)
    other = a.buffer(a.alloc(64).address)
    other.free()  # freed through another handle: this one is stale
    with pytest.raises(InvalidArgument, match="not this process's"):
        ca.send(_handle_of_freed(a, other.address))
    for timeout in (-1, "1", True):
        with pytest.raises(InvalidArgument):
            ca.recv(timeout=timeout)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        ca.recv_many(0)
    assert len(ca) == 0 and checked(inst).allocations == 0
    with pytest.raises(NotFound):
        remove_channel(a, inst.table, "nope", inst.mm, 1.0)


# -- deaths ------------------------------------------------------------------------------------------


def _die_holding(lock: int, steps: Any) -> None:
    """A thread that takes ``lock``, does ``steps``, and exits holding it (the kernel marks it
    OWNER_DIED at the thread's exit, as at a process's)."""

    def run() -> None:
        assert _sys.mutex_lock(lock, 1) == 0
        steps()

    t = threading.Thread(target=run)
    t.start()
    t.join()


def _die_half_sending(ch: Channel, buf: Any) -> None:
    """A producer that wrote ``buf``'s slot and handed it to the channel, then died holding the
    producer lock, before it published the message (moved the tail)."""

    def half_send() -> None:
        t = ch._words[TAIL_AT // 8]
        SLOT.pack_into(ch._mem, SLOTS_AT + SLOT.size * (t % ch._slots), buf.address, buf.size)
        ch._hand(buf, t)

    _die_holding(ch._plock, half_send)


def test_a_producer_that_died_after_handing_over_has_its_message_published(inst: Instance) -> None:
    a, b = inst.heap(), inst.heap()
    ca, cb = chan(inst, a), chan(inst, b)
    buf = a.alloc(64)
    _die_half_sending(ca, buf)
    assert len(cb) == 0
    ca.send(a.alloc(64))  # the next producer publishes the dead one's message first
    got = cb.recv_many(10)
    assert [g.address for g in got][0] == buf.address and len(got) == 2
    assert holder(buf.address, a) == b.holder


def test_a_producer_that_died_before_handing_over_keeps_its_buffer(inst: Instance) -> None:
    a, b = inst.heap(), inst.heap()
    ca, cb = chan(inst, a), chan(inst, b)
    buf = a.alloc(64)

    def half_send() -> None:
        t = ca._words[TAIL_AT // 8]
        SLOT.pack_into(ca._mem, SLOTS_AT + SLOT.size * (t % ca._slots), buf.address, buf.size)

    _die_holding(ca._plock, half_send)
    other = a.alloc(64)
    ca.send(other)
    assert [g.address for g in cb.recv_many(10)] == [other.address]
    assert holder(buf.address, a) == 0  # still the maker's, freed with its arena if it dies
    buf.free()


def test_a_consumer_that_died_mid_receive_leaves_the_message_to_the_next(inst: Instance) -> None:
    a, b, c = inst.heap(), inst.heap(), inst.heap()
    ca, cb, cc = chan(inst, a), chan(inst, b), chan(inst, c)
    first, second = a.alloc(64), a.alloc(64)
    ca.send_many([first, second])

    def half_recv() -> None:
        h = cb._words[HEAD_AT // 8]
        cb._words[HEAD_AT // 8] = h + 1  # taken, but not made its own

    _die_holding(cb._clock, half_recv)
    got = cc.recv(0)
    assert got.address == first.address and holder(got.address, a) == c.holder
    assert cc.recv(0).address == second.address
    assert checked(inst).handed == 2


def test_the_primary_frees_what_a_dead_receiver_held_and_nothing_a_channel_holds(inst: Instance) -> None:
    from hugeshmd.daemon.reclaim import Reclaimer

    a, b = inst.heap(), inst.heap()
    ca, cb = chan(inst, a), chan(inst, b)
    held = [a.alloc(64) for _ in range(3)]
    queued = a.alloc(128)
    ca.send_many(held)
    received = cb.recv_many(3)
    ca.send(queued)
    die(b)
    report = walk(inst.table, inst.mm)
    assert report.ok and len(held_by_dead(report)) == 3
    reclaimer = Reclaimer(inst.table, inst.mm)
    try:
        token = inst.directory().entry(b.holder - 1 & 0xFFFF)[4:8]
        count, _ = reclaimer.reclaim(token[0], token[3])
    finally:
        reclaimer.close()
    assert count >= 3
    report = checked(inst)
    assert held_by_dead(report) == [] and report.handed == 1 and report.queued == 1
    assert [r.address for r in received] == [h.address for h in held]
    c = inst.heap()
    assert chan(inst, c).recv(0).address == queued.address  # the queued one was kept


def test_a_frozen_lock_holder_costs_a_bounded_wait_naming_it(inst: Instance) -> None:
    a, b = inst.heap(), inst.heap()
    ca = chan(inst, a)
    cb = open_channel(b, inst.table, "q", None, inst.mm, 0.1)
    release = threading.Event()
    taken = threading.Event()

    def hold() -> None:
        _sys.mutex_lock(ca._clock, 1)
        taken.set()
        release.wait(5)
        _sys.mutex_unlock(ca._clock)

    t = threading.Thread(target=hold)
    t.start()
    taken.wait(5)
    try:
        with pytest.raises(ChannelBusy, match="consumer lock stayed taken") as busy:
            cb.recv(timeout=0)
        assert busy.value.pid
    finally:
        release.set()
        t.join()


def test_the_checker_sees_a_free_block_that_names_a_holder(inst: Instance) -> None:
    a = inst.heap()
    buf = a.alloc(64)
    buf.free()
    arena = a._arena_at(buf.address)
    assert arena is not None
    found = arena.locate(buf.address)
    assert found is not None
    arena.holder[found[0]] = 12345
    report = walk(inst.table, inst.mm)
    assert any("is free but names a holder" in v for v in report.violations)
    arena.holder[found[0]] = 0


# -- the pin table of shared arrays (hugeshmd.shm.pins) -----------------------------------------------


def _state(heap: Heap, address: int) -> int:
    arena = heap._arena_at(address)
    assert arena is not None
    found = arena.locate(address)
    assert found is not None
    return int(arena.state[found[0]])


def test_pins_keep_an_allocation_until_the_last_goes(inst: Instance) -> None:
    from hugeshmd.shm.pins import PINNED, Pins

    a, b = inst.heap(), inst.heap()
    pa, pb = Pins(a, inst.table, inst.mm, 1.0), Pins(b, inst.table, inst.mm, 1.0)
    address = pa.make(100)
    assert holder(address, a) == PINNED
    token = pa.transit(address)  # a pickled copy in flight
    pa.unpin(address)  # the maker drops its array: the copy in flight holds it
    assert _state(a, address) == 1  # LIVE
    pb.claim(address, token)  # received
    with pytest.raises(NotFound):
        pb.transit(address + 64)  # no pin: nothing to send
    pb.unpin(address)  # the last
    assert _state(a, address) == 3  # REMOTE: its owner collects it
    with pytest.raises(NotFound, match="freed before it was received"):
        pb.claim(address, token)
    assert checked(inst).allocations == 0


def test_a_free_that_a_killed_process_left_half_done_is_finished_by_the_next(inst: Instance) -> None:
    from hugeshmd.shm.pins import FREEING_AT, Pins

    a, b = inst.heap(), inst.heap()
    pa, pb = Pins(a, inst.table, inst.mm, 1.0), Pins(b, inst.table, inst.mm, 1.0)
    address = pa.make(100)

    def half_unpin() -> None:
        pa._mem[:128].cast("Q")[FREEING_AT // 8] = address  # named, its last pin removed, then killed
        pa._remove(pa._find(address)[0])

    _die_holding(pa._lock_at, half_unpin)
    assert _state(a, address) == 1
    with pb._locked():  # the next taker of the lock finishes it
        pass
    assert _state(a, address) == 3 and pa._mem[:128].cast("Q")[FREEING_AT // 8] == 0


def test_the_primary_drops_a_dead_processs_pins(inst: Instance) -> None:
    from hugeshmd.daemon.reclaim import Reclaimer
    from hugeshmd.shm.pins import Pins

    a, b = inst.heap(), inst.heap()
    pa, pb = Pins(a, inst.table, inst.mm, 1.0), Pins(b, inst.table, inst.mm, 1.0)
    shared, alone = pa.make(64), pb.make(64)
    pb.claim(shared, pa.transit(shared))
    die(b)
    reclaimer = Reclaimer(inst.table, inst.mm)
    try:
        token = inst.directory().entry((b.holder & 0xFFFF) - 1)[4:8]
        reclaimer.reclaim(token[0], token[3])
    finally:
        reclaimer.close()
    assert _state(b, alone) == 3  # b's only: freed with its pin
    assert _state(a, shared) == 1  # a holds it still


def test_a_damaged_message_left_half_taken_is_dropped_and_the_lock_goes_on(inst: Instance) -> None:
    a, b, c = inst.heap(), inst.heap(), inst.heap()
    ca, cb, cc = chan(inst, a), chan(inst, b), chan(inst, c)
    first, second = a.alloc(64), a.alloc(64)
    ca.send_many([first, second])

    def half_recv() -> None:
        h = cb._words[HEAD_AT // 8]
        cb._ring[2 * (h % cb._slots) + 1] = 1 << 40  # its size, damaged
        cb._words[HEAD_AT // 8] = h + 1

    _die_holding(cb._clock, half_recv)
    got = cc.recv(0)  # the damaged one is dropped (the checker keeps seeing it: held by the channel)
    assert got.address == second.address
    cc.send(got)
    assert cc.recv(0).address == second.address  # the lock was given back each time


# -- removing a channel ------------------------------------------------------------------------------


def worker(inst: Instance) -> Heap:
    """A Heap with a real registration in the table's worker registry (this process, alive), as
    an attached worker has: the channels it opens count as open until it closes them."""
    from hugeshmd.shm.identity import own_start_time
    from hugeshmd.shm.registry import Registry

    owner = Registry(inst.table).register(os.getpid(), own_start_time())
    made = Heap(inst.table, inst.mm, inst.base, inst_segment(inst), lambda: owner, inst.table.snapshot)
    made.openings = Openings()
    inst.heaps.append(made)
    return made


def inst_segment(inst: Instance) -> int:
    return inst.table.snapshot().segments[0].length


def opened(inst: Instance, heap: Heap, name: str = "q", capacity: int | None = 8) -> Channel:
    return open_channel(heap, inst.table, name, capacity, inst.mm, 1.0, heap.openings)


def test_a_channel_is_removed_with_every_buffer_it_held(inst: Instance) -> None:
    a = worker(inst)
    ca = opened(inst, a)
    for size in (64, 4096, MAX_SMALL + 1):
        ca.send(a.alloc(size))
    ca.close()
    assert checked(inst).queued == 3 and checked(inst).channels == 1
    assert remove_channel(a, inst.table, "q", inst.mm, 1.0) == 3
    report = checked(inst)
    assert (report.channels, report.allocations, report.large_allocations, report.pending) == (0, 0, 0, [])
    assert inst.table.snapshot().record(".ch.q") is None
    again = opened(inst, a, capacity=4)  # the name is free again: a new, empty channel
    assert again.capacity == 4 and len(again) == 0


def test_a_channel_open_in_a_live_worker_is_not_removed_until_it_closes(inst: Instance) -> None:
    a, b = worker(inst), worker(inst)
    ca, ca2 = opened(inst, a), opened(inst, a)
    ca.send(a.alloc(64))
    with pytest.raises(ChannelBusy, match=rf"open in 1 live worker\(s\): pid {os.getpid()}.*close its handles"):
        remove_channel(b, inst.table, "q", inst.mm, 1.0)
    assert len(ca) == 1 and checked(inst).queued == 1  # nothing changed
    ca.close()
    with pytest.raises(ChannelBusy):  # a's other handle still holds it open
        remove_channel(b, inst.table, "q", inst.mm, 1.0)
    with ca2:
        pass
    assert remove_channel(b, inst.table, "q", inst.mm, 1.0) == 1
    assert checked(inst).allocations == 0


def test_a_closed_handle_says_so_and_touches_nothing(inst: Instance) -> None:
    a = worker(inst)
    ca = opened(inst, a)
    ca.close()
    ca.close()  # idempotent
    buf = a.alloc(64)
    for call in (lambda: ca.send(buf), lambda: ca.recv(0), lambda: ca.recv_many(4), lambda: len(ca),
                 lambda: ca.send_many([buf]), lambda: asyncio.run(ca.arecv(0))):
        with pytest.raises(HandleClosed, match="'q' is closed"):
            call()
    assert "closed" in repr(ca)
    buf.free()


def test_handles_collected_without_close_do_not_keep_a_channel_from_this_process(inst: Instance) -> None:
    a = worker(inst)
    opened(inst, a).send(a.alloc(64))  # the handle is dropped at once, never closed
    import gc

    gc.collect()
    assert remove_channel(a, inst.table, "q", inst.mm, 1.0) == 1


def test_a_dead_workers_handle_does_not_keep_a_channel(inst: Instance) -> None:
    from hugeshmd.shm.registry import Registry

    a, b = worker(inst), worker(inst)
    opened(inst, a)
    Registry(inst.table).unregister(a.owner_token())  # what its death and the next claim of its entry do
    assert remove_channel(b, inst.table, "q", inst.mm, 1.0) == 0


@pytest.mark.parametrize("finisher", ["remove_channel", "channel"])
def test_a_removal_a_dead_worker_left_is_finished_by_the_next(inst: Instance, finisher: str) -> None:
    """Finished by the next remove_channel, or by the next open, which then makes the channel anew."""
    a, b = worker(inst), worker(inst)
    ca = opened(inst, a)
    bufs = [a.alloc(64) for _ in range(3)]
    for buf in bufs:
        ca.send(buf)
    ca.close()
    # The remover marked the channel, took its consumer lock, took one message and died there:
    ca._words[REMOVER_AT // 8] = (7 + 1) << 32 | 99  # a registration that no longer runs

    def take_one() -> None:
        h = ca._words[HEAD_AT // 8]
        ca._words[HEAD_AT // 8] = h + 1

    _die_holding(ca._address + CLOCK_AT, take_one)
    report = walk(inst.table, inst.mm)
    assert any("or opening it, finishes it" in p for p in report.pending)
    if finisher == "remove_channel":
        assert remove_channel(b, inst.table, "q", inst.mm, 1.0) == 3
        channels = 0
    else:
        again = opened(inst, b, capacity=4)
        assert again.capacity == 4 and len(again) == 0 and again._words[REMOVER_AT // 8] == 0
        channels = 1
    report = checked(inst)
    assert (report.channels, report.allocations, report.pending) == (channels, 0, [])


def _left_by_a_dead_remover(inst: Instance, a: Heap, half_size: int = 100) -> tuple[Channel, list[int]]:
    """Channel "q" with three messages (one large), one more (of ``half_size`` bytes) half sent
    by a producer that died, and a remover that marked it, took its consumer lock, took one
    message and died there; the addresses of the four buffers."""
    ca = opened(inst, a)
    bufs = [a.alloc(64), a.alloc(MAX_SMALL + 1), a.alloc(300)]
    for buf in bufs:
        ca.send(buf)
    half = a.alloc(half_size)
    _die_half_sending(ca, half)
    ca.close()
    ca._words[REMOVER_AT // 8] = (7 + 1) << 32 | 99  # a registration that no longer runs

    def take_one() -> None:
        ca._words[HEAD_AT // 8] += 1

    _die_holding(ca._address + CLOCK_AT, take_one)
    return ca, [b.address for b in bufs] + [half.address]


def test_the_primary_finishes_a_removal_whose_remover_died(inst: Instance) -> None:
    from hugeshmd.daemon.reclaim import Reclaimer
    from hugeshmd.shm.identity import own_start_time
    from hugeshmd.shm.layout import STATE_READY

    a = worker(inst)
    _, addresses = _left_by_a_dead_remover(inst, a)
    reclaimer = Reclaimer(inst.table, inst.mm)
    try:
        assert reclaimer._finish_removals() == 0  # not the table's named primary: it leaves it
        inst.table.set_state(STATE_READY, os.getpid(), own_start_time())
        assert reclaimer._finish_removals() == 1
        assert reclaimer._finish_removals() == 0
    finally:
        reclaimer.close()
    report = checked(inst)
    assert (report.channels, report.allocations, report.pending) == (0, 0, []), report
    for address in addresses:
        with pytest.raises(NotFound):
            a.buffer(address)


def test_a_removal_the_primary_is_finishing_is_left_to_it_while_it_runs(inst: Instance) -> None:
    from hugeshmd.shm.channel import PRIMARY_REMOVER
    from hugeshmd.shm.identity import own_start_time
    from hugeshmd.shm.layout import STATE_READY

    a, b = worker(inst), worker(inst)
    ca, _ = _left_by_a_dead_remover(inst, a)
    ca._words[REMOVER_AT // 8] = PRIMARY_REMOVER  # a primary marked it, then was killed (or runs on)
    inst.table.set_state(STATE_READY, os.getpid(), own_start_time())  # it runs: this process
    with pytest.raises(ChannelBusy, match=f"being removed by pid {os.getpid()}"):
        remove_channel(b, inst.table, "q", inst.mm, 1.0)
    with pytest.raises(NotFound, match="being removed"):
        opened(inst, b)
    inst.table.set_state(STATE_READY, 0x7FFFFFF0, 1)  # it is gone: a worker finishes it
    assert remove_channel(b, inst.table, "q", inst.mm, 1.0) == 4
    report = checked(inst)
    assert (report.channels, report.allocations, report.pending) == (0, 0, []), report


def test_a_worker_that_finishes_after_a_primary_died_finishing_frees_all_the_channel_held(inst: Instance) -> None:
    """A primary took both locks of a dead remover's channel (marking them consistent, without a
    worker's repairs), stopped there (an arena's gate stayed taken) and was killed. The worker that
    takes over gets no EOWNERDEAD: the half-taken message and the half-sent large one are not
    where its ring walk looks, and are freed all the same (by holder word, as the primary frees)."""
    from hugeshmd.shm.channel import finish_dead_removal
    from hugeshmd.shm.identity import own_start_time
    from hugeshmd.shm.layout import STATE_READY

    a, b = worker(inst), worker(inst)
    _, addresses = _left_by_a_dead_remover(inst, a, half_size=MAX_SMALL + 1)
    record = inst.table.snapshot().record(".ch.q")
    assert record is not None
    inst.table.set_state(STATE_READY, os.getpid(), own_start_time())  # the primary: this process
    assert finish_dead_removal(inst.table, record, inst.mm, lambda index: None, 0.1) is None
    inst.table.set_state(STATE_READY, 0x7FFFFFF0, 1)  # then killed
    assert remove_channel(b, inst.table, "q", inst.mm, 1.0) == 4
    report = checked(inst)
    assert (report.channels, report.allocations, report.pending) == (0, 0, []), report
    for address in addresses:
        with pytest.raises(NotFound):
            a.buffer(address)


def test_an_open_that_meets_the_primary_taking_over_a_removal_says_not_found(inst: Instance, monkeypatch: Any) -> None:
    """shm.channel() of a dead remover's channel finishes the removal itself, unless the primary
    writes its word first (between the open's look and its removal): then NotFound, as for any
    channel being removed, not the ChannelBusy of remove_channel."""
    from hugeshmd.shm import channel as chmod
    from hugeshmd.shm.identity import own_start_time
    from hugeshmd.shm.layout import STATE_READY

    a, b = worker(inst), worker(inst)
    ca, _ = _left_by_a_dead_remover(inst, a)
    inst.table.set_state(STATE_READY, os.getpid(), own_start_time())  # the primary: this process
    remove = chmod._remove

    def primary_first(*args: Any) -> int:
        ca._words[REMOVER_AT // 8] = chmod.PRIMARY_REMOVER
        return remove(*args)

    monkeypatch.setattr(chmod, "_remove", primary_first)
    with pytest.raises(NotFound, match="being removed"):
        opened(inst, b)


def test_a_channel_being_removed_by_a_live_worker_is_neither_opened_nor_removed_twice(inst: Instance) -> None:
    a, b = worker(inst), worker(inst)
    opened(inst, a).close()
    owner = a.owner_token()
    ca = chan(inst, a)
    ca._words[REMOVER_AT // 8] = (owner.slot + 1) << 32 | owner.epoch  # a is removing it
    with pytest.raises(NotFound, match=f"being removed by pid {os.getpid()}"):
        opened(inst, b)
    with pytest.raises(ChannelBusy, match="being removed by pid"):
        remove_channel(b, inst.table, "q", inst.mm, 1.0)
    assert remove_channel(a, inst.table, "q", inst.mm, 1.0) == 0  # a itself goes on


def test_close_wakes_a_call_waiting_in_another_thread_and_waits_for_it(inst: Instance) -> None:
    a, b = worker(inst), worker(inst)
    ca = opened(inst, a)
    outcome: list[BaseException] = []

    def wait() -> None:
        try:
            ca.recv(timeout=30)
        except BaseException as err:  # noqa: BLE001 - what the waiting call ended with
            outcome.append(err)

    t = threading.Thread(target=wait)
    t.start()
    while not ca._words[RWAIT_AT // 8]:  # asleep in the kernel
        time.sleep(0.001)
    t0 = time.monotonic()
    ca.close()
    assert time.monotonic() - t0 < 1.0 and not t.is_alive() and not ca._busy
    assert len(outcome) == 1 and isinstance(outcome[0], HandleClosed)
    assert remove_channel(b, inst.table, "q", inst.mm, 1.0) == 0  # a's word was cleared once its call returned


def test_two_removals_in_one_process_do_not_both_pass(inst: Instance, monkeypatch: Any) -> None:
    """Threads of one process share its registration, so the remover word cannot tell them
    apart: they remove one at a time, and the second finds the channel gone."""
    a = worker(inst)
    ca = opened(inst, a)
    for _ in range(3):
        ca.send(a.alloc(64))
    ca.close()
    real = Channel._drain

    def slow(self: Channel) -> int:
        time.sleep(0.2)  # the first remover is descheduled between marking and draining
        return real(self)

    monkeypatch.setattr(Channel, "_drain", slow)
    results: list[Any] = []

    def remove() -> None:
        try:
            results.append(remove_channel(a, inst.table, "q", inst.mm, 1.0))
        except NotFound as err:
            results.append(err)

    threads = [threading.Thread(target=remove) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results, key=lambda r: isinstance(r, NotFound))[0] == 3
    assert isinstance(results[0], NotFound) or isinstance(results[1], NotFound)
    assert checked(inst).allocations == 0


def test_an_inherited_handle_records_itself_at_its_first_call_if_its_channel_is_still_there(inst: Instance) -> None:
    """What a forked child's handles do (Openings.inherit is what the fork calls in the child)."""
    a, b = worker(inst), worker(inst)
    ca, cq = opened(inst, a, "p"), opened(inst, a, "q")
    assert a.openings is not None
    a.openings.inherit()
    entry = a.owner_token().slot
    for ch in (ca, cq):
        ch._openers[entry] = 0  # the parent let go of both
    assert remove_channel(b, inst.table, "q", inst.mm, 1.0) == 0  # and q was removed meanwhile
    buf = a.alloc(64)
    with pytest.raises(HandleClosed):
        cq.send(buf)  # its channel is gone: it never touches that memory again
    ca.send(buf)  # p is still there: recorded, and a plain handle again
    assert type(ca) is Channel and ca._openers[entry] != 0
    with pytest.raises(ChannelBusy):
        remove_channel(b, inst.table, "p", inst.mm, 1.0)
