"""Tests for hugeshmd.hugepages against fake /sys and /proc trees (psutil style)."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from hugeshmd import hugepages
from hugeshmd.errors import InvalidArgument
from hugeshmd.hugepages import Mount, Pool
from hugeshmd.units import GiB, MiB

MEMINFO = """MemTotal:       16318540 kB
HugePages_Total:     512
HugePages_Free:      500
HugePages_Rsvd:        3
HugePages_Surp:        0
Hugepagesize:       2048 kB
Hugetlb:         3145728 kB
"""

MOUNTS = """sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /dev/shm tmpfs rw,nosuid,nodev 0 0
hugetlbfs /dev/hugepages hugetlbfs rw,relatime 0 0
nodev /mnt/huge\\0401G hugetlbfs rw,relatime,pagesize=1G 0 0
nodev /mnt/not\\040huge tmpfs rw,relatime,size=2097152k 0 0
nodev /mnt/huge1024M hugetlbfs rw,relatime,pagesize=1024M 0 0
"""


def write_pool(directory: Path, **counts: int) -> None:
    """Create a hugepages-<kB>kB directory with one file per count."""
    directory.mkdir(parents=True)
    for name, value in counts.items():
        (directory / name).write_text(f"{value}\n")


def global_dir(sysfs: Path, kb: int) -> Path:
    return sysfs / "kernel/mm/hugepages" / f"hugepages-{kb}kB"


def node_dir(sysfs: Path, node: int, kb: int) -> Path:
    return sysfs / f"devices/system/node/node{node}/hugepages/hugepages-{kb}kB"


def global_counts(total: int, free: int, resv: int, surplus: int) -> dict[str, int]:
    return {
        "nr_hugepages": total,
        "free_hugepages": free,
        "resv_hugepages": resv,
        "surplus_hugepages": surplus,
        "nr_overcommit_hugepages": 0,
    }


def node_counts(total: int, free: int, surplus: int) -> dict[str, int]:
    return {"nr_hugepages": total, "free_hugepages": free, "surplus_hugepages": surplus}


@pytest.fixture
def one_node(tmp_path: Path) -> Path:
    """A single-node machine with 512 x 2 MiB and 2 x 1 GiB pages."""
    sysfs = tmp_path / "sys"
    write_pool(global_dir(sysfs, 2048), **global_counts(512, 500, 3, 0))
    write_pool(global_dir(sysfs, 1048576), **global_counts(2, 1, 0, 0))
    write_pool(node_dir(sysfs, 0, 2048), **node_counts(512, 500, 0))
    write_pool(node_dir(sysfs, 0, 1048576), **node_counts(2, 1, 0))
    (sysfs / "devices/system/node/online").write_text("0\n")
    return sysfs


@pytest.fixture
def two_nodes(tmp_path: Path) -> Path:
    """Nodes 0, 1, 2 and 10 with 2 MiB pages; node 3 is memoryless (no hugepages dir)."""
    sysfs = tmp_path / "sys"
    write_pool(global_dir(sysfs, 2048), **global_counts(300, 250, 7, 4))
    write_pool(node_dir(sysfs, 0, 2048), **node_counts(100, 90, 1))
    write_pool(node_dir(sysfs, 1, 2048), **node_counts(120, 100, 3))
    write_pool(node_dir(sysfs, 2, 2048), **node_counts(30, 20, 0))
    write_pool(node_dir(sysfs, 10, 2048), **node_counts(50, 40, 0))
    (sysfs / "devices/system/node/node3").mkdir(parents=True)
    (sysfs / "devices/system/node/possible").write_text("0-3,10\n")
    return sysfs


@pytest.fixture
def elsewhere(tmp_path: Path) -> dict[str, str]:
    """An empty runtime root, /dev/shm and /proc, so a report of a fake tree finds no instance."""
    for name in ("run", "shm", "proc"):
        (tmp_path / name).mkdir()
    return {"runtime_root": str(tmp_path / "run"), "shm": str(tmp_path / "shm"), "proc": str(tmp_path / "proc")}


@pytest.fixture
def proc(tmp_path: Path) -> tuple[str, str]:
    """Fake /proc/mounts and /proc/meminfo; returns their paths."""
    (tmp_path / "mounts").write_text(MOUNTS)
    (tmp_path / "meminfo").write_text(MEMINFO)
    return str(tmp_path / "mounts"), str(tmp_path / "meminfo")


def test_page_sizes_sorted(one_node: Path) -> None:
    (one_node / "kernel/mm/hugepages/not-a-size").mkdir()
    assert hugepages.page_sizes(str(one_node)) == [2 * MiB, GiB]


def test_page_sizes_without_hugepages_dir(tmp_path: Path) -> None:
    (tmp_path / "kernel/mm").mkdir(parents=True)
    assert hugepages.page_sizes(str(tmp_path)) == []
    assert hugepages.page_sizes(str(tmp_path / "absent")) == []


def test_default_page_size(proc: tuple[str, str], tmp_path: Path) -> None:
    assert hugepages.default_page_size(proc[1]) == 2 * MiB
    (tmp_path / "nohuge").write_text("MemTotal:       16318540 kB\n")
    assert hugepages.default_page_size(str(tmp_path / "nohuge")) is None
    assert hugepages.default_page_size(str(tmp_path / "absent")) is None


def test_pools_single_node(one_node: Path) -> None:
    assert hugepages.pools(str(one_node)) == [
        Pool(page_size=2 * MiB, node=None, total=512, free=500, reserved=3, surplus=0),
        Pool(page_size=GiB, node=None, total=2, free=1, reserved=0, surplus=0),
        Pool(page_size=2 * MiB, node=0, total=512, free=500, reserved=0, surplus=0),
        Pool(page_size=GiB, node=0, total=2, free=1, reserved=0, surplus=0),
    ]


def test_pools_two_nodes_numeric_order_and_memoryless(two_nodes: Path) -> None:
    found = hugepages.pools(str(two_nodes))
    assert [(p.node, p.total, p.free, p.reserved, p.surplus) for p in found] == [
        (None, 300, 250, 7, 4),
        (0, 100, 90, 0, 1),
        (1, 120, 100, 0, 3),
        (2, 30, 20, 0, 0),
        (10, 50, 40, 0, 0),
    ]
    assert {p.page_size for p in found} == {2 * MiB}


def test_pools_missing_and_unreadable_files_read_as_zero(two_nodes: Path) -> None:
    os.remove(node_dir(two_nodes, 1, 2048) / "free_hugepages")
    surplus = node_dir(two_nodes, 0, 2048) / "surplus_hugepages"
    os.remove(surplus)
    surplus.mkdir()  # reading a directory fails with an OSError, as EACCES would
    (global_dir(two_nodes, 2048) / "nr_hugepages").write_text("garbage\n")
    # Reservations are global: a per-node resv file, were one to appear, is not read.
    (node_dir(two_nodes, 2, 2048) / "resv_hugepages").write_text("5\n")
    found = hugepages.pools(str(two_nodes))
    assert found[0] == Pool(2 * MiB, None, total=0, free=250, reserved=7, surplus=4)
    assert found[1] == Pool(2 * MiB, 0, total=100, free=90, reserved=0, surplus=0)
    assert found[2] == Pool(2 * MiB, 1, total=120, free=0, reserved=0, surplus=3)
    assert found[3] == Pool(2 * MiB, 2, total=30, free=20, reserved=0, surplus=0)


def test_pools_without_hugepages_dir(tmp_path: Path) -> None:
    (tmp_path / "devices/system/node/node0").mkdir(parents=True)
    assert hugepages.pools(str(tmp_path)) == []
    assert hugepages.pool(2 * MiB, str(tmp_path)) is None


def test_pool_by_size(one_node: Path) -> None:
    assert hugepages.pool(GiB, str(one_node)) == Pool(GiB, None, 2, 1, 0, 0)
    assert hugepages.pool(2 * MiB, str(one_node)) == Pool(2 * MiB, None, 512, 500, 3, 0)
    assert hugepages.pool(16 * MiB, str(one_node)) is None
    assert hugepages.pool(0, str(one_node)) is None


def test_mounts(proc: tuple[str, str]) -> None:
    assert hugepages.mounts(*proc) == [
        Mount(path="/dev/hugepages", page_size=2 * MiB, options="rw,relatime"),
        Mount(path="/mnt/huge 1G", page_size=GiB, options="rw,relatime,pagesize=1G"),
        Mount(path="/mnt/huge1024M", page_size=GiB, options="rw,relatime,pagesize=1024M"),
    ]


def test_mounts_default_size_comes_from_meminfo(proc: tuple[str, str], tmp_path: Path) -> None:
    (tmp_path / "meminfo1g").write_text("Hugepagesize:    1048576 kB\n")
    found = hugepages.mounts(proc[0], str(tmp_path / "meminfo1g"))
    assert [m.page_size for m in found] == [GiB, GiB, GiB]
    assert hugepages.mounts(proc[0], str(tmp_path / "absent"))[0].page_size == 0


def test_mounts_missing_file(tmp_path: Path) -> None:
    assert hugepages.mounts(str(tmp_path / "absent"), str(tmp_path / "absent")) == []


def test_find_mount(proc: tuple[str, str]) -> None:
    assert hugepages.find_mount(GiB, *proc) == Mount("/mnt/huge 1G", GiB, "rw,relatime,pagesize=1G")
    default_size = hugepages.find_mount(2 * MiB, *proc)
    assert default_size is not None and default_size.path == "/dev/hugepages"
    assert hugepages.find_mount(16 * MiB, *proc) is None


def test_report_is_json_roundtrip(one_node: Path, proc: tuple[str, str], elsewhere: dict[str, str]) -> None:
    result = hugepages.report(str(one_node), *proc, **elsewhere)
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


def rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()]


def test_format_report_rows(one_node: Path, proc: tuple[str, str], elsewhere: dict[str, str]) -> None:
    text = hugepages.format_report(hugepages.report(str(one_node), *proc, **elsewhere))
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
    result = hugepages.report(str(sysfs), str(tmp_path / "mounts"), str(tmp_path / "meminfo"), **elsewhere)
    text = hugepages.format_report(result)
    assert "mkdir -p /dev/hugepages && mount -t hugetlbfs nodev /dev/hugepages" in text
    assert "echo 512 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages" in text
    assert ["1", "GiB", "all", "0", "0", "0", "0", "0", "B"] in rows(text)


def test_format_report_no_reserve_hint_when_one_size_has_pages(tmp_path: Path, elsewhere: dict[str, str]) -> None:
    sysfs = tmp_path / "sys"
    write_pool(global_dir(sysfs, 2048), **global_counts(0, 0, 0, 0))
    write_pool(global_dir(sysfs, 1048576), **global_counts(1, 1, 0, 0))
    result = hugepages.report(str(sysfs), str(tmp_path / "none"), str(tmp_path / "none"), **elsewhere)
    assert "nr_hugepages" not in hugepages.format_report(result)


def test_format_report_no_hugepage_support(tmp_path: Path, elsewhere: dict[str, str]) -> None:
    result = hugepages.report(str(tmp_path), str(tmp_path / "none"), str(tmp_path / "none"), **elsewhere)
    assert result == {"default_page_size": None, "pools": [], "mounts": [], "instances": []}
    text = hugepages.format_report(result)
    assert "no hugepage support" in text
    assert "no hugeshmd instance holds files" in text
    assert "default page size: unknown" in text
    assert "SIZE" not in text


def test_reserve_hint() -> None:
    assert (
        hugepages.reserve_hint(2 * MiB, 512)
        == "echo 512 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
    )
    assert (
        hugepages.reserve_hint(GiB, 4)
        == "echo 4 > /sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages"
    )
    for page_size, pages in ((0, 1), (3000, 1), (2 * MiB, -1), (2 * MiB, True), ("2M", 1)):
        with pytest.raises(InvalidArgument):
            hugepages.reserve_hint(page_size, pages)  # type: ignore[arg-type]


def test_mount_hint() -> None:
    assert (
        hugepages.mount_hint(2 * MiB)
        == "mkdir -p /dev/hugepages && mount -t hugetlbfs -o pagesize=2M nodev /dev/hugepages"
    )
    assert (
        hugepages.mount_hint(GiB) == "mkdir -p /dev/hugepages1G && "
        "mount -t hugetlbfs -o pagesize=1G nodev /dev/hugepages1G"
    )
    assert hugepages.mount_hint(64 * 1024).endswith("-o pagesize=64K nodev /dev/hugepages64K")
    with pytest.raises(InvalidArgument):
        hugepages.mount_hint(-2 * MiB)


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
    assert isinstance(hugepages.format_report(hugepages.report()), str)


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


def test_instances_by_prefix_with_state(holders: dict[str, str], tmp_path: Path) -> None:
    found = {i.prefix: i for i in hugepages.instances(**holders)}
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
    result = hugepages.report(str(tmp_path / "sys"), **holders)
    assert json.loads(json.dumps(result)) == result
    table = rows(hugepages.format_report(result))
    assert ["PREFIX", "STATE", "FILES", "ALLOCATED", "IN"] in table
    by_prefix = {row[0]: row[1:] for row in table if row}
    assert by_prefix["used"][:5] == ["in", "use", "(pid", "4242)", "1"]
    assert by_prefix["live"][:2] == ["live", "1"]
    assert by_prefix["a"][:2] == ["stale", "2"]
    assert "remove them with: hugeshmd hugepages cleanup" in hugepages.format_report(result)


def test_is_mount_point(tmp_path: Path) -> None:
    (tmp_path / "mounts").write_text("proc /proc proc rw 0 0\nnodev /mnt/a\\040b tmpfs rw 0 0\n")
    assert hugepages.is_mount_point("/mnt/a b", str(tmp_path / "mounts"))
    assert not hugepages.is_mount_point("/mnt", str(tmp_path / "mounts"))
    assert not hugepages.is_mount_point("/proc", str(tmp_path / "absent"))


def test_mem_total_and_node_pool(two_nodes: Path, proc: tuple[str, str], tmp_path: Path) -> None:
    assert hugepages.mem_total(proc[1]) == 16318540 * 1024
    assert hugepages.mem_total(str(tmp_path / "absent")) is None
    assert hugepages.nodes(str(two_nodes)) == [0, 1, 2, 3, 10]
    assert hugepages.pool(2 * MiB, str(two_nodes), node=1) == Pool(2 * MiB, 1, 120, 100, 0, 3)
    assert hugepages.pool(2 * MiB, str(two_nodes), node=3) is None
    assert Pool(2 * MiB, None, 300, 250, 7, 4).persistent == 296
    assert Pool(2 * MiB, None, 300, 250, 7, 4).available == 243
