"""Channels: heap buffers handed from worker to worker, ownership included, through any death.

A channel is a zone named ``.ch.<name>``: a header, then a ring of slots, each
the address and size of one buffer. Any worker may send and receive, as many
as like; messages keep the order of each producer. What it moves is ownership:
a sent buffer is no longer its sender's, and becomes its receiver's.

Who holds a buffer is written in one place, by one store (see
:mod:`hugeshmd.shm.heap`): a small block's 32-bit *holder* word, a large
allocation's zone record (a commit). While a buffer is in the ring, its holder
is the channel at the message's sequence number (:func:`~hugeshmd.shm.heap.custody`);
a receiver writes its own holder word over that. The primary frees what a dead
worker held (its arena's reclaim for its own blocks, :func:`~hugeshmd.shm.heap.release_held`
for the blocks it received), and never a block a channel holds.

The two sides serialize on two robust mutexes, one for producers and one for
consumers (:mod:`hugeshmd._sys`): the kernel releases a dead holder's, and the
next taker learns of the death (EOWNERDEAD) and finishes what was half done,
which is always the last step of one operation:

* **send** under the producer lock: write the slot at ``tail``; make the
  channel the holder at ``tail``; publish (``tail + 1``). A producer that died
  after the second step left a slot whose buffer the channel holds at ``tail``:
  the next producer publishes it (rolls it forward). Before it, the buffer is
  still the dead producer's, and the primary frees it with the rest.
* **receive** under the consumer lock: read the slot at ``head``; advance
  ``head``; make this worker the holder. A consumer that died between the last
  two left the buffer held by the channel at ``head - 1`` with ``head`` past it:
  the next consumer takes it as the message it receives. The ring has one slot
  more than its capacity, so no producer overwrites slot ``head - 1`` meanwhile.

A channel is removed (:func:`remove_channel`) only when no live worker has it
open: each worker-registry entry has a word after the ring, set (to the entry's
epoch) while that registration holds a handle, under the table's writer lock, as
the removal checks them. So no process can touch a channel's memory after it went
back to the heap. The remover marks the channel first (the ``remover`` word: no
one opens it from then on), takes both locks, frees every buffer the channel
holds, then commits the zone's removal. A remover killed on the way leaves a
marked channel that the primary finishes at its next heartbeat
(:func:`finish_dead_removal`), unless the next ``remove_channel``, or the next
open (which then makes it anew), comes first.

Waits are futex waits on the ``tail`` word (receivers) or the ``head`` word
(senders), with a bound. A waiter counts itself in under its side's lock and
releases it (a full barrier in glibc's robust unlock) before sleeping; the
other side publishes, releases its own lock (a full barrier too), then reads
the count and wakes: neither can miss the other. A receive wakes one sleeping
sender, not all: on a full channel with many senders, waking all made each of
them run for one slot of room and sleep again; the one woken wakes the next
when it leaves room behind (:meth:`Channel._pass_on`). And it wakes it only once
the ring is half empty (:func:`room_to_wake`), as a pipe wakes its writer a page
at a time: woken for each slot, a sender that outran its receiver sent one
message and slept again, one futex wake and one wake-up per message (40k a
second each in a one-producer pipeline here, and with four producers on two
CPUs the wake-ups took the receiver's CPU). A sleeping sender looks again every
ROOM_NAP (50 ms) unwoken, so a receiver that takes less than half a full ring
and stops leaves the room it made unused for at most that long.

A waiter killed asleep would leave the count one too high for good, and the
other side would pay a futex wake (about a microsecond) on every call after. So
each side counts its sleepers in two halves, by the parity of the *period*
(2**31 ns of CLOCK_MONOTONIC, about 2.1 s) in which each counted itself, with
the period of the latest count beside them. A live sleeper sleeps at most a
second before it uncounts itself and counts itself anew, so counts made two
periods before the latest are dead sleepers': the next to count itself clears
them, and until one does, a waker that sees the latest count two periods old
does not wake. The other side reads both halves as one word, so a waker with no
one asleep pays one read, as before.

A batch that finds the ring full half way through wakes the sleeping receivers
for what it already sent before it sleeps for room itself (else each side waits
for the other until the receiver's sleep runs out).
"""

from __future__ import annotations

import os
import struct
import threading
import time
import weakref
from ctypes import c_uint64 as _c_uint64

from .. import _sys
from ..errors import ChannelBusy, ChannelTimeout, HandleClosed, InvalidArgument, NotFound, TableCorrupt
from .buffer import SENT, Buffer
from .heap import (
    _COUNTS,
    ARENA,
    BLOCKS,
    CLASS_AT,
    CLASS_SIZES,
    CUSTODY,
    FREE,
    META_SPANS,
    PINNED,
    REMOTE,
    SPAN,
    SPAN_SHIFT,
    SPANS,
    ZONES_CUSTODY,
    Heap,
    custody,
    release_custody,
)
from .layout import NO_SLOT, ZONE_CHANNEL, ZONE_DISOWNED, ZONE_HANDED, Owner, ZoneRecord
from .mutex import take
from .zones import check_name, place

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any

    from .snapshot import Snapshot
    from .table import Table

__all__ = ["Channel", "PREFIX", "DEFAULT_CAPACITY", "MAX_CAPACITY", "open_channel", "remove_channel", "channel_size",
           "Openings"]

PREFIX = ".ch."
DEFAULT_CAPACITY = 1024
MAX_CAPACITY = 1 << 18  # sequence numbers are kept modulo 2**19 in holder words: far more than a ring
MAX_CHANNELS = ZONES_CUSTODY  # channel indexes fit 12 bits of a holder word; 4094 is the named zones', 4095 the pins'
MAGIC = b"HSHMCHN2"
_HEAD = struct.Struct("<8sIIII")  # magic, capacity (messages), slots, index, opener words
PLOCK_AT = 64  # the producers' robust mutex
TAIL_AT = 128  # u64: messages published; its low half is the receivers' futex word
CLOCK_AT = 192  # the consumers' robust mutex
HEAD_AT = 256  # u64: messages taken; its low half is the senders' futex word
RWAIT_AT = 320  # u32 x 2: receivers asleep, by the parity of the period they counted themselves in;
#               u32 at +8: that period (all counted under the consumer lock; see the module's docstring)
SWAIT_AT = 384  # the same for senders asleep (under the producer lock)
REMOVER_AT = 448  # u64: the worker removing the channel, (registry entry + 1) << 32 | its epoch; 0: no one
PRIMARY_REMOVER = 0xFFFFFFFF << 32 | 1  # the remover word of the primary finishing a dead remover's removal
SLOTS_AT = 512
SLOT = struct.Struct("<QQ")  # address, size asked for
ROOM_NAP = 0.05  # a sender asleep for room looks again after this long, woken or not (see the docstring)
_TAILW, _HEADW, _RWAITW, _SWAITW = TAIL_AT // 8, HEAD_AT // 8, RWAIT_AT // 8, SWAIT_AT // 8
_ARENA_MASK = ~(ARENA - 1)
_SPAN_MASK = SPAN - 1
_NCLASSES = len(CLASS_SIZES)
_trylock, _unlock = _sys.mutex_trylock, _sys.mutex_unlock
_new = object.__new__
_perf = time.perf_counter


def _period() -> int:
    """The period sleepers count themselves in: 2**31 ns (about 2.1 s) of CLOCK_MONOTONIC, which
    every process of the host shares."""
    return time.monotonic_ns() >> 31 & 0xFFFFFFFF


def room_to_wake(capacity: int) -> int:
    """The room a receive must leave in a channel of ``capacity`` before it wakes a sender asleep
    for room: half the ring (at least one message). See the module's docstring."""
    return max(1, capacity // 2)


def channel_size(capacity: int, openers: int) -> int:
    """Bytes of a channel of ``capacity`` messages: the header, the ring (one slot more than
    the capacity), then one u32 per worker-registry entry (``openers``): who has it open."""
    return _openers_at(capacity + 1) + 4 * openers


def _openers_at(slots: int) -> int:
    return SLOTS_AT + SLOT.size * slots


def _bad_header(magic: bytes, capacity: int, slots: int, index: int, openers: int, size: int) -> bool:
    """Whether a header (``_HEAD``'s fields) is not one of a channel in a zone of ``size`` bytes."""
    return (magic != MAGIC or slots != capacity + 1 or channel_size(capacity, openers) > size
            or index >= MAX_CHANNELS)


def _opener_words(mem: memoryview, slots: int, openers: int) -> memoryview:
    """A channel's opener words (one u32 per worker-registry entry), after its ring."""
    return mem[_openers_at(slots) : _openers_at(slots) + 4 * openers].cast("I")


def check_capacity(capacity: object) -> int:
    if isinstance(capacity, bool) or not isinstance(capacity, int) or not 1 <= capacity <= MAX_CAPACITY:
        raise InvalidArgument(f"capacity must be an int in 1..{MAX_CAPACITY}, not {capacity!r}", name="capacity")
    return capacity


def check_timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout < 1e9:
        raise InvalidArgument(f"timeout must be None or a number of seconds >= 0, not {timeout!r}",
                              name="timeout")
    return float(timeout)


class Openings:
    """The channels one attachment has open: for each (by address), its handles here and the
    word of this attachment's registry entry in the channel (cleared when the last handle is
    closed, or at detach). Handles collected without ``close()`` keep it set until detach."""

    def __init__(self, owner: Callable[[], Owner] | None = None) -> None:
        self._by_address: dict[int, tuple[weakref.WeakSet[Channel], memoryview, int]] = {}
        self.removing = threading.Lock()  # one removal at a time in this attachment (they share a remover word)
        self._owner = owner  # this process's registration (a forked child registers its own); None: the heap's

    def owner(self, heap: Heap) -> Owner:
        """The registration this process's words name."""
        return heap.owner_token() if self._owner is None else self._owner()

    def add(self, channel: Channel, owner: Owner) -> None:
        """Count ``channel`` (just opened) as open here, in the word of ``owner``'s registry entry.
        Call under the table's writer lock (the word is checked under it by removers)."""
        if not 0 <= owner.slot < len(channel._openers):
            raise InvalidArgument(f"this worker (registry entry {owner.slot}) cannot open channels",
                                  name=channel.name)
        found = self._by_address.get(channel._address)
        if found is None:
            found = self._by_address[channel._address] = (weakref.WeakSet(), channel._openers, owner.slot)
        found[0].add(channel)
        channel._openers[owner.slot] = _stamp(owner)

    def close(self, channel: Channel) -> None:
        """``channel`` closed: the last handle of its channel here clears this attachment's word."""
        found = self._by_address.get(channel._address)
        if found is not None:
            found[0].discard(channel)
            self.forget_unused(channel._address)

    def forget_unused(self, address: int) -> bool:
        """Clear this attachment's word of the channel at ``address`` if no handle of it is open
        here (all closed or collected); whether none is."""
        found = self._by_address.get(address)
        if found is None:
            return True
        if found[0]:
            return False
        found[1][found[2]] = 0
        del self._by_address[address]
        return True

    def close_all(self) -> bool:
        """At detach: every handle closed (the calls in flight waited for, bounded), the words of
        the channels whose calls all returned cleared; whether every one was."""
        clear = True
        for address, (handles, words, entry) in list(self._by_address.items()):
            running = False
            for channel in list(handles):
                channel.__class__ = _Closed
                running = channel._shut() or running
            if running:
                clear = False
                continue
            words[entry] = 0
            del self._by_address[address]
        return clear

    def inherit(self) -> None:
        """In a forked child: the parent's words (its registration's) are left as they are, and
        each inherited handle records itself under the child's own registration at its first call
        (:class:`_Inherited`), if its channel is still there."""
        for handles, _, _ in self._by_address.values():
            for channel in list(handles):
                channel._busy = []  # the parent's threads in flight are not this process's
                channel._shutting = False
                channel.__class__ = _Inherited
        self._by_address.clear()
        self.removing = threading.Lock()


def open_channel(heap: Heap, table: Table, name: str, capacity: int | None, keepalive: object,
                 lock_timeout: float, openings: Openings | None = None) -> Channel:
    """The channel ``name``, made with ``capacity`` (default 1024) if there is none, and counted as
    open by this process (``openings``: this attachment's) until closed. A channel whose remover
    died on the way is removed first (what it held is dropped, as its remover meant), then made
    anew.

    InvalidArgument if it exists with another capacity than one asked for; NotFound while a live
    worker, or the primary, is removing it."""
    check_name(PREFIX + name)
    wanted = DEFAULT_CAPACITY if capacity is None else check_capacity(capacity)
    owner = openings.owner(heap) if openings is not None else heap.owner_token()
    channel = _open(heap, table, name, capacity, wanted, keepalive, lock_timeout, openings, owner)
    if channel is not None:
        return channel
    try:  # a dead remover's: finished here, outside the writer lock (its drain takes the lock itself)
        remove_channel(heap, table, name, keepalive, lock_timeout)
    except NotFound:
        pass  # another worker finished it first
    except ChannelBusy as err:  # another remover (the primary, say) took it over meanwhile
        raise NotFound(f"channel {name!r} is being removed: {err}", name=name) from None
    channel = _open(heap, table, name, capacity, wanted, keepalive, lock_timeout, openings, owner)
    if channel is None:  # removed, made again, and left half removed again by a dead remover: rare
        raise NotFound(f"channel {name!r} is being removed by a worker that exited (remove_channel finishes it)",
                       name=name)
    return channel


def _open(heap: Heap, table: Table, name: str, capacity: int | None, wanted: int, keepalive: object,
          lock_timeout: float, openings: Openings | None, owner: Owner) -> Channel | None:
    """:func:`open_channel` under the writer lock; None for a channel a dead remover left."""
    zone_name = PREFIX + name
    with table.locked() as base:  # a remover checks the opener words under it
        record = base.record(zone_name)
        if record is None:
            used = set()
            for zone in base.zones:
                if zone.flags & ZONE_CHANNEL:
                    heap._ensure_mapped(zone.address)  # in a segment this process has not met yet, maybe
                    used.add(_index_of(zone))
            index = next((i for i in range(MAX_CHANNELS) if i not in used), None)
            if index is None:
                raise InvalidArgument(f"the instance has {MAX_CHANNELS} channels already", name=name)
            openers = table.layout.max_workers
            record = place(base, zone_name, channel_size(wanted, openers), 4096, table.iova_of, flags=ZONE_CHANNEL)
            heap._ensure_mapped(record.address)
            _initialize(record.address, record.size, wanted, index, openers)  # a free run, ours until the commit
            table.commit(base, insert=record)
        heap._ensure_mapped(record.address)
        channel = Channel(heap, table, name, record, keepalive, lock_timeout)
        remover = channel._words[REMOVER_AT // 8]
        if remover:
            alive = _remover(table, remover)
            if alive is None:
                return None
            raise NotFound(f"channel {name!r} is being removed by pid {alive.pid}", name=name)
        if capacity is not None and wanted != channel.capacity:
            raise InvalidArgument(f"channel {name!r} exists with capacity {channel.capacity}, not {capacity}",
                                  name=name)
        if openings is not None:
            openings.add(channel, owner)
    return channel


def _initialize(address: int, size: int, capacity: int, index: int, openers: int) -> None:
    _sys.zero(address, size)
    mem = _sys.memory(address, SLOTS_AT, None)
    _HEAD.pack_into(mem, 0, b"\0" * 8, capacity, capacity + 1, index, openers)
    _sys.mutex_init(address + PLOCK_AT)
    _sys.mutex_init(address + CLOCK_AT)
    mem[0:8] = MAGIC
    mem.release()


def _stamp(owner: Owner) -> int:
    """What an opener word records of a registration: its epoch (0 is recorded as 1: 0 is no one)."""
    return owner.epoch or 1


def _remover_word(owner: Owner) -> int:
    return ((owner.slot + 1) << 32) | _stamp(owner)


def _remover(table: Table, word: int) -> Owner | None:
    """The live worker (or primary) a remover word names, or None if it is gone."""
    if word == PRIMARY_REMOVER:
        from .identity import process_alive

        pid, start = table.owner()
        return Owner(NO_SLOT, 0, pid, start) if pid and process_alive(pid, start) else None
    return _registered(table, (word >> 32) - 1, word & 0xFFFFFFFF)


def _registered(table: Table, entry: int, epoch: int) -> Owner | None:
    """The live worker whose registration is entry ``entry`` at ``epoch`` (as opener and remover
    words record them; an epoch of 0 is recorded as 1), or None if that registration is gone."""
    from .identity import process_alive
    from .layout import WORKER

    if not 0 <= entry < table.layout.max_workers:
        return None
    pid, current, start = WORKER.unpack_from(table.memory, table.layout.workers_at + entry * WORKER.size)
    if not pid or (current or 1) != epoch or not process_alive(pid, start):
        return None
    return Owner(entry, current, pid, start)


def _live_openers(table: Table, words: memoryview) -> list[Owner]:
    """The live registrations among a channel's opener ``words``."""
    return [found for entry, word in enumerate(words) if word
            and (found := _registered(table, entry, word)) is not None]


def _index_of(record: ZoneRecord) -> int:
    """A channel's index, from its header (the channel's memory is mapped wherever its zone is seen)."""
    return int(_HEAD.unpack_from(_sys.memory(record.address, _HEAD.size, None), 0)[3])


class Channel:
    """A named channel of buffers: ``send``/``send_many`` hand buffers in, ``recv``/``recv_many``
    take them out (now the receiver's), ``arecv`` awaits one. Made by ``Secondary.channel``;
    ``close()`` (or a ``with`` block, or detaching) lets go of it: a channel some live worker
    holds open cannot be removed (``Secondary.remove_channel``)."""

    def __init__(self, heap: Heap, table: Table, name: str, record: ZoneRecord, keepalive: object,
                 lock_timeout: float) -> None:
        self.name = name
        self._heap = heap
        self._table = table
        self._address = a = record.address
        self._record = record
        self._mem = _sys.memory(a, record.size, keepalive)
        magic, capacity, slots, index, openers = _HEAD.unpack_from(self._mem, 0)
        if _bad_header(magic, capacity, slots, index, openers, record.size):
            raise TableCorrupt(f"channel {name!r} at {a:#x} has a bad header ({magic!r}, capacity {capacity}, "
                               f"{slots} slots, index {index}, {openers} opener words)")
        self.capacity = capacity
        self._full = capacity - room_to_wake(capacity)  # a receive that leaves at most this many wakes a sender
        self._slots = slots
        self._index = index
        self._words = self._mem[:SLOTS_AT].cast("Q")
        self._u32 = self._mem[:SLOTS_AT].cast("I")
        self._ring = self._mem[SLOTS_AT : SLOTS_AT + SLOT.size * slots].cast("Q")
        self._openers = _opener_words(self._mem, slots, openers)
        self._busy: list[None] = []  # one entry per call in flight on this handle (list ops are atomic)
        self._shutting = False  # closed: a call waiting on the channel gives up at its next wake
        self._plock, self._clock = a + PLOCK_AT, a + CLOCK_AT
        self._custody = custody(index, 0)  # | (seq & 0x7FFFF) << 12: the channel's holder word for seq
        self._lock_timeout = lock_timeout

    def __repr__(self) -> str:
        return f"<Channel {self.name!r} capacity {self.capacity}, {len(self)} queued>"

    def close(self) -> None:
        """Let go of this handle (idempotent): its calls raise HandleClosed from now on, and calls
        that other threads are waiting in give up (HandleClosed) at once. Once this process's
        last handle of the channel is closed and its calls have returned, another worker may
        remove the channel. A call still running after this attachment's lock timeout (plus a
        second) keeps the channel open until detach."""
        self.__class__ = _Closed  # new calls raise; calls in flight go on in Channel's code
        if not self._shut() and self._heap.openings is not None:
            self._heap.openings.close(self)

    def _shut(self) -> bool:
        """Mark this handle closed, wake the calls waiting in it, and wait (bounded) for every call
        in flight to return; whether one is still running."""
        self._shutting = True
        if not self._busy:
            return False
        _sys.futex_wake(self._address + TAIL_AT)
        _sys.futex_wake(self._address + HEAD_AT)
        deadline = time.monotonic() + self._lock_timeout + 1.0
        while self._busy and time.monotonic() < deadline:
            time.sleep(0.001)
        return bool(self._busy)

    def _closed(self) -> HandleClosed:
        return HandleClosed(f"this handle of channel {self.name!r} is closed; open the channel again with "
                            "shm.channel()", prefix=self.name)

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        """Messages queued now (a moment's reading)."""
        w = self._words
        return int(w[TAIL_AT // 8] - w[HEAD_AT // 8])

    # -- locks ---------------------------------------------------------------------------

    def _lock(self, at: int, producer: bool, err: int = -1) -> list[Buffer]:
        """Take one side's lock (``err``: what a trylock of it already answered); finishes what a
        dead holder left half done. The orphan a dead consumer left (a consumer's lock only), to
        be received first. ChannelBusy, naming the holder, after the lock timeout."""
        found = take(at, self._lock_timeout, self._repair_send if producer else self._repair_recv,
                     f"channel {self.name!r}: its {'producer' if producer else 'consumer'} lock", ChannelBusy,
                     self.name, err=err)
        return [] if found is None else found

    def _repair_send(self) -> list[Buffer]:
        """A producer died holding the lock: publish its last message if it had handed it over."""
        t = self._words[TAIL_AT // 8]
        at = 2 * (t % self._slots)
        address = self._ring[at]
        if address and self._holder_of(address) == custody(self._index, t):
            self._words[TAIL_AT // 8] = t + 1
            if self._words[_RWAITW]:
                self._wake(RWAIT_AT)
        return []

    def _repair_recv(self) -> list[Buffer]:
        """A consumer died holding the lock: the message it took but did not make its own is this
        receiver's now (returned as its first)."""
        h = self._words[HEAD_AT // 8]
        if not h:
            return []
        at = 2 * ((h - 1) % self._slots)
        address, size = self._ring[at], self._ring[at + 1]
        if not address or self._holder_of(address) != custody(self._index, h - 1):
            return []
        try:
            return [self._take(address, size, h - 1)]
        except TableCorrupt:  # not a block the channel holds after all: the message is dropped
            return []

    # -- who holds a buffer --------------------------------------------------------------

    def _holder_of(self, address: int) -> int:
        """The holder word of the buffer at ``address`` (a large one's: its custody, or 0)."""
        heap = self._heap
        arena = heap._arena_at(address)
        if arena is not None:
            found = arena.locate(address)
            return int(arena.holder[found[0]]) if found is not None else 0
        record = heap._large_record(address)
        if record is not None and record.flags & ZONE_HANDED:
            return int(record.owner.epoch)
        return 0

    def _take(self, address: int, size: int, seq: int) -> Buffer:
        """Make this process the holder of message ``seq``'s buffer (the channel holds it)."""
        heap = self._heap
        arena = heap._arenas.get(address & _ARENA_MASK)
        if arena is not None:  # the common case, the checks of Arena.locate inline
            span = (address - arena.base) >> SPAN_SHIFT
            c = arena.meta[CLASS_AT + span] - 1 if META_SPANS <= span < SPANS else -1
            if 0 <= c < _NCLASSES:
                i, rest = divmod(address & _SPAN_MASK, CLASS_SIZES[c])
                k = span * BLOCKS + i
                if not rest and i < _COUNTS[c] and size <= CLASS_SIZES[c]:
                    s = arena.state[k]
                    if (s == 1 or s == 2) and arena.holder[k] == self._custody | ((seq & 0x7FFFF) << 12):
                        arena.holder[k] = 0 if arena.heap is heap else heap.holder
                        buf = _new(Buffer)
                        buf.address = address
                        buf.size = size
                        buf._heap = heap
                        buf._slot = (address, k, arena, c)
                        buf._record = None
                        return buf
        arena = heap._arena_at(address)
        if arena is not None:
            found = arena.locate(address)
            if found is None or arena.holder[found[0]] != custody(self._index, seq) or \
                    size > CLASS_SIZES[found[1]] or arena.state[found[0]] in (FREE, REMOTE):
                raise self._bad(seq, address)
            k, c = found
            arena.holder[k] = 0 if arena.heap is heap else heap.holder_word()
            return Buffer(heap, address, size, (address, k, arena, c), None)
        table = self._table
        with table.locked() as base:
            record = heap._large_record(address)
            if record is None or not record.flags & ZONE_HANDED or record.owner.epoch != custody(self._index, seq):
                raise self._bad(seq, address)
            owned = record._replace(owner=heap.owner_token(), flags=record.flags & ~(ZONE_HANDED | ZONE_DISOWNED))
            table.commit(base, remove=record, insert=owned)
        return Buffer(heap, address, owned.size, None, owned)

    def _hand(self, buf: Buffer, seq: int) -> None:
        """Make the channel the holder of ``buf`` as message ``seq`` (one store, or one commit)."""
        word = custody(self._index, seq)
        slot = buf._slot
        if slot is not None:
            slot[2].holder[slot[1]] = word
            return
        record = buf._record
        assert isinstance(record, ZoneRecord)
        table = self._table
        with table.locked() as base:
            current = base.by_name.get(record.name)
            if current is None or current.address != record.address:
                raise InvalidArgument(f"the allocation at {record.address:#x} is no longer live", name="buf")
            table.commit(base, remove=current,
                         insert=current._replace(owner=Owner(NO_SLOT, word, 0, 0), flags=current.flags | ZONE_HANDED))

    def _drain(self) -> int:
        """Free every buffer the channel holds, for its removal: under both locks (finishing what
        a dead holder of either left), each message taken as a receiver takes it, then freed.
        How many were freed."""
        dropped = 0
        orphans = self._lock(self._plock, True)  # a dead producer's handed-over message: published
        try:
            orphans = self._lock(self._clock, False)  # a dead consumer's half-taken message: ours
            try:
                for buf in orphans:
                    buf.free()
                    dropped += 1
                words, ring, slots = self._words, self._ring, self._slots
                h, t = words[HEAD_AT // 8], words[TAIL_AT // 8]
                while h < t:  # as recv: advance head, then take (a death between: the orphan above)
                    at = 2 * (h % slots)
                    address, size = ring[at], ring[at + 1]
                    words[HEAD_AT // 8] = h + 1
                    if address:
                        try:
                            buf = self._take(address, size, h)
                        except TableCorrupt:  # not a block the channel holds after all: nothing to free
                            pass
                        else:
                            buf.free()
                            dropped += 1
                    h += 1
                dropped += self._sweep()
            finally:
                _unlock(self._clock)
        finally:
            _unlock(self._plock)
        return dropped

    def _sweep(self) -> int:
        """Free every small block still in this channel's custody, whatever the ring says, as the
        primary does when it finishes a removal (:func:`finish_dead_removal`): a primary killed
        while finishing this removal may have freed some without changing the ring, or left a
        half-sent or half-taken message unrepaired. How many. Call under both locks, the channel
        marked by this process. ChannelBusy if an arena's gate stays taken past the lock timeout
        (the channel stays marked: a later removal, or the primary, finishes it)."""
        heap = self._heap
        directory = heap.directory()
        if directory is None:
            return 0
        locks = heap._byte_locks()
        freed = 0
        for i, e in directory.entries():
            if e[0]:
                with heap._lock:
                    arena = heap._arena(i, e[0])
                n = release_custody(arena, locks, self._index, self._lock_timeout)
                if n is None:
                    raise ChannelBusy(f"channel {self.name!r}: arena {i}'s gate stayed taken for "
                                      f"{self._lock_timeout:g} s while its removal freed what the channel holds; "
                                      "remove_channel again finishes it",
                                      path=self.name, pid=None, stopped=False, waited=self._lock_timeout)
                freed += n
        return freed

    def _check_held(self, buf: object) -> Buffer:
        """``buf`` if this process holds it (so it may send it); else InvalidArgument."""
        if not isinstance(buf, Buffer):
            raise InvalidArgument(f"a channel sends Buffers (from shm.alloc or a receive), not "
                                  f"{type(buf).__name__}", name="buf")
        heap = self._heap
        if buf._heap is not heap:
            raise InvalidArgument("this Buffer belongs to another attachment", name="buf")
        slot = buf._slot
        if slot is not None:
            arena, k = slot[2], slot[1]
            s = arena.state[k]
            held = arena.holder[k]
            mine = (arena.heap is heap and not held) or (held and held == heap.holder)
            if (s == 1 or s == 2) and mine:
                return buf
            raise InvalidArgument(f"the allocation at {buf.address:#x} is not this process's to send "
                                  "(freed, or held by another)", name="buf")
        if buf._record is SENT:
            raise InvalidArgument(f"the Buffer at {buf.address:#x} was sent already: its receiver holds it",
                                  name="buf")
        if buf._record is None:
            raise InvalidArgument(f"the Buffer at {buf.address:#x} was freed", name="buf")
        return buf

    def _bad(self, seq: int, address: int) -> TableCorrupt:
        return TableCorrupt(f"channel {self.name!r}: message {seq} names {address:#x}, which the channel does "
                            "not hold; the message was dropped")

    # -- sending ------------------------------------------------------------------------------

    def send(self, buf: Buffer, timeout: float | None = None) -> None:
        """Hand ``buf`` over: from now on the channel holds it, then its receiver. Waits while the
        channel is full, at most ``timeout`` seconds (None: as long as it takes; 0: not at all),
        then ChannelTimeout, nothing sent."""
        busy = self._busy  # calls in flight: close() waits for them before letting go
        busy.append(None)
        try:
            slot = getattr(buf, "_slot", None)
            heap = self._heap
            if slot is None or timeout is not None or buf._heap is not heap:
                self.send_many((buf,), timeout)  # large, or a wait with a bound, or an error to say
                return
            arena, k = slot[2], slot[1]
            s = arena.state[k]
            held = arena.holder[k]
            if not ((s == 1 or s == 2) and ((arena.heap is heap and not held) or (held and held == heap.holder))):
                self.send_many((buf,), timeout)  # says what is wrong
                return
            # the common case, as send_many does it, inline: a small buffer, room in the ring
            lock = self._plock
            err = _trylock(lock)
            if err:
                self._lock(lock, True, err)
            words = self._words
            waited = False
            try:
                t = words[_TAILW]
                if t - words[_HEADW] >= self.capacity:
                    waited = True
                    t = self._wait_room(t, None, None)
                at = 2 * (t % self._slots)
                ring = self._ring
                ring[at] = buf.address
                ring[at + 1] = buf.size
                arena.holder[k] = self._custody | ((t & 0x7FFFF) << 12)  # the channel holds it from here
                words[_TAILW] = t + 1  # published
            finally:
                _unlock(lock)
                if waited:
                    self._pass_on()
            buf._slot = None
            buf._record = SENT
            if self._words[_RWAITW]:
                self._wake(RWAIT_AT)
        finally:
            busy.pop()

    def send_many(self, bufs: Iterable[Buffer], timeout: float | None = None) -> int:
        """Send each of ``bufs`` in order, under one lock; waits for room as :meth:`send` does.
        Each is sent or not, in order: on ChannelTimeout the ones before were sent (their handles
        say so: ``buf.sent``); the number sent otherwise (all)."""
        busy = self._busy  # calls in flight: close() waits for them before letting go
        busy.append(None)
        try:
            heap = self._heap
            checked: list[tuple[Buffer, Any, int]] = []  # (buffer, its arena's holder words or None, index)
            for buf in bufs:  # all checked before any is sent
                slot = getattr(buf, "_slot", None)
                if slot is not None and buf._heap is heap:
                    arena, k = slot[2], slot[1]
                    s = arena.state[k]
                    held = arena.holder[k]
                    if (s == 1 or s == 2) and ((arena.heap is heap and not held) or (held and held == heap.holder)):
                        checked.append((buf, arena.holder, k))
                        continue
                checked.append((self._check_held(buf), None, 0))
            timeout = check_timeout(timeout)
            deadline = None if timeout is None else time.monotonic() + timeout
            words, ring, slots, capacity, word = self._words, self._ring, self._slots, self.capacity, self._custody
            sent = 0
            waited = False
            lock = self._plock
            self._lock(lock, True)
            try:
                for buf, holders, k in checked:
                    t = words[_TAILW]
                    if t - words[_HEADW] >= capacity:
                        waited = True
                        t = self._wait_room(t, deadline, timeout)
                    at = 2 * (t % slots)
                    ring[at] = buf.address
                    ring[at + 1] = buf.size
                    if holders is not None:
                        holders[k] = word | ((t & 0x7FFFF) << 12)  # the channel holds it from here
                    else:
                        self._hand(buf, t)
                    words[_TAILW] = t + 1  # published
                    buf._slot = None
                    buf._record = SENT
                    sent += 1
            finally:
                _sys.mutex_unlock(lock)
                if waited:
                    self._pass_on()
                if sent and self._words[_RWAITW]:
                    self._wake(RWAIT_AT)
            return sent
        finally:
            busy.pop()

    # -- sleepers ----------------------------------------------------------------------------

    def _sleep_in(self, at: int) -> int:
        """Count this thread among one side's sleepers (``at``: RWAIT_AT or SWAIT_AT), under that
        side's lock; the period it counted in. Counts two periods older than this one are dead
        sleepers' (a live one counts itself anew within a second), and are cleared."""
        u32 = self._u32
        i = at // 4
        now = _period()
        last = u32[i + 2]
        if last != now:
            if (now - last) & 0xFFFFFFFF >= 2:
                u32[i] = u32[i + 1] = 0
            else:
                u32[i + (now & 1)] = 0  # the half of the period before the last
            u32[i + 2] = now  # before the count: a waker that reads the count reads this too (TSO)
        u32[i + (now & 1)] += 1
        return now

    def _sleep_out(self, at: int, period: int) -> None:
        """Uncount this thread, counted in ``period``, under that side's lock: unless its half was
        cleared since (the latest count two periods or more after its own)."""
        u32 = self._u32
        i = at // 4
        if (u32[i + 2] - period) & 0xFFFFFFFF < 2:
            half = i + (period & 1)
            if u32[half]:
                u32[half] -= 1

    def _asleep(self, at: int) -> bool:
        """Whether one side may have a sleeper to wake, its counts already read as nonzero: not if
        the latest count is two periods old (only dead sleepers' counts are left)."""
        return (_period() - self._u32[at // 4 + 2]) & 0xFFFFFFFF < 2

    def _wake(self, at: int) -> None:
        """Wake one side's sleepers, its counts read as nonzero (after this side published and
        released its lock), unless only dead sleepers' are left: every receiver (the message may
        be for any, the arecv waker among them), or one sender (it wakes the next: _pass_on)."""
        if self._asleep(at):
            if at == RWAIT_AT:
                _sys.futex_wake(self._address + TAIL_AT)
            else:
                _sys.futex_wake(self._address + HEAD_AT, 1)

    def _pass_on(self) -> None:
        """After a send that waited for room (the producer lock released): a receiver wakes one
        sleeping sender per receive, so the one it woke wakes the next if it left room behind
        (or gave up). A sender killed in between leaves the next asleep until the next receive,
        or at most its 1 s sleep."""
        words = self._words
        if words[_SWAITW] and words[_TAILW] - words[_HEADW] < self.capacity:
            self._wake(SWAIT_AT)

    def _wait_room(self, t: int, deadline: float | None, timeout: float | None) -> int:
        """Sleep (the producer lock released) until a receiver makes room; the tail then."""
        words = self._words
        lock = self._plock  # no spin here: a full ring waits for a slower receiver, which needs the CPU
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise ChannelTimeout(f"channel {self.name!r} stayed full ({self.capacity} messages) for "
                                     f"{timeout:g} s; nothing more was sent", channel=self.name, full=True,
                                     waited=timeout)
            head = words[HEAD_AT // 8]
            period = self._sleep_in(SWAIT_AT)
            _sys.mutex_unlock(lock)
            try:
                if words[_RWAITW]:  # what a batch sent before it had to wait
                    self._wake(RWAIT_AT)
                if t - head >= self.capacity:
                    _sys.futex_wait(self._address + HEAD_AT, head, ROOM_NAP if left is None else min(left, ROOM_NAP))
            finally:
                self._lock(lock, True)
                self._sleep_out(SWAIT_AT, period)
            if self._shutting:  # closed by another thread while this one waited
                raise self._closed()
            t = words[TAIL_AT // 8]
            if t - words[HEAD_AT // 8] < self.capacity:
                return int(t)

    # -- receiving ----------------------------------------------------------------------------

    def recv(self, timeout: float | None = None) -> Buffer:
        """The next buffer, now this process's. Waits while the channel is empty, at most
        ``timeout`` seconds (None: as long as it takes; 0: not at all), then ChannelTimeout."""
        busy = self._busy  # calls in flight: close() waits for them before letting go
        busy.append(None)
        try:
            heap = self._heap
            if not heap.holder:
                return self.recv_many(1, timeout)[0]
            if timeout is not None:
                timeout = check_timeout(timeout)
            lock = self._clock
            got: Buffer | None = None
            err = _trylock(lock)
            if err:
                orphan = self._lock(lock, False, err)
                if orphan:
                    got = orphan[0]
            words = self._words
            try:
                if got is None:
                    h = words[_HEADW]
                    if h == words[_TAILW]:
                        h, orphan = self._wait_message(h, timeout)
                        if orphan:
                            got = orphan[0]
                    if got is None:
                        at = 2 * (h % self._slots)
                        ring = self._ring
                        address, size = ring[at], ring[at + 1]
                        words[_HEADW] = h + 1  # taken: the holder word below makes it ours
                        got = self._take(address, size, h)
            finally:
                _unlock(lock)
                if words[_SWAITW] and words[_TAILW] - words[_HEADW] <= self._full:
                    self._wake(SWAIT_AT)
            return got
        finally:
            busy.pop()

    def recv_many(self, most: int = 64, timeout: float | None = None) -> list[Buffer]:
        """Up to ``most`` buffers (at least one: waits for the first as :meth:`recv` does)."""
        busy = self._busy  # calls in flight: close() waits for them before letting go
        busy.append(None)
        try:
            if isinstance(most, bool) or not isinstance(most, int) or most < 1:
                raise InvalidArgument(f"most must be a positive int, not {most!r}", name="most")
            timeout = check_timeout(timeout)
            self._heap.holder_word()  # before the lock: a first claim takes the writer lock, and may grow
            words, ring, slots = self._words, self._ring, self._slots
            lock = self._clock
            got = self._lock(lock, False)
            try:
                h = words[HEAD_AT // 8]
                if not got and h == words[TAIL_AT // 8]:
                    h, got = self._wait_message(h, timeout)
                tail = words[TAIL_AT // 8]
                while len(got) < most and h < tail:
                    at = 2 * (h % slots)
                    address, size = ring[at], ring[at + 1]
                    words[HEAD_AT // 8] = h + 1  # taken: the holder word below makes it ours
                    try:
                        got.append(self._take(address, size, h))
                    except TableCorrupt:
                        if not got:
                            raise
                        break
                    h += 1
            finally:
                _sys.mutex_unlock(lock)
                if got and words[_SWAITW] and words[_TAILW] - words[_HEADW] <= self._full:
                    self._wake(SWAIT_AT)
            return got
        finally:
            busy.pop()

    def _wait_message(self, h: int, timeout: float | None) -> tuple[int, list[Buffer]]:
        """Sleep (the consumer lock released) until a message is published: the head then, and
        the message a consumer that died meanwhile left half taken, if one did (this one's now)."""
        words = self._words
        if timeout != 0 and _spin(words, _TAILW, h):
            return h, []
        lock = self._clock
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise ChannelTimeout(f"channel {self.name!r} stayed empty for {timeout:g} s", channel=self.name,
                                     full=False, waited=timeout)
            tail = words[TAIL_AT // 8]
            period = self._sleep_in(RWAIT_AT)
            _sys.mutex_unlock(lock)
            try:
                if tail == h:
                    _sys.futex_wait(self._address + TAIL_AT, tail, 1.0 if left is None else min(left, 1.0))
            finally:
                orphan = self._lock(lock, False)
                self._sleep_out(RWAIT_AT, period)
            if self._shutting and not orphan:  # closed by another thread while this one waited
                raise self._closed()
            h = words[HEAD_AT // 8]
            if orphan or h != words[TAIL_AT // 8]:
                return int(h), orphan

    async def arecv(self, timeout: float | None = None) -> Buffer:
        """:meth:`recv` for asyncio: waits without blocking the event loop (one thread per
        channel in this process watches for messages, however many coroutines wait)."""
        import asyncio

        timeout = check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return self.recv(timeout=0)
            except ChannelTimeout:
                pass
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise ChannelTimeout(f"channel {self.name!r} stayed empty for {timeout:g} s", channel=self.name,
                                     full=False, waited=timeout)
            from ._waker import waker_for

            waiter = waker_for(self).wait(asyncio.get_running_loop(), int(self._words[TAIL_AT // 8]))
            try:
                got = await asyncio.wait_for(waiter, left)
            except TimeoutError:
                continue
            if got:  # a message a dead receiver left half taken: the waker took it for this coroutine
                return got[0]  # type: ignore[no-any-return]


SPIN_S = 50e-6  # a waiter watches the other side's word this long before it sleeps (see _spin)


class _Closed(Channel):
    """A closed handle (its class once closed): every call raises HandleClosed, and touches
    nothing (the channel's memory may be another zone's once the channel is removed)."""

    def __repr__(self) -> str:
        return f"<Channel {self.name!r} closed>"

    def __len__(self) -> int:
        raise self._closed()

    def send(self, buf: Buffer, timeout: float | None = None) -> None:
        raise self._closed()

    def send_many(self, bufs: Iterable[Buffer], timeout: float | None = None) -> int:
        raise self._closed()

    def recv(self, timeout: float | None = None) -> Buffer:
        raise self._closed()

    def recv_many(self, most: int = 64, timeout: float | None = None) -> list[Buffer]:
        raise self._closed()

    async def arecv(self, timeout: float | None = None) -> Buffer:
        raise self._closed()

    def close(self) -> None:
        pass


class _Inherited(Channel):
    """A handle a forked child inherited (its class there): its first call records it under the
    child's own registration, the channel still being the one it was (else HandleClosed), and it
    is a plain Channel from then on. Until then the parent's word holds the channel, for the
    parent's handle."""

    def _adopt(self) -> None:
        openings = self._heap.openings
        if openings is None:
            _become(self, _Closed)
            raise self._closed()
        owner = openings.owner(self._heap)  # first: a child's first registration takes the writer lock
        with self._table.locked() as base:
            if base.record(PREFIX + self.name) != self._record or self._words[REMOVER_AT // 8]:
                _become(self, _Closed)  # removed since the fork (its memory may be another zone's now)
                raise self._closed()
            openings.add(self, owner)
            _become(self, Channel)

    def __len__(self) -> int:
        self._adopt()
        return len(self)

    def send(self, buf: Buffer, timeout: float | None = None) -> None:
        self._adopt()
        return self.send(buf, timeout)

    def send_many(self, bufs: Iterable[Buffer], timeout: float | None = None) -> int:
        self._adopt()
        return self.send_many(bufs, timeout)

    def recv(self, timeout: float | None = None) -> Buffer:
        self._adopt()
        return self.recv(timeout)

    def recv_many(self, most: int = 64, timeout: float | None = None) -> list[Buffer]:
        self._adopt()
        return self.recv_many(most, timeout)

    async def arecv(self, timeout: float | None = None) -> Buffer:
        self._adopt()
        return await self.arecv(timeout)

    def close(self) -> None:
        _become(self, _Closed)  # never recorded in this process: nothing to let go of


def _become(handle: Channel, kind: type[Channel]) -> None:
    """Change what ``handle`` is (open, closed, inherited): its class, so the calls of an open
    one pay nothing for the others' checks."""
    handle.__class__ = kind


def remove_channel(heap: Heap, table: Table, name: str, keepalive: object, lock_timeout: float) -> int:
    """Remove the channel ``name``: every buffer still in it freed, its zone given back to the
    instance; the number of messages dropped.

    ChannelBusy, changing nothing, while a live worker (this process included) holds a handle
    of it open, naming them, or while another live worker is removing it. NotFound if there is
    no such channel. A channel whose remover died on the way is finished here."""
    check_name(PREFIX + name)
    if heap.openings is None:
        heap.openings = Openings()
    openings = heap.openings
    with openings.removing:  # a second removal here would pass for this one: one at a time
        return _remove(heap, table, name, keepalive, lock_timeout, openings.owner(heap))


def _remove(heap: Heap, table: Table, name: str, keepalive: object, lock_timeout: float, owner: Owner) -> int:
    zone_name = PREFIX + name
    mine = _remover_word(owner)
    heap.holder_word()  # before the writer lock: a first claim takes it
    with table.locked() as base:  # openers register under it: none can come in between
        record = base.record(zone_name)
        if record is None or not record.flags & ZONE_CHANNEL:
            raise NotFound(f"no channel named {name!r}", name=name)
        heap._ensure_mapped(record.address)
        channel = Channel(heap, table, name, record, keepalive, lock_timeout)
        if heap.openings is not None:
            heap.openings.forget_unused(record.address)  # this process's word, if all its handles are gone
        holders = _live_openers(table, channel._openers)
        if holders:
            from .identity import describe_holder, process_state

            pids = sorted({o.pid for o in holders})
            here = " (this process among them: close its handles first)" if owner.pid in pids else ""
            raise ChannelBusy(f"channel {name!r} is open in {len(pids)} live worker(s): "
                              f"{', '.join(describe_holder(p) for p in pids[:8])}{here}; a channel is removed "
                              "once every handle of it is closed (Channel.close(), or the worker detaches)",
                              path=name, pid=pids[0], stopped=process_state(pids[0]) in ("T", "t"), waited=0.0)
        remover = channel._words[REMOVER_AT // 8]
        if remover and remover != mine:
            other = _remover(table, remover)
            if other is not None:
                raise ChannelBusy(f"channel {name!r} is being removed by pid {other.pid}", path=name,
                                  pid=other.pid, stopped=False, waited=0.0)
        channel._words[REMOVER_AT // 8] = mine  # from now on no one opens it
    dropped = channel._drain()
    with table.locked() as base:
        current = base.record(zone_name)
        if current == record and channel._words[REMOVER_AT // 8] == mine:  # still the channel this marked
            dropped += _commit_removal(table, base, record, channel._index)
    channel.__class__ = _Closed
    return dropped


def finish_dead_removal(table: Table, record: ZoneRecord, keepalive: object,
                        release: Callable[[int], int | None], wait: float) -> int | None:
    """The primary's part: finish the removal of the channel ``record`` if its remover died on the
    way; the number of buffers freed, or None if there was nothing to finish (or not now: a lock
    held longer than ``wait`` seconds, tried again at the next look). ``release(index)`` frees the
    small blocks that the channel of that index holds (the caller has the arenas): how many, or
    None if it could not free them all now.

    The primary first writes its own remover word, under the writer lock, so that no worker
    finishes the same removal at the same time (a worker that meets the word while the
    primary runs is told the channel is being removed, as by a live worker). Then it takes
    both of the channel's locks, frees every block the channel holds (whatever the ring says:
    each holder word names the channel, and a half-sent or half-taken message too), releases
    the locks, and commits the removal of the large buffers it held and of its zone. A primary
    killed on the way leaves its word; the next one (or a worker while none runs) finishes. The
    ring is left as it was, and a dead holder's lock is only marked consistent, not repaired: a
    worker that finishes after a dead primary frees by holder word too (``Channel._sweep``,
    :func:`_commit_removal`), so nothing the ring no longer names is left behind.
    Only the primary the table names as its owner does this: workers look there to tell whether
    the primary that wrote the word runs (an adopting primary is named once it is ready)."""
    if table.owner()[0] != os.getpid() or record.size < SLOTS_AT:
        return None  # not this process's to do; or no channel's header: the checker says so
    if not _c_uint64.from_address(record.address + REMOVER_AT).value:
        return None  # the common case, read cheaply: no removal under way (a view costs ~20 us)
    mem = _sys.memory(record.address, record.size, keepalive)
    magic, capacity, slots, index, count = _HEAD.unpack_from(mem, 0)
    if _bad_header(magic, capacity, slots, index, count, record.size):
        return None  # the checker says so
    words = mem[:SLOTS_AT].cast("Q")
    word = words[REMOVER_AT // 8]
    if not word or (word != PRIMARY_REMOVER and _remover(table, word) is not None):
        return None
    with table.locked() as base:  # as a worker's remove_channel: its checks, then the mark
        if base.record(record.name) != record or words[REMOVER_AT // 8] != word:
            return None
        if _live_openers(table, _opener_words(mem, slots, count)):
            return None  # a live worker has it open (a remover checked none had): the checker says so
        words[REMOVER_AT // 8] = PRIMARY_REMOVER
    dropped = 0
    taken: list[int] = []
    try:
        for at in (record.address + PLOCK_AT, record.address + CLOCK_AT):
            err = _sys.mutex_lock(at, wait)
            if err == _sys.EOWNERDEAD:
                _sys.mutex_consistent(at)  # what its dead holder left half done is freed below
            elif err:
                return None  # held (by whom? no live worker has the channel open): the next look
            taken.append(at)
        released = release(index)
        if released is None:
            return None  # an arena's gate stayed taken: some are left, for the next look
        dropped = released  # the ring is left as it is: a worker that finishes after a dead primary sweeps too
    finally:
        for at in reversed(taken):
            _sys.mutex_unlock(at)
    with table.locked() as base:
        if base.record(record.name) != record or words[REMOVER_AT // 8] != PRIMARY_REMOVER:
            return None  # finished by a worker meanwhile (no primary was seen running)
        dropped += _commit_removal(table, base, record, index)
    return dropped


def _commit_removal(table: Table, base: Snapshot, record: ZoneRecord, index: int) -> int:
    """Commit the removal of the large buffers that channel ``index`` holds (never a pinned one),
    then of its zone ``record`` (call under the writer lock, with the snapshot it gave); how many
    buffers. The large ones first: a death between commits leaves the channel marked, and
    whoever finishes it sweeps again."""
    freed = 0
    for zone in base.zones:
        held = zone.owner.epoch
        if zone.flags & ZONE_HANDED and held & CUSTODY and held & 0xFFF == index and held != PINNED:
            base = table.commit(base, remove=zone)
            freed += 1
    table.commit(base, remove=record)
    return freed


def _spin(words: memoryview, at: int, seen: int) -> bool:
    """Watch ``words[at]`` for at most SPIN_S seconds; whether it moved from ``seen``.

    A futex wake-up costs the sleeper 20-30 us on a VM, and the waker a system call: when the
    other side is busy on another core, its next message (or the room it makes) comes sooner
    than that, so a waiter first looks for a moment, holding its side's lock (the other side's
    lock is another), as adaptive mutexes do. Bounded: then it sleeps in the kernel."""
    until = _perf() + SPIN_S
    while words[at] == seen:
        if _perf() > until:
            return False
    return True
