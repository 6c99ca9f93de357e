"""The address window in this process: reserve, conflicts, bounds, release."""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hugeshmd import _sys
from hugeshmd.daemon import hugepages
from hugeshmd.errors import AddressUnavailable
from hugeshmd.shm.window import Window, conflicts

BASE = 0x3000_0000_0000  # far from anything this test process maps
SIZE = 64 << 20


def mapped(base: int, size: int) -> list[str]:
    return conflicts(base, size)


@pytest.fixture
def window():
    w = Window.reserve(BASE, SIZE)
    yield w
    w.release()


def test_reserve_maps_one_prot_none_range(window):
    lines = mapped(BASE, SIZE)
    assert len(lines) == 1 and lines[0].startswith(f"{BASE:x}-{BASE + SIZE:x} ---p")


def test_second_reservation_is_refused_naming_the_first(window):
    with pytest.raises(AddressUnavailable) as info:
        Window.reserve(BASE + (1 << 20), 1 << 20)
    assert info.value.address == BASE + (1 << 20)
    assert info.value.conflicts == mapped(BASE, SIZE)
    assert "--base-address" in str(info.value) and f"{BASE:x}-{BASE + SIZE:x}" in str(info.value)


@pytest.fixture
def shm_file() -> Iterator[Path]:
    """A file on /dev/shm (a tmpfs, as a segment's must be), removed after the test."""
    path = Path(f"/dev/shm/hsdtest-{uuid.uuid4().hex[:10]}")
    yield path
    path.unlink(missing_ok=True)


def test_segment_maps_inside_and_drops_back_to_reserved(window, shm_file):
    path = shm_file
    path.write_bytes(b"x" * (2 << 20))
    window.map(7, BASE + (4 << 20), 2 << 20, str(path), 0)
    assert (_sys.byte_array_type(1).from_address(BASE + (4 << 20)))[0].value == ord("x")
    assert any(line.endswith(str(path)) for line in mapped(BASE, SIZE))
    window.unmap(7)
    assert not any(str(path) in line for line in mapped(BASE, SIZE))
    assert window.segments == {}


def test_a_file_on_another_filesystem_is_never_mapped(window, tmp_path):
    path = tmp_path / "seg"  # pytest's tmp_path: not a hugetlbfs or a tmpfs, as a forged table might name
    path.write_bytes(b"x" * 4096)
    with pytest.raises(ValueError, match="on neither a hugetlbfs nor a tmpfs"):
        window.map(1, BASE, 4096, str(path), 0)
    assert window.segments == {}


def test_a_file_shorter_than_its_segment_is_never_mapped(window, shm_file):
    shm_file.write_bytes(b"x" * 4096)  # a page past the end would be a SIGBUS at the first touch
    with pytest.raises(ValueError, match="holds 4096 bytes, 8192 are mapped: truncated"):
        window.map(1, BASE, 8192, str(shm_file), 0)
    assert window.segments == {}


@pytest.mark.parametrize("address, length", [(BASE - 4096, 8192), (BASE + SIZE - 4096, 8192), (0, 4096)])
def test_map_fixed_never_leaves_the_window(window, address, length):
    fd = os.memfd_create("t")
    try:
        os.ftruncate(fd, length)
        with pytest.raises(ValueError, match="outside the window"):
            window.map_fd(1, address, length, fd, 0)
    finally:
        os.close(fd)
    assert window.segments == {}


def test_release_is_idempotent_and_unmaps_everything():
    w = Window.reserve(BASE, SIZE)
    w.release()
    w.release()
    assert mapped(BASE, SIZE) == []


def test_conflicts_lists_only_overlapping_lines():
    address = _sys.mmap(0, 8192, _sys.PROT_READ, _sys.MAP_PRIVATE | _sys.MAP_ANONYMOUS)
    try:
        assert [line.split()[0] for line in conflicts(address + 4096, 4096)] == [f"{address:x}-{address + 8192:x}"]
        assert conflicts(address + 8192 + (1 << 40), 4096) == []
    finally:
        _sys.munmap(address, 8192)


def test_failed_map_fixed_leaves_no_hole_in_the_window(tmp_path):
    # A hugetlbfs mapping larger than the pool fails with ENOMEM, and Linux has
    # unmapped the range it was to replace by then: the hole the fix refills.
    mount = hugepages.find_mount(2 << 20)
    pool = hugepages.pool(2 << 20)
    if mount is None or pool is None:
        pytest.skip("needs a hugetlbfs mount of 2 MiB pages")
    size = (pool.total + 64) * (2 << 20)
    window = Window.reserve(BASE, size + (2 << 20))
    path = os.path.join(mount.path, f"window-test-{os.getpid()}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        with pytest.raises(OSError) as info:
            window.map_fd(1, BASE + (2 << 20), size, fd, 0)
        assert info.value.errno == errno.ENOMEM
        lines = mapped(BASE, size + (2 << 20))
        covered = sum(int(e, 16) - int(s, 16) for s, e in (line.split()[0].split("-") for line in lines))
        assert covered == size + (2 << 20) and all(" ---p " in line for line in lines)
    finally:
        os.close(fd)
        os.unlink(path)
        window.release()
