"""Waking the coroutines that ``await channel.arecv()``: one thread per channel in this process.

The thread sleeps on the channel's futex as a receiver does (counted among the
sleeping receivers, so a sender wakes it), and when a message may be there
resolves every waiting coroutine's future; each then tries a receive that does
not wait. However many coroutines wait on a channel, one thread serves them;
it exits when none is left, and the waker is then forgotten, so the waker
index never keeps a channel handle alive that its user has dropped.
"""

from __future__ import annotations

import os
import threading

from .. import _sys
from .channel import HEAD_AT, RWAIT_AT, TAIL_AT

TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio
    from typing import Any

    from .channel import Channel

__all__ = ["waker_for"]

SLEEP_S = 0.5  # the thread's longest sleep: it notices coroutines that stopped waiting (cancelled)

_wakers: dict[tuple[int, int], Waker] = {}
_guard = threading.Lock()


def _after_fork() -> None:
    """In a forked child: another thread may have held the guard at the fork (a waker thread
    that stopped, another coroutine's arecv), and would hold it there for good; the parent's
    wakers serve none of the child's coroutines. Both made anew (see :mod:`hugeshmd._fork`)."""
    global _wakers, _guard
    _wakers = {}
    _guard = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def waker_for(channel: Channel) -> Waker:
    """The waker of ``channel`` in this process (a forked child makes its own: threads do not
    survive fork, so its parent's waker would never run there)."""
    key = (os.getpid(), id(channel))
    with _guard:
        waker = _wakers.get(key)
        if waker is None or waker.channel is not channel:
            waker = _wakers[key] = Waker(channel, key)
        return waker


class Waker:
    """The thread serving one channel's waiting coroutines in this process, and their futures.
    Listed in ``_wakers`` while its thread runs (or is about to): a waker whose thread stopped is
    forgotten, and with it the channel handle it refers to."""

    def __init__(self, channel: Channel, key: tuple[int, int]) -> None:
        self.channel = channel
        self._key = key
        self._lock = threading.Lock()
        self._waiting: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]]] = []
        self._thread: threading.Thread | None = None

    def wait(self, loop: asyncio.AbstractEventLoop, tail: int) -> asyncio.Future[Any]:
        """A future resolved when a message may have come (None), or with a list of one Buffer
        (a message a dead receiver left half taken, now this process's)."""
        future = loop.create_future()
        with self._lock:
            self._waiting.append((loop, future))
            if self._thread is None:
                with _guard:  # forgotten when its last thread stopped: listed again (or a twin is)
                    _wakers.setdefault(self._key, self)
                self._thread = threading.Thread(target=self._run, name=f"hugeshmd-arecv-{self.channel.name}",
                                                daemon=True)
                self._thread.start()
        return future

    def _pending(self) -> bool:
        with self._lock:
            self._waiting = [(loop, f) for loop, f in self._waiting if not f.done() and not loop.is_closed()]
            if not self._waiting:
                self._stop()
                return False
            return True

    def _stop(self) -> None:
        """This waker's thread stops: forget it (under ``self._lock``)."""
        self._thread = None
        with _guard:
            if _wakers.get(self._key) is self:
                del _wakers[self._key]

    def _resolve(self, value: Any = None) -> None:
        with self._lock:
            waiting, self._waiting = self._waiting, []
        if value is not None and waiting:
            loop, future = waiting.pop(0)
            _call(loop, _set, future, value)
        for loop, future in waiting:
            _call(loop, _set, future, None)

    def _run(self) -> None:
        ch = self.channel
        busy = ch._busy  # this thread touches the channel: a close() waits for it to stop
        busy.append(None)
        try:
            self._serve(ch)
        finally:
            busy.pop()

    def _serve(self, ch: Channel) -> None:
        words = ch._words
        while self._pending():
            if ch._shutting:  # the handle was closed: its waiters are told, and the thread stops
                self._fail(ch._closed())
                return
            try:
                orphan = ch._lock(ch._clock, False)
            except Exception as err:  # noqa: BLE001 - a frozen receiver holds the lock: tell the waiters
                self._fail(err)
                return
            try:
                tail = words[TAIL_AT // 8]
                ready = bool(orphan) or words[HEAD_AT // 8] != tail
                if not ready:
                    period = ch._sleep_in(RWAIT_AT)
            finally:
                _sys.mutex_unlock(ch._clock)
            if ready:
                self._resolve(orphan or None)
                continue
            try:
                _sys.futex_wait(ch._address + TAIL_AT, tail, SLEEP_S)
            finally:
                try:
                    orphan = ch._lock(ch._clock, False)
                    ch._sleep_out(RWAIT_AT, period)
                    _sys.mutex_unlock(ch._clock)
                except Exception as err:  # noqa: BLE001
                    self._fail(err)
                    return
            self._resolve(orphan or None)

    def _fail(self, err: BaseException) -> None:
        with self._lock:
            waiting, self._waiting = self._waiting, []
            self._stop()
        for loop, future in waiting:
            _call(loop, _fail, future, err)


def _call(loop: asyncio.AbstractEventLoop, *call: Any) -> None:
    try:
        loop.call_soon_threadsafe(*call)
    except RuntimeError:  # the loop closed meanwhile: its coroutines wait no more
        pass


def _set(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Any], err: BaseException) -> None:
    if not future.done():
        future.set_exception(err)
