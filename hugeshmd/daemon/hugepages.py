r"""Discovery of the host's hugepage pools and hugetlbfs mounts.

Every reader takes the root it reads from (``/sys``, ``/proc/mounts``,
``/proc/meminfo``) so tests can point it at a fake tree. Nothing is cached.

Some facts about the kernel interface (Documentation/admin-guide/mm/hugetlbpage.rst):

* Each supported page size has a directory
  ``/sys/kernel/mm/hugepages/hugepages-<kB>kB/`` holding ``nr_hugepages``,
  ``free_hugepages``, ``resv_hugepages`` and ``surplus_hugepages`` (among
  others). No directory means the kernel does not support that size; no
  ``hugepages`` directory at all means a kernel built without hugetlb.
* On NUMA machines ``/sys/devices/system/node/node<N>/hugepages/hugepages-<kB>kB/``
  has ``nr_hugepages``, ``free_hugepages`` and ``surplus_hugepages`` but no
  ``resv_hugepages``: reservations are global. A memoryless node may have no
  ``hugepages`` directory at all.
* ``Hugepagesize:`` in ``/proc/meminfo`` is the default size: the one a
  hugetlbfs mounted without ``pagesize=`` uses.
* hugetlbfs shows its page size in ``/proc/mounts`` as ``pagesize=2M`` or
  ``pagesize=1G`` (binary K/M/G, see hugetlbfs_show_options); we accept any
  spelling sizes.parse_size takes, e.g. ``1024M``. Mount points there escape
  space, tab, newline and backslash as octal (``\040``), see fs/proc_namespace.c.

A number file that is missing or unreadable reads as 0 rather than failing the
whole report: ``hugeshmd hugepages`` must work unprivileged on odd kernels.

Which instance holds which of these pages is :mod:`hugeshmd.host.census`'s business;
a primary reads this module to choose its backing (:mod:`hugeshmd.daemon.backing`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import InvalidArgument
from ..sizes import GiB, KiB, MiB, parse_size

__all__ = [
    "MOUNT_HINT", "SERVICE_SUBDIR", "Mount", "Pool", "default_page_size", "find_mount", "is_mount_point",
    "mem_total", "mount_hint", "mounts", "nodes", "page_sizes", "pool", "pool_dir", "pools", "reserve_hint",
    "segment_dirs", "short_size",
]  # fmt: skip

_GLOBAL_DIR = "kernel/mm/hugepages"
_NODE_DIR = "devices/system/node"
_SIZE_DIR = re.compile(r"^hugepages-(\d+)kB$")
_NODE_NAME = re.compile(r"^node(\d+)$")
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")
_PAGESIZE_OPTION = re.compile(r"(?:^|,)pagesize=([^,]*)")
_MEMINFO_SIZE = re.compile(r"^Hugepagesize:\s*(\d+)\s*kB\s*$", re.MULTILINE)
_MEMINFO_TOTAL = re.compile(r"^MemTotal:\s*(\d+)\s*kB\s*$", re.MULTILINE)
MOUNT_HINT = "mkdir -p /dev/hugepages && mount -t hugetlbfs nodev /dev/hugepages"


@dataclass(frozen=True)
class Pool:
    """One hugepage pool: the global one of a size (``node`` None) or a node's."""

    page_size: int
    node: int | None
    total: int
    free: int
    reserved: int
    surplus: int

    @property
    def persistent(self) -> int:
        """The pages that stay when unused: what writing ``nr_hugepages`` sets."""
        return self.total - self.surplus

    @property
    def available(self) -> int:
        """Free pages that no mapping has reserved (reservations are global, so a node's is its free)."""
        return self.free - self.reserved


@dataclass(frozen=True)
class Mount:
    """One mounted hugetlbfs, as listed in /proc/mounts."""

    path: str
    page_size: int
    options: str


def _read_int(path: str) -> int:
    """The integer in a sysfs file; 0 if it is missing, unreadable or garbage."""
    try:
        with open(path, encoding="ascii") as file:
            return int(file.read().strip())
    except (OSError, ValueError):
        return 0


def _numbered(directory: str, pattern: re.Pattern[str]) -> list[int]:
    """The numbers in matching entry names, ascending; [] if ``directory`` is unreadable."""
    try:
        matches = [pattern.match(name) for name in os.listdir(directory)]
    except OSError:
        return []
    return sorted(int(match.group(1)) for match in matches if match)


def _sizes_in(directory: str) -> list[int]:
    """Page sizes in bytes named by ``hugepages-<kB>kB`` entries, ascending."""
    return [kb * KiB for kb in _numbered(directory, _SIZE_DIR)]


def _size_dir(page_size: int) -> str:
    return f"hugepages-{page_size // KiB}kB"


def page_sizes(sysfs: str = "/sys") -> list[int]:
    """Supported hugepage sizes in bytes, ascending; [] without hugepage support. Never raises."""
    return _sizes_in(os.path.join(sysfs, _GLOBAL_DIR))


def _meminfo_bytes(pattern: re.Pattern[str], meminfo: str) -> int | None:
    """The ``kB`` figure ``pattern`` finds in ``meminfo``, in bytes; None if absent."""
    try:
        with open(meminfo, encoding="ascii", errors="replace") as file:
            match = pattern.search(file.read())
    except OSError:
        return None
    return int(match.group(1)) * KiB if match else None


def default_page_size(meminfo: str = "/proc/meminfo") -> int | None:
    """The default hugepage size in bytes (``Hugepagesize:``); None if absent. Never raises."""
    return _meminfo_bytes(_MEMINFO_SIZE, meminfo)


def mem_total(meminfo: str = "/proc/meminfo") -> int | None:
    """The machine's RAM in bytes (``MemTotal:``); None if absent. Never raises."""
    return _meminfo_bytes(_MEMINFO_TOTAL, meminfo)


def _read_pool(directory: str, page_size: int, node: int | None) -> Pool:
    total, free, reserved, surplus = (
        _read_int(os.path.join(directory, f"{name}_hugepages"))
        for name in ("nr", "free", "resv", "surplus")
    )
    # Per-node directories have no resv_hugepages: reservations are global.
    return Pool(page_size, node, total, free, reserved if node is None else 0, surplus)


def _pools_in(directory: str, node: int | None) -> list[Pool]:
    """One pool per ``hugepages-<kB>kB`` entry of ``directory``, by ascending size."""
    return [
        _read_pool(os.path.join(directory, _size_dir(size)), size, node)
        for size in _sizes_in(directory)
    ]


def pools(sysfs: str = "/sys") -> list[Pool]:
    """Global pools by ascending size, then per-node pools by node then size. Never raises."""
    found = _pools_in(os.path.join(sysfs, _GLOBAL_DIR), None)
    for node in nodes(sysfs):
        found += _pools_in(os.path.join(sysfs, _NODE_DIR, f"node{node}", "hugepages"), node)
    return found


def pool_dir(page_size: int, node: int | None = None, sysfs: str = "/sys") -> str:
    """The sysfs directory of the global pool of ``page_size`` bytes, or of a node's."""
    if node is None:
        return os.path.join(sysfs, _GLOBAL_DIR, _size_dir(page_size))
    return os.path.join(sysfs, _NODE_DIR, f"node{node}", "hugepages", _size_dir(page_size))


def pool(page_size: int, sysfs: str = "/sys", node: int | None = None) -> Pool | None:
    """The global pool of ``page_size`` bytes, or ``node``'s; None if there is none. Never raises."""
    if page_size <= 0 or page_size % KiB or not os.path.isdir(pool_dir(page_size, node, sysfs)):
        return None
    return _read_pool(pool_dir(page_size, node, sysfs), page_size, node)


def nodes(sysfs: str = "/sys") -> list[int]:
    """The NUMA nodes sysfs lists, ascending, memoryless ones included; [] without NUMA. Never raises."""
    return _numbered(os.path.join(sysfs, _NODE_DIR), _NODE_NAME)


def _unescape(field: str) -> str:
    r"""Undo /proc/mounts octal escapes: ``\040`` -> space."""
    return _OCTAL_ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), field)


def _parse_mount(line: str, default: int | None) -> Mount | None:
    fields = line.split()
    if len(fields) < 4 or fields[2] != "hugetlbfs":
        return None
    match = _PAGESIZE_OPTION.search(fields[3])
    try:
        page_size = parse_size(match.group(1)) if match else None
    except ValueError:
        page_size = None
    # A page size of 0 means: no usable pagesize= option and no default in meminfo.
    return Mount(_unescape(fields[1]), page_size or default or 0, fields[3])


def mounts(proc_mounts: str = "/proc/self/mounts", meminfo: str = "/proc/meminfo") -> list[Mount]:
    """Mounted hugetlbfs in /proc/mounts order; [] if unreadable. Never raises.

    A mount without ``pagesize=`` gets the default size from ``meminfo`` (else 0).
    """
    try:
        with open(proc_mounts, encoding="utf-8", errors="surrogateescape") as file:
            lines = file.read().splitlines()
    except OSError:
        return []
    default = default_page_size(meminfo)
    parsed = (_parse_mount(line, default) for line in lines)
    return [mount for mount in parsed if mount is not None]


def find_mount(
    page_size: int, proc_mounts: str = "/proc/self/mounts", meminfo: str = "/proc/meminfo"
) -> Mount | None:
    """The first hugetlbfs mount of ``page_size`` bytes; None if there is none. Never raises."""
    for mount in mounts(proc_mounts, meminfo):
        if mount.page_size == page_size:
            return mount
    return None


def is_mount_point(path: str, proc_mounts: str = "/proc/self/mounts") -> bool:
    """True if ``/proc/mounts`` lists a filesystem of any type mounted at ``path``. Never raises."""
    try:
        with open(proc_mounts, encoding="utf-8", errors="surrogateescape") as file:
            lines = file.read().splitlines()
    except OSError:
        return False
    return any(len(fields) > 1 and _unescape(fields[1]) == path for fields in map(str.split, lines))


# A directory of this name at the top of a hugetlbfs mount is where a primary
# that runs as the service user keeps its files: the mount's root usually
# belongs to root, and the unit's pre-start (as root) makes this directory for
# the service's user and group (hugeshmd.install). A primary uses it when it exists.
SERVICE_SUBDIR = "hugeshmd"


def segment_dirs(proc_mounts: str = "/proc/self/mounts", meminfo: str = "/proc/meminfo",
                 shm: str = "/dev/shm") -> list[str]:
    """Where instances keep segment files: every hugetlbfs mount and its service
    subdirectory (if there is one), then ``shm``. Never raises."""
    found = []
    for mount in mounts(proc_mounts, meminfo):
        found.append(mount.path)
        sub = os.path.join(mount.path, SERVICE_SUBDIR)
        if os.path.isdir(sub):
            found.append(sub)
    return found + [shm]


def _check_page_size(page_size: int) -> None:
    if isinstance(page_size, bool) or not isinstance(page_size, int):
        raise InvalidArgument(f"page size must be an int, not {page_size!r}", size=page_size)
    if page_size <= 0 or page_size % KiB:
        raise InvalidArgument(f"not a hugepage size: {page_size}", size=page_size)


def short_size(page_size: int) -> str:
    """A multiple of 1 KiB in the kernel's pagesize= spelling: 2097152 -> ``2M``."""
    for suffix, factor in (("G", GiB), ("M", MiB)):
        if page_size % factor == 0:
            return f"{page_size // factor}{suffix}"
    return f"{page_size // KiB}K"


def reserve_hint(page_size: int, pages: int) -> str:
    """The shell command that reserves ``pages`` global pages of ``page_size`` bytes.

    Raises InvalidArgument unless ``page_size`` is a positive multiple of 1 KiB
    and ``pages`` an int >= 0.
    """
    _check_page_size(page_size)
    if isinstance(pages, bool) or not isinstance(pages, int) or pages < 0:
        raise InvalidArgument(f"page count must be an int >= 0, not {pages!r}", pages=pages)
    return f"echo {pages} > /sys/{_GLOBAL_DIR}/{_size_dir(page_size)}/nr_hugepages"


def mount_hint(page_size: int) -> str:
    """The shell command that mounts a hugetlbfs of ``page_size`` bytes.

    At /dev/hugepages for 2 MiB, else /dev/hugepages<size> (``1G``), always with
    ``-o pagesize=``. Raises InvalidArgument unless a positive multiple of 1 KiB.
    """
    _check_page_size(page_size)
    short = short_size(page_size)
    path = "/dev/hugepages" if page_size == 2 * MiB else f"/dev/hugepages{short}"
    return f"mkdir -p {path} && mount -t hugetlbfs -o pagesize={short} nodev {path}"
