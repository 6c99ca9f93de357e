"""The syscall layer: every ctypes prototype hugeshmd uses, one errno check each.

This is the only module that imports :mod:`ctypes`. Above it, code speaks in
addresses and file descriptors and receives :class:`OSError` with a real errno.

Some facts about mapping at an address, which the rest of the package relies on:

* Python's :mod:`mmap` cannot map at a chosen address, so ``mmap(2)`` is called
  through libc. ctypes hands back a failed ``mmap`` as ``2**64 - 1``
  (``MAP_FAILED`` read as an unsigned pointer), never as -1.
* ``MAP_FIXED`` silently replaces whatever is mapped at the address (mmap(2):
  "any overlapped portion of the existing mapping(s) will be discarded"). We use
  it *only* inside a window we reserved ourselves, so nothing of the process's
  own can be overwritten.
* The window is reserved with ``MAP_FIXED_NOREPLACE`` (Linux 4.17+), which fails
  with ``EEXIST`` instead of replacing. Older kernels ignore the flag and treat
  the address as a hint, so the returned address is compared and a mismatch is
  unmapped and reported as ``EEXIST`` too.
* A hugetlbfs ``MAP_SHARED`` mapping reserves its pages at ``mmap`` time and
  fails with ``ENOMEM`` when the pool cannot cover it (hugetlbpage.rst,
  "Reservation"). ``MAP_POPULATE`` however ignores fault errors, and a fault that
  cannot be served (hugetlb cgroup limit, no surplus page) raises ``SIGBUS``,
  which kills a Python process. ``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14+)
  faults the same pages in but *returns* the error (``ENOMEM``, ``EFAULT``), so
  the primary populates with it and falls back to touching pages only on older
  kernels where it answers ``EINVAL``.
* ``/proc/self/pagemap`` holds one 64-bit entry per 4 KiB virtual page: bit 63
  "present", bits 0-54 the page frame number. Since Linux 4.2 the PFN reads as 0
  without ``CAP_SYS_ADMIN`` (Documentation/admin-guide/mm/pagemap.rst).
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is not imported at run time (import hugeshmd stays light)
    from typing import TypeVar

    _T = TypeVar("_T")

__all__ = [
    "PAGE_SIZE",
    "MAP_FAILED",
    "mmap",
    "memory",
    "zero",
    "munmap",
    "madvise",
    "reserve",
    "unreserve",
    "map_fixed",
    "populate",
    "byte_array_type",
    "physical_addresses",
    "mount",
    "umount2",
    "fstatfs_type",
    "buffer_address",
    "install_sigbus_handler",
    "HUGETLBFS_MAGIC",
    "TMPFS_MAGIC",
    "MUTEX_SIZE",
    "EOWNERDEAD",
    "ENOTRECOVERABLE",
    "mutex_init",
    "mutex_lock",
    "mutex_trylock",
    "mutex_unlock",
    "mutex_consistent",
    "mutex_repaired",
    "mutex_holder",
    "futex_wait",
    "futex_wake",
]

PROT_NONE = 0x0
PROT_READ = 0x1
PROT_WRITE = 0x2
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000
MAP_POPULATE = 0x8000
MAP_FIXED_NOREPLACE = 0x100000
MADV_DONTDUMP = 16
MADV_POPULATE_WRITE = 23

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MAP_FAILED = ctypes.c_void_p(-1).value

# dlopen(NULL): the symbols already loaded into the process, libc's among them.
# (ctypes.util.find_library would run `ldconfig -p` in a child process, ~12 ms.)
_libc = ctypes.CDLL(None, use_errno=True)

_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
)
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.madvise.restype = ctypes.c_int
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.mount.restype = ctypes.c_int
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.restype = ctypes.c_int
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.fstatfs.restype = ctypes.c_int
_libc.fstatfs.argtypes = (ctypes.c_int, ctypes.c_void_p)

HUGETLBFS_MAGIC = 0x958458F6  # statfs(2) f_type of a hugetlbfs
TMPFS_MAGIC = 0x01021994  # ... of a tmpfs (/dev/shm)


def _raise_errno(call: str, detail: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{call}({detail}): {os.strerror(err)}")


def mmap(address: int, length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
    """mmap(2). Returns the mapped address; raises OSError with the call's errno."""
    result = _libc.mmap(address, length, prot, flags, fd, offset)
    if result is None or result == MAP_FAILED:
        _raise_errno("mmap", f"{address:#x}, {length:#x}, fd={fd}, offset={offset:#x}")
    return int(result)


def munmap(address: int, length: int) -> None:
    """munmap(2). Raises OSError on failure."""
    if _libc.munmap(address, length) != 0:
        _raise_errno("munmap", f"{address:#x}, {length:#x}")


def madvise(address: int, length: int, advice: int) -> None:
    """madvise(2). Raises OSError on failure."""
    if _libc.madvise(address, length, advice) != 0:
        _raise_errno("madvise", f"{address:#x}, {length:#x}, {advice}")


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """mount(2). Raises OSError on failure (EPERM without CAP_SYS_ADMIN)."""
    args = (os.fsencode(source), os.fsencode(target), fstype.encode(), flags, data.encode())
    if _libc.mount(*args) != 0:
        _raise_errno("mount", f"{source!r}, {target!r}, {fstype!r}, {flags:#x}, {data!r}")


def umount2(target: str, flags: int = 0) -> None:
    """umount2(2). Raises OSError on failure (EBUSY while a file in it is open or mapped)."""
    if _libc.umount2(os.fsencode(target), flags) != 0:
        _raise_errno("umount2", f"{target!r}, {flags:#x}")


def fstatfs_type(fd: int) -> int:
    """The filesystem type (statfs(2) ``f_type``, e.g. :data:`HUGETLBFS_MAGIC`) of ``fd``'s file.

    ``os.statvfs`` has no f_type. On x86-64 and arm64 ``struct statfs`` starts
    with it, a ``long``; 120 bytes hold the whole struct.
    """
    buf = ctypes.create_string_buffer(256)
    if _libc.fstatfs(fd, buf) != 0:
        _raise_errno("fstatfs", f"fd={fd}")
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def reserve(address: int, length: int) -> None:
    """Reserve ``[address, address+length)`` as PROT_NONE without replacing anything.

    Raises FileExistsError (EEXIST) when any byte of the range is already mapped,
    including on pre-4.17 kernels that return another address instead.
    """
    flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE
    got = mmap(address, length, PROT_NONE, flags)
    if got != address:
        munmap(got, length)
        raise FileExistsError(17, f"mmap: {address:#x} is taken (kernel placed it at {got:#x})")


def unreserve(address: int, length: int) -> None:
    """Turn a mapped range back into a PROT_NONE reservation (drops its pages)."""
    flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED
    mmap(address, length, PROT_NONE, flags)


def map_fixed(address: int, length: int, fd: int, offset: int, writable: bool = True) -> None:
    """Map ``fd`` at exactly ``address`` with MAP_SHARED|MAP_FIXED.

    Call it only inside a window made by :func:`reserve`: MAP_FIXED replaces.
    """
    prot = PROT_READ | (PROT_WRITE if writable else 0)
    got = mmap(address, length, prot, MAP_SHARED | MAP_FIXED, fd, offset)
    if got != address:  # MAP_FIXED never moves; this would be a libc or kernel bug
        raise OSError(22, f"mmap: asked for {address:#x}, got {got:#x}")


def populate(address: int, length: int, page_size: int) -> None:
    """Fault in every page of a shared writable mapping, or raise OSError.

    Uses MADV_POPULATE_WRITE so a page the pool cannot supply is an ENOMEM
    here rather than a SIGBUS later; older kernels (EINVAL) get a write to each
    page, which is what MAP_POPULATE would have done.
    """
    try:
        madvise(address, length, MADV_POPULATE_WRITE)
    except OSError as err:
        if err.errno != 22:
            raise
        view = (ctypes.c_ubyte * length).from_address(address)
        for offset in range(0, length, page_size):
            view[offset] = view[offset]


class _Byte(ctypes.Union):
    # An array of a one-byte Union exports buffer format "B"; an array of
    # c_ubyte exports "<B", for which memoryview refuses slice assignment.
    _fields_ = [("value", ctypes.c_ubyte)]


_ArrayType = type(ctypes.Array)


def byte_array_type(length: int, mixin: type = object) -> type:
    """A ctypes array type of ``length`` bytes, buffer format plain ``B``, with ``mixin`` as first base.

    Instances made with ``from_address`` export a writable buffer over
    existing memory without copying. The type is made directly rather than as
    ``_Byte * length``, which ctypes would also keep in its own, unbounded,
    cache of array types; the caller decides how many to keep.
    """
    bases = (ctypes.Array,) if mixin is object else (mixin, ctypes.Array)
    return _ArrayType("Zone", bases, {"_type_": _Byte, "_length_": length})  # type: ignore[misc, no-any-return]


def memory(address: int, length: int, keepalive: object) -> memoryview:
    """A writable memoryview (format ``B``) of ``length`` mapped bytes at ``address``; the view
    keeps ``keepalive`` (the mapping) alive. Touches nothing: the range may be larger than
    what is mapped, as long as only mapped bytes are read or written."""
    array = byte_array_type(length).from_address(address)  # type: ignore[attr-defined]
    array._mapping = keepalive
    return memoryview(array)


def zero(address: int, length: int) -> None:
    """Fill ``length`` mapped bytes at ``address`` with zeros (memset)."""
    ctypes.memset(address, 0, length)


_PFN_MASK = (1 << 55) - 1
_PRESENT = 1 << 63


def physical_addresses(address: int, length: int, page_size: int) -> list[int] | None:
    """Physical address of each ``page_size`` page of a mapped range.

    Returns None when pagemap is unreadable or hides PFNs (not CAP_SYS_ADMIN),
    or when a page is not present (it must have been populated first).
    """
    count = length // page_size
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    except OSError:
        return None
    try:
        return _read_pfns(fd, address, count, page_size)
    finally:
        os.close(fd)


def _read_pfns(fd: int, address: int, count: int, page_size: int) -> list[int] | None:
    step = page_size // PAGE_SIZE
    first = address // PAGE_SIZE
    # One read covers the whole range (for 2 MiB pages, 4 KiB of entries per
    # page, of which we use the first); a strided view picks those out in C.
    # Unpacking every entry instead costs ~18 ms per GiB.
    raw = os.pread(fd, 8 * ((count - 1) * step + 1), first * 8)
    entries = memoryview(raw).cast("Q")[::step].tolist()
    if len(entries) != count:
        return None
    result = []
    for entry in entries:
        pfn = entry & _PFN_MASK
        if not entry & _PRESENT or pfn == 0:
            return None
        result.append(pfn * PAGE_SIZE)
    return result


# -- SIGBUS on a file that shrank under its mapping ------------------------------------------
#
# Some facts about SIGBUS that the table's guard relies on:
#
# * A MAP_SHARED mapping of a file stays as long as it was made, whatever the file
#   does: when another process truncates the file, every touch of a page past its
#   new end raises SIGBUS (mmap(2), "Use of a mapped region can result in these
#   signals: SIGBUS ... that does not correspond to the file"). Its default action
#   kills the process, and Python cannot catch it: its own handler only sets a
#   flag and returns, so the faulting instruction runs again, forever.
# * A handler installed with SA_SIGINFO receives the faulting address (si_addr, at
#   offset 16 of siginfo_t on Linux). If it maps something readable at that page
#   (MAP_FIXED, anonymous: a page of zeros) and returns, the instruction runs again
#   and succeeds. The table's checks then see zeros and report TableCorrupt.
# * The fault is synchronous: the faulting thread is the one touching the mapping,
#   and for the table that is always Python code holding the GIL (mmap and
#   memoryview reads and writes hold it), so the handler can run Python (a ctypes
#   callback re-enters the interpreter on that thread as a C callback would).
# * A fault outside any guarded range is none of ours: the handler puts the
#   previous action back and returns, the fault repeats, and that action (a
#   faulthandler dump, the default) takes it. siginfo's si_code (offset 8) tells
#   a fault (> 0) from a SIGBUS sent by kill(2) (<= 0), which is raised again.

SIGBUS = 7
SA_SIGINFO = 0x4
MAP_ANONYMOUS_PRIVATE_FIXED = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED


class _SigAction(ctypes.Structure):
    # glibc's struct sigaction on x86-64 and arm64: handler, a 1024-bit sigset_t, flags, restorer
    _fields_ = [("handler", ctypes.c_void_p), ("mask", ctypes.c_ulong * 16), ("flags", ctypes.c_int),
                ("restorer", ctypes.c_void_p)]


# The handler's own calls go through PyDLL, which keeps the GIL: with CDLL another thread could
# run meanwhile (unmap the table, map something else at its address) under the faulting access.
_libc_gil = ctypes.PyDLL(None)
_libc_gil.mmap.restype = ctypes.c_void_p
_libc_gil.mmap.argtypes = _libc.mmap.argtypes
_libc_gil.sigaction.restype = ctypes.c_int
_libc_gil.sigaction.argtypes = (ctypes.c_int, ctypes.POINTER(_SigAction), ctypes.POINTER(_SigAction))
_raise = getattr(_libc_gil, "raise")
_raise.restype = ctypes.c_int
_raise.argtypes = (ctypes.c_int,)
_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_previous = _SigAction()
_installed: list[object] = []  # the installed handler's callback object
_callbacks: list[object] = []  # every callback ever installed, kept alive for good


class _PyBuffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


ctypes.pythonapi.PyObject_GetBuffer.argtypes = (ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int)
ctypes.pythonapi.PyObject_GetBuffer.restype = ctypes.c_int
ctypes.pythonapi.PyBuffer_Release.argtypes = (ctypes.POINTER(_PyBuffer),)
ctypes.pythonapi.PyBuffer_Release.restype = None


def buffer_address(buffer: object) -> int:
    """The address of the first byte of a buffer (an mmap, read-only or not), not kept exported."""
    try:
        probe = ctypes.c_char.from_buffer(buffer)  # type: ignore[arg-type]  # writable: the quick way
    except TypeError:
        pass
    else:
        address = ctypes.addressof(probe)
        del probe
        return address
    view = _PyBuffer()
    if ctypes.pythonapi.PyObject_GetBuffer(buffer, ctypes.byref(view), 0) != 0:  # PyBUF_SIMPLE
        raise BufferError("no buffer")
    try:
        return int(view.buf or 0)
    finally:
        ctypes.pythonapi.PyBuffer_Release(ctypes.byref(view))


def install_sigbus_handler(claim: Callable[[int], bool]) -> None:
    """Handle SIGBUS: ``claim(address)`` says whether a faulting address is one to repair; if it
    is, a page of zeros is mapped over the faulting page and the access goes on. Idempotent.

    Anything else goes back to the action that was there before: a fault repeats and meets
    it; a SIGBUS another process sent (si_code <= 0: kill(2), sigqueue(3)) is raised again.
    """
    if _installed:
        return

    def handler(signum: int, info: int | None, context: int | None) -> None:
        code = ctypes.c_int.from_address(info + 8).value if info else 0
        address = ctypes.c_void_p.from_address(info + 16).value if info and code > 0 else None
        try:
            claimed = address is not None and claim(address)
        except BaseException:  # noqa: BLE001 - nothing may escape a signal handler
            claimed = False
        if claimed:
            page = (address or 0) & ~(PAGE_SIZE - 1)
            if _libc_gil.mmap(page, PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_ANONYMOUS_PRIVATE_FIXED, -1, 0) == page:
                return
        _libc_gil.sigaction(SIGBUS, ctypes.byref(_previous), None)
        _installed.clear()  # a table opened later installs it again
        if code <= 0:
            _raise(SIGBUS)  # sent, not a fault: it would not come again by itself

    callback = _HANDLER(handler)
    action = _SigAction()
    action.handler = ctypes.cast(callback, ctypes.c_void_p)
    action.flags = SA_SIGINFO
    if _libc_gil.sigaction(SIGBUS, ctypes.byref(action), ctypes.byref(_previous)) != 0:
        _raise_errno("sigaction", "SIGBUS")
    _installed.append(callback)
    _callbacks.append(callback)  # never freed: a signal may be on its way to it


# -- robust process-shared mutexes and futexes (the channels' locks and waits) ----------------------
#
# A robust mutex (pthread_mutexattr_setrobust(3)) is released by the kernel when its holder dies:
# the thread's robust list, walked at its exit, marks the lock word OWNER_DIED and wakes a waiter,
# whose lock then returns EOWNERDEAD: it holds the mutex and must repair what the dead holder left
# half done, then call pthread_mutex_consistent. The lock word's low 30 bits are the holder's
# thread id (glibc's robust mutexes keep it there, which also makes a frozen holder nameable).
# Uncontended, lock and unlock are one atomic instruction each in libc; unlock is an exchange
# (a full barrier on x86-64), which the channels' wake-up protocol relies on.

MUTEX_SIZE = 64  # bytes given to a pthread_mutex_t (40 on x86-64 and aarch64 glibc)
EOWNERDEAD = 130
ENOTRECOVERABLE = 131
_CLOCK_MONOTONIC = 1
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(os.uname().machine, 202)
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.pthread_mutexattr_init.argtypes = (ctypes.c_void_p,)
_libc.pthread_mutexattr_setpshared.argtypes = (ctypes.c_void_p, ctypes.c_int)
_libc.pthread_mutexattr_setrobust.argtypes = (ctypes.c_void_p, ctypes.c_int)
_libc.pthread_mutexattr_destroy.argtypes = (ctypes.c_void_p,)
_libc.pthread_mutex_init.argtypes = (ctypes.c_void_p, ctypes.c_void_p)
_libc.pthread_mutex_consistent.argtypes = (ctypes.c_void_p,)
# A trylock, an unlock and a futex wake never block, so they go through PyDLL, which keeps the GIL
# (a trylock + unlock pair: 0.36 us against 0.51 us through CDLL, which lets the GIL go and takes
# it back around each call), and are called as they are, with no Python wrapper, for speed
mutex_trylock = _libc_gil.pthread_mutex_trylock  # (address) -> 0, EBUSY or EOWNERDEAD
mutex_trylock.argtypes = (ctypes.c_void_p,)
mutex_unlock = _libc_gil.pthread_mutex_unlock
mutex_unlock.argtypes = (ctypes.c_void_p,)
_clocklock = getattr(_libc, "pthread_mutex_clocklock", None)  # glibc 2.30+: a monotonic deadline
if _clocklock is not None:
    _clocklock.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(_Timespec))
_timedlock = _libc.pthread_mutex_timedlock
_timedlock.argtypes = (ctypes.c_void_p, ctypes.POINTER(_Timespec))
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def mutex_init(address: int) -> None:
    """Make a robust, process-shared mutex at ``address`` (MUTEX_SIZE bytes, zeroed)."""
    attr = ctypes.create_string_buffer(64)
    for call, args in ((_libc.pthread_mutexattr_init, ()), (_libc.pthread_mutexattr_setpshared, (1,)),
                       (_libc.pthread_mutexattr_setrobust, (1,))):
        err = call(attr, *args)
        if err:
            raise OSError(err, f"{call.__name__}: {os.strerror(err)}")
    try:
        err = _libc.pthread_mutex_init(address, attr)
        if err:
            raise OSError(err, f"pthread_mutex_init: {os.strerror(err)}")
    finally:
        _libc.pthread_mutexattr_destroy(attr)


def mutex_lock(address: int, timeout: float) -> int:
    """Lock the robust mutex at ``address``, waiting at most ``timeout`` seconds (in the kernel,
    woken by the unlock). 0, EOWNERDEAD (held now; repair, then :func:`mutex_consistent`),
    ETIMEDOUT, or ENOTRECOVERABLE."""
    err = mutex_trylock(address)
    if err != 16:  # not EBUSY
        return int(err)
    if _clocklock is not None:
        deadline = _deadline(time.monotonic() + timeout)
        return int(_clocklock(address, _CLOCK_MONOTONIC, ctypes.byref(deadline)))
    deadline = _deadline(time.time() + timeout)  # pragma: no cover
    return int(_timedlock(address, ctypes.byref(deadline)))  # pragma: no cover


def mutex_consistent(address: int) -> None:
    err = _libc.pthread_mutex_consistent(address)
    if err:
        raise OSError(err, f"pthread_mutex_consistent: {os.strerror(err)}")


def mutex_repaired(address: int, repair: Callable[[], _T]) -> _T:
    """For a lock that answered EOWNERDEAD (so it is held): ``repair()`` what the dead holder left
    half done, then mark the mutex consistent; what the repair returned. A repair that raises gives
    the lock back (consistent, and unlocked) before its error goes on: it must not keep the lock."""
    try:
        repaired = repair()
    except BaseException:
        mutex_consistent(address)
        mutex_unlock(address)
        raise
    mutex_consistent(address)
    return repaired


def mutex_holder(address: int) -> int:
    """The thread id holding the robust mutex at ``address`` (0: none), read off its lock word."""
    return ctypes.c_int.from_address(address).value & 0x3FFFFFFF


def futex_wait(address: int, expected: int, timeout: float | None) -> None:
    """Sleep while the 32-bit word at ``address`` holds ``expected``, at most ``timeout`` seconds
    (None: no limit), until a :func:`futex_wake` on it. Returns at once if the word differs;
    spurious returns happen: the caller re-checks what it waits for."""
    ts = None
    if timeout is not None:
        whole = int(max(timeout, 0.0))
        ts = ctypes.byref(_Timespec(whole, int((max(timeout, 0.0) - whole) * 1e9)))
    _syscall(_SYS_FUTEX, ctypes.c_void_p(address), _FUTEX_WAIT, ctypes.c_uint32(expected & 0xFFFFFFFF), ts, None, 0)


_wake_call = _libc_gil.syscall  # syscall(SYS_futex, address, FUTEX_WAKE, count): never blocks
_wake_call.restype = ctypes.c_long
_wake_call.argtypes = (ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_int)


def futex_wake(address: int, count: int = 0x7FFFFFFF) -> None:
    """Wake up to ``count`` waiters of the word at ``address``."""
    _wake_call(_SYS_FUTEX, address, _FUTEX_WAKE, count)


def _deadline(at: float) -> _Timespec:
    whole = int(at)
    return _Timespec(whole, int((at - whole) * 1e9))


