"""The systemd unit files: what `hugeshmd systemd install` writes, checked by systemd's own tools.

These need no booted systemd (tests/test_service.py has those): systemd-analyze
reads the files. The checked-in ``systemd/`` copies must be what the code renders.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hugeshmd.errors import InvalidArgument
from hugeshmd.host import install

REPO = Path(__file__).resolve().parent.parent
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None and os.environ.get("CI") != "true",
                                   reason="needs systemd-analyze")


def test_the_checked_in_units_are_what_the_installer_renders() -> None:
    for name, text in install.units(["/usr/bin/python3", "-m", "hugeshmd"]).items():
        assert (REPO / "systemd" / name).read_text() == text, f"systemd/{name}: regenerate it (see systemd/README.md)"
    assert (REPO / "systemd" / "hugeshmd.sysusers.conf").read_text() == install.sysusers()


def test_units_start_this_installation(tmp_path: Path) -> None:
    text = install.units(install.this_command())["hugeshmd@.service"]
    command = " ".join(install.this_command())
    assert command.startswith(os.path.abspath(sys.executable) + " -m hugeshmd")
    assert f"ExecStart={command} primary --instance %i --runtime-root /run/hugeshmd" in text
    assert f"ExecStartPre=+{command} systemd prestart --instance %i" in text
    assert "Type=notify" in text and "RuntimeDirectoryPreserve=restart" in text and "RemoveIPC=no" in text
    written = install.install(str(tmp_path / "units"), None, "root", reload=False,
                              command=["/usr/bin/python3", "-m", "hugeshmd"])
    assert sorted(Path(p).name for p in written) == ["hugeshmd.service", "hugeshmd@.service"]
    default = (tmp_path / "units" / "hugeshmd.service").read_text()
    assert "--instance default " in default and "Conflicts=hugeshmd@default.service" in default


@pytest.fixture
def hidden() -> Iterator[Path]:
    """A 0700 directory outside /tmp (which would be refused for another reason)."""
    made = Path(tempfile.mkdtemp(prefix="hugeshmd-test-", dir="/opt" if os.access("/opt", os.W_OK) else None))
    yield made
    shutil.rmtree(made)


def test_a_python_the_service_user_cannot_reach_is_refused_with_advice(hidden: Path) -> None:
    (hidden / "python").write_text("")
    with pytest.raises(InvalidArgument, match=r"the service user 'nobody' cannot reach .*/opt/hugeshmd/bin/pip"):
        install.check_reachable(str(hidden / "python"), "nobody")
    install.check_reachable("/usr/bin/python3", "nobody")  # /usr/bin is everyone's


def test_a_python_in_a_private_tmp_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="PrivateTmp=yes hides"):
        install.check_reachable(str(tmp_path / "python"), "nobody")
    (tmp_path / "python3").symlink_to("/usr/bin/python3")  # a venv's python: a link to the system's
    with pytest.raises(InvalidArgument, match="PrivateTmp=yes hides"):
        install.check_reachable(str(tmp_path / "python3"), "no-such-user-yet")


def test_a_venv_link_in_a_private_dir_is_refused_though_its_target_is_reachable(hidden: Path) -> None:
    (hidden / "python").symlink_to("/usr/bin/python3")
    with pytest.raises(InvalidArgument, match=f"cannot reach {hidden}/python "):
        install.check_reachable(str(hidden / "python"), "nobody")


@pytest.mark.process
def test_prestart_never_follows_a_planted_link(tmp_path: Path, users: Any) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    from hugeshmd.daemon.config import load

    target = tmp_path / "precious"
    target.mkdir(mode=0o700)
    (tmp_path / "mount").mkdir()
    (tmp_path / "mount" / "hugeshmd").symlink_to(target)
    with pytest.raises(InvalidArgument, match="is not a directory"):
        install.prestart(load(None, {}), users.user(system=True), [str(tmp_path / "mount")])
    st = target.stat()
    assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o700)  # untouched


def test_a_python_under_a_home_gets_a_read_only_home() -> None:
    assert "ProtectHome=read-only" in install.render(["/root/venv/bin/python", "-m", "hugeshmd"], None)
    assert "ProtectHome=yes" in install.render(["/opt/hugeshmd/bin/python", "-m", "hugeshmd"], None)


@pytest.fixture
def rendered(service_python: str, tmp_path: Path) -> Path:
    """The units rendered for a Python that exists, as systemd-analyze checks the ExecStart= binary."""
    install.install(str(tmp_path), None, reload=False, command=[service_python, "-m", "hugeshmd"])
    return tmp_path


@pytest.mark.process
@needs_analyze
def test_systemd_analyze_verify_passes_for_every_unit(rendered: Path) -> None:
    for unit in ("hugeshmd@.service", "hugeshmd.service"):
        done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(rendered / unit)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stderr.strip() == "", f"{unit}:\n{done.stderr}"


@pytest.mark.process
@needs_analyze
def test_the_exposure_is_2_or_less(rendered: Path) -> None:
    for unit in ("hugeshmd@.service", "hugeshmd.service"):
        done = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(rendered / unit)],
                              capture_output=True, text=True, timeout=120)
        found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
        assert found, done.stdout + done.stderr
        assert float(found.group(1)) <= 2.0, done.stdout


@pytest.mark.process
def test_prestart_gives_the_mount_directory_to_the_service_user(tmp_path: Path, users: Any) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    from hugeshmd.daemon.config import load

    group = users.group()
    service = users.user(system=True)
    done = install.prestart(load(None, {"group": group}), service, [str(tmp_path)])
    st = os.stat(tmp_path / "hugeshmd")
    import grp
    import pwd

    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (pwd.getpwnam(service).pw_uid, grp.getgrnam(group).gr_gid,
                                                            0o750)
    assert done == [f"{tmp_path}/hugeshmd: owner {service}, group {grp.getgrnam(group).gr_gid}, mode 0750"]


def test_stop_post_keeps_the_instance_for_a_restart_or_a_failure_and_releases_it_on_a_stop(tmp_path: Path) -> None:
    from hugeshmd.daemon.config import load
    from hugeshmd.shm.paths import SYSTEM_RUNTIME_ROOT

    prefix = f"sp{os.getpid()}"
    conf = load(None, {"prefix": prefix})
    unit = f"hugeshmd@{prefix}.service"
    assert "a restart of" in install.stop_post(conf, unit, "success", job=lambda u: "restart")[0]
    assert "is kept" in install.stop_post(conf, unit, "success", job=lambda u: None)[0]  # systemd not asked
    assert "ended with signal" in install.stop_post(conf, unit, "signal", job=lambda u: "")[0]  # a crash
    if os.geteuid() != 0:
        pytest.skip("releasing takes the instance's lock under /run/hugeshmd: needs root")
    made_root = not os.path.exists(SYSTEM_RUNTIME_ROOT)
    try:
        # a stop job releases, however the primary ended (killed at TimeoutStopSec= included)
        said = install.stop_post(conf, unit, "timeout", job=lambda u: "stop")
        assert said[0] == f"stopped for good: released the instance of prefix {prefix!r}"
        assert not os.path.exists(os.path.join(SYSTEM_RUNTIME_ROOT, prefix))
    finally:
        if made_root:
            os.rmdir(SYSTEM_RUNTIME_ROOT)
