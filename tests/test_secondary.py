"""A real primary and real worker processes sharing memory at the same addresses."""

from __future__ import annotations

import pytest
from conftest import needs_hugepages, run_python

from hugeshmd.daemon.config import default_base_address

pytestmark = [needs_hugepages, pytest.mark.process]


def test_workers_see_identical_addresses_and_share_data(start_primary, prefix, workers):
    start_primary("--memory", "32M", "--huge-pages", "on")
    a, b = workers(), workers()
    seen_a, seen_b = a.ok("attach", prefix=prefix), b.ok("attach", prefix=prefix)
    assert seen_a == seen_b
    assert seen_a["segments"][0][0] == seen_a["base"] == default_base_address(prefix)
    assert seen_a["segments"][0][2].endswith(f"hugeshmd.{prefix}.seg0")

    zone = a.ok("reserve", name="frames", size=1 << 20)
    assert b.ok("lookup", name="frames") == zone
    a.ok("write", name="frames", offset=4096, hex="deadbeef")
    assert b.ok("read", name="frames", offset=4096, length=4)["hex"] == "deadbeef"
    b.ok("write", name="frames", offset=0, hex="0102")  # and back the other way, while both stay attached
    assert a.ok("read", name="frames", offset=0, length=2)["hex"] == "0102"


def test_zone_lifecycle_across_workers(start_primary, prefix, workers):
    start_primary("--memory", "8M", "--huge-pages", "on")
    a, b = workers(), workers()
    a.ok("attach", prefix=prefix)
    b.ok("attach", prefix=prefix)
    first = a.ok("reserve", name="z", size=3 << 20)
    assert b.call("reserve", name="z", size=10)["error"] == "AlreadyExists"
    assert b.call("reserve", name="huge", size=6 << 20)["error"] == "OutOfMemory"
    assert b.call("reserve", name="x" * 64, size=10)["error"] == "InvalidArgument"
    assert b.call("reserve", name="neg", size=-1)["error"] == "InvalidArgument"
    assert b.call("reserve", name="al", size=10, align=3)["error"] == "InvalidArgument"
    b.ok("free", name="z")
    assert a.call("lookup", name="z")["error"] == "NotFound"
    assert a.call("free", name="z")["error"] == "NotFound"
    # the freed run is reused, and now the large zone fits
    assert b.ok("reserve", name="huge", size=6 << 20)["address"] == first["address"]
    assert [z["name"] for z in a.ok("zones")["zones"]] == ["huge"]


def test_zone_iova_is_physical_for_hugepages(start_primary, prefix, workers):
    start_primary("--memory", "8M", "--huge-pages", "on")
    w = workers()
    w.ok("attach", prefix=prefix)
    zone = w.ok("reserve", name="dma", size=4096, align=2 << 20)
    assert zone["address"] % (2 << 20) == 0
    # running as root, pagemap gives real frame numbers: the iova is not the VA
    assert zone["iova"] != zone["address"] and zone["iova"] % (2 << 20) == 0


def test_numpy_array_shared_between_processes(start_primary, prefix, root):
    pytest.importorskip("numpy")
    start_primary("--memory", "16M", "--huge-pages", "on")
    writer = f"""
import hugeshmd, numpy
with hugeshmd.attach({prefix!r}) as shm:
    arr = shm.reserve("matrix", 8 * 1000 * 1000).ndarray("float64", (1000, 1000))
    arr[:] = numpy.arange(1e6).reshape(1000, 1000)
    del arr
"""
    reader = f"""
import hugeshmd
with hugeshmd.attach({prefix!r}) as shm:
    arr = shm.lookup("matrix").ndarray("float64", (1000, 1000))
    print(arr[999, 999], arr.sum())
    del arr
"""
    run_python(writer, root)
    out = run_python(reader, root).stdout
    assert out.split() == ["999999.0", str(sum(range(1000000)) * 1.0)]


def test_zone_memory_outlives_close_while_held_then_unmaps(start_primary, prefix, workers):
    start_primary("--memory", "8M", "--huge-pages", "on")
    w = workers()
    base = w.ok("attach", prefix=prefix)["base"]
    w.ok("reserve", name="kept", size=64)
    w.ok("write", name="kept", offset=0, hex="cafe")
    w.ok("hold", name="kept")
    w.ok("close")
    assert w.ok("read_held", length=2)["hex"] == "cafe"  # still mapped: no use-after-unmap
    assert w.ok("maps", base=base, size=1 << 36)["lines"]
    assert w.call("lookup", name="kept")["error"] == "HandleClosed"  # the Secondary itself is closed
    w.ok("drop_held")
    assert w.ok("maps", base=base, size=1 << 36)["lines"] == []  # last reference gone: window unmapped


def test_address_conflict_in_worker_is_reported_and_overwrites_nothing(start_primary, prefix, root):
    start_primary("--memory", "8M", "--huge-pages", "on")
    base = default_base_address(prefix)
    code = f"""
import ctypes, mmap, hugeshmd
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
addr = {base} + (5 << 20)   # inside the instance's window
got = libc.mmap(addr, 4096, 3, 0x22 | 0x100000, -1, 0)
assert got == addr, hex(got or 0)
ctypes.memmove(addr, b"mine", 4)
try:
    hugeshmd.attach({prefix!r})
except hugeshmd.AddressUnavailable as err:
    print("refused", err.address == {base}, any(l.startswith("{base + (5 << 20):x}-") for l in err.conflicts))
    print(str(err))
print(ctypes.string_at(addr, 4))
"""
    out = run_python(code, root).stdout.splitlines()
    assert out[0] == "refused True True"
    assert "--base-address" in out[1] and f"{base + (5 << 20):x}-{base + (5 << 20) + 4096:x}" in out[1]
    assert out[2] == "b'mine'"  # our own mapping was not overwritten


def test_primary_on_another_base_address(start_primary, prefix, workers):
    start_primary("--memory", "4M", "--huge-pages", "on", "--base-address", "0x200000000000", "--window", "1G")
    w = workers()
    attached = w.ok("attach", prefix=prefix)
    assert attached["base"] == 0x2000_0000_0000
    assert w.ok("maps", base=0x2000_0000_0000, size=1 << 30)["lines"][0].startswith("200000000000-")


def test_two_instances_side_by_side_one_worker_attaches_both(start_primary, prefix, root):
    a, b = prefix + "-a", prefix + "-b"
    explicit = [] if default_base_address(a) != default_base_address(b) else ["--base-address", "0x500000000000"]
    start_primary("--memory", "4M", "--huge-pages", "off", prefix_=a)
    start_primary("--memory", "4M", "--huge-pages", "off", *explicit, prefix_=b)
    code = f"""
import hugeshmd
sa, sb = hugeshmd.attach({a!r}), hugeshmd.attach({b!r})
za, zb = sa.reserve("same-name", 16), sb.reserve("same-name", 16)
za[0:1], zb[0:1] = b"A", b"B"
print(za.address != zb.address, bytes(sa.lookup("same-name")[0:1]), bytes(sb.lookup("same-name")[0:1]))
"""
    out = run_python(code, root).stdout
    assert out.split() == ["True", "b'A'", "b'B'"]


def test_threads_of_one_worker_never_commit_at_once(start_primary, prefix, root):
    # flock is per open file description: without the table's thread lock two
    # threads sharing the descriptor would both "hold" it and lose updates.
    start_primary("--memory", "64M", "--huge-pages", "off", "--max-zones", "4096")
    code = f"""
import threading, hugeshmd
shm = hugeshmd.attach({prefix!r})
def churn(t):
    for i in range(300):
        shm.reserve(f"{{t}}-{{i}}", 4096)
        if i % 3 == 0:
            shm.free(f"{{t}}-{{i}}")
threads = [threading.Thread(target=churn, args=(t,)) for t in range(4)]
for t in threads: t.start()
for t in threads: t.join()
zones = shm.zones
ends = sorted((z.address, z.address + z.size) for z in zones)
print(len(zones), all(a[1] <= b[0] for a, b in zip(ends, ends[1:])))
"""
    out = run_python(code, root).stdout
    assert out.split() == [str(4 * 200), "True"]  # every surviving zone there, none overlapping


def test_forked_child_shares_the_mapping_and_locks_on_its_own(start_primary, prefix, root):
    start_primary("--memory", "8M", "--huge-pages", "off")
    code = f"""
import os, hugeshmd
shm = hugeshmd.attach({prefix!r})
parent = shm.reserve("parent", 16)
parent[0:2] = b"pp"
pid = os.fork()
if pid == 0:
    child = shm.reserve("child", 16)       # commits through the child's own lock descriptor
    child[0:2] = b"cc"
    parent[2:4] = b"c!"                     # MAP_SHARED survives fork: the parent sees this
    os._exit(0 if shm._table._lock_fd != shm._table._fd else 3)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status), bytes(shm.lookup("child")[0:2]), bytes(parent[0:4]))
"""
    out = run_python(code, root).stdout
    assert out.split() == ["0", "b'cc'", "b'ppc!'"]


def test_one_secondary_shared_by_reading_and_writing_threads(start_primary, prefix, root):
    start_primary("--memory", "16M", "--huge-pages", "off", "--max-zones", "4096")
    code = f"""
import threading, time, hugeshmd
shm = hugeshmd.attach({prefix!r})
shm.reserve("fixed", 64)
errors, stop = [], time.monotonic() + 3
def reader():
    while time.monotonic() < stop:
        try:
            assert shm.lookup("fixed").size == 64
            shm.zones
        except Exception as err:
            errors.append(repr(err))
def writer(t):
    i = 0
    while time.monotonic() < stop:
        try:
            shm.reserve(f"w{{t}}-{{i}}", 4096)
            shm.free(f"w{{t}}-{{i}}")
        except Exception as err:
            errors.append(repr(err))
        i += 1
threads = [threading.Thread(target=reader) for _ in range(2)]
threads += [threading.Thread(target=writer, args=(t,)) for t in range(2)]
for t in threads: t.start()
for t in threads: t.join()
print(len(errors), errors[:3], [z.name for z in shm.zones])
"""
    out = run_python(code, root).stdout
    assert out.strip() == "0 [] ['fixed']"


def test_one_process_attaches_an_instance_twice_through_one_window(start_primary, prefix, root):
    start_primary("--memory", "8M", "--huge-pages", "off")
    code = f"""
import hugeshmd
with hugeshmd.attach({prefix!r}) as shm:
    zone = shm.reserve("frames", 64)            # still alive after the with block
    zone[0:2] = b"hi"
with hugeshmd.attach({prefix!r}) as again:     # the README's two snippets, in one process
    print(again.lookup("frames").address == zone.address, bytes(again.lookup("frames")[0:2]))
"""
    assert run_python(code, root).stdout.split() == ["True", "b'hi'"]


def test_a_zone_of_a_previous_primary_in_the_way_is_named_as_such(start_primary, prefix, root, workers):
    first = start_primary("--memory", "8M", "--huge-pages", "off")
    w = workers()
    w.ok("attach", prefix=prefix)
    w.ok("reserve", name="old", size=64)
    w.ok("hold", name="old")  # keeps the old instance's window mapped in the worker
    w.ok("close")
    first.stop()
    start_primary("--memory", "8M", "--huge-pages", "off")
    refused = w.call("attach", prefix=prefix)
    assert refused["error"] == "AddressUnavailable"
    assert "a window of this process for another instance (or a previous primary)" in refused["message"]
    w.ok("drop_held")
    assert "base" in w.ok("attach", prefix=prefix)  # once released, the new instance attaches
