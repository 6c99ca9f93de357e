"""Unit tests of hugeshmd.shm.table, .layout and .registry: the shared, crash-atomic table file.

Every table lives in pytest's tmp_path. A second ``Table.open`` of the same file
is a separate mapping, which is what another process sees. Corruption and
crashes are simulated by writing bytes into the file with ``os.pwrite`` (a
MAP_SHARED mapping and the page cache are one and the same on Linux).
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator

import pytest
from factories import BASE, PAGE, MiB, segment_record, zone_record
from factories import layout as make_layout

from hugeshmd.errors import OutOfMemory, TableCorrupt, TableFull
from hugeshmd.shm import layout as records
from hugeshmd.shm import layout as table_mod
from hugeshmd.shm import table as table_code
from hugeshmd.shm.layout import (
    HEADER_SIZE,
    MODE_SHM,
    STATE_READY,
    Layout,
    Owner,
    SegmentRecord,
    ZoneRecord,
)
from hugeshmd.shm.registry import Registry
from hugeshmd.shm.snapshot import Snapshot
from hugeshmd.shm.table import Table


def segment(sid: int = 0, address: int = BASE, length: int = 8 * MiB, *, iova_index: int = 0,
            iova_count: int = 0, path: str = "/dev/hugepages/hugeshmd.t.seg0") -> SegmentRecord:
    return segment_record(id=sid, address=address, length=length, iova_index=iova_index, iova_count=iova_count,
                          path=path)


def zone(name: str, address: int, size: int = 4096) -> ZoneRecord:
    return zone_record(name, address=address, size=size, owner=Owner(3, 1, 1234, 99), created_ns=42)


def poke(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def peek(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def zones_at(layout: Layout, slot: int) -> int:
    return layout.slot_at[slot] + layout.max_segments * records.SEGMENT.size


@pytest.fixture
def path(tmp_path) -> str:
    return str(tmp_path / "table")


SEGS = (segment(),)  # the segment every zone of these tests lies in: BASE + 8 MiB


@pytest.fixture
def table(path: str) -> Iterator[Table]:
    t = Table.create(path, make_layout(), segments=SEGS)
    yield t
    t.close()


@pytest.fixture
def reopen(path: str) -> Iterator[Callable[[], Table]]:
    """Open more mappings of the test's table file; all are closed at the end."""
    opened: list[Table] = []

    def open_() -> Table:
        opened.append(Table.open(path))
        return opened[-1]

    yield open_
    for t in opened:
        t.close()


def commit_zones(t: Table, *records: ZoneRecord) -> Snapshot:
    """Append zones (given in address order) one commit each."""
    snap = t.snapshot()
    for record in records:
        with t.locked() as base:
            snap = t.commit(base, insert=record)
    return snap


# -- creating and opening ------------------------------------------------------


def test_fresh_table_is_generation_zero_and_empty(table: Table, reopen) -> None:
    assert table.generation == 0
    assert table.snapshot() == Snapshot(0, 0, SEGS, ())
    assert Registry(table).workers() == []
    assert table.state() == (0, 0)
    other = reopen()
    assert other.generation == 0
    assert other.snapshot() == Snapshot(0, 0, SEGS, ())


def test_create_leaves_only_the_table_file(tmp_path, path: str) -> None:
    t = Table.create(path, make_layout())
    t.close()
    assert sorted(os.listdir(tmp_path)) == ["table"]
    assert os.path.getsize(path) == t.layout.file_size


def test_create_replaces_an_existing_table(path: str, reopen) -> None:
    Table.create(path, make_layout(max_zones=16)).close()
    Table.create(path, make_layout(max_zones=32)).close()
    assert reopen().layout.max_zones == 32


def test_open_reads_back_the_layout(table: Table, reopen) -> None:
    layout = reopen().layout
    assert layout == table.layout
    assert (layout.base, layout.window, layout.page_size, layout.prefix) == (BASE, 64 * MiB, PAGE, "t")
    assert (layout.max_zones, layout.max_workers, layout.max_iovas) == (16, 8, 32)


def test_layout_of_shm_mode_has_no_iova_table() -> None:
    layout = make_layout(mode=MODE_SHM, page_size=4096)
    assert layout.max_iovas == 0
    assert layout.workers_at == layout.iova_at == HEADER_SIZE


def test_layout_areas_do_not_overlap() -> None:
    layout = make_layout()
    assert layout.iova_at >= HEADER_SIZE
    assert layout.workers_at >= layout.iova_at + layout.max_iovas * 8
    assert layout.slot_at[0] >= layout.workers_at + layout.max_workers * table_mod.WORKER.size
    assert layout.slot_at[1] == layout.slot_at[0] + layout.slot_size
    assert layout.slot_size >= layout.max_segments * records.SEGMENT.size + layout.max_zones * records.ZONE.size
    assert layout.file_size == layout.slot_at[1] + layout.slot_size


def test_open_missing_file_raises_file_not_found(tmp_path) -> None:
    # secondary._try_open relies on this being FileNotFoundError, not TableCorrupt
    with pytest.raises(FileNotFoundError):
        Table.open(str(tmp_path / "absent"))


# -- committing and reading ----------------------------------------------------


def test_commit_bumps_generation_and_another_mapping_sees_it(table: Table, reopen) -> None:
    seg = segment()
    with table.locked() as base:
        assert base.generation == 0
        new = table.commit(base, segments=(seg,))
    assert new == Snapshot(1, 1, (seg,), ())
    assert table.generation == 1

    other = reopen()
    assert other.generation == 1
    assert other.snapshot() == Snapshot(1, 1, (seg,), ())

    # and the other way round: a change made through the second mapping
    z = zone("a", BASE)
    with other.locked() as base:
        other.commit(base, insert=z)
    assert table.generation == 2
    assert table.snapshot() == Snapshot(2, 1, (seg,), (z,))  # segments_generation unchanged


def test_generation_word_view_follows_commits_of_another_mapping(table: Table, reopen) -> None:
    word = table.generation_word()
    assert word.tolist() == [0]
    other = reopen()
    commit_zones(other, zone("a", BASE), zone("b", BASE + 4096))
    assert word.tolist() == [2]
    word.release()


def test_snapshot_is_decoded_once_per_generation(table: Table) -> None:
    first = table.snapshot()
    assert table.snapshot() is first
    commit_zones(table, zone("a", BASE))
    assert table.snapshot() is not first
    assert table.snapshot().generation == 1


def test_commit_without_change_still_bumps_generation(table: Table, reopen) -> None:
    commit_zones(table, zone("a", BASE))
    with table.locked() as base:
        table.commit(base)
    assert reopen().snapshot() == Snapshot(2, 0, SEGS, (zone("a", BASE),))


def test_zones_stay_sorted_through_inserts_and_removes(table: Table, reopen) -> None:
    def insert(i: int, record: ZoneRecord) -> None:
        with table.locked() as base:
            table.commit(base, insert=record)

    def remove(i: int) -> None:
        with table.locked() as base:
            table.commit(base, remove=base.zones[i])

    insert(0, zone("m", BASE + 0x10000))
    insert(0, zone("a", BASE))  # at the front
    insert(2, zone("z", BASE + 0x20000))  # at the end
    insert(1, zone("f", BASE + 0x8000))  # in the middle
    insert(3, zone("p", BASE + 0x18000))
    assert [z.name for z in table.snapshot().zones] == ["a", "f", "m", "p", "z"]
    remove(2)  # m
    remove(0)  # a
    insert(1, zone("g", BASE + 0x9000))
    remove(3)  # z, the last

    expected = (zone("f", BASE + 0x8000), zone("g", BASE + 0x9000), zone("p", BASE + 0x18000))
    snap = reopen().snapshot()
    assert snap.generation == 9
    assert snap.zones == expected
    addresses = [z.address for z in snap.zones]
    assert addresses == sorted(addresses)
    assert list(snap.by_name) == ["f", "g", "p"] and [snap.index_of(z) for z in snap.zones] == [0, 1, 2]


def test_insert_and_remove_in_one_commit(table: Table, reopen) -> None:
    commit_zones(table, zone("a", BASE), zone("b", BASE + 4096))
    with table.locked() as base:
        table.commit(base, remove=base.zones[0], insert=zone("c", BASE + 8192))
    assert reopen().snapshot().zones == (zone("b", BASE + 4096), zone("c", BASE + 8192))


def test_records_round_trip_every_field(table: Table, reopen) -> None:
    name = "é" * 31 + "x"  # 63 bytes of UTF-8, the maximum
    owner = Owner(1023, 2**32 - 1, 99999, 2**64 - 1)
    z = ZoneRecord(name, BASE + 0x200000, 3 * MiB, 0xABC_DEF0_0000, 2 * MiB, 7, owner, 1_700_000_000_123_456_789, 5)
    path = "/" + "p" * 170 + "/hugeshmd.t.seg7"  # 191 bytes, the longest a record holds
    seg = SegmentRecord(7, BASE, 8 * MiB, PAGE, 4 * MiB, 1, 0xABC_DEF0_0000, 3, 4, path, 9)
    with table.locked() as base:
        table.commit(base, segments=(seg,), insert=z)
    snap = reopen().snapshot()
    assert snap.segments == (seg,)
    assert snap.zones == (z,)
    assert snap.zones[0].end == BASE + 0x200000 + 3 * MiB


def test_segment_path_too_long_is_refused_before_anything_is_written(table: Table, reopen) -> None:
    commit_zones(table, zone("a", BASE))
    with table.locked() as base, pytest.raises(ValueError, match="backing path too long"):
        table.commit(base, segments=(segment(path="/" + "x" * 191),))
    assert table.generation == 1
    assert reopen().snapshot() == Snapshot(1, 0, SEGS, (zone("a", BASE),))


@pytest.mark.parametrize("name", ["x" * 64, "é" * 32], ids=["64 ascii bytes", "32 two-byte chars"])
def test_zone_name_too_long_is_refused_before_anything_is_written(table: Table, reopen, name: str) -> None:
    with table.locked() as base, pytest.raises(ValueError):
        table.commit(base, insert=zone(name, BASE))
    assert table.generation == 0
    assert reopen().snapshot() == Snapshot(0, 0, SEGS, ())


def test_zone_table_full_raises_table_full_and_changes_nothing(path: str, reopen) -> None:
    t = Table.create(path, make_layout(max_zones=3), segments=SEGS)
    try:
        full = commit_zones(t, zone("a", BASE), zone("b", BASE + 4096), zone("c", BASE + 8192))
        message = r"the zone table is full \(3 zones\); start the primary with a larger max_zones"
        with t.locked() as base, pytest.raises(TableFull, match=message) as info:
            t.commit(base, insert=zone("d", BASE + 12288))
        assert isinstance(info.value, OutOfMemory)  # what it was before it had a name of its own
        assert (info.value.table, info.value.capacity) == ("zones", 3)
        assert t.generation == 3
        assert reopen().snapshot() == full
        # replacing one zone in a single commit is allowed when full
        with t.locked() as base:
            t.commit(base, remove=base.zones[1], insert=zone("e", BASE + 4096))
        assert [z.name for z in reopen().snapshot().zones] == ["a", "e", "c"]
    finally:
        t.close()


def test_segment_table_full_is_refused_and_changes_nothing(path: str, reopen) -> None:
    t = Table.create(path, make_layout(max_segments=2))
    try:
        segs = tuple(segment(i, BASE + i * 8 * MiB) for i in range(3))
        # unchecked, the third record overwrote the zone area and every other
        # mapping then found the committed generation corrupt
        with t.locked() as base, pytest.raises(TableFull, match=r"the segment table is full \(2 segments\)"):
            t.commit(base, segments=segs)
        assert t.generation == 0
        assert reopen().snapshot() == Snapshot(0, 0, (), ())
    finally:
        t.close()


def test_reader_retries_when_a_commit_lands_during_its_read(table: Table, reopen) -> None:
    commit_zones(table, zone("a", BASE))
    reader = reopen()
    decode = reader._decode
    calls: list[int] = []

    def racing_decode(generation: int) -> Snapshot | None:
        calls.append(generation)
        snap = decode(generation)
        if len(calls) == 1:  # a writer commits while this reader is mid-read
            commit_zones(table, zone("b", BASE + 4096))
        return snap

    reader._decode = racing_decode  # type: ignore[method-assign]
    snap = reader.snapshot()
    assert calls == [1, 2]
    assert snap == Snapshot(2, 0, SEGS, (zone("a", BASE), zone("b", BASE + 4096)))


# -- corruption and crashes ----------------------------------------------------


@pytest.mark.parametrize("area", ["zone", "segment", "meta count"])
def test_corrupt_committed_slot_is_detected(table: Table, path: str, reopen, area: str) -> None:
    with table.locked() as base:
        table.commit(base, segments=(segment(),), insert=zone("a", BASE))
    slot = 1  # generation 1
    offset = {
        "zone": zones_at(table.layout, slot) + 60,  # inside the zone's name (from byte 57)
        "segment": table.layout.slot_at[slot] + 8,  # the segment's address
        "meta count": table_mod.META_AT[slot] + 20,  # zone_count
    }[area]
    byte = peek(path, offset, 1)[0]
    poke(path, offset, bytes([byte ^ 0x01]))
    with pytest.raises(TableCorrupt, match="generation 1 fails its checks") as info:
        reopen().snapshot().zones  # noqa: B018 - a zone record is checked when first read, the rest at once
    assert info.value.path == path
    assert reopen().damage() is not None


def test_a_reader_checks_each_zone_record_when_it_reads_it(table: Table, path: str, reopen) -> None:
    """A fresh reader's version is lazy: a damaged record fails the reads of that record (by
    name, by address, every record at once, and any answer that a zone is not there), and the
    others read as before."""
    commit_zones(table, zone("a", BASE), zone("b", BASE + 4096), zone("c", BASE + 8192))
    at = zones_at(table.layout, table.generation & 1) + records.ZONE.size + 80  # inside b's name
    poke(path, at, bytes([peek(path, at, 1)[0] ^ 0x01]))
    snap = reopen().snapshot()
    assert snap.lazy
    assert snap.record("a") == zone("a", BASE) and snap.zone_at(BASE + 8192) == zone("c", BASE + 8192)
    for absent in (lambda: snap.record("nothing"), lambda: snap.zone_at(BASE + 4)):
        with pytest.raises(TableCorrupt, match="the checksum of zone record 1"):
            absent()  # "no such zone" is not said of a version with a damaged record: its name may be what was hit
    with pytest.raises(TableCorrupt, match="generation 3 fails its checks: the checksum of the zone record at"):
        snap.zone_at(BASE + 4096)
    with pytest.raises(TableCorrupt, match="the checksum of zone record 1"):
        snap.zones  # noqa: B018
    assert snap.lazy and snap.record("a") == zone("a", BASE)  # still usable where it is whole
    assert "the checksum of zone record 1" in (reopen().damage() or "")
    fresh = reopen().snapshot()
    with pytest.raises(TableCorrupt, match="the checksum of zone record 1"):
        fresh.record("b")  # its name is what was flipped: absent is never the answer for a damaged table
    assert reopen().snapshot().record(123) is None  # type: ignore[arg-type]


def test_a_damaged_address_does_not_hide_another_zone(table: Table, path: str, reopen) -> None:
    commit_zones(table, zone("a", BASE), zone("b", BASE + 4096), zone("c", BASE + 8192))
    at = zones_at(table.layout, table.generation & 1) + records.ZONE.size + 7  # b's address, its top byte
    poke(path, at, b"\x7f")
    snap = reopen().snapshot()
    assert snap.zone_at(BASE) == zone("a", BASE)
    with pytest.raises(TableCorrupt, match="generation 3 fails its checks"):
        snap.zone_at(BASE + 8192)  # the search went astray on b's address: every record is checked


def test_a_reader_does_not_keep_damaged_bytes_a_writer_has_healed(table: Table, path: str, reopen) -> None:
    """A reader copied a version with a flipped record it never read; a writer, which commits
    from the records it checked, heals the table: the reader then reads the healed records."""
    commit_zones(table, zone("a", BASE), zone("b", BASE + 4096))
    at = zones_at(table.layout, table.generation & 1) + records.ZONE.size + 64  # inside b's owner fields
    poke(path, at, bytes([peek(path, at, 1)[0] ^ 0x04]))
    follower = reopen()
    assert follower.snapshot().record("a") == zone("a", BASE)  # b not read: the flip is not seen yet
    commit_zones(table, zone("c", BASE + 8192))  # the writer's bytes of b are the ones it checked
    assert reopen().damage() is None
    assert follower.snapshot().record("b") == zone("b", BASE + 4096)


def test_a_first_decode_checks_only_the_records_it_reads(big: Table, reopen, monkeypatch) -> None:
    """What keeps attach to a table of many zones fast: the records are checked as they are read."""
    commit_zones(big, *(zone(f"z{i:02d}", BASE + i * 4096) for i in range(40)))
    checked: list[bytes] = []
    real = table_code._check_zone
    monkeypatch.setattr(table_code, "_check_zone", lambda chunk, *a: checked.append(chunk) or real(chunk, *a))
    snap = reopen().snapshot()
    assert checked == []
    assert snap.record("z07") == zone("z07", BASE + 7 * 4096) and snap.record("z07") is snap.record("z07")
    assert snap.zone_at(BASE + 9 * 4096) == zone("z09", BASE + 9 * 4096)
    assert len(checked) == 2
    assert [z.name for z in snap.zones] == [f"z{i:02d}" for i in range(40)] and len(checked) == 40


def test_garbage_in_the_inactive_slot_is_harmless(table: Table, path: str, reopen) -> None:
    # A writer killed mid-change leaves garbage in the slot of generation g + 1
    # and in its meta record, but never touches the generation word.
    committed = commit_zones(table, zone("a", BASE), zone("b", BASE + 4096), zone("c", BASE + 8192))
    assert committed.generation == 3
    inactive = 0
    poke(path, zones_at(table.layout, inactive), b"\xa5" * 4 * records.ZONE.size)
    poke(path, table.layout.slot_at[inactive], b"\x5a" * 256)
    poke(path, table_mod.META_AT[inactive], b"\xff" * table_mod.META.size)

    reader = reopen()
    assert reader.snapshot() == committed

    with reader.locked() as base:
        reader.commit(base, remove=base.zones[1])
    assert reopen().snapshot() == Snapshot(4, 0, SEGS, (zone("a", BASE), zone("c", BASE + 8192)))


def test_garbage_in_the_inactive_segment_records_is_overwritten_by_the_next_commit(
        table: Table, path: str, reopen) -> None:
    # Segments unchanged for generations: the writer must still copy them into
    # the slot it fills, for a killed writer may have scribbled there.
    with table.locked() as base:
        table.commit(base, segments=(segment(),))
    commit_zones(table, zone("a", BASE), zone("b", BASE + 4096))  # generations 2 and 3
    poke(path, table.layout.slot_at[0], b"\x5a" * records.SEGMENT.size)  # slot of generation 4
    commit_zones(table, zone("c", BASE + 8192))  # by the same writer, whose segment CRC is cached
    snap = reopen().snapshot()
    assert (snap.generation, snap.segments, len(snap.zones)) == (4, (segment(),), 3)


def test_a_change_killed_before_its_commit_point_is_invisible(table: Table, path: str, reopen) -> None:
    # The worst case: everything of generation g + 1 written, the generation
    # word not yet stored. Readers must still see g, and the next commit wins.
    committed = commit_zones(table, zone("a", BASE))
    with table.locked() as base:
        table.commit(base, insert=zone("ghost", BASE + 4096))
    poke(path, table_mod.GEN_AT, struct.pack("<Q", 1))  # undo the one-word store

    reader = reopen()
    assert reader.generation == 1
    assert reader.snapshot() == committed
    with reader.locked() as base:
        assert base == committed
        reader.commit(base, insert=zone("real", BASE + 8192))
    assert reopen().snapshot() == Snapshot(2, 0, SEGS, (zone("a", BASE), zone("real", BASE + 8192)))


def test_bad_magic_is_refused(table: Table, path: str) -> None:
    poke(path, 0, b"NOTATABL")
    with pytest.raises(TableCorrupt, match="is not a hugeshmd table \\(bad magic\\)"):
        Table.open(path)


def test_bad_header_checksum_is_refused(table: Table, path: str) -> None:
    poke(path, 24, struct.pack("<Q", BASE + PAGE))  # the recorded base address
    with pytest.raises(TableCorrupt, match="header checksum mismatch"):
        Table.open(path)


def rewrite_header(path: str, fields: dict[int, int]) -> None:
    """Rewrite header fields *with* a valid checksum (a well-formed header of another format)."""
    values = list(table_mod._HEADER.unpack(peek(path, 0, table_mod._HEADER.size)))
    for index, value in fields.items():
        values[index] = value
    raw = table_mod._HEADER.pack(*values)
    poke(path, 0, raw + struct.pack("<I", zlib.crc32(raw)))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({1: 1}, "table format 1 is not 2"),  # field 1: format version
        ({13: records.ZONE.size + 8}, "table format 2 is not 2"),  # field 13: zone record size
    ],
)
def test_other_format_is_refused(table: Table, path: str, fields: dict[str, int], message: str) -> None:
    rewrite_header(path, fields)
    with pytest.raises(TableCorrupt, match=message):
        Table.open(path)


def test_header_rewrite_helper_keeps_a_valid_table(table: Table, path: str, reopen) -> None:
    rewrite_header(path, {1: 2})  # no change: the file must still open (guards the tests above)
    assert reopen().layout == table.layout


@pytest.mark.parametrize("size", [0, 100, HEADER_SIZE - 1])
def test_file_shorter_than_a_header_is_refused(table: Table, path: str, size: int) -> None:
    os.truncate(path, size)
    with pytest.raises(TableCorrupt, match=f"is truncated \\({size} bytes\\)"):
        Table.open(path)


@pytest.mark.parametrize("delta", [-4096, +4096])
def test_file_of_another_size_than_recorded_is_refused(table: Table, path: str, delta: int) -> None:
    size = table.layout.file_size + delta
    os.truncate(path, size)
    with pytest.raises(TableCorrupt, match=f"size {size} != recorded {table.layout.file_size}"):
        Table.open(path)


# -- the writer lock -----------------------------------------------------------


def test_locked_holds_the_flock_against_other_open_files(table: Table, path: str, reopen) -> None:
    other = reopen()  # a second Table: the lock must exclude it too
    fd = os.open(path, os.O_RDWR)
    try:
        with other.locked() as base:
            assert base.generation == 0
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free after the block
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def test_locked_releases_the_flock_when_the_block_raises(table: Table, path: str) -> None:
    with pytest.raises(RuntimeError, match="boom"), table.locked():
        raise RuntimeError("boom")
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_locked_yields_the_latest_commit_of_another_mapping(table: Table, reopen) -> None:
    table.snapshot()  # cache generation 0 in this mapping
    commit_zones(reopen(), zone("a", BASE))
    with table.locked() as base:
        assert base == Snapshot(1, 0, SEGS, (zone("a", BASE),))


def test_locked_excludes_other_threads_using_the_same_table(table: Table) -> None:
    # An flock belongs to the open file description: two threads on one fd
    # would both "hold" it, so the table must also take a thread lock.
    order: list[str] = []
    inside, leave = threading.Event(), threading.Event()

    def holder() -> None:
        with table.locked():
            order.append("A in")
            inside.set()
            leave.wait(5)
            order.append("A out")

    def contender() -> None:
        inside.wait(5)
        with table.locked():
            order.append("B in")

    threads = [threading.Thread(target=holder), threading.Thread(target=contender)]
    for thread in threads:
        thread.start()
    assert inside.wait(5)
    time.sleep(0.05)  # room for B to get in, which it must not
    assert order == ["A in"]
    leave.set()
    for thread in threads:
        thread.join(5)
    assert order == ["A in", "A out", "B in"]


def test_locked_in_a_forked_child_takes_an_flock_of_its_own(table: Table, monkeypatch) -> None:
    # After fork(2) parent and child share the table's descriptor, and so any
    # flock on it. Simulated without forking: this process takes a new pid,
    # and the table's original descriptor plays the parent's.
    parent_fd = table._fd
    monkeypatch.setattr(table_code.os, "getpid", lambda: 999_999_999)
    with table.locked():
        with pytest.raises(BlockingIOError):
            fcntl.flock(parent_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fcntl.flock(parent_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fcntl.flock(parent_fd, fcntl.LOCK_UN)


# -- state word -------------------------------------------------------------------


def test_state_and_owner_are_shared_between_mappings(table: Table, reopen) -> None:
    assert table.owner() == (0, 0)
    table.set_state(STATE_READY, 4321, 99_887_766)
    other = reopen()
    assert other.state() == (STATE_READY, 4321)
    assert other.owner() == (4321, 99_887_766)
    assert table.generation == 0  # not a versioned change


# -- workers ------------------------------------------------------------------------


def everyone_alive(pid: int, start: int) -> bool:
    return True


def test_workers_register_and_unregister(table: Table, reopen) -> None:
    registry = Registry(table)
    first = registry.register(101, 5001, everyone_alive)
    assert first == Owner(0, 1, 101, 5001)
    assert registry.register(102, 5002, everyone_alive) == Owner(1, 1, 102, 5002)
    assert Registry(reopen()).workers() == [Owner(0, 1, 101, 5001), Owner(1, 1, 102, 5002)]
    registry.unregister(first)
    assert registry.workers() == [Owner(1, 1, 102, 5002)]
    again = registry.register(103, 5003, everyone_alive)  # the freed entry first, in a new epoch
    assert again == Owner(0, 2, 103, 5003)
    assert registry.workers() == [again, Owner(1, 1, 102, 5002)]
    assert table.generation == 0  # advisory, no generation bump


def test_an_owner_token_outlives_neither_its_registration_nor_a_reused_pid(table: Table) -> None:
    registry = Registry(table)
    first = registry.register(101, 5001, everyone_alive)
    assert registry.holds(first)
    registry.unregister(first)
    same_pid = registry.register(101, 5001, everyone_alive)  # the same entry and even pid, a new epoch
    assert not registry.holds(first)
    assert registry.holds(same_pid)
    assert not registry.holds(first._replace(slot=999))


def test_unregister_with_another_registration_leaves_the_entry(table: Table) -> None:
    registry = Registry(table)
    owner = registry.register(101, 5001, everyone_alive)
    registry.unregister(owner._replace(pid=999))
    registry.unregister(owner._replace(epoch=owner.epoch + 1))
    assert registry.workers() == [owner]


def test_register_reuses_the_entry_of_a_dead_worker(table: Table) -> None:
    registry = Registry(table)
    for pid in range(201, 209):
        registry.register(pid, pid * 10, everyone_alive)
    with pytest.raises(TableFull, match=r"the worker table is full \(8 live workers\); .* larger max_workers"):
        registry.register(300, 3000, everyone_alive)

    asked: list[tuple[int, int]] = []

    def alive(pid: int, start: int) -> bool:
        asked.append((pid, start))
        return pid != 205

    assert registry.register(300, 3000, alive) == Owner(4, 2, 300, 3000)
    assert asked == [(201, 2010), (202, 2020), (203, 2030), (204, 2040), (205, 2050)]
    pids = [(o.pid, o.start) for o in registry.workers()]
    assert (300, 3000) in pids
    assert (205, 2050) not in pids
    assert len(pids) == 8


# -- iovas ------------------------------------------------------------------------------


def test_iova_of_without_iovas_is_the_address(table: Table) -> None:
    seg = segment(iova_count=0)
    assert table.iova_of(seg, BASE) == BASE
    assert table.iova_of(seg, BASE + 3 * PAGE + 17) == BASE + 3 * PAGE + 17


def test_iova_of_with_iovas_maps_each_page(table: Table, reopen) -> None:
    pages = [0x1_4000_0000, 0x7_0020_0000, 0x0_3FE0_0000, 0x2_0000_0000]
    table.write_iovas(2, pages)  # the segment's pages start at entry 2
    seg = segment(address=BASE + 4 * PAGE, length=4 * PAGE, iova_index=2, iova_count=4)
    other = reopen()
    for t in (table, other):
        assert t.iova_of(seg, BASE + 4 * PAGE) == 0x1_4000_0000
        assert t.iova_of(seg, BASE + 5 * PAGE + 0x123) == 0x7_0020_0123
        assert t.iova_of(seg, BASE + 6 * PAGE + PAGE - 1) == 0x0_3FE0_0000 + PAGE - 1
        assert t.iova_of(seg, BASE + 7 * PAGE) == 0x2_0000_0000


def test_write_iovas_beyond_the_table_raises_overflow(table: Table) -> None:
    assert table.layout.max_iovas == 32
    table.write_iovas(30, [1, 2])  # fits exactly
    with pytest.raises(OverflowError, match="iova table full"):
        table.write_iovas(31, [1, 2])


# -- closing --------------------------------------------------------------------------------


def test_close_is_idempotent(path: str) -> None:
    t = Table.create(path, make_layout())
    t.close()
    t.close()
    with pytest.raises(ValueError):
        t.generation  # noqa: B018 - the released view refuses reads


def test_swapped_records_are_corrupt_though_every_crc_still_matches(table: Table, path: str, reopen) -> None:
    commit_zones(table, zone("a", BASE), zone("b", BASE + 4096))  # generation 2, in slot 0
    at = zones_at(table.layout, 0)
    size = records.ZONE.size
    with open(path, "r+b") as f:
        f.seek(at)
        first, second = f.read(size), f.read(size)
        f.seek(at)
        f.write(second + first)  # each record keeps its own CRC, and the sum is the same
    with pytest.raises(TableCorrupt, match="generation 2 fails its checks"):
        reopen().snapshot().zones  # noqa: B018 - the order is checked with every record


def test_a_table_dropped_without_close_is_no_longer_guarded(path: str) -> None:
    import gc

    from hugeshmd.shm import guard

    t = Table.open(Table.create(path, make_layout(), segments=SEGS).path)
    start = t._address
    assert start in guard._ranges
    del t
    gc.collect()
    assert not guard._claim(start)  # its mapping went with it: the address may be anyone's next
    Table.open(path).close()  # the next table guarded drops the dead entry
    assert start not in guard._ranges


def test_a_commit_into_a_damaged_mapping_raises_and_publishes_nothing(table: Table) -> None:
    table.damaged = "the table file shrank under this process"
    with pytest.raises(TableCorrupt, match="shrank"), table.locked() as base:
        table.commit(base, insert=zone("a", BASE))


# -- readers one commit behind apply its change record ------------------------------------------


def test_a_reader_one_commit_behind_applies_the_change_instead_of_decoding(table: Table, reopen, monkeypatch) -> None:
    follower = reopen()
    follower.snapshot()
    decodes: list[int] = []
    real = Table._decode
    monkeypatch.setattr(Table, "_decode", lambda self, g, trust=True: decodes.append(g) or real(self, g, trust))
    commit_zones(table, zone("a", BASE))
    with table.locked() as base:
        table.commit(base, remove=base.zones[0], insert=zone("b", BASE + 4096))  # both in one commit
    commit_zones(table, zone("c", BASE + 8192))
    with table.locked() as base:
        table.commit(base, remove=base.zones[1])
    expected = []
    assert follower.snapshot() == table.snapshot()  # four commits behind: decoded (two slots keep two)
    assert decodes  # (more than one behind is a decode)
    decodes.clear()
    for name, at in (("d", BASE + 16384), ("e", BASE + 20480)):
        commit_zones(table, zone(name, at))
        assert follower.snapshot() == table.snapshot()
        expected.append(name)
    with table.locked() as base:
        table.commit(base, remove=base.zones[0])
    assert follower.snapshot() == table.snapshot()
    commit_zones(table, zone("f", BASE + 24576))
    with table.locked() as base:
        table.commit(base, remove=base.zones[0])
    assert follower.snapshot() == table.snapshot()  # two behind: both change records are there
    assert decodes == []  # applied, never decoded
    assert reopen().snapshot() == follower.snapshot()  # and equal to what a fresh decode finds


@pytest.mark.parametrize("lazy", [False, True])
def test_changes_applied_at_random_equal_a_fresh_decode(table: Table, reopen, lazy: bool) -> None:
    """Random inserts and removes, a follower applying each: always what a fresh decode says.
    A lazy follower (a reader that never asks for every record) applies them to the records'
    bytes and its index of names, and stays lazy."""
    import random

    rng = random.Random(9)
    follower = reopen()
    follower.snapshot().record("z0")  # builds the name index the changes then carry along
    if lazy:
        decodes: list[int] = []
        real = follower._decode
        follower._decode = lambda generation, trust=True: decodes.append(generation) or real(generation, trust)
    live: list[ZoneRecord] = []
    for step in range(300):
        with table.locked() as base:
            if live and (rng.random() < 0.45 or len(live) >= 15):
                gone = live.pop(rng.randrange(len(live)))
                table.commit(base, remove=gone)
            else:
                free = [g for g in base.gaps if g[1] - g[0] >= 4096]
                start = free[rng.randrange(len(free))][0]
                made = zone(f"z{step}", start)
                live.append(made)
                table.commit(base, insert=made)
        if step % 3 == 0:
            continue  # let the follower fall one more behind now and then
        got = follower.snapshot()
        if lazy:
            fresh = reopen().snapshot()
            assert got.lazy and got.generation == fresh.generation and got.zone_bytes == fresh.zone_bytes
            assert all(got.record(z.name) == z and got.zone_at(z.address) == z for z in live)
            names = {z.name for z in live}
            assert all(got.record(f"z{i}") is None for i in range(step) if f"z{i}" not in names)
            continue
        assert got == reopen().snapshot()
        assert sorted(got.by_name) == sorted(z.name for z in live)
        assert got.gaps == reopen().snapshot().gaps  # the moved indexes stay right
    if lazy:
        assert decodes == []  # every change applied, none decoded


def test_a_damaged_change_record_damages_its_generation_for_every_reader(table: Table, reopen, path: str) -> None:
    follower = reopen()
    follower.snapshot()
    commit_zones(table, zone("a", BASE))
    at = records.CHANGE_AT[table.generation & 1] + 16 + 8  # the inserted record's size field
    poke(path, at, struct.pack("<Q", 8 << 20))  # the meta's CRC covers the change record
    with pytest.raises(TableCorrupt, match="meta, change and segment"):
        follower.snapshot()  # one behind: the change is not applied, and the decode says why
    with pytest.raises(TableCorrupt, match="meta, change and segment"):
        reopen().snapshot()
    commit_zones(table, zone("b", BASE + 4096))  # the writer commits from what it verified: healed
    assert follower.snapshot() == reopen().snapshot() == table.snapshot()


def test_a_change_that_contradicts_the_version_before_falls_back_to_a_decode(table: Table, reopen) -> None:
    """A commit whose record overlaps another (only a forger's or a bug's): the follower one behind
    does not apply it, and says what a fresh decode says."""
    commit_zones(table, zone("a", BASE, 8192))
    follower = reopen()
    follower.snapshot()
    with table.locked() as base:
        table.commit(base, insert=zone("inside", BASE + 4096))  # commit() places nothing: it trusts its caller
    with pytest.raises(TableCorrupt, match="overlap"):
        follower.snapshot().zones  # noqa: B018 - decoded lazily: the order is checked with every record
    with pytest.raises(TableCorrupt, match="overlap"):
        reopen().snapshot().zones  # noqa: B018


def test_a_reader_applying_a_change_leaves_the_version_before_whole(table: Table, reopen) -> None:
    """Another thread may still read the cached version's indexes (zones_by_name): a change is
    applied to copies of them."""
    commit_zones(table, zone("a", BASE))
    follower = reopen()
    before = follower.snapshot()
    names, gaps = dict(before.by_name), list(before.gaps)
    commit_zones(table, zone("b", BASE + 4096))
    after = follower.snapshot()
    assert after.generation == before.generation + 1 and "b" in after.by_name
    assert before.by_name == names and before.gaps == gaps  # untouched


@pytest.fixture
def big(path: str) -> Iterator[Table]:
    t = Table.create(path, make_layout(max_zones=64), segments=SEGS)
    yield t
    t.close()


def test_a_first_decode_of_many_records_names_the_one_that_fails(big: Table, reopen, path: str) -> None:
    """A worker's first decode of many records names exactly the one that fails."""
    table = big
    commit_zones(table, *(zone(f"z{i:02d}", BASE + i * 4096) for i in range(20)))
    assert len(reopen().snapshot().zones) == 20
    at = zones_at(table.layout, table.generation & 1) + 7 * records.ZONE.size + 40
    poke(path, at, b"\x01")  # inside record 7's name: its CRC no longer matches
    with pytest.raises(TableCorrupt, match="the checksum of zone record 7"):
        reopen().snapshot().zones  # noqa: B018


def test_a_first_decode_rejects_a_record_outside_its_segment_among_many(big: Table, reopen) -> None:
    table = big
    made = [zone(f"z{i:02d}", BASE + i * 4096) for i in range(20)]
    commit_zones(table, *made)
    with table.locked() as base:  # commit() trusts its caller: a forger's record, with a valid CRC
        table.commit(base, insert=zone("outside", BASE + (8 << 20)))
    with pytest.raises(TableCorrupt, match="zone record 20 .* lies outside its segment"):
        reopen().snapshot().zones  # noqa: B018
    with pytest.raises(TableCorrupt, match="zone record .* lies outside its segment"):
        reopen().snapshot().record("outside")
