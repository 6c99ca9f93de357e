"""Where an instance lives on the host, and the lock that says it is alive.

Per instance (the *prefix*): a runtime dir holding ``primary.lock``, the shared
``table`` and the ZeroMQ ``ipc://`` endpoints; hugepage files named
``hugeshmd.<prefix>.seg<N>`` in a hugetlbfs mount, or POSIX shared-memory
objects ``/hugeshmd.<prefix>.seg<N>`` in fallback mode.

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
"""

from __future__ import annotations

import errno
import fcntl
import os
import time

from .errors import InstanceLocked, InvalidArgument

__all__ = [
    "write_file",
    "validate_prefix",
    "RuntimePaths",
    "PrimaryLock",
    "primary_alive",
    "process_start_time",
    "own_start_time",
    "process_alive",
]

_PREFIX_FIRST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_PREFIX_REST = _PREFIX_FIRST | frozenset(".-")


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if it can name files and endpoints; else InvalidArgument."""
    # Plain set checks rather than a regex: `re` is not worth its import to a worker.
    if (not isinstance(prefix, str) or not 0 < len(prefix) <= 64 or prefix[0] not in _PREFIX_FIRST
            or not _PREFIX_REST.issuperset(prefix)):
        raise InvalidArgument(
            f"invalid prefix {prefix!r}: use 1-64 of A-Z a-z 0-9 _ . - (not starting with . or -)",
            name=prefix,
        )
    return prefix


def default_runtime_root() -> str:
    """``/run/hugeshmd`` for root, ``$XDG_RUNTIME_DIR/hugeshmd`` otherwise."""
    if os.geteuid() == 0:
        return "/run/hugeshmd"
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/hugeshmd-{os.geteuid()}"
    return os.path.join(base, "hugeshmd")


class RuntimePaths:
    """Every path of one instance. ``root`` defaults to :func:`default_runtime_root`."""

    __slots__ = ("prefix", "root")

    def __init__(self, prefix: str, root: str) -> None:
        self.prefix = prefix
        self.root = root

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RuntimePaths) and (self.prefix, self.root) == (other.prefix, other.root)

    def __hash__(self) -> int:
        return hash((self.prefix, self.root))

    def __repr__(self) -> str:
        return f"RuntimePaths(prefix={self.prefix!r}, root={self.root!r})"

    @classmethod
    def for_prefix(cls, prefix: str, root: str | None = None) -> RuntimePaths:
        return cls(validate_prefix(prefix), root or os.environ.get("HUGESHMD_RUNTIME_ROOT") or default_runtime_root())

    @property
    def dir(self) -> str:
        return os.path.join(self.root, self.prefix)

    @property
    def lock(self) -> str:
        return os.path.join(self.dir, "primary.lock")

    @property
    def table(self) -> str:
        return os.path.join(self.dir, "table")

    @property
    def control(self) -> str:
        return "ipc://" + os.path.join(self.dir, "control")

    @property
    def events(self) -> str:
        return "ipc://" + os.path.join(self.dir, "events")

    def socket_paths(self) -> list[str]:
        return [os.path.join(self.dir, "control"), os.path.join(self.dir, "events")]

    def segment_stem(self) -> str:
        """This instance's hugepage files and shm objects are this stem and a segment id."""
        return f"hugeshmd.{self.prefix}.seg"


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


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (proc(5) stat field 22).

    With the pid it identifies a process across pid reuse. None if it is gone.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            raw = stat.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may contain spaces and parentheses; the fields after the
    # last ")" are plain numbers, starting with field 3 (state).
    return int(raw[raw.rindex(b")") + 2 :].split()[19])


_own: tuple[int, int | None] = (0, None)  # (pid, start time) of this process, read once per pid


def own_start_time() -> int:
    """This process's start time; read from /proc once per process (a forked child has its own)."""
    global _own
    pid = os.getpid()
    if _own[0] != pid:
        _own = (pid, process_start_time(pid))
    return _own[1] or 0


def process_alive(pid: int, start: int) -> bool:
    """True while the process that had ``pid`` and ``start`` still exists."""
    return process_start_time(pid) == start


def write_file(path: str, text: str, mode: int = 0o644) -> str:
    """Replace ``path`` with ``text`` atomically (a temp file beside it, renamed over it); the path.

    A reader (systemd, node_exporter) sees the old file or the new one, never half of one.
    """
    tmp = f"{os.path.join(os.path.dirname(path), '.' + os.path.basename(path))}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.chmod(tmp, mode)  # not narrowed by the umask
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
