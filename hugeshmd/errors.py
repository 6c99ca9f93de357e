"""The exception hierarchy: one root, subclasses named for what the caller can do.

Every class declares its fields (``FIELDS``): each is always present on an
instance (None when the raiser did not know it), survives pickling, and
crosses the wire with the numeric ``code`` that names the class, so a client
rebuilds the same exception, fields included (see :mod:`hugeshmd.wire.protocol`).

Some classes split an older one by remedy, and stay its subclass so that
existing ``except`` clauses keep working: :class:`TableFull` (raise a
capacity in the config) is an :class:`OutOfMemory` (free memory);
:class:`PrimaryStopped` (the instance was stopped for good) is a
:class:`PrimaryUnavailable` (none answered in time); :class:`HandleClosed`
(you closed it) was the bare root class.
"""

from __future__ import annotations

TYPE_CHECKING = False  # this module is on every worker's import path: no `typing` at run time
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "HugeshmdError",
    "InvalidArgument",
    "AlreadyExists",
    "NotFound",
    "OutOfMemory",
    "TableFull",
    "AddressUnavailable",
    "PrimaryUnavailable",
    "PrimaryStopped",
    "InstanceLocked",
    "HugepagesUnavailable",
    "TableCorrupt",
    "ProtocolError",
    "TableBusy",
    "AccessDenied",
    "KernelRefused",
    "HandleClosed",
    "AdoptionRefused",
    "ChannelTimeout",
    "ChannelBusy",
    "LibraryMissing",
    "CudaError",
    "error_for_code",
    "ERRORS",
]


class HugeshmdError(Exception):
    """Root of every error raised by hugeshmd. ``message`` is the text; ``fields`` the declared
    fields (``FIELDS``) by name."""

    code = 1
    FIELDS: tuple[str, ...] = ()  # every subclass declares its own, in full

    def __init__(self, message: str, **fields: Any) -> None:
        unknown = set(fields).difference(self.FIELDS)
        if unknown:  # a raiser's typo would otherwise be a field no one can read
            raise TypeError(f"{type(self).__name__} has no field(s) {', '.join(sorted(unknown))}")
        super().__init__(message)
        self.message = message
        for key in self.FIELDS:
            setattr(self, key, fields.get(key))

    @property
    def fields(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.FIELDS}

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (type(self), self.message, self.fields)


def _rebuild(cls: type[HugeshmdError], message: str, fields: dict[str, Any]) -> HugeshmdError:
    return cls(message, **fields)


class InvalidArgument(HugeshmdError, ValueError):
    """An argument is of the wrong type or out of range; fix the call. ``name`` is the
    argument or option at fault where it has one."""

    code = 2
    FIELDS = ("name", "size", "align", "path", "node", "pages")
    if TYPE_CHECKING:
        name: Any
        size: Any
        align: Any
        path: str | None
        node: int | None
        pages: int | None


class AlreadyExists(HugeshmdError):
    """A zone of that name exists; pick another name or `lookup` it."""

    code = 3
    FIELDS = ("name",)
    if TYPE_CHECKING:
        name: str | None


class NotFound(HugeshmdError, LookupError):
    """No zone of that name exists."""

    code = 4
    FIELDS = ("name",)
    if TYPE_CHECKING:
        name: str | None


class OutOfMemory(HugeshmdError, MemoryError):
    """No free run in any segment is large enough for the request (``size`` bytes); free
    some, or give the instance more memory."""

    code = 5
    FIELDS: tuple[str, ...] = ("name", "size", "errno")
    if TYPE_CHECKING:
        name: str | None
        size: int | None
        errno: int | None


class TableFull(OutOfMemory):
    """A fixed-capacity table of the instance is full: ``table`` (zones, workers, segments) holds
    ``capacity`` entries. Memory may be free: raise the capacity (``max_zones``, ``max_workers``)
    and restart the primary, or free entries."""

    code = 15
    FIELDS = ("name", "size", "errno", "table", "capacity")
    if TYPE_CHECKING:
        table: str | None
        capacity: int | None


class AddressUnavailable(HugeshmdError):
    """Part of the instance's address window is already mapped in this process: ``conflicts``
    lists the ``/proc/self/maps`` lines in the way (empty when none could be named)."""

    code = 6
    FIELDS = ("address", "size", "errno", "conflicts")
    if TYPE_CHECKING:
        address: int | None
        size: int | None
        errno: int | None
        conflicts: list[str]

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message, **fields)
        if self.conflicts is None:
            self.conflicts = []


class PrimaryUnavailable(HugeshmdError, ConnectionError):
    """No live primary answered for the prefix within the timeout; ``path`` says where this
    process looked (every place, ``;``-separated, when it looked in several)."""

    code = 7
    FIELDS = ("prefix", "path")
    if TYPE_CHECKING:
        prefix: str | None
        path: str | None


class PrimaryStopped(PrimaryUnavailable):
    """The instance was stopped for good (``hugeshmd`` stopped, or its files were removed):
    zones already held stay readable; attach again once a new primary runs."""

    code = 16


class InstanceLocked(HugeshmdError):
    """Another primary (``pid``) already runs with this prefix (its lock is ``path``)."""

    code = 8
    FIELDS = ("path", "pid")
    if TYPE_CHECKING:
        path: str | None
        pid: int | None


class HugepagesUnavailable(HugeshmdError):
    """Hugepages were required but are absent, unmounted or exhausted; the message says how to
    reserve or mount them."""

    code = 9
    FIELDS = ("size", "errno", "path")
    if TYPE_CHECKING:
        size: int | None
        errno: int | None
        path: str | None


class TableCorrupt(HugeshmdError):
    """The shared table at ``path`` failed its magic, version, size or checksum checks."""

    code = 10
    FIELDS = ("path",)
    if TYPE_CHECKING:
        path: str | None


class ProtocolError(HugeshmdError):
    """A message was malformed, of another version, or named an unknown operation."""

    code = 11


class TableBusy(HugeshmdError, BlockingIOError):
    """The shared table's writer lock (``path``) stayed taken for the whole wait (``waited``
    seconds) by ``pid``, which ``stopped`` says is frozen (SIGSTOP, a debugger); try again.

    The same for the lock of a shard of the zone name index (``path`` ``.names``),
    which every reserve and free of a user zone takes. Every wait for the lock is
    bounded: a worker's reserve, free and attach by
    ``attach(lock_timeout=)`` (5 s by default), the primary's by 1 s. The next
    call after the holder resumes or dies succeeds (the kernel releases a dead
    holder's lock).
    """

    code = 12
    FIELDS = ("path", "pid", "stopped", "waited")
    if TYPE_CHECKING:
        path: str | None
        pid: int | None
        stopped: bool | None
        waited: float | None


class AccessDenied(HugeshmdError, PermissionError):
    """This process may not do that: it is outside the instance's group (the files at ``path``
    belong to it), the primary's socket check refused it, or it attached read-only and tried to
    change something."""

    code = 13
    FIELDS = ("prefix", "path", "errno")
    if TYPE_CHECKING:
        prefix: str | None
        path: str | None
        errno: int | None


class KernelRefused(HugeshmdError, OSError):
    """The kernel refused a change to the host (a pool size, a mount): ``errno`` and ``path`` say
    which and why; most often it needs root. Raised by ``hugeshmd hugepages``."""

    code = 14
    FIELDS = ("errno", "path")
    if TYPE_CHECKING:
        errno: int | None
        path: str | None


class AdoptionRefused(HugeshmdError):
    """A primary with ``adopt = "require"`` found its dead predecessor's instance but could not
    adopt it (``reason``); its files are kept for inspection. Remove them with ``hugeshmd hugepages
    cleanup --prefix P`` (or set ``adopt = "auto"``) to start afresh."""

    code = 18
    FIELDS = ("prefix", "reason")
    if TYPE_CHECKING:
        prefix: str | None
        reason: str | None


class HandleClosed(HugeshmdError):
    """This handle was closed by its own process: a Secondary (attach again to go on; ``prefix``
    is the instance's), or a Channel (open it again; ``prefix`` is the channel's name)."""

    code = 17
    FIELDS = ("prefix",)
    if TYPE_CHECKING:
        prefix: str | None


class LibraryMissing(HugeshmdError, ImportError):
    """An optional library that this call needs could not be loaded: ``name`` (``torch``,
    ``pyarrow``, ``libcudart``), looked for at ``path`` (every place, ``;``-separated, where it
    searched files); install it, for instance with hugeshmd's pip ``extra``. An ImportError too,
    so ``except ImportError`` catches it as it would a missing module."""

    code = 19
    FIELDS = ("name", "path", "extra")
    if TYPE_CHECKING:
        name: str | None
        path: str | None
        extra: str | None


class CudaError(HugeshmdError, RuntimeError):
    """The CUDA runtime refused a call: ``cuda_error`` is its ``cudaError_t`` (the message gives
    its name and cudaGetErrorString's text), for ``segment`` (``address``, ``size``) where the
    call was about one. No driver or no device (35, 100) means this host cannot pin for a GPU."""

    code = 20
    FIELDS = ("cuda_error", "segment", "address", "size")
    if TYPE_CHECKING:
        cuda_error: int | None
        segment: int | None
        address: int | None
        size: int | None


class ChannelTimeout(HugeshmdError, TimeoutError):
    """A channel (``channel``) stayed empty (a receive) or full (a send, ``full``) for the whole
    wait (``waited`` seconds). Nothing was sent or received."""

    code = 21
    FIELDS = ("channel", "full", "waited")
    if TYPE_CHECKING:
        channel: str | None
        full: bool | None
        waited: float | None


class ChannelBusy(TableBusy):
    """A channel's producer or consumer lock (of channel ``path``) stayed taken for the whole
    wait (``waited`` seconds) by ``pid``, which ``stopped`` says is frozen. A holder that dies
    releases it (the kernel does), and the next taker finishes what it left half done."""

    code = 22


ERRORS: tuple[type[HugeshmdError], ...] = (
    HugeshmdError, InvalidArgument, AlreadyExists, NotFound, OutOfMemory, AddressUnavailable,
    PrimaryUnavailable, InstanceLocked, HugepagesUnavailable, TableCorrupt, ProtocolError, TableBusy,
    AccessDenied, KernelRefused, TableFull, PrimaryStopped, HandleClosed, AdoptionRefused, LibraryMissing, CudaError,
    ChannelTimeout, ChannelBusy,
)
_BY_CODE = {cls.code: cls for cls in ERRORS}


def error_for_code(code: int) -> type[HugeshmdError]:
    """The exception class for a wire error code (the root class if unknown)."""
    return _BY_CODE.get(code, HugeshmdError)
