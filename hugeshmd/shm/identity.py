"""Which process is which, across pid reuse: a pid and its start time.

A pid alone names a process only while it lives: the kernel hands it out again.
The start time (proc(5), ``/proc/<pid>/stat`` field 22, clock ticks since boot)
does not repeat for a pid within one boot, so the pair names one process for
good. The primary records its own pair in the table; each worker entry and each
zone owner (:class:`hugeshmd.shm.layout.Owner`) carries one.
"""

from __future__ import annotations

import os

__all__ = ["process_start_time", "own_start_time", "process_alive", "process_state", "describe_holder"]


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (proc(5) stat field 22).

    With the pid it identifies a process across pid reuse. None if it is gone.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            raw = stat.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may contain spaces and parentheses; the fields after the
    # last ")" are plain numbers, starting with field 3 (state).
    return int(raw[raw.rindex(b")") + 2 :].split()[19])


_own: tuple[int, int | None] = (0, None)  # (pid, start time) of this process, read once per pid


def own_start_time() -> int:
    """This process's start time; read from /proc once per process (a forked child has its own)."""
    global _own
    pid = os.getpid()
    if _own[0] != pid:
        _own = (pid, process_start_time(pid))
    return _own[1] or 0


def process_alive(pid: int, start: int) -> bool:
    """True while the process that had ``pid`` and ``start`` still runs: not gone, not another
    process that reuses the pid, and not a zombie (dead, its exit status not yet collected)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            raw = stat.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    fields = raw[raw.rindex(b")") + 2 :].split()
    return fields[0] != b"Z" and int(fields[19]) == start


def process_state(pid: int) -> str | None:
    """The state letter of ``pid`` (proc(5) stat field 3: ``R``, ``S``, ``T`` stopped, ``t``
    stopped by a tracer, ``D``, ``Z``...), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            raw = stat.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw[raw.rindex(b")") + 2 :].split()[0].decode()


def describe_holder(pid: int) -> str:
    """``pid 42``, ``pid 42 (stopped)`` or ``pid 42 (gone)``: a lock holder, for an error message."""
    if pid <= 0:
        return "an unknown process"
    state = process_state(pid)
    if state is None:
        return f"pid {pid} (gone)"
    return f"pid {pid} (stopped)" if state in ("T", "t") else f"pid {pid}"
