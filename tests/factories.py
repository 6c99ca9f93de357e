"""Records and layouts for tests, made with keyword arguments: say what matters, default the rest."""

from __future__ import annotations

from typing import Any

from hugeshmd.shm.layout import MODE_HUGETLBFS, NOBODY, Layout, Owner, SegmentRecord, ZoneRecord

BASE = 0x1000_0000_0000
PAGE = 2 << 20
MiB = 1 << 20


def layout(**changes: Any) -> Layout:
    """A small table's layout: a 64 MiB window at BASE of 2 MiB pages, 16 zones, 8 workers."""
    args: dict[str, Any] = dict(base=BASE, window=64 * MiB, page_size=PAGE, mode=MODE_HUGETLBFS,
                                prefix="t", max_zones=16, max_workers=8)
    args.update(changes)
    return Layout.plan(**args)


def segment_record(*, id: int = 0, address: int = BASE, length: int = 8 * MiB, page_size: int = PAGE,
                   offset: int = 0, numa_node: int = -1, iova: int | None = None, iova_index: int = 0,
                   iova_count: int = 0, path: str | None = None, flags: int = 0) -> SegmentRecord:
    """A segment; ``iova`` defaults to its address, ``path`` to a hugetlbfs file of its id."""
    return SegmentRecord(id, address, length, page_size, offset, numa_node, address if iova is None else iova,
                         iova_index, iova_count, path or f"/dev/hugepages/hugeshmd.t.seg{id}", flags)


def zone_record(name: str = "z", *, address: int = BASE, size: int = 4096, iova: int | None = None,
                align: int = 64, segment: int = 0, owner: Owner = NOBODY, created_ns: int = 0,
                flags: int = 0) -> ZoneRecord:
    """A zone; ``iova`` defaults to its address."""
    return ZoneRecord(name, address, size, address if iova is None else iova, align, segment, owner,
                      created_ns, flags)
