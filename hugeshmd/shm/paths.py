"""Every name of an instance on the host: its runtime dir, its files, its hugepage files.

Per instance (the *prefix*): a runtime dir ``<runtime root>/<prefix>/`` holding
``primary.lock`` (:mod:`hugeshmd.shm.lock`), the shared ``table``
(:mod:`hugeshmd.shm.layout`) and the ZeroMQ ``ipc://`` endpoints ``control``
and ``events``; hugepage files named ``hugeshmd.<prefix>.seg<N>`` in a
hugetlbfs mount, or POSIX shared-memory objects ``/hugeshmd.<prefix>.seg<N>``
(``/dev/shm/hugeshmd.<prefix>.seg<N>``) in fallback mode. This module is the
only place those names are spelled.

Where runtime dirs live (the *runtime root*):

* A primary keeps its runtime dir under ``/run/hugeshmd`` when it runs as root
  or as a system service (the units), else under ``$XDG_RUNTIME_DIR/hugeshmd``
  (a user's own instance), unless told otherwise (``runtime_root``).
* A worker looks where an instance of the prefix may be: ``HUGESHMD_RUNTIME_ROOT``
  or ``attach(runtime_root=)`` if given (only there); otherwise its own user's
  root first, then the system root ``/run/hugeshmd``. A non-root member of an
  instance's group so finds a system instance with no configuration.
"""

from __future__ import annotations

import grp
import os
import stat

from ..errors import AccessDenied, InvalidArgument

__all__ = [
    "SYSTEM_RUNTIME_ROOT", "SEGMENT_HEAD", "segment_name", "validate_prefix", "default_runtime_root",
    "worker_runtime_roots", "parse_segment_name", "RuntimePaths",
]  # fmt: skip

SYSTEM_RUNTIME_ROOT = "/run/hugeshmd"
SEGMENT_HEAD = "hugeshmd."  # every segment file and shm object of every instance starts so

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


def _user_runtime_root() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/hugeshmd-{os.geteuid()}"
    return os.path.join(base, "hugeshmd")


def default_runtime_root() -> str:
    """Where a primary of this process's user keeps runtime dirs: ``/run/hugeshmd`` for root,
    ``$XDG_RUNTIME_DIR/hugeshmd`` otherwise (``HUGESHMD_RUNTIME_ROOT`` overrides both)."""
    explicit = os.environ.get("HUGESHMD_RUNTIME_ROOT")
    if explicit:
        return explicit
    return SYSTEM_RUNTIME_ROOT if os.geteuid() == 0 else _user_runtime_root()


def worker_runtime_roots(root: str | None = None) -> list[str]:
    """Where a worker looks for an instance, in order: ``root`` or ``HUGESHMD_RUNTIME_ROOT``
    if given (only it); else the user's own root, then ``/run/hugeshmd`` (root: only that).

    The user's own root is ``$XDG_RUNTIME_DIR/hugeshmd`` (logind makes that directory the
    user's alone). Without XDG_RUNTIME_DIR it would be under /tmp, where anyone may make a
    directory first and plant a table there: it is looked in only if it is this user's and
    no one else may write it.
    """
    explicit = root or os.environ.get("HUGESHMD_RUNTIME_ROOT")
    if explicit:
        return [explicit]
    if os.geteuid() == 0:
        return [SYSTEM_RUNTIME_ROOT]
    own = _user_runtime_root()
    if os.environ.get("XDG_RUNTIME_DIR") or _private(os.path.dirname(own)):
        return [own, SYSTEM_RUNTIME_ROOT]
    return [SYSTEM_RUNTIME_ROOT]


def _private(path: str) -> bool:
    """Whether ``path`` is a directory of this user's that no one else may write (not a link)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def segment_name(prefix: str, segment_id: int) -> str:
    """The file name (in a hugetlbfs directory or /dev/shm) of segment ``segment_id`` of ``prefix``."""
    return f"{SEGMENT_HEAD}{prefix}.seg{segment_id}"


def parse_segment_name(name: str) -> tuple[str, int] | None:
    """(prefix, segment id) of a segment file or shm object name, else None.

    The prefix is read greedily: prefix ``a.seg1`` has ``hugeshmd.a.seg1.seg0``,
    which must not be taken for segment 1 of prefix ``a``.
    """
    if not name.startswith(SEGMENT_HEAD):
        return None
    stem, sep, number = name[len(SEGMENT_HEAD):].rpartition(".seg")
    if not sep or not number.isdigit() or not number.isascii():
        return None
    try:
        return validate_prefix(stem), int(number)
    except InvalidArgument:
        return None


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
        return cls(validate_prefix(prefix), root or default_runtime_root())

    @classmethod
    def candidates(cls, prefix: str, root: str | None = None) -> list[RuntimePaths]:
        """The places a worker looks for ``prefix`` (:func:`worker_runtime_roots`)."""
        prefix = validate_prefix(prefix)
        return [cls(prefix, r) for r in worker_runtime_roots(root)]

    @property
    def dir(self) -> str:
        return os.path.join(self.root, self.prefix)

    @property
    def lock(self) -> str:
        return os.path.join(self.dir, "primary.lock")

    @property
    def table(self) -> str:
        return os.path.join(self.dir, "table")

    def table_temp(self, pid: int) -> str:
        """Where ``pid`` writes a new table before renaming it to :attr:`table`."""
        return f"{self.table}{TABLE_TEMP}{pid}"

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
        return f"{SEGMENT_HEAD}{self.prefix}.seg"

    def segment_name(self, segment_id: int) -> str:
        """The file name (in a hugetlbfs directory) of segment ``segment_id``."""
        return segment_name(self.prefix, segment_id)

    def shm_name(self, segment_id: int) -> str:
        """The POSIX shared-memory name (``shm_open``) of segment ``segment_id``."""
        return f"/{self.segment_name(segment_id)}"

    def access_denied(self, path: str, err: OSError) -> AccessDenied:
        """The AccessDenied for a file of the instance that this process may not open."""
        try:
            owner = grp.getgrgid(os.stat(os.path.dirname(path)).st_gid).gr_name
            hint = f"; workers must be in group {owner!r}"
        except (OSError, KeyError):
            hint = ""
        return AccessDenied(
            f"cannot open {path}: {err.strerror} (this process: uid {os.geteuid()}, gid {os.getegid()}){hint}",
            prefix=self.prefix, path=path, errno=err.errno)


TABLE_TEMP = ".new."  # table.new.<pid>: a table being written, renamed into place when complete
