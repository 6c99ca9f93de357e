"""Adoption: a primary that finds a dead predecessor's instance takes it over, every byte kept.

Some facts that make adoption cheap and safe:

* The instance outlives its primary on disk: the segment files (hugetlbfs or
  /dev/shm) keep their pages while they exist, and the table in the runtime
  dir keeps every committed zone and worker entry. Workers map both, so they
  go on reading, reserving and freeing while no primary runs.
* Re-mapping a populated file costs page-table set-up only: the pages are
  already allocated and zeroed, so the new primary maps each segment
  ``MAP_FIXED`` at its recorded address and does not populate it (a fresh
  start's cost is the kernel zeroing the pages).
* Nothing on disk changes while adopting except the primary's identity and
  the adoption count, so a primary killed mid-adoption leaves exactly what it
  found, and the next start adopts it again.

What "verifies" means is checked, not assumed: the table's header and
committed version pass their checks (:mod:`hugeshmd.shm.table`); its prefix,
base address, window, mode and page size match the configuration; every
segment file is there, a regular file of this instance's name on a filesystem
of the right kind (a hugetlbfs of the instance's page size, or a tmpfs), large
enough for its segment. What fails is named in :class:`~hugeshmd.errors.AdoptionRefused`.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from .. import _sys
from ..errors import AdoptionRefused, HugeshmdError
from ..shm.layout import MODE_HUGETLBFS, MODE_SHM, STATE_STOPPING, Layout
from ..shm.snapshot import Snapshot
from ..shm.table import Table
from .config import Config
from .predecessor import Predecessor

__all__ = ["Candidate", "verify"]

_MODES = {MODE_HUGETLBFS: "hugepages", MODE_SHM: "/dev/shm"}


@dataclass
class Candidate:
    """A predecessor's instance that verified: its table (open) and committed version."""

    table: Table
    snapshot: Snapshot

    @property
    def layout(self) -> Layout:
        return self.table.layout


def verify(found: Predecessor, config: Config) -> Candidate:
    """The predecessor's instance, opened and checked; AdoptionRefused naming what failed."""
    if found.table is None:
        raise _refused(config, "its table is gone")
    try:
        table = Table.open(found.table)
    except (OSError, HugeshmdError) as err:
        raise _refused(config, f"its table cannot be read: {getattr(err, 'message', None) or err}") from err
    try:
        if table.state()[0] == STATE_STOPPING:  # its workers were told it is gone: it stays gone
            raise _refused(config, "it was stopped for good (its workers were told)")
        snapshot = table.snapshot()
        snapshot.zones  # noqa: B018 - every zone record checked now (a reader's version checks them as read)
        _check_layout(table.layout, snapshot, config)
        for segment in snapshot.segments:
            wrong = _check_file(segment.path, segment.offset + segment.length, table.layout)
            if wrong is not None:
                raise _refused(config, f"segment file {segment.path} {wrong}")
    except HugeshmdError as err:
        table.close()
        if isinstance(err, AdoptionRefused):
            raise
        raise _refused(config, f"its table fails its checks: {err.message}") from err
    except BaseException:
        table.close()
        raise
    return Candidate(table, snapshot)


def _refused(config: Config, reason: str) -> AdoptionRefused:
    return AdoptionRefused(f"cannot adopt the instance a dead primary of prefix {config.prefix!r} left: {reason}",
                           prefix=config.prefix, reason=reason)


def _check_layout(layout: Layout, snapshot: Snapshot, config: Config) -> None:
    wrong = []
    if layout.prefix != config.prefix:
        wrong.append(f"it is prefix {layout.prefix!r}'s")
    if layout.base != config.base_address:
        wrong.append(f"its window starts at {layout.base:#x}, base_address is {config.base_address:#x}")
    if config.window is not None and layout.window != config.window_for(0):
        wrong.append(f"its window is {layout.window} bytes, window is {config.window_for(0)}")
    if config.huge_pages != "try" and (config.huge_pages == "off") != (layout.mode == MODE_SHM):
        wrong.append(f"it lives in {_MODES.get(layout.mode, '?')}, huge_pages is {config.huge_pages!r}")
    if layout.mode == MODE_HUGETLBFS and layout.page_size != config.page_size:
        wrong.append(f"its pages are {layout.page_size} bytes, page_size is {config.page_size}")
    if not snapshot.segments:
        wrong.append("it has no segment (its primary died before it mapped any)")
    if wrong:
        raise _refused(config, "; ".join(wrong))


def _check_file(path: str, needed: int, layout: Layout) -> str | None:
    """What is wrong with the segment file at ``path``, or None."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as err:
        return f"cannot be opened: {err.strerror}"
    try:
        st = os.fstat(fd)
        kind = _sys.fstatfs_type(fd)
        if layout.mode == MODE_HUGETLBFS:
            right_kind = kind == _sys.HUGETLBFS_MAGIC and os.fstatvfs(fd).f_bsize == layout.page_size
        else:
            right_kind = kind == _sys.TMPFS_MAGIC
        if not right_kind or not stat.S_ISREG(st.st_mode):
            return f"is not a file on a {_MODES.get(layout.mode, '?')} of {layout.page_size}-byte pages"
        if st.st_size < needed:
            return f"holds {st.st_size} bytes, its segment needs {needed}: truncated"
        return None
    finally:
        os.close(fd)
