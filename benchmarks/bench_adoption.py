"""adoption: a primary adopting 1 GiB after a kill -9, against a fresh start of the same 1 GiB.

Each round, in this order (5 rounds, after one discarded warm-up of each):

* **fresh**: a worker process runs ``Primary(config).start()`` for a new prefix
  of 1 GiB of 2 MiB pages (mapping and populating: the kernel zeroes every
  page), timed with ``perf_counter``, then ``shutdown()``.
* **adopt**: a primary subprocess starts the same 1 GiB for another prefix; a
  watcher process attaches to it and reserves a zone; the primary is killed
  with SIGKILL; a worker process then runs ``Primary(config).start()`` for that
  prefix, which adopts the instance (re-maps the populated pages, no zeroing),
  timed the same way. The watcher polls ``shm.primary`` and records when it
  sees the new primary, ready; the figure is that moment minus the moment the
  adopter's ``start()`` began (both CLOCK_MONOTONIC, which every process
  shares): an upper bound of the lag after it is ready, which it becomes last.
* Both also timed as whole processes: ``python -m hugeshmd primary`` from
  ``Popen`` to its ``ready:`` log line (interpreter and imports included).

Targets (issue 9): adopt start <= 0.25 x fresh start (in-process start, same
run); the old worker sees the new primary within 1 s.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from .common import (
    HUGEPAGE,
    PYTHON,
    READY_TIMEOUT,
    REPO,
    MiB,
    check_leftovers,
    hugepages_available,
    metric,
    run_worker,
    unique_prefix,
    worker_reply,
)

RATIO_TARGET = 0.25
SEEN_TARGET = 1.0

WATCH = """
import json, sys, time, hugeshmd
shm = hugeshmd.attach(sys.argv[1], timeout=30, runtime_root=sys.argv[2])
shm.reserve("kept", 4096)[:4] = b"kept"
old = shm.primary.pid
print("attached", flush=True)
while True:
    seen = shm.primary
    if seen.pid != old and seen.alive and seen.state == "ready":
        break
    time.sleep(0.001)
print(json.dumps({"seen": time.monotonic(), "kept": bytes(shm.lookup("kept")[:4]) == b"kept"}), flush=True)
"""


def run(quick: bool) -> dict[str, Any]:
    memory = 16 * MiB if quick else 1024 * MiB
    rounds = 2 if quick else 5
    huge = "try" if quick else "on"
    notes: list[str] = []
    fresh: list[float] = []
    adopt: list[float] = []
    fresh_proc: list[float] = []
    adopt_proc: list[float] = []
    seen: list[float] = []
    with hugepages_available(HUGEPAGE, 2 * memory // HUGEPAGE + 8, notes):
        for i in range(rounds + 1):  # the first round warms up and is dropped
            f = run_worker(__name__, {"mode": "fresh", "memory": memory, "huge": huge})
            a = _adopt_round(memory, huge)
            fp, ap = _whole_process(memory, huge)
            if i:
                fresh.append(f["start"])
                adopt.append(a["start"])
                seen.append(a["seen_after"])
                fresh_proc.append(fp)
                adopt_proc.append(ap)
    size = f"{memory >> 20} MiB" if memory < 1024 * MiB else f"{memory >> 30} GiB"
    metrics = {
        f"adopt start, {size}": metric(adopt, baseline=fresh, baseline_name=f"fresh start, {size}", target=RATIO_TARGET,
                                     target_kind="ratio", quick=quick,
                                     note="Primary.start() in-process: re-map populated pages vs populate"),
        "adopt, whole process": metric(adopt_proc, baseline=fresh_proc, baseline_name="fresh, whole process",
                                       note="Popen to the ready line: interpreter and imports included"),
        "old worker sees the new primary": metric(seen, target=SEEN_TARGET, quick=quick,
                                                  note="from the adopter's start() (bounds the lag after "
                                                       "ready), by shm.primary"),
        f"baseline: fresh start, {size}": metric(fresh, note="Primary.start(): map and populate"),
    }
    return {"name": "adoption", "params": {"memory": memory, "rounds": rounds, "huge_pages": huge},
            "metrics": metrics, "notes": notes}


def _primary_start(prefix: str, root: str, memory: int, huge: str) -> tuple[float, Any]:
    from hugeshmd.daemon import config as hconfig
    from hugeshmd.daemon.primary import Primary

    conf = hconfig.load(None, {"prefix": prefix, "memory": memory, "huge_pages": huge, "runtime_root": root})
    primary = Primary(conf)
    t0 = time.perf_counter()
    primary.start()
    return time.perf_counter() - t0, primary


def _adopt_round(memory: int, huge: str) -> dict[str, Any]:
    prefix, root = unique_prefix(), tempfile.mkdtemp(prefix="hsb", dir="/tmp")
    first = _spawn_primary(prefix, root, memory, huge)
    watcher = None
    try:
        _wait_ready(first)
        watcher = subprocess.Popen([PYTHON, "-c", WATCH, prefix, root], cwd=REPO, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, text=True)
        assert watcher.stdout is not None and watcher.stdout.readline().strip() == "attached"
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait()
        request = {"mode": "adopt", "prefix": prefix, "root": root, "memory": memory, "huge": huge}
        adopter = subprocess.Popen([PYTHON, "-m", __name__, "--worker", json.dumps(request)], cwd=REPO,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert adopter.stdout is not None and adopter.stdin is not None
            reply = json.loads(adopter.stdout.readline())  # it adopted and serves until told to stop
            out = json.loads(watcher.stdout.readline())
            adopter.stdin.close()
            adopter.wait(60)
        finally:
            if adopter.poll() is None:
                adopter.kill()
                adopter.wait()
            if adopter.stdout is not None:
                adopter.stdout.close()
        if not out["kept"] or reply["adoptions"] != 1:
            raise RuntimeError(f"not adopted whole: {reply}, {out}")
        # from the moment start() began: an upper bound of the lag after ready (it sets ready last)
        return {"start": reply["start"], "seen_after": out["seen"] - reply["began_at"]}
    finally:
        if watcher is not None:
            watcher.kill()
            watcher.wait()
            if watcher.stdout is not None:
                watcher.stdout.close()
        first.stop()
        check_leftovers(prefix, root)
        shutil.rmtree(root, ignore_errors=True)


class _Spawned:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.started = time.monotonic()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def _spawn_primary(prefix: str, root: str, memory: int, huge: str) -> _Spawned:
    cmd = [PYTHON, "-m", "hugeshmd", "primary", "--prefix", prefix, "--runtime-root", root, "--memory", str(memory),
           "--huge-pages", huge]
    return _Spawned(subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True))


def _wait_ready(spawned: _Spawned) -> float:
    """Seconds from Popen to the ready line (the primary's own signal)."""
    assert spawned.proc.stderr is not None
    deadline = spawned.started + READY_TIMEOUT
    for line in spawned.proc.stderr:
        if " ready: " in line:
            return time.monotonic() - spawned.started
        if time.monotonic() > deadline:
            break
    raise RuntimeError(f"primary never became ready (exit {spawned.proc.poll()})")


def _whole_process(memory: int, huge: str) -> tuple[float, float]:
    """(fresh, adopt) start-to-ready of whole primary processes, the adopter after a kill -9."""
    prefix, root = unique_prefix(), tempfile.mkdtemp(prefix="hsb", dir="/tmp")
    try:
        first = _spawn_primary(prefix, root, memory, huge)
        fresh = _wait_ready(first)
        os.kill(first.proc.pid, signal.SIGKILL)
        first.stop()
        second = _spawn_primary(prefix, root, memory, huge)
        try:
            adopted = _wait_ready(second)
        finally:
            second.stop()
        return fresh, adopted
    finally:
        check_leftovers(prefix, root)
        shutil.rmtree(root, ignore_errors=True)


def worker(request: dict[str, Any]) -> None:
    if request["mode"] == "fresh":
        prefix, root = unique_prefix(), tempfile.mkdtemp(prefix="hsb", dir="/tmp")
        try:
            took, primary = _primary_start(prefix, root, request["memory"], request["huge"])
            primary.shutdown()
        finally:
            check_leftovers(prefix, root)
            shutil.rmtree(root, ignore_errors=True)
        worker_reply({"start": took})
        return
    began_at = time.monotonic()
    took, primary = _primary_start(request["prefix"], request["root"], request["memory"], request["huge"])
    try:
        worker_reply({"start": took, "began_at": began_at, "adoptions": primary.table.adoptions()})
        sys.stdin.read()  # serve until the parent has the watcher's answer and closes our stdin
    finally:
        primary.shutdown()


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(json.loads(sys.argv[2]))
