"""The zygote of the kill -9 storms (heap_storm.py, channel_storm.py): fork workers in roles, SIGKILL
a random one every few milliseconds, fork a new one in its role, and say what went wrong.

A worker is ``work(role, report)``: it runs until killed, and on a failure of its own writes a
line on the ``report`` descriptor and exits (3). The zygote never attaches, so it holds nothing
a worker could need.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any


def storm(roles: Sequence[Any], work: Callable[[Any, int], None], kills_wanted: int, seconds: float,
          pause: tuple[float, float]) -> dict[str, Any]:
    """Run the storm; {"kills", "bad" (workers that exited other than by SIGKILL), "said"}."""
    read_end, report = os.pipe()
    os.set_blocking(read_end, False)
    rng = random.Random(int(os.environ.get("STORM_SEED", "0")) or None)
    running: dict[int, Any] = {}  # pid -> role

    def spawn(role: Any) -> None:
        pid = os.fork()
        if pid == 0:
            try:
                os.close(read_end)
                work(role, report)
            except BaseException as err:  # noqa: BLE001 - say it, then exit without running the zygote's code
                os.write(report, f"pid {os.getpid()} role {role}: {type(err).__name__}: {err}\n".encode())
                os._exit(4)
            os._exit(0)
        running[pid] = role

    for role in roles:
        spawn(role)
    kills = 0
    bad: list[str] = []
    deadline = time.monotonic() + seconds
    while kills < kills_wanted and time.monotonic() < deadline:
        time.sleep(rng.uniform(*pause))
        victim = rng.choice(list(running))
        os.kill(victim, signal.SIGKILL)
        _, status = os.waitpid(victim, 0)
        if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
            bad.append(f"pid {victim} exited with status {status}")
        kills += 1
        spawn(running.pop(victim))
        while True:  # a worker that failed on its own exits before its kill: reap it too
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            bad.append(f"pid {pid} exited with status {status}")
            spawn(running.pop(pid))
    for pid in list(running):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    os.close(report)
    try:
        said = os.read(read_end, 1 << 20).decode()
    except BlockingIOError:
        said = ""
    return {"kills": kills, "bad": bad, "said": said}
