"""A test double of libcudart, for machines without a GPU (this project's CI): Python callables
with the C signatures of the calls hugeshmd makes, handed to :class:`hugeshmd._cudart.Runtime`,
which calls them through the same ctypes prototypes as the real library. Everything above the
prototypes (the Runtime's checks, the registration, the window's hooks) is the real code.

What it checks, as the driver would: a range registered is mapped readable for its whole length
(writable too, unless the ReadOnly flag is given), is not registered already (712), and is still
mapped when it is unregistered (the real driver's pins would outlive an munmap). What it cannot
check: the DMA itself; ``tests/test_cuda.py``'s GPU tests do that on a machine with a GPU.
"""

from __future__ import annotations

import ctypes
import json
import os
from typing import Any

from hugeshmd import _cudart

SUCCESS, INVALID_VALUE, MEMORY_ALLOCATION, ALREADY_REGISTERED, NOT_REGISTERED = 0, 1, 2, 712, 713
NAMES = {SUCCESS: "cudaSuccess", INVALID_VALUE: "cudaErrorInvalidValue", MEMORY_ALLOCATION: "cudaErrorMemoryAllocation",
         ALREADY_REGISTERED: "cudaErrorHostMemoryAlreadyRegistered", NOT_REGISTERED: "cudaErrorHostMemoryNotRegistered"}
TEXTS = {SUCCESS: "no error", INVALID_VALUE: "invalid argument", MEMORY_ALLOCATION: "out of memory",
         ALREADY_REGISTERED: "part or all of the requested memory range is already mapped",
         NOT_REGISTERED: "pointer does not correspond to a registered memory region"}


def mapping_of(address: int, size: int) -> str | None:
    """The permissions ("rw-s") of the mappings covering ``[address, address + size)`` if one
    accessible run covers it all (a PROT_NONE reservation does not count), else None."""
    end, perms = address, set()
    with open("/proc/self/maps") as lines:
        rows = sorted((int(a, 16), int(b, 16), p) for a, b, p in
                      (line.split()[0].split("-") + [line.split()[1]] for line in lines))
    for start, stop, p in rows:
        if start <= end < stop and not p.startswith("---"):
            perms.add(p)
            end = stop
        if end >= address + size:
            return "".join(sorted(perms))
    return None


class FakeCudart:
    """The double's state: ``registered`` (address -> (size, flags)), every ``calls`` made, and
    ``refuse``: an error code to answer the next registrations with (``refuse_after`` lets that
    many through first)."""

    def __init__(self) -> None:
        self.registered: dict[int, tuple[int, int]] = {}
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.violations: list[str] = []  # what the real driver would not have taken
        self.refuse = 0
        self.refuse_after = 0
        self._strings = {code: (ctypes.create_string_buffer(NAMES[code].encode()),
                                ctypes.create_string_buffer(TEXTS[code].encode())) for code in NAMES}
        self.device = 0
        functions = {
            "cudaHostRegister": self.host_register, "cudaHostUnregister": self.host_unregister,
            "cudaGetErrorName": lambda code: ctypes.addressof(self._strings.get(code, self._strings[1])[0]),
            "cudaGetErrorString": lambda code: ctypes.addressof(self._strings.get(code, self._strings[1])[1]),
            "cudaGetDevice": self.get_device, "cudaSetDevice": self.set_device,
            "cudaGetDeviceCount": self.get_device_count,
        }
        self.runtime = _cudart.Runtime(functions, "fake libcudart (a test double: no GPU here)")

    def host_register(self, address: int | None, size: int, flags: int) -> int:
        self.calls.append(("cudaHostRegister", (address, size, flags)))
        if self.refuse and self.refuse_after <= 0:
            return self.refuse
        self.refuse_after -= 1
        perms = mapping_of(address or 0, size)
        if perms is None or ("w" not in perms and not flags & _cudart.READ_ONLY):
            self.violations.append(f"register of {address:#x}+{size:#x}: mapped {perms}")
            return INVALID_VALUE
        if any(a < (address or 0) + size and (address or 0) < a + n for a, (n, _) in self.registered.items()):
            return ALREADY_REGISTERED
        self.registered[address or 0] = (size, flags)
        return SUCCESS

    def host_unregister(self, address: int | None) -> int:
        self.calls.append(("cudaHostUnregister", (address,)))
        found = self.registered.pop(address or 0, None)
        if found is None:
            return NOT_REGISTERED
        if mapping_of(address or 0, found[0]) is None:
            self.violations.append(f"unregister of {address:#x}+{found[0]:#x} after it was unmapped")
        return SUCCESS

    def get_device(self, out: Any) -> int:
        self.calls.append(("cudaGetDevice", ()))
        out[0] = self.device
        return SUCCESS

    def set_device(self, device: int) -> int:
        self.calls.append(("cudaSetDevice", (device,)))
        self.device = device
        return SUCCESS

    def get_device_count(self, out: Any) -> int:
        out[0] = 1
        return SUCCESS

    def install(self) -> FakeCudart:
        """Make this double the libcudart that :func:`hugeshmd._cudart.load` gives, in this process."""
        _cudart.load = lambda path=None: self.runtime  # type: ignore[assignment]
        return self

    def report(self) -> str:
        """The state as a JSON line (for a worker process to print)."""
        return json.dumps({"registered": {str(a): list(v) for a, v in self.registered.items()},
                           "calls": [[n, list(a)] for n, a in self.calls], "violations": self.violations,
                           "pid": os.getpid()})
