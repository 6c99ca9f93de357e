"""The instance on disk: every struct, offset and the format version of the shared table file.

This module is the one owner of the table's bytes. :mod:`hugeshmd.shm.table`
maps the file and commits changes; :mod:`hugeshmd.shm.snapshot` indexes one
committed version; the worker registry lives in :mod:`hugeshmd.shm.registry`.
None of them spells a struct or an offset of its own.

The file, in order (every area page-aligned, every offset in the header)::

    header      4096 B   static: magic, FORMAT, sizes and offsets of every area, the
                         window, page size, mode, prefix, 16 random bytes naming the instance,
                         then its CRC32; a few dynamic words after it (below)
    iovas       8 B per page of the window (hugetlbfs only): physical addresses
    workers     16 B per worker entry: pid, epoch, start time
    slot 0      segment records, then zone records   } committed generation g
    slot 1      segment records, then zone records   } lives in slot g & 1

The dynamic words of the header (each naturally aligned, none covered by the
header CRC): the committed generation at 512, the primary's state and pid at
520, its start time at 528, how many primaries adopted the instance at 540,
the two *meta* records (generation, segments generation, counts, sum of zone
CRCs, CRC of the meta and segment records) at 576 and 640, one per slot, and
the two *change* records at 1024 and 1280: what the commit of that slot's
generation changed (a record inserted, one removed), for readers one
generation behind. Readers trust nothing here that the checks in
:meth:`Layout.unpack` and the table's decode have not verified.

FORMAT 2 (this one) differs from 1 in the zone record, which now carries its
owner as a worker slot, the slot's epoch and the owner's pid and start time
(:class:`Owner`): a token that pid reuse cannot fool, fit for reclaiming a dead
worker's memory. A table of another format is refused as TableCorrupt.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
import zlib
from collections import namedtuple

from ..errors import TableCorrupt
from .paths import segment_name  # the one module that spells the names of an instance's files

TYPE_CHECKING = False  # typing costs a worker's import ~5 ms; annotations are strings anyway
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "MAGIC", "FORMAT", "HEADER_SIZE", "MODE_HUGETLBFS", "MODE_SHM", "STATE_STARTING", "STATE_READY",
    "STATE_STOPPING", "STATE_NAMES", "NAME_MAX", "PATH_MAX", "SEGMENT", "ZONE", "ZONE_BODY", "ZONE_KEYS",
    "ZONE_CHUNKS", "ZONE_WORDS", "META", "META_HEAD",
    "META_AT", "CHANGE", "CHANGE_AT", "CHANGE_INSERT", "CHANGE_REMOVE", "CHANGE_OTHER", "WORKER", "IOVA", "U32",
    "U64", "GEN_AT", "STATE", "STATE_AT", "OWNER_START_AT",
    "ADOPTIONS_AT", "NO_SLOT", "ZONE_HEAP", "ZONE_DISOWNED", "ZONE_HEAP_META", "ZONE_CHANNEL", "ZONE_HANDED",
    "NOBODY", "Layout", "Owner", "SegmentRecord", "ZoneRecord", "check_segments",
]  # fmt: skip

MAGIC = b"HUGESHMD"
FORMAT = 2
HEADER_SIZE = 4096
MODE_HUGETLBFS = 1
MODE_SHM = 2
STATE_STARTING, STATE_READY, STATE_STOPPING = 0, 1, 2
STATE_NAMES = {STATE_STARTING: "starting", STATE_READY: "ready", STATE_STOPPING: "stopping"}
NAME_MAX = 63  # bytes of UTF-8
PATH_MAX = 191
NO_SLOT = 0xFFFFFFFF  # a zone owner that is no registered worker (the primary, on a client's behalf)
# Zone flags. The heap (hugeshmd.shm.heap) keeps its directory and arenas in zones marked
# ZONE_HEAP_META, and each large allocation in a zone marked ZONE_HEAP (ZONE_DISOWNED once its
# maker gave it up: it outlives its owner). Their names start with "." (zones.RESERVED).
# A zone marked ZONE_CHANNEL is a channel (hugeshmd.shm.channel); a large allocation marked
# ZONE_HANDED is in a channel's custody (its owner's epoch is the channel's holder word).
ZONE_HEAP, ZONE_DISOWNED, ZONE_HEAP_META, ZONE_CHANNEL, ZONE_HANDED = 1, 2, 4, 8, 16

# Static header: written once by the primary, covered by the CRC32 that follows it.
_HEADER = struct.Struct("<8sIIQQQQIIIIIIIIQQQQQQ64s16s")
_HEADER_CRC = struct.Struct("<I")
# Dynamic words, each naturally aligned.
GEN_AT = 512  # u64 committed generation
STATE_AT = 520  # u32 state, u32 primary pid
STATE = struct.Struct("<II")
OWNER_START_AT = 528  # u64 primary's start time (with its pid, identifies it across pid reuse)
ADOPTIONS_AT = 540  # u32 how many primaries adopted this instance after the one that made it
U64 = struct.Struct("<Q")
U32 = struct.Struct("<I")
# generation, segments generation, segment count, zone count, sum of zone CRCs, CRC of the rest + segments
META = struct.Struct("<QQIIII")
META_HEAD = META.size - 4
META_AT = (576, 640)
# What the commit of a generation changed, so a reader one generation behind applies it instead of
# decoding every record: generation, kind (CHANGE_* bits), index of the removed record in the
# version before, the inserted record's bytes. One per slot, beside the metas.
CHANGE_INSERT, CHANGE_REMOVE, CHANGE_OTHER = 1, 2, 4  # OTHER: segments changed: decode it all
WORKER = struct.Struct("<IIQ")  # pid, epoch (claims of this entry so far), start time (clock ticks since boot)
IOVA = struct.Struct("<Q")
# id, flags, address, length, page size, offset, numa node, reserved, iova, iova index, iova count, path
SEGMENT = struct.Struct("<IIQQQQiIQII192s")
# address, size, iova, align, segment, flags, owner slot, owner epoch, owner pid, reserved,
# owner start time, created, name length, name, crc32 of the rest
ZONE = struct.Struct("<QQQQIIIIIIQQB63sI4x")
ZONE_BODY = ZONE.size - 8  # what the record's crc32 covers
_ZONE_BODY, _ZONE_TAIL = struct.Struct("<QQQQIIIIIIQQB63s"), struct.Struct("<I4x")  # ZONE's two parts
# Read straight from a run of zone records, without decoding them: the padded name field of each
# (names hold no NUL, so the padding is unambiguous), each record's bytes, and the words per record
# (the address is a record's first word, its size the second).
ZONE_KEYS = struct.Struct(f"<{ZONE_BODY - NAME_MAX}x{NAME_MAX}s{ZONE.size - ZONE_BODY}x")
ZONE_CHUNKS = struct.Struct(f"{ZONE.size}s")
ZONE_WORDS = ZONE.size // 8
CHANGE = struct.Struct(f"<QII{ZONE.size}s")
CHANGE_AT = (1024, 1024 + 256)  # two 256-byte slots in the header's dynamic area


def _round(size: int, to: int = 4096) -> int:
    return -(-size // to) * to


class Layout(namedtuple("Layout", "file_size base window page_size mode max_segments max_zones max_workers "
                                  "max_iovas iova_at workers_at slot_at slot_size created_ns prefix instance_id")):
    """The static header: sizes and offsets of every area, and the instance's window."""

    __slots__ = ()
    if TYPE_CHECKING:
        file_size: int
        base: int
        window: int
        page_size: int
        mode: int
        max_segments: int
        max_zones: int
        max_workers: int
        max_iovas: int
        iova_at: int
        workers_at: int
        slot_at: tuple[int, int]
        slot_size: int
        created_ns: int
        prefix: str
        instance_id: bytes  # 16 random bytes naming this instance (a fresh start makes new ones)

    @classmethod
    def plan(cls, *, base: int, window: int, page_size: int, mode: int, prefix: str,
             max_segments: int = 256, max_zones: int = 1024, max_workers: int = 1024) -> Layout:
        max_iovas = window // page_size if mode == MODE_HUGETLBFS else 0
        slot_size = _round(max_segments * SEGMENT.size + max_zones * ZONE.size)
        iova_at = HEADER_SIZE
        workers_at = iova_at + _round(max_iovas * IOVA.size)
        slot0 = workers_at + _round(max_workers * WORKER.size)
        return cls(slot0 + 2 * slot_size, base, window, page_size, mode, max_segments,
                   max_zones, max_workers, max_iovas, iova_at, workers_at,
                   (slot0, slot0 + slot_size), slot_size, time.time_ns(), prefix, os.urandom(16))

    def zones_at(self, slot: int) -> int:
        """Offset of the zone records of ``slot`` (0 or 1)."""
        return self.slot_at[slot] + self.max_segments * SEGMENT.size

    def pack(self) -> bytes:
        raw = _HEADER.pack(
            MAGIC, FORMAT, HEADER_SIZE, self.file_size, self.base, self.window, self.page_size,
            self.mode, self.max_segments, self.max_zones, self.max_workers, self.max_iovas,
            SEGMENT.size, ZONE.size, WORKER.size, self.iova_at, self.workers_at,
            self.slot_at[0], self.slot_at[1], self.slot_size, self.created_ns,
            self.prefix.encode(), self.instance_id,
        )
        return raw + _HEADER_CRC.pack(zlib.crc32(raw))

    @classmethod
    def unpack(cls, buf: bytes | mmap.mmap, path: str) -> Layout:
        """The header of ``buf``; TableCorrupt if its magic, checksum, format or areas fail."""
        if len(buf) < HEADER_SIZE or buf[:8] != MAGIC:
            raise TableCorrupt(f"{path} is not a hugeshmd table (bad magic)", path=path)
        fields = _HEADER.unpack_from(buf, 0)
        (crc,) = _HEADER_CRC.unpack_from(buf, _HEADER.size)
        if crc != zlib.crc32(buf[:_HEADER.size]):
            raise TableCorrupt(f"{path}: header checksum mismatch", path=path)
        if fields[1] != FORMAT or fields[12:15] != (SEGMENT.size, ZONE.size, WORKER.size):
            raise TableCorrupt(f"{path}: table format {fields[1]} is not {FORMAT}", path=path)
        (_, _, _, file_size, base, window, psize, mode, mseg, mzone, mwork, miova, _, _, _,
         iova_at, workers_at, s0, s1, ssize, created, prefix, instance_id) = fields
        return cls(file_size, base, window, psize, mode, mseg, mzone, mwork, miova, iova_at,
                   workers_at, (s0, s1), ssize, created, prefix.rstrip(b"\0").decode(), instance_id)


class Owner(namedtuple("Owner", "slot epoch pid start")):
    """Who owns a zone: a worker entry (``slot``) in the claim ``epoch`` of it, and that
    worker's ``pid`` and ``start`` time (clock ticks since boot, proc(5) stat field 22).

    The slot and epoch say which registration made it (an entry claimed again
    has a new epoch), the pid and start time which process: neither a reused
    pid nor a reused entry can pass for the owner. ``slot`` is :data:`NO_SLOT`
    for zones the primary made on a client's behalf.
    """

    __slots__ = ()
    if TYPE_CHECKING:
        slot: int
        epoch: int
        pid: int
        start: int


NOBODY = Owner(NO_SLOT, 0, 0, 0)


class SegmentRecord(namedtuple("SegmentRecord", "id address length page_size offset numa_node iova "
                                                "iova_index iova_count path flags", defaults=(0,))):
    """A run of pages contiguous in VA and in its backing file (``path`` at ``offset``).

    ``iova`` is the first page's I/O address; ``iova_count`` entries from
    ``iova_index`` in the table's iova array give every page's (0: iova is VA).
    ``numa_node`` is -1 when unknown or mixed.
    """

    __slots__ = ()
    if TYPE_CHECKING:
        id: int
        address: int
        length: int
        page_size: int
        offset: int
        numa_node: int
        iova: int
        iova_index: int
        iova_count: int
        path: str
        flags: int

    @property
    def end(self) -> int:
        return self.address + self.length

    def pack(self) -> bytes:
        raw = self.path.encode()
        if len(raw) > PATH_MAX:
            raise ValueError(f"backing path too long ({len(raw)} > {PATH_MAX} bytes): {self.path}")
        return SEGMENT.pack(self.id, self.flags, self.address, self.length, self.page_size, self.offset,
                            self.numa_node, 0, self.iova, self.iova_index, self.iova_count, raw)

    @classmethod
    def unpack(cls, fields: tuple[Any, ...]) -> SegmentRecord:
        sid, flags, addr, length, psize, off, node, _, iova, idx, cnt, path = fields
        return cls(sid, addr, length, psize, off, node, iova, idx, cnt, path.rstrip(b"\0").decode(), flags)


class ZoneRecord(namedtuple("ZoneRecord", "name address size iova align segment owner created_ns flags",
                            defaults=(NOBODY, 0, 0))):
    """A named zone: ``size`` bytes at ``address`` in segment ``segment``, made by ``owner``."""

    __slots__ = ()
    if TYPE_CHECKING:
        name: str
        address: int
        size: int
        iova: int
        align: int
        segment: int
        owner: Owner
        created_ns: int
        flags: int

    @property
    def end(self) -> int:
        return self.address + self.size

    def pack(self, crc32: object) -> bytes:
        """The record's bytes, ending in the crc32 (``zlib.crc32``) of the rest."""
        raw = self.name.encode()
        if not 0 < len(raw) <= NAME_MAX:  # struct would truncate silently, maybe mid-character
            raise ValueError(f"zone name of {len(raw)} bytes does not fit in {NAME_MAX}")
        slot, epoch, pid, start = self.owner
        body = _ZONE_BODY.pack(self.address, self.size, self.iova, self.align, self.segment, self.flags,
                               slot, epoch, pid, 0, start, self.created_ns, len(raw), raw)
        return body + _ZONE_TAIL.pack(crc32(body))  # type: ignore[operator]

    @classmethod
    def unpack(cls, fields: tuple[Any, ...]) -> ZoneRecord:
        addr, size, iova, align, seg, flags, slot, epoch, pid, _, start, created, n, raw, _ = fields
        key = (slot, epoch, pid, start)
        owner = _owners.get(key)
        if owner is None:  # a few workers own every zone: one Owner each, not one per record
            if len(_owners) > 4096:
                _owners.clear()
            owner = _owners[key] = Owner(*key)
        return _tuple_new(cls, (raw[:n].decode(), addr, size, iova, align, seg, owner, created, flags))


_tuple_new = tuple.__new__
_owners: dict[tuple[int, int, int, int], Owner] = {}


def check_segments(layout: Layout, segments: tuple[SegmentRecord, ...]) -> str | None:
    """What is wrong with ``segments`` as records of the table ``layout`` heads, or None.

    A forged record with valid checksums must not make a worker map something
    else, or somewhere else: each segment lies inside the window, whole pages of
    the instance's page size, none overlapping, each backed by this instance's
    own segment file of its id (``hugeshmd.<prefix>.seg<id>``, an absolute path).
    """
    end = layout.base
    for s in sorted(segments, key=_address) if len(segments) > 1 else segments:
        wrong = None
        if s.address < end or s.address + s.length > layout.base + layout.window or s.length <= 0:
            wrong = "lies outside the window or overlaps another"
        elif s.page_size != layout.page_size or s.address % s.page_size or s.length % s.page_size:
            wrong = f"is not whole pages of {layout.page_size} bytes"
        elif not s.path.startswith("/") or s.path.rpartition("/")[2] != segment_name(layout.prefix, s.id):
            wrong = f"names {s.path!r}, not a segment file of prefix {layout.prefix!r}"
        if wrong is not None:
            return f"segment {s.id} [{s.address:#x}, +{s.length:#x}) {wrong}"
        end = s.address + s.length
    return None


def _address(segment: SegmentRecord) -> int:
    return segment.address
