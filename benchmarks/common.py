"""What every benchmark shares: a primary subprocess, worker subprocesses, statistics, the machine label.

Some facts the benchmarks rely on:

* Timings on a 2-vCPU VM drift (other tenants, frequency, page cache), so a
  figure is always a *median* over repeated runs, and a ratio is always taken
  against a baseline measured in the same run, interleaved with it where the
  runs are long enough for drift to matter.
* A primary is started exactly as a user starts one
  (``python -m hugeshmd primary ...``) with its own prefix and a short runtime
  root under /tmp (an ``ipc://`` path must fit in the 108 bytes of
  ``sun_path``); it is ready when its log says `` ready: `` on stderr, so no
  benchmark sleeps to wait for it.
* Whatever happens, a primary is stopped by its PID with SIGTERM in a
  ``finally``, and then the hugepage files, shm objects and runtime files of its
  prefix are looked for. Anything found is reported (and removed, so the
  machine is left clean), and :data:`LEFTOVERS` makes the run fail.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "PYTHON", "REPO", "MiB", "GiB", "LEFTOVERS", "PrimaryProcess", "run_worker", "worker_reply",
    "free_hugepages", "hugetlbfs_mount", "median", "percentile", "summary", "metric",
    "machine_label", "code_label", "format_seconds", "format_size", "unique_prefix",
    "POOL_CHANGES", "pool_pages", "available_pages", "mount_of", "hugepages_available",
]  # fmt: skip

PYTHON = sys.executable
REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30
HUGEPAGE = 2 * MiB
GIGAPAGE = GiB
READY_TIMEOUT = 120.0  # mapping 1 GiB takes well under a second; this is for a loaded CI machine
STOP_TIMEOUT = 60.0
STEM = "hugeshmd.{prefix}."  # hugeshmd.shm.paths.RuntimePaths.segment_stem, less "seg"

LEFTOVERS: list[str] = []  # every file a primary of ours left behind, over the whole run
POOL_CHANGES: list[str] = []  # every change this run made to a hugepage pool, and its undoing


# -- the host ------------------------------------------------------------------


def _meminfo() -> dict[str, int]:
    values = {}
    with open("/proc/meminfo") as lines:
        for line in lines:
            key, _, rest = line.partition(":")
            fields = rest.split()
            if fields and fields[0].isdigit():
                values[key] = int(fields[0])
    return values


def free_hugepages() -> int:
    """2 MiB hugepages free for a new mapping: HugePages_Free less HugePages_Rsvd (/proc/meminfo)."""
    info = _meminfo()
    if info.get("Hugepagesize") != HUGEPAGE // 1024:
        return 0  # the meminfo counters are of the default size, which is not 2 MiB here
    return max(0, info.get("HugePages_Free", 0) - info.get("HugePages_Rsvd", 0))


def hugetlbfs_mount() -> str | None:
    """The first hugetlbfs mount of 2 MiB pages, read from /proc/mounts without hugeshmd code."""
    default_2m = _meminfo().get("Hugepagesize") == HUGEPAGE // 1024
    with open("/proc/mounts") as lines:
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[2] != "hugetlbfs":
                continue
            options = fields[3].split(",")
            sizes = [o.split("=", 1)[1] for o in options if o.startswith("pagesize=")]
            if (sizes and sizes[0].upper() in ("2M", "2048K")) or (not sizes and default_2m):
                return fields[1].replace("\\040", " ")
    return None


def hugepage_dirs() -> list[str]:
    with open("/proc/mounts") as lines:
        rows = [line.split() for line in lines]
    return [f[1].replace("\\040", " ") for f in rows if len(f) > 2 and f[2] == "hugetlbfs"]


# -- hugepage pools of any size, and growing them for a run -------------------------------
#
# Some facts about the pools (Documentation/admin-guide/mm/hugetlbpage.rst):
# writing nr_hugepages asks the kernel for that many persistent pages; it
# grants what it can find (contiguous free memory, so 1 GiB pages often fail
# after boot) and the file reads back what it got. Lowering it frees only free
# pages: pages in use become surplus and are freed when released, so setting
# the old value back never takes a page from a process using it.


def _pool_file(page_size: int, name: str) -> str:
    return f"/sys/kernel/mm/hugepages/hugepages-{page_size // 1024}kB/{name}_hugepages"


def _read_number(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 0


def pool_pages(page_size: int) -> dict[str, int]:
    """total, free, reserved and surplus pages of the global pool of ``page_size`` (zeros if none)."""
    return {key: _read_number(_pool_file(page_size, name))
            for key, name in (("total", "nr"), ("free", "free"), ("reserved", "resv"), ("surplus", "surplus"))}


def available_pages(page_size: int) -> int:
    """Pages of ``page_size`` a new mapping can have: free less reserved."""
    counts = pool_pages(page_size)
    return max(0, counts["free"] - counts["reserved"])


def mount_of(page_size: int) -> str | None:
    """The first hugetlbfs mount of ``page_size`` pages, from /proc/mounts (no hugeshmd code)."""
    default = _meminfo().get("Hugepagesize", 0) * 1024
    with open("/proc/mounts") as lines:
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[2] != "hugetlbfs":
                continue
            sizes = [o.split("=", 1)[1] for o in fields[3].split(",") if o.startswith("pagesize=")]
            size = _parse_pagesize(sizes[0]) if sizes else default
            if size == page_size:
                return fields[1].replace("\\040", " ")
    return None


def _parse_pagesize(text: str) -> int:
    units = {"K": 1024, "M": MiB, "G": GiB}
    text = text.upper().rstrip("B")
    return int(text[:-1]) * units[text[-1]] if text and text[-1] in units else int(text or 0)


@contextmanager
def hugepages_available(page_size: int, pages: int, notes: list[str]) -> Iterator[int]:
    """Make ``pages`` pages of ``page_size`` available for the ``with`` block; yields how many are.

    Raises the pool's nr_hugepages by the shortfall only (root only), reads
    back what the kernel granted, and afterwards sets the value it found back,
    unless someone else changed it meanwhile (then it says so and leaves it).
    What it did goes into ``notes`` and :data:`POOL_CHANGES`.
    """
    path = _pool_file(page_size, "nr")
    found = _read_number(path)
    short = pages - available_pages(page_size)
    granted = None
    if short > 0 and os.access(path, os.W_OK):
        try:
            with open(path, "w") as f:
                f.write(str(found + short))
        except OSError as err:
            _pool_note(notes, f"could not raise {path} to {found + short}: {err.strerror}")
        granted = _read_number(path)
        _pool_note(notes, f"{page_size >> 20} MiB pool raised from {found} to {granted} pages "
                          f"(asked {found + short}); {available_pages(page_size)} available for the run")
    try:
        yield available_pages(page_size)
    finally:
        if granted is not None:
            now = _read_number(path)
            if now == granted:
                with open(path, "w") as f:
                    f.write(str(found))
                _pool_note(notes, f"{page_size >> 20} MiB pool set back to {found} pages "
                                  f"(reads {_read_number(path)})")
            else:
                _pool_note(notes, f"{page_size >> 20} MiB pool changed by someone else meanwhile "
                                  f"({granted} -> {now}): left as it is")


def _pool_note(notes: list[str], text: str) -> None:
    notes.append(text)
    POOL_CHANGES.append(text)
    print(f"benchmarks: {text}", file=sys.stderr, flush=True)


def machine_label() -> dict[str, Any]:
    """What the figures were measured on: kernel, CPU, cores, Python, hugepages, date."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as lines:
            cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "kernel": platform.release(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "hugepages_free": free_hugepages(),
        "hugetlbfs": hugetlbfs_mount(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],  # other work on the machine skews every figure
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
    }


def code_label() -> dict[str, Any]:
    """Which hugeshmd was measured: the commit, whether hugeshmd/ differs from it, a hash of its sources."""
    import hashlib

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    digest = hashlib.sha256()
    for path in sorted((REPO / "hugeshmd").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    changed = git("status", "--porcelain", "--", "hugeshmd")
    return {"commit": git("rev-parse", "HEAD") or None, "hugeshmd_modified": bool(changed),
            "hugeshmd_sha256": digest.hexdigest()[:16]}


def unique_prefix(kind: str = "b") -> str:
    return f"{kind}{uuid.uuid4().hex[:10]}"


# -- a primary subprocess -----------------------------------------------------------


class PrimaryProcess:
    """``python -m hugeshmd primary`` with its own prefix and runtime root. A context manager.

    ``memory`` is passed as ``--memory`` (bytes); ``huge_pages`` as ``--huge-pages``.
    :attr:`mode` is ``hugepages`` or ``fallback``, read off the ready line.
    """

    def __init__(self, memory: int, huge_pages: str = "on", *, python: str = PYTHON, args: Sequence[str] = ()) -> None:
        self.memory = memory
        self.prefix = unique_prefix()
        self.root = tempfile.mkdtemp(prefix="hsb", dir="/tmp")
        self.log: list[str] = []
        self.mode = "unknown"
        self.ready_line = ""
        self.leftovers: list[str] = []
        self._ready = threading.Event()
        cmd = [python, "-m", "hugeshmd", "primary", "--prefix", self.prefix, "--runtime-root", self.root,
               "--memory", str(memory), "--huge-pages", huge_pages, *args]
        try:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, text=True)
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            if " ready: " in line and not self._ready.is_set():
                self.ready_line = line.strip()
                self.mode = "fallback" if "fallback" in line else "hugepages"
                self._ready.set()
        self._ready.set()  # it exited: wake the waiter

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> PrimaryProcess:
        if not self._ready.wait(timeout) or self.proc.poll() is not None or not self.ready_line:
            raise RuntimeError(f"primary {self.prefix} did not become ready:\n{''.join(self.log)}")
        return self

    def stop(self) -> list[str]:
        """SIGTERM by PID, wait, then look for (and remove) anything the primary left; returns it."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._reader.join(STOP_TIMEOUT)
        self.leftovers = check_leftovers(self.prefix, self.root)
        shutil.rmtree(self.root, ignore_errors=True)
        return self.leftovers

    def __enter__(self) -> PrimaryProcess:
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def check_leftovers(prefix: str, root: str | None) -> list[str]:
    """Files of ``prefix`` still present: hugepage files, shm objects, its runtime dir.

    Each is reported on stderr, recorded in :data:`LEFTOVERS` and removed.
    """
    stem = STEM.format(prefix=prefix)
    found = []
    if root is not None and os.path.lexists(os.path.join(root, prefix)):
        found.append(os.path.join(root, prefix))
    for directory in hugepage_dirs() + ["/dev/shm"]:
        try:
            found += [os.path.join(directory, n) for n in os.listdir(directory) if n.startswith(stem)]
        except OSError:
            pass
    for path in found:
        print(f"benchmarks: LEFTOVER {path} (prefix {prefix}); removing it", file=sys.stderr)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                pass
    LEFTOVERS.extend(found)
    return found


# -- worker subprocesses -----------------------------------------------------------


def run_worker(module: str, request: dict[str, Any], *, timeout: float = 300.0) -> dict[str, Any]:
    """Run ``python -m <module> --worker '<json>'`` and return the JSON of its last stdout line."""
    cmd = [PYTHON, "-m", module, "--worker", json.dumps(request)]
    done = subprocess.run(cmd, cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"worker {module} failed (exit {done.returncode}):\n{done.stderr}{done.stdout}")
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def release_together(procs: Sequence[subprocess.Popen[str]], what: str) -> None:
    """Wait for each worker's "ready" line, then send every one "go": they start their timed
    part together."""
    for proc in procs:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{what} worker {proc.pid} did not start (exit {proc.poll()})")
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()


def worker_reply(reply: dict[str, Any]) -> None:
    """Print a worker's reply as the last line of its stdout."""
    print(json.dumps(reply), flush=True)


# -- statistics -----------------------------------------------------------------


def percentile(values: Iterable[float], p: float) -> float:
    """The ``p``-th percentile (0-100), interpolating linearly between ranks."""
    data = sorted(values)
    if not data:
        raise ValueError("no samples")
    rank = (len(data) - 1) * p / 100.0
    low = int(rank)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (rank - low)


def median(values: Iterable[float]) -> float:
    return percentile(values, 50.0)


def summary(samples: Sequence[float]) -> dict[str, float]:
    """median, p10, p90, min, max and n of ``samples`` (seconds)."""
    return {"median": median(samples), "p10": percentile(samples, 10), "p90": percentile(samples, 90),
            "p99": percentile(samples, 99), "min": min(samples), "max": max(samples), "n": len(samples)}


def metric(samples: Sequence[float], *, baseline: Sequence[float] | None = None, baseline_name: str | None = None,
           target: float | None = None, target_kind: str = "max", quick: bool = False,
           note: str = "", unit: str = "s") -> dict[str, Any]:
    """One row of results: the samples' summary, the baseline's median, the ratio, the verdict.

    ``target_kind`` is ``max`` (the median must be at most ``target`` seconds),
    ``ratio`` (median / baseline median must be at most ``target``), ``min_ratio``
    (that ratio must be at least ``target``: a throughput against its baseline) or ``min``
    (the median must be at least ``target``: a rate). In quick mode
    sizes are scaled down, so no verdict is given (``pass`` is None).
    """
    row: dict[str, Any] = summary(samples)
    row["unit"] = unit
    row["baseline_name"] = baseline_name
    row["baseline"] = median(baseline) if baseline else None
    row["baseline_p90"] = percentile(baseline, 90) if baseline else None
    row["ratio"] = row["median"] / row["baseline"] if row["baseline"] else None
    row["target"] = target
    row["target_kind"] = target_kind if target is not None else None
    verdict = None
    if target is not None and not quick:
        value = row["ratio"] if target_kind in ("ratio", "min_ratio") else row["median"]
        verdict = value is not None and (value >= target if target_kind in ("min_ratio", "min") else value <= target)
    row["pass"] = verdict
    row["note"] = note
    return row


# -- display --------------------------------------------------------------------------


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-6:
        return f"{seconds * 1e9:.0f} ns"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.2f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"


def format_size(size: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"
