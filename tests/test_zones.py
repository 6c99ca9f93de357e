"""Unit tests of hugeshmd.zones: validation, first-fit placement, reserve/free, Zone objects.

Placement is tested on hand-made snapshots and through a Table in tmp_path;
Zone objects are made over an anonymous Python mmap instead of hugepages.
"""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import random
import weakref
from bisect import bisect_left
from collections.abc import Iterator

import numpy
import pytest
from factories import segment_record, zone_record

from hugeshmd.errors import AlreadyExists, InvalidArgument, NotFound, OutOfMemory
from hugeshmd.shm import zones
from hugeshmd.shm.layout import MODE_HUGETLBFS, NOBODY, Layout, Owner, SegmentRecord, ZoneRecord
from hugeshmd.shm.snapshot import Snapshot
from hugeshmd.shm.table import Table
from hugeshmd.shm.zones import check_align, check_name, check_size, make_zone, place

BASE = 0x1000_0000_0000
KiB = 1 << 10
MiB = 1 << 20
PAGE = 2 * MiB




def segment(sid: int, address: int, length: int, *, iova_index: int = 0, iova_count: int = 0) -> SegmentRecord:
    return segment_record(id=sid, address=address, length=length, iova_index=iova_index, iova_count=iova_count,
                          path=f"/hp/hugeshmd.t.seg{sid}")


def snapshot(segments: tuple[SegmentRecord, ...], *placed: tuple[str, int, int]) -> Snapshot:
    """A snapshot with zones (name, address, size), which must be given in address order."""
    records = tuple(zone_record(n, address=a, size=s) for n, a, s in placed)
    return Snapshot(1, 1, segments, records)


def va(segment: SegmentRecord, address: int) -> int:
    return address


def where(snap: Snapshot, name: str, size: int, align: int = 64) -> tuple[int, int]:
    """(insert index, address) that place() picks."""
    record = place(snap, name, size, align, va)
    return position(snap, record), record.address


def position(snap: Snapshot, record: ZoneRecord) -> int:
    """Where ``record`` goes among the snapshot's zones (kept in address order)."""
    return bisect_left(snap.starts, record.address)


# -- validation -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "zone-1", "Ünïcødé", "x" * 63, "é" * 31 + "x", "with space", "日本語"])
def test_check_name_accepts(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (b"bytes", "must be str, not bytes"),
        (5, "must be str, not int"),
        (None, "must be str, not NoneType"),
        ("", "got 0 bytes"),
        ("x" * 64, "got 64 bytes"),
        ("é" * 32, "got 64 bytes"),  # 32 characters, 64 bytes of UTF-8
        ("日本" * 11, "got 66 bytes"),  # 22 characters, 66 bytes
        ("a\0b", "without NUL"),
        ("\ud800", "not valid UTF-8"),  # a lone surrogate
        ("ok\udcff", "not valid UTF-8"),
    ],
)
def test_check_name_rejects(name: object, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as info:
        check_name(name)
    assert info.value.name == name


@pytest.mark.parametrize("size", [1, 4096, 2**62])
def test_check_size_accepts(size: int) -> None:
    assert check_size(size) == size


@pytest.mark.parametrize(
    ("size", "message"),
    [
        (True, "must be int, not bool"),
        (False, "must be int, not bool"),
        (1.0, "must be int, not float"),
        ("4096", "must be int, not str"),
        (None, "must be int, not NoneType"),
        (0, r"in 1\.\.2\*\*62 bytes, got 0"),
        (-1, "got -1"),
        (2**62 + 1, f"got {2**62 + 1}"),
    ],
)
def test_check_size_rejects(size: object, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        check_size(size)


@pytest.mark.parametrize(
    ("align", "expected"),
    [(None, 64), (1, 64), (2, 64), (32, 64), (64, 64), (128, 128), (2 * MiB, 2 * MiB), (2**30, 2**30)],
)
def test_check_align_accepts(align: int | None, expected: int) -> None:
    assert check_align(align) == expected


@pytest.mark.parametrize(
    ("align", "message"),
    [
        (0, "power of two up to 2\\*\\*30, got 0"),
        (3, "got 3"),
        (96, "got 96"),
        (-64, "got -64"),
        (2**31, f"got {2**31}"),
        (True, "not bool"),
        (64.0, "not float"),
        ("64", "not str"),
    ],
)
def test_check_align_rejects(align: object, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        check_align(align)


# -- placement on snapshots --------------------------------------------------------------


def test_place_first_fit_in_an_empty_segment() -> None:
    snap = snapshot((segment(0, BASE, 4 * MiB),))
    record = place(snap, "a", 1000, 64, va)
    index = position(snap, record)
    assert index == 0
    assert record == ZoneRecord("a", BASE, 1000, BASE, 64, 0, NOBODY, record.created_ns)
    assert record.created_ns > 0


def test_place_rounds_up_to_the_alignment() -> None:
    snap = snapshot((segment(0, BASE, 4 * MiB),), ("a", BASE, 100))
    assert where(snap, "b", 10, 64) == (1, BASE + 128)
    assert where(snap, "b", 10, 4096) == (1, BASE + 4096)
    assert where(snap, "b", 10, 2 * MiB) == (1, BASE + 2 * MiB)


def test_place_aligns_within_an_unaligned_segment() -> None:
    snap = snapshot((segment(0, BASE + 64, 4 * MiB),))
    assert where(snap, "a", 10, 64) == (0, BASE + 64)
    assert where(snap, "a", 10, 4096) == (0, BASE + 4096)


def test_place_takes_the_first_gap_that_fits() -> None:
    snap = snapshot(
        (segment(0, BASE, 4 * MiB),),
        ("a", BASE, 4096),
        ("b", BASE + 8192, 4096),  # 4 KiB gap before b
        ("c", BASE + 64 * KiB, 4096),  # 44 KiB gap before c
    )
    assert where(snap, "x", 4096) == (1, BASE + 4096)
    assert where(snap, "x", 8 * KiB) == (2, BASE + 12 * KiB)
    assert where(snap, "x", 64 * KiB) == (3, BASE + 68 * KiB)


def test_place_before_the_first_zone() -> None:
    snap = snapshot((segment(0, BASE, 4 * MiB),), ("a", BASE + MiB, 4096))
    assert where(snap, "x", MiB) == (0, BASE)


def test_an_exactly_fitting_zone_fills_its_segment() -> None:
    snap = snapshot((segment(0, BASE, 4 * MiB),))
    assert where(snap, "a", 4 * MiB) == (0, BASE)
    with pytest.raises(OutOfMemory):
        place(snap, "a", 4 * MiB + 1, 64, va)


def test_zones_never_straddle_two_segments() -> None:
    segs = (segment(0, BASE, 4 * MiB), segment(1, BASE + 8 * MiB, 4 * MiB))  # 4 MiB hole between
    snap = snapshot(segs, ("a", BASE, 3 * MiB))
    record = place(snap, "b", 3 * MiB, 64, va)
    index = position(snap, record)
    assert (index, record.address, record.segment) == (1, BASE + 8 * MiB, 1)
    # what is left at the end of segment 0 is still found first for a small zone
    record = place(snap, "c", MiB, 64, va)
    index = position(snap, record)
    assert (index, record.address, record.segment) == (1, BASE + 3 * MiB, 0)


def test_place_walks_segments_in_address_order() -> None:
    segs = (segment(1, BASE + 8 * MiB, 4 * MiB), segment(0, BASE, 4 * MiB))
    record = place(snapshot(segs), "a", MiB, 64, va)
    index = position(snapshot(segs), record)
    assert (index, record.address, record.segment) == (0, BASE, 0)


def test_place_refuses_a_taken_name() -> None:
    snap = snapshot((segment(0, BASE, 4 * MiB),), ("a", BASE, 100))
    with pytest.raises(AlreadyExists, match="a zone named 'a' already exists") as info:
        place(snap, "a", 100, 64, va)
    assert info.value.name == "a"


def test_out_of_memory_names_the_largest_free_run() -> None:
    segs = (segment(0, BASE, 4 * MiB), segment(1, BASE + 8 * MiB, 2 * MiB))
    snap = snapshot(segs, ("a", BASE + MiB, MiB), ("b", BASE + 8 * MiB + MiB, 4096))
    # free runs: 1 MiB and 2 MiB in segment 0, 1 MiB and 1 MiB - 4 KiB in segment 1
    with pytest.raises(OutOfMemory, match=r"no free run of 3145728 bytes .*largest free run is 2097152 bytes") as info:
        place(snap, "big", 3 * MiB, 64, va)
    assert (info.value.name, info.value.size) == ("big", 3 * MiB)
    assert isinstance(info.value, MemoryError)


def test_out_of_memory_when_alignment_does_not_fit() -> None:
    snap = snapshot((segment(0, BASE, 4 * MiB),), ("a", BASE, 64))
    with pytest.raises(OutOfMemory, match=r"aligned to 2097152.*largest free run is 4194240 bytes"):
        place(snap, "b", 3 * MiB, 2 * MiB, va)


def test_out_of_memory_without_segments() -> None:
    with pytest.raises(OutOfMemory, match="largest free run is 0 bytes"):
        place(snapshot(()), "a", 1, 64, va)


def test_place_records_the_iova_of_the_address() -> None:
    snap = snapshot((segment(3, BASE, 4 * MiB),), ("a", BASE, MiB))
    record = place(snap, "b", 100, 64, lambda seg, address: 0x9_0000_0000 + address - seg.address)
    assert (record.address, record.iova, record.segment) == (BASE + MiB, 0x9_0010_0000, 3)


def test_find() -> None:
    snap = snapshot((segment(0, BASE, 4 * MiB),), ("a", BASE, 100), ("b", BASE + 128, 100))
    assert zones.find(snap, "b") == snap.zones[1]
    with pytest.raises(NotFound, match="no zone named 'c'") as info:
        zones.find(snap, "c")
    assert info.value.name == "c"
    assert isinstance(info.value, LookupError)


# -- reserve and free on a table ----------------------------------------------------------


@pytest.fixture
def table(tmp_path) -> Iterator[Table]:
    layout = Layout.plan(base=BASE, window=64 * MiB, page_size=PAGE, mode=MODE_HUGETLBFS, prefix="t",
                         max_zones=16, max_workers=8)
    t = Table.create(str(tmp_path / "table"), layout)
    with t.locked() as base:
        t.commit(base, segments=(segment(0, BASE, 4 * MiB), segment(1, BASE + 8 * MiB, 4 * MiB)))
    yield t
    t.close()


def names_and_addresses(t: Table) -> list[tuple[str, int]]:
    return [(z.name, z.address) for z in t.snapshot().zones]


def test_reserve_commits_a_new_generation(table: Table) -> None:
    owner = Owner(2, 7, os.getpid(), 12345)
    base, new, record = zones.reserve(table, "a", 1000, 64, owner=owner)
    assert (base.generation, new.generation, table.generation) == (1, 2, 2)
    assert new.zones == (record,)
    assert (record.name, record.address, record.size, record.align, record.segment) == ("a", BASE, 1000, 64, 0)
    assert record.owner == owner
    other = Table.open(table.path)
    try:
        assert other.snapshot() == new
    finally:
        other.close()


def test_reserve_uses_the_tables_iovas(table: Table) -> None:
    table.write_iovas(0, [0x5_0000_0000, 0x6_0000_0000])
    with table.locked() as base:
        table.commit(base, segments=(segment(0, BASE, 2 * PAGE, iova_index=0, iova_count=2),))
    zones.reserve(table, "a", PAGE, 64)
    _, _, record = zones.reserve(table, "b", 4096, 4096)
    assert (record.address, record.iova) == (BASE + PAGE, 0x6_0000_0000)


def test_reserve_and_free_reuse_gaps_and_keep_zones_sorted(table: Table) -> None:
    for name in "abc":
        zones.reserve(table, name, MiB, 64)
    assert names_and_addresses(table) == [("a", BASE), ("b", BASE + MiB), ("c", BASE + 2 * MiB)]

    base, new, freed = zones.free(table, "b")
    assert (freed.name, freed.address) == ("b", BASE + MiB)
    assert new.generation == base.generation + 1

    zones.reserve(table, "d", 512 * KiB, 64)  # first fit: into b's gap
    zones.reserve(table, "e", MiB, 64)  # too big for the rest of the gap: after c
    zones.reserve(table, "f", 2 * MiB, 64)  # segment 0 is full: into segment 1
    zones.reserve(table, "g", 256 * KiB, 64)  # the rest of b's gap
    assert names_and_addresses(table) == [
        ("a", BASE), ("d", BASE + MiB), ("g", BASE + MiB + 512 * KiB), ("c", BASE + 2 * MiB),
        ("e", BASE + 3 * MiB), ("f", BASE + 8 * MiB),
    ]


def test_reserve_refuses_a_taken_name_without_a_commit(table: Table) -> None:
    zones.reserve(table, "a", 100, 64)
    with pytest.raises(AlreadyExists, match="'a'"):
        zones.reserve(table, "a", 100, 64)
    assert table.generation == 2


def test_reserve_out_of_memory_without_a_commit(table: Table) -> None:
    zones.reserve(table, "a", 3 * MiB, 64)
    with pytest.raises(OutOfMemory, match="largest free run is 4194304 bytes"):
        zones.reserve(table, "b", 5 * MiB, 64)
    assert table.generation == 2


def test_reserve_in_a_full_zone_table_raises_out_of_memory(tmp_path) -> None:
    layout = Layout.plan(base=BASE, window=64 * MiB, page_size=PAGE, mode=MODE_HUGETLBFS, prefix="t",
                         max_zones=2, max_workers=8)
    t = Table.create(str(tmp_path / "small"), layout)
    try:
        with t.locked() as base:
            t.commit(base, segments=(segment(0, BASE, 4 * MiB),))
        zones.reserve(t, "a", 100, 64)
        zones.reserve(t, "b", 100, 64)
        with pytest.raises(OutOfMemory, match=r"zone table is full \(2 zones\).*max_zones"):
            zones.reserve(t, "c", 100, 64)
        assert [z.name for z in t.snapshot().zones] == ["a", "b"]
    finally:
        t.close()


def test_free_of_an_unknown_name_raises_not_found(table: Table) -> None:
    with pytest.raises(NotFound, match="no zone named 'nope'"):
        zones.free(table, "nope")
    assert table.generation == 1


def test_a_freed_name_can_be_reserved_again(table: Table) -> None:
    zones.reserve(table, "a", 100, 64)
    zones.free(table, "a")
    _, new, record = zones.reserve(table, "a", 200, 64)
    assert new.zones == (record,)
    assert (record.address, record.size) == (BASE, 200)


# -- Zone objects over memory --------------------------------------------------------------


@pytest.fixture
def memory() -> Iterator[tuple[mmap.mmap, int]]:
    m = mmap.mmap(-1, 1 << 16)
    anchor = ctypes.c_char.from_buffer(m)
    yield m, ctypes.addressof(anchor)
    del anchor
    gc.collect()
    m.close()


def record_at(address: int, size: int, name: str = "z") -> ZoneRecord:
    return zone_record(name, address=address, size=size, iova=0xFEED_0000)


def test_zone_attributes_and_repr(memory) -> None:
    m, address = memory
    z = make_zone(record_at(address + 256, 128, "buf"), m)
    assert (z.name, z.address, z.size, z.iova) == ("buf", address + 256, 128, 0xFEED_0000)
    assert len(z) == 128
    assert repr(z) == f"<Zone 'buf' at {address + 256:#x} size 128 iova 0xfeed0000>"
    assert isinstance(z, zones.Zone)


def test_zone_memoryview_is_writable_bytes(memory) -> None:
    m, address = memory
    z = make_zone(record_at(address, 256), m)
    view = memoryview(z)
    assert (view.format, view.itemsize, view.nbytes, view.readonly, view.shape) == ("B", 1, 256, False, (256,))
    view[0:4] = b"\x01\x02\x03\x04"  # slice assignment from bytes
    assert bytes(view[:4]) == b"\x01\x02\x03\x04"
    view.release()


def test_zone_shares_memory_with_the_mapping(memory) -> None:
    m, address = memory
    z = make_zone(record_at(address + 4096, 64), m)
    z[0:5] = b"hello"
    assert m[4096:4101] == b"hello"
    m[4096 + 63] = 0xAB
    assert z[63] == 0xAB
    assert isinstance(z[63], int)
    assert bytes(z[0:5]) == b"hello"
    assert m[4095] == 0 and m[4096 + 64] == 0  # nothing written outside the zone


def test_zone_indexing_errors(memory) -> None:
    m, address = memory
    z = make_zone(record_at(address, 16), m)
    with pytest.raises(IndexError):
        z[16]  # noqa: B018
    with pytest.raises(ValueError):
        z[0] = 256
    with pytest.raises(ValueError):
        z[0:2] = b"abc"


def test_two_zones_over_one_mapping_are_independent(memory) -> None:
    m, address = memory
    a = make_zone(record_at(address, 64, "a"), m)
    b = make_zone(record_at(address + 64, 128, "b"), m)
    a[:] = b"\x11" * 64
    b[:] = b"\x22" * 128
    assert m[:64] == b"\x11" * 64
    assert m[64:192] == b"\x22" * 128
    assert (len(a), len(b)) == (64, 128)


class Mapping:
    """A stand-in for the mapping a Zone must keep alive."""


def test_zone_and_its_views_keep_the_mapping_alive(memory) -> None:
    _, address = memory
    keep = Mapping()
    ref = weakref.ref(keep)
    z = make_zone(record_at(address, 64), keep)
    del keep
    gc.collect()
    assert ref() is not None
    view = memoryview(z)
    array = z.ndarray()
    del z
    gc.collect()
    assert ref() is not None
    view.release()
    del view
    gc.collect()
    assert ref() is not None  # the ndarray still holds it
    del array
    gc.collect()
    assert ref() is None


def test_ndarray_defaults_to_bytes_over_the_whole_zone(memory) -> None:
    m, address = memory
    z = make_zone(record_at(address, 100), m)
    array = z.ndarray()
    assert (array.dtype, array.shape) == (numpy.dtype("uint8"), (100,))
    array[3] = 7
    assert m[3] == 7


def test_ndarray_with_dtype_and_shape_shares_memory(memory) -> None:
    m, address = memory
    z = make_zone(record_at(address, 256), m)
    array = z.ndarray("uint32", (4, 8))
    assert (array.dtype, array.shape) == (numpy.dtype("uint32"), (4, 8))
    array[1, 0] = 0x01020304
    assert m[32:36] == b"\x04\x03\x02\x01"
    assert z.ndarray(numpy.float64).shape == (32,)
    assert z.ndarray("uint16", 5).shape == (5,)
    assert z.ndarray("uint32", (64,)).shape == (64,)  # exactly the zone
    assert z.ndarray("float64", None).shape == (32,)


def test_ndarray_without_shape_drops_a_partial_last_item(memory) -> None:
    m, address = memory
    z = make_zone(record_at(address, 100), m)
    assert z.ndarray("uint64").shape == (12,)


@pytest.mark.parametrize(
    ("dtype", "shape", "needs"),
    [("uint8", 257, 257), ("uint32", (8, 9), 288), ("float64", (33,), 264)],
)
def test_ndarray_shape_larger_than_the_zone_is_refused(memory, dtype: str, shape: object, needs: int) -> None:
    m, address = memory
    z = make_zone(record_at(address, 256, "small"), m)
    with pytest.raises(InvalidArgument, match=f"needs {needs} bytes; zone 'small' has 256") as info:
        z.ndarray(dtype, shape)
    assert (info.value.name, info.value.size) == ("small", 256)


def test_indexes_carried_by_commits_equal_indexes_built_from_scratch(tmp_path) -> None:
    # Two segments adjacent in VA: a gap must never be merged across them.
    layout = Layout.plan(base=BASE, window=64 * MiB, page_size=PAGE, mode=MODE_HUGETLBFS, prefix="t",
                         max_zones=256, max_workers=8)
    writer = Table.create(str(tmp_path / "table"), layout)
    reader = Table.open(writer.path)
    try:
        with writer.locked() as base:
            writer.commit(base, segments=(segment(0, BASE, 4 * MiB), segment(1, BASE + 4 * MiB, 4 * MiB)))
        rng = random.Random(7)
        live: list[str] = []
        for step in range(3000):
            if live and (rng.random() < 0.45 or len(live) > 200):
                zones.free(writer, live.pop(rng.randrange(len(live))))
            else:
                name = f"z{step}"
                try:
                    zones.reserve(writer, name, rng.choice([64, 100, 4096, 65536, MiB, 3 * MiB]),
                                  rng.choice([64, 4096, 2 * MiB]))
                    live.append(name)
                except OutOfMemory:
                    pass
            if step % 97 == 0:
                carried, rebuilt = writer.snapshot(), reader.snapshot()
                assert carried == rebuilt
                assert carried.gaps == rebuilt.gaps and carried.starts == rebuilt.starts
                assert carried.by_name == rebuilt.by_name
                assert all(end <= BASE + 4 * MiB or start >= BASE + 4 * MiB for start, end, _ in carried.gaps)
    finally:
        reader.close()
        writer.close()
