"""A heap allocation as the caller holds it: :class:`Buffer`.

A Buffer is a handle, not the memory: ``address`` and ``size`` say where the
allocation is (the same address in every process), :meth:`Buffer.view` gives
a zero-copy memoryview of it, and :meth:`Buffer.free` gives it back. It is made
by ``Secondary.alloc`` (its process owns the allocation) or ``Secondary.buffer``
(a handle to a live allocation that any process made, from its address).

Views keep the instance's memory mapped, so a view used after the allocation
was freed reads whatever the next allocation wrote there, never unmapped
memory: like any allocator, freeing while others still use the memory is the
caller's bug, but never a crash.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    import numpy
    import pyarrow
    import torch as _torch

    from .heap import Arena, Heap
    from .layout import ZoneRecord

__all__ = ["Buffer", "SENT"]

SENT: Any = type("Sent", (), {"__repr__": lambda self: "SENT", "__slots__": ()})()  # the record of a sent Buffer


class Buffer:
    """``size`` bytes of the shared heap at ``address``. Use as a context manager to free on exit.

    ``buf.view()`` is a writable, zero-copy memoryview (format ``B``) of exactly
    ``size`` bytes; ``buf.ndarray(dtype, shape)`` a numpy array over it;
    ``buf.iova`` its I/O address (physical with hugepages, where readable).
    On Python 3.12 and later ``memoryview(buf)`` works too.
    """

    __slots__ = ("address", "size", "_heap", "_slot", "_record")

    def __init__(self, heap: Heap, address: int, size: int, slot: tuple[int, int, Arena, int] | None,
                 record: ZoneRecord | None) -> None:
        self.address = address
        self.size = size
        self._heap = heap
        self._slot = slot
        self._record = record

    def view(self) -> memoryview:
        """A writable memoryview of the allocation, format ``B``."""
        return self._heap.view(self.address, self.size)

    def __buffer__(self, flags: int, /) -> memoryview:
        return self._heap.view(self.address, self.size)

    def __len__(self) -> int:
        return self.size

    @property
    def iova(self) -> int:
        return self._heap.iova(self.address)

    @property
    def freed(self) -> bool:
        """Whether this handle has freed its allocation."""
        return self._slot is None and self._record is None

    def ndarray(self, dtype: Any = "uint8", shape: int | tuple[int, ...] | None = None) -> numpy.ndarray:
        """A numpy array over the allocation (numpy is imported here); InvalidArgument if
        ``shape`` needs more bytes than it has."""
        from .zones import _ndarray

        return _ndarray(self.view(), f"{self.address:#x}", self.size, dtype, shape)  # type: ignore[no-any-return]

    def torch(self, dtype: Any = "uint8", shape: int | tuple[int, ...] | None = None) -> _torch.Tensor:
        """A PyTorch CPU tensor over the allocation, sharing its memory (torch is imported here), of
        ``dtype`` (a ``torch.dtype`` or its name) and ``shape`` (default: flat, as many as fit).
        LibraryMissing without PyTorch; InvalidArgument if ``shape`` needs more bytes than it has."""
        from .interop import tensor

        return tensor(self.view(), f"{self.address:#x}", dtype, shape)

    def arrow(self) -> pyarrow.Buffer:
        """A ``pyarrow.Buffer`` over the allocation, sharing its memory (pyarrow is imported here;
        LibraryMissing without it). Immutable on Arrow's side: write through ``view()``."""
        from .interop import arrow_buffer

        return arrow_buffer(self.address, self.size, self)

    def free(self) -> None:
        """Give the allocation back; any process may free any allocation.

        InvalidArgument (changing nothing) if it is not live: freed already, through
        this handle or another (a double free). TableBusy if the allocation's arena was
        being reclaimed for longer than the bound.
        """
        slot = self._slot
        if slot is not None:
            arena = slot[2]
            heap = self._heap
            if arena.heap is heap:  # the owner's fast path: one store publishes the free
                state = arena.state
                k = slot[1]
                s = state[k]
                if (s == 1 or s == 2) and not arena.holder[k]:  # LIVE or DISOWNED, not handed on
                    state[k] = 0
                    self._slot = None
                    heap._free[slot[3]].append(slot)
                    return
            heap.free_small(slot)  # another process's arena (a remote free), or an error
            self._slot = None
            return
        record = self._record
        if record is None or record is SENT:
            raise _freed(self.address, record is SENT)
        self._heap.free_large(record)
        self._record = None

    def disown(self) -> None:
        """Let the allocation outlive this process: it is no longer reclaimed when its maker
        dies, and is freed only by an explicit :meth:`free` (from any process). Only the
        process that made it may disown it."""
        slot = self._slot
        if slot is not None:
            self._heap.disown_small(slot)
        elif self._record is not None and self._record is not SENT:
            self._record = self._heap.disown_large(self._record)
        else:
            raise _freed(self.address, self._record is SENT)

    def __enter__(self) -> Buffer:
        return self

    @property
    def sent(self) -> bool:
        """Whether this handle sent its allocation through a channel (its receiver holds it now)."""
        return self._record is SENT

    def __exit__(self, *exc: object) -> None:
        """Free the allocation, unless it was freed, sent or disowned (a disowned one is freed only
        explicitly: it was handed on)."""
        if self.freed or self.sent or self.disowned:
            return
        self.free()

    @property
    def disowned(self) -> bool:
        """Whether the allocation outlives its maker (see :meth:`disown`)."""
        slot, record = self._slot, self._record
        if slot is not None:
            return bool(slot[2].state[slot[1]] == 2)  # DISOWNED
        return record is not None and record is not SENT and bool(record.flags & 2)  # ZONE_DISOWNED

    def __repr__(self) -> str:
        state = "freed" if self.freed else "sent" if self.sent else "large" if self._record is not None else "small"
        return f"<Buffer at {self.address:#x} size {self.size} {state}>"

    def __reduce__(self) -> Any:
        raise TypeError("a Buffer is not pickled (it would be a second owner); send its address and "
                        "call shm.buffer(address) on the other side")


def _freed(address: int, sent: bool = False) -> Exception:
    from ..errors import InvalidArgument

    if sent:
        return InvalidArgument(f"the allocation at {address:#x} was sent through a channel: its receiver holds "
                               "it now; nothing was changed", name="address")
    return InvalidArgument(f"the allocation at {address:#x} was already freed through this Buffer; "
                           "nothing was changed", name="address")
