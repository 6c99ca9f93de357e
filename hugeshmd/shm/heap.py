"""The shared heap: malloc and free from any worker, in per-worker arenas, crash-consistent.

How it is laid out (design and measurements: ``docs/heap-design.md``):

* The **directory** is a zone named ``.heap``: a header, then one 64-byte entry
  per arena (its address, its state, its owner's token, what reclaim took from
  it). The first worker that allocates makes it, under the table's writer lock.
* An **arena** is a zone named ``.arena.<i>`` of :data:`ARENA` bytes (2 MiB,
  aligned to its size). Its first four 64 KiB spans hold its metadata; the other
  28 are carved, one at a time, into blocks of one size class (64 B to 64 KiB,
  multiples of 64, so every block is 64-byte aligned). Each block has one state
  byte (:data:`FREE`, :data:`LIVE`, :data:`DISOWNED`, :data:`REMOTE`), a
  16-bit *slack* (class size minus the size asked for) and a 32-bit *holder*.
* A block's **holder** is 0 while its arena's owner holds it (all a heap that
  never hands a buffer on ever sees). A block handed through a channel
  (:mod:`hugeshmd.shm.channel`) names who holds it now: the channel, at one
  sequence number (:func:`custody`), or the worker that received it, by that
  worker's first arena and the claim of it (:func:`worker_holder`). One store
  moves a block from one holder to the next. A handed block is not its arena
  owner's: reclaim of that arena keeps it; the primary frees it when its holder
  dies (:func:`release_held`).
* A **large** allocation (over 64 KiB, or aligned beyond what a class gives) is
  a zone named ``.h.<pid>.<n>``, flagged ZONE_HEAP, owned by its maker.

Who writes what, so that no lock is needed on the common path and a process
killed at any instruction leaves the heap consistent:

* An arena has one owner at a time: the process holding the OFD lock on byte
  :func:`liveness` ``(i)`` of the table file (L). Only the owner writes a state
  byte to LIVE or back to FREE, carves spans, and writes slack; its free lists
  are private (a Python list per class), so a dead owner's lists vanish with it
  and the state bytes alone stay true. One store publishes each alloc and free.
* Any other process frees a block by writing REMOTE over LIVE or DISOWNED,
  holding the arena's gate (R, :func:`gate`) shared; the owner collects REMOTE
  bytes when a list runs dry (mimalloc's deferred free, without its CAS).
* Reclaim (of a dead owner's arena) holds L (proof that no live process owns
  it: the kernel dropped the dead owner's lock) and R exclusively, so no remote
  free is half done; it turns LIVE and REMOTE into FREE, keeps DISOWNED, and is
  idempotent: a reclaimer killed midway is simply followed by another.
* Entries and arena headers change only under L; a new arena's memory, under
  the table's writer lock as well (its zone is committed first and published in
  the entry last, so a claimer killed in between leaves a zone the next claimer
  of that entry takes over).
"""

from __future__ import annotations

import _thread
import os
import struct

from .. import _fork, _sys
from ..errors import InvalidArgument, NotFound, TableBusy, TableCorrupt, TableFull
from .buffer import Buffer
from .layout import NOBODY, ZONE_DISOWNED, ZONE_HEAP, ZONE_HEAP_META, Owner, ZoneRecord
from .lock import ByteLock
from .snapshot import Snapshot
from .table import Table
from .zones import check_align, check_size, growing, place

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any

__all__ = [
    "ARENA", "SPAN", "CLASS_SIZES", "MAX_SMALL", "FREE", "LIVE", "DISOWNED", "REMOTE", "DIRECTORY",
    "Arena", "Directory", "Heap", "liveness", "gate", "reclaim_arena", "release_held", "release_custody",
    "class_for", "custody", "worker_holder", "holder_arena", "holder_gone", "CUSTODY", "PINNED", "ZONES_CUSTODY",
    "named_zone_held",
]  # fmt: skip

# -- sizes ---------------------------------------------------------------------------------

ARENA_SHIFT = 21
ARENA = 1 << ARENA_SHIFT  # 2 MiB, aligned to its size: an address's arena is address & ~(ARENA - 1)
SPAN_SHIFT = 16
SPAN = 1 << SPAN_SHIFT  # 64 KiB: blocks of one class
SPANS = ARENA // SPAN  # 32
META_SPANS = 4  # spans 0 to 3 hold the arena's metadata
BLOCKS = SPAN // 64  # state bytes per span: as many as the smallest class has blocks
CLASS_SIZES = (64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192,
               12288, 16384, 24576, 32768, 49152, 65536)
MAX_SMALL = CLASS_SIZES[-1]
_COUNTS = tuple(SPAN // c for c in CLASS_SIZES)
# class index for a size of 1..MAX_SMALL bytes, by (size + 63) >> 6
_CLASS_OF = [0] * (MAX_SMALL // 64 + 1)
for _i in range(1, len(_CLASS_OF)):
    _CLASS_OF[_i] = next(c for c, s in enumerate(CLASS_SIZES) if s >= _i * 64)
DEFAULT_ALIGN = 64

# -- state bytes ---------------------------------------------------------------------------

FREE, LIVE, DISOWNED, REMOTE = 0, 1, 2, 3
_RECLAIM = bytes.maketrans(bytes([LIVE, REMOTE]), bytes([FREE, FREE]))  # DISOWNED stays

# -- an arena's metadata (its first META_SPANS spans) ------------------------------------------

ARENA_MAGIC = 0x324E5241  # "ARN2": with holders (an "ARN1" arena, of version 1, had none)
_ARENA_HEAD = struct.Struct("<II")  # magic, directory index
HINT_AT = 64  # a u32, on a line of its own: a counter remote freers bump; the owner only reads it
# (a byte wrapped: 256 frees between two looks of the owner, as a pipeline of batches of 32 makes, read
# as none, and the owner carved new spans while its freed blocks waited)
CLASS_AT = 128  # one byte per span: 0 unused, else class index + 1
STATE_AT = 1024  # BLOCKS state bytes per span
SLACK_AT = STATE_AT + SPANS * BLOCKS  # a u16 per block
HOLDER_AT = SLACK_AT + SPANS * BLOCKS * 2  # a u32 per block: who holds a handed block (0: the owner)
META = HOLDER_AT + SPANS * BLOCKS * 4
assert META <= META_SPANS * SPAN

# -- the directory: zone ".heap" --------------------------------------------------------------

DIRECTORY = ".heap"
DIR_MAGIC = b"HSHMHEAP"
DIR_VERSION = 2  # 2: arenas of four metadata spans, with holders
# magic, version, max arenas, arena size, claims, (reserved), large allocations reclaimed and their bytes
_DIR_HEAD = struct.Struct("<8sIIQQQQQ8x")
CLAIMS_AT = 24  # u64 in the header: bumped by each claim, so the primary sees new owners cheaply
# 32: growths, never written (the primary counts its segments); the counters below: by the primary only
LARGE_RECLAIMED_AT = 40
LARGE_RECLAIMED_BYTES_AT = 48
ENTRY = struct.Struct("<QIIIIIIQQQ8x")  # address, state, slot, epoch, pid, claims, -, start, reclaimed n, bytes
assert ENTRY.size == 64 and _DIR_HEAD.size % 8 == 0  # Directory.write stores each field in its own aligned word
E_FREE, E_OWNED, E_RECLAIMING = 0, 1, 2
ENTRY_STATES = {E_FREE: "free", E_OWNED: "owned", E_RECLAIMING: "reclaiming"}
MAX_ARENAS = 4096
_MASK64 = 2**64 - 1

# -- the arena locks: bytes of the table file far past its end -------------------------------

_LOCKS_AT = 1 << 40


def liveness(i: int) -> int:
    """Offset of arena ``i``'s L lock: held exclusively by its owner for as long as it owns it."""
    return _LOCKS_AT + 2 * i


def gate(i: int) -> int:
    """Offset of arena ``i``'s R lock: shared by remote freers, exclusive for reclaim."""
    return _LOCKS_AT + 2 * i + 1


CUSTODY = 1 << 31  # a holder word with this bit: a channel holds the block


def custody(channel: int, seq: int) -> int:
    """The holder word of a block that channel ``channel`` holds as its message number ``seq``."""
    return CUSTODY | (channel & 0xFFF) | ((seq & 0x7FFFF) << 12)


PINNED = custody(4095, 0x7FFFF)  # the holder word of an allocation its pins own (hugeshmd.shm.pins)
ZONES_CUSTODY = 4094  # the custody index of named zones' blocks (hugeshmd.shm.names); channels use those below


def named_zone_held(word: int) -> bool:
    """Whether a holder word is a name entry's: its block is a named zone (hugeshmd.shm.names)."""
    return bool(word & CUSTODY) and word & 0xFFF == ZONES_CUSTODY


def worker_holder(arena: int, claims: int) -> int:
    """The holder word of a block a worker received: its first arena's index, and the claim
    of that arena (the directory entry's claims counter) that made it its owner."""
    return (arena + 1) | ((claims & 0x7FFF) << 16)


def holder_arena(word: int) -> tuple[int, int]:
    """(arena index, claims & 0x7FFF) of a worker's holder word."""
    return (word & 0xFFFF) - 1, (word >> 16) & 0x7FFF


def holder_gone(directory: Directory, i: int, claim: int, dead: Callable[[int, int], bool]) -> bool:
    """Whether the worker named by a holder word's (arena ``i``, ``claim``) is gone: the arena is
    no arena, has no owner, another claim of it, or an owner that ``dead(pid, start)`` says is."""
    if not 0 <= i < directory.max_arenas:
        return True
    e = directory.entry(i)
    return e[1] == E_FREE or (e[5] & 0x7FFF) != claim or bool(dead(e[4], e[7]))


GATE_WAIT_S = 1.0  # a remote free waits this long for a reclaim to finish; a reclaim, for remote frees
CLAIM_GATE_WAIT_S = 0.005  # a claim's reclaim, under the writer lock, waits no longer: it takes another


def arena_name(i: int) -> str:
    return f".arena.{i}"


def class_for(size: int, align: int) -> int | None:
    """The size class for ``size`` bytes aligned to ``align``, or None: a large allocation."""
    if size > MAX_SMALL:
        return None
    c = _CLASS_OF[(size + 63) >> 6]
    if align <= DEFAULT_ALIGN:
        return c
    for k in range(c, len(CLASS_SIZES)):
        if CLASS_SIZES[k] % align == 0:
            return k
    return None


def max_arenas_for(window: int) -> int:
    return max(1, min(MAX_ARENAS, window // ARENA))


def directory_size(max_arenas: int) -> int:
    return _DIR_HEAD.size + max_arenas * ENTRY.size


# -- views over shared memory -------------------------------------------------------------------


class Directory:
    """The directory's bytes, mapped in this process."""

    __slots__ = ("mem", "max_arenas", "address", "_u32", "_u64")

    def __init__(self, record: ZoneRecord, keepalive: object) -> None:
        self.address = record.address
        self.mem = _sys.memory(record.address, record.size, keepalive)
        whole = record.size & ~7  # the zone is 4096-aligned: aligned word views, in the machine's byte
        # order, which is ENTRY's little-endian on the x86-64 this runs on (see hugeshmd.shm.table on TSO)
        self._u32 = self.mem[:whole].cast("I")  # each store through them is one aligned store
        self._u64 = self.mem[:whole].cast("Q")
        magic, version, count, arena = _DIR_HEAD.unpack_from(self.mem, 0)[:4]
        if magic != DIR_MAGIC or version != DIR_VERSION or arena != ARENA or directory_size(count) > record.size:
            raise TableCorrupt(f"the heap's directory at {record.address:#x} is not one (magic {magic!r}, "
                               f"version {version}, {count} arenas of {arena} bytes in {record.size} bytes)")
        self.max_arenas = count

    @staticmethod
    def initialize(record: ZoneRecord, max_arenas: int) -> None:
        """Zero a new directory and stamp its header, magic last (call under the writer lock)."""
        _sys.zero(record.address, record.size)
        mem = _sys.memory(record.address, record.size, None)
        _DIR_HEAD.pack_into(mem, 0, b"\0" * 8, DIR_VERSION, max_arenas, ARENA, 0, 0, 0, 0)
        mem[0:8] = DIR_MAGIC
        mem.release()

    def entry(self, i: int) -> tuple[int, int, int, int, int, int, int, int, int, int]:
        """(address, state, slot, epoch, pid, claims, -, start, reclaimed count, reclaimed bytes)."""
        return ENTRY.unpack_from(self.mem, _DIR_HEAD.size + i * ENTRY.size)

    def entries(self) -> Iterator[tuple[int, tuple[int, ...]]]:
        for i in range(self.max_arenas):
            yield i, self.entry(i)

    def write(self, i: int, *, address: int | None = None, state: int | None = None, owner: Owner | None = None,
              reclaimed: tuple[int, int] | None = None) -> None:
        """Change entry ``i`` (its L holder only), field by field, the state last.

        Each field is one aligned store, never ``struct.pack_into``: it zeroes its whole target
        before it writes the fields, so a process reading the entry meanwhile (``buffer()``
        looks for arenas without a lock) could see no arena there, and a holder killed in
        between left the entry empty for good, its arena lost (found by the heap storm).
        """
        q = (_DIR_HEAD.size + i * ENTRY.size) // 8  # the entry, in u64 words (ENTRY's layout)
        w = 2 * q  # and in u32 words
        u32, u64 = self._u32, self._u64
        if address is not None:
            u64[q] = address
        if owner is not None:
            u32[w + 3], u32[w + 4], u32[w + 5], u64[q + 4] = owner.slot, owner.epoch, owner.pid, owner.start
            u32[w + 6] = (u32[w + 6] + 1) & 0xFFFFFFFF  # claims
        if reclaimed is not None:
            u64[q + 5] = (u64[q + 5] + reclaimed[0]) & _MASK64
            u64[q + 6] = (u64[q + 6] + reclaimed[1]) & _MASK64
        if state is not None:
            u32[w + 2] = state

    def bump(self, at: int, by: int = 1) -> None:
        self._u64[at // 8] = (self._u64[at // 8] + by) & _MASK64

    def counter(self, at: int) -> int:
        return self._u64[at // 8]


class Arena:
    """One arena's metadata, mapped in this process. ``heap`` is the Heap that owns it here,
    or None: another process's arena (or no one's), freed into remotely."""

    __slots__ = ("index", "base", "meta", "state", "slack", "holder", "hint", "heap")

    def __init__(self, index: int, base: int, keepalive: object) -> None:
        self.index = index
        self.base = base
        self.meta = _sys.memory(base, META, keepalive)
        self.state = self.meta[STATE_AT:SLACK_AT]
        self.slack = self.meta[SLACK_AT:HOLDER_AT].cast("H")
        self.holder = self.meta[HOLDER_AT:META].cast("I")
        self.hint = self.meta[HINT_AT : HINT_AT + 4].cast("I")
        self.heap: Heap | None = None

    @staticmethod
    def initialize(base: int, index: int) -> None:
        """Zero a new arena's metadata and stamp it (its claimer, under the writer lock)."""
        _sys.zero(base, META)
        mem = _sys.memory(base, 8, None)
        _ARENA_HEAD.pack_into(mem, 0, ARENA_MAGIC, index)
        mem.release()

    def problem(self) -> str | None:
        magic, index = _ARENA_HEAD.unpack_from(self.meta, 0)
        if magic != ARENA_MAGIC or index != self.index:
            return f"arena {self.index} at {self.base:#x} has header ({magic:#x}, {index}): not this arena's"
        return None

    def span_class(self, span: int) -> int:
        """The class index of ``span``, or -1 if the span is not carved."""
        return self.meta[CLASS_AT + span] - 1

    def spans(self) -> Iterator[tuple[int, int]]:
        """(span, class index) of every carved span."""
        classes = self.meta[CLASS_AT : CLASS_AT + SPANS]
        for span in range(META_SPANS, SPANS):
            c = classes[span]
            if c:
                yield span, c - 1

    def address_of(self, span: int, c: int, i: int) -> int:
        return self.base + (span << SPAN_SHIFT) + i * CLASS_SIZES[c]

    def locate(self, address: int) -> tuple[int, int] | None:
        """(state index, class) of the block that starts at ``address``, or None."""
        offset = address - self.base
        span = offset >> SPAN_SHIFT
        if not META_SPANS <= span < SPANS:
            return None
        c = self.span_class(span)
        if not 0 <= c < len(CLASS_SIZES):
            return None
        i, rest = divmod(offset & (SPAN - 1), CLASS_SIZES[c])
        if rest or i >= _COUNTS[c]:
            return None
        return span * BLOCKS + i, c


def reclaim_arena(directory: Directory, arena: Arena, locks: ByteLock, wait: float = GATE_WAIT_S) -> tuple[int, int]:
    """Free every block of ``arena`` that its dead owner still held (LIVE) or that others freed
    (REMOTE); DISOWNED blocks stay, and so do handed ones (a holder other than the owner: a
    channel, or a worker that received it). Call holding its L lock. Idempotent; the (count,
    bytes) freed.

    Raises TableBusy if a remote free held the gate for ``wait`` seconds (a frozen freer).
    """
    i = arena.index
    if not locks.within(gate(i), wait, exclusive=True):
        raise TableBusy(f"arena {i}: a remote free held its gate for {wait:g} s; reclaim waits for it",
                        waited=wait)
    try:
        directory.write(i, state=E_RECLAIMING)
        count = freed = 0
        for span, c in list(arena.spans()):
            lo = span * BLOCKS
            hi = lo + _COUNTS[c]
            states = arena.state[lo:hi].tobytes()
            holders = arena.meta[HOLDER_AT + 4 * lo : HOLDER_AT + 4 * hi].tobytes()
            if holders.count(0) == len(holders):  # none handed: the common case, in C
                at = states.find(LIVE)
                while at >= 0:
                    count += 1
                    freed += CLASS_SIZES[c] - arena.slack[lo + at]
                    at = states.find(LIVE, at + 1)
                cleared = states.translate(_RECLAIM)
            else:  # block by block: a holder frees its handed block without the gate (see _remote_free)
                kept = bytearray(states)
                holder, state = arena.holder, arena.state
                for at, s in enumerate(states):
                    if s == REMOTE:
                        kept[at] = FREE
                        holder[lo + at] = 0
                        state[lo + at] = FREE
                    elif s == LIVE and not holder[lo + at]:
                        kept[at] = FREE
                        state[lo + at] = FREE
                        count += 1
                        freed += CLASS_SIZES[c] - arena.slack[lo + at]
                cleared = states = bytes(kept)
            if cleared != states:
                arena.state[lo:hi] = cleared
            if cleared.count(FREE) == len(cleared) and not any(arena.state[hi : lo + BLOCKS]):
                arena.meta[CLASS_AT + span] = 0  # empty: the span may serve another class
        directory.write(i, state=E_FREE, owner=NOBODY, reclaimed=(count, freed))
        return count, freed
    finally:
        locks.unlock(gate(i))


def release_held(arena: Arena, locks: ByteLock, gone: Callable[[int, int], bool],
                 wait: float = GATE_WAIT_S) -> tuple[int, int]:
    """Free the blocks of ``arena`` that a worker received and still held when it died:
    ``gone(arena index, claim)`` says, for a worker's holder word, whether that worker is gone.
    Like a remote free (under the arena's gate, shared): the arena's owner collects them.
    Blocks a channel holds are never touched. The (count, bytes) freed; nothing if the gate
    stayed taken (a reclaim in progress) for ``wait`` seconds: the next look frees them."""
    released = _release(arena, locks, lambda w: not w & CUSTODY and gone(*holder_arena(w)), wait)
    return released or (0, 0)


def release_custody(arena: Arena, locks: ByteLock, channel: int, wait: float = GATE_WAIT_S) -> int | None:
    """Free the blocks of ``arena`` that channel ``channel`` holds, for the removal of a channel
    whose remover died (its caller holds the channel's locks); how many, or None if the gate
    stayed taken for ``wait`` seconds (then some may be left: the caller tries again later)."""
    def held(w: int) -> bool:
        return bool(w & CUSTODY) and w & 0xFFF == channel and w != PINNED

    released = _release(arena, locks, held, wait)
    return None if released is None else released[0]


def _release(arena: Arena, locks: ByteLock, doomed_word: Callable[[int], bool],
             wait: float) -> tuple[int, int] | None:
    """Free, as a remote free does, the blocks of ``arena`` whose holder word ``doomed_word``
    picks; (count, bytes), or None if the gate stayed taken for ``wait`` seconds."""
    raw = arena.meta[HOLDER_AT:META].tobytes()
    if raw.count(0) == len(raw):
        return 0, 0
    words = memoryview(raw).cast("I")
    doomed = [(k, w) for k, w in enumerate(words) if w and doomed_word(w)]
    if not doomed:
        return 0, 0
    if not locks.within(gate(arena.index), wait, exclusive=False):
        return None
    count = freed = 0
    try:
        for k, w in doomed:
            s = arena.state[k]
            if arena.holder[k] == w and (s == LIVE or s == DISOWNED):
                arena.state[k] = REMOTE
                count += 1
                c = arena.span_class(k // BLOCKS)
                freed += CLASS_SIZES[c] - arena.slack[k] if c >= 0 else 0
        if count:
            arena.hint[0] = (arena.hint[0] + 1) & 0xFFFFFFFF
    finally:
        locks.unlock(gate(arena.index))
    return count, freed


# -- the worker's side ----------------------------------------------------------------------------

_new = object.__new__
_SIZES = CLASS_SIZES


class Heap:
    """This process's allocator for one attachment (made by :class:`Secondary` on first use)."""

    def __init__(self, table: Table, keepalive: object, window_base: int, window_size: int,
                 owner: Callable[[], Owner], refresh: Callable[[], Snapshot],
                 grow: Callable[[int], object] | None = None) -> None:
        self._table = table
        self._keepalive = keepalive  # the Window: its segments say what is mapped in this process
        self._grow = grow  # asks the primary for another segment of at least so many bytes
        self._owner = owner  # this process's owner token (pid and start time of this process)
        self._refresh = refresh  # the snapshot, with new segments mapped here
        self._base = window_base
        self._memory = _sys.memory(window_base, window_size, keepalive)
        self._lock = _thread.RLock()  # the slow paths: refill, claim, the arena caches
        self._free: list[list[tuple[int, int, Arena, int]]] = [[] for _ in CLASS_SIZES]
        self._own: list[Arena] = []  # arenas this Heap owns, in claim order
        self._hints: dict[int, int] = {}  # each own arena's remote-free counter as last collected
        self._arenas: dict[int, Arena] = {}  # every arena seen, by base (own and others')
        self._directory: Directory | None = None
        self._locks: ByteLock | None = None  # the arenas' L locks (and a claim's reclaim)
        self._local = _thread._local()  # each thread's own description for the gates
        self._all_locks: list[ByteLock] = []  # every description this Heap opened, closed in a forked child
        self._large = 0
        self._token = NOBODY  # this process's owner token, for large allocations
        self.holder = 0  # this process's holder word (see worker_holder), once it owns an arena
        self.openings: Any = None  # the channels open in this attachment (channel.Openings), from the first
        _fork.register(self)

    # -- allocating -----------------------------------------------------------------------

    def alloc(self, size: int, align: int | None = None) -> Any:
        if size.__class__ is int and 0 < size <= MAX_SMALL and align is None:
            c = _CLASS_OF[(size + 63) >> 6]  # the common case: no checks but these
        else:
            size, align = _check(size, align, self._table.layout.page_size)
            k_class = class_for(size, align)
            if k_class is None:
                record = self._alloc_large(size, align)
                return Buffer(self, record.address, size, None, record)
            c = k_class
        try:
            slot = self._free[c].pop()
        except IndexError:
            slot = self._refill(c)
        arena = slot[2]
        k = slot[1]
        arena.slack[k] = _SIZES[c] - size
        arena.state[k] = 1  # LIVE: the one store that publishes the allocation
        buf = _new(Buffer)
        buf.address = slot[0]
        buf.size = size
        buf._heap = self
        buf._slot = slot
        buf._record = None
        return buf

    def _refill(self, c: int) -> tuple[int, int, Arena, int]:
        """A free block of class ``c`` for this call: collected, carved, or from another arena.
        Other threads pop the same list without the lock, so what is pushed here may be gone
        by the time this thread pops: a carved span's first block is kept for this caller."""
        with self._lock:
            free = self._free[c]
            for arena in self._own:
                if arena.hint[0] != self._hints.get(arena.index):
                    self._collect(arena)
            try:
                return free.pop()
            except IndexError:
                pass
            for arena in self._own:
                slot = self._carve(arena, c)
                if slot is not None:
                    return slot
            while True:  # an arena taken over from a dead owner may be full: then another
                arena = self._claim()
                try:
                    return free.pop()
                except IndexError:
                    slot = self._carve(arena, c)
                    if slot is not None:
                        return slot

    def _carve(self, arena: Arena, c: int) -> tuple[int, int, Arena, int] | None:
        """Make a free span of ``arena`` into blocks of class ``c``: the first block, for the caller
        (the others go to the free list); None if the arena has no free span."""
        classes = arena.meta
        for span in range(META_SPANS, SPANS):
            if not classes[CLASS_AT + span]:
                lo = span * BLOCKS
                arena.state[lo : lo + BLOCKS] = bytes(BLOCKS)
                classes[HOLDER_AT + 4 * lo : HOLDER_AT + 4 * (lo + BLOCKS)] = bytes(4 * BLOCKS)
                classes[CLASS_AT + span] = c + 1  # published: the span's states are zero
                size = CLASS_SIZES[c]
                base = arena.base + (span << SPAN_SHIFT)
                self._free[c].extend((base + i * size, lo + i, arena, c) for i in range(_COUNTS[c] - 1, 0, -1))
                return base, lo, arena, c
        return None

    def _collect(self, arena: Arena) -> None:
        """Take back the blocks that other processes freed in an own arena (REMOTE -> FREE).

        The hint is a counter that remote freers bump after their store, read here before the
        scan: a free that this scan misses bumps it again, and nothing here writes it (a store of
        ours followed by loads could be passed by the loads, and lose a remote's bump)."""
        self._hints[arena.index] = arena.hint[0]
        state, holder = arena.state, arena.holder
        for span, c in arena.spans():
            lo = span * BLOCKS
            states = state[lo : lo + _COUNTS[c]].tobytes()
            at = states.find(REMOTE)
            if at < 0:
                continue
            append = self._free[c].append
            size = CLASS_SIZES[c]
            base = arena.base + (span << SPAN_SHIFT)
            while at >= 0:
                k = lo + at
                holder[k] = 0  # a handed block its holder freed: the owner's again
                state[k] = FREE
                append((base + at * size, k, arena, c))
                at = states.find(REMOTE, at + 1)

    def _adopt_free_blocks(self, arena: Arena) -> None:
        """Fill the free lists from an arena just claimed (FREE and REMOTE blocks)."""
        self._hints[arena.index] = arena.hint[0]
        for span, c in arena.spans():
            lo = span * BLOCKS
            states = arena.state[lo : lo + _COUNTS[c]].tobytes()
            free = self._free[c]
            for at in range(len(states) - 1, -1, -1):
                s = states[at]
                if s == REMOTE:
                    arena.holder[lo + at] = 0
                    arena.state[lo + at] = FREE
                if s == FREE or s == REMOTE:
                    free.append((arena.address_of(span, c, at), lo + at, arena, c))

    # -- claiming an arena ------------------------------------------------------------------

    def _byte_locks(self) -> ByteLock:
        if self._locks is None:
            with _fork.guard:
                if self._locks is None:
                    self._locks = ByteLock(self._table._fd)
        return self._locks

    def _claim(self) -> Arena:
        """Own another arena: a free one, else a dead owner's (reclaimed), else a new one (the
        instance grown for it if it has no room and may grow)."""
        arena: Arena = growing(self._claim_once, self._grow, 2 * ARENA + directory_size(MAX_ARENAS))
        return arena

    def _claim_once(self) -> Arena:
        locks = self._byte_locks()
        table = self._table
        with table.locked() as base:
            base, directory = self._ensure_directory(base)
            mine = {a.index for a in self._own}  # our own description's locks would not stop us
            entries = [(i, e) for i, e in directory.entries() if i not in mine]
            # a free arena first, then a dead owner's, then a blank entry (a new arena)
            candidates = [i for want in (E_FREE, E_OWNED, E_RECLAIMING) for i, e in entries if e[0] and e[1] == want]
            arena = None
            for i in candidates:
                if locks.try_exclusive(liveness(i)):
                    arena = self._take(directory, i, locks)
                    if arena is not None:
                        break
            if arena is None:
                i = next((i for i, e in entries if not e[0] and locks.try_exclusive(liveness(i))), -1)
                if i < 0:
                    raise _arenas_full(directory.max_arenas)
                try:
                    arena = self._new_arena(base, directory, i)
                except BaseException:
                    locks.unlock(liveness(i))
                    raise
            try:
                directory.write(arena.index, owner=self._owner())
                directory.write(arena.index, state=E_OWNED)
                directory.bump(CLAIMS_AT)
            except BaseException:  # pragma: no cover - a write to mapped memory; for form's sake
                locks.unlock(liveness(arena.index))
                raise
            if not self._own:  # the first arena, owned for life: it names this process as a holder
                self.holder = worker_holder(arena.index, directory.entry(arena.index)[5])
        arena.heap = self
        self._own.append(arena)
        self._adopt_free_blocks(arena)
        return arena

    def _take(self, directory: Directory, i: int, locks: ByteLock) -> Arena | None:
        """Arena ``i``, whose L this Heap just took: reclaimed first if its owner died. None
        (L given back) if a remote free holds its gate: a claim holds the writer lock, and
        waits for no one; the next claim, or the primary, reclaims it."""
        try:
            arena = self._arena(i, directory.entry(i)[0])
            problem = arena.problem()
            if problem is not None:
                raise TableCorrupt(f"the heap: {problem}", path=self._table.path)
            if directory.entry(i)[1] != E_FREE:
                reclaim_arena(directory, arena, locks, CLAIM_GATE_WAIT_S)
            return arena
        except TableBusy:
            locks.unlock(liveness(i))
            return None
        except BaseException:
            locks.unlock(liveness(i))
            raise

    def _new_arena(self, base: Snapshot, directory: Directory, i: int) -> Arena:
        """Give entry ``i`` memory: a new zone, its metadata written before the commit (so no
        process sees an arena zone that is not one), or the zone of a claimer that died between
        its commit and publishing it here (an arena no one has used: checked, never wiped)."""
        table = self._table
        record = base.by_name.get(arena_name(i))
        if record is None:
            record = place(base, arena_name(i), ARENA, ARENA, table.iova_of, NOBODY, ZONE_HEAP_META)
            self._ensure_mapped(record.address)
            Arena.initialize(record.address, i)  # a free run, ours under the lock until the commit
            table.commit(base, insert=record)
        arena = self._arena(i, record.address)
        problem = arena.problem() or next((f"arena {i} at {record.address:#x} is in no entry of the directory but "
                                           f"has span {span} carved" for span, _ in arena.spans()), None)
        if problem is not None:
            raise TableCorrupt(f"the heap: {problem}", path=table.path)
        directory.write(i, address=record.address)
        return arena

    def _ensure_directory(self, base: Snapshot) -> tuple[Snapshot, Directory]:
        """The directory, made if there is none (call under the writer lock).

        A new one is written before its zone is committed, so no process ever sees a
        directory zone without a directory in it: one that is not is damage (TableCorrupt),
        never something to make again over whatever it holds.
        """
        if self._directory is not None:
            return base, self._directory
        record = base.by_name.get(DIRECTORY)
        if record is None:
            count = max_arenas_for(self._table.layout.window)
            record = place(base, DIRECTORY, directory_size(count), 4096, self._table.iova_of, NOBODY, ZONE_HEAP_META)
            self._ensure_mapped(record.address)
            Directory.initialize(record, count)  # a free run, ours under the lock until the commit
            base = self._table.commit(base, insert=record)
        else:
            self._ensure_mapped(record.address)
        self._directory = Directory(record, self._keepalive)
        return base, self._directory

    def directory(self) -> Directory | None:
        """The directory, if the instance has one (found without the writer lock)."""
        if self._directory is None:
            record = self._table.snapshot().record(DIRECTORY)
            if record is None:
                return None
            self._ensure_mapped(record.address)
            self._directory = Directory(record, self._keepalive)
        return self._directory

    def _ensure_mapped(self, address: int) -> None:
        """Map the segment holding ``address`` if this process has not yet (the instance grew
        since it last looked): no access of the heap's may fault on the window's reservation."""
        maps = getattr(self._keepalive, "maps", None)  # a Window
        if maps is not None and not maps(address):
            self._refresh()

    def _arena(self, i: int, address: int) -> Arena:
        arena = self._arenas.get(address)
        if arena is None or arena.index != i:
            self._ensure_mapped(address)
            arena = self._arenas[address] = Arena(i, address, self._keepalive)
        return arena

    def _arena_at(self, address: int) -> Arena | None:
        """The arena holding ``address``, if it is in one."""
        base = address & ~(ARENA - 1)
        arena = self._arenas.get(base)
        if arena is not None:
            return arena
        directory = self.directory()
        if directory is None:
            return None
        with self._lock:
            for i, e in directory.entries():
                if e[0] == base:
                    return self._arena(i, base)
        return None

    # -- large allocations ---------------------------------------------------------------------

    def _alloc_large(self, size: int, align: int) -> ZoneRecord:
        record: ZoneRecord = growing(lambda: self._alloc_large_once(size, align), self._grow, size + align)
        self._ensure_mapped(record.address)
        return record

    def owner_token(self) -> Owner:
        """This process's owner token, for the zones of its large allocations."""
        owner = self._token
        if owner is NOBODY:  # made once per process: a forked child's _after_fork forgets its parent's
            owner = self._token = self._owner()
        return owner

    def _alloc_large_once(self, size: int, align: int) -> ZoneRecord:
        table = self._table
        owner = self.owner_token()
        while True:
            self._large += 1
            name = f".h.{owner.pid}.{self._large}"
            with table.locked() as base:
                if name in base.by_name:
                    continue  # a dead process with this pid left it: its reclaim is on the way
                record = place(base, name, size, align, table.iova_of, owner, ZONE_HEAP)
                table.commit(base, insert=record)
            return record

    def _large_record(self, address: int) -> ZoneRecord | None:
        """The large allocation at ``address`` in the committed version. Found with the
        snapshot's ``zone_at``, never its ``starts`` index: another thread's commit moves that
        list on to the next version and changes it, so it could disagree with the zones (a live
        allocation then read as none, about once in 20,000 lookups while another thread
        allocated)."""
        record = self._table.snapshot().zone_at(address)
        return record if record is not None and record.flags & ZONE_HEAP else None

    # -- freeing ---------------------------------------------------------------------------------

    def free_small(self, slot: tuple[int, int, Arena, int]) -> None:
        arena = slot[2]
        k = slot[1]
        state = arena.state
        if arena.heap is self:
            s = state[k]
            if arena.holder[k]:
                raise _handed(slot[0], arena.holder[k])
            if s == LIVE or s == DISOWNED:
                state[k] = FREE
                self._free[slot[3]].append(slot)
                return
            raise _not_live(slot[0], s)
        self._remote_free(arena, k, slot[0])

    def holder_word(self) -> int:
        """This process's holder word, claiming its first arena if it owns none yet."""
        if not self.holder:
            with self._lock:
                if not self.holder:
                    self._claim()
        return self.holder

    def _remote_free(self, arena: Arena, k: int, address: int) -> None:
        """Free a block of an arena this Heap does not own, under the arena's gate.

        The gate is taken on a lock description of this thread's own: OFD locks are not counted
        per thread, so on a shared one another thread's unlock would drop this thread's hold,
        and a claim of this process would walk through it (its reclaim would convert, not wait).

        A block handed to this process (through a channel) is freed without the gate: this
        process is the only writer of its state, and reclaim never frees a handed block (it
        writes such a span block by block, so it cannot write back a stale byte over this one)."""
        held = arena.holder[k]
        if held and held == self.holder:
            s = arena.state[k]
            if s != LIVE and s != DISOWNED:
                raise _not_live(address, s)
            arena.state[k] = REMOTE  # the holder word stays until the owner collects it
            arena.hint[0] = (arena.hint[0] + 1) & 0xFFFFFFFF
            return
        locks = self._thread_locks()
        i = arena.index
        if not locks.within(gate(i), GATE_WAIT_S, exclusive=False):
            raise TableBusy(f"arena {i} was being reclaimed for {GATE_WAIT_S:g} s; the free of {address:#x} "
                            "did nothing", waited=GATE_WAIT_S)
        try:
            s = arena.state[k]
            found = arena.locate(address)
            if found is None or found[0] != k:
                raise _not_live(address, FREE)  # the span was carved again since: a stale handle
            held = arena.holder[k]
            if held and held != self.holder:
                raise _handed(address, held)
            if s == LIVE or s == DISOWNED:
                arena.state[k] = REMOTE  # the holder word stays until the owner collects it
                arena.hint[0] = (arena.hint[0] + 1) & 0xFFFFFFFF  # after the store: see _collect
                return
            raise _not_live(address, s)
        finally:
            locks.unlock(gate(i))

    def _thread_locks(self) -> ByteLock:
        """This thread's own lock description (for the gates)."""
        locks: ByteLock | None = getattr(self._local, "locks", None)
        if locks is None:
            with _fork.guard:
                locks = self._local.locks = ByteLock(self._table._fd)
                self._all_locks.append(locks)
        return locks

    def free_large(self, record: ZoneRecord) -> None:
        with self._table.locked() as base:
            self._table.commit(base, remove=_live_large(base, record))

    def disown_small(self, slot: tuple[int, int, Arena, int]) -> None:
        arena = slot[2]
        if arena.heap is not self or arena.holder[slot[1]]:
            raise _not_owner(slot[0])
        if arena.state[slot[1]] != LIVE:
            raise _not_live(slot[0], arena.state[slot[1]])
        arena.state[slot[1]] = DISOWNED

    def disown_large(self, record: ZoneRecord) -> ZoneRecord:
        with self._table.locked() as base:
            current = _live_large(base, record)
            if current.flags & ZONE_DISOWNED:
                return current
            if current.owner.pid != os.getpid():
                raise _not_owner(record.address)
            changed = current._replace(flags=current.flags | ZONE_DISOWNED)
            self._table.commit(base, remove=current, insert=changed)
            return changed

    # -- finding an allocation by address ----------------------------------------------------

    def buffer(self, address: int) -> Any:
        if isinstance(address, bool) or not isinstance(address, int):
            raise InvalidArgument(f"address must be int, not {type(address).__name__}", name="address")
        arena = self._arena_at(address)
        if arena is not None:
            found = arena.locate(address)
            if found is None:
                raise NotFound(f"no allocation starts at {address:#x} (it is inside arena {arena.index}, "
                               "not at the start of a block)", name=f"{address:#x}")
            k, c = found
            s = arena.state[k]
            if s != LIVE and s != DISOWNED:
                raise NotFound(f"the allocation at {address:#x} is not live (freed)", name=f"{address:#x}")
            return Buffer(self, address, CLASS_SIZES[c] - arena.slack[k], (address, k, arena, c), None)
        record = self._large_record(address)  # the committed version: a new segment is mapped just below
        if record is None:
            raise NotFound(f"no live allocation of the heap starts at {address:#x}", name=f"{address:#x}")
        self._ensure_mapped(address)
        return Buffer(self, record.address, record.size, None, record)

    def view(self, address: int, size: int) -> memoryview:
        at = address - self._base
        return self._memory[at : at + size]

    def iova(self, address: int) -> int:
        snap = self._table.snapshot()
        for segment in snap.segments:
            if segment.address <= address < segment.end:
                return self._table.iova_of(segment, address)
        return address

    # -- lifetime -------------------------------------------------------------------------------

    def release(self) -> None:
        """Give up this process's arenas (its detach): LIVE blocks stay its until reclaim, which
        the primary does once the process is gone. Closing the lock description would let a
        reclaim run now, while this process may still use its buffers: so it stays open.

        This Heap lets go of its arenas too (they keep it, for the buffers still held): else the
        two would hold each other, and the window (which both keep mapped) would stay until the
        garbage collector's next pass, not go when the last Zone, buffer or view of it does."""
        with self._lock:
            self._free = [_Dropped() for _ in CLASS_SIZES]  # a buffer freed after this keeps no slot here
            self._own = []
            self._arenas = {}

    def _after_fork(self) -> None:
        # The child owns none of its parent's arenas: it frees into them remotely.
        self._lock = _thread.RLock()
        for arena in self._own:
            arena.heap = None
        self._own = []
        self._free = [[] for _ in CLASS_SIZES]
        if self._locks is not None:
            self._locks.close()  # the parent's description stays locked through the parent's copy
            self._locks = None
        for locks in self._all_locks:
            locks.close()
        self._all_locks = []
        self._local = _thread._local()
        self.holder = 0
        self._token = NOBODY
        if self.openings is not None:
            self.openings.inherit()  # the parent's words are its registration's; handles re-record themselves


class _Dropped(list):  # type: ignore[type-arg]
    """A released Heap's free list: it keeps nothing (a freed block's state byte says it is free;
    a slot kept here would hold its arena, which holds the Heap, in a cycle)."""

    def append(self, _slot: object) -> None:
        pass


def _check(size: object, align: object, page_size: int) -> tuple[int, int]:
    """A zone's checks of size and alignment (:mod:`hugeshmd.shm.zones`), the alignment at most the page size."""
    size = check_size(size)
    checked = check_align(align)
    if checked > page_size:
        raise InvalidArgument(f"align must be a power of two up to the page size ({page_size}), got {align}",
                              align=align)
    return size, checked


def _live_large(base: Snapshot, record: ZoneRecord) -> ZoneRecord:
    """The large allocation ``record`` as committed in ``base``; InvalidArgument if it is gone."""
    current = base.by_name.get(record.name)
    if current is None or current.address != record.address:
        raise _not_live(record.address, FREE)
    return current


def _not_owner(address: int) -> InvalidArgument:
    return InvalidArgument(f"only the process that owns the allocation at {address:#x} may disown it",
                           name="address")


def _not_live(address: int, state: int) -> InvalidArgument:
    what = {FREE: "already free", REMOTE: "already freed by another process"}.get(state, f"in state {state}")
    return InvalidArgument(f"no live allocation at {address:#x}: it is {what} (a double free?); "
                           "nothing was changed", name="address")


def _handed(address: int, holder: int) -> InvalidArgument:
    if named_zone_held(holder):
        return InvalidArgument(f"the memory at {address:#x} is a named zone's (shm.reserve): free the zone by "
                               "its name; nothing was changed", name="address")
    if holder == PINNED:
        who = "the pins of a shared array (it is freed when the last process holding the array drops it)"
    else:
        who = "a channel" if holder & CUSTODY else "the worker that received it"
    return InvalidArgument(f"the allocation at {address:#x} is held by {who}, not by this handle's process; "
                           "only its holder may free it; nothing was changed", name="address")


def _arenas_full(count: int) -> Exception:
    return TableFull(f"every one of the heap's {count} arenas is owned by a live process", table="arenas",
                     capacity=count)
