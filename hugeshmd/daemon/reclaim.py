"""The primary's reclaim: what a dead worker still owned goes back to the heap.

How a death is seen, without polling for it: the primary holds a ``pidfd``
(pidfd_open(2)) of every process that owns an arena or a large allocation, in
its poll loop; the kernel makes it readable when the process exits. New owners
are found cheaply: each claim bumps a counter in the heap's directory, and a
large allocation is a commit of the table, so a look every :data:`SCAN_S`
reads two words unless something changed.

Why pid reuse cannot free a live worker's memory: a pidfd names one process,
not a pid, and is opened only after the owner's start time was checked; an
arena is reclaimed only by a process that holds its L lock, which the kernel
frees only when every descriptor of the owner's lock description is closed.

While no primary runs, nothing is reclaimed; the next one (adoption) reclaims
every dead owner's memory at start (:meth:`Reclaimer.reclaim_dead`), and does
so again at each heartbeat, which also catches an owner whose lock outlived it
in a forked child.
"""

from __future__ import annotations

import functools
import logging
import os
import select
from typing import TYPE_CHECKING, Any

from ..errors import HugeshmdError, TableBusy
from ..shm.heap import (
    ARENA,
    CLAIMS_AT,
    DIRECTORY,
    E_FREE,
    LARGE_RECLAIMED_AT,
    LARGE_RECLAIMED_BYTES_AT,
    Arena,
    Directory,
    arena_name,
    holder_gone,
    liveness,
    reclaim_arena,
    release_custody,
    release_held,
)

if TYPE_CHECKING:
    from ..shm.names import Names
from ..shm.identity import process_start_time, process_state
from ..shm.layout import ZONE_CHANNEL, ZONE_DISOWNED, ZONE_HEAP, ZoneRecord
from ..shm.lock import ByteLock
from ..shm.table import Table

__all__ = ["Reclaimer", "SCAN_S"]

log = logging.getLogger("hugeshmd.reclaim")

SCAN_S = 0.02  # how often the primary looks for new owners (two reads when nothing changed)


class Reclaimer:
    """Watches the heap's owners and frees what dead ones held. Never raises out of its calls."""

    def __init__(self, table: Table, keepalive: object) -> None:
        self.table = table
        self._keepalive = keepalive
        self._locks = ByteLock(table._fd)
        self._directory: Directory | None = None
        self._arenas: dict[int, Arena] = {}
        self._watched: dict[int, tuple[int, int]] = {}  # pidfd -> (pid, start)
        self._owners: dict[tuple[int, int], int] = {}  # (pid, start) -> pidfd
        self._seen: tuple[int, int] = (-1, -1)  # (claims, generation) at the last scan
        self._failed = ""  # the last scan's error, logged once
        self._names: Names | None = None  # the zone name index (hugeshmd.shm.names), once the instance has one

    # -- finding owners ----------------------------------------------------------------------

    def directory(self) -> Directory | None:
        if self._directory is None:
            record = self.table.snapshot().record(DIRECTORY)
            if record is None:
                return None
            try:
                self._directory = Directory(record, self._keepalive)
            except HugeshmdError:
                return None  # being made, or damaged: the checker says which
        return self._directory

    def _arena(self, i: int, address: int) -> Arena:
        arena = self._arenas.get(i)
        if arena is None or arena.base != address:
            arena = self._arenas[i] = Arena(i, address, self._keepalive)
        return arena

    def scan(self) -> list[int]:
        """Start watching owners not watched yet; the new pidfds (for the caller's poller).
        Never raises: a damaged table is logged once, and status says it."""
        try:
            added = self._scan()
        except Exception as err:  # noqa: BLE001 - the primary outlives a damaged table
            if str(err) != self._failed:
                self._failed = str(err)
                log.error("cannot look for the heap's owners: %s", err)
            return []
        return added

    def _scan(self) -> list[int]:
        directory = self.directory()
        claims = directory.counter(CLAIMS_AT) if directory is not None else 0
        seen = (claims, self.table.generation)
        if seen == self._seen:
            return []
        self._seen = seen
        added = []
        for owner in self._owners_now(directory):
            if owner in self._owners:
                continue
            fd = self._watch(*owner)
            if fd is None:
                self.reclaim(*owner)
            elif fd >= 0:
                added.append(fd)
        return added

    def _owners_now(self, directory: Directory | None) -> set[tuple[int, int]]:
        owners = set()
        if directory is not None:
            for _, e in directory.entries():
                if e[1] != E_FREE and e[4]:
                    owners.add((e[4], e[7]))
        for zone in self.table.snapshot().zones:
            if _reclaimable(zone):
                owners.add((zone.owner.pid, zone.owner.start))
        return owners

    def _watch(self, pid: int, start: int) -> int | None:
        """A pidfd of the process (pid, start); None if it is gone; -1 if the kernel would not
        give one now (out of descriptors, say): then it is not reclaimed, and the next scan
        that sees a change (or the heartbeat, after its death) tries again."""
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        except OSError as err:
            if err.strerror != self._failed:  # once, not at every scan while it lasts
                self._failed = err.strerror or ""
                log.warning("cannot watch pid %d for its exit (%s); its memory is reclaimed at the heartbeat "
                            "after it exits", pid, err.strerror)
            self._seen = (-1, -1)  # look again at the next scan
            return -1
        now = process_start_time(pid)  # read after opening: the pidfd names the process that has it now
        if (now is not None and now != start) or _exited(fd):  # the owner is gone (the pid was reused)
            os.close(fd)
            return None
        # now is None: /proc does not show it (hidepid, another pid namespace): watch it all the
        # same; at worst its reclaim waits for the exit of a process that reused the pid

        self._watched[fd] = (pid, start)
        self._owners[(pid, start)] = fd
        return fd

    def watching(self, fd: int) -> bool:
        return fd in self._watched

    def exited(self, fd: int) -> None:
        """The process behind pidfd ``fd`` exited: reclaim what it owned. Never raises."""
        owner = self._watched.pop(fd, None)
        try:
            os.close(fd)
        except OSError:
            log.exception("closing the pidfd of pid %s", owner[0] if owner else "?")
        if owner is not None:
            self._owners.pop(owner, None)
            self.reclaim(*owner)

    # -- reclaiming ---------------------------------------------------------------------------

    def reclaim(self, pid: int, start: int) -> tuple[int, int]:
        """Free what the dead process (pid, start) owned; (allocations, bytes). Logs, never raises."""
        try:
            count, freed = self._reclaim(lambda p, s: (p, s) == (pid, start))
        except Exception:  # noqa: BLE001 - a reclaim that fails must not stop the primary; retried later
            log.exception("reclaim of pid %d failed; the next heartbeat tries again", pid)
            return 0, 0
        if count:
            log.info("reclaimed %d allocations (%d bytes) of pid %d, which exited", count, freed, pid)
        return count, freed

    def reclaim_dead(self) -> tuple[int, int]:
        """Free what every dead owner held (at adoption, and at each heartbeat), publish the
        arenas that claimers committed but died before publishing, and finish the removals of
        channels whose removers died, and the zone reserves and frees of workers that died holding a
        shard of the name index. Never raises: each part that fails is logged, and the others go on."""
        count = freed = 0
        try:
            self._publish_orphans()
            count, freed = self._reclaim(_dead)
        except Exception:  # noqa: BLE001
            log.exception("reclaim of dead owners failed; the next heartbeat tries again")
        try:
            self._finish_removals()
        except Exception:  # noqa: BLE001
            log.exception("finishing a dead remover's channel removal failed; the next heartbeat tries again")
        try:
            self._heal_names()
        except Exception:  # noqa: BLE001
            log.exception("finishing a dead worker's zone reserve or free failed; the next heartbeat tries again")
        if count:
            log.info("reclaimed %d allocations (%d bytes) of processes that had exited", count, freed)
        return count, freed

    def _publish_orphans(self) -> None:
        """An arena zone whose claimer died between committing it and publishing it in its entry
        would wait for the next claim of a new arena, which may never come: publish it, free."""
        directory = self.directory()
        if directory is None:
            return
        zones = [z for z in self.table.snapshot().zones if z.name.startswith(".arena.")]
        for zone in zones:
            suffix = zone.name[len(".arena."):]
            if not suffix.isdigit() or zone.name != arena_name(int(suffix)):
                continue  # not one of the heap's names: the checker says so
            i = int(suffix)
            if i >= directory.max_arenas or directory.entry(i)[0]:
                continue
            if not self._locks.try_exclusive(liveness(i)):
                continue  # a live claimer holds it: it publishes it itself
            try:
                arena = self._arena(i, zone.address)
                if directory.entry(i)[0] or arena.problem() is not None or next(arena.spans(), None) is not None:
                    continue  # published meanwhile, or not an unused arena: the checker says which
                directory.write(i, address=zone.address)
                log.info("published arena %d at %#x, which a worker made but died before publishing", i,
                         zone.address)
            finally:
                self._locks.unlock(liveness(i))

    def _finish_removals(self) -> int:
        """Finish the removal of every channel whose remover died on the way (see
        :func:`hugeshmd.shm.channel.finish_dead_removal`); how many were finished."""
        from ..shm.channel import PREFIX, finish_dead_removal

        if self.table.owner()[0] != os.getpid():
            return 0  # an adopting primary, not named yet (see finish_dead_removal)
        release = functools.partial(self._release_custody, self.directory())
        finished = 0
        for zone in self.table.snapshot().zones:
            if not zone.flags & ZONE_CHANNEL or not zone.name.startswith(PREFIX):
                continue
            dropped = finish_dead_removal(self.table, zone, self._keepalive, release, GATE_WAIT_S)
            if dropped is not None:
                finished += 1
                log.info("finished removing channel %r, whose remover died on the way: %d buffers it held freed",
                         zone.name[len(PREFIX):], dropped)
        return finished

    def _heal_names(self) -> int:
        """Finish the reserves and frees of named zones whose worker died holding its shard's
        lock (:meth:`hugeshmd.shm.names.Names.heal`), so that no block waits for the next
        change in that shard; how many shards were healed."""
        if self.table.owner()[0] != os.getpid():
            return 0  # an adopting primary, not named yet: its first heartbeat does it
        if self._names is None:
            from ..shm.names import Names

            self._names = Names.find_or_make(self.table, self._keepalive, GATE_WAIT_S, False, lambda address: None)
            if self._names is None:
                return 0
        healed: int = self._names.heal(self.arena_at, self.table.snapshot().segments)
        if healed:
            log.info("finished the zone reserves and frees of %d workers that died holding a shard of the "
                     "zone name index", healed)
        return healed

    def _release_custody(self, directory: Directory | None, channel: int) -> int | None:
        """Free the small blocks channel ``channel`` holds, in every arena; how many, or None if
        an arena's gate stayed taken (some may be left: the caller tries again later)."""
        count = 0
        for i, e in directory.entries() if directory is not None else ():
            if e[0]:
                n = release_custody(self._arena(i, e[0]), self._locks, channel, GATE_WAIT_S)
                if n is None:
                    return None
                count += n
        return count

    def _reclaim(self, dead: Any) -> tuple[int, int]:
        dead = functools.cache(dead)  # a few owners own every arena and zone: one look at each
        count = freed = 0
        directory = self.directory()
        if directory is not None:
            for i, e in directory.entries():
                if e[0] and e[1] != E_FREE and dead(e[4], e[7]) and self._locks.try_exclusive(liveness(i)):
                    try:
                        n, b = reclaim_arena(directory, self._arena(i, e[0]), self._locks, GATE_WAIT_S)
                    except TableBusy:  # a remote freer holds the gate (frozen?): the next heartbeat
                        log.debug("arena %d: its gate is held; reclaimed at a later heartbeat", i)
                        continue
                    finally:
                        self._locks.unlock(liveness(i))
                    count += n
                    freed += b
            n, b = self._release_held(directory, dead)
            count += n
            freed += b
            n, b = self._release_pins(directory, dead)
            count += n
            freed += b
        doomed = [z for z in self.table.snapshot().zones if _reclaimable(z) and dead(z.owner.pid, z.owner.start)]
        if doomed:
            with self.table.locked() as base:
                for zone in doomed:
                    if base.by_name.get(zone.name) == zone:
                        base = self.table.commit(base, remove=zone)
                        count += 1
                        freed += zone.size
                        if directory is not None:
                            directory.bump(LARGE_RECLAIMED_AT)
                            directory.bump(LARGE_RECLAIMED_BYTES_AT, zone.size)
        return count, freed

    def _release_held(self, directory: Directory, dead: Any) -> tuple[int, int]:
        """Free the blocks that workers now gone had received (through channels) and still held."""

        gone = _holder_gone(directory, dead)
        count = freed = 0
        for i, e in directory.entries():
            if e[0]:
                n, b = release_held(self._arena(i, e[0]), self._locks, gone, GATE_WAIT_S)
                count += n
                freed += b
        return count, freed

    def _release_pins(self, directory: Directory, dead: Any) -> tuple[int, int]:
        """Drop the pins of workers now gone; free what lost its last pin (hugeshmd.shm.pins)."""
        from ..shm.pins import release_pins

        gone = _holder_gone(directory, dead)

        class _Arenas:  # what release_pins asks of a heap: the arena holding an address
            _arena_at = self.arena_at

        return release_pins(_Arenas(), self.table, self._keepalive, gone, GATE_WAIT_S)

    def arena_at(self, address: int) -> Arena | None:
        """The arena holding ``address``, if it is in one."""
        directory = self.directory()
        if directory is None:
            return None
        base = address & ~(ARENA - 1)
        for i, e in directory.entries():
            if e[0] == base:
                return self._arena(i, base)
        return None

    def close(self) -> None:
        for fd in self._watched:
            os.close(fd)
        self._watched.clear()
        self._owners.clear()
        self._locks.close()


GATE_WAIT_S = 0.02  # the primary's loop waits no longer for a remote free to leave an arena's gate


def _holder_gone(directory: Directory, dead: Any) -> Any:
    """:func:`holder_gone` of (arena, claim), cached: a few holders hold everything."""

    @functools.cache
    def gone(i: int, claim: int) -> bool:
        return holder_gone(directory, i, claim, dead)

    return gone


def _exited(pidfd: int) -> bool:
    """Whether the process of ``pidfd`` has exited (the pidfd is readable)."""
    return bool(select.select([pidfd], [], [], 0)[0])


def _dead(pid: int, start: int) -> bool:
    """Whether the process (pid, start) is gone for sure. A process that /proc does not show
    (hidepid, another pid namespace) but that signal 0 finds counts as alive: never reclaim
    on doubt. A zombie is dead; a pid now held by another process (start differs) is gone.
    Pid 0 is no process (an entry a reclaimer killed mid-write left without its owner; and
    signal 0 to pid 0 would test this process's group)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # it exists, another user's
    now = process_start_time(pid)
    if now is None:
        return False  # cannot tell: alive
    if start and now != start:
        return True  # the pid is another process's now (a token without a start time cannot say)
    return process_state(pid) == "Z"


def _reclaimable(zone: ZoneRecord) -> bool:
    return bool(zone.flags & ZONE_HEAP) and not zone.flags & ZONE_DISOWNED and zone.owner.pid > 0
