"""The worker registry: one entry per attached read-write worker, in the table file.

Each entry is (pid, epoch, start time) (:data:`hugeshmd.shm.layout.WORKER`).
A worker claims a free entry, or a dead worker's, under the table's writer
lock; the claim bumps the entry's *epoch*, so the :class:`Owner` token a worker
gets (entry, epoch, pid, start time) names that one registration: a later
worker in the same entry, or a process that reuses the pid, is someone else.

The registry is advisory and changed in place, without a generation bump: an
entry torn by a worker killed mid-write reads as a dead worker (its pid and
start time match no process), never as a live one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from ..errors import TableFull
from .identity import process_alive
from .layout import WORKER, Owner
from .table import Table

__all__ = ["Registry"]


class Registry:
    """The worker entries of one mapped table."""

    __slots__ = ("_table",)

    def __init__(self, table: Table) -> None:
        self._table = table

    def _at(self, slot: int) -> int:
        return self._table.layout.workers_at + slot * WORKER.size

    def _entries(self) -> Iterator[tuple[int, int, int, int]]:
        """(slot, pid, epoch, start) of every entry, pid 0 for a free one, read as they are
        consumed: a search for a free entry stops at the first (attach is on a hot path; no
        copy of the whole area, which costs more than the usual one-entry search)."""
        memory = self._table.memory
        for slot in range(self._table.layout.max_workers):
            pid, epoch, start = WORKER.unpack_from(memory, self._at(slot))
            yield slot, pid, epoch, start

    def workers(self) -> list[Owner]:
        """Every occupied entry, live or not."""
        return [Owner(slot, epoch, pid, start) for slot, pid, epoch, start in self._entries() if pid]

    def live(self, alive: Callable[[int, int], bool] = process_alive) -> list[Owner]:
        """The occupied entries whose process still runs."""
        return [owner for owner in self.workers() if alive(owner.pid, owner.start)]

    def register(self, pid: int, start: int, alive: Callable[[int, int], bool] = process_alive) -> Owner:
        """Claim a free entry, else a dead worker's; the new owner token.

        Raises TableFull when every entry belongs to a live worker. Liveness
        (a /proc read each) is checked only when no entry is free, so the lock
        is held for a scan of the table, not for a /proc read per worker.
        """
        table = self._table
        with table.locked():
            found = next(((slot, epoch) for slot, old, epoch, _ in self._entries() if old == 0), None)
            if found is None:
                found = next(((slot, epoch) for slot, old, epoch, began in self._entries()
                              if not alive(old, began)), None)
            if found is not None:
                slot, epoch = found
                owner = Owner(slot, (epoch + 1) & 0xFFFFFFFF, pid, start)
                at = self._at(slot)  # one copy of packed bytes, never pack_into (see hugeshmd.shm.table)
                table.memory[at : at + WORKER.size] = WORKER.pack(pid, owner.epoch, start)
                return owner
        raise TableFull(f"the worker table is full ({table.layout.max_workers} live workers); "
                        "start the primary with a larger max_workers",
                        table="workers", capacity=table.layout.max_workers)

    def unregister(self, owner: Owner) -> None:
        """Free ``owner``'s entry, if it is still that registration's (its epoch is kept)."""
        table = self._table
        with table.locked():
            pid, epoch, _ = WORKER.unpack_from(table.memory, self._at(owner.slot))
            if (pid, epoch) == (owner.pid, owner.epoch):
                at = self._at(owner.slot)
                table.memory[at : at + WORKER.size] = WORKER.pack(0, epoch, 0)

    def holds(self, owner: Owner) -> bool:
        """Whether ``owner``'s registration is still the one in its entry (it has not detached,
        nor been replaced after its death)."""
        if owner.slot >= self._table.layout.max_workers:
            return False
        return WORKER.unpack_from(self._table.memory, self._at(owner.slot)) == (owner.pid, owner.epoch, owner.start)
