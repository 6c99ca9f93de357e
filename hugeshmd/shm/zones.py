"""Named zones (DPDK's memzones): validation, placement, and the Zone object.

Placement is first-fit over the free gaps of the committed snapshot (see
:mod:`hugeshmd.shm.snapshot`), inside one segment: a zone never straddles two
backing files. A reserve costs O(gaps), not O(zones). The heap of a later issue
replaces this for small allocations; zones stay for large, named, long-lived
regions.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .. import _sys
from ..errors import AlreadyExists, InvalidArgument, NotFound, OutOfMemory, TableFull
from .layout import NAME_MAX, NOBODY, Owner, SegmentRecord, ZoneRecord
from .snapshot import Snapshot
from .table import Table

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    import numpy
    import pyarrow
    import torch as _torch

__all__ = [
    "Zone", "ReadOnlyZone", "check_name", "check_user_name", "RESERVED", "check_size", "check_align", "place",
    "find", "growing", "reserve", "free", "make_zone", "taken",
]  # fmt: skip

DEFAULT_ALIGN = 64  # a cache line, as DPDK's memzones
MAX_ALIGN = 1 << 30
MAX_SIZE = 1 << 62


def check_name(name: object) -> str:
    """Return ``name`` if it is a valid zone name; else InvalidArgument."""
    if not isinstance(name, str):
        raise InvalidArgument(f"zone name must be str, not {type(name).__name__}", name=name)
    try:
        raw = name.encode()
    except UnicodeEncodeError as err:
        raise InvalidArgument(f"zone name is not valid UTF-8: {name!r}", name=name) from err
    if not 0 < len(raw) <= NAME_MAX or "\0" in name:
        raise InvalidArgument(
            f"zone name must be 1-{NAME_MAX} bytes of UTF-8 without NUL, got {len(raw)} bytes",
            name=name,
        )
    return name


RESERVED = "."  # names starting so are hugeshmd's own (the heap's directory, arenas, large allocations)


def check_user_name(name: object) -> str:
    """As :func:`check_name`, and not one of hugeshmd's own names (starting with ``.``)."""
    name = check_name(name)
    if name.startswith(RESERVED):
        raise InvalidArgument(f"zone names starting with {RESERVED!r} are hugeshmd's own (the heap's): {name!r}",
                              name=name)
    return name


def check_size(size: object) -> int:
    """Return ``size`` if it is a positive int of sane magnitude; else InvalidArgument."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise InvalidArgument(f"size must be int, not {type(size).__name__}", size=size)
    if not 0 < size <= MAX_SIZE:
        raise InvalidArgument(f"size must be in 1..2**62 bytes, got {size}", size=size)
    return size


def check_align(align: object) -> int:
    """The alignment to use: ``None`` means the default (64, a cache line); otherwise a power
    of two up to 1 GiB. Alignments below 64 are raised to 64 (every zone starts on a cache
    line, so that no two zones share one). InvalidArgument for anything else."""
    if align is None:
        return DEFAULT_ALIGN
    if isinstance(align, bool) or not isinstance(align, int):
        raise InvalidArgument(f"align must be int or None, not {type(align).__name__}", align=align)
    if align <= 0 or align & (align - 1) or align > MAX_ALIGN:
        raise InvalidArgument(f"align must be a power of two up to 2**30, got {align}", align=align)
    return max(align, DEFAULT_ALIGN)


def find(snapshot: Snapshot, name: str) -> ZoneRecord:
    """The zone called ``name`` in ``snapshot``; NotFound if none."""
    record = snapshot.record(name)
    if record is None:
        raise NotFound(f"no zone named {name!r}", name=name)
    return record


def taken(name: str) -> AlreadyExists:
    """The error for a reserve of a name a zone already has (of the table or of the heap's index)."""
    return AlreadyExists(f"a zone named {name!r} already exists", name=name)


IovaOf = Callable[[SegmentRecord, int], int]


def place(snapshot: Snapshot, name: str, size: int, align: int, iova_of: IovaOf,
          owner: Owner = NOBODY, flags: int = 0) -> ZoneRecord:
    """Where a new zone goes: the first free gap it fits in, aligned.

    Raises AlreadyExists if the name is taken, OutOfMemory if no gap fits.
    """
    if name in snapshot.by_name:
        raise taken(name)
    mask = align - 1
    for start, end, segment_id in snapshot.gaps:
        if end - start >= size:
            address = (start + mask) & ~mask
            if address + size <= end:
                for segment in snapshot.segments:
                    if segment.id == segment_id:
                        return ZoneRecord(name, address, size, iova_of(segment, address), align, segment_id,
                                          owner, time.time_ns(), flags)
    largest = max((end - start for start, end, _ in snapshot.gaps), default=0)
    raise OutOfMemory(
        f"no free run of {size} bytes (aligned to {align}) for zone {name!r}; "
        f"the largest free run is {largest} bytes",
        name=name, size=size,
    )


def growing(attempt: Callable[[], Any], grow: Callable[[int], object] | None, need: int) -> Any:
    """``attempt()``; if the instance had no room for it (OutOfMemory, not TableFull) and may grow,
    ``grow(need)`` (outside any writer lock: the primary takes it to publish the segment) and
    attempt once more. The grow's own OutOfMemory, saying why it cannot, stands alone."""
    try:
        return attempt()
    except OutOfMemory as err:
        if isinstance(err, TableFull) or grow is None:
            raise
    grow(need)
    return attempt()


def reserve(table: Table, name: str, size: int, align: int, timeout: float | None = None,
            owner: Owner = NOBODY, flags: int = 0) -> tuple[Snapshot, Snapshot, ZoneRecord]:
    """Commit a new zone: (the version it was based on, the new version, its record).

    Arguments must already be checked. Raises AlreadyExists or OutOfMemory, and
    TableBusy if the writer lock is not had within ``timeout`` seconds.
    """
    with table.locked(timeout) as base:
        record = place(base, name, size, align, table.iova_of, owner, flags)
        return base, table.commit(base, insert=record), record


def free(table: Table, name: str, timeout: float | None = None) -> tuple[Snapshot, Snapshot, ZoneRecord]:
    """Commit the removal of a zone: (base version, new version, its record).

    Raises NotFound if there is none, TableBusy as :func:`reserve` does.
    """
    with table.locked(timeout) as base:
        record = find(base, name)
        return base, table.commit(base, remove=record), record


class Zone:
    """A named run of shared memory at the same address in every process.

    ``memoryview(zone)`` is a writable, zero-copy view of format ``B`` over
    ``zone.size`` bytes at ``zone.address``; ``len(zone)`` is its size and
    ``zone[i]``/``zone[a:b]`` index bytes. The memory stays mapped while any
    Zone or view of it is alive, even after its Secondary is closed.

    Python 3.11 cannot give a Python class the buffer protocol (``__buffer__``
    arrived in 3.12), so each Zone is an instance of a ctypes byte-array type of
    its size with this class mixed in: ctypes supplies the buffer, this class
    the behaviour. Construct Zones only through ``Secondary.reserve``/``lookup``.
    """

    __slots__ = ()
    name: str
    address: int
    size: int
    iova: int

    if TYPE_CHECKING:  # ctypes supplies the buffer at run time; say so to type checkers

        def __buffer__(self, flags: int, /) -> memoryview: ...

    def __repr__(self) -> str:
        return f"<Zone {self.name!r} at {self.address:#x} size {self.size} iova {self.iova:#x}>"

    def __getitem__(self, key: int | slice) -> Any:
        return memoryview(self)[key]

    def view(self) -> memoryview:
        """``memoryview(zone)``: writable, format ``B`` (as ReadOnlyZone.view, which is read-only)."""
        return memoryview(self)

    def __setitem__(self, key: int | slice, value: Any) -> None:
        memoryview(self)[key] = value

    def ndarray(self, dtype: Any = "uint8", shape: int | tuple[int, ...] | None = None) -> numpy.ndarray:
        """A numpy array over the zone, sharing its memory (numpy is imported here).

        Raises InvalidArgument if ``shape`` needs more bytes than the zone has.
        """
        return _ndarray(memoryview(self), self.name, self.size, dtype, shape)  # type: ignore[no-any-return]

    def torch(self, dtype: Any = "uint8", shape: int | tuple[int, ...] | None = None) -> _torch.Tensor:
        """A PyTorch CPU tensor over the zone, sharing its memory (torch is imported here), of
        ``dtype`` (a ``torch.dtype`` or its name) and ``shape`` (default: flat, as many as fit).

        Raises LibraryMissing without PyTorch (``pip install 'hugeshmd[torch]'``),
        InvalidArgument if ``shape`` needs more bytes than the zone has.
        """
        from .interop import tensor

        return tensor(memoryview(self), self.name, dtype, shape)

    def arrow(self) -> pyarrow.Buffer:
        """A ``pyarrow.Buffer`` over the whole zone, sharing its memory (pyarrow is imported here);
        it keeps the zone mapped. Immutable on Arrow's side: write through the zone. Raises
        LibraryMissing without pyarrow (``pip install 'hugeshmd[arrow]'``)."""
        from .interop import arrow_buffer

        return arrow_buffer(self.address, self.size, self)


def _ndarray(view: memoryview, name: str, size: int, dtype: Any, shape: int | tuple[int, ...] | None) -> Any:
    from .interop import elements, require

    numpy = require("numpy", ".ndarray()")
    dtype = numpy.dtype(dtype)
    dims, count = elements(name, size, dtype.itemsize, shape, dtype)
    array = numpy.frombuffer(view, dtype=dtype, count=count)
    return array if shape is None else array.reshape(dims)


class ReadOnlyZone:
    """A zone as a read-only worker sees it: mapped ``PROT_READ``, so no write can land.

    ``zone.view()`` is a read-only, zero-copy ``memoryview`` (format ``B``);
    ``zone.ndarray()`` a read-only numpy array; ``len``, ``zone[i]`` and
    ``bytes(zone.view())`` read. On Python 3.12 and later ``memoryview(zone)``
    works too (``__buffer__``); on 3.11 a class cannot export a buffer except
    through ctypes, whose buffers are always writable, and a write to a
    ``PROT_READ`` page would kill the process with SIGSEGV rather than raise.
    """

    __slots__ = ("name", "address", "size", "iova", "_array")

    def __init__(self, record: ZoneRecord, keepalive: object) -> None:
        self.name, self.address, self.size, self.iova = record.name, record.address, record.size, record.iova
        self._array = _zone_type(record.size).from_address(record.address)
        self._array._mapping = keepalive  # the views keep the array, the array keeps the mapping

    def view(self) -> memoryview:
        return memoryview(self._array).toreadonly()

    def __buffer__(self, flags: int, /) -> memoryview:
        if flags & 1:  # PyBUF_WRITABLE
            raise BufferError(f"zone {self.name!r} is read-only in this process")
        return self.view()

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: int | slice) -> Any:
        return self.view()[key]

    def __repr__(self) -> str:
        return f"<ReadOnlyZone {self.name!r} at {self.address:#x} size {self.size} iova {self.iova:#x}>"

    def ndarray(self, dtype: Any = "uint8", shape: int | tuple[int, ...] | None = None) -> numpy.ndarray:
        """A read-only numpy array over the zone (numpy is imported here); as Zone.ndarray."""
        return _ndarray(self.view(), self.name, self.size, dtype, shape)  # type: ignore[no-any-return]

    def torch(self, dtype: Any = "uint8", shape: int | tuple[int, ...] | None = None) -> _torch.Tensor:
        """A PyTorch tensor over the zone, for reading: PyTorch has no read-only tensors, and a
        write through this one is a SIGSEGV (the pages are ``PROT_READ``); ``.clone()`` gives a
        writable copy. Otherwise as Zone.torch."""
        from .interop import tensor

        return tensor(self.view(), self.name, dtype, shape)

    def arrow(self) -> pyarrow.Buffer:
        """A ``pyarrow.Buffer`` over the whole zone (immutable, as every Arrow buffer over foreign
        memory); as Zone.arrow."""
        from .interop import arrow_buffer

        return arrow_buffer(self.address, self.size, self)


MAX_ZONE_TYPES = 1024
_types: dict[int, Any] = {}  # Zone type per size, oldest evicted first


def _zone_type(size: int) -> Any:
    cls = _types.get(size)
    if cls is None:
        if len(_types) >= MAX_ZONE_TYPES:
            del _types[next(iter(_types))]
        cls = _types[size] = _sys.byte_array_type(size, Zone)
    return cls


def make_zone(record: ZoneRecord, keepalive: object) -> Zone:
    """A Zone over mapped memory. ``keepalive`` (the mapping) lives as long as the Zone.

    The first Zone of a size not seen lately costs a type creation (~10 us).
    """
    zone = _zone_type(record.size).from_address(record.address)
    zone.name = record.name
    zone.address = record.address
    zone.size = record.size
    zone.iova = record.iova
    zone._mapping = keepalive
    return zone  # type: ignore[no-any-return]
