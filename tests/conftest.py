"""Fixtures for tests with real processes, real sockets and real hugepages; the test layers.

Every test gets its own prefix and runtime root, so tests can run side by side;
every process a fixture starts is stopped by PID, and the fixtures assert that
the primary left no hugepage file, shm object or runtime file behind.

Layers (markers registered in pyproject.toml): a test is ``process`` (real
primaries, workers, any child process), ``root``, ``systemd`` or ``bench`` when
its module or itself says so, and ``pure`` otherwise: ``pytest -m pure`` runs
the in-process tests in seconds. A pure test that starts a process fails,
saying to mark it, so the label cannot drift from the truth.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_host import elsewhere, fake_proc, one_node, two_nodes  # noqa: F401 - fixtures of a faked host

from hugeshmd.daemon import hugepages

PYTHON = sys.executable
HERE = Path(__file__).parent
START_TIMEOUT = 60.0


LAYERS = ("process", "root", "systemd", "bench")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if not any(item.get_closest_marker(name) for name in LAYERS):
            item.add_marker(pytest.mark.pure)


def _no_process(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a pure test started a process: mark it (or its module) pytest.mark.process")


@pytest.fixture(autouse=True)
def _pure_tests_start_no_process(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("pure"):
        monkeypatch.setattr(subprocess.Popen, "_execute_child", _no_process)
        monkeypatch.setattr(os, "fork", _no_process)


def free_hugepages(page_size: int = 2 << 20) -> int:
    pool = hugepages.pool(page_size)
    return 0 if pool is None else pool.free - pool.reserved


def hugetlbfs_mount(page_size: int = 2 << 20) -> str | None:
    mount = hugepages.find_mount(page_size)
    return None if mount is None else mount.path


needs_hugepages = pytest.mark.skipif(
    os.environ.get("CI") != "true" and (free_hugepages() < 64 or hugetlbfs_mount() is None),
    reason="needs 64 free 2 MiB hugepages and a hugetlbfs mount (CI provides them)",
)


def spawn_worker(args: list[str], root: str, **popen: Any) -> subprocess.Popen[str]:
    """The one way tests start a worker process: this interpreter with ``args``, attached to
    instances under ``root`` (``HUGESHMD_RUNTIME_ROOT``), in a session of its own so that
    :func:`kill_session` can stop it and any child it forked."""
    return subprocess.Popen([PYTHON, *args], text=True, start_new_session=True,
                            env=dict(os.environ, HUGESHMD_RUNTIME_ROOT=root), **popen)


def kill_session(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the session of a process :func:`spawn_worker` started, and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def start_storm(script: str, prefix: str, root: str, *args: str) -> subprocess.Popen[str]:
    """Start the kill -9 storm ``tests/<script>`` (see tests/storm.py) on ``prefix``, its output piped."""
    return spawn_worker([str(HERE / script), prefix, root, *args], root, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE)


def storm_result(storm: subprocess.Popen[str], timeout: float = 180) -> dict[str, Any]:
    """The JSON line of a storm (:func:`start_storm`) once it ended, asserted clean: it exited 0,
    no worker exited other than by the storm's SIGKILL, and none said anything. A storm still
    running after ``timeout`` seconds is killed with its session (its workers too), and fails."""
    try:
        out, err = storm.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(storm)
        raise
    assert storm.returncode == 0, err
    result: dict[str, Any] = json.loads(out)
    assert result["bad"] == [] and result["said"] == "", result
    return result


def run_python(code: str, root: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh worker process (:func:`spawn_worker`) for instances under ``root``;
    its output, once it exited or timed out. The session is killed whole after it: code that
    forks must not leave a child behind a failed test. Output goes to files, not pipes, which
    such a child would hold open.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = spawn_worker(["-c", code], root, stdout=out, stderr=err)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            kill_session(proc)
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())
    if check and done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}:\n{done.stderr}")
    return done


class Primary:
    """A primary subprocess. Ready when its log says so (no sleeps)."""

    def __init__(self, prefix: str, root: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.prefix, self.root = prefix, root
        cmd = [PYTHON, "-m", "hugeshmd", "primary", "--prefix", prefix, "--runtime-root", root, *args]
        # faulthandler: a primary that hangs is sent SIGABRT (wait_exit) and says where it was
        env = dict(os.environ if env is None else env, PYTHONFAULTHANDLER="1")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.log: list[str] = []
        self._ready = threading.Event()
        self._new_line = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._new_line:
                self.log.append(line)
                self._new_line.notify_all()
            if " ready: " in line:
                self._ready.set()
        self._ready.set()  # exited: wake the waiters
        with self._new_line:
            self._new_line.notify_all()

    def wait_for(self, text: str, timeout: float = START_TIMEOUT) -> None:
        """Until a log line contains ``text`` (the primary's own signal of where it is)."""
        with self._new_line:
            if not self._new_line.wait_for(lambda: any(text in line for line in self.log)
                                           or not self._reader.is_alive(), timeout):
                raise AssertionError(f"no log line with {text!r}:\n{self.text}")

    def wait_ready(self, timeout: float = START_TIMEOUT) -> Primary:
        if not self._ready.wait(timeout) or self.proc.poll() is not None:
            raise AssertionError(f"primary did not become ready:\n{self.text}")
        return self

    def wait_exit(self, timeout: float = START_TIMEOUT) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)  # faulthandler writes every thread's stack to the log
            self.proc.wait()
            self._reader.join(timeout)
            raise AssertionError(f"the primary did not exit within {timeout} s; its log:\n{self.text}") from None
        self._reader.join(timeout)
        return code

    @property
    def text(self) -> str:
        return "".join(self.log)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait_exit()


class Worker:
    """A long-lived worker process (:func:`spawn_worker`) running tests/worker_agent.py;
    :meth:`call` sends one command and returns its reply."""

    def __init__(self, root: str) -> None:
        self.proc = spawn_worker([str(HERE / "worker_agent.py")], root, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"worker died (exit {self.proc.wait()})")
        return json.loads(line)  # type: ignore[no-any-return]

    def ok(self, op: str, **args: Any) -> dict[str, Any]:
        reply = self.call(op, **args)
        assert "error" not in reply, reply
        return reply

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        kill_session(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def leftovers(prefix: str, root: str) -> list[str]:
    """Every file an instance of ``prefix`` may leave: hugepage files, shm objects, runtime dir."""
    stem = f"hugeshmd.{prefix}."
    found = [os.path.join(root, prefix)] if os.path.exists(os.path.join(root, prefix)) else []
    for directory in hugepages.segment_dirs():
        try:
            found += [os.path.join(directory, n) for n in os.listdir(directory) if n.startswith(stem)]
        except OSError:
            pass
    return found


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def root() -> Iterator[str]:
    # Short, because an ipc:// path must fit in sun_path (108 bytes).
    path = tempfile.mkdtemp(prefix="hsd", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_primary(prefix: str, root: str) -> Iterator[Any]:
    """Start primaries of this test's prefix; all are stopped and checked for leftovers."""
    started: list[Primary] = []

    def start(*args: str, wait: bool = True, prefix_: str | None = None) -> Primary:
        primary = Primary(prefix_ or prefix, root, *args)
        started.append(primary)
        return primary.wait_ready() if wait else primary

    yield start
    for primary in started:
        primary.stop()
    for primary in started:
        if primary.proc.returncode not in (-signal.SIGKILL,):
            assert leftovers(primary.prefix, root) == [], primary.text


@pytest.fixture
def workers(root: str) -> Iterator[Any]:
    made: list[Worker] = []

    def make() -> Worker:
        made.append(Worker(root))
        return made[-1]

    yield make
    for worker in made:
        worker.stop()


def _must_or_skip(reason: str) -> None:
    """Skip outside CI; in CI what a test needs must be there, so fail."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def service_python() -> Iterator[str]:
    """A Python every user can run, with this tree's package: for workers of other users and units."""
    from sysenv import ServicePython, have_system_python

    if os.geteuid() != 0 or not have_system_python() or not shutil.which("setpriv"):
        _must_or_skip("needs root, /usr/bin/python3 (3.11+, venv) and setpriv")
    made = ServicePython()
    yield made.python
    made.remove()


@pytest.fixture
def users() -> Iterator[Any]:
    """Real users and groups, removed after the test."""
    from sysenv import Users

    made = Users()
    yield made
    made.remove()
