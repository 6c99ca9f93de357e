"""Starting, stopping, crashing: a primary's life and what workers see of it."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from conftest import PYTHON, Primary, leftovers, needs_hugepages, run_python

import hugeshmd
from hugeshmd.daemon import hugepages
from hugeshmd.daemon.config import default_base_address
from hugeshmd.shm.paths import RuntimePaths
from hugeshmd.wire.client import Subscription

pytestmark = pytest.mark.process


def hugepages_free() -> int:
    pool = hugepages.pool(2 << 20)
    return 0 if pool is None else pool.free


def test_no_primary_raises_primary_unavailable_after_timeout(prefix, root):
    started = time.monotonic()
    with pytest.raises(hugeshmd.PrimaryUnavailable) as err:
        hugeshmd.attach(prefix, timeout=0.5, runtime_root=root)
    assert 0.5 <= time.monotonic() - started < 5
    assert repr(prefix) in str(err.value) and f"{root}/{prefix}" in str(err.value)


def test_second_primary_is_refused_and_first_keeps_serving(start_primary, prefix, workers):
    first = start_primary("--memory", "4M", "--huge-pages", "off")
    second = start_primary("--memory", "4M", "--huge-pages", "off", wait=False)
    assert second.wait_exit() == 1
    assert f"another primary (pid {first.proc.pid}) holds" in second.text
    w = workers()
    w.ok("attach", prefix=prefix)
    assert w.ok("reserve", name="still-here", size=10)["size"] == 10


@needs_hugepages
def test_clean_shutdown_returns_every_page_and_file(start_primary, prefix, root, workers):
    before = hugepages_free()
    primary = start_primary("--memory", "16M", "--huge-pages", "on")
    assert hugepages_free() == before - 8
    w = workers()
    w.ok("attach", prefix=prefix)
    w.ok("reserve", name="z", size=1 << 20)
    w.stop()
    assert primary.stop(signal.SIGINT) == 0
    assert leftovers(prefix, root) == []
    assert hugepages_free() == before


def test_workers_are_told_when_the_primary_stops(start_primary, prefix, workers):
    primary = start_primary("--memory", "4M", "--huge-pages", "off")
    w = workers()
    w.ok("attach", prefix=prefix)
    w.ok("reserve", name="z", size=16)
    w.ok("write", name="z", offset=0, hex="abcd")
    w.ok("hold", name="z")
    assert primary.stop() == 0
    told = w.call("lookup", name="z")
    assert told["error"] == "PrimaryStopped" and "has stopped" in told["message"]
    assert w.call("reserve", name="y", size=1)["error"] == "PrimaryStopped"
    assert w.ok("read_held", length=2)["hex"] == "abcd"  # what a worker holds stays readable


@needs_hugepages
def test_kill_9_leaves_stale_files_that_the_next_primary_removes(start_primary, prefix, root):
    before = hugepages_free()
    crashed = start_primary("--memory", "8M", "--huge-pages", "on")
    assert crashed.stop(signal.SIGKILL) == -signal.SIGKILL
    stale = leftovers(prefix, root)
    assert any(p.endswith(f"hugeshmd.{prefix}.seg0") for p in stale)
    assert hugepages_free() == before - 4  # DPDK's leak, until someone cleans up
    successor = start_primary("--memory", "8M", "--huge-pages", "on", "--adopt", "never")
    assert "removed stale" in successor.text and f"hugeshmd.{prefix}.seg0" in successor.text
    assert successor.stop() == 0
    assert hugepages_free() == before and leftovers(prefix, root) == []


@needs_hugepages
def test_stale_files_in_a_configured_hugepage_dir_are_removed_too(start_primary, prefix, root):
    directory = os.path.join(hugepages.find_mount(2 << 20).path, f"team-{prefix}")
    os.mkdir(directory)
    try:
        args = ("--memory", "4M", "--huge-pages", "on", "--hugepage-dir", directory)
        crashed = start_primary(*args)
        assert crashed.stop(signal.SIGKILL) == -signal.SIGKILL
        assert os.listdir(directory) == [f"hugeshmd.{prefix}.seg0"]
        successor = start_primary(*args, "--adopt", "never")
        assert f"removed stale {directory}/hugeshmd.{prefix}.seg0" in successor.text
        assert successor.stop() == 0
        assert os.listdir(directory) == []
    finally:
        for name in os.listdir(directory):
            os.unlink(os.path.join(directory, name))
        os.rmdir(directory)


def test_attach_waits_for_a_primary_that_starts_later(prefix, root, start_primary):
    code = f"import hugeshmd; s = hugeshmd.attach({prefix!r}, timeout=30); print(hex(s.base)); s.close()"
    worker = subprocess.Popen([PYTHON, "-c", code], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, HUGESHMD_RUNTIME_ROOT=root))
    start_primary("--memory", "4M", "--huge-pages", "off")
    out, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0 and out.strip() == hex(default_base_address(prefix))


def test_subscription_gets_snapshot_then_numbered_changes(start_primary, prefix, root):
    primary = start_primary("--memory", "4M", "--huge-pages", "off")
    sub = Subscription(RuntimePaths.for_prefix(prefix, root), timeout=5)
    try:
        assert sub.snapshot["segments"][0]["address"] == default_base_address(prefix)
        first = sub.seq
        assert sub.poll(0.2) == []  # heartbeats carry no change and cause no resync
        assert sub.resyncs == 1
        primary.proc.send_signal(signal.SIGTERM)
        changes = sub.poll(10)
        assert [(c["op"], c["seq"]) for c in changes] == [("stopping", first + 1)]
    finally:
        sub.close()
    assert primary.wait_exit() == 0


def test_worker_killed_while_writing_zones_blocks_no_one(start_primary, prefix, root, workers):
    start_primary("--memory", "8M", "--huge-pages", "off")
    churn = f"""
import hugeshmd, itertools, sys
shm = hugeshmd.attach({prefix!r})
print("attached", flush=True)
for i in itertools.count():
    shm.reserve(f"c{{i}}", 4096)
    shm.free(f"c{{i}}")
"""
    env = dict(os.environ, HUGESHMD_RUNTIME_ROOT=root)
    survivor = workers()
    survivor.ok("attach", prefix=prefix)
    for _ in range(5):
        victim = subprocess.Popen([PYTHON, "-c", churn], stdout=subprocess.PIPE, text=True, env=env)
        assert victim.stdout.readline() == "attached\n"
        time.sleep(0.05)  # let it churn: the kill must land at an arbitrary point of a change
        victim.kill()
        victim.wait()
        victim.stdout.close()
        # the table is consistent (checksummed snapshot reads) and its lock is free
        names = [z["name"] for z in survivor.ok("zones")["zones"]]
        assert len(names) <= 1 and all(n.startswith("c") for n in names)
        for name in names:
            survivor.ok("free", name=name)
        survivor.ok("reserve", name="after", size=4096)
        survivor.ok("free", name="after")


def test_primary_start_failure_leaves_nothing(prefix, root, tmp_path):
    # huge_pages=on with a directory that is no hugetlbfs mount fails after the lock was taken
    failed = Primary(prefix, root, "--memory", "4M", "--huge-pages", "on", "--hugepage-dir", str(tmp_path))
    assert failed.wait_exit() == 1
    assert (f"hugeshmd: {tmp_path} is not a hugetlbfs mount of 2 MiB pages (or a directory on one); "
            "mount one with:") in failed.text
    assert leftovers(prefix, root) == []


def test_invalid_option_fails_before_touching_anything(prefix, root):
    failed = Primary(prefix, root, "--memory", "4M", "--base-address", "0x100000000001")
    assert failed.wait_exit() == 1
    assert "invalid base_address: 0x100000000001 is not a multiple of page_size" in failed.text
    assert not os.path.exists(os.path.join(root, prefix))


@pytest.mark.parametrize("extension", [".b", ".seg1"])
def test_prefix_that_extends_another_keeps_its_files(start_primary, prefix, root, workers, extension):
    # the stem of prefix "p" ("hugeshmd.p.seg") is also the start of prefix "p.seg1"'s file names
    start_primary("--memory", "4M", "--huge-pages", "off", prefix_=prefix + extension)
    start_primary("--memory", "4M", "--huge-pages", "off", prefix_=prefix)
    assert os.path.exists(f"/dev/shm/hugeshmd.{prefix}{extension}.seg0")
    w = workers()
    w.ok("attach", prefix=prefix + extension)
    assert w.ok("reserve", name="alive", size=64)["size"] == 64


def test_parent_killed_holding_the_lock_with_a_forked_child_blocks_no_one(start_primary, prefix, root, workers):
    start_primary("--memory", "4M", "--huge-pages", "off")
    code = f"""
import os, sys, hugeshmd
shm = hugeshmd.attach({prefix!r})
shm.reserve("x", 64)
if os.fork() == 0:          # an idle child, as multiprocessing's fork start method makes
    sys.stdin.read()
    os._exit(0)
with shm._table.locked():
    print("locked", flush=True)
    sys.stdin.read()
"""
    holder = subprocess.Popen([PYTHON, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, HUGESHMD_RUNTIME_ROOT=root), start_new_session=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        holder.kill()  # the parent dies holding the lock; its child lives on
        holder.wait()
        w = workers()
        w.ok("attach", prefix=prefix)
        assert w.ok("reserve", name="after", size=64)["size"] == 64
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # the child, which shares the session
        holder.stdin.close()
        holder.stdout.close()


def test_readers_keep_up_with_a_fast_writer_at_1000_zones(start_primary, prefix, root):
    start_primary("--memory", "16M", "--huge-pages", "off", "--max-zones", "1100")
    env = dict(os.environ, HUGESHMD_RUNTIME_ROOT=root)
    fill = f"import hugeshmd\nshm = hugeshmd.attach({prefix!r})\nfor i in range(1000): shm.reserve(f'z{{i}}', 64)"
    run_python(fill, root)
    churn = f"""
import hugeshmd
shm = hugeshmd.attach({prefix!r})
print("churning", flush=True)
while True:
    shm.reserve("churn", 64); shm.free("churn")
"""
    writer = subprocess.Popen([PYTHON, "-c", churn], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert writer.stdout.readline() == "churning\n"
        read = f"""
import time, hugeshmd
shm = hugeshmd.attach({prefix!r})
done, start = 0, time.monotonic()
while time.monotonic() - start < 2:
    assert shm.lookup("z999").size == 64   # after every foreign commit: a full decode of 1000 records
    done += 1
print(done)
"""
        assert int(run_python(read, root).stdout) > 0
    finally:
        writer.kill()
        writer.wait()
        writer.stdout.close()


def test_workers_of_a_crashed_primary_are_stopped_by_a_successor_that_does_not_adopt(
        start_primary, prefix, root, workers):
    crashed = start_primary("--memory", "4M", "--huge-pages", "off")
    old = workers()
    old.ok("attach", prefix=prefix)
    old.ok("reserve", name="before", size=64)
    crashed.stop(signal.SIGKILL)
    start_primary("--memory", "4M", "--huge-pages", "off", "--adopt", "never")
    refused = old.call("reserve", name="x", size=64)
    assert refused["error"] == "PrimaryStopped"  # not a zone in an orphaned table no one else sees
    assert old.call("lookup", name="before")["error"] == "PrimaryStopped"
    new = workers()
    new.ok("attach", prefix=prefix)
    assert new.call("lookup", name="x")["error"] == "NotFound"


def test_attach_that_fails_late_raises_its_own_error_and_leaks_nothing(start_primary, prefix, root, workers):
    start_primary("--memory", "4M", "--huge-pages", "off", "--max-workers", "1")
    holder = workers()
    holder.ok("attach", prefix=prefix)  # takes the only worker entry
    base = default_base_address(prefix)
    code = f"""
import os, hugeshmd
from hugeshmd.shm.window import conflicts
fds = len(os.listdir("/proc/self/fd"))
try:
    hugeshmd.attach({prefix!r})
except hugeshmd.OutOfMemory as err:   # raised after the table was opened and the window reserved
    print("OutOfMemory", "max_workers" in str(err))
print(len(os.listdir("/proc/self/fd")) - fds, len(conflicts({base}, 1 << 30)))
"""
    assert run_python(code, root).stdout.split() == ["OutOfMemory", "True", "0", "0"]


def test_runtime_dir_too_long_for_a_socket_fails_before_mapping(prefix):
    root = "/tmp/" + "r" * 100
    failed = Primary(prefix, root, "--memory", "4M", "--huge-pages", "off")
    assert failed.wait_exit() == 1
    assert "invalid runtime_root: the socket path" in failed.text and "(107)" in failed.text
    assert not os.path.exists(root) and leftovers(prefix, root) == []


@needs_hugepages
def test_sigterm_while_mapping_still_ends_clean(prefix, root):
    before = hugepages_free()
    primary = Primary(prefix, root, "--memory", "512M", "--huge-pages", "on", "--log-level", "debug")
    try:
        primary.wait_for("mapping: 64 MiB of 512 MiB")  # populating, chunk by chunk
        primary.proc.send_signal(signal.SIGTERM)
        assert primary.wait_exit() == 0
    finally:
        primary.stop()
    assert "stopped: prefix" in primary.text
    assert leftovers(prefix, root) == [] and hugepages_free() == before
