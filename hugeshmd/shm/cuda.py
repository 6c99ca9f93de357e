"""Pinned for GPU DMA: an instance's segments registered with the CUDA runtime, following growth.

``Secondary.cuda_register()`` lands here. A :class:`CudaRegistration` belongs to the process's
:class:`~hugeshmd.shm.window.Window` of the instance, and watches it: every segment mapped now
is registered (``cudaHostRegister``) at once, every segment mapped later (growth, met by a
lookup or by the heap, which all map through ``Window.map``) just after its mmap, and each is
unregistered just before its munmap, at ``cuda_unregister()`` and at ``close()``.
Secondaries of one process that share the window share its registration: the last to let go
unregisters. The binding itself is :mod:`hugeshmd._cudart` (see its notes on CUDA).

A segment mapped later that CUDA refuses stays mapped and usable, only not pinned: the map
happens inside whatever call met the new segment (a lookup, an alloc), which must not fail
for it. The refusal is kept in ``failures`` and warned about (RuntimeWarning); the next
``cuda_register()`` tries that segment again and raises if it is still refused.
"""

from __future__ import annotations

import _thread
import os
from collections.abc import Iterator
from contextlib import contextmanager

from .. import _cudart, _fork
from ..errors import CudaError, InvalidArgument
from .window import Window

__all__ = ["CudaRegistration", "register", "FLAGS"]

FLAGS = _cudart.PORTABLE | _cudart.MAPPED  # every device's context; a device pointer for kernels
_making = _thread.allocate_lock()  # one registration per window, however many threads ask


def _renew_lock() -> None:
    global _making
    _making = _thread.allocate_lock()  # another thread may have held it at fork


os.register_at_fork(after_in_child=_renew_lock)


def register(window: Window, device: int | None, library: str | None, read_only: bool) -> CudaRegistration:
    """The window's registration, made (every segment registered) or joined; one more user of it.

    Raises LibraryMissing, CudaError (nothing stays registered by this call), InvalidArgument
    for a ``device`` that is not a device number.
    """
    if device is not None and (isinstance(device, bool) or not isinstance(device, int) or device < 0):
        raise InvalidArgument(f"device must be a CUDA device number or None, not {device!r}", name="device")
    with _making:
        found = next((w for w in window.watchers if isinstance(w, CudaRegistration)), None)
        if found is not None:
            found.retry()
        else:
            flags = FLAGS | (_cudart.READ_ONLY if read_only else 0)
            found = CudaRegistration(window, _cudart.load(library), device, flags)
            found.start()
        found.users += 1
        return found


class CudaRegistration:
    """The segments of one window registered with CUDA in this process. Made by :func:`register`.

    ``segments``: id -> (address, length) of each registered segment; ``flags`` (``Portable|Mapped``,
    with ``ReadOnly`` for a read-only attach); ``device`` (the device whose context registers, None
    for the calling thread's current one; with Portable the pages are pinned for every device);
    ``library``: the libcudart used; ``failures``: id -> CudaError of a segment mapped later that
    CUDA refused.
    """

    def __init__(self, window: Window, runtime: _cudart.Runtime, device: int | None, flags: int) -> None:
        self.window = window
        self.runtime = runtime
        self.device = device
        self.flags = flags
        self.library = runtime.path
        self.segments: dict[int, tuple[int, int]] = {}
        self.failures: dict[int, CudaError] = {}
        self.users = 0  # Secondaries holding it
        self._lock = _thread.RLock()  # segments: this thread's registrations vs a map in another
        _fork.register(self)

    @property
    def registered_bytes(self) -> int:
        return sum(length for _, length in self.segments.values())

    def start(self) -> None:
        """Watch the window, then register every segment it maps; on a refusal, undo and raise."""
        self.window.watch(self)
        try:
            self.retry()
        except BaseException:
            self._stop()
            raise

    def retry(self) -> None:
        """Register every mapped segment not registered yet; CudaError for the first refused."""
        with self._lock, self._on_device():
            for sid, (address, length) in list(self.window.segments.items()):
                if sid not in self.segments and self.window.segments.get(sid) == (address, length):
                    self.runtime.host_register(address, length, self.flags, sid)
                    self.segments[sid] = (address, length)
                    self.failures.pop(sid, None)

    def leave(self) -> list[CudaError]:
        """One user fewer; the last unregisters every segment and stops watching. What CUDA refused
        in unregistering (the segments are no longer counted as registered all the same)."""
        with _making:
            self.users -= 1
            if self.users > 0:
                return []
            return self._stop()

    def _stop(self) -> list[CudaError]:
        self.window.unwatch(self)
        errors = []
        with self._lock, self._on_device():
            for sid, (address, length) in list(self.segments.items()):
                try:
                    self.runtime.host_unregister(address, length, sid)
                except CudaError as err:
                    errors.append(err)
            self.segments.clear()
            self.failures.clear()
        return errors

    # -- told by the window (under its map lock: never raise) ------------------------------------

    def mapped(self, segment_id: int, address: int, length: int) -> None:
        """A segment was just mapped: register it, or record and warn why CUDA would not."""
        with self._lock:
            if segment_id in self.segments:
                return
            try:
                with self._on_device():
                    self.runtime.host_register(address, length, self.flags, segment_id)
            except CudaError as err:
                self.failures[segment_id] = err
                import warnings

                warnings.warn(f"{err.message}: the segment is mapped but not pinned; cuda_register() tries again",
                              RuntimeWarning, stacklevel=2)
                return
            self.segments[segment_id] = (address, length)

    def unmapping(self, segment_id: int, address: int, length: int) -> None:
        """A segment is about to be unmapped: unregister it first."""
        with self._lock:
            self.failures.pop(segment_id, None)
            if self.segments.pop(segment_id, None) is None:
                return
            try:
                with self._on_device():
                    self.runtime.host_unregister(address, length, segment_id)
            except CudaError:
                pass  # unmapped all the same: nothing the caller could do, and the pages go

    @contextmanager
    def _on_device(self) -> Iterator[None]:
        """Run on ``device`` (then back to the thread's own), or on the current device if None."""
        if self.device is None:
            yield
            return
        previous = self.runtime.get_device()
        self.runtime.set_device(self.device)
        try:
            yield
        finally:
            self.runtime.set_device(previous)

    def _after_fork(self) -> None:
        # The registrations were the parent's (CUDA does not survive fork): the child has none,
        # and must make no CUDA call for its parent's.
        self._lock = _thread.RLock()
        self.segments = {}
        self.failures = {}
        self.users = 0
        self.window.unwatch(self)

    def __repr__(self) -> str:
        return (f"<CudaRegistration {len(self.segments)} segments, {self.registered_bytes} bytes, flags "
                f"{_cudart.flag_names(self.flags)}, libcudart {self.library}>")
