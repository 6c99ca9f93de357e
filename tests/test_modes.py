"""huge_pages=try|on|off with hugepages present, absent and exhausted (PostgreSQL's meaning)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import PYTHON, Primary, free_hugepages, hugetlbfs_mount, leftovers, needs_hugepages

pytestmark = pytest.mark.process


def status(prefix: str, root: str) -> dict:
    out = subprocess.run([PYTHON, "-m", "hugeshmd", "status", "--prefix", prefix, "--runtime-root", root, "--json"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def share_through_two_workers(prefix: str, workers) -> None:
    a, b = workers(), workers()
    assert a.ok("attach", prefix=prefix) == b.ok("attach", prefix=prefix)
    a.ok("reserve", name="z", size=8192)
    a.ok("write", name="z", offset=8000, hex="5a5a")
    assert b.ok("read", name="z", offset=8000, length=2)["hex"] == "5a5a"


@pytest.fixture
def limited_mount(tmp_path):
    """A hugetlbfs mount capped at 4 MiB: the kernel itself refuses the mmap of more (ENOMEM)."""
    if os.geteuid() != 0:
        pytest.skip("mounting hugetlbfs needs root")
    path = tmp_path / "hugetlbfs-4M"
    path.mkdir()
    subprocess.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M,size=4M", "nodev", str(path)], check=True)
    yield str(path)
    subprocess.run(["umount", str(path)], check=True)


@needs_hugepages
@pytest.mark.parametrize("mode", ["on", "try"])
def test_hugepages_present(start_primary, prefix, root, workers, mode):
    start_primary("--memory", "8M", "--huge-pages", mode)
    s = status(prefix, root)
    assert (s["mode"], s["page_size"], s["memory"], s["fallback_reason"]) == ("hugepages", 2 << 20, 8 << 20, None)
    share_through_two_workers(prefix, workers)
    assert status(prefix, root)["workers"] == 2


def test_off_uses_4k_shared_memory(start_primary, prefix, root, workers):
    start_primary("--memory", "8M", "--huge-pages", "off")
    s = status(prefix, root)
    assert (s["mode"], s["page_size"], s["memory"]) == ("fallback", 4096, 8 << 20)
    assert os.path.getsize(f"/dev/shm/hugeshmd.{prefix}.seg0") == 8 << 20
    share_through_two_workers(prefix, workers)


@pytest.mark.parametrize("absent", ["not-a-mount", "no-such-size"])
def test_hugepages_absent(start_primary, prefix, root, workers, tmp_path, absent):
    option = ["--hugepage-dir", str(tmp_path)] if absent == "not-a-mount" else ["--page-size", "16M"]
    expect = "is not a hugetlbfs mount" if absent == "not-a-mount" else "this kernel has no 16 MiB hugepages"
    refused = Primary(prefix, root, "--memory", "4M", "--huge-pages", "on", *option)
    assert refused.wait_exit() == 1 and expect in refused.text
    assert leftovers(prefix, root) == []
    primary = start_primary("--memory", "4M", "--huge-pages", "try", *option)
    assert "falling back to 4 KiB pages in /dev/shm" in primary.text
    s = status(prefix, root)
    assert s["mode"] == "fallback" and expect in s["fallback_reason"]
    share_through_two_workers(prefix, workers)


@needs_hugepages
def test_hugepages_exhausted(start_primary, prefix, root, workers):
    too_many = free_hugepages() + 8
    refused = Primary(prefix, root, "--memory", f"{too_many * 2}M", "--huge-pages", "on")
    assert refused.wait_exit() == 1
    assert f"asked for {too_many} hugepages of 2 MiB" in refused.text
    assert "reserve more with: echo" in refused.text and "hugepages-2048kB/nr_hugepages" in refused.text
    primary = start_primary("--memory", f"{too_many * 2}M", "--huge-pages", "try")
    assert status(prefix, root)["mode"] == "fallback"
    assert "falling back" in primary.text
    share_through_two_workers(prefix, workers)


@needs_hugepages
def test_kernel_refuses_the_mapping(start_primary, prefix, root, workers, limited_mount):
    # 8 MiB passes the pool check but the mount's size=4M makes mmap fail: ENOMEM, not SIGBUS
    refused = Primary(prefix, root, "--memory", "8M", "--huge-pages", "on", "--hugepage-dir", limited_mount)
    assert refused.wait_exit() == 1
    assert "could not map 8388608 bytes of 2097152-byte hugepages" in refused.text
    assert os.listdir(limited_mount) == [] and leftovers(prefix, root) == []
    start_primary("--memory", "8M", "--huge-pages", "try", "--hugepage-dir", limited_mount)
    assert status(prefix, root)["mode"] == "fallback"
    share_through_two_workers(prefix, workers)
    assert os.listdir(limited_mount) == []


def test_status_without_primary_exits_non_zero(prefix, root):
    done = subprocess.run([PYTHON, "-m", "hugeshmd", "status", "--prefix", prefix, "--runtime-root", root,
                           "--timeout", "0.3"], capture_output=True, text=True)
    assert done.returncode == 1
    assert f"no primary answered for prefix {prefix!r}" in done.stderr


def test_status_table_reads_well(start_primary, prefix, root):
    start_primary("--memory", "4M", "--huge-pages", "off")
    out = subprocess.run([PYTHON, "-m", "hugeshmd", "status", "--prefix", prefix, "--runtime-root", root],
                         check=True, capture_output=True, text=True).stdout
    assert "mode       fallback (huge_pages=off)" not in out  # off is not a fallback reason to report
    lines = dict(line.split(None, 1) for line in out.splitlines())
    assert lines["memory"] == "4 MiB" and lines["zones"] == "0" and lines["state"] == "ready"


def one_gib_pages_ready() -> bool:
    return free_hugepages(1 << 30) >= 1 and hugetlbfs_mount(1 << 30) is not None


@pytest.mark.skipif(not one_gib_pages_ready(),
                    reason="needs a free 1 GiB hugepage and a hugetlbfs of them (scripts/setup-hugepages N 2)")
def test_one_gib_pages(start_primary, prefix, root, workers):
    start_primary("--memory", "1G", "--page-size", "1G", "--huge-pages", "on")
    s = status(prefix, root)
    assert (s["mode"], s["page_size"], s["memory"]) == ("hugepages", 1 << 30, 1 << 30)
    a, b = workers(), workers()
    assert a.ok("attach", prefix=prefix) == b.ok("attach", prefix=prefix)
    zone = a.ok("reserve", name="gig", size=1 << 20, align=1 << 30)
    assert zone["address"] % (1 << 30) == 0 and zone["iova"] % (1 << 30) == 0 and zone["iova"] != zone["address"]
    a.ok("write", name="gig", offset=(1 << 20) - 2, hex="beef")
    assert b.ok("read", name="gig", offset=(1 << 20) - 2, length=2)["hex"] == "beef"
