"""Shared arrays (hugeshmd.shm.pins): numpy arrays that go through multiprocessing as handles.

Real primaries and real processes: a spawned child reading and writing the memory a parent
sent through a multiprocessing.Queue; a ProcessPoolExecutor working in place; the memory kept
while any process holds it, whoever frees or dies first; freed once the last holder is gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap

import pytest
from conftest import PYTHON, run_python, spawn_worker, start_storm, storm_result
from test_channel_process import drain
from test_heap_process import settled

pytest.importorskip("numpy")
pytestmark = pytest.mark.process

HUGE = ("--memory", "64M", "--huge-pages", "try")


def py(prefix: str, root: str, body: str) -> str:
    """Run ``body`` as a script (a file: spawned children import its functions) in a fresh worker
    with ``shm`` attached; its stdout."""
    script = os.path.join(root, "shared_arrays.py")
    with open(script, "w") as f:
        f.write(f"import multiprocessing as mp, pickle, sys, numpy as np, hugeshmd\n"
                f"shm = hugeshmd.attach({prefix!r}, runtime_root={root!r})\n" + textwrap.dedent(body))
    done = subprocess.run([PYTHON, script], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, HUGESHMD_RUNTIME_ROOT=root))
    os.unlink(script)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_an_array_goes_through_multiprocessing_as_the_same_memory(start_primary, prefix, root):
    start_primary(*HUGE)
    out = py(prefix, root, """
        def child(q, r):
            a = q.get()
            r.put((type(a).__name__, float(a.sum()), a.__array_interface__["data"][0]))
            a[0] = 42.0  # the parent sees it: the same memory
            r.put("written")

        if __name__ == "__main__":
            a = shm.zeros((1000,), "float64")
            a[:] = 1.0
            ctx = mp.get_context("spawn")
            q, r = ctx.Queue(), ctx.Queue()
            p = ctx.Process(target=child, args=(q, r))
            p.start()
            q.put(a[10:20])  # a view: the handle says where in the allocation
            kind, total, address = r.get(timeout=60)
            assert r.get(timeout=60) == "written"
            p.join(60)
            print(kind, total, address == a.__array_interface__["data"][0] + 80, a[10])
            plain = np.arange(5)
            print(type(pickle.loads(pickle.dumps(plain))).__name__, len(pickle.dumps(plain)) > 40)
    """)
    assert out.split() == ["SharedArray", "10.0", "True", "42.0", "ndarray", "True"], out
    assert settled(prefix, root)["figures"]["allocations"] == 0  # every holder gone: freed


def test_a_process_pool_works_in_place_and_returns_shared_arrays(start_primary, prefix, root):
    start_primary(*HUGE)
    out = py(prefix, root, """
        from concurrent.futures import ProcessPoolExecutor

        def double(a):
            a *= 2  # in place, in the parent's memory
            out = hugeshmd.attach(a_prefix, runtime_root=a_root).empty(a.shape, a.dtype)
            out[:] = a + 1
            return out  # made here, pickled as a handle too

        a_prefix, a_root = shm.prefix, shm._paths.root

        if __name__ == "__main__":
            a = shm.empty((4, 1000), "int64")
            a[:] = 3
            with ProcessPoolExecutor(2, mp_context=mp.get_context("fork")) as pool:
                got = list(pool.map(double, [a[0], a[1]]))
            print(int(a[0, 0]), int(a[1, 999]), int(a[2, 0]), [int(g[5]) for g in got], type(got[0]).__name__)
    """)
    assert out.split() == ["6", "6", "3", "[7,", "7]", "SharedArray"], out


def test_the_memory_outlives_its_maker_and_goes_with_its_last_holder(start_primary, prefix, root):
    start_primary(*HUGE)
    holder = spawn_worker(["-c", textwrap.dedent(f"""
        import pickle, sys, hugeshmd
        shm = hugeshmd.attach({prefix!r}, runtime_root={root!r})
        a = pickle.loads(bytes.fromhex(sys.stdin.readline()))
        print(float(a.sum()), flush=True)
        sys.stdin.readline()  # the maker is dead now
        print(float(a.sum()), flush=True)
        sys.stdin.readline()
    """)], root, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    maker = spawn_worker(["-c", textwrap.dedent(f"""
        import pickle, sys, hugeshmd
        shm = hugeshmd.attach({prefix!r}, runtime_root={root!r})
        a = shm.empty((1 << 17,), "float64")  # 1 MiB: a large allocation
        a[:] = 1.0
        print(pickle.dumps(a).hex(), flush=True)
        sys.stdin.readline()
    """)], root, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert maker.stdout is not None and holder.stdin is not None and holder.stdout is not None
    holder.stdin.write(maker.stdout.readline())
    holder.stdin.flush()
    assert holder.stdout.readline().strip() == "131072.0"
    maker.send_signal(signal.SIGKILL)  # dies holding its pin: the primary drops it
    maker.wait(10)
    report = settled(prefix, root)
    assert report["violations"] == [] and report["figures"]["large_allocations"] == 1, report
    holder.stdin.write("\n")
    holder.stdin.flush()
    assert holder.stdout.readline().strip() == "131072.0"  # still there, untouched
    holder.kill()  # the last holder: the memory goes with it
    holder.wait(10)
    figures = settled(prefix, root)["figures"]
    assert (figures["allocations"], figures["large_allocations"]) == (0, 0), figures


def test_a_copy_in_flight_keeps_the_memory_until_received_or_its_sender_exits(start_primary, prefix, root):
    start_primary(*HUGE)
    blob = py(prefix, root, """
        a = shm.empty((100,), "int32")
        a[:] = 7
        blob = pickle.dumps(a)
        del a  # the maker drops its array: the copy in flight still holds the memory
        print(pickle.loads(blob).sum())  # received in this same process
        sys.stdout.flush()
        second = pickle.dumps(shm.empty((3,), "int8"))
        print(second.hex())  # pickled, never received here; this process exits
    """).split()
    assert blob[0] == "700"
    report = settled(prefix, root)  # its sender exited: the copy in flight went with it
    assert report["figures"]["allocations"] == 0, report
    out = run_python(textwrap.dedent(f"""
        import pickle, hugeshmd
        shm = hugeshmd.attach({prefix!r}, runtime_root={root!r})
        try:
            pickle.loads(bytes.fromhex({blob[1]!r}))
        except hugeshmd.NotFound as err:
            print("NotFound", "freed before it was received" in str(err))
    """), root).stdout
    assert out.split() == ["NotFound", "True"], out


def test_a_storm_of_kill_9_on_makers_and_takers_frees_every_array_once(start_primary, prefix, root):
    start_primary("--memory", "128M", "--huge-pages", "on")
    kills = os.environ.get("STORM_KILLS", "300")
    result = storm_result(start_storm("pins_storm.py", prefix, root, "2", "2", kills, "60"))
    assert result["kills"] >= 100, result
    drain(prefix, root, "parcels")  # drop the parcels left
    report = settled(prefix, root)
    assert report["violations"] == [] and report["pending"] == [], report
    figures = report["figures"]
    # Every worker is dead and the parcels are gone: every pin was dropped and every array freed.
    assert (figures["pins"], figures["allocations"], figures["handed"]) == (0, 0, 0), figures
