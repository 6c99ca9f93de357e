"""hugeshmd.pool against fake /sys trees: NUMA layouts this machine lacks, short grants, clear's arithmetic.

A fake tree cannot allocate, so the pool writers take ``write``; here it is
:class:`FakeKernel`, a small model of set_max_huge_pages() in mm/hugetlb.c:
surplus pages are promoted before any allocation, each node grants at most its
``spare`` pages, and a shrink frees free pages only down to ``resv + in use``
and turns the rest of the cut into surplus.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from hugeshmd.daemon import config
from hugeshmd.errors import InvalidArgument, KernelRefused
from hugeshmd.host import pool
from hugeshmd.sizes import GiB, MiB

KB = 2048  # 2 MiB pages
NODE_PATH = re.compile(r"/node(\d+)/")


def node_dir(sysfs: Path, node: int, kb: int = KB) -> Path:
    return sysfs / f"devices/system/node/node{node}/hugepages/hugepages-{kb}kB"


def global_dir(sysfs: Path, kb: int = KB) -> Path:
    return sysfs / f"kernel/mm/hugepages/hugepages-{kb}kB"


def read(directory: Path, name: str) -> int:
    return int((directory / f"{name}_hugepages").read_text())


def put(directory: Path, **counts: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, value in counts.items():
        (directory / f"{name}_hugepages").write_text(f"{value}\n")


def make_tree(sysfs: Path, nodes: dict[int, tuple[int, int, int]], resv: int = 0,
              memoryless: tuple[int, ...] = (), kb: int = KB) -> Path:
    """Nodes' (nr, free, surplus) of one page size, and the global files that sum them."""
    for node, (nr, free, surplus) in nodes.items():
        put(node_dir(sysfs, node, kb), nr=nr, free=free, surplus=surplus)
    for node in memoryless:
        (sysfs / f"devices/system/node/node{node}").mkdir(parents=True)
    totals = [sum(counts[i] for counts in nodes.values()) for i in range(3)]
    put(global_dir(sysfs, kb), nr=totals[0], free=totals[1], surplus=totals[2], resv=resv)
    return sysfs


class FakeKernel:
    """``write`` for a fake tree: plays the kernel's pool resizing, allocating at most
    ``spare[node]`` new pages on each node (default: plenty). It reads the tree's
    counts, moves pages one at a time as the kernel does, and writes them back."""

    def __init__(self, sysfs: Path, spare: dict[int, int] | None = None) -> None:
        self.sysfs = sysfs
        self.spare = dict(spare or {})
        self.writes: list[tuple[str, int]] = []

    def __call__(self, path: str, value: int) -> None:
        self.writes.append((path, value))
        self.pages = {n: {k: read(node_dir(self.sysfs, n), k) for k in ("nr", "free", "surplus")}
                      for n in self.nodes()}
        self.resv = read(global_dir(self.sysfs), "resv")
        match = NODE_PATH.search(path)
        allowed = [int(match.group(1))] if match else list(self.pages)
        count = value + (self.persistent() - self.persistent(allowed) if match else 0)
        self.promote(count, allowed)
        self.allocate(count, allowed)
        self.shrink(count, allowed)
        for node, counts in self.pages.items():
            put(node_dir(self.sysfs, node), **counts)
        put(global_dir(self.sysfs), **{k: sum(c[k] for c in self.pages.values()) for k in ("nr", "free", "surplus")})

    def nodes(self) -> list[int]:
        found = (int(p.name[4:]) for p in (self.sysfs / "devices/system/node").iterdir())
        return sorted(n for n in found if node_dir(self.sysfs, n).is_dir())

    def persistent(self, nodes: list[int] | None = None) -> int:
        return sum(self.pages[n]["nr"] - self.pages[n]["surplus"] for n in (nodes or self.pages))

    def total(self, key: str) -> int:
        return sum(counts[key] for counts in self.pages.values())

    def promote(self, count: int, nodes: list[int]) -> None:
        for node in nodes:
            while count > self.persistent() and self.pages[node]["surplus"]:
                self.pages[node]["surplus"] -= 1

    def allocate(self, count: int, nodes: list[int]) -> None:
        while count > self.persistent():
            able = [n for n in nodes if self.spare.get(n, 1 << 30) > 0]
            if not able:
                return
            node = min(able, key=lambda n: self.pages[n]["nr"])  # round robin, roughly
            self.spare[node] = self.spare.get(node, 1 << 30) - 1
            self.pages[node]["nr"] += 1
            self.pages[node]["free"] += 1

    def shrink(self, count: int, nodes: list[int]) -> None:
        floor = max(count, self.resv + self.total("nr") - self.total("free"))  # min_count
        while floor < self.persistent():
            with_free = [n for n in nodes if self.pages[n]["free"]]
            if not with_free:
                break
            self.pages[with_free[0]]["nr"] -= 1
            self.pages[with_free[0]]["free"] -= 1
        while count < self.persistent():  # in-use pages leave the persistent pool as surplus
            self.pages[nodes[0]]["surplus"] += 1


@pytest.fixture
def two_nodes(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "sys", {0: (100, 90, 0), 1: (100, 100, 0)})


@pytest.fixture
def four_nodes(tmp_path: Path) -> Path:
    """Nodes 0-2 with 2 MiB pools, node 3 memoryless, and no 1 GiB pool at all."""
    return make_tree(tmp_path / "sys", {0: (50, 50, 0), 1: (50, 40, 0), 2: (50, 50, 0)}, memoryless=(3,))


def test_reserve_is_the_total_not_per_node(four_nodes: Path) -> None:
    kernel = FakeKernel(four_nodes)
    change = pool.set_pool(2 * MiB, pool.pages_for(GiB, 2 * MiB), sysfs=str(four_nodes), write=kernel)
    assert kernel.writes == [(str(global_dir(four_nodes) / "nr_hugepages"), 512)]
    assert (change.before.total, change.after.total, change.after.node) == (150, 512, None)
    assert sum(read(node_dir(four_nodes, n), "nr") for n in (0, 1, 2)) == 512
    assert pool.describe_set(change) == "2 MiB pool: 512 pages (1 GiB), was 150"


def test_reserve_on_a_node_writes_that_nodes_file(four_nodes: Path) -> None:
    kernel = FakeKernel(four_nodes)
    change = pool.set_pool(2 * MiB, 80, node=1, sysfs=str(four_nodes), write=kernel)
    assert kernel.writes == [(str(node_dir(four_nodes, 1) / "nr_hugepages"), 80)]
    assert [read(node_dir(four_nodes, n), "nr") for n in (0, 1, 2)] == [50, 80, 50]
    assert read(global_dir(four_nodes), "nr") == 180
    assert pool.describe_set(change) == "node 1's 2 MiB pool: 80 pages (160 MiB), was 50"


def test_short_grant_is_said_plainly(two_nodes: Path) -> None:
    kernel = FakeKernel(two_nodes, spare={0: 200})
    change = pool.set_pool(2 * MiB, 512, node=0, sysfs=str(two_nodes), write=kernel)
    assert change.after.persistent == 300
    assert pool.describe_set(change).startswith(
        "asked 512 pages (1 GiB) of 2 MiB on node 0; the kernel granted 300 (600 MiB)")


def test_missing_pools_and_nodes(four_nodes: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"no 2 MiB hugepage pool on node 3 \(a node without memory\?\)"):
        pool.set_pool(2 * MiB, 10, node=3, sysfs=str(four_nodes), write=FakeKernel(four_nodes))
    with pytest.raises(InvalidArgument, match=r"no NUMA node 7 \(nodes: 0, 1, 2, 3\)"):
        pool.clear(2 * MiB, node=7, sysfs=str(four_nodes), write=FakeKernel(four_nodes))
    with pytest.raises(InvalidArgument, match=r"no 1 GiB hugepages \(sizes: 2 MiB\)"):
        pool.page_size_of("1G", str(four_nodes))
    with pytest.raises(InvalidArgument, match="invalid page size"):
        pool.page_size_of("huge", str(four_nodes))
    assert pool.page_size_of("2048k", str(four_nodes)) == 2 * MiB


def test_pages_for_rounds_up_and_refuses_the_absurd(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        4194304 kB\n")  # 4 GiB
    assert pool.pages_for(3 * MiB, 2 * MiB, str(meminfo)) == 2
    assert pool.pages_for(4 * GiB, 2 * MiB, str(meminfo)) == 2048
    for size in (0, -1, 4 * GiB + 1, 1 << 60):
        with pytest.raises(InvalidArgument, match="the machine's memory"):
            pool.pages_for(size, 2 * MiB, str(meminfo))
    assert pool.pages_for(1 << 40, 2 * MiB, str(tmp_path / "absent")) == 1 << 19  # no MemTotal: a loose cap
    with pytest.raises(InvalidArgument):
        pool.pages_for(1 << 60, 2 * MiB, str(tmp_path / "absent"))


def test_clear_releases_free_unreserved_pages_only(tmp_path: Path) -> None:
    # 300 pages, 250 free of which 7 are reserved, 4 surplus pages in use.
    sysfs = make_tree(tmp_path / "sys", {0: (300, 250, 4)}, resv=7)
    change = pool.clear(2 * MiB, sysfs=str(sysfs), write=FakeKernel(sysfs))
    assert change.asked == 296 - 239
    assert (change.after.total, change.after.free, change.after.surplus) == (61, 11, 4)
    assert pool.describe_clear(change) == "released 239 pages (478 MiB) of 2 MiB; 61 stay (in use or reserved)"


def test_the_obvious_cut_would_turn_pages_in_use_into_surplus(tmp_path: Path) -> None:
    """Why clear cuts free - resv - surplus: with surplus pages, nr - (free - resv) is
    below what the kernel keeps, and it converts the difference into surplus."""
    sysfs = make_tree(tmp_path / "sys", {0: (300, 250, 4)}, resv=7)
    FakeKernel(sysfs)(str(global_dir(sysfs) / "nr_hugepages"), 296 - (250 - 7))
    assert read(global_dir(sysfs), "surplus") == 8


def test_clear_on_a_node_minds_the_global_reservations(two_nodes: Path) -> None:
    put(global_dir(two_nodes), resv=150)  # of 190 free pages, 150 are reserved: 40 may go
    change = pool.clear(2 * MiB, node=0, sysfs=str(two_nodes), write=FakeKernel(two_nodes))
    assert change.asked == 100 - 40
    assert [read(node_dir(two_nodes, n), "nr") for n in (0, 1)] == [60, 100]
    assert read(global_dir(two_nodes), "surplus") == 0
    assert pool.describe_clear(change).startswith("released 40 pages (80 MiB) of 2 MiB on node 0; 60 stay")


def test_clear_on_a_node_takes_only_its_free_pages(two_nodes: Path) -> None:
    change = pool.clear(2 * MiB, node=0, sysfs=str(two_nodes), write=FakeKernel(two_nodes))
    assert (change.asked, change.after.total, read(node_dir(two_nodes, 1), "nr")) == (10, 10, 100)


def test_clear_with_nothing_to_release_writes_nothing(tmp_path: Path) -> None:
    sysfs = make_tree(tmp_path / "sys", {0: (10, 3, 0)}, resv=3)
    kernel = FakeKernel(sysfs)
    change = pool.clear(2 * MiB, sysfs=str(sysfs), write=kernel)
    assert kernel.writes == []
    assert pool.describe_clear(change) == (
        "nothing to release: no free, unreserved 2 MiB pages; 10 pages (20 MiB) stay")


def test_grow_free_counts_reservations_and_promotes_surplus_first(tmp_path: Path) -> None:
    sysfs = make_tree(tmp_path / "sys", {0: (300, 250, 4)}, resv=7)
    change = pool.grow_free(2 * MiB, 400, sysfs=str(sysfs), write=FakeKernel(sysfs))
    assert change.asked == 300 + 157
    assert (change.after.available, change.after.surplus) == (400, 0)


def test_grow_free_never_shrinks(tmp_path: Path) -> None:
    sysfs = make_tree(tmp_path / "sys", {0: (300, 250, 0)}, resv=7)
    kernel = FakeKernel(sysfs)
    for pages in (1, 243):
        assert pool.grow_free(2 * MiB, pages, sysfs=str(sysfs), write=kernel).after.total == 300
    assert kernel.writes == []


def conf(**values: str) -> config.Config:
    return config.load(None, values)


def test_reserve_for_a_config(two_nodes: Path, tmp_path: Path) -> None:
    meminfo = str(tmp_path / "none")
    grows = pool.reserve_for(conf(memory="1G", huge_pages="on"), str(two_nodes), meminfo, FakeKernel(two_nodes))
    assert grows == pool.ConfigReserve("grew the 2 MiB pool from 200 to 522 pages; 512 pages (1 GiB) free, "
                                       "enough for memory 1 GiB (512 pages)", False)
    enough = pool.reserve_for(conf(memory="64M", huge_pages="on"), str(two_nodes), meminfo, FakeKernel(two_nodes))
    assert enough.message == "512 pages (1 GiB) free, enough for memory 64 MiB (32 pages)"


def test_reserve_for_a_config_that_comes_up_short(two_nodes: Path, tmp_path: Path) -> None:
    meminfo = str(tmp_path / "none")
    short = pool.reserve_for(conf(memory="1G", huge_pages="on"), str(two_nodes), meminfo,
                             FakeKernel(two_nodes, spare={0: 10, 1: 10}))
    assert short.short and short.message == (
        "grew the 2 MiB pool from 200 to 220 pages; only 210 pages (420 MiB) free of the 512 that memory 1 GiB "
        'needs; the kernel granted no more; with huge_pages = "on" the primary will refuse to start')
    tried = pool.reserve_for(conf(memory="2G", huge_pages="try"), str(two_nodes), meminfo,
                             FakeKernel(two_nodes, spare={0: 0, 1: 0}))
    assert not tried.short and tried.message.startswith("warning: only 210 pages")
    assert tried.message.endswith('with huge_pages = "try" the primary falls back to /dev/shm')


def test_reserve_for_a_config_with_nothing_to_do(two_nodes: Path, tmp_path: Path) -> None:
    kernel = FakeKernel(two_nodes)
    unset = pool.reserve_for(conf(huge_pages="on"), str(two_nodes), str(tmp_path), kernel)
    assert not unset.short and "no memory set" in unset.message
    off = pool.reserve_for(conf(memory="1G", huge_pages="off"), str(two_nodes), str(tmp_path), kernel)
    assert not off.short and "nothing to reserve" in off.message
    no_1g = pool.reserve_for(conf(memory="1G", page_size="1G", huge_pages="on"), str(two_nodes), str(tmp_path),
                             kernel)
    assert no_1g.short and no_1g.message.startswith("the kernel has no 1 GiB hugepages")
    assert kernel.writes == []


def test_write_number_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KernelRefused, match="cannot write 4 to") as caught:
        pool.write_number(str(tmp_path / "nr_hugepages"), 4)
    assert caught.value.errno == 2 and not (tmp_path / "nr_hugepages").exists()


def test_mount_options() -> None:
    assert pool.mount_options(2 * MiB) == "pagesize=2M"
    assert (pool.mount_options(GiB, "0", "root", "770", 3 * GiB - 1)
            == f"pagesize=1G,uid=0,gid=0,mode=0770,size={3 * GiB}")
    assert pool.mount_options(2 * MiB, owner="root", mode="01777") == "pagesize=2M,uid=0,mode=1777"
    for kwargs, message in (({"owner": "no-such-user-here"}, "no user named"),
                            ({"group": "no-such-group-here"}, "no group named"),
                            ({"mode": "0999"}, "invalid mode"), ({"mode": "77777"}, "invalid mode"),
                            ({"size": 0}, "at least one page")):
        with pytest.raises(InvalidArgument, match=message):
            pool.mount_options(2 * MiB, **kwargs)  # type: ignore[arg-type]


def test_mount_refuses_a_mount_point(tmp_path: Path) -> None:
    (tmp_path / "mounts").write_text(f"tmpfs {tmp_path}/busy tmpfs rw 0 0\n")
    with pytest.raises(InvalidArgument, match="is a mount point already"):
        pool.mount(str(tmp_path / "busy"), "pagesize=2M", str(tmp_path / "mounts"))
    assert not (tmp_path / "busy").exists()
    with pytest.raises(InvalidArgument, match="is a mount point already"):
        pool.mount("/proc", "pagesize=2M")


def test_mount_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(InvalidArgument, match="cannot make the directory"):
        pool.mount(str(tmp_path / "file"), "pagesize=2M", str(tmp_path / "absent"))


def test_unmount_only_a_hugetlbfs(tmp_path: Path) -> None:
    (tmp_path / "mounts").write_text(f"tmpfs {tmp_path} tmpfs rw 0 0\n")
    with pytest.raises(InvalidArgument, match="no hugetlbfs is mounted at"):
        pool.unmount(str(tmp_path), str(tmp_path / "mounts"))
    with pytest.raises(InvalidArgument, match="no hugetlbfs is mounted at /proc"):
        pool.unmount("/proc")
    assert os.path.ismount("/proc")


