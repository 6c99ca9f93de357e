"""Changing the host's hugepage pools and hugetlbfs mounts.

What ``dpdk-hugepages.py`` and ``hugeadm`` give an operator, as functions the
``hugeshmd hugepages`` subcommands call. Like :mod:`hugeshmd.daemon.hugepages`, every
function takes the roots it reads and writes (``sysfs``, ``proc_mounts``, ...),
and the pool writers take ``write``, the function that stores a number in a
sysfs file: tests pass one that plays a kernel granting less than asked.

Some facts about resizing a pool (Documentation/admin-guide/mm/hugetlbpage.rst,
and set_max_huge_pages() in mm/hugetlb.c for the exact arithmetic):

* Writing ``nr_hugepages`` asks for a *persistent* pool of that many pages. The
  kernel allocates what it can, and the write succeeds even when it could not
  get them all ("the kernel will attempt to adjust the number of huge pages";
  fragmented memory gives fewer): the only way to know is to read the file
  back. Reading it gives every page of the pool, *surplus* pages included.
* "When increasing the huge page pool size via nr_hugepages, any existing
  surplus pages will first be promoted to persistent huge pages. Then,
  additional huge pages will be allocated": growing by N fresh pages means
  writing total + N, not persistent + N.
* Shrinking never fails either: the kernel frees free pages, but never below
  ``resv + in use`` (min_count), and turns the rest of the cut into surplus:
  "Shrinking the persistent huge page pool via nr_hugepages such that it becomes
  less than the number of huge pages in use will convert the balance of the
  in-use huge pages to surplus huge pages."
* A node's ``nr_hugepages`` (``/sys/devices/system/node/node<N>/hugepages/``)
  sets that node's persistent pages: the kernel adds the other nodes' to make
  the global target and allocates or frees on that node only. Reservations
  (``resv_hugepages``) are global; nodes have none. Without a node the kernel
  spreads allocations over the nodes with memory, round robin.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import pwd
from collections.abc import Callable
from dataclasses import dataclass

from .. import _sys
from ..daemon import hugepages
from ..daemon.config import Config
from ..daemon.hugepages import Pool
from ..errors import InvalidArgument, KernelRefused
from ..sizes import format_size, parse_size

__all__ = [
    "Change", "Write", "clear", "grow_free", "mount", "page_size_of", "pages_for", "set_pool", "unmount",
    "write_number",
]  # fmt: skip

log = logging.getLogger("hugeshmd.pool")

Write = Callable[[str, int], None]  # store a number in a sysfs file, as `echo N > path` does
MAX_PAGES = 1 << 32  # beyond any machine's RAM in pages of 4 KiB and up; a guard before MemTotal is known


def write_number(path: str, value: int) -> None:
    """Write ``value`` to the sysfs file ``path`` (which must exist); KernelRefused if refused."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)  # no O_CREAT: a missing file is a missing pool
        try:
            os.write(fd, f"{value}\n".encode())
        finally:
            os.close(fd)
    except OSError as err:
        hint = " (writing hugepage pools needs root)" if err.errno in (errno.EACCES, errno.EPERM) else ""
        raise KernelRefused(f"cannot write {value} to {path}: {err.strerror}{hint}",
                            errno=err.errno, path=path) from err


@dataclass(frozen=True)
class Change:
    """A pool before and after one write: ``asked`` persistent pages (``before.persistent``
    if nothing was written), and what the kernel made of it."""

    asked: int
    before: Pool
    after: Pool

    @property
    def where(self) -> str:
        """``2 MiB`` or ``2 MiB on node 0``: the pool, for messages."""
        node = "" if self.before.node is None else f" on node {self.before.node}"
        return f"{format_size(self.before.page_size)}{node}"

    def pages(self, count: int) -> str:
        """``512 pages (1 GiB)``."""
        return f"{count} page{'' if count == 1 else 's'} ({format_size(count * self.before.page_size)})"


# -- validating what the operator asked for -------------------------------------------------------


def page_size_of(text: str, sysfs: str = "/sys") -> int:
    """The page size ``text`` names (``2M``, ``1G``); InvalidArgument unless the kernel has that pool."""
    try:
        size = parse_size(text)
    except ValueError as err:
        raise InvalidArgument(f"invalid page size: {err}", name="page_size") from err
    sizes = hugepages.page_sizes(sysfs)
    if size not in sizes:
        known = ", ".join(map(format_size, sizes)) or "none: a kernel without hugetlb"
        raise InvalidArgument(f"the kernel has no {format_size(size)} hugepages (sizes: {known})",
                              name="page_size", size=size)
    return size


def pages_for(size: int, page_size: int, meminfo: str = "/proc/meminfo") -> int:
    """Pages of ``page_size`` that hold ``size`` bytes, rounded up. InvalidArgument if ``size``
    is not positive or more than the machine's RAM (``MemTotal``): the kernel would spend
    seconds reclaiming and compacting memory before granting what it can."""
    pages = -(-size // page_size)
    limit = hugepages.mem_total(meminfo) or MAX_PAGES * page_size
    if size <= 0 or pages > MAX_PAGES or pages * page_size > limit:
        raise InvalidArgument(f"invalid size {size} bytes: ask for 1 page to {format_size(limit)} "
                              "(the machine's memory)", size=size)
    return pages


def _read(page_size: int, node: int | None, sysfs: str) -> Pool:
    """The pool as it is now; InvalidArgument naming what exists if there is none."""
    found = hugepages.pool(page_size, sysfs, node)
    if found is not None:
        return found
    if node is not None and node not in hugepages.nodes(sysfs):
        known = ", ".join(map(str, hugepages.nodes(sysfs))) or "none"
        raise InvalidArgument(f"no NUMA node {node} (nodes: {known})", name="node", node=node)
    where = f" on node {node} (a node without memory?)" if node is not None else ""
    raise InvalidArgument(f"no {format_size(page_size)} hugepage pool{where}", name="page_size", node=node)


def _write(page_size: int, node: int | None, sysfs: str, asked: int, write: Write) -> Change:
    before = _read(page_size, node, sysfs)
    if asked != before.persistent:
        write(os.path.join(hugepages.pool_dir(page_size, node, sysfs), "nr_hugepages"), asked)
    return Change(asked, before, _read(page_size, node, sysfs))


# -- the pools ------------------------------------------------------------------------------------


def set_pool(page_size: int, pages: int, node: int | None = None, sysfs: str = "/sys",
             write: Write = write_number) -> Change:
    """Make the persistent pool ``pages`` pages, globally or on ``node``; what the kernel granted.

    Raises InvalidArgument for a missing pool or node, KernelRefused if the write is refused.
    """
    return _write(page_size, node, sysfs, pages, write)


def grow_free(page_size: int, pages: int, sysfs: str = "/sys", write: Write = write_number) -> Change:
    """Grow the global pool until ``pages`` free pages are not reserved; never shrinks it.

    Nothing is written if enough are free already. The caller compares
    ``after.available`` with ``pages``. Raises as :func:`set_pool`.
    """
    before = _read(page_size, None, sysfs)
    missing = pages - before.available
    # Surplus pages are promoted before any page is allocated (hugetlbpage.rst), so N fresh
    # pages take a persistent target of every page in the pool plus N.
    asked = before.total + missing if missing > 0 else before.persistent
    return _write(page_size, None, sysfs, asked, write)


def releasable(global_pool: Pool, node_pool: Pool | None = None) -> int:
    """How many pages :func:`clear` may free: free ones that no reservation or use needs.

    The kernel stops freeing at ``resv + in use`` and turns the rest of a cut
    into surplus pages, that is, it would take pages *in use* out of the
    persistent pool, to vanish when their file goes (set_max_huge_pages in
    mm/hugetlb.c, and hugetlbpage.rst on shrinking). A cut of
    ``free - resv - surplus`` is the largest that converts nothing: with
    ``P = total - surplus`` the kernel keeps ``resv + total - free`` pages,
    which equals ``P - cut`` exactly.
    On a node, only its free pages can go, and no more than the global
    bound: reservations are global, so the pages that cover them may be any
    node's free pages, and freeing too many on one node would eat into them.
    """
    bound = global_pool.free - global_pool.reserved - global_pool.surplus
    if node_pool is not None:
        bound = min(bound, node_pool.free)
    return max(0, bound)


def clear(page_size: int, node: int | None = None, sysfs: str = "/sys", write: Write = write_number) -> Change:
    """Release the free pages no one needs, globally or on ``node`` (see :func:`releasable`).

    The caller reads what was released as ``before.total - after.total``.
    Raises as :func:`set_pool`.
    """
    global_pool = _read(page_size, None, sysfs)
    node_pool = None if node is None else _read(page_size, node, sysfs)
    target = node_pool or global_pool
    return _write(page_size, node, sysfs, target.persistent - releasable(global_pool, node_pool), write)


def describe_set(change: Change) -> str:
    """What :func:`set_pool` did, in a sentence."""
    granted = change.after.persistent
    if granted < change.asked:
        return (f"asked {change.pages(change.asked)} of {change.where}; the kernel granted {granted} "
                f"({format_size(granted * change.before.page_size)}): memory is short or fragmented; "
                "free some, or reserve at boot (hugepages= on the kernel command line)")
    node = "" if change.before.node is None else f"node {change.before.node}'s "
    text = f"{node}{format_size(change.before.page_size)} pool: {change.pages(granted)}, was {change.before.persistent}"
    if change.after.surplus:
        text += f"; {change.after.surplus} more in use go when freed (surplus)"
    return text


def describe_clear(change: Change) -> str:
    """What :func:`clear` did, in a sentence."""
    released = change.before.total - change.after.total
    kept = change.after.total
    if released <= 0 and change.asked == change.before.persistent:
        return f"nothing to release: no free, unreserved {change.where} pages; {change.pages(kept)} stay"
    text = f"released {change.pages(released)} of {change.where}; {kept} stay (in use or reserved)"
    expected = change.before.persistent - change.asked
    if released < expected:
        text += f"; {expected - released} more were free when asked but were taken meanwhile"
    return text


# -- ExecStartPre: enough for an instance's config ------------------------------------------------


@dataclass(frozen=True)
class ConfigReserve:
    """The outcome of :func:`reserve_for`: a sentence, and whether the instance is short."""

    message: str
    short: bool


def reserve_for(conf: Config, sysfs: str = "/sys", meminfo: str = "/proc/meminfo",
                write: Write = write_number) -> ConfigReserve:
    """Grow the pool of ``conf.page_size`` so that ``conf.memory`` is free; never shrink it.

    ``short`` is True only when ``huge_pages = "on"`` and the pool still falls
    short (``try`` falls back to /dev/shm, so it gets a warning). Raises
    InvalidArgument for an absurd memory, KernelRefused if the write is refused.
    """
    if conf.huge_pages == "off":
        return ConfigReserve('huge_pages = "off": the instance uses /dev/shm; nothing to reserve', False)
    if conf.memory is None:
        return ConfigReserve("no memory set: the primary maps whatever is free at start; nothing to reserve", False)
    pages = pages_for(conf.memory, conf.page_size, meminfo)
    if hugepages.pool(conf.page_size, sysfs) is None:
        return _short(conf, f"the kernel has no {format_size(conf.page_size)} hugepages")
    change = grow_free(conf.page_size, pages, sysfs, write)
    have = change.after.available
    grew = "" if change.after.total == change.before.total else \
        f"grew the {change.where} pool from {change.before.total} to {change.after.total} pages; "
    if have >= pages:
        return ConfigReserve(f"{grew}{change.pages(have)} free, enough for memory "
                             f"{format_size(conf.memory)} ({pages} pages)", False)
    return _short(conf, f"{grew}only {change.pages(have)} free of the {pages} that memory "
                        f"{format_size(conf.memory)} needs; the kernel granted no more")


def _short(conf: Config, why: str) -> ConfigReserve:
    if conf.huge_pages == "on":
        return ConfigReserve(f"{why}; with huge_pages = \"on\" the primary will refuse to start", True)
    return ConfigReserve(f"warning: {why}; with huge_pages = \"try\" the primary falls back to /dev/shm", False)


# -- hugetlbfs mounts -----------------------------------------------------------------------------


def _id_of(name: str, lookup: Callable[[str], int], what: str) -> int:
    if name.isdigit():
        return int(name)
    try:
        return lookup(name)
    except KeyError:
        raise InvalidArgument(f"no {what} named {name!r}", name=name) from None


def mount_options(page_size: int, owner: str | None = None, group: str | None = None,
                  mode: str | None = None, size: int | None = None) -> str:
    """The hugetlbfs option string (``pagesize=2M,uid=...``); InvalidArgument for a bad value.

    ``size`` is rounded up to whole pages (hugetlbfs would round it down).
    """
    options = [f"pagesize={hugepages.short_size(page_size)}"]
    if owner is not None:
        options.append(f"uid={_id_of(owner, lambda n: pwd.getpwnam(n).pw_uid, 'user')}")
    if group is not None:
        options.append(f"gid={_id_of(group, lambda n: grp.getgrnam(n).gr_gid, 'group')}")
    if mode is not None:
        try:
            bits = int(mode, 8)
        except ValueError:
            bits = -1
        if not 0 <= bits <= 0o7777:
            raise InvalidArgument(f"invalid mode {mode!r}: write octal, e.g. 0770", name="mode")
        options.append(f"mode={bits:04o}")
    if size is not None:
        if size <= 0:
            raise InvalidArgument(f"invalid size {size}: a mount holds at least one page", size=size)
        options.append(f"size={-(-size // page_size) * page_size}")
    return ",".join(options)


def mount(path: str, options: str, proc_mounts: str = "/proc/self/mounts") -> str:
    """Mount a hugetlbfs with ``options`` at ``path`` (made if missing); the real path.

    InvalidArgument if something is mounted there already or ``path`` is not a
    directory; KernelRefused if mount(2) fails (EPERM without root).
    """
    target = os.path.realpath(path)  # mount(2) follows symlinks; /proc/mounts lists where it landed
    if os.path.ismount(target) or hugepages.is_mount_point(target, proc_mounts):
        raise InvalidArgument(f"{target} is a mount point already; unmount it first or pick another path",
                              path=target)
    made = not os.path.exists(target)
    try:
        os.makedirs(target, mode=0o755, exist_ok=True)
    except OSError as err:
        raise InvalidArgument(f"cannot make the directory {target}: {err.strerror}", path=target) from err
    try:
        _sys.mount("nodev", target, "hugetlbfs", 0, options)
    except OSError as err:
        if made:
            os.rmdir(target)
        raise KernelRefused(f"cannot mount hugetlbfs at {target}: {err.strerror}", errno=err.errno,
                            path=target) from err
    return target


def unmount(path: str, proc_mounts: str = "/proc/self/mounts", meminfo: str = "/proc/meminfo") -> str:
    """Unmount the hugetlbfs at ``path`` (its directory stays); the real path.

    InvalidArgument if no hugetlbfs is mounted there; KernelRefused if umount2(2)
    fails (EBUSY while a file in it is open or mapped, for instance by a primary).
    """
    target = os.path.realpath(path)
    if not any(m.path == target for m in hugepages.mounts(proc_mounts, meminfo)):
        raise InvalidArgument(f"no hugetlbfs is mounted at {target}", path=target)
    try:
        _sys.umount2(target)
    except OSError as err:
        busy = " (a file in it is open or mapped: is an instance using it?)" if err.errno == errno.EBUSY else ""
        raise KernelRefused(f"cannot unmount {target}: {err.strerror}{busy}", errno=err.errno,
                            path=target) from err
    return target
