"""The units under a real systemd, booted as PID 1 of a private PID and mount namespace.

One systemd serves the module: `hugeshmd systemd install` writes the units into
its own /run/systemd/system and makes the service's system user (systemd-sysusers);
each test starts its own instance (its own prefix and /etc/hugeshmd/<prefix>.toml)
and stops it. Workers run inside the namespace (its /run) as real users.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_hugepages
from sysenv import SYSTEMD, BootedSystemd, Users, as_user, make_name

from hugeshmd.daemon import hugepages

pytestmark = [pytest.mark.skipif(
    os.environ.get("CI") != "true" and (os.geteuid() != 0 or not os.path.exists(SYSTEMD)
                                        or shutil.which("unshare") is None or shutil.which("nsenter") is None),
    reason="needs root, systemd, unshare and nsenter (CI has them)"), pytest.mark.systemd, pytest.mark.root]

CONFIG_DIR = Path("/etc/hugeshmd")


class Service:
    """The booted systemd, the units installed in it, and the users of this module."""

    def __init__(self, systemd: BootedSystemd, python: str, user: str, users: Users) -> None:
        self.systemd, self.python, self.user, self.users = systemd, python, user, users
        self.workers = users.group()
        self.member, self.outsider = users.user([self.workers]), users.user()
        # The daemon gives its files to the workers' group, so it must be a member (as an operator would do it).
        subprocess.run(["usermod", "-aG", self.workers, user], check=True)

    def configure(self, prefix: str, text: str) -> Path:
        path = CONFIG_DIR / f"{prefix}.toml"
        path.write_text(f'group = "{self.workers}"\n' + text)
        return path

    def worker(self, user: str, code: str, *args: str) -> dict[str, Any]:
        """Run ``code`` as ``user`` inside the namespace; the JSON it prints."""
        done = self.systemd.run(*as_user(user), self.python, "-c", textwrap.dedent(code), *args,
                                env={"PATH": "/usr/bin:/bin", "HUGESHMD_RUNTIME_ROOT": "/run/hugeshmd"}, check=False)
        assert done.returncode == 0 and done.stdout, done.stderr
        return json.loads(done.stdout.splitlines()[-1])  # type: ignore[no-any-return]

    def start(self, unit: str, *flags: str) -> None:
        done = self.systemd.run("systemctl", "start", *flags, unit, check=False)
        assert done.returncode == 0, done.stderr + self.journal(unit)

    def attached(self, user: str, prefix: str) -> HeldWorker:
        """A worker of ``user`` that stays attached (outside any unit) until :meth:`HeldWorker.done`."""
        return HeldWorker(self, user, prefix)

    def journal(self, unit: str) -> str:
        return self.systemd.run("journalctl", "-u", unit, "--no-pager", check=False).stdout

    def files_of(self, prefix: str) -> list[str]:
        found = []
        for mount in [m.path for m in hugepages.mounts()] + ["/dev/shm"]:
            for directory in (mount, os.path.join(mount, "hugeshmd")):
                if os.path.isdir(directory):
                    found += [os.path.join(directory, n) for n in os.listdir(directory) if f".{prefix}." in n]
        runtime = self.systemd.run("ls", f"/run/hugeshmd/{prefix}", check=False)
        return found + ([f"/run/hugeshmd/{prefix}"] if runtime.returncode == 0 else [])


HOLD = """
    import json, sys, zlib, hugeshmd
    shm = hugeshmd.attach(sys.argv[1], timeout=10)
    zone = shm.reserve("held", 1 << 20)
    zone[:] = bytes(range(256)) * 4096
    print(json.dumps({"pid": shm.primary.pid}), flush=True)
    for line in sys.stdin:  # one check per line: every byte, a reserve, the primary it sees now
        try:
            held = zlib.crc32(memoryview(shm.lookup("held"))) == zlib.crc32(bytes(range(256)) * 4096)
            shm.reserve(line.strip(), 64)
            print(json.dumps({"held": held, "pid": shm.primary.pid, "adoptions": shm.primary.adoptions,
                              "zones": sorted(z.name for z in shm.zones)}), flush=True)
        except hugeshmd.HugeshmdError as err:
            print(json.dumps({"error": type(err).__name__}), flush=True)
"""


class HeldWorker:
    """A worker process inside the namespace that keeps its attachment across the primary's restarts."""

    def __init__(self, service: Service, user: str, prefix: str) -> None:
        self.proc = subprocess.Popen(["nsenter", "-t", str(service.systemd.pid), "-m", "-p", *as_user(user),
                                      service.python, "-c", textwrap.dedent(HOLD), prefix],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={"PATH": "/usr/bin:/bin", "HUGESHMD_RUNTIME_ROOT": "/run/hugeshmd"})
        self.first = self._reply()

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the held worker died (exit {self.proc.wait()})"
        return json.loads(line)  # type: ignore[no-any-return]

    def check(self, name: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def done(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture(scope="module")
def service(service_python: str, tmp_path_factory: Any) -> Iterator[Service]:
    made_config_dir = not CONFIG_DIR.exists()
    made_mount_dirs = [m for m in ("/dev/hugepages/hugeshmd", "/dev/hugepages1G/hugeshmd") if not os.path.exists(m)]
    users = Users()
    sysusers = tempfile.mkdtemp(prefix="hugeshmd-sysusers-", dir="/var/tmp")
    log = tmp_path_factory.mktemp("systemd") / "boot.log"
    systemd = BootedSystemd(str(log))
    try:
        user = make_name("s")
        users.adopt(user)
        systemd.run(service_python, "-m", "hugeshmd", "systemd", "install", "--dir", "/run/systemd/system",
                    "--sysusers-dir", sysusers, "--user", user)  # not under /tmp: the namespace has its own
        CONFIG_DIR.mkdir(exist_ok=True)
        yield Service(systemd, service_python, user, users)
    finally:
        systemd.close()
        users.remove()
        shutil.rmtree(sysusers, ignore_errors=True)
        if made_config_dir:
            shutil.rmtree(CONFIG_DIR, ignore_errors=True)
        for path in made_mount_dirs:
            if os.path.isdir(path):
                os.rmdir(path)  # empty by now: every instance stopped and removed its files


@pytest.fixture
def instance(service: Service) -> Iterator[str]:
    prefix = make_name("i")
    yield prefix
    unit = f"hugeshmd@{prefix}.service"
    service.systemd.run("systemctl", "stop", unit, check=False)
    service.systemd.run("systemctl", "clean", "--what=runtime", unit, check=False)  # after a failed start
    service.systemd.run("systemctl", "reset-failed", unit, check=False)
    (CONFIG_DIR / f"{prefix}.toml").unlink(missing_ok=True)
    dropin = f"/run/systemd/system/{unit}.d"
    if service.systemd.run("test", "-d", dropin, check=False).returncode == 0:
        service.systemd.run("rm", "-r", dropin)
        service.systemd.run("systemctl", "daemon-reload")
    assert service.files_of(prefix) == []


WRITE = """
    import json, sys, hugeshmd
    shm = hugeshmd.attach(sys.argv[1], timeout=10)
    zone = shm.reserve("frames", 1 << 20)
    zone[:5] = b"hello"
    print(json.dumps({"address": zone.address, "base": shm.base}))
"""
READ = """
    import json, sys, hugeshmd
    try:
        shm = hugeshmd.attach(sys.argv[1], timeout=10, read_only=sys.argv[2] == "ro")
        zone = shm.lookup("frames")
        out = {"address": zone.address, "data": bytes(zone[:5]).decode()}
        try:
            zone.view()[0] = 0
            out["write"] = "wrote"
        except TypeError:
            out["write"] = "refused"
    except hugeshmd.HugeshmdError as err:
        out = {"error": type(err).__name__, "message": err.message}
    print(json.dumps(out))
"""


def needs_pages(count: int) -> None:
    if os.environ.get("CI") != "true" and free_hugepages() < count:
        pytest.skip(f"needs {count} free 2 MiB hugepages")


def test_start_share_and_stop_leaves_nothing(service: Service, instance: str) -> None:
    needs_pages(8)
    service.configure(instance, 'memory = "8M"\nhuge_pages = "on"\n')
    unit = f"hugeshmd@{instance}.service"
    free_before = free_hugepages()
    service.start(unit)  # returns once READY=1 came: Type=notify
    shown = service.systemd.show(unit, "ActiveState", "SubState", "StatusText", "User")
    assert shown["ActiveState"] == "active" and shown["SubState"] == "running"
    assert shown["StatusText"].startswith(f"prefix {instance}: 8 MiB of 2 MiB pages, hugepages")
    assert shown["User"] == service.user

    written = service.worker(service.member, WRITE, instance)
    read = service.worker(service.member, READ, instance, "rw")
    assert read == {"address": written["address"], "data": "hello", "write": "wrote"}
    read_only = service.worker(service.member, READ, instance, "ro")
    assert read_only == {"address": written["address"], "data": "\0ello", "write": "refused"}  # rw wrote the 0
    refused = service.worker(service.outsider, READ, instance, "rw")
    assert refused["error"] == "AccessDenied" and f"group {service.workers!r}" in refused["message"]

    journal = service.systemd.run("journalctl", "-u", unit, "-o", "json", "--no-pager").stdout
    entries = [json.loads(line) for line in journal.splitlines()]
    prestart = [e["MESSAGE"] for e in entries if "enough for memory 8 MiB" in e.get("MESSAGE", "")]
    assert prestart, "the pre-start did not check the pool for the instance's memory"
    ready = [e for e in entries if e.get("MESSAGE", "").startswith("hugeshmd.primary: ready: ")]
    assert ready and ready[0]["PRIORITY"] == "6"  # the <6> prefix became the priority, and no timestamp of ours

    service.systemd.run("systemctl", "stop", unit)
    assert service.files_of(instance) == []
    assert free_hugepages() >= free_before  # ours came back (others may have freed more meanwhile)


def test_active_only_after_ready(service: Service, instance: str) -> None:
    """Mapping 1 GiB of 4 KiB pages takes long enough to watch the unit while it maps."""
    service.configure(instance, 'memory = "1G"\nhuge_pages = "off"\n')
    unit = f"hugeshmd@{instance}.service"
    service.systemd.run("systemctl", "start", "--no-block", unit)
    seen = []
    while not seen or seen[-1]["ActiveState"] == "activating":
        seen.append(service.systemd.show(unit, "ActiveState", "StatusText"))
        assert len(seen) < 2000, seen[-1]
    assert seen[-1]["ActiveState"] == "active" and seen[-1]["StatusText"].startswith(f"prefix {instance}:")
    mapping = [s for s in seen if s["StatusText"].startswith("mapping ")]
    assert mapping and all(s["ActiveState"] == "activating" for s in mapping)
    assert not any(s["ActiveState"] == "active" and not s["StatusText"].startswith("prefix") for s in seen)


def test_kill_9_is_restarted_and_adopts_every_zone(service: Service, instance: str) -> None:
    needs_pages(8)
    service.configure(instance, 'memory = "8M"\nhuge_pages = "on"\n')
    unit = f"hugeshmd@{instance}.service"
    service.start(unit)
    before = service.systemd.show(unit, "MainPID", "NRestarts")
    inode = service.systemd.run("stat", "-c", "%i", f"/run/hugeshmd/{instance}").stdout
    held = service.attached(service.member, instance)
    try:
        service.systemd.run("kill", "-9", before["MainPID"])
        after = service.systemd.wait_until(unit, lambda s: s["MainPID"] not in ("0", before["MainPID"])
                                           and s["ActiveState"] == "active")
        assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
        assert service.systemd.run("stat", "-c", "%i", f"/run/hugeshmd/{instance}").stdout == inode  # preserved
        seen = held.check("after-kill")
        assert seen == {"held": True, "pid": int(after["MainPID"]), "adoptions": 1, "zones": ["after-kill", "held"]}
        assert "kept for the next primary" in service.journal(unit)  # the stop-post saw a failure, kept it
    finally:
        held.done()
    assert service.worker(service.member, WRITE, instance)["address"] > 0  # the new primary serves


def test_restart_keeps_every_zone_and_stop_releases_the_pages(service: Service, instance: str) -> None:
    needs_pages(8)
    service.configure(instance, 'memory = "8M"\nhuge_pages = "on"\n')
    unit = f"hugeshmd@{instance}.service"
    free_before = free_hugepages()
    service.start(unit)
    held = service.attached(service.member, instance)
    try:
        first = held.first["pid"]
        service.systemd.run("systemctl", "restart", unit)
        seen = held.check("after-restart")  # the worker was never interrupted: same process, same attachment
        assert seen["held"] and seen["adoptions"] == 1 and seen["pid"] not in (0, first)
        assert seen["zones"] == ["after-restart", "held"]
        assert "a restart of" in service.journal(unit)
        service.systemd.run("systemctl", "stop", unit)
        assert held.check("after-stop") == {"error": "PrimaryStopped"}  # told: stopped for good
    finally:
        held.done()
    assert "stopped for good: released the instance" in service.journal(unit)
    assert service.files_of(instance) == []
    assert free_hugepages() >= free_before


def test_a_frozen_primary_is_killed_by_the_watchdog_and_the_next_adopts(service: Service, instance: str) -> None:
    service.configure(instance, 'memory = "8M"\nhuge_pages = "off"\n')
    unit = f"hugeshmd@{instance}.service"
    service.systemd.run("mkdir", "-p", f"/run/systemd/system/{unit}.d")
    service.systemd.run("sh", "-c", f"printf '[Service]\\nWatchdogSec=2\\nTimeoutAbortSec=2\\n' "
                                    f"> /run/systemd/system/{unit}.d/watchdog.conf")
    service.systemd.run("systemctl", "daemon-reload")
    service.start(unit)
    written = service.worker(service.member, WRITE, instance)
    before = service.systemd.show(unit, "MainPID", "NRestarts", "WatchdogUSec")
    assert before["WatchdogUSec"] == "2s"
    time.sleep(3)  # longer than WatchdogSec: an unfrozen primary must not be killed (no readiness signal for "not")
    assert service.systemd.show(unit, "MainPID")["MainPID"] == before["MainPID"]
    service.systemd.run("kill", "-STOP", before["MainPID"])
    after = service.systemd.wait_until(unit, lambda s: s["MainPID"] not in ("0", before["MainPID"])
                                       and s["ActiveState"] == "active")
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    journal = service.systemd.run("journalctl", "-u", unit, "--no-pager").stdout
    assert "Watchdog timeout" in journal
    read = service.worker(service.member, READ, instance, "rw")  # adopted: the zone and its bytes are there
    assert (read["address"], read["data"]) == (written["address"], "hello")


def test_reload_follows_the_protocol(service: Service, instance: str) -> None:
    config = service.configure(instance, 'memory = "8M"\nhuge_pages = "off"\n')
    unit = f"hugeshmd@{instance}.service"
    service.start(unit)
    pid = service.systemd.show(unit, "MainPID")["MainPID"]
    config.write_text(config.read_text() + 'log_level = "debug"\n')
    service.systemd.run("systemctl", "reload", unit)  # ExecReload sends SIGHUP; RELOADING=1 ... READY=1
    service.systemd.wait_until(unit, lambda s: "reloaded /etc/hugeshmd/" in service.journal(unit))
    shown = service.systemd.show(unit, "ActiveState", "SubState", "MainPID", "ReloadResult")
    assert shown == {"ActiveState": "active", "SubState": "running", "MainPID": pid, "ReloadResult": "success"}
    assert f"reloaded /etc/hugeshmd/{instance}.toml: log_level debug" in service.journal(unit)


def test_the_default_unit_and_its_template_twin_never_run_together(service: Service) -> None:
    """Both would run prefix "default" in one runtime dir: starting one stops the other."""
    needs_pages(8)
    created = not (CONFIG_DIR / "default.toml").exists()
    if not created:
        pytest.skip("this host has an /etc/hugeshmd/default.toml of its own")
    service.configure("default", 'memory = "8M"\nhuge_pages = "on"\n')
    try:
        service.start("hugeshmd.service")
        assert service.systemd.show("hugeshmd.service", "ActiveState")["ActiveState"] == "active"
        service.start("hugeshmd@default.service")
        assert service.systemd.show("hugeshmd.service", "ActiveState")["ActiveState"] == "inactive"
        assert service.systemd.show("hugeshmd@default.service", "ActiveState")["ActiveState"] == "active"
        assert service.worker(service.member, WRITE, "default")["address"] > 0  # its runtime dir is whole
    finally:
        service.systemd.run("systemctl", "stop", "hugeshmd.service", "hugeshmd@default.service", check=False)
        (CONFIG_DIR / "default.toml").unlink()
    assert service.files_of("default") == []
