"""Unit tests of hugeshmd.shm.identity: a process as pid plus start time."""

from __future__ import annotations

import io
import os
import subprocess

import pytest

from hugeshmd.shm import identity
from hugeshmd.shm.identity import process_alive, process_start_time, process_state

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


@pytest.mark.process
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

    monkeypatch.setattr(identity, "open", fake_open, raising=False)
    assert process_start_time(4242) == 987654
    assert opened == ["/proc/4242/stat"]


@pytest.mark.process
def test_own_start_time_is_read_once_per_process_and_anew_in_a_child() -> None:
    from hugeshmd.shm.identity import own_start_time

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



@pytest.mark.process
def test_a_zombie_is_not_alive() -> None:
    """A dead process whose parent has not collected it yet keeps its /proc entry, start time and
    all (a primary killed with -9 under a slow parent): it is dead all the same."""
    child = subprocess.Popen(["true"])
    start = process_start_time(child.pid)
    assert isinstance(start, int)
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # until it exits, leaving it unreaped
    assert process_state(child.pid) == "Z" and process_start_time(child.pid) == start
    assert not process_alive(child.pid, start)
    child.wait()
