"""Robust mutexes in shared memory, taken with a bound: the channels' two locks, the pin table's,
and each shard's of the zone name index.

The mutex itself is glibc's process-shared robust mutex (:mod:`hugeshmd._sys`): the kernel
releases a dead holder's, and the next taker learns of the death (EOWNERDEAD) and finishes what
was left half done before it marks the mutex consistent. What every user does around it is
here, once: try it, wait at most the caller's bound, run the caller's repair after a dead
holder, and when the bound runs out raise the caller's :class:`~hugeshmd.errors.TableBusy`
kind with the holder named (its pid, whether it is stopped).
"""

from __future__ import annotations

import os

from .. import _sys
from ..errors import TableBusy, TableCorrupt

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeVar

    _T = TypeVar("_T")

__all__ = ["take", "EBUSY", "ETIMEDOUT"]

EBUSY, ETIMEDOUT = 16, 110


def take(at: int, timeout: float, repair: Callable[[], _T], what: str, busy: type[TableBusy], path: str,
         after: str = "", err: int = -1) -> _T | None:
    """Take the robust mutex at ``at``, waiting at most ``timeout`` seconds (``err``: what a
    trylock of it already answered, if one did). None once taken; after a dead holder, what
    ``repair()`` returned (run under the mutex before it is marked consistent; one that raises
    gives the mutex back, see :func:`hugeshmd._sys.mutex_repaired`).

    ``busy`` (TableBusy or a kind of it) when the wait runs out: "``what`` stayed taken for
    ``timeout`` s by pid N (stopped)``after``", with ``path``, the holder's pid, whether it is
    stopped, and the wait. TableCorrupt if the mutex cannot be taken at all (a damaged word)."""
    if err < 0:
        err = _sys.mutex_trylock(at)
    if err == EBUSY:
        err = _sys.mutex_lock(at, timeout)
    if err == 0:
        return None
    if err == _sys.EOWNERDEAD:
        return _sys.mutex_repaired(at, repair)
    if err == ETIMEDOUT:
        from .identity import describe_holder, process_state

        pid = _sys.mutex_holder(at)
        state = process_state(pid) if pid else None
        raise busy(f"{what} stayed taken for {timeout:g} s by {describe_holder(pid)}{after}", path=path,
                   pid=pid or None, stopped=state in ("T", "t"), waited=timeout)
    raise TableCorrupt(f"{what} cannot be taken ({err}: {os.strerror(err)})")
