"""Zero-copy views for PyTorch and Apache Arrow: ``.torch()`` and ``.arrow()`` of Zone, ReadOnlyZone
and Buffer (:mod:`hugeshmd.shm.interop`).

Pure tests of the views over plain memory, and of the error a missing library gives; process tests
where a write through a tensor in one worker is read through ``view()`` in another, and a write in
another worker is read through an Arrow buffer. Torch tests skip without torch (CI does not install
it: too large); Arrow tests skip without pyarrow, except in CI, which installs it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import struct
import sys
import warnings
from typing import Any

import pytest
from conftest import needs_hugepages, run_python

from hugeshmd import InvalidArgument, LibraryMissing
from hugeshmd.shm import interop

HUGE = ("--memory", "8M", "--huge-pages", "on")


def needs(module: str) -> None:
    """Skip without ``module``; in CI, pyarrow must be there (scripts/test installs it)."""
    if importlib.util.find_spec(module) is None:
        if module == "pyarrow" and os.environ.get("CI") == "true":
            pytest.fail("pyarrow is not installed, and CI installs it (scripts/test: the arrow extra)")
        pytest.skip(f"{module} is not installed (pip install 'hugeshmd[{interop.EXTRAS[module]}]')")


# -- pure: the views over plain memory -------------------------------------------------------------


def test_a_tensor_shares_the_memory_it_views() -> None:
    needs("torch")
    import torch

    memory = bytearray(64)
    view = memoryview(memory)
    t = interop.tensor(view, "m", "float32", (2, 8))
    assert (t.dtype, tuple(t.shape), t.data_ptr()) == (torch.float32, (2, 8), interop_address(view))
    t[1, 3] = 2.5
    assert struct.unpack_from("<f", memory, (8 + 3) * 4) == (2.5,)
    memory[0:4] = struct.pack("<f", -1.0)
    assert t[0, 0].item() == -1.0
    assert tuple(interop.tensor(view, "m", torch.int16, None).shape) == (32,)  # a torch.dtype, flat by default
    assert tuple(interop.tensor(view, "m", "uint8", 0).shape) == (0,)  # no elements: nothing to share


def interop_address(view: memoryview) -> int:
    from hugeshmd import _sys

    return _sys.buffer_address(view)


@pytest.mark.parametrize(("dtype", "shape", "needed"), [("float64", (3, 3), 72), ("int32", 17, 68)])
def test_a_tensor_shape_larger_than_the_memory_is_refused(dtype: str, shape: object, needed: int) -> None:
    needs("torch")
    with pytest.raises(InvalidArgument, match=f"needs {needed} bytes; zone 'small' has 64") as info:
        interop.tensor(memoryview(bytearray(64)), "small", dtype, shape)
    assert (info.value.name, info.value.size) == ("small", 64)


def test_a_bad_dtype_or_dimension_is_invalid_argument() -> None:
    needs("torch")
    view = memoryview(bytearray(64))
    with pytest.raises(InvalidArgument, match="dtype must be a torch.dtype"):
        interop.tensor(view, "m", "float99", None)
    with pytest.raises(InvalidArgument, match="negative dimension"):
        interop.tensor(view, "m", "uint8", (4, -1))


def test_a_tensor_over_read_only_memory_is_made_without_torchs_warning() -> None:
    needs("torch")
    view = memoryview(b"\x01\x02\x03\x04").toreadonly()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = interop.tensor(view, "ro", "uint8", None)
    assert t.tolist() == [1, 2, 3, 4] and caught == []


def test_an_arrow_buffer_views_the_memory_and_keeps_its_base() -> None:
    needs("pyarrow")
    memory = bytearray(b"hello, arrow")
    view = memoryview(memory)
    buffer = interop.arrow_buffer(interop_address(view), len(memory), view)
    del view
    memory[0:5] = b"HELLO"  # the same memory, not a copy
    assert (buffer.size, buffer.is_mutable, buffer.to_pybytes()) == (12, False, b"HELLO, arrow")


@pytest.mark.parametrize(("module", "extra", "call"), [
    ("torch", "torch", lambda: interop.tensor(memoryview(bytearray(8)), "m", "uint8", None)),
    ("pyarrow", "arrow", lambda: interop.arrow_buffer(0, 8, None)),
    ("numpy", "numpy", lambda: interop.require("numpy", ".ndarray()")),
])
def test_a_missing_library_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch, module: str, extra: str,
                                                       call: object) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: import raises ImportError
    with pytest.raises(LibraryMissing) as info:
        call()  # type: ignore[operator]
    err = info.value
    assert isinstance(err, ImportError) and (err.name, err.extra) == (module, extra)
    assert f"pip install 'hugeshmd[{extra}]'" in err.message


# -- process: the same memory in two workers ----------------------------------------------------------


def attached_worker(start_primary: Any, prefix: str, workers: Any) -> Any:
    """A primary of 8 MiB of hugepages and a worker attached to it (the other process)."""
    start_primary(*HUGE)
    other = workers()
    other.ok("attach", prefix=prefix)
    return other


@needs_hugepages
@pytest.mark.process
def test_a_write_through_a_zones_tensor_is_read_in_another_worker(start_primary, prefix, root, workers):
    needs("torch")
    other = attached_worker(start_primary, prefix, workers)
    zone = other.ok("reserve", name="frames", size=4096)
    other.ok("write", name="frames", offset=0, hex=struct.pack("<f", 1.5).hex())
    done = run_python(f"""
import gc, json, torch, hugeshmd
shm = hugeshmd.attach({prefix!r})
zone = shm.lookup("frames")
t = zone.torch("float32", (4, 8))
out = {{"ptr": t.data_ptr(), "shape": list(t.shape), "dtype": str(t.dtype), "first": t[0, 0].item(),
        "bytes": tuple(zone.torch().shape), "int16": tuple(zone.torch(torch.int16, 2048).shape)}}
t[1, 2] = 7.5
try:
    zone.torch("float32", (1025,))
except hugeshmd.InvalidArgument as err:
    out["refused"] = err.message
flat = zone.torch("float32")
del zone
shm.close()
gc.collect()
out["after_close"] = flat[10].item()  # the tensor keeps the memory mapped
print(json.dumps(out))
""", root)
    out = json.loads(done.stdout)
    assert out["ptr"] == zone["address"] and out["shape"] == [4, 8] and out["dtype"] == "torch.float32"
    assert out["first"] == 1.5 and out["bytes"] == [4096] and out["int16"] == [2048]
    assert out["refused"] == "shape (1025,) of torch.float32 needs 4100 bytes; zone 'frames' has 4096"
    assert out["after_close"] == 7.5
    assert other.ok("read", name="frames", offset=(8 + 2) * 4, length=4)["hex"] == struct.pack("<f", 7.5).hex()


@needs_hugepages
@pytest.mark.process
def test_a_write_through_a_buffers_tensor_is_read_in_another_worker(start_primary, prefix, root, workers):
    needs("torch")
    other = attached_worker(start_primary, prefix, workers)
    address = other.ok("alloc", size=256, hex="2a000000")["address"]
    done = run_python(f"""
import json, hugeshmd
shm = hugeshmd.attach({prefix!r})
buf = shm.buffer({address})
t = buf.torch("int32")
out = {{"ptr": t.data_ptr(), "shape": list(t.shape), "first": t[0].item()}}
t[3] = 123456
try:
    buf.torch("int32", (8, 9))
except hugeshmd.InvalidArgument as err:
    out["refused"] = err.size
print(json.dumps(out))
""", root)
    out = json.loads(done.stdout)
    assert out == {"ptr": address, "shape": [64], "first": 42, "refused": 256}
    expected = struct.pack("<iiii", 42, 0, 0, 123456).hex()
    assert other.ok("heap_read", address=address, length=16)["hex"] == expected


@needs_hugepages
@pytest.mark.process
def test_a_read_only_zones_tensor_reads_and_a_write_through_it_is_a_sigsegv(start_primary, prefix, root, workers):
    needs("torch")
    other = attached_worker(start_primary, prefix, workers)
    other.ok("reserve", name="ro", size=4096)
    other.ok("write", name="ro", offset=0, hex="0102030405")
    code = f"""
import json, warnings, hugeshmd
warnings.simplefilter("error")  # torch's warning about a read-only buffer would fail this
shm = hugeshmd.attach({prefix!r}, read_only=True)
t = shm.lookup("ro").torch("uint8", (5,))
print(json.dumps(t.tolist()), flush=True)
"""
    assert json.loads(run_python(code, root).stdout) == [1, 2, 3, 4, 5]
    died = run_python(code + "t[0] = 9\n", root, check=False)  # PROT_READ pages: as documented
    assert died.returncode == -signal.SIGSEGV, died.stderr
    assert other.ok("read", name="ro", offset=0, length=1)["hex"] == "01"


@needs_hugepages
@pytest.mark.process
def test_an_arrow_buffer_reads_what_another_worker_writes(start_primary, prefix, root, workers):
    needs("pyarrow")
    other = attached_worker(start_primary, prefix, workers)
    zone = other.ok("reserve", name="table", size=4096)
    address = other.ok("alloc", size=100, hex="68656c6c6f")["address"]
    done = run_python(f"""
import gc, json, subprocess, sys, pyarrow as pa, hugeshmd
shm = hugeshmd.attach({prefix!r})
zone = shm.lookup("table")
column = zone.arrow()
values = pa.Array.from_buffers(pa.int64(), 4, [None, column])  # an Arrow array over the zone
before = values.to_pylist()
write = ("import hugeshmd, struct; shm = hugeshmd.attach({prefix!r}); "
         "shm.lookup('table').view()[8:16] = struct.pack('<q', -77)")
subprocess.run([sys.executable, "-c", write], check=True)  # another process, through view()
buf = shm.buffer({address}).arrow()
out = {{"address": column.address, "size": column.size, "mutable": column.is_mutable, "before": before,
        "after": values.to_pylist(), "buffer": [buf.address, buf.size, buf.to_pybytes()[:5].decode()]}}
del zone
shm.close()
gc.collect()
out["after_close"] = values[1].as_py()  # the buffer keeps the memory mapped
print(json.dumps(out))
""", root)
    out = json.loads(done.stdout)
    assert (out["address"], out["size"], out["mutable"]) == (zone["address"], 4096, False)
    assert out["before"] == [0, 0, 0, 0] and out["after"] == [0, -77, 0, 0] and out["after_close"] == -77
    assert out["buffer"] == [address, 100, "hello"]


@needs_hugepages
@pytest.mark.process
def test_a_read_only_zones_arrow_buffer(start_primary, prefix, root, workers):
    needs("pyarrow")
    other = attached_worker(start_primary, prefix, workers)
    other.ok("reserve", name="ro", size=64)
    other.ok("write", name="ro", offset=0, hex="abcd")
    done = run_python(f"""
import hugeshmd
with hugeshmd.attach({prefix!r}, read_only=True) as shm:
    b = shm.lookup("ro").arrow()
    print(b.size, b.is_mutable, b.to_pybytes()[:2].hex())
""", root)
    assert done.stdout.split() == ["64", "False", "abcd"]
