"""One worker process, many threads, forks and closes: what the second review found."""

from __future__ import annotations

import os
import signal
import struct
import threading

import pytest
from conftest import Primary, leftovers, run_python

import hugeshmd
from hugeshmd.shm import names, zones

pytestmark = pytest.mark.process


@pytest.fixture
def shm(start_primary, prefix, root):
    start_primary("--memory", "8M", "--huge-pages", "off")
    attached = hugeshmd.attach(prefix, runtime_root=root)
    yield attached
    attached.close()


@pytest.mark.parametrize(("where", "what", "size"), [
    (names, "reserve_unindexed", 96 << 10),  # a zone of the table (no name index yet)
    (zones, "reserve", 96 << 10),  # a zone of the table, the index made by the first reserve below
    (names.Names, "insert", 64),  # a zone of the heap, named in the index
])
def test_reserve_racing_close_never_hands_out_an_unmapped_zone(shm, monkeypatch, where, what, size):
    if what != "reserve_unindexed":
        shm.free(shm.reserve("first", 64).name)  # makes the name index
    real = getattr(where, what)

    def reserve_then_close(*args, **kwargs):
        result = real(*args, **kwargs)
        closer = threading.Thread(target=shm.close)  # another thread closes between commit and bookkeeping
        closer.start()
        closer.join()
        return result

    monkeypatch.setattr(where, what, reserve_then_close)
    with pytest.raises(hugeshmd.HugeshmdError, match="is closed"):
        shm.reserve("late", size)


def test_threads_attaching_one_instance_at_once_share_its_window(start_primary, prefix, root):
    start_primary("--memory", "8M", "--huge-pages", "off")
    code = f"""
import threading, hugeshmd
barrier, results = threading.Barrier(8), []
def attach():
    barrier.wait()
    try:
        results.append(hugeshmd.attach({prefix!r}).base)
    except Exception as err:
        results.append(repr(err))
threads = [threading.Thread(target=attach) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(len(set(results)), len(results))
"""
    assert run_python(code, root).stdout.split() == ["1", "8"]


def test_fork_while_another_thread_holds_the_workers_lock(start_primary, prefix, root):
    start_primary("--memory", "8M", "--huge-pages", "off")
    code = f"""
import os, threading, hugeshmd
shm = hugeshmd.attach({prefix!r})
held, release = threading.Event(), threading.Event()
def hold():
    with shm._lock, shm._table._thread_lock:   # both locks held by another thread at fork time
        held.set()
        release.wait()
threading.Thread(target=hold).start()
held.wait()
pid = os.fork()
if pid == 0:
    signal_ok = shm.reserve("from-child", 64).size == 64   # would hang on the inherited locks
    os._exit(0 if signal_ok else 3)
release.set()
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status), shm.lookup("from-child").size)
"""
    assert run_python(code, root).stdout.split() == ["0", "64"]


def test_a_corrupt_stale_table_does_not_keep_a_successor_from_starting(start_primary, prefix, root):
    crashed = start_primary("--memory", "4M", "--huge-pages", "off")
    crashed.stop(signal.SIGKILL)
    table = os.path.join(root, prefix, "table")
    with open(table, "r+b") as f:  # flip a bit in the committed meta record (at 576 or 640)
        f.seek(512)
        at = (576, 640)[struct.unpack("<Q", f.read(8))[0] & 1]
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 1]))
    successor = start_primary("--memory", "4M", "--huge-pages", "off")
    assert "starting afresh (adopt = auto)" in successor.text  # it cannot adopt that
    assert "its workers are not told, removing it anyway" in successor.text
    assert successor.stop() == 0
    assert leftovers(prefix, root) == []


def test_a_primary_that_cannot_start_says_why_even_with_a_corrupt_stale_table(prefix, root):
    # the same corruption, and then a start that fails for another reason: still no leftovers
    first = Primary(prefix, root, "--memory", "4M", "--huge-pages", "off").wait_ready()
    first.stop(signal.SIGKILL)
    with open(os.path.join(root, prefix, "table"), "r+b") as f:
        f.seek(0)
        f.write(b"NOTATABL")
    failed = Primary(prefix, root, "--memory", "4M", "--huge-pages", "on", "--hugepage-dir", root)
    assert failed.wait_exit() == 1 and "is not a hugetlbfs mount" in failed.text
    assert leftovers(prefix, root) == []
