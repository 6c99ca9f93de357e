"""The primary's request server: one reply per request, and never a death by request.

A request goes through three checks before a handler sees it: the frame
shape (two frames from a DEALER, three from a REQ), the message
(:func:`hugeshmd.wire.protocol.decode`: bounded msgpack, a map), then the
arguments (:func:`hugeshmd.wire.protocol.parse_request`: the version, a known
op, each argument validated). Refusals are answered with their code; anything
unexpected is logged with its traceback and answered as an internal error, and
the server goes on.

Which handler answers which op is the table :data:`HANDLERS`, declared beside
:data:`hugeshmd.wire.protocol.COMMANDS` and checked against it at import: a
command without a handler (or the reverse) fails at once, not at its first
request.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import HugeshmdError
from ..shm import zones
from ..shm.layout import STATE_NAMES, ZoneRecord
from ..wire import protocol

if TYPE_CHECKING:
    from ..shm.names import Names
    from .primary import Primary

__all__ = ["RequestServer", "HANDLERS", "LOCK_WAIT_S"]

log = logging.getLogger("hugeshmd.primary")

LOCK_WAIT_S = 1.0  # a request waits this long for a worker holding the table's lock, then gets TableBusy


class RequestServer:
    """Answers the frames of one request at a time; counts requests and errors for metrics."""

    def __init__(self, primary: Primary) -> None:
        self.primary = primary
        self.requests = 0
        self.requests_by_op: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self._names: Names | None = None  # the instance's name index, once it has one

    def handle(self, frames: list[bytes]) -> list[bytes] | None:
        """The reply frames for one request's frames, or None when it cannot be answered."""
        self.requests += 1
        if len(frames) == 3 and frames[1] == b"":
            envelope, body = frames[:2], frames[2]  # a REQ client
        elif len(frames) == 2:
            envelope, body = frames[:1], frames[1]  # a DEALER client
        else:
            self.count_error("MalformedFrame")
            log.debug("dropped a request of %d frames", len(frames))
            return None
        return envelope + [protocol.encode(self.answer(body))]

    def answer(self, body: bytes) -> dict[str, Any]:
        """The reply to one message: a result, or an error with its code."""
        request_id, op = None, "?"
        try:
            message = protocol.decode(body)
            request_id = message.get("id")
            op, args = protocol.parse_request(message)
            self._count_op(op)
            return protocol.ok_reply(HANDLERS[op](self, **args), request_id)
        except HugeshmdError as err:
            if op == "?":
                self._count_op("invalid")
            self.count_error(type(err).__name__)
            return protocol.error_reply(err, request_id)
        except Exception as err:  # a bug: keep serving, but say so loudly
            log.exception("internal error handling %r", op)
            self.count_error("InternalError")
            return protocol.error_reply(HugeshmdError(f"internal error in {op}: {type(err).__name__}"), request_id)

    def _count_op(self, op: str) -> None:
        self.requests_by_op[op] = self.requests_by_op.get(op, 0) + 1

    def count_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    # -- the handlers (each returns the reply's fields) ------------------------------------

    def hello(self) -> dict[str, Any]:
        table = self.primary.table
        return {"prefix": self.primary.config.prefix, "pid": os.getpid(), "table": self.primary.paths.table,
                "state": STATE_NAMES[table.state()[0]], "generation": table.generation}

    def snapshot(self) -> dict[str, Any]:
        table = self.primary.table
        snap = table.snapshot()
        layout = table.layout
        return {"seq": self.primary.publisher.seq, "pid": os.getpid(), "generation": snap.generation,
                "adoptions": table.adoptions(), "base": layout.base,
                "window": layout.window, "page_size": layout.page_size,
                "segments": [s._asdict() for s in snap.segments]}

    def status(self) -> dict[str, Any]:
        return self.primary.status()

    def zones(self) -> dict[str, Any]:
        snap = self.primary.table.snapshot()
        index = self.names()
        named = index.zones(snap.segments) if index is not None else []
        return {"zones": [_zone_fields(z) for z in sorted((*snap.zones, *named), key=lambda z: z.address)]}

    def reserve(self, name: str, size: int, align: int = 64) -> dict[str, Any]:
        """A zone of the shared table (the primary has no arena), under the lock of its name's
        shard of the name index, so that no worker names a zone of the index so meanwhile."""
        table = self.primary.table
        index = self.names()
        if index is None:  # none: nothing named in one to meet (see reserve_unindexed)
            from ..shm.names import reserve_unindexed

            done = reserve_unindexed(table, name, size, align, LOCK_WAIT_S)
            if done is not None:
                return _zone_fields(done[2])
            index = self.names()
        assert index is not None
        field = index.field(name)
        shard = index.shard_of(field)
        index.lock(shard, self._repair, LOCK_WAIT_S)
        try:
            if index.probe(field)[0] is not None:
                raise zones.taken(name)
            return _zone_fields(zones.reserve(table, name, size, align, LOCK_WAIT_S)[2])
        finally:
            index.unlock(shard)

    def lookup(self, name: str) -> dict[str, Any]:
        snap = self.primary.table.snapshot()
        index = self.names()
        found = index.find(index.field(name), snap.segments) if index is not None else None
        return _zone_fields(found[1] if found is not None else zones.find(snap, name))

    def free(self, name: str) -> dict[str, Any]:
        table = self.primary.table
        index = self.names()
        if index is not None:
            field = index.field(name)
            shard = index.shard_of(field)
            index.lock(shard, self._repair, LOCK_WAIT_S)
            try:
                found = index.find(field, table.snapshot().segments)
                if found is not None:
                    index.remove(found[0], self._arena_at)
                    return _zone_fields(found[1])
            finally:
                index.unlock(shard)
        return _zone_fields(zones.free(table, name, LOCK_WAIT_S)[2])

    def names(self, make: bool = False) -> Names | None:
        """The name index of the instance (made if ``make`` and there is none)."""
        if self._names is None:
            from ..shm.names import Names

            primary = self.primary
            self._names = Names.find_or_make(primary.table, primary.window, LOCK_WAIT_S, make, lambda address: None)
        return self._names

    def _arena_at(self, address: int) -> Any:
        reclaimer = self.primary.reclaimer
        return reclaimer.arena_at(address) if reclaimer is not None else None

    def _repair(self, shard: int) -> None:
        assert self._names is not None
        self._names.repair(shard, self._arena_at, self.primary.table.snapshot().segments)


    def grow(self, size: int) -> dict[str, Any]:
        return self.primary.grow(size)._asdict()


def _zone_fields(record: ZoneRecord) -> dict[str, Any]:
    fields: dict[str, Any] = record._asdict()
    fields["owner"] = record.owner._asdict()
    return fields


Handler = Callable[..., dict[str, Any]]

HANDLERS: dict[str, Handler] = {
    "hello": RequestServer.hello,
    "snapshot": RequestServer.snapshot,
    "status": RequestServer.status,
    "zones": RequestServer.zones,
    "reserve": RequestServer.reserve,
    "lookup": RequestServer.lookup,
    "free": RequestServer.free,
    "grow": RequestServer.grow,
}

if HANDLERS.keys() != protocol.COMMANDS.keys():  # pragma: no cover - a mistake in this file, caught at import
    raise ImportError(f"commands without a handler, or handlers without a command: "
                      f"{sorted(HANDLERS.keys() ^ protocol.COMMANDS.keys())}")
