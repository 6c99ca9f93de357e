"""Real parts for the access and systemd tests: a Python other users can run,
real users and groups, and a real systemd booted in a private PID and mount namespace.

Everything made here is removed by its maker's ``close``/``remove``: users and
groups by name (only names this module generated), processes by PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"
SYSTEMD = "/lib/systemd/systemd"


def have_system_python() -> bool:
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return False
    found = subprocess.run([SYSTEM_PYTHON, "-c", "import sys, venv, ensurepip; assert sys.version_info >= (3, 11)"],
                           capture_output=True)
    return found.returncode == 0


class ServicePython:
    """A venv of the system's Python under /opt, readable and runnable by every user
    (not /tmp or /var/tmp: the unit's PrivateTmp= hides both from the service),
    holding this tree's package (copied, as an install would) and its dependencies.

    The test runner's own interpreter may live under /root (pyenv), which other
    users, the service user among them, cannot reach.
    """

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="hugeshmd-test-", dir="/opt")
        os.chmod(self.dir, 0o755)
        try:
            subprocess.run([SYSTEM_PYTHON, "-m", "venv", self.dir], check=True, capture_output=True)
            self.python = os.path.join(self.dir, "bin", "python")
            subprocess.run([self.python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            "pyzmq", "msgpack", "posix_ipc", "numpy"], check=True, capture_output=True, timeout=600)
            site = subprocess.run([self.python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                  check=True, capture_output=True, text=True).stdout.strip()
            shutil.copytree(REPO / "hugeshmd", os.path.join(site, "hugeshmd"),
                            ignore=shutil.ignore_patterns("__pycache__"))
            subprocess.run(["chmod", "-R", "a+rX", self.dir], check=True)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def make_name(kind: str) -> str:
    return f"hsm{kind}{uuid.uuid4().hex[:8]}"


class Users:
    """Users and groups made for a test with useradd/groupadd, removed by ``remove``."""

    def __init__(self) -> None:
        self.users: list[str] = []
        self.groups: list[str] = []

    def group(self, system: bool = True) -> str:
        name = make_name("g")
        subprocess.run(["groupadd", *(["--system"] if system else []), name], check=True)
        self.groups.append(name)
        return name

    def user(self, groups: list[str] | None = None, system: bool = False) -> str:
        name = make_name("u")
        args = ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group"]
        if system:
            args.append("--system")
        if groups:
            args += ["--groups", ",".join(groups)]
        subprocess.run([*args, name], check=True)
        self.users.append(name)
        return name

    def adopt(self, name: str) -> None:
        """Remove ``name`` (and its own group) with the rest: a user someone else made for this test."""
        self.users.append(name)

    def remove(self) -> None:
        """Remove them all; AssertionError naming any that could not be removed (after trying every one)."""
        failed = []
        for name in reversed(self.users):
            done = subprocess.run(["userdel", name], capture_output=True, text=True)
            if done.returncode not in (0, 6):  # 6: no such user (never made, or made by a failed install)
                failed.append(f"userdel {name}: {done.stderr.strip()}")
            subprocess.run(["groupdel", name], capture_output=True)  # its user group, if userdel left it
        for name in reversed(self.groups):
            done = subprocess.run(["groupdel", name], capture_output=True, text=True)
            if done.returncode not in (0, 6):
                failed.append(f"groupdel {name}: {done.stderr.strip()}")
        self.users, self.groups = [], []
        assert not failed, failed


def as_user(user: str) -> list[str]:
    """The command prefix that runs what follows as ``user``, with its groups."""
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--"]


class BootedSystemd:
    """A real systemd as PID 1 of a new PID and mount namespace, with a tmpfs /run of its own.

    ``run(...)`` runs a command inside it (nsenter into its mount and PID
    namespaces). Ready when ``systemctl is-system-running --wait`` answers;
    stopped with ``systemctl poweroff``, then by PID if need be.

    The namespace shares every filesystem but /run with the host, so what
    systemd does at boot must be kept off the host (seen here: its
    systemd-tmpfiles-setup emptied the host's /tmp, as tmp.conf's ``D /tmp``
    asks at boot). So /tmp is a private tmpfs too; ``container=`` tells systemd
    it is a container (no udev, no hardware units, see systemd's CONTAINER_INTERFACE);
    it boots into a target of its own that pulls in sysinit only (not the
    host's enabled services and timers); and the tmpfiles units are masked in
    its /run, which outranks /lib (systemd.unit(5), unit load path), so /var/tmp
    (the service's Python) and /dev are left alone.
    """

    TARGET = "hugeshmd-test.target"
    MASKED = ("systemd-tmpfiles-setup.service", "systemd-tmpfiles-setup-dev.service",
              "systemd-tmpfiles-setup-dev-early.service", "systemd-tmpfiles-clean.timer",
              "systemd-tmpfiles-clean.service", "timers.target", "systemd-sysctl.service",
              "systemd-remount-fs.service", "systemd-binfmt.service", "systemd-modules-load.service",
              "proc-sys-fs-binfmt_misc.automount")

    def __init__(self, log: str) -> None:
        self._log = open(log, "w")
        units = "/run/systemd/system"
        boot = " && ".join([
            "mount -t tmpfs tmpfs /run", "mount -t tmpfs tmpfs /tmp", f"mkdir -p {units}",
            *(f"ln -s /dev/null {units}/{unit}" for unit in self.MASKED),
            f"printf '[Unit]\\nDescription=hugeshmd tests\\nRequires=sysinit.target\\nAfter=sysinit.target\\n' "
            f"> {units}/{self.TARGET}",
            f"exec env container=hugeshmd-test {SYSTEMD} --system --unit={self.TARGET}",
        ])
        self.proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount", "--mount-proc", "sh", "-c", boot],
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            self.pid = self._find_init()
            self._wait_for_bus()
            state = self.run("systemctl", "is-system-running", "--wait", timeout=90, check=False).stdout.strip()
            if state not in ("running", "degraded"):
                raise RuntimeError(f"the booted systemd is {state!r}")
        except BaseException:
            self.close()
            raise

    def _find_init(self, timeout: float = 30) -> int:
        """The PID (in our namespace) of unshare's child, which becomes systemd."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            except FileNotFoundError:
                raise RuntimeError("unshare exited before systemd started") from None
            if children and os.readlink(f"/proc/{children[0]}/exe") == os.path.realpath(SYSTEMD):
                return int(children[0])
            time.sleep(0.01)  # polling an exec that has no readiness signal of its own
        raise RuntimeError("systemd did not start in its namespace")

    def _wait_for_bus(self, timeout: float = 60) -> None:
        """Until systemd's private bus socket exists: before it, systemctl cannot even ask."""
        socket = f"/proc/{self.pid}/root/run/systemd/private"
        deadline = time.monotonic() + timeout
        while not os.path.exists(socket):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("systemd never opened its bus")
            time.sleep(0.01)  # systemd has no earlier signal we can read from outside

    def run(self, *args: str, timeout: float = 60, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["nsenter", "-t", str(self.pid), "-m", "-p", *args], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, env=env)
        if check and done.returncode != 0:
            raise AssertionError(f"{args}: exit {done.returncode}\n{done.stdout}\n{done.stderr}")
        return done

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, "-p", ",".join(props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_until(self, unit: str, test: object, timeout: float = 60, props: tuple[str, ...] = ()) -> dict[str, str]:
        """Poll the unit's properties until ``test(props)`` holds (systemd has no push for this here)."""
        wanted = props or ("ActiveState", "SubState", "MainPID", "NRestarts", "StatusText", "Result")
        deadline = time.monotonic() + timeout
        while True:
            shown = self.show(unit, *wanted)
            if test(shown):  # type: ignore[operator]
                return shown
            if time.monotonic() > deadline:
                raise AssertionError(f"{unit} never got there: {shown}")
            time.sleep(0.05)

    def close(self) -> None:
        if self.proc.poll() is None:
            if getattr(self, "pid", None):
                subprocess.run(["nsenter", "-t", str(self.pid), "-m", "-p", "systemctl", "poweroff"],
                               capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                if getattr(self, "pid", None):
                    os.kill(self.pid, signal.SIGKILL)  # PID 1 of the namespace: all of it goes
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

