"""cuda: copies between a GPU and a hugeshmd zone pinned with ``shm.cuda_register()``.

In one worker, against baselines of the same size measured in the same run and interleaved:

* host-to-device and device-to-host GB/s of a zone of 1 GiB (16 MiB quick) after
  ``cuda_register()`` (``cudaHostRegister`` of the instance's segment), against the same copy from
  ordinary pageable memory (a numpy array, its pages faulted in first) and from
  ``cudaMallocHost``'s own pinned memory; target: at least 5x pageable host-to-device (issue 11
  measured 49.9 against 4.7 GB/s on an H200, and 47.4 GB/s for cudaMallocHost).
* the registration itself: ``cuda_register()`` then ``cuda_unregister()``, against
  ``cudaMallocHost`` + ``cudaFreeHost`` of the same size (issue 11: 35 ms per GiB).

Each copy is timed alone (``cudaMemcpy`` between two ``cudaDeviceSynchronize``), median of the
repeats. Without libcudart or without a device (probed in a worker, so this process never
initialises CUDA) it reports ``skipped: no GPU`` as a note, and no figures.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from .common import HUGEPAGE, MiB, PrimaryProcess, hugepages_available, metric, run_worker, worker_reply

COPY_TARGET = 5.0  # registered zone / pageable, host-to-device


def run(quick: bool) -> dict[str, Any]:
    probe = run_worker(__name__, {"op": "probe"})
    if probe.get("skipped"):
        return {"name": "cuda", "params": {}, "notes": [f"skipped: no GPU ({probe['skipped']})"], "metrics": {},
                "skipped": "no GPU"}
    size = 16 * MiB if quick else 1024 * MiB
    repeats = 3 if quick else 9
    memory = size + 32 * MiB
    notes: list[str] = []
    with hugepages_available(HUGEPAGE, 0 if quick else memory // HUGEPAGE + 8, notes):
        with PrimaryProcess(memory, "try" if quick else "on") as primary:
            reply = run_worker(__name__, {"op": "copies", "prefix": primary.prefix, "root": primary.root,
                                          "size": size, "repeats": repeats}, timeout=600)
            if primary.mode == "fallback":
                notes.append("the primary ran in fallback mode: 4 KiB pages in /dev/shm")
    gbs = {"unit": "GB/s", "quick": quick}
    metrics = {
        "host-to-device, registered zone": metric(
            reply["h2d_zone"], baseline=reply["h2d_pageable"], baseline_name="pageable memory", target=COPY_TARGET,
            target_kind="min_ratio", **gbs),
        "device-to-host, registered zone": metric(reply["d2h_zone"], baseline=reply["d2h_pageable"],
                                                  baseline_name="pageable memory", **gbs),
        "host-to-device, cudaMallocHost": metric(reply["h2d_host"], baseline=reply["h2d_zone"],
                                                 baseline_name="registered zone", **gbs),
        "cuda_register + cuda_unregister": metric(reply["register"], baseline=reply["malloc_host"],
                                                  baseline_name="cudaMallocHost + cudaFreeHost", quick=quick),
    }
    return {"name": "cuda", "params": {"size": size, "repeats": repeats, "device": probe["device"],
                                       "libcudart": probe["path"], "runtime": probe["version"]},
            "notes": notes, "metrics": metrics, "details": reply}


# -- the worker ------------------------------------------------------------------------------------


def _probe() -> dict[str, Any]:
    from hugeshmd import CudaError, LibraryMissing, _cudart

    try:
        runtime = _cudart.load()
        devices = runtime.device_count()
    except (LibraryMissing, CudaError) as err:
        return {"skipped": err.message}
    if devices < 1:
        return {"skipped": f"libcudart ({runtime.path}) sees no device"}
    return {"device": runtime.get_device(), "devices": devices, "path": runtime.path, "version": runtime.version()}


def _copies(request: dict[str, Any]) -> dict[str, Any]:
    import numpy

    import hugeshmd
    from hugeshmd import _cudart

    size, repeats = request["size"], request["repeats"]
    runtime = _cudart.load()
    samples: dict[str, list[float]] = {k: [] for k in ("h2d_zone", "h2d_pageable", "h2d_host", "d2h_zone",
                                                       "d2h_pageable", "register", "malloc_host")}
    with hugeshmd.attach(request["prefix"], runtime_root=request["root"]) as shm:
        zone = shm.reserve("bench", size, align=2 * MiB)
        zone.ndarray()[:] = 1
        pageable = numpy.ones(size, dtype=numpy.uint8)  # its pages faulted in, as the zone's are
        host = runtime.malloc(size, host=True)
        device = runtime.malloc(size)
        shm.cuda_register()

        def rate(destination: int, source: int, kind: int) -> float:
            runtime.synchronize()
            t0 = time.perf_counter()
            runtime.memcpy(destination, source, size, kind)
            runtime.synchronize()
            return size / (time.perf_counter() - t0) / 1e9

        up, down = _cudart.MEMCPY_HOST_TO_DEVICE, _cudart.MEMCPY_DEVICE_TO_HOST
        for _ in range(repeats):  # interleaved: drift hits every figure alike
            samples["h2d_zone"].append(rate(device, zone.address, up))
            samples["h2d_pageable"].append(rate(device, pageable.ctypes.data, up))
            samples["h2d_host"].append(rate(device, host, up))
            samples["d2h_zone"].append(rate(zone.address, device, down))
            samples["d2h_pageable"].append(rate(pageable.ctypes.data, device, down))
        shm.cuda_unregister()
        for _ in range(repeats):
            t0 = time.perf_counter()
            shm.cuda_register()
            shm.cuda_unregister()
            samples["register"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            runtime.free(runtime.malloc(size, host=True), host=True)
            samples["malloc_host"].append(time.perf_counter() - t0)
        runtime.free(device)
        runtime.free(host, host=True)
        del zone
    return samples


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    request = json.loads(sys.argv[2])
    worker_reply(_probe() if request["op"] == "probe" else _copies(request))
