"""A dead predecessor: what the last primary of a prefix left behind, found and cleared.

The one path that deals with an instance whose primary is gone (its lock is
free): a starting primary comes here before it maps anything, and so does
``hugeshmd hugepages cleanup`` (holding the dead instance's lock for the time
it works, so that a primary starting meanwhile waits, then finds nothing).

What a dead primary leaves: its segment files (``hugeshmd.<prefix>.seg<N>`` in
a hugetlbfs directory or /dev/shm), which pin their pages until unlinked and
the last mapping goes; its table, which attached workers still map; a table it
was still writing (``table.new.<pid>``); and its sockets' files.

Before the table goes it is marked stopped, so its workers, which keep it
mapped, get PrimaryStopped at their next call instead of going on writing zones
into an orphan. A table too damaged to mark is removed all the same: a corrupt
table must never keep pages pinned.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from ..errors import HugeshmdError, InstanceLocked
from ..shm.layout import STATE_STOPPING
from ..shm.lock import PrimaryLock
from ..shm.paths import TABLE_TEMP, RuntimePaths, parse_segment_name
from ..shm.table import Table
from . import hugepages

__all__ = ["Predecessor", "find", "clear", "release", "directories", "segment_files", "MARK_WAIT_S"]

log = logging.getLogger("hugeshmd.predecessor")

MARK_WAIT_S = 1.0  # how long marking a dead primary's table stopped waits for a worker holding its lock


@dataclass(frozen=True)
class Predecessor:
    """What a dead primary of ``paths.prefix`` left: every file, by kind."""

    paths: RuntimePaths
    segments: list[str] = field(default_factory=list)  # segment files and shm objects
    table: str | None = None  # the committed table, if it is there
    others: list[str] = field(default_factory=list)  # half-written tables, socket files

    @property
    def files(self) -> list[str]:
        return self.segments + ([self.table] if self.table else []) + self.others

    def remove(self) -> list[str]:
        """Mark the table stopped, then unlink every file; what was removed."""
        if self.table is not None:
            _mark_stopped(self.table)
        removed = []
        for path in self.files:
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as err:
                log.warning("could not remove %s left by a dead primary: %s", path, err.strerror)
                continue
            removed.append(path)
        return removed


def segment_files(directories: list[str]) -> dict[str, list[str]]:
    """Every segment file or shm object in ``directories``, by prefix (the files of prefix
    ``a.seg1`` are not prefix ``a``'s: see :func:`hugeshmd.shm.paths.parse_segment_name`)."""
    found: dict[str, list[str]] = {}
    for directory in directories:
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            parsed = parse_segment_name(name)
            if parsed is not None:
                found.setdefault(parsed[0], []).append(os.path.join(directory, name))
    return found


def find(paths: RuntimePaths, directories: list[str]) -> Predecessor:
    """What a dead primary of ``paths.prefix`` left in its runtime dir and ``directories``.
    Call only holding the prefix's primary lock (else the files may be a live one's)."""
    try:
        names = sorted(os.listdir(paths.dir))
    except OSError:
        names = []
    temps = [os.path.join(paths.dir, n) for n in names if n.startswith(os.path.basename(paths.table) + TABLE_TEMP)]
    sockets = [p for p in paths.socket_paths() if os.path.lexists(p)]
    table = paths.table if os.path.lexists(paths.table) else None
    return Predecessor(paths, segment_files(directories).get(paths.prefix, []), table, temps + sockets)


def clear(paths: RuntimePaths, directories: list[str]) -> list[str]:
    """Find and remove what a dead predecessor left; what was removed. Holding its lock."""
    return find(paths, directories).remove()


def directories(hugepage_dir: str | None = None) -> list[str]:
    """Where an instance's segment files may be: every hugetlbfs mount (and its service
    directory), /dev/shm, and a configured ``hugepage_dir``."""
    return hugepages.segment_dirs() + ([hugepage_dir] if hugepage_dir else [])


def release(paths: RuntimePaths, directories: list[str]) -> list[str] | None:
    """For a tool, not a primary: take the dead instance's lock (a primary starting meanwhile
    waits for it, then finds nothing), clear what it left, let the lock go and remove the runtime
    dir; what was removed, or None if a live primary holds the lock."""
    dead_lock = [paths.lock] if os.path.exists(paths.lock) else []
    had_dir = os.path.isdir(paths.dir)  # else the lock made it, and it is no news that it goes
    try:
        lock = PrimaryLock.acquire(paths.lock)
    except InstanceLocked:
        return None
    try:
        removed = clear(paths, directories) + dead_lock
    finally:
        lock.release()  # and unlinks it
    try:
        os.rmdir(paths.dir)
    except OSError:
        return removed
    return removed + [paths.dir] if had_dir else removed


def _mark_stopped(path: str) -> None:
    try:
        stale = Table.open(path)
    except (OSError, HugeshmdError):
        return
    try:
        if stale.state()[0] != STATE_STOPPING:
            if not stale.mark_stopped(wait=MARK_WAIT_S):
                log.warning("stale table %s: its writer lock stayed taken for %g s; its workers see the "
                            "stop at their next reserve or free", path, MARK_WAIT_S)
    except HugeshmdError as err:  # a corrupt stale table must not keep its files from going
        log.warning("stale table %s: %s; its workers are not told, removing it anyway", path, err.message)
    finally:
        stale.close()
