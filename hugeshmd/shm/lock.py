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
import struct
import time

from ..errors import InstanceLocked

__all__ = ["PrimaryLock", "primary_alive", "PROBE_GRACE_S", "ByteLock"]


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




# struct flock on Linux x86-64 and aarch64: l_type, l_whence, l_start, l_len, l_pid (+ padding)
_FLOCK = struct.Struct("hhqqi4x")


class ByteLock:
    """Open-file-description (OFD) locks on single bytes of one file: the heap's arena locks.

    Unlike flock, they lock byte ranges, so one file carries a lock per arena;
    unlike classic POSIX record locks, they belong to the open file description,
    not the process, so closing some other descriptor of the file does not drop
    them. The kernel drops them when the last descriptor of the description is
    closed, which a process's death does: "I could take it" proves that no live
    process holds it, whatever pid reuse did. A forked child shares the
    description and must close its copy (:mod:`hugeshmd._fork`), else it keeps
    its parent's locks alive after the parent's death (safe: never freed early).
    """

    __slots__ = ("fd",)

    def __init__(self, path_or_fd: str | int, writable: bool = True) -> None:
        if isinstance(path_or_fd, int):  # a new description of an open file, not a dup of its descriptor
            path_or_fd = f"/proc/self/fd/{path_or_fd}"
        self.fd = os.open(path_or_fd, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)

    def _op(self, command: int, kind: int, offset: int) -> bool:
        try:
            fcntl.fcntl(self.fd, command, _FLOCK.pack(kind, os.SEEK_SET, offset, 1, 0))
            return True
        except BlockingIOError:
            return False
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise

    def try_exclusive(self, offset: int) -> bool:
        """Take byte ``offset`` exclusively if no other description holds it; whether taken."""
        return self._op(fcntl.F_OFD_SETLK, fcntl.F_WRLCK, offset)

    def try_shared(self, offset: int) -> bool:
        return self._op(fcntl.F_OFD_SETLK, fcntl.F_RDLCK, offset)

    def within(self, offset: int, seconds: float, exclusive: bool = True) -> bool:
        """Take byte ``offset`` (exclusively or shared), retrying for at most ``seconds``."""
        take = self.try_exclusive if exclusive else self.try_shared
        deadline = time.monotonic() + seconds
        pause = 0.00002
        while not take(offset):
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.001)
        return True

    def unlock(self, offset: int) -> None:
        self._op(fcntl.F_OFD_SETLK, fcntl.F_UNLCK, offset)

    def held_elsewhere(self, offset: int, exclusive: bool = True) -> bool:
        """Whether another description holds byte ``offset`` in a way that conflicts with taking
        it (exclusively or shared). A read: nothing is taken."""
        kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
        raw = fcntl.fcntl(self.fd, fcntl.F_OFD_GETLK, _FLOCK.pack(kind, os.SEEK_SET, offset, 1, 0))
        return bool(_FLOCK.unpack(raw)[0] != fcntl.F_UNLCK)

    def close(self) -> None:
        """Drop every lock of this description (unless a forked child shares it). Idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
