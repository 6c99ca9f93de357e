"""hugeshmd: hugepage shared memory at the same virtual address in every process.

A primary (``hugeshmd primary``) maps hugepages and publishes the segment
table; workers call :func:`attach` and share named zones zero-copy::

    import hugeshmd
    with hugeshmd.attach() as shm:
        zone = shm.reserve("frames", 64 << 20)
        memoryview(zone)[:5] = b"hello"

Importing this package loads only what a worker needs to attach and look up
(no ZeroMQ, no msgpack, no numpy): a fresh worker pays for what it uses.
"""

from .errors import (
    AccessDenied,
    AddressUnavailable,
    AlreadyExists,
    HugepagesUnavailable,
    HugeshmdError,
    InstanceLocked,
    InvalidArgument,
    NotFound,
    OutOfMemory,
    PrimaryUnavailable,
    ProtocolError,
    TableBusy,
    TableCorrupt,
)
from .secondary import Secondary, Segment, attach
from .zones import ReadOnlyZone, Zone

__version__ = "0.1.0"

__all__ = [
    "attach",
    "Secondary",
    "Segment",
    "Zone",
    "ReadOnlyZone",
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
    "TableBusy",
    "ProtocolError",
    "AccessDenied",
]
