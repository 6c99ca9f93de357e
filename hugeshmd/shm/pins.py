"""Arrays shared by reference: ``shm.empty``/``shm.zeros`` arrays, which pickle as handles.

Such an array's memory is a heap allocation owned by its *pins*: one entry per
process that holds the array (and one per pickled copy not yet unpickled), in a
table of the instance (the zone ``.pins``). The allocation is freed when its
last pin goes: the last holder drops its array, or dies (the primary removes a
dead worker's pins). So neither the sender's ``del`` nor its death frees memory
that a receiver still uses, and ``multiprocessing.Queue``, ``Pipe`` and
``ProcessPoolExecutor`` move the array without copying it.

The lifetime rules:

* each process that holds the array (made or received) holds one pin, dropped
  when its last array or view of that memory is garbage collected;
* pickling adds a pin held by the sender, for the copy in flight; unpickling
  takes that pin over (a second unpickle of the same bytes pins anew, while any
  pin is left). A copy that is never unpickled keeps the memory until its
  sender exits;
* unpickling memory already freed (every pin gone) raises NotFound; it never
  gives a view of freed memory.

The table: a header, a robust mutex (every change of it is made under the
mutex: a process killed holding it leaves at most an entry whose holder word,
written last and cleared first, says whether it counts), then entries of
(address, token, holder word). The block's own holder word is :data:`PINNED`
(one store, after its first pin is written), so reclaim of its arena keeps it;
a large allocation's zone is marked ZONE_HANDED with PINNED as its owner's epoch.
"""

from __future__ import annotations

import os
import struct
from functools import partial

from .. import _sys
from ..errors import ChannelBusy, InvalidArgument, NotFound, TableCorrupt, TableFull
from .heap import CUSTODY, DISOWNED, LIVE, PINNED, REMOTE, Heap, holder_arena
from .layout import NO_SLOT, ZONE_HANDED, ZONE_HEAP_META, Owner
from .mutex import take
from .zones import place

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from .table import Table

__all__ = ["Pins", "PINS", "PINNED", "release_pins"]

PINS = ".pins"
MAGIC = b"HSHMPIN1"
_HEAD = struct.Struct("<8sI")  # magic, entries
FREEING_AT = 16  # u64: the allocation an unpin is freeing (its last pin removed), 0 when none
LOCK_AT = 64
ENTRIES_AT = 128
ENTRY = struct.Struct("<QII")  # address, token (0: a holder's pin), holder word (written last; 0: free)
COUNT = 8192


def _size() -> int:
    return ENTRIES_AT + COUNT * ENTRY.size


class Pins:
    """The instance's pin table, as this process sees it."""

    def __init__(self, heap: Heap, table: Table, keepalive: object, lock_timeout: float) -> None:
        self._heap = heap
        self._table = table
        self._lock_timeout = lock_timeout
        record = table.snapshot().record(PINS)
        if record is None:
            with table.locked() as base:
                record = base.by_name.get(PINS)
                if record is None:
                    record = place(base, PINS, _size(), 4096, table.iova_of, flags=ZONE_HEAP_META)
                    heap._ensure_mapped(record.address)
                    _initialize(record.address, record.size)
                    table.commit(base, insert=record)
        heap._ensure_mapped(record.address)
        self._mem = _sys.memory(record.address, record.size, keepalive)
        if bytes(self._mem[:8]) != MAGIC or _HEAD.unpack_from(self._mem, 0)[1] != COUNT:
            raise TableCorrupt(f"the pin table at {record.address:#x} is not one")
        self._lock_at = record.address + LOCK_AT
        self._entries = self._mem[ENTRIES_AT:].cast("I")  # 4 words per entry: address lo/hi, token, holder

    # -- the table -----------------------------------------------------------------------

    def _locked(self) -> _Held:
        return _Held(self)

    def _find(self, address: int, token: int | None = None, holder: int | None = None) -> list[int]:
        """Indexes of the live entries for ``address`` (with that token / holder, if given)."""
        words = self._entries
        lo, hi = address & 0xFFFFFFFF, address >> 32
        raw = self._mem[ENTRIES_AT:].tobytes()
        pattern = struct.pack("<Q", address)
        found = []
        at = raw.find(pattern)
        while at >= 0:
            if at % ENTRY.size == 0:
                i = at // ENTRY.size
                if words[4 * i] == lo and words[4 * i + 1] == hi and words[4 * i + 3] and \
                        (token is None or words[4 * i + 2] == token) and (holder is None or words[4 * i + 3] == holder):
                    found.append(i)
            at = raw.find(pattern, at + 1)
        return found

    def _add(self, address: int, token: int, holder: int) -> None:
        words = self._entries
        for i in range(COUNT):
            if not words[4 * i + 3]:
                words[4 * i] = address & 0xFFFFFFFF
                words[4 * i + 1] = address >> 32
                words[4 * i + 2] = token
                words[4 * i + 3] = holder  # last: the entry counts from here
                return
        raise TableFull(f"the pin table is full ({COUNT} pins): drop some shared arrays", table="pins",
                        capacity=COUNT)

    def _remove(self, i: int) -> None:
        self._entries[4 * i + 3] = 0  # first: the entry no longer counts

    # -- what arrays do --------------------------------------------------------------------

    def make(self, size: int) -> int:
        """A new allocation of ``size`` bytes owned by its pins, this process holding the first."""
        heap = self._heap
        me = heap.holder_word()
        buf = heap.alloc(size)
        with self._locked():
            self._add(buf.address, 0, me)
            _set_holder(heap, self._table, buf, PINNED)
        return int(buf.address)

    def transit(self, address: int) -> int:
        """A pin for a pickled copy in flight, held by this process until a receiver takes it; its token."""
        me = self._heap.holder_word()
        token = int.from_bytes(os.urandom(4), "little") | 1
        with self._locked():
            if not self._find(address):
                raise NotFound(f"the shared array at {address:#x} has no pin left (freed)", name=f"{address:#x}")
            self._add(address, token, me)
        return token

    def claim(self, address: int, token: int) -> None:
        """Take over the in-flight pin ``token`` (or pin anew while any pin is left)."""
        me = self._heap.holder_word()
        with self._locked():
            mine = self._find(address, token=token)
            if mine:
                self._entries[4 * mine[0] + 2] = 0
                self._entries[4 * mine[0] + 3] = me
                return
            if not self._find(address):
                raise NotFound(f"the shared array at {address:#x} was freed before it was received (every "
                               "process that held it dropped it, or exited)", name=f"{address:#x}")
            self._add(address, 0, me)

    def unpin(self, address: int) -> None:
        """Drop this process's pin of ``address``; the last pin frees the allocation."""
        heap = self._heap
        with self._locked():
            mine = self._find(address, token=0, holder=heap.holder)
            if not mine:
                return
            _free_last(heap, self._table, self._mem, lambda: self._remove(mine[0]), address,
                       lambda: not self._find(address))


class _Held:
    """``with pins._locked():`` the pin table's robust mutex, waited for at most the lock timeout."""

    def __init__(self, pins: Pins) -> None:
        self.pins = pins
        self.at = pins._lock_at
        self.timeout = pins._lock_timeout

    def __enter__(self) -> None:
        pins = self.pins  # after a death: entries are whole or do not count; a free may be half done
        take(self.at, self.timeout, lambda: _repair(pins._heap, pins._table, pins._mem,
                                                    lambda address: not pins._find(address)),
             "the pin table's lock", ChannelBusy, PINS)

    def __exit__(self, *exc: object) -> None:
        _sys.mutex_unlock(self.at)


def _initialize(address: int, size: int) -> None:
    _sys.zero(address, size)
    mem = _sys.memory(address, ENTRIES_AT, None)
    _HEAD.pack_into(mem, 0, b"\0" * 8, COUNT)
    _sys.mutex_init(address + LOCK_AT)
    mem[0:8] = MAGIC
    mem.release()


def _clear(words: memoryview, entries: list[int]) -> None:
    for i in entries:
        words[4 * i + 3] = 0


def _free_last(heap: Any, table: Table, mem: memoryview, remove: Callable[[], None], address: int,
               unpinned: Callable[[], bool]) -> tuple[int, int]:
    """Remove a pin (``remove``) and, if it was the last (``unpinned``), free the allocation. The
    allocation is named in the header first, so that a process killed between the two steps leaves
    the next taker of the lock (:func:`_repair`) what to finish."""
    words = mem[:ENTRIES_AT].cast("Q")
    words[FREEING_AT // 8] = address
    remove()
    freed = _free_pinned(heap, table, address) if unpinned() else (0, 0)
    words[FREEING_AT // 8] = 0
    return freed


def _repair(heap: Any, table: Table, mem: memoryview, unpinned: Callable[[int], bool]) -> None:
    """Finish a free that a process killed holding the lock left half done."""
    words = mem[:ENTRIES_AT].cast("Q")
    address = words[FREEING_AT // 8]
    if address:
        if unpinned(address):
            _free_pinned(heap, table, address)  # idempotent: it frees only a block its pins still hold
        words[FREEING_AT // 8] = 0


def _set_holder(heap: Heap, table: Table, buf: Any, word: int) -> None:
    slot = buf._slot
    if slot is not None:
        slot[2].holder[slot[1]] = word
        buf._slot = None
        buf._record = None
        return
    record = buf._record
    with table.locked() as base:
        current = base.by_name[record.name]
        table.commit(base, remove=current,
                     insert=current._replace(owner=Owner(NO_SLOT, word, 0, 0), flags=current.flags | ZONE_HANDED))
    buf._record = None


def _free_pinned(heap: Heap, table: Table, address: int) -> tuple[int, int]:
    """Free an allocation whose last pin went (call under the pin table's lock); (1, bytes) or (0, 0)."""
    arena = heap._arena_at(address)
    if arena is not None:
        found = arena.locate(address)
        if found is None:
            return 0, 0
        k, c = found
        s = arena.state[k]
        if arena.holder[k] != PINNED or (s != LIVE and s != DISOWNED):
            return 0, 0
        arena.state[k] = REMOTE  # the pins were its holder: the arena's owner collects it
        arena.hint[0] = (arena.hint[0] + 1) & 0xFFFFFFFF
        from .heap import CLASS_SIZES

        return 1, CLASS_SIZES[c] - arena.slack[k]
    with table.locked() as base:
        for zone in base.zones:
            if zone.address == address and zone.flags & ZONE_HANDED and zone.owner.epoch == PINNED:
                table.commit(base, remove=zone)
                return 1, zone.size
    return 0, 0


def release_pins(heap: Any, table: Table, keepalive: object, gone: Callable[[int, int], bool],
                 wait: float) -> tuple[int, int]:
    """The primary's part: remove the pins of workers that are gone (``gone(arena, claim)`` of a
    holder word) and free what lost its last pin. ``heap`` finds arenas by address (``_arena_at``).
    Nothing if there is no pin table; (count, bytes) freed."""
    record = table.snapshot().record(PINS)
    if record is None:
        return 0, 0
    mem = _sys.memory(record.address, record.size, keepalive)
    if bytes(mem[:8]) != MAGIC:
        return 0, 0
    at = record.address + LOCK_AT
    words = mem[ENTRIES_AT:].cast("I")

    def unpinned(address: int) -> bool:
        return not any(words[4 * i + 3] and (words[4 * i] | words[4 * i + 1] << 32) == address for i in range(COUNT))

    err = _sys.mutex_lock(at, wait)
    if err == _sys.EOWNERDEAD:
        _sys.mutex_repaired(at, lambda: _repair(heap, table, mem, unpinned))
    elif err:
        return 0, 0  # busy: the next look
    try:
        doomed: dict[int, list[int]] = {}  # address -> the entries of dead holders
        for i in range(COUNT):
            word = words[4 * i + 3]
            if word and not word & CUSTODY and gone(*holder_arena(word)):
                doomed.setdefault(words[4 * i] | words[4 * i + 1] << 32, []).append(i)
        live: dict[int, int] = {}
        for i in range(COUNT):
            if words[4 * i + 3]:
                address = words[4 * i] | words[4 * i + 1] << 32
                live[address] = live.get(address, 0) + 1
        count = freed = 0
        for address, entries in doomed.items():
            n, b = _free_last(heap, table, mem, partial(_clear, words, entries), address,
                              partial(bool, live[address] == len(entries)))
            count += n
            freed += b
        return count, freed
    finally:
        _sys.mutex_unlock(at)


# -- numpy ------------------------------------------------------------------------------------


def _array_type() -> Any:
    """SharedArray, made on first use (numpy is imported here, never by ``import hugeshmd``)."""
    global _SharedArray
    if _SharedArray is None:
        import numpy

        class SharedArray(numpy.ndarray):
            """A numpy array in hugeshmd's heap that pickles as a handle (see hugeshmd.shm.pins)."""

            def __reduce_ex__(self, protocol: Any) -> Any:
                keeper = _keeper_of(self)
                if keeper is None:
                    return numpy.asarray(self).__reduce_ex__(protocol)
                token = keeper.pins.transit(keeper.address)
                data = self.__array_interface__["data"][0]
                return (_rebuild, (keeper.prefix, keeper.root, keeper.address, keeper.size, token,
                                   data - keeper.address, self.shape, self.strides, self.dtype))

            def __array_finalize__(self, obj: Any) -> None:
                pass

        _SharedArray = SharedArray
    return _SharedArray


_SharedArray: Any = None


class _Keeper:
    """Holds this process's pin of one allocation; drops it when the last array over it goes."""

    def __init__(self, pins: Pins, address: int, size: int, prefix: str, root: str | None) -> None:
        self.pins, self.address, self.size, self.prefix, self.root = pins, address, size, prefix, root
        self.pid = os.getpid()

    def __del__(self) -> None:
        if os.getpid() != self.pid:
            return  # a forked child's copy: the parent's pin, not this process's
        try:
            self.pins.unpin(self.address)
        except Exception:  # noqa: BLE001 - at exit or after close: the primary drops a dead process's pins
            pass


def _keeper_of(array: Any) -> _Keeper | None:
    base = array
    while base is not None:
        keeper = getattr(base, "_keeper", None)
        if keeper is not None:
            return keeper  # type: ignore[no-any-return]
        base = getattr(base, "base", None)
    return None


def wrap(keeper: _Keeper, offset: int, shape: Any, strides: Any, dtype: Any) -> Any:
    """An array over the pinned allocation of ``keeper`` (which the array keeps alive)."""
    import numpy

    from .zones import _zone_type

    memory = _zone_type(keeper.size).from_address(keeper.address)
    memory._keeper = keeper
    flat = numpy.frombuffer(memory, dtype=numpy.uint8, count=keeper.size)
    array = numpy.ndarray(shape, dtype=dtype, buffer=flat, offset=offset, strides=strides)
    return array.view(_array_type())


def new_array(shm: Any, pins: Pins, shape: Any, dtype: Any, zero: bool) -> Any:
    from .interop import require

    numpy = require("numpy", "shm.empty and shm.zeros")

    dtype = numpy.dtype(dtype)
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in dims):
        raise InvalidArgument(f"shape must be non-negative ints, not {shape!r}", name="shape")
    count = 1
    for d in dims:
        count *= d
    size = max(1, count * dtype.itemsize)
    address = pins.make(size)
    keeper = _Keeper(pins, address, size, shm.prefix, shm._paths.root)
    array = wrap(keeper, 0, dims, None, dtype)
    if zero:
        _sys.zero(address, size)
    return array


_attached: dict[tuple[str, str | None], tuple[int, Any]] = {}  # (pid, Secondary) by (prefix, root)


def _rebuild(prefix: str, root: str | None, address: int, size: int, token: int, offset: int, shape: Any,
             strides: Any, dtype: Any) -> Any:
    """Unpickle a shared array: this process's attachment (made if it has none), the pin taken over."""
    pid, shm = _attached.get((prefix, root), (0, None))
    if shm is None or shm._window is None or pid != os.getpid():
        from .secondary import attach

        shm = attach(prefix, runtime_root=root)
        _attached[(prefix, root)] = os.getpid(), shm
    pins = shm._pins()
    pins.claim(address, token)
    return wrap(_Keeper(pins, address, size, prefix, root), offset, shape, strides, dtype)
