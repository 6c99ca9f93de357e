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
dict for the next version. It reads ``zones`` (an immutable tuple), or makes
one lookup in ``by_name`` (one dict read, atomic in CPython). A search of
``starts`` that the next commit shifted under it once read a live large
allocation as none (:meth:`hugeshmd.shm.heap.Heap._large_record`).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

from .layout import SegmentRecord, ZoneRecord

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["Snapshot", "Gap"]

Gap = tuple[int, int, int]  # (start, end, segment id): free bytes inside one segment
_AFTER = 1 << 64  # sorts after any end or segment id


class Snapshot:
    """One committed version of the table: its generation, segments and zones (by address)."""

    __slots__ = ("generation", "segments_generation", "segments", "zones", "zone_bytes", "zone_sum", "_by_name",
                 "_starts", "_gaps")

    def __init__(self, generation: int, segments_generation: int, segments: tuple[SegmentRecord, ...],
                 zones: tuple[ZoneRecord, ...], zone_bytes: bytes | bytearray | None = None,
                 zone_sum: int = 0) -> None:
        self.generation = generation
        self.segments_generation = segments_generation
        self.segments = segments
        self.zones = zones
        # The checked bytes the zones were decoded from and the sum of their CRCs, for the
        # table's next commit (which moves them on, as it moves the indexes); None: pack anew.
        self.zone_bytes = zone_bytes
        self.zone_sum = zone_sum
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
        return (f"Snapshot(generation={self.generation}, segments_generation={self.segments_generation}, "
                f"segments={len(self.segments)}, zones={len(self.zones)})")

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

    def successor(self, segments: tuple[SegmentRecord, ...] | None, insert: ZoneRecord | None,
                  remove: ZoneRecord | None, copy: bool = False) -> Snapshot:
        """The next version, taking this one's indexes along (updated) when it has them; with
        ``copy``, copies of them, leaving this version whole (a reader's path: other threads
        may be reading it)."""
        zones = self.zones
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
        gaps[g : g + 1] = [gap for gap in ((start, zone.address, sid), (zone.end, end, sid)) if gap[0] < gap[1]]


def _forget(zone: ZoneRecord, i: int, by_name: dict[str, ZoneRecord] | None, starts: list[int] | None,
            gaps: list[Gap] | None) -> None:
    if by_name is not None:
        del by_name[zone.name]
    if starts is not None:
        del starts[i]
    if gaps is not None:  # give the zone's run back, merged with free neighbours in its segment
        g = bisect_left(gaps, (zone.address,))
        start, end = zone.address, zone.end
        if g > 0 and gaps[g - 1][1] == start and gaps[g - 1][2] == zone.segment:
            g -= 1
            start = gaps[g][0]
            del gaps[g]
        if g < len(gaps) and gaps[g][0] == end and gaps[g][2] == zone.segment:
            end = gaps[g][1]
            del gaps[g]
        gaps.insert(g, (start, end, zone.segment))
