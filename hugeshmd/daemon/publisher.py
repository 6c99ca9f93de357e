"""The stream of numbered changes (the ZeroMQ guide's Clone pattern), from the primary's side.

Every change the primary makes to what only it owns (segments, its state)
gets the next ``seq`` and goes out on the PUB socket; a heartbeat repeats the
last ``seq`` so a subscriber that missed one notices the gap and fetches the
snapshot again (:class:`hugeshmd.wire.client.Subscription`). Changes made before
the socket is bound are counted but not sent: a subscriber's first snapshot
includes them.
"""

from __future__ import annotations

from typing import Any

import zmq

from ..wire import protocol

__all__ = ["Publisher"]


class Publisher:
    """Numbers changes and sends them once a PUB socket is attached."""

    def __init__(self) -> None:
        self.seq = 0
        self._socket: zmq.Socket[bytes] | None = None

    def attach(self, socket: zmq.Socket[bytes]) -> None:
        """Send on ``socket`` from now on (bound by the primary)."""
        self._socket = socket

    def publish(self, change: dict[str, Any]) -> None:
        self.seq += 1
        if self._socket is not None:
            self._socket.send(protocol.encode({"v": protocol.VERSION, "seq": self.seq, **change}))

    def heartbeat(self, pid: int) -> None:
        """The last ``seq``, and the primary's ``pid``: a subscriber that sees another pid than its
        snapshot's knows a new primary (which counts from 1 again) took over, and fetches anew."""
        if self._socket is not None:
            self._socket.send(protocol.encode({"v": protocol.VERSION, "seq": self.seq, "op": "heartbeat", "pid": pid}))
