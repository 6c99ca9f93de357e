"""The GPU test's worker (``tests/test_cuda.py``): ``python cuda_copy.py PREFIX SIZE first|second``.

``first`` reserves a zone of SIZE bytes, fills it, registers the instance (``cuda_register``),
copies the zone to the GPU (median of 5, host-to-device GB/s), brings it back into pageable
memory and compares, times the same copy from that pageable memory, checks that a forked child
still reads the zone, and then, while still registered, runs ``second`` in another process, which
looks the zone up, registers it in its own address space and does the same. One JSON line out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy

import hugeshmd
from hugeshmd import _cudart

REPS = 5
MULTIPLIER = 2654435761


def main(prefix: str, size: int, role: str) -> dict[str, object]:
    runtime = _cudart.load()
    shm = hugeshmd.attach(prefix)
    zone = shm.reserve("gpu", size, align=2 << 20) if role == "first" else shm.lookup("gpu")
    host = zone.ndarray("uint64")
    if role == "first":
        host[:] = numpy.arange(host.size, dtype=numpy.uint64) * numpy.uint64(MULTIPLIER)
    t0 = time.perf_counter()
    registration = shm.cuda_register()
    out: dict[str, object] = {"register_s": time.perf_counter() - t0, "segments": len(registration.segments)}
    device = runtime.malloc(size)
    back = numpy.zeros(host.size, dtype=numpy.uint64)  # pageable memory: the baseline
    back[:] = 1  # its pages faulted in, as the zone's are

    def copy(source: int) -> float:
        runtime.synchronize()
        t0 = time.perf_counter()
        runtime.memcpy(device, source, size, _cudart.MEMCPY_HOST_TO_DEVICE)
        runtime.synchronize()
        return size / (time.perf_counter() - t0) / 1e9

    pinned = sorted(copy(zone.address) for _ in range(REPS))
    runtime.memcpy(back.ctypes.data, device, size, _cudart.MEMCPY_DEVICE_TO_HOST)
    out["same"] = bool((back == host).all())
    pageable = sorted(copy(back.ctypes.data) for _ in range(REPS))
    out.update(pinned=pinned[REPS // 2], pageable=pageable[REPS // 2])
    runtime.free(device)
    if role == "first":
        out["forked"] = _forked_child_reads(host)
        done = subprocess.run([sys.executable, __file__, prefix, str(size), "second"], capture_output=True,
                              text=True, timeout=240)
        out["second"] = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else done.stderr
    shm.close()
    return out


def _forked_child_reads(host: numpy.ndarray) -> int:
    """The exit status of a forked child (which makes no CUDA call) that reads the registered zone."""
    pid = os.fork()
    if pid == 0:
        os._exit(0 if int(host[12345]) == (12345 * MULTIPLIER) % 2**64 else 3)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]), sys.argv[3])))
