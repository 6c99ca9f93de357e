"""Tests for hugeshmd.hugepages against fake /sys and /proc trees (psutil style)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fake_host import MEMINFO, MOUNTS, global_counts, global_dir, node_counts, node_dir, write_pool  # noqa: F401

from hugeshmd.daemon import hugepages
from hugeshmd.daemon.hugepages import Mount, Pool
from hugeshmd.errors import InvalidArgument
from hugeshmd.sizes import GiB, MiB


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


def rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()]


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
