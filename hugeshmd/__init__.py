"""hugeshmd: hugepage shared memory at the same virtual address in every process.

A primary (``hugeshmd primary``) maps hugepages and publishes the segment
table; workers call :func:`attach` and share named zones zero-copy::

    import hugeshmd
    with hugeshmd.attach() as shm:
        zone = shm.reserve("frames", 64 << 20)
        memoryview(zone)[:5] = b"hello"

Importing this package loads only what a worker needs to attach and look up
(:mod:`hugeshmd.shm`: no ZeroMQ, no msgpack, no posix_ipc, no numpy): a fresh
worker pays for what it uses. The floors above it, :mod:`hugeshmd.wire`,
:mod:`hugeshmd.daemon` and :mod:`hugeshmd.host`, load only when asked for.
"""

from .errors import (
    AccessDenied,
    AddressUnavailable,
    AdoptionRefused,
    AlreadyExists,
    ChannelBusy,
    ChannelTimeout,
    CudaError,
    HandleClosed,
    HugepagesUnavailable,
    HugeshmdError,
    InstanceLocked,
    InvalidArgument,
    KernelRefused,
    LibraryMissing,
    NotFound,
    OutOfMemory,
    PrimaryStopped,
    PrimaryUnavailable,
    ProtocolError,
    TableBusy,
    TableCorrupt,
    TableFull,
)
from .shm.secondary import Secondary, Segment, attach
from .shm.zones import ReadOnlyZone, Zone

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
    "TableFull",
    "AddressUnavailable",
    "PrimaryUnavailable",
    "PrimaryStopped",
    "InstanceLocked",
    "HugepagesUnavailable",
    "TableCorrupt",
    "TableBusy",
    "ProtocolError",
    "AccessDenied",
    "KernelRefused",
    "HandleClosed",
    "AdoptionRefused",
    "ChannelTimeout",
    "ChannelBusy",
    "LibraryMissing",
    "CudaError",
]
