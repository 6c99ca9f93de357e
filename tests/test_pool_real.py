"""``hugeshmd hugepages`` on this machine: refusals, the real pool, a real mount, real stale instances.

Other tests and benchmarks share the machine's 2 MiB pool, so nothing here lowers
it below what it found, every cleanup is limited to this test's own prefix, and
a mount lives under the test's tmp_path.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PYTHON, leftovers, needs_hugepages

from hugeshmd import _sys
from hugeshmd.daemon import hugepages
from hugeshmd.host import pool
from hugeshmd.sizes import MiB

pytestmark = [pytest.mark.process, pytest.mark.root]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changes the host: needs root")


def hugepages_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "hugeshmd", "hugepages", *args], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize(("args", "code", "message"), [
    (("reserve", "100T"), 1, "the machine's memory"),
    (("reserve", "0"), 1, "ask for 1 page to"),
    (("reserve", "12Q"), 1, "invalid SIZE: not a size: '12Q'"),
    (("reserve", "1G", "--page-size", "4M"), 1, "the kernel has no 4 MiB hugepages (sizes: "),
    (("clear", "--page-size", "lots"), 1, "invalid page size"),
    (("reserve", "2M", "--node", "99"), 1, "no NUMA node 99 (nodes: "),
    (("clear", "--node", "99"), 1, "no NUMA node 99"),
    (("reserve",), 2, "one of the arguments SIZE --config is required"),
    (("reserve", "2M", "--config", "x.toml"), 2, "not allowed with"),
    (("reserve", "--config", "/nonexistent.toml"), 1, "cannot read config file /nonexistent.toml"),
    (("mount", "/proc"), 1, "/proc is a mount point already"),
    (("mount", "/tmp/never-made", "--mode", "999"), 1, "invalid mode '999'"),
    (("unmount", "/proc"), 1, "no hugetlbfs is mounted at /proc"),
])
def test_bad_input_is_refused_before_anything_changes(args: tuple[str, ...], code: int, message: str) -> None:
    done = hugepages_cli(*args)
    assert (done.returncode, done.stdout) == (code, ""), done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not os.path.exists("/tmp/never-made")


def test_show_with_or_without_the_action_name(root: str) -> None:
    keys = {"default_page_size", "pools", "mounts", "instances"}
    for args in (("show", "--json"), ("--json",), ("--json", "show"), ("--runtime-root", root, "show", "--json")):
        done = hugepages_cli(*args)
        assert done.returncode == 0 and set(json.loads(done.stdout)) == keys, args
    table = hugepages_cli("show", "--runtime-root", root).stdout
    assert "SIZE" in table and "PATH" in table and ("PREFIX" in table or "no hugeshmd instance" in table)


def test_reserve_for_a_config_that_needs_nothing(tmp_path: Path) -> None:
    (tmp_path / "unset.toml").write_text('huge_pages = "on"\n')
    (tmp_path / "both.toml").write_text('memory = "2M"\n')
    done = hugepages_cli("reserve", "--config", str(tmp_path / "unset.toml"))
    assert done.returncode == 0 and "no memory set" in done.stdout and "nothing to reserve" in done.stdout
    both = hugepages_cli("reserve", "--config", str(tmp_path / "both.toml"), "--node", "0")
    assert both.returncode == 1 and "--config takes the page size from the file" in both.stderr


@needs_hugepages
def test_reserve_for_a_config_already_covered(tmp_path: Path) -> None:
    (tmp_path / "small.toml").write_text('memory = "4M"\nhuge_pages = "on"\n')
    done = hugepages_cli("reserve", "--config", str(tmp_path / "small.toml"))
    assert done.returncode == 0, done.stderr
    assert "free, enough for memory 4 MiB (2 pages)" in done.stdout and "grew" not in done.stdout


@needs_root
@needs_hugepages
def test_reserve_four_more_pages_then_restore_exactly() -> None:
    found = hugepages.pool(2 * MiB)
    assert found is not None
    try:
        done = hugepages_cli("reserve", f"{(found.persistent + 4) * 2}M")
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.startswith(f"2 MiB pool: {found.persistent + 4} pages (")
        assert done.stdout.rstrip().endswith(f"was {found.persistent}") or "surplus" in done.stdout
        grown = hugepages.pool(2 * MiB)
        assert grown is not None and grown.persistent == found.persistent + 4
    finally:
        restored = pool.set_pool(2 * MiB, found.persistent)
    assert restored.after.persistent == found.persistent


@needs_root
def test_mount_and_unmount_a_real_hugetlbfs(tmp_path: Path) -> None:
    path = tmp_path / "huge"
    nobody, nogroup = pwd.getpwnam("nobody"), grp.getgrgid(pwd.getpwnam("nobody").pw_gid)
    try:
        done = hugepages_cli("mount", str(path), "--owner", "nobody", "--group", nogroup.gr_name,
                             "--mode", "0770", "--size", "7M")
        assert done.returncode == 0, done.stderr
        options = f"pagesize=2M,uid={nobody.pw_uid},gid={nogroup.gr_gid},mode=0770,size={8 * MiB}"
        assert done.stdout == f"mounted hugetlbfs at {path} ({options})\n"
        (mounted,) = [m for m in hugepages.mounts() if m.path == str(path)]
        assert mounted.page_size == 2 * MiB
        # hugetlbfs_show_options: mode without its leading 0, size in bytes
        assert {f"uid={nobody.pw_uid}", f"gid={nogroup.gr_gid}", "mode=770", f"size={8 * MiB}"} <= set(
            mounted.options.split(","))
        st = os.stat(path)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o770, nobody.pw_uid, nogroup.gr_gid)
        again = hugepages_cli("mount", str(path))
        assert again.returncode == 1 and "is a mount point already" in again.stderr
        _unmount_while_busy_is_refused(path)
        gone = hugepages_cli("unmount", str(path))
        assert (gone.returncode, gone.stdout) == (0, f"unmounted the hugetlbfs at {path}\n")
        assert str(path) not in [m.path for m in hugepages.mounts()] and path.is_dir()
    finally:
        if os.path.ismount(path):
            _sys.umount2(str(path))


def _unmount_while_busy_is_refused(path: Path) -> None:
    fd = os.open(path / "held", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        busy = hugepages_cli("unmount", str(path))
        assert busy.returncode == 1 and "is an instance using it?" in busy.stderr
    finally:
        os.close(fd)


@pytest.fixture
def private_mount(tmp_path: Path) -> Iterator[str]:
    """A hugetlbfs of this test's own, limited to 16 MiB: its statvfs counts only our pages,
    whatever else the machine's shared pool is doing. Torn down after the primaries."""
    path = str(tmp_path / "huge")
    pool.mount(path, pool.mount_options(2 * MiB, size=16 * MiB))
    try:
        yield path
    finally:
        _sys.umount2(path, 2)  # MNT_DETACH: goes once nothing uses it, even if a test failed


def _free_in(mount: str) -> int:
    return os.statvfs(mount).f_bfree  # hugetlbfs: pages left under the mount's size= limit


@needs_root
@needs_hugepages
@pytest.mark.parametrize("mode", ["on", "off"])
def test_cleanup_removes_a_killed_primarys_files(private_mount: str, start_primary: Any, prefix: str, root: str,
                                                 mode: str) -> None:
    primary = start_primary("--memory", "8M", "--huge-pages", mode, "--hugepage-dir", private_mount)
    primary.proc.kill()
    primary.wait_exit()
    left = leftovers(prefix, root)
    segment = [path for path in left if ".seg" in path]
    assert len(segment) == 1 and os.path.join(root, prefix) in left
    assert _free_in(private_mount) == (4 if mode == "on" else 8)
    dry = hugepages_cli("cleanup", "--runtime-root", root, "--prefix", prefix, "--dry-run")
    assert f"{prefix}: stale; would free 8 MiB of pages" in dry.stdout and f"would remove {segment[0]}" in dry.stdout
    assert leftovers(prefix, root) == left
    done = hugepages_cli("cleanup", "--runtime-root", root, "--prefix", prefix)
    assert done.returncode == 0, done.stderr
    assert f"{prefix}: stale; freed 8 MiB of pages" in done.stdout
    for path in [*segment, os.path.join(root, prefix, "primary.lock"), os.path.join(root, prefix)]:
        assert f"  removed {path}\n" in done.stdout
    assert leftovers(prefix, root) == []
    assert _free_in(private_mount) == 8  # the kernel took the 4 pages back


@needs_hugepages
def test_cleanup_leaves_a_live_primary_alone(start_primary: Any, prefix: str, root: str, tmp_path: Path) -> None:
    primary = start_primary("--memory", "4M")
    held = leftovers(prefix, root)
    done = hugepages_cli("cleanup", "--runtime-root", root, "--prefix", prefix)
    assert done.stdout == f"{prefix}: live, left alone\n"
    # Under another runtime root its lock is not seen, but the files are mapped by its pid.
    elsewhere = hugepages_cli("cleanup", "--runtime-root", str(tmp_path), "--prefix", prefix)
    assert elsewhere.stdout == f"{prefix}: in use by pid {primary.proc.pid}, left alone\n"
    assert leftovers(prefix, root) == held
    shown = hugepages_cli("show", "--runtime-root", root)
    assert [line for line in shown.stdout.splitlines() if line.startswith(prefix + " ")][0].split()[1] == "live"
