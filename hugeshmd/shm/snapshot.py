"""The snapshot of one committed version of the shared table, and its indexes.

A :class:`Snapshot` is immutable as seen from outside. It carries three
indexes derived from its zones: zones by name, zone start addresses (to find
a record's position), and the free gaps of every segment (for placement).
They are built on first use, in O(n). A writer's commit then *moves* them into
the next snapshot and updates them for the one zone that changed, so a
reserve or free costs O(gaps) plus memmoves, not a pass over every zone. The
snapshot they were taken from rebuilds them if it is asked again.

So code outside the writer lock must not hold on to an index of a snapshot
while it uses it: another thread's commit may be changing that very list or
dict for the next version. It reads ``zones`` (an immutable tuple), or asks
:meth:`Snapshot.record` or :meth:`Snapshot.zone_at` (each one read of an index
no one changes, or one dict read, atomic in CPython). A search of ``starts``
that the next commit shifted under it once read a live large allocation as
none (:meth:`hugeshmd.shm.heap.Heap._large_record`).

A version can also be *lazy*: its records kept as the bytes they were committed
as, each checked and decoded when it is first read (:meth:`record`,
:meth:`zone_at`), all of them at once when ``zones`` or an index is first asked
for. That is what a reader gets (:mod:`hugeshmd.shm.table`): a fresh worker
attached to a table of a thousand zones checks the records it uses, not a
thousand, and a damaged record fails the reads of that record, not every read.
A writer's commit checks the whole version it builds on first.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from operator import itemgetter

from .layout import NAME_MAX, ZONE, ZONE_CHUNKS, ZONE_KEYS, ZONE_WORDS, SegmentRecord, ZoneRecord

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Protocol

    class Records(Protocol):
        """How a lazy version's records are checked (:class:`hugeshmd.shm.table.Table` has one)."""

        def one(self, chunk: bytes, generation: int) -> ZoneRecord:
            """The record in ``chunk`` (one record's bytes), checked; else TableCorrupt."""

        def all(self, raw: bytes, zone_sum: int, generation: int) -> tuple[ZoneRecord, ...]:
            """Every record in ``raw``, each checked, and all against ``zone_sum`` and each
            other; else TableCorrupt."""

__all__ = ["Snapshot", "Gap"]

Gap = tuple[int, int, int]  # (start, end, segment id): free bytes inside one segment
_AFTER = 1 << 64  # sorts after any end or segment id


class Snapshot:
    """One committed version of the table: its generation, segments and zones (by address)."""

    __slots__ = ("generation", "segments_generation", "segments", "_zones", "zone_bytes", "zone_sum", "_by_name",
                 "_starts", "_gaps", "_records", "_names", "_whole")

    def __init__(self, generation: int, segments_generation: int, segments: tuple[SegmentRecord, ...],
                 zones: tuple[ZoneRecord, ...] | None, zone_bytes: bytes | bytearray | None = None,
                 zone_sum: int = 0, records: Records | None = None) -> None:
        """``zones`` None makes a lazy version, of ``zone_bytes`` checked by ``records``."""
        if zones is None and (zone_bytes is None or records is None):
            raise ValueError("a lazy snapshot needs its records' bytes and what checks them")
        self.generation = generation
        self.segments_generation = segments_generation
        self.segments = segments
        self._zones = zones
        # The bytes the zones were (or, lazy, will be) checked and decoded from and the sum of
        # their CRCs, for the table's next commit; None: pack anew. A bytes object never
        # changes (lazy lookups read it); a bytearray is the commit's to move on and change.
        self.zone_bytes = zone_bytes
        self.zone_sum = zone_sum
        self._records = records
        self._names: dict[bytes, bytes] | None = None  # a lazy version's records by padded name
        self._whole = zones is not None  # every record known good (checked, or carried from a version that was)
        self._by_name: dict[str, ZoneRecord] | None = None
        self._starts: list[int] | None = None
        self._gaps: list[Gap] | None = None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Snapshot) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self) -> tuple[Any, ...]:
        return self.generation, self.segments_generation, self.segments, self.zones

    def __repr__(self) -> str:
        count = len(self._zones) if self._zones is not None else len(self.zone_bytes or b"") // ZONE.size
        return (f"Snapshot(generation={self.generation}, segments_generation={self.segments_generation}, "
                f"segments={len(self.segments)}, zones={count}{', lazy' if self._zones is None else ''})")

    # -- records ---------------------------------------------------------------------

    @property
    def zones(self) -> tuple[ZoneRecord, ...]:
        """Every zone record, by address; a lazy version checks them all on first use (TableCorrupt
        if one fails)."""
        zones = self._zones
        if zones is None:
            assert self._records is not None  # a lazy version has it
            zones = self._zones = self._records.all(self.raw, self.zone_sum, self.generation)
            self._whole = True
        return zones

    @property
    def raw(self) -> bytes:
        """A lazy (or once lazy) version's records, as committed: bytes that never change."""
        raw = self.zone_bytes
        assert isinstance(raw, bytes), "only a version decoded lazily keeps its records' bytes for reading"
        return raw

    @property
    def lazy(self) -> bool:
        """Whether this version's records are still checked one by one, as they are read."""
        return self._zones is None

    def record(self, name: str) -> ZoneRecord | None:
        """The zone called ``name``, or None; TableCorrupt if its record fails its checks. Safe
        outside the writer lock (see the module's docstring); a lazy version checks this one
        record, and builds its index of names (one pass in C) on first use. Before it answers
        None it checks every record once: a name damaged in its record must not read as absent."""
        names = self._names
        if names is None:
            if self._zones is not None:
                by_name = self._by_name
                return (by_name if by_name is not None else self.by_name).get(name)
            names = self._names = _name_index(self.raw)
        if not isinstance(name, str):
            return None
        try:
            chunk = names.get(name.encode().ljust(NAME_MAX, b"\0"))
        except UnicodeEncodeError:
            return None
        if chunk is None:
            self._check_whole()  # TableCorrupt if a record is damaged; the index then holds every name
            return None
        assert self._records is not None  # a version with a name index is, or was, lazy
        record = self._records.one(chunk, self.generation)
        if record.name == name:
            return record
        self._check_whole()
        return None

    def zone_at(self, address: int) -> ZoneRecord | None:
        """The zone that starts at ``address``, or None; TableCorrupt if its record fails its
        checks. Safe outside the writer lock, as :meth:`record`."""
        zones = self._zones
        if zones is not None:
            i = bisect_left(zones, address, key=_address)
            return zones[i] if i < len(zones) and zones[i].address == address else None
        raw = self.raw
        assert self._records is not None  # a lazy version has it
        starts = memoryview(raw).cast("Q")[::ZONE_WORDS]  # the first word of each record; never changes
        i = bisect_left(starts, address)
        if i < len(starts) and starts[i] == address:
            record = self._records.one(raw[i * ZONE.size : (i + 1) * ZONE.size], self.generation)
            if record.address == address:
                return record
        if self._whole:
            return None
        self._check_whole()  # a damaged address could have misdirected the search: all checked, then again
        return self.zone_at(address)

    def _check_whole(self) -> None:
        """Check every record of a lazy version (TableCorrupt if one fails), before it answers that
        something is not there; it stays lazy (a reader's catch-ups stay cheap), known whole."""
        if not self._whole:
            assert self._records is not None  # a lazy version has it
            self._records.all(self.raw, self.zone_sum, self.generation)
            self._whole = True

    # -- derived indexes -----------------------------------------------------------

    @property
    def by_name(self) -> dict[str, ZoneRecord]:
        if self._by_name is None:
            self._by_name = {zone.name: zone for zone in self.zones}
        return self._by_name

    @property
    def starts(self) -> list[int]:
        if self._starts is None:
            self._starts = [zone.address for zone in self.zones]
        return self._starts

    @property
    def gaps(self) -> list[Gap]:
        """Free runs inside segments, by address. Zero-length runs are left out."""
        if self._gaps is None:
            self._gaps = _gaps(self.segments, self.zones)
        return self._gaps

    def index_of(self, zone: ZoneRecord) -> int:
        return bisect_left(self.starts, zone.address)

    # -- the next version ------------------------------------------------------------

    def changed(self, generation: int, zone_bytes: bytes, zone_sum: int, removed: bytes | None,
                inserted: bytes | None) -> Snapshot:
        """The lazy version ``generation`` after this lazy one, of records ``zone_bytes``: this
        one's with ``removed`` (one record's bytes) taken out and ``inserted`` put in. Its
        name index is this one's, copied and updated, if this one has built it."""
        new = Snapshot(generation, self.segments_generation, self.segments, None, zone_bytes, zone_sum, self._records)
        new._whole = self._whole  # what changed was checked: the inserted record whole, the rest is this one's bytes
        names = self._names
        if names is not None:
            names = dict(names)
            if removed is not None:
                key = _first(ZONE_KEYS.unpack(removed))
                if names.get(key) == removed:
                    del names[key]
            if inserted is not None:
                names[_first(ZONE_KEYS.unpack(inserted))] = inserted
            new._names = names
        return new

    def successor(self, segments: tuple[SegmentRecord, ...] | None, insert: ZoneRecord | None,
                  remove: ZoneRecord | None, copy: bool = False) -> Snapshot:
        """The next version, taking this one's indexes along (updated) when it has them; with
        ``copy``, copies of them, leaving this version whole (a reader's path: other threads
        may be reading it)."""
        zones = self._zones if self._zones is not None else self.zones
        if segments is not None:
            moved: tuple[Any, Any, Any] = (None, None, None)
        elif copy:
            moved = (None if self._by_name is None else dict(self._by_name),
                     None if self._starts is None else list(self._starts),
                     None if self._gaps is None else list(self._gaps))
        else:
            moved = (self._by_name, self._starts, self._gaps)
        if not copy:
            self._by_name = self._starts = self._gaps = None
        by_name, starts, gaps = moved
        if remove is not None:
            i = bisect_left(self.starts if starts is None else starts, remove.address)
            zones = zones[:i] + zones[i + 1 :]
            _forget(remove, i, by_name, starts, gaps)
        if insert is not None:
            i = bisect_left(starts if starts is not None else [z.address for z in zones], insert.address)
            zones = zones[:i] + (insert,) + zones[i:]
            _remember(insert, i, by_name, starts, gaps)
        new = Snapshot(self.generation + 1,
                       self.generation + 1 if segments is not None else self.segments_generation,
                       self.segments if segments is None else segments, zones)
        new._by_name, new._starts, new._gaps = by_name, starts, gaps
        return new


_address = itemgetter(1)  # ZoneRecord.address
_first = itemgetter(0)


def _name_index(raw: bytes) -> dict[bytes, bytes]:
    """Each record's bytes in ``raw`` by its padded name field: passes in C, no record decoded."""
    return dict(zip(map(_first, ZONE_KEYS.iter_unpack(raw)), map(_first, ZONE_CHUNKS.iter_unpack(raw)),
                    strict=True))


def _gaps(segments: tuple[SegmentRecord, ...], zones: tuple[ZoneRecord, ...]) -> list[Gap]:
    gaps: list[Gap] = []
    i = 0
    for segment in sorted(segments, key=lambda s: s.address):
        cursor, end = segment.address, segment.address + segment.length
        while i < len(zones) and zones[i].address < end:
            if zones[i].address > cursor:
                gaps.append((cursor, zones[i].address, segment.id))
            cursor = max(cursor, zones[i].end)
            i += 1
        if cursor < end:
            gaps.append((cursor, end, segment.id))
    return gaps


def _remember(zone: ZoneRecord, i: int, by_name: dict[str, ZoneRecord] | None, starts: list[int] | None,
              gaps: list[Gap] | None) -> None:
    if by_name is not None:
        by_name[zone.name] = zone
    if starts is not None:
        starts.insert(i, zone.address)
    if gaps is not None:  # split the gap the zone was placed in
        g = bisect_right(gaps, (zone.address, _AFTER, _AFTER)) - 1  # tuples compare in C: no key function
        start, end, sid = gaps[g]
        address = zone.address
        after = address + zone.size
        if start < address:
            if after < end:
                gaps[g : g + 1] = (start, address, sid), (after, end, sid)
            else:
                gaps[g] = (start, address, sid)
        elif after < end:
            gaps[g] = (after, end, sid)
        else:
            del gaps[g]


def _forget(zone: ZoneRecord, i: int, by_name: dict[str, ZoneRecord] | None, starts: list[int] | None,
            gaps: list[Gap] | None) -> None:
    if by_name is not None:
        del by_name[zone.name]
    if starts is not None:
        del starts[i]
    if gaps is not None:  # give the zone's run back, merged with free neighbours in its segment
        start = zone.address
        end = start + zone.size
        g = bisect_left(gaps, (start,))
        if g > 0 and gaps[g - 1][1] == start and gaps[g - 1][2] == zone.segment:
            g -= 1
            start = gaps[g][0]
            del gaps[g]
        if g < len(gaps) and gaps[g][0] == end and gaps[g][2] == zone.segment:
            end = gaps[g][1]
            del gaps[g]
        gaps.insert(g, (start, end, zone.segment))
