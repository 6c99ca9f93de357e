"""What the host holds: pools, mounts, and which instance holds which hugepage files.

An instance's files are ``hugeshmd.<prefix>.seg<N>`` in a hugetlbfs mount or
/dev/shm (:mod:`hugeshmd.shm.paths` spells them). A prefix is *live* while its
primary lock is held under the runtime root we look in. A primary run with
another runtime root holds a lock we do not see, so before calling files
*stale* we also look for a process that maps them (``/proc/<pid>/maps`` names
the file of every file mapping, proc(5)); such files are *in use*. Reading
another user's maps needs root; unprivileged, only our own processes are seen.

``cleanup`` removes a stale instance's files through the same path a starting
primary uses (:mod:`hugeshmd.daemon.predecessor`), holding the instance's lock
while it works. Like :mod:`hugeshmd.daemon.hugepages`, every reader takes the
roots it reads (``proc_mounts``, ``proc``, ...) so tests can fake them.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from ..daemon import hugepages, predecessor
from ..daemon.hugepages import MOUNT_HINT
from ..errors import InvalidArgument
from ..shm.lock import primary_alive
from ..shm.paths import RuntimePaths, validate_prefix
from ..sizes import GiB, MiB, format_size

__all__ = ["Instance", "Cleaned", "instances", "report", "format_report", "cleanup"]


@dataclass(frozen=True)
class Instance:
    """What one prefix holds: its segment files, their allocated bytes, its primary's state.

    ``state`` is ``live`` (its primary lock is held), ``in use`` (no lock under
    this runtime root, but ``pids`` map its files), ``stale`` (neither) or
    ``unknown`` (the lock could not be probed).
    """

    prefix: str
    state: str
    files: list[str]
    allocated: int
    pids: list[int]
    runtime_dir: str | None


def _is_prefix(name: str) -> bool:
    try:
        validate_prefix(name)
    except InvalidArgument:
        return False
    return True


def _runtime_dirs(root: str) -> list[str]:
    """Prefixes that have a runtime dir under ``root``."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    return [name for name in names if _is_prefix(name) and os.path.isdir(os.path.join(root, name))]


def _mappers(paths: set[str], proc: str) -> dict[str, list[int]]:
    """For each of ``paths`` that some process maps, those processes' pids."""
    found: dict[str, list[int]] = {}
    try:
        pids = sorted(int(name) for name in os.listdir(proc) if name.isdigit())
    except OSError:
        pids = []
    for pid in pids:
        try:
            with open(os.path.join(proc, str(pid), "maps"), encoding="utf-8", errors="surrogateescape") as file:
                text = file.read()
        except OSError:  # gone, or another user's without root
            continue
        if "hugeshmd." not in text:
            continue
        mapped = {fields[5] for fields in (line.split(maxsplit=5) for line in text.splitlines()) if len(fields) > 5}
        for path in paths & mapped:
            found.setdefault(path, []).append(pid)
    return found


def _allocated(path: str) -> int:
    """Bytes a file holds (st_blocks: hugetlbfs and tmpfs count the pages really allocated)."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def _state(paths: RuntimePaths, pids: list[int]) -> str:
    try:
        if primary_alive(paths.lock):
            return "live"
    except OSError:
        return "unknown"
    return "in use" if pids else "stale"


def instances(runtime_root: str | None = None, proc_mounts: str = "/proc/self/mounts", meminfo: str = "/proc/meminfo",
              shm: str = "/dev/shm", proc: str = "/proc") -> list[Instance]:
    """Every prefix with segment files in :func:`segment_dirs` or a runtime dir under
    ``runtime_root`` (default as for a primary), by prefix. Never raises."""
    files = predecessor.segment_files(hugepages.segment_dirs(proc_mounts, meminfo, shm))
    root = RuntimePaths.for_prefix("default", runtime_root).root
    mappers = _mappers({path for paths in files.values() for path in paths}, proc)
    found = []
    for prefix in sorted(set(files) | set(_runtime_dirs(root))):
        paths = RuntimePaths(prefix, root)
        held = files.get(prefix, [])
        pids = sorted({pid for path in held for pid in mappers.get(path, [])})
        runtime_dir = paths.dir if os.path.isdir(paths.dir) else None
        found.append(Instance(prefix, _state(paths, pids), held, sum(map(_allocated, held)), pids, runtime_dir))
    return found


def report(
    sysfs: str = "/sys", proc_mounts: str = "/proc/self/mounts", meminfo: str = "/proc/meminfo",
    runtime_root: str | None = None, shm: str = "/dev/shm", proc: str = "/proc",
) -> dict[str, Any]:
    """A JSON-able dict: ``default_page_size``, ``pools``, ``mounts``, ``instances``. Never raises."""
    return {
        "default_page_size": hugepages.default_page_size(meminfo),
        "pools": [asdict(found) for found in hugepages.pools(sysfs)],
        "mounts": [asdict(found) for found in hugepages.mounts(proc_mounts, meminfo)],
        "instances": [asdict(found) for found in instances(runtime_root, proc_mounts, meminfo, shm, proc)],
    }


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def _pool_row(entry: dict[str, Any]) -> list[str]:
    node = "all" if entry["node"] is None else str(entry["node"])
    counts = [str(entry[key]) for key in ("total", "free", "reserved", "surplus")]
    free_bytes = format_size(entry["free"] * entry["page_size"])
    return [format_size(entry["page_size"]), node, *counts, free_bytes]


def _pool_lines(pool_entries: list[dict[str, Any]]) -> list[str]:
    if not pool_entries:
        return ["no hugepage support: the kernel has no /sys/kernel/mm/hugepages"]
    header = ["SIZE", "NODE", "TOTAL", "FREE", "RESERVED", "SURPLUS", "FREE BYTES"]
    lines = _table(header, [_pool_row(entry) for entry in pool_entries])
    global_entries = [entry for entry in pool_entries if entry["node"] is None]
    if all(entry["total"] == 0 for entry in global_entries):
        sizes = [entry["page_size"] for entry in global_entries]
        size = 2 * MiB if 2 * MiB in sizes or not sizes else sizes[0]
        lines.append(
            f"no hugepages reserved; reserve some with: {hugepages.reserve_hint(size, max(1, GiB // size))}"
        )
    return lines


def _mount_lines(mount_entries: list[dict[str, Any]]) -> list[str]:
    if not mount_entries:
        return [f"no hugetlbfs mounted; mount one with: {MOUNT_HINT}"]
    rows = [[m["path"], format_size(m["page_size"]), m["options"]] for m in mount_entries]
    return _table(["PATH", "PAGE SIZE", "OPTIONS"], rows)


def _instance_row(entry: dict[str, Any]) -> list[str]:
    state = entry["state"]
    if state == "in use":
        state += f" (pid {', '.join(map(str, entry['pids']))})"
    where = sorted({os.path.dirname(path) for path in entry["files"]})
    return [entry["prefix"], state, str(len(entry["files"])), format_size(entry["allocated"]), ", ".join(where)]


def _instance_lines(instance_entries: list[dict[str, Any]]) -> list[str]:
    if not instance_entries:
        return ["no hugeshmd instance holds files"]
    header = ["PREFIX", "STATE", "FILES", "ALLOCATED", "IN"]
    lines = _table(header, [_instance_row(entry) for entry in instance_entries])
    if any(entry["state"] == "stale" for entry in instance_entries):
        lines.append("stale files pin their pages; remove them with: hugeshmd hugepages cleanup")
    return lines


def format_report(report: dict[str, Any]) -> str:
    """:func:`report`'s dict as tables, with hints; KeyError if a key is missing."""
    default = report["default_page_size"]
    head = f"default page size: {format_size(default) if default else 'unknown'}"
    lines = [head, "", *_pool_lines(report["pools"]), "", *_mount_lines(report["mounts"]),
             "", *_instance_lines(report["instances"])]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Cleaned:
    """One prefix :func:`cleanup` looked at: ``removed`` is empty unless it was stale."""

    instance: Instance
    removed: list[str]
    dry_run: bool = False

    def describe(self) -> str:
        found = self.instance
        if found.state != "stale":
            pids = f" by pid {', '.join(map(str, found.pids))}" if found.state == "in use" else ""
            return f"{found.prefix}: {found.state}{pids}, left alone"
        if not self.removed:
            return f"{found.prefix}: a primary started meanwhile; it removes its own stale files"
        verb = "would remove" if self.dry_run else "removed"
        freed = "would free" if self.dry_run else "freed"
        return "\n".join([f"{found.prefix}: stale; {freed} {format_size(found.allocated)} of pages"]
                         + [f"  {verb} {path}" for path in self.removed])


def _runtime_files(paths: RuntimePaths) -> list[str]:
    try:
        return sorted(os.path.join(paths.dir, name) for name in os.listdir(paths.dir))
    except OSError:
        return []


def cleanup(runtime_root: str | None = None, prefixes: list[str] | None = None, dry_run: bool = False,
            proc_mounts: str = "/proc/self/mounts", meminfo: str = "/proc/meminfo", shm: str = "/dev/shm",
            proc: str = "/proc") -> list[Cleaned]:
    """Remove the files of every stale instance (of ``prefixes`` only, if given): only those
    whose primary lock is free and whose files no process maps. Never a live one's."""
    dirs = hugepages.segment_dirs(proc_mounts, meminfo, shm)
    done = []
    for found in instances(runtime_root, proc_mounts, meminfo, shm, proc):
        if prefixes and found.prefix not in prefixes:
            continue
        paths = RuntimePaths.for_prefix(found.prefix, runtime_root)
        if found.state != "stale":
            done.append(Cleaned(found, []))
        elif dry_run:
            done.append(Cleaned(found, found.files + _runtime_files(paths), dry_run=True))
        else:
            done.append(Cleaned(found, predecessor.release(paths, dirs) or []))
    return done
