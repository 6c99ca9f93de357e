"""The CUDA runtime's binding: the libcudart calls hugeshmd makes, every prototype here, one check.

Beside :mod:`hugeshmd._sys`, the one other module that uses :mod:`ctypes`, and only on a path that
asks for a GPU: ``Secondary.cuda_register`` (and the GPU tests and benchmark) load it; ``import
hugeshmd`` never does, nor libcudart. No torch or CUDA Python package is needed.

Some facts about the CUDA runtime that pinning relies on (CUDA Runtime API, "Memory Management"):

* ``cudaHostRegister(ptr, size, flags)`` page-locks an existing range of this process's memory and
  registers it with CUDA, so that ``cudaMemcpy`` to or from it is a DMA straight from those pages
  instead of a copy through a pinned staging buffer: as fast as ``cudaHostAlloc``'s own memory.
  Any mapping the driver can pin will do, a hugetlbfs ``MAP_SHARED`` one included, and each
  process that maps the pages registers them in its own address space.
* A range stays registered until ``cudaHostUnregister(ptr)``, with the pointer that was
  registered; it must be unregistered before it is unmapped. Registering a range twice is
  ``cudaErrorHostMemoryAlreadyRegistered`` (712); unregistering one that is not registered,
  ``cudaErrorHostMemoryNotRegistered`` (713).
* Flags: ``Portable`` (1), pinned for every CUDA context of the process, not only the current
  device's; ``Mapped`` (2), also mapped into the devices' address space
  (``cudaHostGetDevicePointer``); ``ReadOnly`` (8, CUDA 11.1+), the device only reads it, which
  memory mapped ``PROT_READ`` needs (the driver would otherwise pin it for writing, and fail).
* The process's first call initialises the runtime. Without a driver it answers
  ``cudaErrorInsufficientDriver`` (35), without a device ``cudaErrorNoDevice`` (100);
  ``cudaGetErrorName`` and ``cudaGetErrorString`` work regardless (static strings).
* CUDA does not survive ``fork()``: a child of a process that used CUDA must not call it. The
  child's registrations are none (its parent's were of the parent's address space).
* Where libcudart is: a copy this process already loaded (torch's, CuPy's: sharing it shares
  the runtime), the dynamic loader's search (``LD_LIBRARY_PATH``, the ldconfig cache), the
  toolkit (``$CUDA_HOME``, ``$CUDA_PATH``, ``/usr/local/cuda``), and NVIDIA's pip wheels
  (``nvidia-cuda-runtime-cu12``: ``site-packages/nvidia/cuda_runtime/lib/libcudart.so.12``;
  ``nvidia-cuda-runtime`` 13: ``site-packages/nvidia/cu13/lib/libcudart.so.13``).
  ``$HUGESHMD_CUDART`` names one file and nothing else is tried.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable, Mapping

from .errors import CudaError, LibraryMissing

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["Runtime", "load", "candidates", "PROTOTYPES", "PORTABLE", "MAPPED", "READ_ONLY", "ENV"]

ENV = "HUGESHMD_CUDART"  # a path to libcudart: used alone, instead of searching
SONAMES = ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0")
WHEEL_DIRS = ("nvidia/cu13/lib", "nvidia/cuda_runtime/lib")  # under site-packages
INSTALL = ("pip install 'hugeshmd[cuda]' (nvidia-cuda-runtime-cu12), install the CUDA toolkit, "
           f"or set ${ENV} to libcudart's path; a GPU also needs NVIDIA's driver")

PORTABLE = 1  # cudaHostRegisterPortable
MAPPED = 2  # cudaHostRegisterMapped
READ_ONLY = 8  # cudaHostRegisterReadOnly
FLAG_NAMES = {PORTABLE: "Portable", MAPPED: "Mapped", 4: "IoMemory", READ_ONLY: "ReadOnly"}

MEMCPY_HOST_TO_DEVICE = 1  # cudaMemcpyKind
MEMCPY_DEVICE_TO_HOST = 2

_int, _ptr, _size, _uint = ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint
_f = ctypes.CFUNCTYPE
# cudaError_t is an enum: int. Strings come back as addresses (a Python double cannot return a char*).
PROTOTYPES: dict[str, Any] = {
    "cudaHostRegister": _f(_int, _ptr, _size, _uint),
    "cudaHostUnregister": _f(_int, _ptr),
    "cudaGetErrorName": _f(_ptr, _int),
    "cudaGetErrorString": _f(_ptr, _int),
    "cudaGetDeviceCount": _f(_int, ctypes.POINTER(_int)),
    "cudaGetDevice": _f(_int, ctypes.POINTER(_int)),
    "cudaSetDevice": _f(_int, _int),
    "cudaRuntimeGetVersion": _f(_int, ctypes.POINTER(_int)),
    "cudaMalloc": _f(_int, ctypes.POINTER(_ptr), _size),
    "cudaFree": _f(_int, _ptr),
    "cudaMallocHost": _f(_int, ctypes.POINTER(_ptr), _size),
    "cudaFreeHost": _f(_int, _ptr),
    "cudaMemcpy": _f(_int, _ptr, _ptr, _size, _int),
    "cudaDeviceSynchronize": _f(_int),
}


def flag_names(flags: int) -> str:
    """``Portable|Mapped`` for 3."""
    return "|".join(name for bit, name in FLAG_NAMES.items() if flags & bit) or "Default"


class Runtime:
    """libcudart's calls, each checked: a nonzero ``cudaError_t`` is a :class:`CudaError` naming the
    call, the error's name and ``cudaGetErrorString``'s text.

    ``library`` is libcudart as loaded (:func:`load`), or, on a machine without a GPU, a test
    double: Python callables by function name, called through the same C prototypes.
    """

    def __init__(self, library: ctypes.CDLL | Mapping[str, Callable[..., Any]], path: str) -> None:
        self.path = path
        self._call: dict[str, Any] = {}
        for name, prototype in PROTOTYPES.items():
            if isinstance(library, ctypes.CDLL):
                self._call[name] = prototype((name, library))
            elif name in library:
                self._call[name] = prototype(library[name])

    def describe(self, code: int) -> str:
        """``cudaErrorNoDevice (100): no CUDA-capable device is detected``."""
        name = ctypes.string_at(self._call["cudaGetErrorName"](code)).decode(errors="replace")
        text = ctypes.string_at(self._call["cudaGetErrorString"](code)).decode(errors="replace")
        return f"{name} ({code}): {text}"

    def check(self, code: int, call: str, **fields: Any) -> None:
        if code != 0:
            raise CudaError(f"{call} failed: {self.describe(code)} (libcudart: {self.path})", cuda_error=code,
                            **fields)

    def host_register(self, address: int, size: int, flags: int, segment: int | None = None) -> None:
        code = self._call["cudaHostRegister"](address, size, flags)
        self.check(code, _about("cudaHostRegister", address, size, segment) + f" with flags {flag_names(flags)}",
                   segment=segment, address=address, size=size)

    def host_unregister(self, address: int, size: int | None = None, segment: int | None = None) -> None:
        code = self._call["cudaHostUnregister"](address)
        self.check(code, _about("cudaHostUnregister", address, size, segment), segment=segment, address=address,
                   size=size)

    def _int_out(self, call: str, *args: int) -> int:
        out = _int(-1)
        self.check(self._call[call](*args, ctypes.byref(out)), call)
        return out.value

    def device_count(self) -> int:
        return self._int_out("cudaGetDeviceCount")

    def get_device(self) -> int:
        return self._int_out("cudaGetDevice")

    def set_device(self, device: int) -> None:
        self.check(self._call["cudaSetDevice"](device), f"cudaSetDevice({device})")

    def version(self) -> int:
        """The runtime's version, as 1000 * major + 10 * minor (13000 for 13.0)."""
        return self._int_out("cudaRuntimeGetVersion")

    # -- what the GPU tests and the benchmark use ----------------------------------------------

    def malloc(self, size: int, host: bool = False) -> int:
        """``size`` bytes of device memory (or, with ``host``, of cudaMallocHost's pinned memory)."""
        out = _ptr()
        call = "cudaMallocHost" if host else "cudaMalloc"
        self.check(self._call[call](ctypes.byref(out), size), f"{call}({size})", size=size)
        return int(out.value or 0)

    def free(self, address: int, host: bool = False) -> None:
        call = "cudaFreeHost" if host else "cudaFree"
        self.check(self._call[call](address), f"{call}({address:#x})", address=address)

    def memcpy(self, destination: int, source: int, size: int, kind: int) -> None:
        self.check(self._call["cudaMemcpy"](destination, source, size, kind),
                   f"cudaMemcpy({destination:#x}, {source:#x}, {size}, {kind})", size=size)

    def synchronize(self) -> None:
        self.check(self._call["cudaDeviceSynchronize"](), "cudaDeviceSynchronize")


def _about(call: str, address: int, size: int | None, segment: int | None) -> str:
    where = f"[{address:#x}, +{size:#x})" if size is not None else f"{address:#x}"
    return f"{call} of segment {segment} {where}" if segment is not None else f"{call} of {where}"


def candidates(environ: Mapping[str, str] = os.environ, maps: str = "/proc/self/maps") -> list[str]:
    """Where libcudart may be, in the order tried (see the module's notes): file paths and sonames."""
    explicit = environ.get(ENV)
    if explicit:
        return [explicit]
    found = _already_loaded(maps) + list(SONAMES)
    for home in (environ.get("CUDA_HOME"), environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            found += [os.path.join(home, lib, "libcudart.so") for lib in ("lib64", "lib")]
    for site in sys.path:
        for sub in WHEEL_DIRS:
            directory = os.path.join(site or ".", sub)
            if os.path.isdir(directory):
                found += sorted((os.path.join(directory, n) for n in os.listdir(directory)
                                 if n.startswith("libcudart.so")), reverse=True)
    return list(dict.fromkeys(found))


def _already_loaded(maps: str) -> list[str]:
    """libcudart files mapped in this process (torch's is named like ``libcudart-1a2b3c4d.so.12``)."""
    try:
        with open(maps) as lines:
            paths = [line.split()[-1] for line in lines if "/libcudart" in line]
    except OSError:
        return []
    return list(dict.fromkeys(p for p in paths if ".so" in os.path.basename(p)))


_loaded: dict[str, Runtime] = {}  # by the path asked for ("" for the search): loaded once per process


def load(path: str | None = None) -> Runtime:
    """libcudart: ``path`` if given, else the first of :func:`candidates` that loads; loaded once.

    Raises LibraryMissing naming every place tried (``path``) and what to install. Loading needs
    no driver or GPU: those show as a CudaError at the first real call.
    """
    key = path or ""
    runtime = _loaded.get(key)
    if runtime is None:
        tried = [path] if path else candidates()
        failures = []
        for candidate in tried:
            try:
                library = ctypes.CDLL(candidate)
            except OSError as err:
                failures.append(f"{candidate}: {err}")
                continue
            runtime = _loaded[key] = Runtime(library, _file_of(library, candidate))
            break
        else:
            raise LibraryMissing(f"the CUDA runtime (libcudart) could not be loaded; {INSTALL}. Tried: "
                                 + "; ".join(failures), name="libcudart", path="; ".join(tried), extra="cuda")
    return runtime


def _file_of(library: ctypes.CDLL, name: str) -> str:
    """The file a loaded library came from (dlinfo would say; /proc/self/maps does too)."""
    loaded = _already_loaded("/proc/self/maps")
    base = os.path.basename(name)
    return next((p for p in loaded if os.path.basename(p).startswith(base)), loaded[0] if loaded else name)
