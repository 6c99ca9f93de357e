"""Named zones in the shared heap: the name index, sharded, and the zones it names.

A zone of up to 64 KiB (whose alignment a size class gives) is a block of the
heap (:mod:`hugeshmd.shm.heap`), taken from the reserving worker's own arena,
and named in this index, a table of the instance (the zone ``.names``): so
reserving and freeing one takes no lock that every worker shares. Larger zones,
and those reserved by the primary, stay records of the shared table
(:mod:`hugeshmd.shm.zones`), as before; a name is unique across both.

The index is :data:`SHARDS` shards, a name's by the CRC32 of its bytes. Each
shard has a robust mutex (:mod:`hugeshmd._sys`), a counter of its frees, and
``per_shard`` entries of 128 bytes: a state word, the CRC32 of the rest, then
the zone (address, size, iova, creation time, alignment, segment, the CRC32 of
its name, name). Every reserve of a user zone (of either kind), and every free
of a zone of the index, holds the mutex of its name's shard, so two workers meet
only when their names share a shard. Lookups take
no lock: they read the shard's state words and name hashes, then the entry
whose hash matches, and trust it when its CRC holds and it lies in a segment.

The block of a named zone is in the *custody* of its entry: its holder word
(:func:`zone_custody`) names the entry, so the reclaim of its maker's arena
keeps it (a zone outlives its maker), and the checker
(:mod:`hugeshmd.shm.heapcheck`) matches every such block to its entry. Each
change is a few stores under the shard's mutex, in an order that leaves what
the next taker (told by EOWNERDEAD that the holder died) finishes or undoes
(:meth:`Names.repair`):

* **reserve**: allocate the block (this worker's: reclaimed if it dies now);
  write the entry's body while its state is EMPTY; state INSERTING; the block's
  holder becomes the entry (one store); state PUBLISHED. Repair publishes an
  INSERTING entry whose block the entry holds, and empties the others.
* **free**: state FREEING; bump the shard's frees (lookups that cached the zone
  look again); free the block as a remote free does (REMOTE, its arena's owner
  collects it; reclaim does if the owner is dead); state EMPTY. Repair finishes
  a FREEING entry the same way, the frees bumped first (each step is idempotent;
  a block already released only gets its owner's hint again).

A change given up half way by a process that lives on (an exception) is
finished the same way by the next taker of the shard's mutex: under it, an
entry INSERTING or FREEING is always abandoned. The primary tries every shard's
mutex at each heartbeat (:meth:`Names.heal`), so none waits for the next change
in its shard. Zones of the index carry no owner (a zone of the table records
the worker that reserved it): their entries have no room for one.
"""

from __future__ import annotations

import struct
import time
import zlib
from array import array
from collections.abc import Callable, Iterator

from .. import _sys
from ..errors import TableBusy, TableCorrupt
from .heap import ARENA, CLASS_SIZES, DISOWNED, LIVE, REMOTE, ZONES_CUSTODY, Arena, class_for, custody
from .layout import NAME_MAX, NOBODY, ZONE_HEAP_META, Owner, SegmentRecord, ZoneRecord
from .mutex import take
from .zones import place

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .snapshot import Snapshot
    from .table import Table

__all__ = ["Names", "NAMES", "reserve_unindexed", "SHARDS", "ZONES_CUSTODY", "zone_custody", "names_size",
           "per_shard_for", "EMPTY", "INSERTING", "PUBLISHED", "FREEING"]

NAMES = ".names"
MAGIC = b"HSHMNAM1"
_HEAD = struct.Struct("<8sII")  # magic, shards, entries per shard
SHARDS = 64
SHARDS_AT = 128
SHARD = 128  # a shard's header: its robust mutex (64 bytes), then its frees counter (u64)
FREES_AT = 64  # in a shard's header
ENTRY = 128
# state, crc32 (of the 120 bytes after it), address, size, iova, created (ns), align, segment, the
# CRC32 of the name (what lookups compare first), -, name, -
_ENTRY = struct.Struct(f"<IIQQQQIII4x{NAME_MAX + 1}s8x")
_BODY = struct.Struct(f"<QQQQIII4x{NAME_MAX + 1}s8x")  # the entry less its state and crc
HASH_WORD = 12  # the name's CRC32, in u32 words from the entry's start
_ADDRESS = struct.Struct("<Q")  # at byte 8 of an entry
NAME_AT = 56  # the name field, in an entry
assert _ENTRY.size == ENTRY and _BODY.size == ENTRY - 8 and _ENTRY.size - 8 - NAME_MAX - 1 == NAME_AT
EMPTY, INSERTING, PUBLISHED, FREEING = 0, 1, 2, 3
_U32 = struct.Struct("<I")
_EMPTY = _U32.pack(EMPTY)
STATE_NAMES = {EMPTY: "empty", INSERTING: "inserting", PUBLISHED: "published", FREEING: "freeing"}
_STATES = frozenset(STATE_NAMES)
MAX_ENTRIES = 0x7FFFF  # an entry's index is the sequence field of its blocks' holder word
MAX_PER_SHARD = 256  # an index of 2 MiB at most (16,384 zones; more spill into the table)


def zone_custody(entry: int) -> int:
    """The holder word of the block that entry ``entry`` names."""
    return custody(ZONES_CUSTODY, entry)


def per_shard_for(max_zones: int) -> int:
    """Entries per shard for a table of ``max_zones``: twice the even share, so that names that
    hash unevenly still find room (a full shard makes a zone of the shared table instead), 8 to
    :data:`MAX_PER_SHARD`."""
    return max(8, min(MAX_PER_SHARD, -(-2 * max_zones // SHARDS)))


def names_size(per_shard: int) -> int:
    return SHARDS_AT + SHARDS * SHARD + SHARDS * per_shard * ENTRY


def key(name: str) -> bytes:
    """What :meth:`Names.find` looks for: the bytes of ``name`` (a checked zone name), which an
    entry's name field holds followed by NULs, and whose CRC32 picks the shard and is stored in
    the entry. (A search of the shard's bytes for the name cost 3-4 us a shard of 4 KiB: bytes.find
    skips ahead by at most the needle's length, and by one byte when it ends in a NUL.)"""
    return name.encode()


def shard_of(field: bytes) -> int:
    return zlib.crc32(field) % SHARDS


ROOM = 4  # records the table must have free to make the index: the index, the heap's directory, an arena, a zone


def _place_last(base: Snapshot, size: int, table: Table) -> ZoneRecord | None:
    """Where the index goes: at the top of the last free run that holds it, so that it splits
    no run that a large zone (or one aligned to a large page) could use. None if it does not fit,
    or no arena would fit beside it (then a zone of the heap could not be had anyway)."""
    gaps = list(base.gaps)
    for g in range(len(gaps) - 1, -1, -1):
        start, end, segment_id = gaps[g]
        address = (end - size) & ~4095
        if address >= start:
            gaps[g] = (start, address, segment_id)
            if not any((s + ARENA - 1) & ~(ARENA - 1) <= e - ARENA for s, e, _ in gaps):
                return None
            segment = next(s for s in base.segments if s.id == segment_id)
            return ZoneRecord(NAMES, address, size, table.iova_of(segment, address), 4096, segment_id, NOBODY,
                              time.time_ns(), ZONE_HEAP_META)
    return None


def reserve_unindexed(table: Table, name: str, size: int, align: int, timeout: float | None = None,
                      owner: Owner = NOBODY) -> tuple[Snapshot, Snapshot, ZoneRecord] | None:
    """Reserve zone ``name`` in the shared table, as :func:`hugeshmd.shm.zones.reserve` does, if the
    instance has no name index; None if it has one (then the caller takes the lock of the name's
    shard first). Without an index no zone is named in one, and none can be while this holds the
    writer lock (the index is made under it): so a zone of the table needs no index, and an
    instance whose zones are all large never gives one its memory."""
    with table.locked(timeout) as base:
        if base.record(NAMES) is not None:
            return None
        record = place(base, name, size, align, table.iova_of, owner)
        return base, table.commit(base, insert=record), record


class Names:
    """The instance's name index, as this process sees it: ``record`` is the ``.names`` zone."""

    __slots__ = ("address", "per_shard", "mem", "frees", "_u32", "_entries_at", "_timeout")

    def __init__(self, record: ZoneRecord, keepalive: object, lock_timeout: float) -> None:
        self.address = record.address
        self.mem = _sys.memory(record.address, record.size, keepalive)
        magic, shards, per_shard = _HEAD.unpack_from(self.mem, 0)
        if magic != MAGIC or shards != SHARDS or not 0 < per_shard <= MAX_ENTRIES // SHARDS \
                or names_size(per_shard) > record.size:
            raise TableCorrupt(f"the zone name index at {record.address:#x} is not one (magic {magic!r}, "
                               f"{shards} shards of {per_shard} entries in {record.size} bytes)")
        self.per_shard = per_shard
        self._entries_at = SHARDS_AT + SHARDS * SHARD
        self._u32 = self.mem[: names_size(per_shard)].cast("I")
        # each shard's frees counter, one u64 per shard header (SHARD // 8 words apart)
        self.frees = self.mem[SHARDS_AT : SHARDS_AT + SHARDS * SHARD].cast("Q")[FREES_AT // 8 :: SHARD // 8]
        self._timeout = lock_timeout

    @staticmethod
    def initialize(address: int, size: int, per_shard: int) -> None:
        """Zero a new index and stamp it, magic last (call under the table's writer lock)."""
        _sys.zero(address, size)
        mem = _sys.memory(address, SHARDS_AT, None)
        _HEAD.pack_into(mem, 0, b"\0" * 8, SHARDS, per_shard)
        for s in range(SHARDS):
            _sys.mutex_init(address + SHARDS_AT + s * SHARD)
        mem[0:8] = MAGIC
        mem.release()

    @classmethod
    def find_or_make(cls, table: Table, keepalive: object, lock_timeout: float, make: bool,
                     ensure_mapped: Callable[[int], None]) -> Names | None:
        """The index of ``table``'s instance; made (under the writer lock) if there is none and
        ``make``, else None."""
        record = table.snapshot().record(NAMES)
        if record is None:
            if not make:
                return None
            with table.locked() as base:
                record = base.by_name.get(NAMES)
                if record is None:
                    if len(base.zones) + ROOM > table.layout.max_zones:
                        return None  # no room for the heap's own records: zones stay in the table
                    per_shard = per_shard_for(table.layout.max_zones)
                    record = _place_last(base, names_size(per_shard), table)
                    if record is None:
                        return None  # no room for the index and an arena beside it: zones stay in the table
                    ensure_mapped(record.address)
                    cls.initialize(record.address, record.size, per_shard)  # ours under the lock until the commit
                    table.commit(base, insert=record)
        ensure_mapped(record.address)
        return cls(record, keepalive, lock_timeout)

    field = staticmethod(key)
    shard_of = staticmethod(shard_of)

    @staticmethod
    def fits(size: int, align: int, page_size: int) -> bool:
        """Whether a zone of ``size`` bytes aligned to ``align`` is a block of a size class (the
        heap aligns to the page size at most)."""
        return align <= page_size and class_for(size, align) is not None

    def zones(self, segments: tuple[SegmentRecord, ...]) -> list[ZoneRecord]:
        """The published zones (a moment's reading: each entry read once, lock-free)."""
        found = []
        for entry, state in self.entries():
            if state == PUBLISHED:
                record = self.read(entry, segments)
                if not isinstance(record, str) and self.state(entry) == PUBLISHED:
                    found.append(record)
        return found

    # -- entries -------------------------------------------------------------------------------

    def _at(self, entry: int) -> int:
        return self._entries_at + entry * ENTRY

    def state(self, entry: int) -> int:
        return int(self._u32[self._at(entry) // 4])

    def set_state(self, entry: int, state: int) -> None:
        self._u32[self._at(entry) // 4] = state  # one aligned store

    def read(self, entry: int, segments: tuple[SegmentRecord, ...]) -> ZoneRecord | str:
        """Entry ``entry``'s zone, whatever its state, if its CRC holds and it lies in one of
        ``segments``; else what is wrong."""
        at = self._at(entry)
        raw = self.mem[at : at + ENTRY].tobytes()
        return _decode(raw, entry, segments)

    def find(self, field: bytes, segments: tuple[SegmentRecord, ...]) -> tuple[int, ZoneRecord] | None:
        """The published entry named ``field`` (:func:`key`), and its zone; None if there is none.

        Lock-free. It reads the shard's state words and name hashes (two strided reads, no copy
        of the shard), then reads whole each published entry whose hash is the name's. An entry
        changed while it was read fails its CRC and the shard is read again; one that keeps
        failing is damage (TableCorrupt). A state word is stored after the rest of its entry
        (x86-64 keeps stores in order), so a PUBLISHED state read before the hash vouches for it."""
        h = zlib.crc32(field)
        hashed = _U32.pack(h)
        want = field + b"\0"
        torn = None
        for _ in range(64):
            first, states, hashes = self._shard(h % SHARDS)
            torn = None
            for j in _found(hashes, hashed):
                state = _U32.unpack_from(states, 4 * j)[0]
                if state != PUBLISHED:
                    if state not in _STATES and self._named(first + j, want):
                        raise self._unknown(first + j, state)
                    continue
                entry = first + j
                at = self._at(entry)
                raw = self.mem[at : at + ENTRY].tobytes()
                got = _decode(raw, entry, segments)
                if isinstance(got, str):
                    torn = got
                elif (_U32.unpack_from(raw)[0] == PUBLISHED and raw[NAME_AT : NAME_AT + len(field) + 1] == want
                      and self.state(entry) == PUBLISHED):  # the body read is a published one, not its next
                    return entry, got
            if torn is None:
                return None
        raise TableCorrupt(f"the zone name index: {torn}")

    def probe(self, field: bytes) -> tuple[int | None, int | None]:
        """(the published entry named ``field``, an EMPTY entry of its shard), each None if there
        is none: exact under the shard's mutex, a moment's reading without it. The name is compared
        in place, its entry not decoded: a reserve is refused, and a free frees, on an entry whose
        body is damaged too (a free only frees a block that the entry holds: see :meth:`_release`).
        An entry of that name whose state word is none of the four is TableCorrupt."""
        h = zlib.crc32(field)
        first, states, hashes = self._shard(h % SHARDS)
        named = None
        want = field + b"\0"
        for j in _found(hashes, _U32.pack(h)):
            state = _U32.unpack_from(states, 4 * j)[0]
            if (state == PUBLISHED or state not in _STATES) and self._named(first + j, want):
                if state != PUBLISHED:
                    raise self._unknown(first + j, state)
                named = first + j
                break
        empty = next(_found(states, _EMPTY), None)
        return named, None if empty is None else first + empty

    def _shard(self, shard: int) -> tuple[int, bytes, bytes]:
        """(its first entry, its entries' state words, their name hashes) of ``shard``: two strided
        reads of the mapping, as bytes (no object the garbage collector tracks)."""
        return shard * self.per_shard, self._states(shard), self._states(shard, HASH_WORD)

    def _states(self, shard: int, word: int = 0) -> bytes:
        """Word ``word`` (0: the state) of each entry of ``shard``, in one strided read."""
        per = self.per_shard
        first = (self._entries_at + shard * per * ENTRY) // 4
        return self._u32[first + word : first + per * ENTRY // 4 : ENTRY // 4].tobytes()

    def _named(self, entry: int, want: bytes) -> bool:
        """Whether entry ``entry``'s name field starts with ``want`` (a name and its NUL), in place."""
        at = self._at(entry) + NAME_AT
        return bool(self.mem[at : at + len(want)] == want)

    @staticmethod
    def _unknown(entry: int, state: int) -> TableCorrupt:
        """The error for a name whose entry's state word is none of the four: damage, which no
        repair touches (its zone may be in use); the checker reports it too."""
        return TableCorrupt(f"the zone name index: entry {entry} has state {state:#x}, which is none; its zone "
                            "is neither used nor freed by hugeshmd until the instance is made anew")

    def write(self, entry: int, record: ZoneRecord) -> None:
        """Fill EMPTY entry ``entry`` with ``record`` (its state untouched: still EMPTY)."""
        name = record.name.encode()
        body = _BODY.pack(record.address, record.size, record.iova, record.created_ns, record.align,
                          record.segment, zlib.crc32(name), name)  # the field padded with NULs
        at = self._at(entry)
        self.mem[at + 8 : at + ENTRY] = body
        self._u32[at // 4 + 1] = zlib.crc32(body)

    def entries(self) -> Iterator[tuple[int, int]]:
        """(entry, state) of every entry not EMPTY."""
        words = self._u32[self._entries_at // 4 :: ENTRY // 4].tolist()
        for entry, state in enumerate(words):
            if state != EMPTY:
                yield entry, state

    def published(self) -> int:
        return self._u32[self._entries_at // 4 :: ENTRY // 4].tolist().count(PUBLISHED)

    # -- the shards' mutexes ---------------------------------------------------------------------

    def lock(self, shard: int, repair: Callable[[int], None], timeout: float | None = None) -> None:
        """Take ``shard``'s mutex, at most ``timeout`` seconds (default: the lock timeout), then
        TableBusy naming the holder; ``repair(shard)`` first if its last holder died holding it, or
        left a change half done (an exception, a repair that failed): under the mutex an entry
        INSERTING or FREEING is always abandoned."""
        at = self.address + SHARDS_AT + shard * SHARD
        err = _sys.mutex_trylock(at)
        if err:  # held: waits, bounded; after a dead holder, its repair
            take(at, self._timeout if timeout is None else timeout, lambda: repair(shard),
                 f"the zone name index: shard {shard}'s lock", TableBusy, NAMES,
                 "; reserve and free of names in that shard wait for it", err)
        if self.abandoned(shard):  # a change that raised half way (its holder lives on): no one else will
            try:
                repair(shard)
            except BaseException:
                _sys.mutex_unlock(at)
                raise

    def heal(self, arena_at: Callable[[int], Arena | None], segments: tuple[SegmentRecord, ...]) -> int:
        """Repair every shard whose mutex a dead process held (the primary, at each heartbeat):
        a try of each lock, which only a dead holder's answers EOWNERDEAD, and of each free one
        with a change given up half way; how many were."""
        healed = 0
        failed: Exception | None = None
        for shard in range(SHARDS):
            at = self.address + SHARDS_AT + shard * SHARD
            err = _sys.mutex_trylock(at)
            held = err in (0, _sys.EOWNERDEAD)
            try:
                if err == _sys.EOWNERDEAD:
                    held = False  # mutex_repaired gives the lock back if the repair raises
                    _sys.mutex_repaired(at, lambda: self.repair(shard, arena_at, segments))  # noqa: B023 - now
                    held = True
                    healed += 1
                elif err == 0 and self.abandoned(shard):
                    self.repair(shard, arena_at, segments)
                    healed += 1
            except Exception as err_:  # noqa: BLE001 - the other shards still get their turn
                failed = failed or err_
            finally:
                if held:
                    _sys.mutex_unlock(at)
        if failed is not None:
            raise failed
        return healed

    def abandoned(self, shard: int) -> bool:
        """Whether ``shard`` has an entry INSERTING or FREEING (under its mutex, only a change given
        up half way). Whole words: a damaged one is neither (see :meth:`repair`)."""
        states = array("I", self._states(shard))
        return bool(states.count(INSERTING) or states.count(FREEING))

    def unlock(self, shard: int) -> None:
        _sys.mutex_unlock(self.address + SHARDS_AT + shard * SHARD)

    # -- changes (each under the shard's mutex) --------------------------------------------------

    def insert(self, entry: int, record: ZoneRecord, arena: Arena, k: int) -> None:
        """Name block ``k`` of ``arena`` (this worker's, just allocated) ``record`` in EMPTY entry
        ``entry``: the steps of a reserve (see the module's docstring)."""
        self.write(entry, record)
        self.set_state(entry, INSERTING)
        arena.holder[k] = zone_custody(entry)  # the entry holds the block from here
        self.set_state(entry, PUBLISHED)

    def remove(self, entry: int, arena_at: Callable[[int], Arena | None]) -> int:
        """Free published entry ``entry`` and its block: the steps of a free; the bytes freed, or 0
        if its block was not the entry's (damage the checker reports)."""
        self.set_state(entry, FREEING)
        return self._finish_free(entry, arena_at)

    def _finish_free(self, entry: int, arena_at: Callable[[int], Arena | None]) -> int:
        """The steps of a free after FREEING, which a repair repeats for an entry left so: the
        shard's frees bumped first (a remover killed after it leaves it bumped: lookups look again),
        the block released, the entry EMPTY. Each is idempotent. The bytes freed."""
        s = entry // self.per_shard
        self.frees[s] = (self.frees[s] + 1) & 0xFFFFFFFFFFFFFFFF
        freed = self._release(entry, arena_at)
        self.set_state(entry, EMPTY)
        return freed

    def _release(self, entry: int, arena_at: Callable[[int], Arena | None]) -> int:
        """Free the block entry ``entry`` holds, as a remote free does; its bytes, or 0 if it holds
        none (freed already: this step is repeated by a repair). The entry's address is read as it
        is, checksum or not: only a block whose holder word is this entry's is freed."""
        (address,) = _ADDRESS.unpack_from(self.mem, self._at(entry) + 8)
        arena = arena_at(address)
        found = arena.locate(address) if arena is not None else None
        if arena is None or found is None:
            return 0
        k, c = found
        s = arena.state[k]
        if arena.holder[k] != zone_custody(entry):
            return 0
        if s == REMOTE:  # released by a remover that stopped before its hint: the hint again, nothing more
            arena.hint[0] = (arena.hint[0] + 1) & 0xFFFFFFFF  # (a store of REMOTE here could land on the
            return 0  # block after its owner collected it and handed it out anew)
        if s != LIVE and s != DISOWNED:
            return 0
        # REMOTE without the arena's gate, as a block's holder may (see Heap._remote_free): reclaim
        # writes an arena whose blocks name holders block by block, and the owner collects only
        # REMOTE blocks, so no one else writes this LIVE byte meanwhile
        arena.state[k] = REMOTE  # the holder word stays until the arena's owner collects it
        arena.hint[0] = (arena.hint[0] + 1) & 0xFFFFFFFF
        return CLASS_SIZES[c] - arena.slack[k]

    def repair(self, shard: int, arena_at: Callable[[int], Arena | None],
               segments: tuple[SegmentRecord, ...]) -> None:
        """Finish or undo what a holder of ``shard``'s mutex, killed holding it, left half done."""
        per = self.per_shard
        for entry in range(shard * per, (shard + 1) * per):
            state = self.state(entry)
            if state == INSERTING:
                record = self.read(entry, segments)
                held = False
                if not isinstance(record, str):
                    arena = arena_at(record.address)
                    found = arena.locate(record.address) if arena is not None else None
                    if arena is not None and found is not None:
                        held = arena.holder[found[0]] == zone_custody(entry) and arena.state[found[0]] == LIVE
                self.set_state(entry, PUBLISHED if held else EMPTY)
            elif state == FREEING:
                self._finish_free(entry, arena_at)
            # any other state but EMPTY and PUBLISHED is damage: left as it is (the checker reports it),
            # not freed under processes that may hold the zone


def _found(words: bytes, word: bytes) -> Iterator[int]:
    """The indexes of the u32 words of ``words`` (bytes, read from the mapping) equal to ``word``
    (packed). Bytes, not lists of ints: a lookup makes no object the garbage collector tracks, so
    it adds nothing to the collections that other calls pay for."""
    at = words.find(word)
    while at >= 0:
        if not at & 3:
            yield at >> 2
        at = words.find(word, at + 1)


def _decode(raw: bytes, entry: int, segments: tuple[SegmentRecord, ...]) -> ZoneRecord | str:
    _, crc, address, size, iova, created, align, segment, _, name, = _ENTRY.unpack(raw)  # the hash: of name
    if zlib.crc32(memoryview(raw)[8:]) != crc:
        return f"entry {entry} fails its checksum"
    for s in segments:
        if s.id == segment:
            if not (s.address <= address and address + size <= s.address + s.length and size > 0):
                return f"entry {entry}: [{address:#x}, +{size:#x}) lies outside its segment {segment}"
            try:
                text = name.rstrip(b"\0").decode()
            except UnicodeDecodeError:
                return f"entry {entry}: its name is not UTF-8"
            return ZoneRecord(text, address, size, iova, align, segment, NOBODY, created, 0)
    return f"entry {entry}: segment {segment} is not the instance's"

