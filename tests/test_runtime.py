"""Unit tests of hugeshmd.runtime: prefixes, runtime paths, the primary lock, process identity."""

from __future__ import annotations

import fcntl
import io
import os
import subprocess
import types

import pytest

from hugeshmd import runtime
from hugeshmd.errors import InstanceLocked, InvalidArgument
from hugeshmd.runtime import (
    PrimaryLock,
    RuntimePaths,
    primary_alive,
    process_alive,
    process_start_time,
    validate_prefix,
)

# -- prefixes -------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["default", "a", "A-1", "x_y.z", "_x", "a" * 64, "0", "a-", "a.."])
def test_validate_prefix_accepts(prefix: str) -> None:
    assert validate_prefix(prefix) == prefix


@pytest.mark.parametrize(
    "prefix",
    ["", "../x", "..", ".", ".hidden", "-flag", "a/b", "/abs", "a" * 65, "a b", "é", "a\0b", "tab\t", "a:b", "a*"],
)
def test_validate_prefix_rejects(prefix: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid prefix") as info:
        validate_prefix(prefix)
    assert info.value.name == prefix


@pytest.mark.parametrize("prefix", [None, 5, b"default"])
def test_validate_prefix_rejects_non_str(prefix: object) -> None:
    with pytest.raises(InvalidArgument, match="invalid prefix"):
        validate_prefix(prefix)  # type: ignore[arg-type]


@pytest.mark.parametrize("prefix", ["abc\n", "abc\n\n", "\nabc"])
def test_validate_prefix_rejects_newlines(prefix: str) -> None:
    # a regex ending in "$" also matches before a final newline
    with pytest.raises(InvalidArgument, match="invalid prefix"):
        validate_prefix(prefix)


# -- runtime paths ------------------------------------------------------------------------


def test_runtime_paths_of_a_prefix() -> None:
    paths = RuntimePaths.for_prefix("inst", "/run/hsd")
    assert (paths.prefix, paths.root, paths.dir) == ("inst", "/run/hsd", "/run/hsd/inst")
    assert paths.lock == "/run/hsd/inst/primary.lock"
    assert paths.table == "/run/hsd/inst/table"
    assert paths.control == "ipc:///run/hsd/inst/control"
    assert paths.events == "ipc:///run/hsd/inst/events"
    assert paths.socket_paths() == ["/run/hsd/inst/control", "/run/hsd/inst/events"]
    assert paths.segment_stem() == "hugeshmd.inst.seg"


def test_runtime_root_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("HUGESHMD_RUNTIME_ROOT", "/srv/rt")
    assert RuntimePaths.for_prefix("p").dir == "/srv/rt/p"
    assert RuntimePaths.for_prefix("p", "/given").dir == "/given/p"  # an explicit root wins


def test_default_runtime_root(monkeypatch) -> None:
    monkeypatch.delenv("HUGESHMD_RUNTIME_ROOT", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    monkeypatch.setattr(runtime.os, "geteuid", lambda: 0)
    assert RuntimePaths.for_prefix("p").root == "/run/hugeshmd"
    monkeypatch.setattr(runtime.os, "geteuid", lambda: 1000)
    assert RuntimePaths.for_prefix("p").root == "/run/user/1000/hugeshmd"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert RuntimePaths.for_prefix("p").root == "/tmp/hugeshmd-1000/hugeshmd"


def test_runtime_paths_validate_the_prefix() -> None:
    with pytest.raises(InvalidArgument, match="invalid prefix '../etc'"):
        RuntimePaths.for_prefix("../etc", "/run/hsd")


# -- the primary lock ----------------------------------------------------------------------


@pytest.fixture
def lock_path(tmp_path) -> str:
    return str(tmp_path / "primary.lock")


def test_acquire_writes_the_pid_and_holds_the_lock(lock_path: str) -> None:
    lock = PrimaryLock.acquire(lock_path)
    try:
        with open(lock_path) as f:
            assert f.read() == f"{os.getpid()}\n"
        fd = os.open(lock_path, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    finally:
        lock.release()


def test_acquire_twice_raises_instance_locked_naming_the_holder(lock_path: str) -> None:
    lock = PrimaryLock.acquire(lock_path)
    try:
        with pytest.raises(InstanceLocked, match=f"another primary \\(pid {os.getpid()}\\) holds {lock_path}") as info:
            PrimaryLock.acquire(lock_path)
        assert info.value.pid == os.getpid()
        assert info.value.path == lock_path
        # the failed attempt disturbs nothing
        assert primary_alive(lock_path)
        with open(lock_path) as f:
            assert f.read() == f"{os.getpid()}\n"
    finally:
        lock.release()


def test_instance_locked_with_an_unreadable_pid(lock_path: str) -> None:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a holder that wrote no pid (yet)
        with pytest.raises(InstanceLocked, match=r"another primary \(pid None\)") as info:
            PrimaryLock.acquire(lock_path)
        assert info.value.pid is None
    finally:
        os.close(fd)


def test_acquire_replaces_a_stale_pid(lock_path: str) -> None:
    with open(lock_path, "w") as f:
        f.write("99999999999\nleftover text")  # a dead primary's file, lock free
    lock = PrimaryLock.acquire(lock_path)
    try:
        with open(lock_path) as f:
            assert f.read() == f"{os.getpid()}\n"
    finally:
        lock.release()


def test_release_unlinks_and_allows_acquire_again(lock_path: str) -> None:
    lock = PrimaryLock.acquire(lock_path)
    lock.release()
    assert not os.path.exists(lock_path)
    lock.release()  # idempotent
    again = PrimaryLock.acquire(lock_path)
    try:
        assert primary_alive(lock_path)
    finally:
        again.release()


def test_release_without_unlink_keeps_the_file_and_frees_the_lock(lock_path: str) -> None:
    PrimaryLock.acquire(lock_path).release(unlink=False)
    assert os.path.exists(lock_path)
    assert not primary_alive(lock_path)
    PrimaryLock.acquire(lock_path).release()


def test_primary_alive(lock_path: str) -> None:
    assert not primary_alive(lock_path)  # no file
    lock = PrimaryLock.acquire(lock_path)
    assert primary_alive(lock_path)
    assert primary_alive(lock_path)  # probing does not take the lock away
    lock.release()
    assert not primary_alive(lock_path)


def fake_fcntl(on_first_flock) -> tuple[types.SimpleNamespace, list[int]]:
    """An fcntl module whose first flock runs ``on_first_flock`` first; records each fd's inode."""
    inodes: list[int] = []

    def flock(fd: int, operation: int) -> None:
        inodes.append(os.fstat(fd).st_ino)
        if len(inodes) == 1:
            on_first_flock()
        fcntl.flock(fd, operation)

    return types.SimpleNamespace(flock=flock, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB,
                                 LOCK_SH=fcntl.LOCK_SH, LOCK_UN=fcntl.LOCK_UN), inodes


def holds_the_file_at_its_path(lock: PrimaryLock) -> bool:
    assert lock._fd is not None
    own, now = os.fstat(lock._fd), os.stat(lock.path)
    return (own.st_dev, own.st_ino) == (now.st_dev, now.st_ino)


def test_acquire_starts_over_when_the_file_is_unlinked_before_its_flock(lock_path: str, monkeypatch) -> None:
    # An exiting primary unlinks the file between our open() and our flock():
    # the lock we then get is on an inode no one else can find.
    with open(lock_path, "w") as f:
        f.write("4242\n")
    fake, inodes = fake_fcntl(lambda: os.unlink(lock_path))
    monkeypatch.setattr(runtime, "fcntl", fake)
    lock = PrimaryLock.acquire(lock_path)
    try:
        assert len(inodes) == 2
        assert holds_the_file_at_its_path(lock)
        with open(lock_path) as f:
            assert f.read() == f"{os.getpid()}\n"
    finally:
        lock.release()


def test_acquire_starts_over_when_the_file_is_replaced_before_its_flock(lock_path: str, monkeypatch) -> None:
    # Another starter has already created a new file at the path.
    with open(lock_path, "w") as f:
        f.write("4242\n")
    keep = os.open(lock_path, os.O_RDONLY)  # keeps the old inode (and its number) alive

    def replace() -> None:
        os.unlink(lock_path)
        with open(lock_path, "w") as f:
            f.write("")

    fake, inodes = fake_fcntl(replace)
    monkeypatch.setattr(runtime, "fcntl", fake)
    try:
        lock = PrimaryLock.acquire(lock_path)
        try:
            assert len(inodes) == 2
            assert inodes[0] != inodes[1]
            assert inodes[1] == os.stat(lock_path).st_ino
            assert holds_the_file_at_its_path(lock)
        finally:
            lock.release()
    finally:
        os.close(keep)


# -- process identity ---------------------------------------------------------------------


def test_process_start_time_of_this_process() -> None:
    start = process_start_time(os.getpid())
    assert isinstance(start, int)
    assert start > 0
    assert process_start_time(os.getpid()) == start
    assert process_alive(os.getpid(), start)


def test_process_alive_is_false_for_another_start_time() -> None:
    start = process_start_time(os.getpid())
    assert start is not None
    assert not process_alive(os.getpid(), start + 1)
    assert not process_alive(os.getpid(), 0)


def test_process_start_time_of_a_pid_that_cannot_exist() -> None:
    with open("/proc/sys/kernel/pid_max") as f:
        pid_max = int(f.read())
    assert process_start_time(pid_max + 1) is None
    assert not process_alive(pid_max + 1, 12345)


def test_a_reaped_child_is_not_alive() -> None:
    child = subprocess.Popen(["true"])
    start = process_start_time(child.pid)  # alive or a zombie: it has a start time either way
    assert isinstance(start, int)
    assert child.wait(10) == 0
    assert process_start_time(child.pid) is None
    assert not process_alive(child.pid, start)


def test_process_start_time_parses_a_comm_with_spaces_and_parentheses(monkeypatch) -> None:
    # proc(5): field 2 is "(comm)" and comm may hold ") (" itself; field 22 is starttime.
    fields_3_to_21 = ["S"] + [str(n) for n in range(4, 22)]
    stat = f"4242 (evil) (x y) {' '.join(fields_3_to_21)} 987654 0 0 0\n".encode()
    opened: list[str] = []

    def fake_open(path: str, mode: str = "r") -> io.BytesIO:
        opened.append(path)
        return io.BytesIO(stat)

    monkeypatch.setattr(runtime, "open", fake_open, raising=False)
    assert process_start_time(4242) == 987654
    assert opened == ["/proc/4242/stat"]


def test_own_start_time_is_read_once_per_process_and_anew_in_a_child() -> None:
    from hugeshmd.runtime import own_start_time

    assert own_start_time() == process_start_time(os.getpid())
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, str(own_start_time() == process_start_time(os.getpid())).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 16) == b"True"
    os.close(read)
    os.close(write)
