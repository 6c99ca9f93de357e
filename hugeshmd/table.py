"""The shared table: segments, zones and attached workers of one instance.

One file in the runtime dir (tmpfs), mapped by the primary and by every worker.
It is both the live metadata and the persisted record a restarted primary can
adopt, so it is self-describing (magic, format version, record sizes and
offsets in a checksummed header) and every change is crash-atomic.

Some facts about how it stays consistent without a lock a dead process can keep:

* Writers serialize on ``flock(LOCK_EX)`` on the table file. The kernel releases
  an flock when the last descriptor of its open file goes away, so a writer
  killed mid-change blocks no one (flock(2)); DPDK's shared rwlocks are exactly
  the lock we avoid.
* There are two *slots*, each a full copy of the segment and zone records plus
  a *meta* record (generation, counts, CRC32). Committed generation ``g`` lives
  in slot ``g & 1``. A writer builds ``g + 1`` in the other slot, then stores
  the 8-byte generation word. Killed before that store, it leaves ``g``
  untouched; the store itself is one aligned 8-byte write, which x86-64 never
  tears (LMDB's two meta pages, reduced to one word).
* Readers take no lock. They read the generation, the slot, and the generation
  again, and retry if it moved (a seqlock): the writer of ``g + 2`` reuses the
  slot of ``g``. On x86-64 (TSO) stores become visible in program order, which
  is what this relies on; a weakly ordered CPU would need barriers here.
* An flock belongs to an open file description, not to a process or thread:
  two threads using one descriptor would both "hold" it, and so would a parent
  and a child after fork(2). So a thread lock is taken first, and a process
  that finds its pid changed (a forked child) opens the file anew for locking.
* The worker list is advisory (pid plus start time, checked against /proc), so
  it is updated in place under the same lock without a generation bump; a torn
  entry only ever reads as a dead worker.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

from .errors import OutOfMemory, TableCorrupt

__all__ = ["SegmentRecord", "ZoneRecord", "Snapshot", "Table", "MODE_HUGETLBFS", "MODE_SHM"]

MAGIC = b"HUGESHMD"
FORMAT = 1
HEADER_SIZE = 4096
MODE_HUGETLBFS = 1
MODE_SHM = 2
STATE_STARTING, STATE_READY, STATE_STOPPING = 0, 1, 2
STATE_NAMES = {STATE_STARTING: "starting", STATE_READY: "ready", STATE_STOPPING: "stopping"}
NAME_MAX = 63  # bytes of UTF-8
PATH_MAX = 191

# Static header: written once by the primary, covered by header_crc.
_HEADER = struct.Struct("<8sIIQQQQIIIIIIIIQQQQQQ64s")
_HEADER_CRC = struct.Struct("<I")
_HEADER_CRC_AT = _HEADER.size
# Dynamic words, each naturally aligned.
_GEN_AT = 512  # u64 committed generation
_STATE_AT = 520  # u32 state, u32 primary pid
_STATE = struct.Struct("<II")
_OWNER_START_AT = 528  # u64 primary's start time (with its pid, identifies it across pid reuse)
_U64 = struct.Struct("<Q")
_META = struct.Struct("<QQIII4x")  # generation, segments_generation, seg_count, zone_count, crc
_META_AT = (576, 640)
_SEGMENT = struct.Struct("<IIQQQQiIQII192s")
_ZONE = struct.Struct("<QQQQIIIIQB63s8x")
_WORKER = struct.Struct("<IIQ")  # pid, reserved, start time (clock ticks since boot)
_IOVA = struct.Struct("<Q")


class SegmentRecord(NamedTuple):
    id: int
    address: int
    length: int
    page_size: int
    offset: int  # in the backing file
    numa_node: int  # -1 when unknown or mixed
    iova: int  # of the first page
    iova_index: int  # first entry in the iova array; iova_count 0 means iova == VA
    iova_count: int
    path: str
    flags: int = 0

    def pack(self) -> bytes:
        return _SEGMENT.pack(
            self.id, self.flags, self.address, self.length, self.page_size, self.offset,
            self.numa_node, 0, self.iova, self.iova_index, self.iova_count, _encode_path(self.path),
        )

    @classmethod
    def unpack(cls, fields: tuple) -> SegmentRecord:
        sid, flags, addr, length, psize, off, node, _, iova, idx, cnt, path = fields
        return cls(sid, addr, length, psize, off, node, iova, idx, cnt,
                   path.rstrip(b"\0").decode(), flags)


class ZoneRecord(NamedTuple):
    name: str
    address: int
    size: int
    iova: int
    align: int
    segment: int
    owner: int  # pid of the creator
    created_ns: int
    flags: int = 0

    @property
    def end(self) -> int:
        return self.address + self.size

    def pack(self) -> bytes:
        raw = self.name.encode()
        if not 0 < len(raw) <= NAME_MAX:  # struct would truncate silently, maybe mid-character
            raise ValueError(f"zone name of {len(raw)} bytes does not fit in {NAME_MAX}")
        return _ZONE.pack(
            self.address, self.size, self.iova, self.align, self.segment, self.flags,
            self.owner, 0, self.created_ns, len(raw), raw,
        )

    @classmethod
    def unpack(cls, fields: tuple) -> ZoneRecord:
        addr, size, iova, align, seg, flags, owner, _, created, n, raw = fields
        return cls(raw[:n].decode(), addr, size, iova, align, seg, owner, created, flags)


class Snapshot(NamedTuple):
    """One committed version of the table. Immutable; zones sorted by address."""

    generation: int
    segments_generation: int
    segments: tuple[SegmentRecord, ...]
    zones: tuple[ZoneRecord, ...]

    def zone_index(self) -> dict[str, int]:
        return {zone.name: i for i, zone in enumerate(self.zones)}


class Layout(NamedTuple):
    """The static header: sizes and offsets of every area, and the instance's window."""

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

    @classmethod
    def plan(cls, *, base: int, window: int, page_size: int, mode: int, prefix: str,
             max_segments: int = 256, max_zones: int = 1024, max_workers: int = 1024) -> Layout:
        max_iovas = window // page_size if mode == MODE_HUGETLBFS else 0
        slot_size = _round(max_segments * _SEGMENT.size + max_zones * _ZONE.size)
        iova_at = HEADER_SIZE
        workers_at = iova_at + _round(max_iovas * _IOVA.size)
        slot0 = workers_at + _round(max_workers * _WORKER.size)
        return cls(slot0 + 2 * slot_size, base, window, page_size, mode, max_segments,
                   max_zones, max_workers, max_iovas, iova_at, workers_at,
                   (slot0, slot0 + slot_size), slot_size, time.time_ns(), prefix)

    def pack(self) -> bytes:
        raw = _HEADER.pack(
            MAGIC, FORMAT, HEADER_SIZE, self.file_size, self.base, self.window, self.page_size,
            self.mode, self.max_segments, self.max_zones, self.max_workers, self.max_iovas,
            _SEGMENT.size, _ZONE.size, _WORKER.size, self.iova_at, self.workers_at,
            self.slot_at[0], self.slot_at[1], self.slot_size, self.created_ns,
            self.prefix.encode(),
        )
        return raw + _HEADER_CRC.pack(zlib.crc32(raw))

    @classmethod
    def unpack(cls, buf: bytes | mmap.mmap, path: str) -> Layout:
        if len(buf) < HEADER_SIZE or buf[:8] != MAGIC:
            raise TableCorrupt(f"{path} is not a hugeshmd table (bad magic)", path=path)
        fields = _HEADER.unpack_from(buf, 0)
        (crc,) = _HEADER_CRC.unpack_from(buf, _HEADER_CRC_AT)
        if crc != zlib.crc32(buf[:_HEADER.size]):
            raise TableCorrupt(f"{path}: header checksum mismatch", path=path)
        if fields[1] != FORMAT or fields[12:15] != (_SEGMENT.size, _ZONE.size, _WORKER.size):
            raise TableCorrupt(f"{path}: table format {fields[1]} is not {FORMAT}", path=path)
        (_, _, _, file_size, base, window, psize, mode, mseg, mzone, mwork, miova, _, _, _,
         iova_at, workers_at, s0, s1, ssize, created, prefix) = fields
        return cls(file_size, base, window, psize, mode, mseg, mzone, mwork, miova, iova_at,
                   workers_at, (s0, s1), ssize, created, prefix.rstrip(b"\0").decode())


class Table:
    """A mapped table file. Create with :meth:`create` (primary) or :meth:`open`."""

    def __init__(self, path: str, fd: int, mm: mmap.mmap, layout: Layout) -> None:
        self.path = path
        self.layout = layout
        self._fd = fd
        self._lock_fd = fd
        self._lock_pid = os.getpid()
        self._thread_lock = threading.Lock()
        self._mm = mm
        self._words = memoryview(mm).cast("Q")  # fast generation reads
        self._cache: Snapshot | None = None

    @classmethod
    def create(cls, path: str, layout: Layout, mode: int = 0o644) -> Table:
        """Write a fresh, empty table at ``path`` atomically (temp file + rename)."""
        tmp = f"{path}.new.{os.getpid()}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            os.ftruncate(fd, layout.file_size)
            os.pwrite(fd, layout.pack(), 0)
            os.pwrite(fd, _META.pack(0, 0, 0, 0, zlib.crc32(_META.pack(0, 0, 0, 0, 0)[:24])),
                      _META_AT[0])
            os.rename(tmp, path)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        return cls(path, fd, mmap.mmap(fd, layout.file_size), layout)

    @classmethod
    def open(cls, path: str) -> Table:
        """Map an existing table; TableCorrupt if it fails its checks."""
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_SIZE:
                raise TableCorrupt(f"{path} is truncated ({size} bytes)", path=path)
            mm = mmap.mmap(fd, size)
            try:
                layout = Layout.unpack(mm, path)
                if layout.file_size != size:
                    raise TableCorrupt(f"{path}: size {size} != recorded {layout.file_size}", path=path)
            except BaseException:
                mm.close()
                raise
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, mm, layout)

    def close(self) -> None:
        if self._fd < 0:
            return
        self._words.release()
        self._mm.close()
        if self._lock_fd != self._fd:
            os.close(self._lock_fd)
        os.close(self._fd)
        self._fd = -1

    # -- reading -----------------------------------------------------------

    @property
    def generation(self) -> int:
        return self._words[_GEN_AT // 8]

    def generation_word(self) -> memoryview:
        """A one-element view of the generation word, for the cheapest possible check."""
        return self._words[_GEN_AT // 8 : _GEN_AT // 8 + 1]

    def state(self) -> tuple[int, int]:
        """(state, primary pid)."""
        return _STATE.unpack_from(self._mm, _STATE_AT)

    def set_state(self, state: int, pid: int, start: int = 0) -> None:
        """Record the primary's state and identity (pid and start time)."""
        _U64.pack_into(self._mm, _OWNER_START_AT, start)
        _STATE.pack_into(self._mm, _STATE_AT, state, pid)

    def owner(self) -> tuple[int, int]:
        """(pid, start time) of the primary that last set the state."""
        return _STATE.unpack_from(self._mm, _STATE_AT)[1], _U64.unpack_from(self._mm, _OWNER_START_AT)[0]

    def snapshot(self) -> Snapshot:
        """The committed version; decoded once per generation, then cached."""
        cached = self._cache
        if cached is not None and cached.generation == self.generation:
            return cached
        for _ in range(1000):
            generation = self.generation
            snap = self._decode(generation)
            if snap is not None and self.generation == generation:
                self._cache = snap
                return snap
        raise TableCorrupt(f"{self.path}: generation {generation} fails its checksum", path=self.path)

    def _decode(self, generation: int) -> Snapshot | None:
        meta_at = _META_AT[generation & 1]
        gen, seg_gen, nseg, nzone, crc = _META.unpack_from(self._mm, meta_at)
        if gen != generation or nseg > self.layout.max_segments or nzone > self.layout.max_zones:
            return None
        segs, zones = self._areas(generation & 1, nseg, nzone)
        if zlib.crc32(zones, zlib.crc32(segs, zlib.crc32(self._mm[meta_at : meta_at + 24]))) != crc:
            return None
        return Snapshot(
            gen, seg_gen,
            tuple(SegmentRecord.unpack(f) for f in _SEGMENT.iter_unpack(segs)),
            tuple(ZoneRecord.unpack(f) for f in _ZONE.iter_unpack(zones)),
        )

    def _areas(self, slot: int, nseg: int, nzone: int) -> tuple[bytes, bytes]:
        at = self.layout.slot_at[slot]
        zones_at = at + self.layout.max_segments * _SEGMENT.size
        return self._mm[at : at + nseg * _SEGMENT.size], self._mm[zones_at : zones_at + nzone * _ZONE.size]

    def iova_of(self, segment: SegmentRecord, address: int) -> int:
        """The I/O address of ``address`` in ``segment`` (the VA when iovas are unknown)."""
        if segment.iova_count == 0:
            return address
        offset = address - segment.address
        (page,) = _IOVA.unpack_from(
            self._mm, self.layout.iova_at + (segment.iova_index + offset // segment.page_size) * _IOVA.size
        )
        return page + offset % segment.page_size  # type: ignore[no-any-return]

    # -- writing -----------------------------------------------------------

    @contextmanager
    def locked(self) -> Iterator[Snapshot]:
        """Hold the writer lock; yields the committed snapshot to base a change on."""
        if self._lock_pid != os.getpid():
            self._after_fork()
        with self._thread_lock:
            fd = self._lock_fd
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield self.snapshot()
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _after_fork(self) -> None:
        # A forked child shares the parent's open file description (and so its
        # flock), and inherits the thread lock in whatever state another parent
        # thread left it: it gets a descriptor and a thread lock of its own.
        self._lock_fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        self._thread_lock = threading.Lock()
        self._lock_pid = os.getpid()

    def commit(self, base: Snapshot, *, insert: tuple[int, ZoneRecord] | None = None,
               remove: int | None = None,
               segments: tuple[SegmentRecord, ...] | None = None) -> Snapshot:
        """Publish the version after ``base``: one zone inserted at an index, one
        removed, and/or a new segment list. Call only inside :meth:`locked`."""
        if base.generation != self.generation:
            raise RuntimeError(f"commit on generation {base.generation}, but {self.generation} is committed")
        zones, zone_raw = self._zone_change(base, insert, remove)
        if segments is not None and len(segments) > self.layout.max_segments:
            raise OutOfMemory(f"the segment table is full ({self.layout.max_segments} segments)",
                              size=self.layout.max_segments)
        new = Snapshot(
            base.generation + 1,
            base.generation + 1 if segments is not None else base.segments_generation,
            base.segments if segments is None else segments,
            zones,
        )
        slot = new.generation & 1
        at = self.layout.slot_at[slot]
        zones_at = at + self.layout.max_segments * _SEGMENT.size
        seg_raw = b"".join(s.pack() for s in new.segments)
        self._mm[at : at + len(seg_raw)] = seg_raw
        self._mm[zones_at : zones_at + len(zone_raw)] = zone_raw
        head = _META.pack(new.generation, new.segments_generation, len(new.segments), len(zones), 0)[:24]
        crc = zlib.crc32(zone_raw, zlib.crc32(seg_raw, zlib.crc32(head)))
        _META.pack_into(self._mm, _META_AT[slot], new.generation, new.segments_generation,
                        len(new.segments), len(zones), crc)
        self._words[_GEN_AT // 8] = new.generation  # the commit point
        self._cache = new
        return new

    def _zone_change(self, base: Snapshot, insert: tuple[int, ZoneRecord] | None,
                     remove: int | None) -> tuple[tuple[ZoneRecord, ...], bytes]:
        # Unchanged records are copied as bytes from the committed slot, not
        # packed again: a change packs one record and the rest is a memcpy.
        _, old = self._areas(base.generation & 1, len(base.segments), len(base.zones))
        zones = base.zones
        if remove is not None:
            old = old[: remove * _ZONE.size] + old[(remove + 1) * _ZONE.size :]
            zones = zones[:remove] + zones[remove + 1 :]
        if insert is not None:
            if len(zones) >= self.layout.max_zones:
                raise OutOfMemory(f"the zone table is full ({self.layout.max_zones} zones); "
                                  "start the primary with a larger max_zones", size=self.layout.max_zones)
            i, record = insert
            old = old[: i * _ZONE.size] + record.pack() + old[i * _ZONE.size :]
            zones = zones[:i] + (record,) + zones[i:]
        return zones, old

    def write_iovas(self, index: int, iovas: list[int]) -> None:
        if index + len(iovas) > self.layout.max_iovas:
            raise OverflowError("iova table full")
        struct.pack_into(f"<{len(iovas)}Q", self._mm, self.layout.iova_at + index * _IOVA.size, *iovas)

    # -- workers -------------------------------------------------------------

    def workers(self) -> list[tuple[int, int]]:
        """(pid, start time) of every occupied worker entry, live or not."""
        out = []
        for i in range(self.layout.max_workers):
            pid, _, start = _WORKER.unpack_from(self._mm, self.layout.workers_at + i * _WORKER.size)
            if pid:
                out.append((pid, start))
        return out

    def register_worker(self, pid: int, start: int, alive: Callable[[int, int], bool]) -> int:
        """Claim a free (or dead worker's) entry; returns its index."""
        with self.locked():
            for i in range(self.layout.max_workers):
                at = self.layout.workers_at + i * _WORKER.size
                old_pid, _, old_start = _WORKER.unpack_from(self._mm, at)
                if old_pid == 0 or not alive(old_pid, old_start):
                    _WORKER.pack_into(self._mm, at, pid, 0, start)
                    return i
        raise OutOfMemory(f"the worker table is full ({self.layout.max_workers} live workers); "
                          "start the primary with a larger max_workers", size=self.layout.max_workers)

    def unregister_worker(self, index: int, pid: int) -> None:
        at = self.layout.workers_at + index * _WORKER.size
        with self.locked():
            if _WORKER.unpack_from(self._mm, at)[0] == pid:
                _WORKER.pack_into(self._mm, at, 0, 0, 0)


def _round(size: int, to: int = 4096) -> int:
    return -(-size // to) * to


def _encode_path(path: str) -> bytes:
    raw = path.encode()
    if len(raw) > PATH_MAX:
        raise ValueError(f"backing path too long ({len(raw)} > {PATH_MAX} bytes): {path}")
    return raw
