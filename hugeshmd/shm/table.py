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
  a *meta* record (generation, counts, checksums). Committed generation ``g`` lives
  in slot ``g & 1``. A writer builds ``g + 1`` in the other slot, then stores
  the 8-byte generation word. Killed before that store, it leaves ``g``
  untouched; the store itself is one aligned 8-byte write, which x86-64 never
  tears (LMDB's two meta pages, reduced to one word).
* Readers take no lock. They read the generation, the slot, and the generation
  again, and retry if it moved (a seqlock): the writer of ``g + 2`` reuses the
  slot of ``g``. On x86-64 (TSO) stores become visible in program order, which
  is what this relies on; a weakly ordered CPU would need barriers here.
* An flock belongs to an open file description, not to a process or thread
  (flock(2)): two threads using one descriptor would both "hold" it, so a
  thread lock is taken first. A child made by fork(2) shares its parent's
  descriptions: were the parent killed while holding the lock, the child's
  copy would keep it held for everyone. So the lock is taken on a description
  of its own (the mapping's, which Python's mmap dups, is never locked), which
  is closed in forked children (see :mod:`hugeshmd._fork`); a child opens a
  new one when it needs it, through /proc/self/fd so that it is the same file
  even if unlinked.
* Readers normally take no lock at all. One that keeps seeing the generation
  move (a fast writer, a large table) reads once under LOCK_SH between two
  writers, so it always makes progress; a decode that fails while the
  generation stood still is corruption, never a race.
* Checksums cost O(1) per change: each zone record carries the CRC32 of its
  own bytes, and the meta record the sum of those (mod 2**32) plus a CRC32 of
  itself and the segment records. A writer adjusts the sum for the one record
  it changed. A reader that decodes a generation checks the meta, the segments
  and the sum at once, and each zone record when it first reads it (a lazy
  :class:`~hugeshmd.shm.snapshot.Snapshot`): attaching to a table of a thousand
  zones costs the records a worker uses. A writer checks every record of the
  version it builds on before its first commit, so it never carries a bad one
  into a version of its own.
* The worker registry (:mod:`hugeshmd.shm.registry`) is updated in place under
  the same lock without a generation bump; a torn entry only ever reads as a
  dead worker.
* Nothing that another process may read at the same time is written with
  ``struct.pack_into``: CPython's pack_into zeroes its whole target before it
  writes the fields, so a reader could see zeros that were never the value,
  and a writer killed in between leaves them. Shared bytes are written as one
  copy of bytes packed beforehand (a slice assignment: memcpy), or a word at a
  time through a cast memoryview (one aligned store each).

The bytes themselves (structs, offsets, the format version) are declared in
:mod:`hugeshmd.shm.layout`, and nowhere else.
"""

from __future__ import annotations

import _thread
import fcntl
import mmap
import operator
import os
import struct
import time
import zlib
from array import array
from bisect import bisect_left
from collections.abc import Callable

from .. import _fork, _sys
from ..errors import TableBusy, TableCorrupt, TableFull
from . import guard
from .identity import describe_holder, process_state
from .layout import (
    ADOPTIONS_AT,
    CHANGE,
    CHANGE_AT,
    CHANGE_INSERT,
    CHANGE_OTHER,
    CHANGE_REMOVE,
    GEN_AT,
    HEADER_SIZE,
    IOVA,
    META,
    META_AT,
    META_HEAD,
    OWNER_START_AT,
    SEGMENT,
    STATE,
    STATE_AT,
    STATE_STOPPING,
    U32,
    U64,
    ZONE,
    ZONE_BODY,
    ZONE_WORDS,
    Layout,
    SegmentRecord,
    ZoneRecord,
    check_segments,
)
from .paths import TABLE_TEMP
from .snapshot import Snapshot

__all__ = ["Table", "DEFAULT_LOCK_TIMEOUT"]


DEFAULT_LOCK_TIMEOUT = 5.0  # seconds a writer waits for the lock unless told otherwise
_EX_NB = fcntl.LOCK_EX | fcntl.LOCK_NB
_GEN_WORD = GEN_AT // 8


class _WriteLock:
    """The context of :meth:`Table.locked`: thread lock, then flock; yields the snapshot."""

    __slots__ = ("_table", "_timeout", "_fd", "_epoch")

    def __init__(self, table: Table, timeout: float | None) -> None:
        self._table = table
        self._timeout = timeout

    def __enter__(self) -> Snapshot:
        table = self._table
        self._epoch = _fork.epoch
        if not table._thread_lock.acquire(False):  # free: the common case, no timed wait to set up
            table._take_thread_lock(table.lock_timeout if self._timeout is None else self._timeout)
        try:
            fd = self._fd = table._lock_fd if table._lock_fd >= 0 else table._lock_descriptor()
            try:
                fcntl.flock(fd, _EX_NB)
            except BlockingIOError:
                _flock(fd, fcntl.LOCK_EX, table.lock_timeout if self._timeout is None else self._timeout, table)
            try:
                return table.snapshot()
            except BaseException:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                raise
        except BaseException:
            table._thread_lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        if self._epoch != _fork.epoch:
            return  # forked inside the with: this child holds neither lock, its parent does
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._table._thread_lock.release()


def _flock(fd: int, operation: int, timeout: float, table: Table) -> None:
    """flock(2), retried with backoff until ``timeout`` (then TableBusy naming the holder).

    flock has no timed wait; the back-off grows to 5 ms, so a waiter notices a
    released lock within 5 ms and costs a few hundred wake-ups a second.
    """
    deadline, pause = time.monotonic() + timeout, 0.0001
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise table.busy(timeout) from None
            time.sleep(pause)
            pause = min(pause * 2, 0.005)


class Table:
    """A mapped table file. Create with :meth:`create` (primary) or :meth:`open`."""

    def __init__(self, path: str, fd: int, mm: mmap.mmap, layout: Layout) -> None:
        self.path = path
        self.layout = layout
        self._fd = fd
        self._lock_fd = -1  # opened on first use: see "An flock belongs to..." above
        self.read_timeout: float | None = None  # for a reader that must not wait behind a stuck writer
        self.lock_timeout = DEFAULT_LOCK_TIMEOUT  # the most any writer of this process waits for the lock
        self.damaged: str | None = None  # why this mapping can no longer be trusted (see hugeshmd.shm.guard)
        self._thread_lock = _thread.allocate_lock()
        self._mm = mm
        self._view = memoryview(mm)
        self._words = self._view.cast("Q")  # fast generation reads
        self._cache: Snapshot | None = None
        self._checker: _Records | None = None  # checks zone records against the current segments, each once
        # the segment records last checked: their bytes, the records, their CRC
        self._segments_seen: tuple[bytes, tuple[SegmentRecord, ...], int] = (b"\0", (), 0)
        self._address = _sys.buffer_address(mm)
        guard.watch(self, self._address, layout.file_size)  # a truncation under us is TableCorrupt, not SIGBUS
        self._segments_at = layout.slot_at
        self._zones_at = (layout.zones_at(0), layout.zones_at(1))
        # the last segments written, packed, and their CRC
        self._segments_packed: tuple[tuple[SegmentRecord, ...], bytes, int] = ((), b"", 0)
        _fork.register(self)

    @classmethod
    def create(cls, path: str, layout: Layout, mode: int = 0o660,
               own_fd: Callable[[int], None] | None = None, segments: tuple[SegmentRecord, ...] = ()) -> Table:
        """Write a fresh table at ``path`` atomically (temp file + rename): generation 0, holding
        ``segments`` and no zone.

        ``own_fd`` gives the file its owner group and mode before the rename,
        so that no one ever opens it with the wrong ones. A table appears with
        its first segment or not at all: no one sees a table without memory.
        """
        _check_capacity(layout, segments)
        packed = b"".join(s.pack() for s in segments)
        tmp = f"{path}{TABLE_TEMP}{os.getpid()}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            if own_fd is not None:
                own_fd(fd)
            os.ftruncate(fd, layout.file_size)
            os.pwrite(fd, layout.pack(), 0)
            head = META.pack(0, 0, len(segments), 0, 0, 0)[:META_HEAD]
            change = CHANGE.pack(0, CHANGE_OTHER, 0, b"")
            os.pwrite(fd, packed, layout.slot_at[0])
            os.pwrite(fd, change, CHANGE_AT[0])
            os.pwrite(fd, head + U32.pack(_meta_crc(head, change, zlib.crc32(packed))), META_AT[0])
            os.rename(tmp, path)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        return cls(path, fd, mmap.mmap(fd, layout.file_size), layout)

    @classmethod
    def open(cls, path: str, writable: bool = True) -> Table:
        """Map an existing table; TableCorrupt if it fails its checks.

        A table opened with ``writable=False`` is mapped ``PROT_READ``: it can be
        read and locked, and any change raises TypeError (a read-only buffer).
        """
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_SIZE:
                raise TableCorrupt(f"{path} is truncated ({size} bytes)", path=path)
            mm = mmap.mmap(fd, size, prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
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
        with self._thread_lock:  # let a write in another thread finish first
            self._close_lock_descriptor()
        guard.forget(self._address)
        self._words.release()
        self._view.release()
        self._mm.close()
        os.close(self._fd)
        self._fd = -1

    @property
    def memory(self) -> mmap.mmap:
        """The mapping itself, for the areas other modules own (the worker registry)."""
        return self._mm

    # -- reading -----------------------------------------------------------

    @property
    def generation(self) -> int:
        return self._words[GEN_AT // 8]  # type: ignore[no-any-return, unused-ignore]

    def generation_word(self) -> memoryview:
        """A one-element view of the generation word, for the cheapest possible check."""
        return self._words[GEN_AT // 8 : GEN_AT // 8 + 1]

    def state(self) -> tuple[int, int]:
        """(state, primary pid)."""
        return STATE.unpack_from(self._mm, STATE_AT)  # type: ignore[return-value, unused-ignore]

    def set_state(self, state: int, pid: int, start: int = 0) -> None:
        """Record the primary's state and identity (pid and start time)."""
        self._mm[OWNER_START_AT : OWNER_START_AT + U64.size] = U64.pack(start)
        self._mm[STATE_AT : STATE_AT + STATE.size] = STATE.pack(state, pid)

    def owner(self) -> tuple[int, int]:
        """(pid, start time) of the primary that last set the state."""
        return STATE.unpack_from(self._mm, STATE_AT)[1], U64.unpack_from(self._mm, OWNER_START_AT)[0]

    def damage(self) -> str | None:
        """What is wrong with the file as it is now, or None: its size, its header, its committed
        version. Reads the header with pread, not through the mapping, and never raises."""
        if self.damaged is not None:
            return self.damaged
        try:
            size = os.fstat(self._fd).st_size
            if size != self.layout.file_size:
                return f"the file is {size} bytes, its header says {self.layout.file_size}"
            header = self.layout.pack()
            if os.pread(self._fd, len(header), 0) != header:
                return "its header changed since it was written (the instance's shape, or its checksum)"
            generation = self.generation
            checked = self._decode(generation, trust=False)  # every record, as a new worker would
            if isinstance(checked, str) and self.generation == generation:
                return f"generation {generation} fails its checks: {checked}"
        except TableCorrupt as err:
            return err.message
        except OSError as err:
            return f"it cannot be read: {err.strerror}"
        return None

    def adoptions(self) -> int:
        """How many primaries adopted this instance after the one that made it."""
        return U32.unpack_from(self._mm, ADOPTIONS_AT)[0]  # type: ignore[no-any-return]

    def count_adoption(self) -> int:
        """One more adoption (by the primary now starting); the new count."""
        count = self.adoptions() + 1
        self._mm[ADOPTIONS_AT : ADOPTIONS_AT + U32.size] = U32.pack(count)
        return count

    def snapshot(self) -> Snapshot:
        """The committed version; decoded once per generation, then cached.

        Raises TableCorrupt, saying what failed, if the committed version fails
        its checks or this mapping was damaged (:mod:`hugeshmd.shm.guard`).
        """
        cached = self._cache
        generation = self._words[_GEN_WORD]
        if cached is not None and self.damaged is None:
            if cached.generation == generation:
                return cached
            if 0 < generation - cached.generation <= 2:  # the change records of both slots are there
                changed: Snapshot | None = cached
                for step in range(cached.generation + 1, generation + 1):
                    changed = self._apply_change(changed, step) if changed is not None else None
                if changed is not None and self.generation == generation:
                    self._cache = changed
                    return changed
        for _ in range(8):
            generation = self.generation
            snap = self._decode(generation)
            if self.generation == generation:
                return self._accept(snap, generation)
        return self._snapshot_between_writers()

    def _snapshot_between_writers(self) -> Snapshot:
        timeout = self.lock_timeout if self.read_timeout is None else self.read_timeout
        self._take_thread_lock(timeout)
        try:
            fd = self._lock_descriptor()
            _flock(fd, fcntl.LOCK_SH, timeout, self)
            try:
                generation = self.generation
                return self._accept(self._decode(generation), generation)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def _take_thread_lock(self, timeout: float) -> None:
        """This process's side of the writer lock (see "An flock belongs to..."), within ``timeout``."""
        if not self._thread_lock.acquire(True, timeout):
            raise TableBusy(f"{self.path}: another thread of this process held the writer lock for {timeout:g} s",
                            path=self.path, pid=os.getpid(), stopped=False, waited=timeout)

    def _corrupt(self, what: str) -> TableCorrupt:
        return TableCorrupt(f"{self.path}: {what}", path=self.path)

    def _accept(self, snap: Snapshot | str, generation: int) -> Snapshot:
        if self.damaged is not None:
            raise self._corrupt(self.damaged)
        if isinstance(snap, str):
            raise self._corrupt(f"generation {generation} fails its checks: {snap}")
        self._cache = snap
        return snap

    def _apply_change(self, base: Snapshot, generation: int) -> Snapshot | None:
        """The version ``generation`` built from ``base`` (the one before it) and the change record
        its commit wrote, every part of it checked; None when it cannot be (the caller decodes).
        Two slots keep the change records of the last two generations, so a reader up to two
        behind catches up this way: the meta's CRC covers its change record, so one that the
        writer of a later generation is overwriting fails, and the caller re-checks the generation.

        A reader so re-reads one record, not the table: a lookup after another worker's
        reserve costs the same with ten zones or a thousand. What is checked: the meta record
        (its CRC, over the unchanged segments and the change record), the change record (its generation), the
        inserted record (its CRC, its segment, its neighbours), the new count and sum of CRCs,
        and that the slot holds the inserted record where it belongs.

        It builds on copies of ``base``'s indexes: other threads may be reading them, and a
        change that turns out not to fit leaves ``base`` whole. Two threads that apply the same
        change at once build equal versions. A lazy ``base`` gives a lazy version (the records'
        bytes with the one change made, checked the same way: see :meth:`_apply_to_bytes`).
        """
        meta_at, change_at = META_AT[generation & 1], CHANGE_AT[generation & 1]
        gen, seg_gen, _, nzone, zone_sum, crc = META.unpack_from(self._mm, meta_at)
        change = self._mm[change_at : change_at + CHANGE.size]
        cgen, kind, removed_at, raw = CHANGE.unpack(change)
        segments_crc = self._segments_crc(base.segments)
        # The meta's CRC covers the change record: one torn by the writer of two generations on
        # (it reuses this slot) fails here, as does one forged without a matching meta.
        if (gen != generation or cgen != generation or kind & CHANGE_OTHER or seg_gen != base.segments_generation
                or segments_crc is None
                or _meta_crc(self._mm[meta_at : meta_at + META_HEAD], change, segments_crc) != crc):
            return None
        if base.lazy:
            return self._apply_to_bytes(base, generation, kind, removed_at, raw, nzone, zone_sum)
        total, count, remove, insert = base.zone_sum, len(base.zones), None, None
        carried = base.zone_bytes
        if kind & CHANGE_REMOVE:
            if removed_at >= count:
                return None
            remove, count = base.zones[removed_at], count - 1
            at = removed_at * ZONE.size
            packed = remove.pack(zlib.crc32) if carried is None else carried[at : at + ZONE.size]
            total -= U32.unpack_from(packed, ZONE_BODY)[0]
        if kind & CHANGE_INSERT:
            checked = _check_zone(raw, U32.unpack_from(raw, ZONE_BODY)[0], 0, self._ranges_of(base.segments))
            if isinstance(checked, str):
                return None
            insert, count, total = checked, count + 1, total + U32.unpack_from(raw, ZONE_BODY)[0]
        if count != nzone or total & 0xFFFFFFFF != zone_sum:
            return None
        try:
            new = base.successor(None, insert, remove, copy=True)
        except (IndexError, KeyError, ValueError):  # a change that contradicts the base: decode
            return None
        if insert is not None and not self._fits(new, insert, raw, generation):
            return None
        if carried is not None:
            new.zone_bytes = _splice(bytearray(carried), removed_at if remove is not None else None, new, insert, raw)
        new.zone_sum = zone_sum
        return new

    def _apply_to_bytes(self, base: Snapshot, generation: int, kind: int, removed_at: int, raw: bytes,
                        nzone: int, zone_sum: int) -> Snapshot | None:
        """:meth:`_apply_change` for a lazy ``base``: the lazy version ``generation``, or None.
        The same checks, made on the records' bytes: the inserted record in full, its neighbours'
        addresses and sizes from their bytes (each record is checked whole when it is read), and
        the result equal to the committed slot."""
        size = ZONE.size
        zones = base.raw
        total, count, removed, inserted = base.zone_sum, len(zones) // size, None, None
        if kind & CHANGE_REMOVE:
            if removed_at >= count:
                return None
            at = removed_at * size
            removed, zones, count = zones[at : at + size], _cut(zones, at, size), count - 1
            total -= U32.unpack_from(removed, ZONE_BODY)[0]
        if kind & CHANGE_INSERT:
            checked = _check_zone(raw, U32.unpack_from(raw, ZONE_BODY)[0], 0, self._ranges_of(base.segments))
            if isinstance(checked, str):
                return None
            words = memoryview(zones).cast("Q")  # each record's address, then its size
            i = bisect_left(words[::ZONE_WORDS], checked.address)
            if ((i > 0 and words[(i - 1) * ZONE_WORDS] + words[(i - 1) * ZONE_WORDS + 1] > checked.address)
                    or (i < count and checked.address + checked.size > words[i * ZONE_WORDS])):
                return None
            inserted, zones, count = raw, _cut(zones, i * size, 0, raw), count + 1
            total += U32.unpack_from(raw, ZONE_BODY)[0]
        if count != nzone or total & 0xFFFFFFFF != zone_sum:
            return None
        # The records as committed, byte for byte: bytes of base that no read has checked yet may
        # have been damaged when they were copied, and a writer's commit since healed them (the
        # sum of CRCs cannot see a flip in a record's body). A find confined to the slot's bytes is
        # a compare in C without a copy: about 4 us at a thousand zones (a 144 KB copy costs
        # 10-100 us, its pages fresh from the kernel).
        at = self._zones_at[generation & 1]
        if self._mm.find(zones, at, at + len(zones)) != at:
            return None
        return base.changed(generation, zones, zone_sum, removed, inserted)

    def _fits(self, new: Snapshot, insert: ZoneRecord, raw: bytes, generation: int) -> bool:
        """Whether ``insert`` sits between its neighbours in ``new``, and the slot holds it there."""
        i = new.index_of(insert)
        zones = new.zones
        if i > 0 and zones[i - 1].address + zones[i - 1].size > insert.address:
            return False
        if i + 1 < len(zones) and insert.address + insert.size > zones[i + 1].address:
            return False
        at = self._zones_at[generation & 1] + i * ZONE.size
        return self._mm[at : at + ZONE.size] == raw

    def _ranges_of(self, segments: tuple[SegmentRecord, ...]) -> dict[int, tuple[int, int]]:
        checker = self._checker
        return checker.ranges if checker is not None and checker.segments is segments else _ranges(segments)

    def _segments_crc(self, segments: tuple[SegmentRecord, ...]) -> int | None:
        """The CRC32 of ``segments``' records as committed, if this table has them at hand."""
        known, packed, crc = self._segments_packed
        if known is segments:
            return crc
        _, records, crc = self._segments_seen
        return crc if records is segments else None

    def _decode(self, generation: int, trust: bool = True) -> Snapshot | str:
        """The committed version ``generation``, every record checked; else what failed.
        ``trust=False`` checks every record again, as a fresh process would."""
        meta_at = META_AT[generation & 1]
        gen, seg_gen, nseg, nzone, zone_sum, crc = META.unpack_from(self._mm, meta_at)
        if gen != generation:
            return f"its meta record is of generation {gen}"
        if nseg > self.layout.max_segments or nzone > self.layout.max_zones:
            return f"{nseg} segments and {nzone} zones exceed the table's capacity"
        seg_at, zone_at = self._segments_at[generation & 1], self._zones_at[generation & 1]
        segs = self._mm[seg_at : seg_at + nseg * SEGMENT.size]
        change_at = CHANGE_AT[generation & 1]
        if _meta_crc(self._mm[meta_at : meta_at + META_HEAD], self._mm[change_at : change_at + CHANGE.size],
                     zlib.crc32(segs)) != crc:
            return "the checksum of its meta, change and segment records"
        known, segments, _ = self._segments_seen
        if segs != known or not trust:  # segments rarely change: checked once per change
            segments = tuple(SegmentRecord.unpack(f) for f in SEGMENT.iter_unpack(segs))
            wrong = check_segments(self.layout, segments)
            if wrong is not None:
                return wrong
            self._segments_seen = segs, segments, zlib.crc32(segs)
        checker = self._checker
        if checker is None or checker.segments is not segments or checker.generation != seg_gen or not trust:
            checker = self._checker = _Records(self, segments, seg_gen)  # records checked anew against these
        raw = self._mm[zone_at : zone_at + nzone * ZONE.size]
        cached = self._cache
        if trust and (cached is None or cached.lazy):  # a reader: each record is checked when read
            if _crc_sum(raw) != zone_sum:
                return "the sum of the zone records' checksums"
            return Snapshot(gen, seg_gen, segments, None, raw, zone_sum, checker)
        zones = checker.check_all(raw, zone_sum)  # a writer: all of them now
        if isinstance(zones, str):
            return zones
        return Snapshot(gen, seg_gen, segments, zones, raw, zone_sum, checker)

    def iova_of(self, segment: SegmentRecord, address: int) -> int:
        """The I/O address of ``address`` in ``segment`` (the VA when iovas are unknown)."""
        if segment.iova_count == 0:
            return address
        offset = address - segment.address
        (page,) = IOVA.unpack_from(
            self._mm, self.layout.iova_at + (segment.iova_index + offset // segment.page_size) * IOVA.size
        )
        return page + offset % segment.page_size  # type: ignore[no-any-return]

    # -- writing -----------------------------------------------------------

    def holder(self, locks: str = "/proc/locks") -> int:
        """The pid holding the writer lock, as the kernel lists it (proc(5), /proc/locks: for an
        flock, the process that took it), or 0 if none is listed. Read only to name a holder."""
        st = os.fstat(self._fd)
        key = f" {os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino} "
        try:
            with open(locks) as lines:
                for line in lines:
                    fields = line.split()
                    if key in line and "FLOCK" in fields and "WRITE" in fields and "->" not in fields:
                        return int(fields[fields.index("WRITE") + 1])
        except (OSError, ValueError, IndexError):
            pass
        return 0

    def busy(self, waited: float) -> TableBusy:
        """The TableBusy for a wait of ``waited`` seconds: names the holder, and whether it is frozen."""
        pid = self.holder()
        state = process_state(pid) if pid else None
        return TableBusy(f"{self.path}: the writer lock stayed taken for {waited:g} s by {describe_holder(pid)}; "
                         "lookups go on, reserve and free wait for it", path=self.path, pid=pid or None,
                         stopped=state in ("T", "t"), waited=waited)

    def locked(self, timeout: float | None = None) -> _WriteLock:
        """``with table.locked() as snapshot:`` holds the writer lock; the committed snapshot.

        Waits for the lock, at most ``timeout`` seconds if given (then TableBusy).
        """
        return _WriteLock(self, timeout)

    def _lock_descriptor(self) -> int:
        if self._lock_fd >= 0:
            return self._lock_fd
        with _fork.guard:  # a fork must not copy a descriptor we have not recorded yet
            if self._lock_fd < 0:
                self._lock_fd = os.open(f"/proc/self/fd/{self._fd}", os.O_RDONLY | os.O_CLOEXEC)
            return self._lock_fd

    def _close_lock_descriptor(self) -> None:
        with _fork.guard:
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1

    def _after_fork(self) -> None:
        # In a forked child: the parent's lock description and thread-lock state are not ours.
        self._thread_lock = _thread.allocate_lock()
        self._close_lock_descriptor()

    def commit(self, base: Snapshot, *, insert: ZoneRecord | None = None, remove: ZoneRecord | None = None,
               segments: tuple[SegmentRecord, ...] | None = None) -> Snapshot:
        """Publish the version after ``base``: a zone removed, one inserted, and/or a new
        segment list. Call only inside :meth:`locked`, with the snapshot it gave."""
        if self.damaged is not None:
            raise self._corrupt(self.damaged)
        if base.generation != self._words[_GEN_WORD]:
            raise RuntimeError(f"commit on generation {base.generation}, but {self.generation} is committed")
        if segments is not None:
            _check_capacity(self.layout, segments)
        # base.zones checks every record of a lazy version: a writer builds only on checked records
        if insert is not None and len(base.zones) - (remove is not None) >= self.layout.max_zones:
            raise TableFull(f"the zone table is full ({self.layout.max_zones} zones); "
                            "start the primary with a larger max_zones", table="zones", capacity=self.layout.max_zones)
        record = insert.pack(zlib.crc32) if insert is not None else b""
        removed_at = base.index_of(remove) if remove is not None else None
        zones, zone_sum = self._carried(base)
        if removed_at is not None:
            zone_sum -= U32.unpack_from(zones, removed_at * ZONE.size + ZONE_BODY)[0]
        if insert is not None:
            zone_sum += U32.unpack_from(record, ZONE_BODY)[0]
        zone_sum &= 0xFFFFFFFF
        new = base.successor(segments, insert, remove)
        _splice(zones, removed_at, new, insert, record)
        dst = self._zones_at[new.generation & 1]
        self._mm[dst : dst + len(zones)] = zones
        kind = ((CHANGE_INSERT if insert is not None else 0) | (CHANGE_REMOVE if remove is not None else 0)
                | (CHANGE_OTHER if segments is not None else 0))
        change = CHANGE.pack(new.generation, kind, removed_at or 0, record)
        change_at = CHANGE_AT[new.generation & 1]
        self._mm[change_at : change_at + CHANGE.size] = change
        new.zone_bytes, new.zone_sum = zones, zone_sum
        head = META.pack(new.generation, new.segments_generation, len(new.segments), len(new.zones),
                         zone_sum, 0)[:META_HEAD]
        crc = _meta_crc(head, change, self._write_segments(new))
        meta_at = META_AT[new.generation & 1]
        self._mm[meta_at : meta_at + META.size] = head + U32.pack(crc)
        self._words[GEN_AT // 8] = new.generation  # the commit point
        if self.damaged is not None:  # the file shrank under this commit: it went to zero pages
            raise self._corrupt(self.damaged)
        self._cache = new
        return new

    @staticmethod
    def _carried(base: Snapshot) -> tuple[bytearray, int]:
        """The zone records of ``base`` to build the next version from, and the sum of their CRCs.

        Never the bytes in the file's slot: they may have changed since they were
        checked (a flipped bit, a forged record), and a writer must not carry a bad
        record into a version it commits. These are the bytes ``base``'s records were
        checked and decoded from: a bytearray moved along from commit to commit, as the
        indexes are (changed in place: a new 144 KB object per commit at a thousand zones
        costs about 10 us more, its pages fresh from the kernel), or a copy of a decoded
        version's bytes (which its lazy lookups still read), or the records packed anew.
        """
        taken = base.zone_bytes
        if isinstance(taken, bytearray):
            base.zone_bytes = None
            return taken, base.zone_sum
        if taken is not None:
            return bytearray(taken), base.zone_sum
        packed = [z.pack(zlib.crc32) for z in base.zones]
        return bytearray(b"".join(packed)), sum(U32.unpack_from(p, ZONE_BODY)[0] for p in packed)

    def _write_segments(self, new: Snapshot) -> int:
        """Fill the slot's segment records, packed from the checked records; their CRC32.

        Always written, even when the slot may hold them from two generations
        ago: a writer killed mid-change may have left anything there, and the
        other slot's bytes may have changed since they were checked.
        """
        dst = self._segments_at[new.generation & 1]
        known, packed, crc = self._segments_packed
        if known is not new.segments:
            packed = b"".join(s.pack() for s in new.segments)
            crc = zlib.crc32(packed)
            self._segments_packed = new.segments, packed, crc
        self._mm[dst : dst + len(packed)] = packed
        return crc

    def write_iovas(self, index: int, iovas: list[int]) -> None:
        if index + len(iovas) > self.layout.max_iovas:
            raise OverflowError("iova table full")
        struct.pack_into(f"<{len(iovas)}Q", self._mm, self.layout.iova_at + index * IOVA.size, *iovas)

    def mark_stopped(self, wait: float) -> bool:
        """Set the state to stopping and, if the writer lock can be had within ``wait``
        seconds, commit a new generation so every worker's next call sees it; whether it could
        (if not, workers see the stop at their next reserve or free)."""
        self.set_state(STATE_STOPPING, *self.owner())
        try:
            with self.locked(timeout=wait) as base:
                self.commit(base)
        except TableBusy:
            return False
        return True


def _check_capacity(layout: Layout, segments: tuple[SegmentRecord, ...]) -> None:
    if len(segments) > layout.max_segments:
        raise TableFull(f"the segment table is full ({layout.max_segments} segments)",
                        table="segments", capacity=layout.max_segments)


def _meta_crc(head: bytes, change: bytes, segments_crc: int) -> int:
    """A meta record's CRC32: over the segment records, then the change record, then the head."""
    return zlib.crc32(head, zlib.crc32(change, segments_crc))


def _ranges(segments: tuple[SegmentRecord, ...]) -> dict[int, tuple[int, int]]:
    """[start, end) of each segment, by id: where its zones may lie."""
    return {s.id: (s.address, s.address + s.length) for s in segments}


def _splice(zones: bytearray, removed_at: int | None, new: Snapshot, insert: ZoneRecord | None,
            record: bytes) -> bytearray:
    """``zones`` (the records of the version before ``new``) made into ``new``'s: the record at
    ``removed_at`` cut out, ``record`` (``insert`` packed) put where ``new`` has it. In place."""
    if removed_at is not None:
        del zones[removed_at * ZONE.size : (removed_at + 1) * ZONE.size]
    if insert is not None:
        at = new.index_of(insert) * ZONE.size
        zones[at:at] = record
    return zones


def _cut(zones: bytes, at: int, size: int, put: bytes = b"") -> bytes:
    """``zones`` with the ``size`` bytes at ``at`` replaced by ``put``, as one new bytes object
    (a lazy version's bytes, which other threads may be reading, never change). One copy: a
    concatenation makes three (measured at a thousand zones: 118 us against 3.5 us)."""
    view = memoryview(zones)
    return b"".join((view[:at], put, view[at + size :]))


def _crc_sum(raw: bytes) -> int:
    """The sum (mod 2**32) of the CRCs zone records ``raw`` carry: one pass in C."""
    return sum(array("I", raw)[ZONE_BODY // 4 :: ZONE.size // 4]) & 0xFFFFFFFF


class _Records:
    """Checks the zone records of versions that have one segment list (of ``generation``), each
    distinct record's bytes once per process (what :class:`~hugeshmd.shm.snapshot.Snapshot`
    calls its records). A table makes a new one when its segments change."""

    __slots__ = ("_table", "segments", "generation", "ranges", "_verified", "_limit")

    def __init__(self, table: Table, segments: tuple[SegmentRecord, ...], generation: int) -> None:
        self._table = table
        self.segments = segments
        self.generation = generation
        self.ranges = _ranges(segments)  # [start, end) of each segment by id
        self._verified: dict[bytes, ZoneRecord] = {}  # record bytes already checked, and their records
        self._limit = 2 * table.layout.max_zones + 64  # removed zones' records are dropped now and then

    def one(self, chunk: bytes, generation: int) -> ZoneRecord:
        record = self._verified.get(chunk)
        if record is None:
            checked = _check_zone(chunk, U32.unpack_from(chunk, ZONE_BODY)[0], None, self.ranges)
            if isinstance(checked, str):
                raise self._damaged(generation, checked)
            if len(self._verified) >= self._limit:
                self._verified.clear()
            record = self._verified[chunk] = checked
        return record

    def all(self, raw: bytes, zone_sum: int, generation: int) -> tuple[ZoneRecord, ...]:
        zones = self.check_all(raw, zone_sum)
        if isinstance(zones, str):
            raise self._damaged(generation, zones)
        return zones

    def check_all(self, raw: bytes, zone_sum: int) -> tuple[ZoneRecord, ...] | str:
        """Zone records, each checked against its CRC, its segment, and all against their sum;
        else what failed.

        A change touches one record, so records already checked (by their bytes; the ones
        kept are this decode's on return) are reused: identical bytes pass the same checks, and
        a worker catching up after another's reserve decodes one record. The rest runs as
        passes in C (map, sum, all) rather than a loop in Python.
        """
        if not raw:
            return () if zone_sum == 0 else "the sum of the zone records' checksums"
        size = ZONE.size
        chunks = [raw[at : at + size] for at in range(0, len(raw), size)]
        records: list[ZoneRecord | None] = list(map(self._verified.get, chunks))
        if None in records:
            ranges = self.ranges
            crcs = memoryview(raw).cast("I")[ZONE_BODY // 4 :: size // 4].tolist()
            for i, record in enumerate(records):
                if record is None:
                    checked = _check_zone(chunks[i], crcs[i], i, ranges)
                    if isinstance(checked, str):
                        return checked
                    records[i] = checked
        if _crc_sum(raw) != zone_sum:
            return "the sum of the zone records' checksums"
        done: list[ZoneRecord] = records  # type: ignore[assignment]  # every None replaced above
        starts = list(map(_START, done))
        if not all(map(operator.le, map(operator.add, starts, map(_SIZE, done)), starts[1:])):
            return "two zone records overlap or are out of order"  # the sum of CRCs cannot see that
        self._verified.clear()
        self._verified.update(zip(chunks, done, strict=True))
        return tuple(done)

    def _damaged(self, generation: int, what: str) -> TableCorrupt:
        """The error for a record that failed. The table's cached version goes too: changes
        applied to it would carry the damaged bytes along, where the next decode reads the file
        afresh, healed once a writer commits a version from the records it checked."""
        table = self._table
        cached = table._cache
        if cached is not None and cached.lazy and cached.segments is self.segments:
            table._cache = None
        return table._corrupt(f"generation {generation} fails its checks: {what}")


_START = operator.itemgetter(1)  # ZoneRecord.address
_SIZE = operator.itemgetter(2)  # ZoneRecord.size


def _check_zone(chunk: bytes, crc: int, index: int | None,
                ranges: dict[int, tuple[int, int]]) -> ZoneRecord | str:
    """The record in ``chunk`` (number ``index``, if known) if its CRC (``crc``) matches and it
    lies in its segment; else what is wrong."""
    fields = ZONE.unpack(chunk)
    address, size = fields[0], fields[1]
    if zlib.crc32(memoryview(chunk)[:ZONE_BODY]) != crc:
        return f"the checksum of zone record {index}" if index is not None else \
            f"the checksum of the zone record at {address:#x}"
    start, stop = ranges.get(fields[4], (0, 0))  # its segment
    if not (start <= address and address + size <= stop and size > 0):
        return f"zone record {'' if index is None else f'{index} '}[{address:#x}, +{size:#x}) lies outside its segment"
    return ZoneRecord.unpack(fields)
