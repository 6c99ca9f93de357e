"""The primary's lifetime lock: the one reliable sign that an instance is alive.

Some facts about the lock:

* The primary holds ``flock(LOCK_EX)`` on ``primary.lock`` for its whole life.
  The kernel drops it when the process dies, however it dies, so "lock free"
  is the only reliable meaning of "no primary" and of "these files are stale".
* It is taken *before* binding any socket: libzmq unlinks an existing
  ``ipc://`` path when it binds, so a second primary binding first would steal
  the first one's endpoint (libzmq ipc_listener_t::set_local_address).
* Tools may probe the lock (:func:`primary_alive`) by taking it shared for an
  instant, so a starting primary that finds it taken retries for a moment
  before concluding that a rival holds it: a rival holds it for its whole life.
* A primary removes its lock file on exit. A racing starter may have opened the
  old inode and then lock it after the unlink, so after locking we check that
  the path still names the inode we hold, and start over if it does not.
* An flock belongs to the open file description: a descriptor that another
  process keeps (a forked child, systemd's file-descriptor store) keeps it held.
  The lock is taken on a descriptor opened with O_CLOEXEC and never shared.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time

from ..errors import InstanceLocked

__all__ = ["PrimaryLock", "primary_alive", "PROBE_GRACE_S"]


class PrimaryLock:
    """The exclusive lifetime lock of a primary. Use :meth:`acquire`."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, path: str) -> PrimaryLock:
        """Take the lock or raise InstanceLocked naming the holder's pid."""
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:  # an exiting primary removed the dir after we made it
                os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
                continue
            if not _lock_within(fd, PROBE_GRACE_S):
                holder = _read_pid(fd)
                os.close(fd)
                raise InstanceLocked(f"another primary (pid {holder}) holds {path}", path=path, pid=holder)
            if _same_inode(fd, path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return cls(path, fd)
            os.close(fd)  # unlinked under us by an exiting primary: start over

    def release(self, unlink: bool = True) -> None:
        """Remove the lock file (while still holding it) and drop the lock."""
        if self._fd is None:
            return
        if unlink:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        os.close(self._fd)
        self._fd = None


def primary_alive(lock_path: str) -> bool:
    """True while some process holds the primary lock at ``lock_path``."""
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError as err:
        if err.errno == errno.EWOULDBLOCK:
            return True
        raise
    finally:
        os.close(fd)  # closing drops our probe lock, if we got it
    return False


PROBE_GRACE_S = 0.05


def _lock_within(fd: int, seconds: float) -> bool:
    """LOCK_EX, retried while someone holds it, for at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.001)  # backoff under contention; a probe holds it for microseconds


def _same_inode(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).split()[0])
    except (OSError, ValueError, IndexError):
        return None


