"""ZeroMQ clients of a primary: requests (:class:`Control`) and changes (:class:`Subscription`).

Importing this module imports pyzmq (about 35 ms), which is why the worker's
fast path (attach, lookup, reserve) does not: it reads the shared table.
A worker comes here only to wait for a primary that is not up yet, and tools
(``hugeshmd status``) come here to ask the primary directly.
"""

from __future__ import annotations

import os
import time
from typing import Any

import zmq

from ..errors import AccessDenied, PrimaryUnavailable, ProtocolError
from ..shm.paths import RuntimePaths
from . import protocol

__all__ = ["Control", "Subscription"]


def denied_message(prefix: str, what: str) -> str:
    """Why a primary's socket check turned this process away, and what its operator can do."""
    uid, gid = os.geteuid(), os.getegid()
    return (f"the instance {prefix!r} refused this process (uid {uid}, gid {gid}) {what}; "
            "its operator admits workers by group: see the instance's group option")


class Control:
    """Requests to one instance's primary over its ``control`` endpoint.

    After a timeout the REQ socket is stuck mid-request, so it is closed and a
    new one made for the next call (the guide's Lazy Pirate pattern).

    A primary that refuses this process (its ZAP check, see
    :mod:`hugeshmd.daemon.access`) closes the connection during the handshake, which a
    REQ socket would only show as silence; a monitor on the socket sees the
    refusal (``HANDSHAKE_FAILED_AUTH``), and the request raises AccessDenied at once.
    """

    def __init__(self, paths: RuntimePaths, timeout: float = 5.0) -> None:
        self.paths = paths
        self.timeout = timeout
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._socket: zmq.Socket[bytes] | None = None
        self._monitor: zmq.Socket[bytes] | None = None
        self._poller = zmq.Poller()  # the socket and its monitor, registered at connect

    def _connect(self) -> zmq.Socket[bytes]:
        if self._socket is None:
            path = self.paths.control[len("ipc://"):]
            try:
                os.stat(path)
            except PermissionError as err:  # libzmq would retry an EACCES connect silently forever
                raise self.paths.access_denied(path, err) from err
            except FileNotFoundError:
                pass  # no primary yet: the connect waits for one
            socket = self._context.socket(zmq.REQ)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_REPLY)
            self._monitor = socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
            socket.connect(self.paths.control)
            self._poller = zmq.Poller()
            self._poller.register(socket, zmq.POLLIN)
            self._poller.register(self._monitor, zmq.POLLIN)
            self._socket = socket
        return self._socket

    def request(self, op: str, timeout: float | None = None, **args: Any) -> dict[str, Any]:
        """Send one request and return the reply's fields.

        Raises PrimaryUnavailable when no reply comes within the timeout, and
        the error class named by the reply's code when the primary refuses.
        """
        socket = self._connect()
        socket.send(protocol.encode({"v": protocol.VERSION, "op": op, **args}))
        wait = self.timeout if timeout is None else timeout
        if not self._wait(socket, wait):
            self.close()
            raise PrimaryUnavailable(
                f"no primary answered for prefix {self.paths.prefix!r} at {self.paths.control} "
                f"within {wait:g} s",
                prefix=self.paths.prefix, path=self.paths.control,
            )
        return protocol.result_of(protocol.decode(socket.recv(), protocol.MAX_REPLY))

    def _wait(self, socket: zmq.Socket[bytes], wait: float) -> bool:
        """Whether a reply came within ``wait`` seconds; AccessDenied if the primary refused us."""
        ready = dict(self._poller.poll(int(wait * 1000)))
        if self._monitor is not None and self._monitor in ready:
            self.close()
            raise AccessDenied(denied_message(self.paths.prefix, f"on {self.paths.control}"),
                               prefix=self.paths.prefix, path=self.paths.control)
        return socket in ready

    def close(self) -> None:
        if self._socket is not None:
            self._socket.disable_monitor()
            self._socket.close(linger=0)
            self._socket = None
        if self._monitor is not None:
            self._monitor.close(linger=0)
            self._monitor = None

    def __enter__(self) -> Control:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Subscription:
    """The primary's numbered changes, applied on top of a snapshot (Clone pattern).

    Subscribe first, then fetch the snapshot, then keep only changes whose
    ``seq`` is newer. A gap in ``seq``, seen in a change or in the primary's
    heartbeat, means something was missed (a slow joiner or a dropped
    message), and the snapshot is fetched again: nothing is missed or applied
    twice. A heartbeat from another primary (its pid) means a restart or an
    adoption: the snapshot is fetched from the new primary, within a heartbeat
    (1 s) of it being ready. ZeroMQ reconnects the sockets by itself.
    """

    def __init__(self, paths: RuntimePaths, timeout: float = 5.0) -> None:
        self._control = Control(paths, timeout)
        self._socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._socket.connect(paths.events)
        self.snapshot: dict[str, Any] = {}
        self.seq = 0
        self.resyncs = 0
        try:
            self.resync()
        except BaseException:
            self.close()
            raise

    def resync(self) -> None:
        """Fetch the snapshot again and continue after its ``seq``."""
        self.snapshot = self._control.request("snapshot")
        self.seq = int(self.snapshot["seq"])
        self.resyncs += 1

    def poll(self, timeout: float) -> list[dict[str, Any]]:
        """Changes newer than the last one seen, waiting up to ``timeout`` for the first."""
        changes: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while self._socket.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            self._take(protocol.decode(self._socket.recv(), protocol.MAX_REPLY), changes)
            if changes:
                deadline = time.monotonic()  # drain what is queued, then return
        return changes

    def _take(self, change: dict[str, Any], changes: list[dict[str, Any]]) -> None:
        seq = change.get("seq")
        if not isinstance(seq, int):
            raise ProtocolError(f"change without a seq: {change!r}")
        if change.get("op") == "heartbeat":
            # A gap (seq ahead), or another primary: one that adopted the instance counts
            # from 1 again, so its seq may be behind, and its pid is not the snapshot's.
            if seq > self.seq or change.get("pid", self.snapshot.get("pid")) != self.snapshot.get("pid"):
                self.resync()
            return
        if seq <= self.seq:
            return  # already in the snapshot
        if seq > self.seq + 1:
            self.resync()
            if seq <= self.seq:
                return
        self.seq = seq
        changes.append(change)

    def close(self) -> None:
        self._socket.close(linger=0)
        self._control.close()
