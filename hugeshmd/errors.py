"""The exception hierarchy: one root, subclasses named for what the caller can do.

Every error that crosses the wire carries a numeric ``code`` so that a client
rebuilds the same exception class from a reply (see :mod:`hugeshmd.protocol`).
"""

from __future__ import annotations

__all__ = [
    "HugeshmdError",
    "InvalidArgument",
    "AlreadyExists",
    "NotFound",
    "OutOfMemory",
    "AddressUnavailable",
    "PrimaryUnavailable",
    "InstanceLocked",
    "HugepagesUnavailable",
    "TableCorrupt",
    "ProtocolError",
    "TableBusy",
    "AccessDenied",
    "error_for_code",
    "KernelRefused",
]


class HugeshmdError(Exception):
    """Root of every error raised by hugeshmd."""

    code = 1

    def __init__(self, message: str, **fields: object) -> None:
        super().__init__(message)
        self.message = message
        for key, value in fields.items():
            setattr(self, key, value)


class InvalidArgument(HugeshmdError, ValueError):
    """An argument is of the wrong type or out of range; fix the call."""

    code = 2


class AlreadyExists(HugeshmdError):
    """A zone of that name exists; pick another name or `lookup` it."""

    code = 3


class NotFound(HugeshmdError, LookupError):
    """No zone of that name exists."""

    code = 4


class OutOfMemory(HugeshmdError, MemoryError):
    """No free run in any segment is large enough for the request."""

    code = 5


class AddressUnavailable(HugeshmdError):
    """Part of the instance's address window is already mapped in this process."""

    code = 6


class PrimaryUnavailable(HugeshmdError, ConnectionError):
    """No live primary answered for the prefix within the timeout."""

    code = 7


class InstanceLocked(HugeshmdError):
    """Another primary already runs with this prefix."""

    code = 8


class HugepagesUnavailable(HugeshmdError):
    """Hugepages were required but are absent, unmounted or exhausted."""

    code = 9


class TableCorrupt(HugeshmdError):
    """The shared table failed its magic, version or checksum checks."""

    code = 10


class ProtocolError(HugeshmdError):
    """A message was malformed, of another version, or named an unknown operation."""

    code = 11


class TableBusy(HugeshmdError, BlockingIOError):
    """The shared table's writer lock stayed taken for the whole timeout; try again."""

    code = 12


class AccessDenied(HugeshmdError, PermissionError):
    """This process may not do that: it is outside the instance's group or allowed users,
    or it attached read-only and tried to change something."""

    code = 13


_BY_CODE = {
    cls.code: cls
    for cls in (
        HugeshmdError,
        InvalidArgument,
        AlreadyExists,
        NotFound,
        OutOfMemory,
        AddressUnavailable,
        PrimaryUnavailable,
        InstanceLocked,
        HugepagesUnavailable,
        TableCorrupt,
        ProtocolError,
        TableBusy,
        AccessDenied,
    )
}


def error_for_code(code: int) -> type[HugeshmdError]:
    """The exception class for a wire error code (the root class if unknown)."""
    return _BY_CODE.get(code, HugeshmdError)


class KernelRefused(HugeshmdError, OSError):
    """The kernel refused a change to the host (a pool size, a mount): ``errno`` and ``path`` say
    which and why; most often it needs root. Raised by ``hugeshmd hugepages``."""

    code = 14


_BY_CODE[KernelRefused.code] = KernelRefused
