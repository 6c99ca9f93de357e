"""What a segment's pages live in: a hugetlbfs file, or POSIX shared memory.

Both map the same way in a worker (open the path, MAP_SHARED|MAP_FIXED), so the
worker never needs to know which mode the primary chose.

Some facts about hugetlbfs files (Documentation/admin-guide/mm/hugetlbpage.rst):

* Pages are reserved when a MAP_SHARED mapping is made, not when the file is
  sized: ``mmap`` fails with ENOMEM when the pool (or the mount's ``size=``
  limit) cannot cover the whole length. That is where "not enough hugepages"
  is caught, before a single page is touched.
* The pages belong to the file, not to the process: they stay allocated while
  the file exists *or* any mapping of it does. Unlinking the file is what
  returns them once the last worker unmaps; a file left behind by a crash pins
  its pages until someone removes it, which is DPDK's classic leak and why the
  primary clears a dead predecessor's files at start (:mod:`.predecessor`).
* A worker mapping an existing file reuses the pages already in it (no new
  reservation), so a worker cannot SIGBUS on pages the primary populated.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import posix_ipc

from .. import _sys
from ..errors import HugepagesUnavailable, OutOfMemory
from ..shm.layout import MODE_HUGETLBFS, MODE_SHM, Layout
from ..shm.paths import RuntimePaths
from ..shm.window import Window
from ..sizes import format_size
from . import hugepages
from .config import DEFAULT_FALLBACK_MEMORY, Config

__all__ = ["Mapped", "HugetlbfsBacking", "ShmBacking", "Backing", "Choice", "adopted", "choose", "fall_back"]

log = logging.getLogger("hugeshmd.backing")

Progress = Callable[[int, int], None]  # (bytes done, bytes total)
OwnFd = Callable[[int], None]  # gives a new file to the instance's group and mode (hugeshmd.access)
_POPULATE_CHUNK = 64 << 20


@dataclass(frozen=True)
class Mapped:
    """A segment's pages, mapped and populated in the primary."""

    path: str
    address: int
    length: int
    iovas: list[int] | None  # per page, when physical addresses are readable
    numa_node: int


class HugetlbfsBacking:
    """Segments as files in a hugetlbfs mount of ``page_size`` pages."""

    mode = MODE_HUGETLBFS

    def __init__(self, mount: str, page_size: int, paths: RuntimePaths, own_fd: OwnFd | None = None) -> None:
        self.mount = mount
        self.page_size = page_size
        self.paths = paths
        self.own_fd = own_fd

    def path(self, segment_id: int) -> str:
        return os.path.join(self.mount, self.paths.segment_name(segment_id))

    def create(self, window: Window, segment_id: int, address: int, length: int,
               progress: Progress | None = None) -> Mapped:
        """Create, map at ``address`` and populate; HugepagesUnavailable on ENOMEM."""
        path = self.path(segment_id)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o660)
        _own(self.own_fd, fd, lambda: _discard_file(fd, path))
        try:
            _map_and_populate(window, segment_id, address, length, fd, self.page_size, progress)
        except OSError as err:
            os.close(fd)
            self._undo(window, segment_id, path)
            raise HugepagesUnavailable(
                f"could not map {length} bytes of {self.page_size}-byte hugepages at {path}: "
                f"{err.strerror} (the pool or the mount's size= limit is exhausted)",
                size=length, errno=err.errno, path=path,
            ) from err
        os.close(fd)
        return Mapped(path, address, length, _sys.physical_addresses(address, length, self.page_size),
                      numa_node(address))

    def _undo(self, window: Window, segment_id: int, path: str) -> None:
        if segment_id in window.segments:
            window.unmap(segment_id)
        os.unlink(path)

    def remove(self, segment_id: int) -> None:
        try:
            os.unlink(self.path(segment_id))
        except FileNotFoundError:
            pass


class ShmBacking:
    """Segments as POSIX shared memory in /dev/shm: 4 KiB pages, the fallback."""

    mode = MODE_SHM
    page_size = _sys.PAGE_SIZE

    def __init__(self, paths: RuntimePaths, own_fd: OwnFd | None = None) -> None:
        self.paths = paths
        self.own_fd = own_fd

    def name(self, segment_id: int) -> str:
        return self.paths.shm_name(segment_id)

    def create(self, window: Window, segment_id: int, address: int, length: int,
               progress: Progress | None = None) -> Mapped:
        """Create, map at ``address`` and populate; OutOfMemory if /dev/shm cannot hold it."""
        shm = posix_ipc.SharedMemory(self.name(segment_id), posix_ipc.O_CREX, mode=0o660, size=length)
        _own(self.own_fd, shm.fd, lambda: _discard_shm(shm))
        try:
            _map_and_populate(window, segment_id, address, length, shm.fd, self.page_size, progress)
        except OSError as err:
            if segment_id in window.segments:
                window.unmap(segment_id)
            shm.unlink()
            # tmpfs answers a populate beyond its size= with ENOMEM or EFAULT, not SIGBUS
            raise OutOfMemory(f"could not populate {length} bytes of /dev/shm{self.name(segment_id)}: "
                              f"{err.strerror} (is /dev/shm large enough?)", size=length, errno=err.errno) from err
        finally:
            shm.close_fd()
        return Mapped(f"/dev/shm{self.name(segment_id)}", address, length, None, numa_node(address))

    def remove(self, segment_id: int) -> None:
        try:
            posix_ipc.unlink_shared_memory(self.name(segment_id))
        except posix_ipc.ExistentialError:
            pass


def _discard_file(fd: int, path: str) -> None:
    os.close(fd)
    os.unlink(path)


def _discard_shm(shm: posix_ipc.SharedMemory) -> None:
    shm.close_fd()
    shm.unlink()


def _own(own_fd: OwnFd | None, fd: int, undo: Callable[[], object]) -> None:
    if own_fd is not None:
        try:
            own_fd(fd)
        except BaseException:
            undo()
            raise


def _map_and_populate(window: Window, segment_id: int, address: int, length: int, fd: int,
                      page_size: int, progress: Progress | None) -> None:
    window.map_fd(segment_id, address, length, fd, 0)
    for offset in range(0, length, _POPULATE_CHUNK):
        _sys.populate(address + offset, min(_POPULATE_CHUNK, length - offset), page_size)
        if progress is not None:
            progress(min(offset + _POPULATE_CHUNK, length), length)


def numa_node(address: int, numa_maps: str = "/proc/self/numa_maps") -> int:
    """The NUMA node holding every page of the mapping at ``address``; -1 if mixed or unknown."""
    key = f"{address:x} "
    try:
        with open(numa_maps) as lines:
            for line in lines:
                if line.startswith(key):
                    nodes = {t.split("=")[0] for t in line.split() if t[:1] == "N" and "=" in t}
                    return int(next(iter(nodes))[1:]) if len(nodes) == 1 else -1
    except OSError:
        pass
    return -1


Backing = HugetlbfsBacking | ShmBacking


@dataclass(frozen=True)
class Choice:
    """Where an instance's pages come from: the backing, how much memory, and why it fell
    back to /dev/shm (None when it did not)."""

    backing: Backing
    memory: int
    fallback_reason: str | None = None


def choose(config: Config, paths: RuntimePaths, own_fd: OwnFd | None) -> Choice:
    """The backing ``config`` asks for: hugetlbfs, or /dev/shm when ``huge_pages`` is ``off``
    or (``try``) hugepages are missing. HugepagesUnavailable with ``huge_pages = "on"``."""
    if config.huge_pages == "off":
        shm = ShmBacking(paths, own_fd)
        return Choice(shm, _round_up(config.memory or DEFAULT_FALLBACK_MEMORY, shm.page_size))
    try:
        memory = _hugepage_memory(config)  # first: "no such page size" beats "mount one"
        return Choice(_hugetlbfs(config, paths, own_fd), memory)
    except HugepagesUnavailable as err:
        if config.huge_pages == "on":
            raise
        return fall_back(config, paths, own_fd, err)


def fall_back(config: Config, paths: RuntimePaths, own_fd: OwnFd | None, err: HugepagesUnavailable) -> Choice:
    """/dev/shm instead of hugepages, for ``huge_pages = "try"``, logged with the reason."""
    log.warning("huge_pages=try: falling back to 4 KiB pages in /dev/shm: %s", err.message)
    shm = ShmBacking(paths, own_fd)
    return Choice(shm, _round_up(config.memory or DEFAULT_FALLBACK_MEMORY, shm.page_size), err.message)


def adopted(layout: Layout, first_path: str, paths: RuntimePaths, own_fd: OwnFd | None) -> Backing:
    """The backing of an instance a primary adopts: its mode and page size, its files' directory."""
    if layout.mode == MODE_HUGETLBFS:
        return HugetlbfsBacking(os.path.dirname(first_path), layout.page_size, paths, own_fd)
    return ShmBacking(paths, own_fd)


def _hugetlbfs(config: Config, paths: RuntimePaths, own_fd: OwnFd | None) -> HugetlbfsBacking:
    size = config.page_size
    mounts = [m for m in hugepages.mounts() if m.page_size == size]
    wanted = config.hugepage_dir
    if wanted is not None:
        real = os.path.realpath(wanted)
        on_a_mount = any(os.path.commonpath([real, os.path.realpath(m.path)]) == os.path.realpath(m.path)
                         for m in mounts)
        if not on_a_mount or not os.path.isdir(real):
            raise HugepagesUnavailable(
                f"{wanted} is not a hugetlbfs mount of {format_size(size)} pages (or a directory on one); "
                f"mount one with: {hugepages.mount_hint(size)}")
        return HugetlbfsBacking(wanted, size, paths, own_fd)
    if not mounts:
        raise HugepagesUnavailable(
            f"no hugetlbfs mount of {format_size(size)} pages; mount one with: {hugepages.mount_hint(size)}")
    directory = os.path.join(mounts[0].path, hugepages.SERVICE_SUBDIR)
    if not os.path.isdir(directory):
        directory = mounts[0].path
    return HugetlbfsBacking(directory, size, paths, own_fd)


def _hugepage_memory(config: Config) -> int:
    size = config.page_size
    pool = hugepages.pool(size)
    if pool is None:
        raise HugepagesUnavailable(f"this kernel has no {format_size(size)} hugepages")
    available = max(0, pool.free - pool.reserved)
    wanted = -(-config.memory // size) if config.memory else available
    if wanted == 0 or wanted > available:
        hint = hugepages.reserve_hint(size, pool.total + max(wanted, 1) - available)
        raise HugepagesUnavailable(
            f"asked for {wanted or 'all free'} hugepages of {format_size(size)}, {available} are free "
            f"(of {pool.total}); reserve more with: {hint}",
            size=wanted * size)
    return wanted * size


def _round_up(size: int, to: int) -> int:
    return -(-size // to) * to
