"""The worker side: attach to an instance, then reserve, look up and free zones.

Everything here works on the shared table (:mod:`hugeshmd.shm.table`) and never
talks to the primary on the fast path: ``lookup`` is a read of the generation
word plus a dict lookup, ``reserve`` and ``free`` are a change committed under
the table's flock. ZeroMQ is imported only to wait for a primary that is not
ready yet (:func:`attach`'s slow path).
"""

from __future__ import annotations

import _thread
import os
import time
from collections import namedtuple
from collections.abc import Sequence

from .. import _fork
from ..errors import (
    AccessDenied,
    HandleClosed,
    HugeshmdError,
    InvalidArgument,
    NotFound,
    OutOfMemory,
    PrimaryStopped,
    PrimaryUnavailable,
    TableCorrupt,
)
from . import zones
from .identity import own_start_time, process_alive
from .layout import NOBODY, STATE_NAMES, STATE_READY, STATE_STOPPING, Owner, SegmentRecord, ZoneRecord
from .paths import RuntimePaths
from .registry import Registry
from .snapshot import Snapshot
from .table import DEFAULT_LOCK_TIMEOUT, Table
from .window import Window
from .zones import RESERVED, ReadOnlyZone, Zone, check_align, check_name, check_size, check_user_name, make_zone

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .buffer import Buffer
    from .channel import Channel
    from .cuda import CudaRegistration
    from .heap import Heap
    from .names import Names

__all__ = ["attach", "Secondary", "Segment", "PrimaryInfo"]

Segment = SegmentRecord
GROW_TIMEOUT = 60.0  # seconds a worker waits for the primary to map and populate a new segment


def _still(snap: Snapshot, name: str, record: ZoneRecord) -> bool:
    """Whether ``snap`` still has the zone ``name`` as ``record`` (a damaged record: no)."""
    try:
        return snap.record(name) == record
    except TableCorrupt:
        return False  # the next lookup of it says why


def _primary_info() -> Any:
    """The PrimaryInfo type, made on first use: a namedtuple costs a fresh worker 0.2 ms to make."""
    global PrimaryInfo
    if PrimaryInfo is None:
        PrimaryInfo = namedtuple("PrimaryInfo", "pid state alive adoptions")
        PrimaryInfo.__doc__ = ("What a worker knows of its instance's primary: ``pid``, ``state`` (starting, "
                               "ready, stopping), whether that process is ``alive``, and how many ``adoptions``.")
    return PrimaryInfo


PrimaryInfo: Any = None  # see _primary_info


def attach(prefix: str = "default", timeout: float = 5.0, *, runtime_root: str | None = None,
           read_only: bool = False, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> Secondary:
    """Attach this process to the instance ``prefix``: every segment at the primary's address.

    Looks for the instance where :func:`hugeshmd.shm.paths.worker_runtime_roots`
    says: ``runtime_root`` or ``$HUGESHMD_RUNTIME_ROOT`` if given, else this
    user's own runtime root and then the system's (``/run/hugeshmd``), and
    waits up to ``timeout`` seconds for a primary to be ready in one of them.
    With ``read_only`` every segment and the table are mapped ``PROT_READ``:
    zones are ReadOnlyZone, and reserve and free raise AccessDenied.

    Every later wait of this attachment for the table's writer lock (its
    registration here, reserve, free) lasts at most ``lock_timeout`` seconds,
    then raises TableBusy naming the holder: a frozen worker holding the lock
    blocks no one for longer. Lookups never wait for it.

    Raises PrimaryUnavailable when no primary is ready (its ``path`` names
    every place looked), AccessDenied when this process may not open the
    instance's files (it is outside the instance's group), AddressUnavailable
    when part of the instance's address window is already mapped in this
    process (nothing is overwritten), TableCorrupt when the shared table fails
    its checks, InvalidArgument for a malformed prefix, TableFull when the
    instance's worker table is full of live workers.
    """
    if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, (int, float)) or not 0 < lock_timeout < 1e6:
        raise InvalidArgument(f"lock_timeout must be a number of seconds in (0, 1e6), not {lock_timeout!r}",
                              name="lock_timeout")
    candidates = RuntimePaths.candidates(prefix, runtime_root)
    paths, table = _open_ready_table(candidates, timeout, not read_only)
    table.lock_timeout = float(lock_timeout)
    try:
        return Secondary(paths, table, read_only)
    except BaseException:
        table.close()
        raise


def _first_ready(candidates: list[RuntimePaths], writable: bool) -> tuple[RuntimePaths, Table] | None:
    """The first place with a ready instance. An error in one place (a table this process may
    not open, a corrupt leftover) is raised only if no other place has a ready instance."""
    failed: HugeshmdError | None = None
    for paths in candidates:
        try:
            table = _try_open(paths, writable)
        except (AccessDenied, TableCorrupt) as err:
            failed = failed or err
            continue
        if table is not None:
            return paths, table
    if failed is not None:
        raise failed
    return None


def _open_ready_table(candidates: list[RuntimePaths], timeout: float,
                      writable: bool) -> tuple[RuntimePaths, Table]:
    deadline = time.monotonic() + timeout
    found = _first_ready(candidates, writable)
    if found is not None:
        return found
    from ..wire.client import Control  # the slow path: wait for a primary to answer

    # Wait on the place where the instance's runtime dir is (the first that has one),
    # re-checking the others between the short slices of the wait.
    waited = next((p for p in candidates if os.path.isdir(p.dir)), candidates[0])
    with Control(waited) as control:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                where = "; ".join(p.control for p in candidates)
                raise PrimaryUnavailable(
                    f"no primary is running for prefix {waited.prefix!r} (waited {timeout:g} s; looked in {where})",
                    prefix=waited.prefix, path="; ".join(p.dir for p in candidates),
                )
            try:
                # Short slices: a hello that reached a primary as it stopped is
                # lost, and must not cost the whole timeout when a successor is up.
                control.request("hello", timeout=min(left, 0.5))
            except PrimaryUnavailable:
                pass
            found = _first_ready(candidates, writable)
            if found is not None:
                return found
            time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))  # answered but not yet ready


def _try_open(paths: RuntimePaths, writable: bool) -> Table | None:
    """The table if a live primary has made it ready, else None.

    Liveness is the primary's pid and start time as recorded in the table, not
    a probe of its lock: a probe would hold the lock for an instant, and a
    primary starting in that instant would take it for a rival's.
    """
    try:
        table = Table.open(paths.table, writable)
    except FileNotFoundError:
        return None
    except PermissionError as err:
        raise paths.access_denied(paths.table, err) from err
    if table.state()[0] != STATE_READY or not process_alive(*table.owner()):
        table.close()
        return None
    return table


class Secondary:
    """This process's attachment to one instance. Made by :func:`attach`.

    Usable as a context manager; :meth:`close` detaches. Zones already handed
    out keep their memory mapped until they (and their views) are gone.
    """

    def __init__(self, paths: RuntimePaths, table: Table, read_only: bool = False) -> None:
        self.prefix = paths.prefix
        self.read_only = read_only
        self._paths = paths
        self._table = table
        # Thread safety: _lock guards the bookkeeping (refresh, making a Zone,
        # the update after a commit). The lookup fast path takes no lock: it
        # reads one dict, which a refresh replaces whole, and _seen, which is
        # assigned last.
        self._lock = _thread.RLock()
        _fork.register(self)
        self._window: Window | None = None
        self._generation: Sequence[int] = (-2,)
        self._segments_generation = -1
        self._snap: Snapshot | None = None  # the version at generation _seen: its records, looked up by name
        self._by_name: dict[str, Zone | ReadOnlyZone] = {}  # the Zone objects made so far, made on first lookup
        self._made_of: dict[str, ZoneRecord] = {}  # the record each of them was made of
        self._names: Names | None = None  # the name index, once seen (hugeshmd.shm.names)
        self._frees: Any = None  # its shards' frees counters
        self._named: dict[str, tuple[Zone | ReadOnlyZone, int, int]] = {}  # its zones: (zone, shard, frees then)
        self._seen = -1
        self.owner: Owner = NOBODY  # this worker's registration: every zone it reserves carries it
        self._heap: Heap | None = None  # made by the first alloc or buffer
        self._cuda: CudaRegistration | None = None  # made by cuda_register
        self._child_owner: Owner | None = None  # a forked child's own registration, for its channel handles
        self._registry = Registry(table)
        try:
            layout = table.layout
            self._window = Window.shared(layout.base, layout.window, layout.instance_id, not read_only)
            self._generation = table.generation_word()
            self._refresh()
            # A read-only worker cannot write the worker table: it is not counted.
            self.owner = NOBODY if read_only else self._registry.register(os.getpid(), own_start_time(), process_alive)
        except BaseException:
            # Drop what holds the table's buffer and the window, or closing the
            # table would raise BufferError over the real error.
            self._generation = (-2,)
            self._window = None  # unmapped now, unless another Secondary of this process shares it
            raise

    # -- reading -----------------------------------------------------------

    def lookup(self, name: str) -> Zone | ReadOnlyZone:
        """The zone called ``name``. A local read: no round trip to the primary.

        Raises NotFound if there is none, PrimaryStopped once the primary
        has stopped for good, HandleClosed if this Secondary is closed.
        """
        if self._generation[0] != self._seen:
            self._refresh()
        zone = self._by_name.get(name)
        if zone is not None:
            return zone
        named = self._named.get(name)  # a zone of the name index: still good while its shard freed nothing
        if named is not None and self._frees is not None and self._frees[named[1]] == named[2] \
                and self._table.damaged is None:
            return named[0]
        return self._zone(name)

    def _after_fork(self) -> None:
        self._lock = _thread.RLock()  # another parent thread may have held it at fork
        self._cuda = None  # the parent's registration: CUDA does not survive fork

    def _zone(self, name: str) -> Zone | ReadOnlyZone:
        with self._lock:
            self._check_open()
            zone = self._by_name.get(name)
            if zone is None:
                record = self._snap.record(name) if self._snap is not None else None
                if record is None:
                    return self._named_zone(name)
                zone = (ReadOnlyZone(record, self._window) if self.read_only else make_zone(record, self._window))
                self._made_of[name], self._by_name[name] = record, zone
            return zone

    def _named_zone(self, name: str) -> Zone | ReadOnlyZone:
        """The zone ``name`` of the name index (:mod:`hugeshmd.shm.names`), cached with its
        shard's frees counter as read before the lookup; NotFound if there is none."""
        index = self._names_index(make=False)
        if index is not None and isinstance(name, str) and not name.startswith(RESERVED) and "\0" not in name:
            field = index.field(name)
            shard = index.shard_of(field)
            frees = index.frees[shard]
            found = index.find(field, self._table.snapshot().segments)
            if found is not None:
                record = found[1]
                self._ensure_mapped(record.address)  # its segment may be newer than this process's view
                zone = (ReadOnlyZone(record, self._window) if self.read_only else make_zone(record, self._window))
                self._named[name] = (zone, shard, frees)
                return zone
        raise NotFound(f"no zone named {name!r}", name=name)

    def _names_index(self, make: bool) -> Names | None:
        """The instance's name index (made, under the writer lock, if ``make`` and there is none)."""
        index = self._names
        if index is None:
            from .names import Names

            window = self._window
            if window is None:
                self._check_open()
            # Not under this Secondary's lock: making the index waits for the writer lock, whose
            # holder (a heap claim in another thread) may need this Secondary's lock to refresh.
            try:
                index = Names.find_or_make(self._table, window, self._table.lock_timeout, make, self._ensure_mapped)
            except ValueError:  # the table's mapping released: closed by another thread meanwhile
                self._check_open()
                raise
            if index is not None:
                with self._lock:
                    self._check_open()  # closed meanwhile: keep nothing that holds the mapping
                    if self._names is None:
                        self._names, self._frees = index, index.frees
                    index = self._names
        return index

    def _ensure_mapped(self, address: int) -> None:
        """Map any segment this process has not yet (the instance grew), so ``address`` is."""
        assert self._window is not None
        if not self._window.maps(address):
            self._refresh()

    @property
    def zones(self) -> list[Zone | ReadOnlyZone]:
        """Every zone of the instance, by address. Raises as :meth:`lookup` does."""
        if self._generation[0] != self._seen:
            self._refresh()
        with self._lock:
            records = self._snap.zones if self._snap is not None else ()
            found = [self._zone(r.name) for r in records if not r.name.startswith(RESERVED)]
            index = self._names_index(make=False)
            if index is not None and self._snap is not None:
                for record in index.zones(self._snap.segments):
                    try:
                        found.append(self._named_zone(record.name))
                    except NotFound:  # freed since
                        pass
            return sorted(found, key=lambda z: z.address)

    @property
    def segments(self) -> list[Segment]:
        """The segments mapped in this process (applying any published change first).

        Raises PrimaryStopped once the primary has stopped.
        """
        if self._generation[0] != self._seen:
            self._refresh()
        return list(self._table.snapshot().segments)

    @property
    def primary(self) -> Any:
        """The instance's primary as the table says now: pid, state and whether that process
        lives. A local read (and one of /proc); a restarted primary shows here once ready."""
        state, pid = self._table.state()
        start = self._table.owner()[1]
        return _primary_info()(pid, STATE_NAMES.get(state, "unknown"), pid > 0 and process_alive(pid, start),
                               self._table.adoptions())

    @property
    def base(self) -> int:
        return self._table.layout.base

    @property
    def page_size(self) -> int:
        return self._table.layout.page_size

    # -- writing -----------------------------------------------------------

    def reserve(self, name: str, size: int, align: int | None = None) -> Zone:
        """Reserve a new zone of ``size`` bytes, aligned to ``align`` (default 64).

        Raises AlreadyExists if the name is taken, OutOfMemory if no segment has
        room, InvalidArgument for a bad name (1-63 bytes of UTF-8), size or
        alignment (a power of two), PrimaryStopped once the primary stopped,
        TableFull when the zone table is full, HandleClosed if this Secondary is closed.
        """
        name, size, align = check_user_name(name), check_size(size), check_align(align)
        self._check_writable("reserve")
        self._check_primary()
        heap = self._heap or self._make_heap()
        index = self._names_index(make=False)
        if index is None:
            from .names import Names, reserve_unindexed

            if self._table.snapshot().record(name) is not None:
                raise zones.taken(name)
            # the index is made for a zone of the heap, when the table has room for the heap's records
            index = self._names_index(make=True) if Names.fits(size, align, self.page_size) else None
            if index is None:  # a zone of the table, with nothing named in an index to meet
                done = zones.growing(lambda: reserve_unindexed(self._table, name, size, align, owner=self.owner),
                                     self.grow, size + align)
                if done is not None:
                    return self._reserved(*done, name=name)
                index = self._names_index(make=False)  # made meanwhile by another worker
                assert index is not None
        field = index.field(name)
        shard = index.shard_of(field)
        index.lock(shard, self._repair_names)
        try:
            named, entry = index.probe(field)
            if named is not None or self._table.snapshot().record(name) is not None:
                raise zones.taken(name)
            if entry is not None and index.fits(size, align, self.page_size):  # a block of this worker's arena
                try:
                    return self._reserve_named(heap, index, entry, name, size, align)
                except OutOfMemory:  # no arena to be had (a small instance): a zone of the table may fit
                    pass
            # too large, aligned beyond a size class, its shard full, or no arena: a zone of the shared table
            base, new, record = zones.growing(
                lambda: zones.reserve(self._table, name, size, align, owner=self.owner), self.grow, size + align)
        finally:
            index.unlock(shard)
        return self._reserved(base, new, record, name=name)

    def _reserved(self, base: Snapshot, new: Snapshot, record: ZoneRecord, *, name: str) -> Zone:
        """The Zone of ``record``, just committed (``base`` to ``new``), this Secondary updated."""
        with self._lock:
            self._check_open()
            if base.generation != self._seen:
                self._refresh()
                if self._snap is not None and self._snap.record(name) == record:
                    zone = self._zone(name)
                    assert isinstance(zone, Zone)  # not read-only: _check_writable passed
                    return zone
                # freed by another process since (the name may even be someone else's
                # zone by now): still, the zone we committed is what we return
                return make_zone(record, self._window)
            zone = make_zone(record, self._window)
            self._snap, self._made_of[name], self._by_name[name] = new, record, zone
            self._seen = new.generation
            return zone

    def free(self, name: str) -> None:
        """Free the zone called ``name``.

        Raises NotFound if there is none, InvalidArgument for a bad name,
        PrimaryStopped once the primary stopped. Zone objects of it that are
        still held stay mapped, but the memory may go to the next ``reserve``.
        """
        check_user_name(name)
        self._check_writable("free")
        self._check_primary()
        index = self._names_index(make=False)
        if index is not None:
            field = index.field(name)
            shard = index.shard_of(field)
            frees = index.frees[shard]
            entry = index.probe(field)[0]
            if entry is not None:  # a zone of the index (else of the table)
                heap = self._heap or self._make_heap()
                index.lock(shard, self._repair_names)
                try:
                    if index.frees[shard] != frees:  # an entry of the shard was freed since: look again
                        entry = index.probe(field)[0]
                    if entry is not None:
                        index.remove(entry, heap._arena_at)
                        self._named.pop(name, None)
                        return
                finally:
                    index.unlock(shard)
        base, new, _ = zones.free(self._table, name)
        with self._lock:
            self._check_open()
            if base.generation != self._seen:
                self._refresh()
                return
            self._snap = new
            self._made_of.pop(name, None)
            self._by_name.pop(name, None)
            self._seen = new.generation

    def _reserve_named(self, heap: Heap, index: Names, entry: int, name: str, size: int, align: int) -> Zone:
        """Reserve zone ``name`` as a block of this worker's arena named in ``entry`` (holding its
        shard's lock)."""
        buf = heap.alloc(size, None if align <= 64 else align)
        slot = buf._slot
        assert slot is not None  # a size class serves it: class_for said so
        address = buf.address
        snap = self._table.snapshot()
        segment = next(s for s in snap.segments if s.address <= address < s.end)
        record = ZoneRecord(name, address, size, self._table.iova_of(segment, address), align, segment.id,
                            NOBODY, time.time_ns(), 0)
        index.insert(entry, record, slot[2], slot[1])
        buf._slot = None  # the handle no longer frees it: the zone holds it
        with self._lock:
            self._check_open()  # closed by another thread meanwhile: the zone stays, this handle is done
            zone = make_zone(record, self._window)
            self._named[name] = (zone, entry // index.per_shard, index.frees[entry // index.per_shard])
        return zone

    def _repair_names(self, shard: int) -> None:
        """Finish what a reserve or free killed holding ``shard``'s lock left (see Names.repair)."""
        assert self._names is not None
        heap = self._heap or self._make_heap()
        self._names.repair(shard, heap._arena_at, self._table.snapshot().segments)

    # -- the heap --------------------------------------------------------------------

    def alloc(self, size: int, align: int | None = None) -> Buffer:
        """Allocate ``size`` bytes of the shared heap (aligned to ``align``, default 64, at most
        the page size); a :class:`~hugeshmd.shm.buffer.Buffer` this process owns until it is
        freed (by any process) or disowned. If this process dies, the primary frees what it
        still owns.

        Sizes up to 64 KiB come from this process's own arena, with no lock; larger ones are
        zones of their own. Raises InvalidArgument for a bad size or alignment, OutOfMemory
        when the instance has no room, TableBusy when the writer lock (taken only to claim
        an arena or for a large allocation) stays held, AccessDenied if read-only.
        """
        heap = self._heap or self._make_heap()
        buf = heap.alloc(size, align)
        self.alloc = heap.alloc  # type: ignore[method-assign]  # the next calls skip this frame
        return buf  # type: ignore[no-any-return]

    def buffer(self, address: int) -> Buffer:
        """A handle to the live heap allocation that starts at ``address`` (made by any process
        of this instance): its size is the size asked for. Freeing through it frees the
        allocation. NotFound if no live allocation starts there (never a view of freed memory)."""
        heap = self._heap or self._make_heap()
        return heap.buffer(address)  # type: ignore[no-any-return]

    def channel(self, name: str, capacity: int | None = None) -> Channel:
        """The channel ``name`` of this instance, made (with ``capacity`` messages, default 1024)
        if there is none; any worker may open it, send and receive. See
        :class:`~hugeshmd.shm.channel.Channel`: ``send``/``recv`` move heap Buffers, and their
        ownership, from worker to worker, and no worker's death loses or doubles one.

        The handle counts as open until its ``close()`` (or a ``with`` block's end, or this
        Secondary's close): while any live worker holds one, the channel cannot be removed.

        InvalidArgument for a bad name or capacity (or another capacity than an existing
        channel's), AccessDenied if read-only, TableFull/OutOfMemory when it does not fit,
        NotFound while a live worker, or the primary, is removing it (one whose remover died is
        removed first, then made anew)."""
        from .channel import open_channel

        check_name(name)
        heap = self._channel_heap()
        assert self._window is not None
        return open_channel(heap, self._table, name, capacity, self._window, self._table.lock_timeout, heap.openings)

    def remove_channel(self, name: str) -> int:
        """Remove the channel ``name``: the buffers still queued in it are freed, its memory goes
        back to the instance; the number of messages dropped.

        ChannelBusy, changing nothing, while any live worker (this one included) holds a handle
        of it open: it names them. NotFound if there is none. A removal that a worker's death
        interrupted is finished by the primary at its next heartbeat, or by the next call of
        any worker that comes first."""
        from .channel import remove_channel

        check_name(name)
        self._check_writable("remove_channel")
        heap = self._channel_heap()
        assert self._window is not None
        return remove_channel(heap, self._table, name, self._window, self._table.lock_timeout)

    def _channel_heap(self) -> Heap:
        """The heap, with this attachment's record of the channels it holds open (made on first use)."""
        from .channel import Openings

        heap = self._heap or self._make_heap()
        if heap.openings is None:
            heap.openings = Openings(self._channel_owner)
        return heap

    def _channel_owner(self) -> Owner:
        """The registration that this process's channel handles are recorded under: this
        Secondary's, or in a forked child one of the child's own (its parent's words must stay
        the parent's), registered on first use and unregistered at close."""
        if self.owner.pid == os.getpid():
            return self.owner
        with self._lock:
            mine = self._child_owner
            if mine is None or mine.pid != os.getpid():
                mine = self._child_owner = self._registry.register(os.getpid(), own_start_time(), process_alive)
            return mine

    def empty(self, shape: int | tuple[int, ...], dtype: Any = "float64") -> Any:
        """A numpy array in the shared heap that pickles as a handle, not a copy: sent through
        ``multiprocessing.Queue``, ``Pipe`` or ``ProcessPoolExecutor``, the receiver gets the same
        memory (it attaches the instance if it has not). The memory lives while any process holds
        the array (or a view of it), or a pickled copy not yet received; see
        :mod:`hugeshmd.shm.pins` for the rules. numpy is imported here."""
        from .pins import new_array

        return new_array(self, self._pins(), shape, dtype, zero=False)

    def zeros(self, shape: int | tuple[int, ...], dtype: Any = "float64") -> Any:
        """As :meth:`empty`, filled with zeros."""
        from .pins import new_array

        return new_array(self, self._pins(), shape, dtype, zero=True)

    def _pins(self) -> Any:
        pins = self.__dict__.get("_pin_table")
        if pins is None:
            from .pins import Pins

            heap = self._heap or self._make_heap()
            assert self._window is not None
            pins = self._pin_table = Pins(heap, self._table, self._window, self._table.lock_timeout)
        return pins

    def _make_heap(self) -> Heap:
        from .heap import Heap

        with self._lock:
            self._check_open()
            self._check_writable("allocate")
            self._check_primary()
            if self._heap is None:
                assert self._window is not None
                layout = self._table.layout
                registration = self.owner

                def owner() -> Owner:
                    return Owner(registration.slot, registration.epoch, os.getpid(), own_start_time())

                def refresh() -> Snapshot:
                    self._refresh()
                    return self._table.snapshot()

                self._heap = Heap(self._table, self._window, layout.base, layout.window, owner, refresh, self.grow)
            return self._heap

    def grow(self, size: int) -> Segment:
        """Ask the primary to map another segment of at least ``size`` bytes (within its
        max_memory), and map it here; the new segment. Allocations and reserves that find no
        room do this themselves. Raises OutOfMemory, saying what is free and what to do, when
        the primary cannot; PrimaryUnavailable when none answers."""
        from ..wire.client import Control  # ZeroMQ, on this rare path only

        size = check_size(size)
        self._check_writable("grow")
        with Control(self._paths) as control:
            reply = control.request("grow", timeout=GROW_TIMEOUT, size=size)
        self._refresh()
        return next(s for s in self._table.snapshot().segments if s.id == reply["id"])

    # -- pinned for GPU DMA ------------------------------------------------------------------

    def cuda_register(self, device: int | None = None, *, library: str | None = None) -> CudaRegistration:
        """Register every segment of the instance with the CUDA runtime (``cudaHostRegister``, no
        torch needed), and every segment mapped here later (growth), so that copies between any
        zone or buffer and a GPU run at pinned-memory speed. See :mod:`hugeshmd.shm.cuda`.

        Flags ``cudaHostRegisterPortable|Mapped`` (pinned for every device, and mapped into their
        address space), with ``ReadOnly`` when attached read-only. ``device``: the device whose
        context registers (default: the calling thread's current one). ``library``: the path of
        libcudart (default: ``$HUGESHMD_CUDART``, else searched, see :mod:`hugeshmd._cudart`).
        Calling it again registers what CUDA refused before. Unregistered by
        :meth:`cuda_unregister` and :meth:`close`. Returns the registration (its ``segments``).

        Raises LibraryMissing when libcudart cannot be loaded (naming where it looked and what
        to install), CudaError when CUDA refuses (naming the error and the segment; this call
        leaves nothing registered), PrimaryStopped once the primary stopped, HandleClosed if this
        Secondary is closed.
        """
        from . import cuda

        with self._lock:
            self._check_open()
            assert self._window is not None
            self._refresh()  # every segment published so far is mapped, and then registered
            if self._cuda is None:
                self._cuda = cuda.register(self._window, device, library, self.read_only)
            else:
                self._cuda.retry()
            return self._cuda

    def cuda_unregister(self) -> None:
        """Undo :meth:`cuda_register` (``cudaHostUnregister`` of each segment, once no other
        Secondary of this process that shares the mappings holds the registration). Idempotent.
        Zones stay mapped and usable, no longer pinned. CudaError if CUDA refused to unregister
        a segment (it is no longer counted as registered all the same)."""
        with self._lock:
            registration, self._cuda = self._cuda, None
        if registration is not None:
            refused = registration.leave()
            if refused:
                raise refused[0]

    # -- keeping up with the table ----------------------------------------------

    def _check_open(self) -> None:
        if self._window is None:
            raise HandleClosed(f"this Secondary of prefix {self.prefix!r} is closed; attach again",
                               prefix=self.prefix)

    def _refresh(self) -> None:
        with self._lock:
            self._check_open()
            self._check_primary()
            snap = self._table.snapshot()
            if snap.segments_generation != self._segments_generation:
                self._apply_segments(snap)
            made_of = {n: r for n, r in self._made_of.items() if _still(snap, n, r)}
            self._by_name = {n: z for n, z in self._by_name.items() if n in made_of}
            self._snap, self._made_of = snap, made_of
            self._seen = snap.generation

    def _apply_segments(self, snap: Snapshot) -> None:
        """Map new segments and unmap removed ones, before any zone in them is seen."""
        assert self._window is not None
        wanted = {s.id: s for s in snap.segments}
        for sid in set(self._window.segments) - set(wanted):
            self._window.unmap(sid)
        for sid, s in wanted.items():
            if sid not in self._window.segments:
                try:
                    self._window.map(sid, s.address, s.length, s.path, s.offset)
                except FileNotFoundError as err:
                    raise PrimaryStopped(
                        f"segment {sid} of prefix {self.prefix!r} vanished ({s.path}): "
                        "its primary stopped or was replaced",
                        prefix=self.prefix, path=s.path,
                    ) from err
                except (ValueError, OSError) as err:  # not ours to map: see Window.map
                    raise TableCorrupt(f"segment {sid} of prefix {self.prefix!r} cannot be mapped: {err}",
                                       path=self._table.path) from err
        self._segments_generation = snap.segments_generation

    def _check_writable(self, what: str) -> None:
        if self.read_only:
            raise AccessDenied(f"cannot {what}: this process attached prefix {self.prefix!r} read-only",
                               prefix=self.prefix)

    def _check_primary(self) -> None:
        state, pid = self._table.state()
        if state == STATE_STOPPING:
            raise PrimaryStopped(
                f"the primary of prefix {self.prefix!r} (pid {pid}) has stopped; "
                "zones already held stay readable until released",
                prefix=self.prefix, path=self._paths.dir,
            )

    # -- lifetime ----------------------------------------------------------

    def close(self) -> None:
        """Detach. Idempotent. The window is unmapped once no Zone or view needs it."""
        with self._lock:
            if self._window is None:
                return
            released = True
            if self._heap is not None and self._heap.openings is not None:
                # Before unregistering: a removal must not pass while a handle here may still touch
                # the channel. A call still running after the bounded wait keeps the registration
                # (and so the channel) until this process exits.
                released = self._heap.openings.close_all()
            try:
                for owner in (self.owner, self._child_owner):
                    if released and owner is not None and owner is not NOBODY and owner.pid == os.getpid():
                        self._registry.unregister(owner)
            except (OSError, ValueError):
                pass
            if self._heap is not None:
                self._heap.release()
                self._heap = None
                self.__dict__.pop("alloc", None)
            if self._cuda is not None:
                self._cuda.leave()  # before the mappings may go; what CUDA refuses changes nothing here
                self._cuda = None
            self._snap, self._by_name, self._made_of, self._named = None, {}, {}, {}
            self._names = self._frees = None
            self._generation = (-2,)  # every call now takes the slow path and fails
            self._window = None  # released when the last Zone holding it is gone
            self._table.close()

    def __enter__(self) -> Secondary:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._window is None else repr(self._snap)
        return f"<Secondary prefix={self.prefix!r} base={self._table.layout.base:#x} {state}>"

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass

