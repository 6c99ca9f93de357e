"""The address window: one reserved VA range per instance, segments mapped inside.

The primary and every worker reserve ``[base, base + size)`` with
MAP_FIXED_NOREPLACE before mapping anything (see :mod:`hugeshmd._sys` for why),
so MAP_FIXED is only ever used over our own PROT_NONE reservation and nothing
else in the process can be overwritten. The reservation costs no memory.
"""

from __future__ import annotations

import errno
import os
import stat
import weakref

from .. import _fork, _sys
from ..errors import AddressUnavailable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["Window", "conflicts"]

# The live windows of this process, by what they map: (base, size, instance, writable) -> Window.
# A window stays mapped while any Secondary or Zone holds it, even after close().
# Changed under _fork.guard (short sections: a dict lookup and an mmap).
_live: weakref.WeakValueDictionary[tuple[int, int, object, bool], Window] = weakref.WeakValueDictionary()


def conflicts(base: int, size: int, maps: str = "/proc/self/maps") -> list[str]:
    """Lines of ``maps`` whose range overlaps ``[base, base + size)``."""
    found = []
    with open(maps) as lines:
        for line in lines:
            start, _, end = line.split(" ", 1)[0].partition("-")
            if int(start, 16) < base + size and int(end, 16) > base:
                found.append(line.rstrip("\n"))
    return found


_BACKING_KINDS = (_sys.HUGETLBFS_MAGIC, _sys.TMPFS_MAGIC)
_kinds: dict[int, int] = {}  # st_dev -> filesystem type: a device's filesystem never changes while mounted


def _backing_problem(fd: int, needed: int) -> str | None:
    """What keeps the open file ``fd`` from backing ``needed`` bytes of a segment, or None: it must be
    a regular file on a hugetlbfs or a tmpfs (statfs f_type), at least that long (a page past its
    end would be a SIGBUS at the first touch)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    kind = _kinds.get(st.st_dev)
    if kind is None:
        kind = _kinds[st.st_dev] = _sys.fstatfs_type(fd)
    if kind not in _BACKING_KINDS:
        return "is on neither a hugetlbfs nor a tmpfs"
    if st.st_size < needed:
        return f"holds {st.st_size} bytes, {needed} are mapped: truncated"
    return None


class Window:
    """A reserved VA range and the segments mapped in it. Unmapped on release or GC."""

    def __init__(self, base: int, size: int, writable: bool = True) -> None:
        self.base = base
        self.size = size
        self.writable = writable  # how segments are mapped: PROT_READ|PROT_WRITE, or PROT_READ
        self.segments: dict[int, tuple[int, int]] = {}  # id -> (address, length)
        self.watchers: list[Any] = []  # told of each segment mapped and unmapped: see watch()
        self._released = False

    @classmethod
    def shared(cls, base: int, size: int, owner: object, writable: bool = True) -> Window:
        """This process's live window for ``owner`` (an instance's identity), else a new one.

        A process that attaches the same instance twice shares one window: its
        segments are mapped once. A window left by another instance at the same
        range (say, one whose Zones outlived their Secondary), or by the same
        instance attached in the other mode (read-only vs read-write), is in the way.
        """
        with _fork.guard:  # two threads attaching at once must share, not race
            key = (base, size, owner, writable)
            window = _live.get(key)
            if window is None or window._released:
                window = cls.reserve(base, size, writable)
                _live[key] = window
            return window

    @classmethod
    def reserve(cls, base: int, size: int, writable: bool = True) -> Window:
        """Reserve the range or raise AddressUnavailable naming what is in the way."""
        try:
            _sys.reserve(base, size)
        except OSError as err:
            if err.errno != errno.EEXIST:
                raise AddressUnavailable(
                    f"cannot reserve [{base:#x}, {base + size:#x}): {err.strerror}",
                    address=base, size=size, errno=err.errno,
                ) from err
            taken = conflicts(base, size)
            ours = any(w.base < base + size and base < w.base + w.size for w in list(_live.values()))
            hint = (" It is a window of this process for another instance (or a previous primary) "
                    "that Zones or views still keep mapped: release them first." if ours
                    else " Move the instance's window with the primary's --base-address option.")
            raise AddressUnavailable(
                f"[{base:#x}, {base + size:#x}) is already in use in process {os.getpid()}: "
                + ("; ".join(taken[:3]) or "a mapping the kernel would not replace") + "." + hint,
                address=base, size=size, errno=err.errno, conflicts=taken,
            ) from err
        return cls(base, size, writable)

    def map(self, segment_id: int, address: int, length: int, path: str, offset: int) -> None:
        """Map ``length`` bytes of the file at ``path`` at ``address`` inside the window.

        Raises ValueError, naming what is wrong, unless the file is a regular file
        on a hugetlbfs or tmpfs that holds the whole range: a page beyond its end
        would be a SIGBUS at the first touch, and a forged path must not make this
        process map some other file.
        """
        fd = os.open(path, (os.O_RDWR if self.writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            problem = _backing_problem(fd, offset + length)
            if problem is not None:
                raise ValueError(f"{path} {problem}")
            self.map_fd(segment_id, address, length, fd, offset)
        finally:
            os.close(fd)

    def map_fd(self, segment_id: int, address: int, length: int, fd: int, offset: int) -> None:
        """Map ``fd`` at ``address``; ValueError unless the range lies inside the window.

        This check is what keeps MAP_FIXED inside our own reservation.
        """
        if not (self.base <= address and address + length <= self.base + self.size):
            raise ValueError(f"segment {segment_id} [{address:#x}, +{length:#x}) is outside the window")
        with _fork.guard:  # Secondaries sharing this window may map at once: once is enough
            if self.segments.get(segment_id) == (address, length):
                return
            self._map_fixed(segment_id, address, length, fd, offset)
            for watcher in list(self.watchers):
                watcher.mapped(segment_id, address, length)

    def _map_fixed(self, segment_id: int, address: int, length: int, fd: int, offset: int) -> None:
        try:
            _sys.map_fixed(address, length, fd, offset, self.writable)
        except OSError:
            # A MAP_FIXED that fails may already have unmapped the range it was
            # to replace (mmap(2) does not promise otherwise; Linux does so on
            # ENOMEM). Reserve it again, or the window would have a hole that
            # the next unrelated mapping of this process could land in.
            try:
                _sys.reserve(address, length)
            except FileExistsError:
                pass  # the old reservation is still there
            raise
        self.segments[segment_id] = (address, length)

    def maps(self, address: int) -> bool:
        """Whether ``address`` lies in a segment mapped in this window."""
        return any(a <= address < a + n for a, n in list(self.segments.values()))

    def unmap(self, segment_id: int) -> None:
        """Drop a segment's pages; its range stays reserved. Idempotent."""
        with _fork.guard:
            found = self.segments.pop(segment_id, None)
            if found is not None:
                for watcher in list(self.watchers):
                    watcher.unmapping(segment_id, *found)
                _sys.unreserve(*found)

    def release(self) -> None:
        """Unmap the whole window, segments and reservation. Idempotent."""
        if not self._released:
            self._released = True
            for segment_id, found in list(self.segments.items()):
                for watcher in list(self.watchers):
                    watcher.unmapping(segment_id, *found)
            self.segments.clear()
            _sys.munmap(self.base, self.size)

    def watch(self, watcher: Any) -> None:
        """Tell ``watcher`` of the segments mapped from now on: ``watcher.mapped(id, address,
        length)`` just after each mmap, ``watcher.unmapping(id, address, length)`` just before each
        munmap (a release included). Both are called under the window's map lock and must not
        raise. Segments already mapped are in ``segments``: see :mod:`hugeshmd.shm.cuda`."""
        with _fork.guard:
            if watcher not in self.watchers:
                self.watchers.append(watcher)

    def unwatch(self, watcher: Any) -> None:
        """Stop telling ``watcher``. Idempotent."""
        with _fork.guard:
            if watcher in self.watchers:
                self.watchers.remove(watcher)

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass
