"""A faked host for unit tests: sysfs hugepage pools, /proc/mounts and /proc/meminfo in tmp_path.

Helpers are imported by the tests that build trees by hand; the fixtures
(``one_node``, ``two_nodes``, ``elsewhere``, ``proc``) are registered through
conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

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


@pytest.fixture(name="proc")
def fake_proc(tmp_path: Path) -> tuple[str, str]:
    """Fake /proc/mounts and /proc/meminfo; returns their paths."""
    (tmp_path / "mounts").write_text(MOUNTS)
    (tmp_path / "meminfo").write_text(MEMINFO)
    return str(tmp_path / "mounts"), str(tmp_path / "meminfo")
