"""Pinned for GPU DMA: ``shm.cuda_register()`` and the libcudart binding.

Three kinds of test. Pure ones of the binding (:mod:`hugeshmd._cudart`): where it looks, what a
missing library says, how an error code is worded. Process tests with a real primary and a test
double of libcudart (``tests/fake_cudart.py``: Python callables behind the real ctypes
prototypes; this machine has no GPU): every segment registered, growth followed, unregistered
before an unmap and at close, refusals, sharing, fork; plus the real libcudart where one is
installed but no GPU is (its real error). And GPU tests (marker ``gpu``), skipped unless
libcudart loads and a device answers: a registered zone copied to the GPU and back, and the
speed against pageable memory.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import HERE, free_hugepages, needs_hugepages, run_python

from hugeshmd import CudaError, LibraryMissing, _cudart

HUGE = ("--memory", "32M", "--huge-pages", "on")
PRELUDE = f"""
import json, os, subprocess, sys, warnings
sys.path.insert(0, {str(HERE)!r})
import hugeshmd
from hugeshmd import _cudart
from fake_cudart import FakeCudart
fake = FakeCudart().install()
def segments(shm):
    return sorted([s.address, s.length] for s in shm.segments)
def registered():
    return sorted([a, n] for a, (n, _) in fake.registered.items())
"""


PROBE = """
import json
from hugeshmd import _cudart, CudaError
try:
    runtime = _cudart.load()
    print(json.dumps({"devices": runtime.device_count(), "path": runtime.path}))
except CudaError as err:
    print(json.dumps({"devices": -1, "error": err.cuda_error, "message": err.message}))
except ImportError:
    print(json.dumps({"devices": None}))
"""


def in_worker(code: str, root: str) -> dict[str, Any]:
    """Run ``code`` (after PRELUDE: a FakeCudart installed) in a worker; the JSON it printed last."""
    done = run_python(PRELUDE + textwrap.dedent(code), root)
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# -- the binding, pure ---------------------------------------------------------------------------


def test_a_library_that_is_not_there_is_library_missing_naming_where_and_what_to_install() -> None:
    with pytest.raises(LibraryMissing) as info:
        _cudart.load("/nonexistent/libcudart.so.12")
    err = info.value
    assert isinstance(err, ImportError)
    assert (err.name, err.path, err.extra) == ("libcudart", "/nonexistent/libcudart.so.12", "cuda")
    assert "hugeshmd[cuda]" in err.message and _cudart.ENV in err.message
    assert "/nonexistent/libcudart.so.12: " in err.message  # and why that one failed


def test_the_environment_variable_names_the_one_file_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _cudart.candidates({_cudart.ENV: "/opt/x/libcudart.so.12"}) == ["/opt/x/libcudart.so.12"]
    monkeypatch.setenv(_cudart.ENV, "/nonexistent/libcudart.so")
    with pytest.raises(LibraryMissing) as info:
        _cudart.load()
    assert info.value.path == "/nonexistent/libcudart.so"


def test_the_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f10 r-xp 00000000 08:01 12 /opt/torch/lib/libcudart-a1b2.so.12\n"
                    "7f10-7f20 r-xp 00000000 08:01 13 /usr/lib/libc.so.6\n")
    wheels = tmp_path / "site"
    for sub, name in (("nvidia/cu13/lib", "libcudart.so.13"), ("nvidia/cuda_runtime/lib", "libcudart.so.12")):
        (wheels / sub).mkdir(parents=True)
        (wheels / sub / name).write_bytes(b"")
    monkeypatch.setattr("sys.path", [str(wheels)])
    found = _cudart.candidates({"CUDA_HOME": "/opt/cuda-12"}, str(maps))
    assert found[0] == "/opt/torch/lib/libcudart-a1b2.so.12"  # one this process loaded: share its runtime
    assert found[1: 1 + len(_cudart.SONAMES)] == list(_cudart.SONAMES)  # then the loader's own search
    assert found.index("/opt/cuda-12/lib64/libcudart.so") < found.index("/usr/local/cuda/lib64/libcudart.so")
    assert found[-2:] == [str(wheels / "nvidia/cu13/lib/libcudart.so.13"),
                          str(wheels / "nvidia/cuda_runtime/lib/libcudart.so.12")]


def test_an_error_code_is_worded_by_the_library_and_names_the_segment() -> None:
    from fake_cudart import FakeCudart

    fake = FakeCudart()
    fake.refuse = 2
    with pytest.raises(CudaError) as info:
        fake.runtime.host_register(0x100000000000, 64 << 20, _cudart.PORTABLE | _cudart.MAPPED, segment=3)
    err = info.value
    assert err.fields == {"cuda_error": 2, "segment": 3, "address": 0x100000000000, "size": 64 << 20}
    assert err.message == ("cudaHostRegister of segment 3 [0x100000000000, +0x4000000) with flags Portable|Mapped "
                           "failed: cudaErrorMemoryAllocation (2): out of memory "
                           "(libcudart: fake libcudart (a test double: no GPU here))")
    assert fake.calls == [("cudaHostRegister", (0x100000000000, 64 << 20, 3))]  # through the C prototype


def test_the_double_behaves_as_the_driver_on_what_it_can_check() -> None:
    from fake_cudart import ALREADY_REGISTERED, NOT_REGISTERED, FakeCudart

    fake = FakeCudart()
    buffer = bytearray(1 << 16)
    address = _cudart_address(buffer)
    fake.runtime.host_register(address, len(buffer), _cudart.PORTABLE)
    with pytest.raises(CudaError) as twice:
        fake.runtime.host_register(address, len(buffer), _cudart.PORTABLE)
    assert twice.value.cuda_error == ALREADY_REGISTERED
    fake.runtime.host_unregister(address)
    with pytest.raises(CudaError) as again:
        fake.runtime.host_unregister(address)
    assert again.value.cuda_error == NOT_REGISTERED
    with pytest.raises(CudaError):  # the PROT_NONE page at 0 is not memory one can pin
        fake.runtime.host_register(4096, 4096, 0)


def _cudart_address(buffer: bytearray) -> int:
    from hugeshmd import _sys

    return _sys.buffer_address(buffer)


# -- shm.cuda_register with the double, real primary -----------------------------------------------


@needs_hugepages
@pytest.mark.process
def test_every_segment_is_registered_then_unregistered_at_close_while_still_mapped(start_primary, prefix, root):
    start_primary(*HUGE)
    out = in_worker(f"""
        shm = hugeshmd.attach({prefix!r})
        zone = shm.reserve("frames", 1 << 20)
        reg = shm.cuda_register()
        again = shm.cuda_register()  # idempotent: nothing registered twice
        mine = {{"segments": segments(shm), "registered": registered(), "same": again is reg,
                "flags": sorted(f for _, f in fake.registered.values()),
                "reg": sorted(map(list, reg.segments.values())), "bytes": reg.registered_bytes,
                "library": reg.library}}
        shm.close()
        memoryview(zone)[:2] = b"ok"  # the zone stays mapped and usable after close: only not pinned
        mine.update(after_close=registered(), violations=fake.violations, calls=[c[0] for c in fake.calls])
        print(json.dumps(mine))
    """, root)
    assert out["registered"] == out["segments"] == out["reg"] and len(out["segments"]) == 1
    assert out["bytes"] == 32 << 20 and out["same"]
    assert out["flags"] == [_cudart.PORTABLE | _cudart.MAPPED]
    assert out["library"].startswith("fake libcudart")
    assert out["after_close"] == [] and out["violations"] == []
    assert out["calls"] == ["cudaHostRegister", "cudaHostUnregister"]


@needs_hugepages
@pytest.mark.process
def test_registration_follows_growth_by_this_worker_another_and_the_heap(start_primary, prefix, root):
    start_primary("--memory", "32M", "--max-memory", "160M", "--huge-pages", "on")
    out = in_worker(f"""
        shm = hugeshmd.attach({prefix!r})
        shm.cuda_register()
        seen = [registered()]
        shm.grow(32 << 20)  # this worker asks: the primary maps a segment, this worker maps it at once
        seen.append(registered())
        subprocess.run([sys.executable, "-m", "hugeshmd", "grow", "32M", "--prefix", {prefix!r}, "--runtime-root",
                        {root!r}], check=True, capture_output=True)  # another process grows it
        seen.append(registered())  # nothing mapped yet: this worker meets the segment at its next call,
        segments(shm)  # such as this one
        seen.append(registered())
        # a third worker fills the instance: the heap grows it, and hands over an address in the new segment
        code = ("import hugeshmd; shm = hugeshmd.attach({prefix!r}); "
                "bufs = [shm.alloc(1 << 20) for _ in range(100)]; [b.disown() for b in bufs]; "
                "print(bufs[-1].address)")
        address = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                     text=True).stdout)
        before = registered()
        buf = shm.buffer(address)  # the heap maps the segment on meeting the address
        buf.view()[:1] = b"x"
        seen.append(registered())
        print(json.dumps({{"seen": seen, "segments": segments(shm), "before": before,
                          "violations": fake.violations}}))
        shm.close()
        assert fake.registered == {{}}, fake.registered
    """, root)
    seen = out["seen"]
    assert [len(s) for s in seen] == [1, 2, 2, 3, 4]
    assert len(out["before"]) == 3 and seen[-1] == out["segments"]
    assert out["violations"] == []


@needs_hugepages
@pytest.mark.process
def test_a_segment_is_unregistered_before_it_is_unmapped(start_primary, prefix, root):
    """Workers unmap a segment when the table drops it, or when their window goes: both go through
    the window, whose watchers are told first (driven here directly: the primary never drops one)."""
    start_primary("--memory", "32M", "--max-memory", "96M", "--huge-pages", "on")
    out = in_worker(f"""
        shm = hugeshmd.attach({prefix!r})
        grown = shm.grow(32 << 20)
        reg = shm.cuda_register()
        window = shm._window
        window.unmap(grown.id)  # as _apply_segments does for a segment the table no longer has
        one = registered()
        window.release()  # as the last Zone's going does
        shm.close()
        print(json.dumps({{"one": one, "left": registered(), "kept": sorted(map(list, reg.segments.values())),
                          "violations": fake.violations, "calls": [c[0] for c in fake.calls]}}))
    """, root)
    assert len(out["one"]) == 1 and out["left"] == [] and out["kept"] == []
    assert out["violations"] == []  # each unregistered while still mapped
    assert out["calls"] == ["cudaHostRegister"] * 2 + ["cudaHostUnregister"] * 2


@needs_hugepages
@pytest.mark.process
def test_a_refused_registration_leaves_nothing_registered_and_says_why(start_primary, prefix, root):
    start_primary("--memory", "32M", "--max-memory", "96M", "--huge-pages", "on")
    out = in_worker(f"""
        shm = hugeshmd.attach({prefix!r})
        shm.grow(32 << 20)
        fake.refuse, fake.refuse_after = 2, 1  # the second segment: out of memory (a locked-memory limit, say)
        try:
            shm.cuda_register()
        except hugeshmd.CudaError as err:
            refused = {{"message": err.message, "fields": err.fields}}
        print(json.dumps({{"refused": refused, "left": registered(), "segments": segments(shm)}}))
    """, root)
    assert out["left"] == []
    second = out["segments"][1]
    assert out["refused"]["fields"] == {"cuda_error": 2, "segment": 1, "address": second[0], "size": second[1]}
    assert "cudaHostRegister of segment 1" in out["refused"]["message"]
    assert "cudaErrorMemoryAllocation (2): out of memory" in out["refused"]["message"]


@needs_hugepages
@pytest.mark.process
def test_a_grown_segment_cuda_refuses_is_mapped_warned_of_and_retried(start_primary, prefix, root):
    start_primary("--memory", "32M", "--max-memory", "96M", "--huge-pages", "on")
    out = in_worker(f"""
        shm = hugeshmd.attach({prefix!r})
        shm.reserve("first", 32 << 20)  # fills segment 0
        reg = shm.cuda_register()
        fake.refuse = 2
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            grown = shm.grow(32 << 20)  # the grow itself succeeds: the segment is mapped, not pinned
        memoryview(shm.reserve("late", 32 << 20))[:1] = b"x"  # and usable
        failures = sorted(reg.failures)
        try:
            shm.cuda_register()
            still = None
        except hugeshmd.CudaError as err:
            still = err.segment
        fake.refuse = 0
        shm.cuda_register()
        print(json.dumps({{"warned": [str(w.message) for w in caught], "failures": failures, "still": still,
                          "grown": grown.id, "now": registered(), "segments": segments(shm),
                          "left": sorted(reg.failures)}}))
    """, root)
    assert out["failures"] == [out["grown"]] == [out["still"]]
    assert len(out["warned"]) == 1 and "mapped but not pinned" in out["warned"][0]
    assert out["now"] == out["segments"] and len(out["now"]) == 2 and out["left"] == []


@needs_hugepages
@pytest.mark.process
def test_secondaries_of_one_process_share_the_registration_and_the_last_unregisters(start_primary, prefix, root):
    start_primary(*HUGE)
    out = in_worker(f"""
        a, b = hugeshmd.attach({prefix!r}), hugeshmd.attach({prefix!r})  # one window, mapped once
        ra, rb = a.cuda_register(), b.cuda_register()
        shared = ra is rb and len(fake.registered) == 1
        a.close()
        after_a = registered()
        b.cuda_unregister()
        b.cuda_unregister()  # idempotent
        after_b = registered()
        rb2 = b.cuda_register()  # and again, afresh
        again = registered()
        b.close()
        print(json.dumps({{"shared": shared, "after_a": after_a, "after_b": after_b, "again": again,
                          "fresh": rb2 is not rb, "end": registered(), "violations": fake.violations}}))
    """, root)
    assert out["shared"] and len(out["after_a"]) == 1 and out["after_b"] == []
    assert len(out["again"]) == 1 and out["fresh"] and out["end"] == [] and out["violations"] == []


@needs_hugepages
@pytest.mark.process
def test_a_read_only_worker_registers_read_only(start_primary, prefix, root):
    start_primary(*HUGE)
    out = in_worker(f"""
        with hugeshmd.attach({prefix!r}, read_only=True) as shm:
            reg = shm.cuda_register()
            flags = [f for _, f in fake.registered.values()]
        print(json.dumps({{"flags": flags, "violations": fake.violations}}))
    """, root)
    assert out["flags"] == [_cudart.PORTABLE | _cudart.MAPPED | _cudart.READ_ONLY] and out["violations"] == []


@needs_hugepages
@pytest.mark.process
def test_a_forked_child_makes_no_cuda_call_for_its_parents_registration(start_primary, prefix, root):
    start_primary(*HUGE)
    out = in_worker(f"""
        shm = hugeshmd.attach({prefix!r})
        zone = shm.reserve("z", 4096)
        memoryview(zone)[:2] = b"hi"
        shm.cuda_register()
        calls = len(fake.calls)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            seen = bytes(memoryview(zone)[:2]).decode()  # the child keeps the mappings
            shm.close()
            os.write(w, json.dumps({{"seen": seen, "calls": len(fake.calls) - calls}}).encode())
            os._exit(0)
        os.close(w)
        child = json.loads(os.read(r, 4096))
        os.waitpid(pid, 0)
        parent = registered()
        shm.close()
        print(json.dumps({{"child": child, "parent": parent, "end": registered()}}))
    """, root)
    assert out["child"] == {"seen": "hi", "calls": 0}
    assert len(out["parent"]) == 1 and out["end"] == []  # the parent's registration is untouched by the child


@needs_hugepages
@pytest.mark.process
def test_no_library_is_library_missing_and_the_worker_goes_on(start_primary, prefix, root):
    start_primary(*HUGE)
    done = run_python(f"""
import json, hugeshmd
shm = hugeshmd.attach({prefix!r})
try:
    shm.cuda_register(library="/nonexistent/libcudart.so")
except hugeshmd.LibraryMissing as err:
    print(json.dumps(err.fields))
memoryview(shm.reserve("z", 4096))[:1] = b"x"
shm.close()
""", root)
    assert json.loads(done.stdout) == {"name": "libcudart", "path": "/nonexistent/libcudart.so", "extra": "cuda"}


@needs_hugepages
@pytest.mark.process
def test_the_real_libcudart_without_a_gpu_names_its_error_and_the_segment(start_primary, prefix, root):
    """On a host with the CUDA runtime installed but no GPU or driver (this project's CI, if it has
    the toolkit): the real library's own error, through the real prototypes."""
    probe = json.loads(run_python(PROBE, root).stdout)  # in a worker: CUDA stays out of the test process
    if probe["devices"] is None:
        pytest.skip("no libcudart installed")
    if probe["devices"] != -1:
        pytest.skip("a GPU is present: the gpu tests cover it")
    start_primary(*HUGE)
    done = run_python(f"""
import json, hugeshmd
with hugeshmd.attach({prefix!r}) as shm:
    try:
        shm.cuda_register()
    except hugeshmd.CudaError as err:
        print(json.dumps({{"message": err.message, "fields": err.fields, "segment": shm.segments[0].address}}))
""", root)
    out = json.loads(done.stdout)
    assert out["fields"]["cuda_error"] == probe["error"] in (35, 100)  # no driver, no device
    assert out["fields"]["segment"] == 0 and out["fields"]["address"] == out["segment"]
    assert out["message"].startswith(f"cudaHostRegister of segment 0 [{out['segment']:#x}, +0x2000000)")
    assert ("cudaErrorInsufficientDriver" in out["message"]) or ("cudaErrorNoDevice" in out["message"])


# -- on a GPU ------------------------------------------------------------------------------------------

COPY = HERE / "cuda_copy.py"


def _gpu_or_skip(root: str) -> None:
    """Skip unless libcudart loads and sees a device (probed in a worker: CUDA stays out of pytest)."""
    probe = json.loads(run_python(PROBE, root).stdout)
    if probe["devices"] is None:
        pytest.skip("no libcudart (pip install 'hugeshmd[cuda]' or the CUDA toolkit)")
    if probe["devices"] <= 0:
        pytest.skip(f"no GPU: libcudart loads but sees no device ({probe.get('message')})")


@pytest.mark.gpu
@needs_hugepages
@pytest.mark.process
def test_on_a_gpu_a_registered_zone_copies_at_pinned_speed_in_two_processes(start_primary, prefix, root):
    """A 1 GiB zone (256 MiB when fewer 2 MiB pages are free) registered, copied host-to-device
    (median of 5) and back through pageable memory and compared, timed against the same copy from
    pageable memory; a second process registers the same zone while the first holds it; a forked
    child of a registering process still reads the zone. ``tests/cuda_copy.py`` does the work."""
    pytest.importorskip("numpy")
    _gpu_or_skip(root)
    size = (1 << 30) if free_hugepages() >= 512 + 32 else (256 << 20)
    start_primary("--memory", str(size + (32 << 20)), "--huge-pages", "on")
    done = run_python(f"import runpy, sys; sys.argv = ['cuda_copy', {prefix!r}, '{size}', 'first']; "
                      f"runpy.run_path({str(COPY)!r}, run_name='__main__')", root, timeout=300)
    first = json.loads(done.stdout.strip().splitlines()[-1])
    second = first["second"]
    print(f"\nGPU: {size >> 20} MiB zone, host-to-device {first['pinned']:.1f} GB/s registered, "
          f"{first['pageable']:.1f} GB/s pageable ({first['pinned'] / first['pageable']:.1f}x); "
          f"registered in {first['register_s'] * 1e3:.1f} ms; second process {second['pinned']:.1f} GB/s")
    assert first["same"] and first["segments"] == 1, first
    assert first["forked"] == 0, "a forked child could not read the registered zone"
    assert first["pinned"] > first["pageable"], first
    assert second["same"] and second["segments"] == 1 and second["pinned"] > second["pageable"], second
