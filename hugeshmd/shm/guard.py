"""A table file that shrinks under its mappings kills no one.

Any member of the instance's group may truncate the table (it may write it),
and so may an operator by mistake. Every process that maps it would then die of
SIGBUS at its next touch of a page past the new end (see "SIGBUS on a file that
shrank under its mapping" in :mod:`hugeshmd._sys`). Each mapped table is
registered here; a SIGBUS inside one is repaired with a page of zeros, and the
table is marked damaged, so every later use of it raises TableCorrupt saying
what happened, in the primary and in every worker alike.

A fault anywhere else (a segment file truncated under a zone, a bug) is left to
the action that was there before: this guards the table, whose loss is
survivable, and not the data, where reading zeros instead would be a silent lie.
"""

from __future__ import annotations

import _thread
import weakref

from .. import _sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .table import Table

__all__ = ["watch", "forget", "TRUNCATED"]

TRUNCATED = ("the table file shrank under this process (truncated by another process): "
             "a page past its end read as zeros; the instance's table cannot be trusted")

_lock = _thread.allocate_lock()
_ranges: dict[int, tuple[int, weakref.ref[Table]]] = {}  # start -> (end, table)


def watch(table: Table, start: int, length: int) -> None:
    """Guard ``table``'s mapping at ``[start, start + length)``, until :func:`forget` or until the
    table is garbage (its mapping goes with it, and the address may then be anyone's)."""
    _sys.install_sigbus_handler(_claim)
    with _lock:
        for dead in [key for key, (_, ref) in _ranges.items() if ref() is None]:
            del _ranges[dead]  # tables dropped without close(): their mappings went with them
        _ranges[start] = (start + length, weakref.ref(table))


def forget(start: int) -> None:
    """Stop guarding the mapping at ``start`` (before it is unmapped)."""
    with _lock:
        _ranges.pop(start, None)


def _claim(address: int) -> bool:
    # Runs in the SIGBUS handler: no lock (the faulting thread may hold it), a plain scan.
    for start, (end, ref) in list(_ranges.items()):
        if start <= address < end:
            table = ref()
            if table is None:  # gone: the range may be another mapping's by now
                continue
            table.damaged = TRUNCATED
            return True
    return False
