"""Unit tests of hugeshmd.host.census on faked trees: which instance holds which files, the
``hugepages show`` report, and cleanup of stale instances."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_host import MEMINFO, global_counts, global_dir, write_pool
from test_hugepages import rows

from hugeshmd.daemon import hugepages
from hugeshmd.host import census
from hugeshmd.sizes import GiB, MiB


@pytest.fixture
def holders(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A hugetlbfs and a /dev/shm (plain dirs) holding files of four prefixes, a runtime root
    where prefix ``live`` holds its lock and ``gone`` left only a runtime dir, and a /proc in
    which pid 4242 maps ``used``'s file; yields the report's keyword arguments."""
    huge, shm, run, proc = (tmp_path / name for name in ("huge", "shm", "run", "proc"))
    for directory in (huge, shm, run / "live", run / "gone", proc / "4242", proc / "7"):
        directory.mkdir(parents=True)
    for name in ("hugeshmd.a.seg0", "hugeshmd.a.seg1", "hugeshmd.live.seg0", "hugeshmd.used.seg3",
                 "hugeshmd..seg0", "hugeshmd.b.segx", "other"):
        (huge / name).write_bytes(b"x" * 8192)
    (shm / "hugeshmd.a.seg1.seg0").write_bytes(b"x" * 4096)  # prefix "a.seg1", not "a"
    (proc / "4242/maps").write_text(f"7f0000000000-7f0000200000 rw-s 00000000 00:2f 77    {huge}/hugeshmd.used.seg3\n")
    (proc / "7/maps").write_text("55d0-55d1 r--p 00000000 08:01 12 /usr/bin/python3\n")
    (tmp_path / "mounts").write_text(f"nodev {huge} hugetlbfs rw,pagesize=2M 0 0\nproc /proc proc rw 0 0\n")
    with open(run / "live/primary.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield {"proc_mounts": str(tmp_path / "mounts"), "meminfo": str(tmp_path / "none"),
               "runtime_root": str(run), "shm": str(shm), "proc": str(proc)}


def test_report_is_json_roundtrip(one_node: Path, proc: tuple[str, str], elsewhere: dict[str, str]) -> None:
    result = census.report(str(one_node), *proc, **elsewhere)
    assert json.loads(json.dumps(result)) == result
    assert result["default_page_size"] == 2 * MiB
    assert len(result["pools"]) == 4
    assert result["pools"][1] == {
        "page_size": GiB,
        "node": None,
        "total": 2,
        "free": 1,
        "reserved": 0,
        "surplus": 0,
    }
    assert result["mounts"][1] == {
        "path": "/mnt/huge 1G",
        "page_size": GiB,
        "options": "rw,relatime,pagesize=1G",
    }


def test_format_report_rows(one_node: Path, proc: tuple[str, str], elsewhere: dict[str, str]) -> None:
    text = census.format_report(census.report(str(one_node), *proc, **elsewhere))
    table = rows(text)
    assert ["SIZE", "NODE", "TOTAL", "FREE", "RESERVED", "SURPLUS", "FREE", "BYTES"] in table
    assert ["2", "MiB", "all", "512", "500", "3", "0", "1000", "MiB"] in table
    assert ["1", "GiB", "all", "2", "1", "0", "0", "1", "GiB"] in table
    assert ["2", "MiB", "0", "512", "500", "0", "0", "1000", "MiB"] in table
    assert ["PATH", "PAGE", "SIZE", "OPTIONS"] in table
    assert ["/mnt/huge", "1G", "1", "GiB", "rw,relatime,pagesize=1G"] in table
    assert ["/dev/hugepages", "2", "MiB", "rw,relatime"] in table
    assert "mount -t" not in text
    assert "echo" not in text


def test_format_report_no_mounts_and_zero_pages(tmp_path: Path, elsewhere: dict[str, str]) -> None:
    sysfs = tmp_path / "sys"
    write_pool(global_dir(sysfs, 2048), **global_counts(0, 0, 0, 0))
    write_pool(global_dir(sysfs, 1048576), **global_counts(0, 0, 0, 0))
    (tmp_path / "mounts").write_text("proc /proc proc rw 0 0\n")
    (tmp_path / "meminfo").write_text(MEMINFO)
    result = census.report(str(sysfs), str(tmp_path / "mounts"), str(tmp_path / "meminfo"), **elsewhere)
    text = census.format_report(result)
    assert "mkdir -p /dev/hugepages && mount -t hugetlbfs nodev /dev/hugepages" in text
    assert "echo 512 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages" in text
    assert ["1", "GiB", "all", "0", "0", "0", "0", "0", "B"] in rows(text)


def test_format_report_no_reserve_hint_when_one_size_has_pages(tmp_path: Path, elsewhere: dict[str, str]) -> None:
    sysfs = tmp_path / "sys"
    write_pool(global_dir(sysfs, 2048), **global_counts(0, 0, 0, 0))
    write_pool(global_dir(sysfs, 1048576), **global_counts(1, 1, 0, 0))
    result = census.report(str(sysfs), str(tmp_path / "none"), str(tmp_path / "none"), **elsewhere)
    assert "nr_hugepages" not in census.format_report(result)


def test_format_report_no_hugepage_support(tmp_path: Path, elsewhere: dict[str, str]) -> None:
    result = census.report(str(tmp_path), str(tmp_path / "none"), str(tmp_path / "none"), **elsewhere)
    assert result == {"default_page_size": None, "pools": [], "mounts": [], "instances": []}
    text = census.format_report(result)
    assert "no hugepage support" in text
    assert "no hugeshmd instance holds files" in text
    assert "default page size: unknown" in text
    assert "SIZE" not in text


def test_real_host() -> None:
    """Reads the real /sys and /proc; must pass with or without hugepages."""
    sizes = hugepages.page_sizes()
    assert all(isinstance(size, int) and size > 0 for size in sizes)
    assert sizes == sorted(sizes)
    default = hugepages.default_page_size()
    assert default is None or isinstance(default, int)
    found = hugepages.pools()
    global_pools = [p for p in found if p.node is None]
    assert [p.page_size for p in global_pools] == sizes
    for each in global_pools:
        # Surplus pages allocated for a reservation sit free until faulted, and
        # sysfs nr_hugepages counts persistent pages only, so allow for them.
        assert 0 <= each.free <= each.total + each.surplus
    for mount in hugepages.mounts():
        assert isinstance(mount.path, str) and mount.path.startswith("/")
    assert isinstance(census.format_report(census.report()), str)


def test_instances_by_prefix_with_state(holders: dict[str, str], tmp_path: Path) -> None:
    found = {i.prefix: i for i in census.instances(**holders)}
    assert sorted(found) == ["a", "a.seg1", "gone", "live", "used"]
    huge = str(tmp_path / "huge")
    assert found["a"].files == [f"{huge}/hugeshmd.a.seg0", f"{huge}/hugeshmd.a.seg1"]
    assert found["a"].allocated == sum(os.stat(path).st_blocks * 512 for path in found["a"].files) > 0
    assert found["a.seg1"].files == [str(tmp_path / "shm/hugeshmd.a.seg1.seg0")]
    assert {p: i.state for p, i in found.items()} == {
        "a": "stale", "a.seg1": "stale", "gone": "stale", "live": "live", "used": "in use"}
    assert found["used"].pids == [4242] and found["a"].pids == []
    assert found["gone"].files == [] and found["gone"].runtime_dir == str(tmp_path / "run/gone")
    assert found["a"].runtime_dir is None


def test_report_lists_instances(holders: dict[str, str], tmp_path: Path) -> None:
    result = census.report(str(tmp_path / "sys"), **holders)
    assert json.loads(json.dumps(result)) == result
    table = rows(census.format_report(result))
    assert ["PREFIX", "STATE", "FILES", "ALLOCATED", "IN"] in table
    by_prefix = {row[0]: row[1:] for row in table if row}
    assert by_prefix["used"][:5] == ["in", "use", "(pid", "4242)", "1"]
    assert by_prefix["live"][:2] == ["live", "1"]
    assert by_prefix["a"][:2] == ["stale", "2"]
    assert "remove them with: hugeshmd hugepages cleanup" in census.format_report(result)


def test_cleanup_on_fake_dirs_removes_only_the_stale(tmp_path: Path) -> None:
    huge, shm, run, proc = (tmp_path / name for name in ("huge", "shm", "run", "proc"))
    for directory in (huge, shm, run / "live", run / "dead", proc / "99"):
        directory.mkdir(parents=True)
    for prefix in ("live", "dead", "files.only", "used"):
        (huge / f"hugeshmd.{prefix}.seg0").write_bytes(b"x" * 4096)
    (run / "dead/table.new.3").write_bytes(b"")
    (run / "dead/primary.lock").write_text("12345\n")
    (proc / "99/maps").write_text(f"7f00-7f01 rw-s 00000000 00:2f 7 {huge}/hugeshmd.used.seg0\n")
    (tmp_path / "mounts").write_text(f"nodev {huge} hugetlbfs rw,pagesize=2M 0 0\n")
    where = {"proc_mounts": str(tmp_path / "mounts"), "meminfo": str(tmp_path / "none"), "shm": str(shm),
             "proc": str(proc)}
    with open(run / "live/primary.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = {c.instance.prefix: c for c in census.cleanup(str(run), **where)}
    assert {p: c.removed for p, c in done.items()} == {
        "dead": [f"{huge}/hugeshmd.dead.seg0", f"{run}/dead/table.new.3", f"{run}/dead/primary.lock", f"{run}/dead"],
        "files.only": [f"{huge}/hugeshmd.files.only.seg0"],
        "live": [], "used": []}
    assert sorted(os.listdir(huge)) == ["hugeshmd.live.seg0", "hugeshmd.used.seg0"]
    assert sorted(os.listdir(run)) == ["live"]
    assert done["used"].describe() == "used: in use by pid 99, left alone"
    assert done["live"].describe() == "live: live, left alone"
