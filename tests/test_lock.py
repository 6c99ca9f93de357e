"""Unit tests of hugeshmd.shm.lock: the primary's lifetime lock."""

from __future__ import annotations

import fcntl
import os
import types

import pytest

from hugeshmd.errors import InstanceLocked
from hugeshmd.shm import lock as lock_mod
from hugeshmd.shm.lock import PrimaryLock, primary_alive

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
    monkeypatch.setattr(lock_mod, "fcntl", fake)
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
    monkeypatch.setattr(lock_mod, "fcntl", fake)
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
