"""The primary and its service manager, without systemd: a real notify socket, real signals.

A datagram socket stands where systemd's would be (``$NOTIFY_SOCKET``), so
each message the primary sends can be read and checked in order. The
journal's line format is checked the same way, with ``$JOURNAL_STREAM``
naming the file that takes the primary's stderr.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import PYTHON, Primary, leftovers

from hugeshmd.daemon.systemd import Notifier, watchdog_interval


class Manager:
    """The receiving end of ``$NOTIFY_SOCKET``: every datagram, parsed."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address.replace("@", "\0", 1))
        self.sock.settimeout(30)
        self.address = address
        self.messages: list[dict[str, str]] = []

    def next(self) -> dict[str, str]:
        data = self.sock.recv(4096).decode()
        message = dict(line.split("=", 1) for line in data.splitlines() if line)
        self.messages.append(message)
        return message

    def until(self, key: str) -> dict[str, str]:
        """Read messages until one has ``key``; that one."""
        while True:
            message = self.next()
            if key in message:
                return message


@pytest.fixture(params=["path", "abstract"])
def manager(request: Any, tmp_path: Any) -> Iterator[Manager]:
    address = str(tmp_path / "notify") if request.param == "path" else f"@hugeshmd-test-{os.getpid()}-{time.time_ns()}"
    made = Manager(address)
    yield made
    made.sock.close()


@pytest.mark.process
def test_ready_status_watchdog_reloading_and_stopping_in_order(manager: Manager, root: str, prefix: str) -> None:
    env = dict(os.environ, NOTIFY_SOCKET=manager.address, WATCHDOG_USEC="400000")
    primary = Primary(prefix, root, "--huge-pages", "off", "--memory", "64M", env=env)
    try:
        mapping = manager.next()
        assert mapping["STATUS"].startswith("mapping ") and "READY" not in mapping
        ready = manager.until("READY")
        assert ready["READY"] == "1" and ready["STATUS"].startswith(f"prefix {prefix}: 64 MiB")
        assert all("READY" not in m for m in manager.messages[:-1])  # nothing said ready before the end
        assert manager.messages[-2]["STATUS"] == "mapping 64 MiB of 64 MiB (100%)"
        assert os.path.exists(os.path.join(root, prefix, "control"))  # bound before READY=1
        for _ in range(3):
            assert manager.until("WATCHDOG") == {"WATCHDOG": "1"}
        primary.proc.send_signal(signal.SIGHUP)
        reloading = manager.until("RELOADING")
        now = time.monotonic_ns() // 1000
        assert reloading["RELOADING"] == "1" and abs(int(reloading["MONOTONIC_USEC"]) - now) < 30e6
        assert manager.until("READY")["READY"] == "1"  # the reload is over
        primary.proc.send_signal(signal.SIGTERM)
        assert manager.until("STOPPING")["STOPPING"] == "1"
        assert primary.wait_exit() == 0
    finally:
        primary.stop()
    assert leftovers(prefix, root) == []


def test_the_watchdog_is_only_for_the_process_it_names() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "2000000"}) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({}) is None


def test_without_a_manager_nothing_is_sent_and_nothing_fails(tmp_path: Any) -> None:
    assert not Notifier({}).send(ready=1)
    assert not Notifier({"NOTIFY_SOCKET": "relative/path"}).enabled
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody")})  # a manager that went away
    assert gone.enabled and not gone.send(status="x") and not gone.send(ready=1)


def test_a_status_with_a_newline_stays_one_field(manager: Manager) -> None:
    Notifier({"NOTIFY_SOCKET": manager.address}).send(status="two\nlines", ready=1)
    assert manager.next() == {"STATUS": "two lines", "READY": "1"}


def run_logging(journal: bool, tmp_path: Any) -> str:
    """What the log setup writes to a stderr that is, or is not, the journal's stream."""
    path = tmp_path / "stderr"
    code = ("import logging; from hugeshmd.daemon.systemd import setup_logging; setup_logging('info');"
            "logging.getLogger('hugeshmd.primary').warning('careful'); logging.getLogger('x').info('fine');"
            "logging.getLogger('x').debug('hidden')\n"
            "try:\n    1/0\nexcept ZeroDivisionError:\n    logging.getLogger('x').exception('broke')")
    with open(path, "w") as err:
        st = os.fstat(err.fileno())
        env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}" if journal else "")
        subprocess.run([PYTHON, "-c", code], stderr=err, env=env, check=True)
    return path.read_text()


@pytest.mark.process
def test_journal_lines_carry_a_priority_and_no_timestamp(tmp_path: Any) -> None:
    lines = run_logging(True, tmp_path).splitlines()
    assert lines[:3] == ["<4>hugeshmd.primary: careful", "<6>x: fine", "<3>x: broke"]
    assert all(line.startswith("<3>") for line in lines[3:]) and "ZeroDivisionError" in lines[-1]


@pytest.mark.process
def test_terminal_lines_carry_a_timestamp_and_level(tmp_path: Any) -> None:
    lines = run_logging(False, tmp_path).splitlines()
    assert lines[0].endswith(" WARNING hugeshmd.primary: careful") and lines[0][:4].isdigit()
    assert not any(line.startswith("<") for line in lines)


@pytest.mark.process
@pytest.mark.skipif(sys.platform != "linux", reason="Linux only")
def test_a_start_failure_says_why_and_never_says_ready(manager: Manager, root: str, prefix: str) -> None:
    env = dict(os.environ, NOTIFY_SOCKET=manager.address)
    failed = Primary(prefix, root, "--huge-pages", "on", "--page-size", "4M", env=env)
    assert failed.wait_exit() == 1
    manager.sock.settimeout(0.5)
    try:
        while True:
            manager.next()
    except TimeoutError:
        pass
    assert all("READY" not in m for m in manager.messages)
    assert any(m.get("STATUS", "").startswith("failed: ") for m in manager.messages)
