"""fresh_worker: wall time of a new worker process that attaches, looks up 256 MiB and reads every page.

The worker runs with the interpreter of a fresh venv into which hugeshmd was
installed as a user installs it: ``pip install`` of a copy of the source tree
(not editable), which compiles bytecode, then ``python -m compileall`` over
site-packages with PYTHONDONTWRITEBYTECODE unset, to be sure. These machines
set PYTHONDONTWRITEBYTECODE=1, which without that step would make every fresh
worker compile the package again. The worker itself keeps the caller's
environment (reading .pyc files is unaffected by that variable) and runs in an
empty directory, so ``import hugeshmd`` finds the installed copy.

The worker's code::

    import hugeshmd
    with hugeshmd.attach(PREFIX, runtime_root=ROOT) as shm:
        data = bytes(memoryview(shm.lookup("fresh"))[::4096])

The wall time of the whole subprocess (``subprocess.run`` from this process) is
measured, interleaved in each round with three baselines run by the same
interpreter: ``python -c pass`` (the floor: interpreter start-up), the same
read of the same memory through Python's ``mmap`` module with no hugeshmd code
(open the zone's backing file, map the zone, read one byte per 4 KiB), and
``python -c "import hugeshmd"`` (to split the time). Target: median <= 60 ms.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from .common import (
    HUGEPAGE,
    REPO,
    MiB,
    PrimaryProcess,
    free_hugepages,
    hugetlbfs_mount,
    metric,
    run_worker,
    worker_reply,
)
from .common import median as median_of

TARGET = 60e-3
ZONE, QUICK_ZONE = 256 * MiB, 16 * MiB
ZONE_NAME = "fresh"
PATTERN = 0x5A
_COPY_IGNORE = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist", ".git", "benchmarks", "tests",
                                      ".venv", "*.pyc")

WORKER = """\
import hugeshmd
with hugeshmd.attach({prefix!r}, runtime_root={root!r}) as shm:
    data = bytes(memoryview(shm.lookup({name!r}))[::4096])
"""
CHECK = WORKER + """\
import json, os, sys
mods = [m for n, m in sys.modules.items() if n.startswith("hugeshmd")]
print(json.dumps({{"file": hugeshmd.__file__, "pages": len(data), "ok": data == bytes([{pattern}]) * len(data),
                  "modules": len(mods), "compiled": sum(os.path.exists(m.__cached__) for m in mods),
                  "zmq": "zmq" in sys.modules, "numpy": "numpy" in sys.modules}}))
"""
BARE = """\
import mmap, os
fd = os.open({path!r}, os.O_RDWR)
m = mmap.mmap(fd, {length}, offset={offset})
os.close(fd)
data = bytes(memoryview(m)[::4096])
"""
IMPORT = "import hugeshmd\n"
PASS = "pass\n"


class Venv:
    """A throwaway venv with hugeshmd installed from a copy of the tree. Removed by :meth:`remove`."""

    def __init__(self, quick: bool) -> None:
        self.dir = tempfile.mkdtemp(prefix="hsbvenv")
        self.notes: list[str] = []
        self.python = os.path.join(self.dir, "venv", "bin", "python")
        self.install_s = 0.0
        try:
            self._build(quick)
        except BaseException:
            self.remove()
            raise

    def _build(self, quick: bool) -> None:
        t0 = time.perf_counter()
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        base = getattr(sys, "_base_executable", sys.executable)
        _check([base, "-m", "venv", os.path.join(self.dir, "venv")], env)
        source = os.path.join(self.dir, "src")
        shutil.copytree(REPO, source, ignore=_COPY_IGNORE)
        pip = [self.python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        # Quick mode skips the dependencies: the worker's fast path imports none of them.
        attempts = [[*pip, "--no-deps", source]] if quick else [[*pip, source], [*pip, "--no-deps", source]]
        for cmd in attempts:
            try:
                _check(cmd, env)
                break
            except RuntimeError as err:
                self.notes.append(f"{' '.join(cmd[3:-1])} failed: {str(err)[-200:]}")
        else:
            # No registry reachable for the build backend: install by copying the
            # package, which is what a wheel install amounts to for pure Python.
            shutil.copytree(os.path.join(source, "hugeshmd"), os.path.join(self.site_packages(), "hugeshmd"))
            self.notes.append("pip install failed: installed by copying the package into site-packages")
        if quick:
            self.notes.append("quick: installed with --no-deps")
        _check([self.python, "-m", "compileall", "-q", self.site_packages()], env)
        self.install_s = time.perf_counter() - t0

    def site_packages(self) -> str:
        out = subprocess.run([self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _check(cmd: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(cmd, env=env, cwd="/", stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({done.returncode}): {done.stderr[-2000:]}")


def _wall(python: str, code: str, cwd: str) -> float:
    t0 = time.perf_counter()
    done = subprocess.run([python, "-c", code], cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                          check=False)
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"worker failed ({done.returncode}): {done.stderr.decode()[-2000:]}")
    return elapsed


def _import_time(python: str, cwd: str) -> dict[str, int]:
    """Cumulative microseconds of the heaviest imports of ``import hugeshmd`` (python -X importtime)."""
    done = subprocess.run([python, "-X", "importtime", "-c", IMPORT], cwd=cwd, capture_output=True, text=True,
                          check=True)
    rows = []
    for line in done.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if match:
            rows.append((match.group(4), int(match.group(2))))
    rows.sort(key=lambda r: -r[1])
    return dict(rows[:12])


def _zone_size(quick: bool) -> tuple[int, str, list[str]]:
    if quick:
        return QUICK_ZONE, "try", []
    need = ZONE // HUGEPAGE + 2
    free = free_hugepages()
    if hugetlbfs_mount() is None or free < need:
        return ZONE, "off", [f"{free} free hugepages < {need}: fallback mode, 4 KiB pages in /dev/shm"]
    return ZONE, "on", []


def run(quick: bool) -> dict[str, Any]:
    zone, huge_pages, notes = _zone_size(quick)
    rounds = 3 if quick else 15
    venv = Venv(quick)
    cwd = ""
    try:
        cwd = tempfile.mkdtemp(prefix="hsbcwd")
        notes += venv.notes
        with PrimaryProcess(zone + HUGEPAGE, huge_pages) as primary:
            setup = run_worker(__name__, {"prefix": primary.prefix, "root": primary.root, "size": zone})
            args = {"prefix": primary.prefix, "root": primary.root, "name": ZONE_NAME}
            check = json.loads(subprocess.run([venv.python, "-c", CHECK.format(**args,
                                               pattern=PATTERN)], cwd=cwd, capture_output=True, text=True,
                                              check=True).stdout.strip().splitlines()[-1])
            if not check["file"].startswith(venv.dir) or not check["ok"]:
                raise RuntimeError(f"the worker did not run the installed hugeshmd or read wrong data: {check}")
            if check["compiled"] != check["modules"]:
                notes.append(f"only {check['compiled']} of {check['modules']} hugeshmd modules had bytecode")
            codes = {"python -c pass": PASS, "bare mmap read": BARE.format(**setup), "import hugeshmd": IMPORT,
                     "fresh worker": WORKER.format(**args)}
            samples: dict[str, list[float]] = {k: [] for k in codes}
            for code in codes.values():  # warm-up: page cache, dentries
                _wall(venv.python, code, cwd)
            for _ in range(rounds):
                for key, code in codes.items():
                    samples[key].append(_wall(venv.python, code, cwd))
            importtime = _import_time(venv.python, cwd)
            mode = primary.mode
    finally:
        venv.remove()
        if cwd:
            shutil.rmtree(cwd, ignore_errors=True)
    if mode == "fallback":
        notes.append("the primary ran in fallback mode: 4 KiB pages in /dev/shm (the read faults every page)")
    startup = samples["python -c pass"]
    fresh = samples["fresh worker"]
    metrics = {
        "fresh worker": metric(fresh, baseline=startup, baseline_name="python -c pass", target=TARGET, quick=quick,
                               note=f"attach + lookup + read {zone >> 20} MiB, installed package"),
        "fresh worker vs bare mmap read": metric(fresh, baseline=samples["bare mmap read"],
                                                 baseline_name="bare mmap read",
                                                 note="same read of the same memory without hugeshmd"),
        "bare mmap read": metric(samples["bare mmap read"], baseline=startup, baseline_name="python -c pass"),
        "import hugeshmd": metric(samples["import hugeshmd"], baseline=startup, baseline_name="python -c pass"),
        "python -c pass": metric(startup),
    }
    return {
        "name": "fresh_worker",
        "params": {"zone": zone, "pages_read": zone // 4096, "rounds": rounds, "huge_pages": huge_pages,
                   "mode": mode, "venv_python": venv.python, "install_s": venv.install_s},
        "notes": notes,
        "metrics": metrics,
        "details": {
            "split_medians": {
                "interpreter": median_of(startup),
                "import hugeshmd": median_of(samples["import hugeshmd"]) - median_of(startup),
                "attach+lookup+read+exit": median_of(fresh) - median_of(samples["import hugeshmd"]),
            },
            "importtime_cumulative_us": importtime,
            "worker_check": check,
        },
    }


# -- the setup worker (run with this interpreter, not the venv's) ------------------------------


def worker(request: dict[str, Any]) -> dict[str, Any]:
    """Reserve the zone (hugepage-aligned), write the pattern on every 4 KiB page, say where it lives."""
    import hugeshmd

    with hugeshmd.attach(request["prefix"], runtime_root=request["root"]) as shm:
        zone = shm.reserve(ZONE_NAME, request["size"], align=HUGEPAGE if shm.page_size >= HUGEPAGE else 4096)
        view = memoryview(zone)  # type: ignore[arg-type]
        view[::4096] = bytes([PATTERN]) * len(range(0, zone.size, 4096))
        view.release()
        segment = next(s for s in shm.segments if s.address <= zone.address < s.address + s.length)
        reply = {"path": segment.path, "offset": segment.offset + zone.address - segment.address,
                 "length": zone.size}
        del zone
    return reply


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker_reply(worker(json.loads(sys.argv[2])))
