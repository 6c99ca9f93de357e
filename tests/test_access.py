"""Access control with real users: file ownership and modes, the ZAP check on the sockets,
reloading the allow lists on SIGHUP, and read-only workers.

Workers of other users run the system Python's venv (``service_python``): the
test runner's interpreter may sit where they cannot reach it.
"""

from __future__ import annotations

import grp
import json
import os
import signal
import stat
import subprocess
import textwrap
from typing import Any

import pytest
from conftest import Primary, leftovers, run_python
from sysenv import as_user

from hugeshmd import AccessDenied, InvalidArgument
from hugeshmd.daemon.access import Policy, parse_peer

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="makes users and changes file owners: needs root"),
              pytest.mark.process, pytest.mark.root]


# -- the policy, without processes --------------------------------------------------------


def test_a_zap_address_gives_the_peer_credentials() -> None:
    assert parse_peer(b"localhost:1000:1001:4242") == (1000, 1001, 4242)
    assert parse_peer(b":0:0:1") == (0, 0, 1)
    assert parse_peer(b"127.0.0.1") is None
    assert parse_peer(b"a:b:c:d") is None


def test_the_policy_admits_root_its_own_user_and_group_members(users: Any) -> None:
    group = users.group()
    member, outsider = users.user([group]), users.user()
    ids = {name: (getpwnam(name).pw_uid, getpwnam(name).pw_gid) for name in (member, outsider)}
    policy = Policy.from_names(group)
    assert policy.gid == grp.getgrnam(group).gr_gid
    assert policy.admits(0, 0) and policy.admits(os.geteuid(), 12345)
    assert policy.admits(*ids[member])  # by supplementary membership: SO_PEERCRED's gid is its own group
    assert policy.admits(ids[outsider][0], policy.gid)  # or by the process's own gid
    assert not policy.admits(*ids[outsider])
    assert not policy.admits(4242424, 4242424)  # a uid with no name: only its gid counts


def test_an_unknown_group_is_refused_with_the_key() -> None:
    with pytest.raises(InvalidArgument, match="invalid group: no group 'no-such-group-x'") as info:
        Policy.from_names("no-such-group-x")
    assert info.value.name == "group"


def getpwnam(name: str) -> Any:
    import pwd

    return pwd.getpwnam(name)


# -- a real primary, real users ---------------------------------------------------------------

WORKER = textwrap.dedent("""
    import json, sys, hugeshmd
    mode = sys.argv[1]
    try:
        shm = hugeshmd.attach(sys.argv[2], timeout=5, read_only=(mode == "read"))
        if mode == "write":
            zone = shm.reserve(sys.argv[3], 4096)
            zone[:5] = b"hello"
        zone = shm.lookup(sys.argv[3])
        print(json.dumps({"address": zone.address, "data": bytes(zone[:5]).decode()}))
    except hugeshmd.HugeshmdError as err:
        print(json.dumps({"error": type(err).__name__, "message": err.message}))
""")


SYSTEM_ROOT = "/run/hugeshmd"


@pytest.fixture
def shared_root(root: str) -> str:
    os.chmod(root, 0o755)  # others may pass; the instance's own dir decides who gets in
    return root


def worker_as(python: str, user: str, root: str, *args: str) -> dict[str, Any]:
    done = subprocess.run([*as_user(user), python, "-c", WORKER, *args], capture_output=True, text=True,
                          timeout=60, env={"HUGESHMD_RUNTIME_ROOT": root, "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def status_as(python: str, user: str, root: str, prefix: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*as_user(user), python, "-m", "hugeshmd", "status", "--prefix", prefix,
                           "--runtime-root", root, "--timeout", "5"], capture_output=True, text=True, timeout=60)


def test_files_belong_to_the_group_and_only_members_get_in(
        start_primary: Any, shared_root: str, prefix: str, users: Any, service_python: str) -> None:
    group = users.group()
    member, outsider = users.user([group]), users.user()
    start_primary("--huge-pages", "off", "--memory", "8M", "--group", group)
    gid = grp.getgrnam(group).gr_gid
    runtime = os.path.join(shared_root, prefix)
    shm = f"/dev/shm/hugeshmd.{prefix}.seg0"
    expected = {runtime: 0o750, f"{runtime}/table": 0o660, f"{runtime}/primary.lock": 0o600,
                f"{runtime}/control": 0o660, f"{runtime}/events": 0o660, shm: 0o660}
    for path, mode in expected.items():
        st = os.stat(path)
        assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (gid, mode), path

    written = worker_as(service_python, member, shared_root, "write", prefix, "frames")
    assert written["data"] == "hello"
    read = worker_as(service_python, member, shared_root, "read", prefix, "frames")
    assert read == written  # same address, same bytes, in another member's process

    refused = worker_as(service_python, outsider, shared_root, "read", prefix, "frames")
    assert refused["error"] == "AccessDenied"
    assert f"{runtime}/table" in refused["message"] and f"group {group!r}" in refused["message"]
    status = status_as(service_python, outsider, shared_root, prefix)
    assert status.returncode == 1 and "AccessDenied" not in status.stderr and "cannot open" in status.stderr


def test_a_member_finds_a_system_instance_with_no_configuration(
        prefix: str, users: Any, service_python: str) -> None:
    """A non-root member of the group, as the README sets one up (usermod -aG), with no
    HUGESHMD_RUNTIME_ROOT: its own runtime root has no such instance, /run/hugeshmd has."""
    group = users.group()
    member = users.user([group])
    made_root = not os.path.exists(SYSTEM_ROOT)
    primary = Primary(prefix, SYSTEM_ROOT, "--huge-pages", "off", "--memory", "8M", "--group", group)
    try:
        primary.wait_ready()
        env = {"PATH": "/usr/bin:/bin", "XDG_RUNTIME_DIR": f"/nonexistent-{prefix}"}
        done = subprocess.run([*as_user(member), service_python, "-c", WORKER, "write", prefix, "found"],
                              capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["data"] == "hello"
        missing = subprocess.run(
            [*as_user(member), service_python, "-c",
             "import hugeshmd\ntry:\n    hugeshmd.attach('no-such-instance', timeout=0.2)\n"
             "except hugeshmd.PrimaryUnavailable as err:\n    print(err.path)"],
            capture_output=True, text=True, timeout=60, env=env)
        assert missing.stdout.split("; ") == [f"/nonexistent-{prefix}/hugeshmd/no-such-instance",
                                              f"{SYSTEM_ROOT}/no-such-instance\n"], missing.stderr
    finally:
        primary.stop()
        if made_root:
            os.rmdir(SYSTEM_ROOT)
    assert leftovers(prefix, SYSTEM_ROOT) == []


def test_the_sockets_refuse_an_outsider_even_where_file_modes_let_it_reach_them(
        start_primary: Any, shared_root: str, prefix: str, users: Any, service_python: str) -> None:
    """The ZAP check is the sockets' own gate: loosen the modes, and it still holds."""
    group = users.group()
    member, outsider = users.user([group]), users.user()
    primary = start_primary("--huge-pages", "off", "--memory", "8M", "--group", group)
    runtime = os.path.join(shared_root, prefix)
    os.chmod(runtime, 0o755)  # an operator's mistake: now anyone reaches the sockets
    os.chmod(os.path.join(runtime, "control"), 0o666)
    os.chmod(os.path.join(runtime, "events"), 0o666)
    refused = status_as(service_python, outsider, shared_root, prefix)
    assert refused.returncode == 1
    assert f"the instance {prefix!r} refused this process (uid {getpwnam(outsider).pw_uid}" in refused.stderr
    primary.wait_for(f"refused a connection from uid {getpwnam(outsider).pw_uid}")
    admitted = status_as(service_python, member, shared_root, prefix)
    assert admitted.returncode == 0 and f"prefix     {prefix}" in admitted.stdout, admitted.stderr
    code = (f"from hugeshmd.wire.client import Control; from hugeshmd.shm.paths import RuntimePaths\n"
            f"print(Control(RuntimePaths({prefix!r}, {shared_root!r})).request('status')['refused'])")
    assert int(run_python(code, shared_root).stdout) >= 1


def test_a_reload_applies_the_log_level_and_a_bad_file_changes_nothing(
        shared_root: str, prefix: str, tmp_path: Any) -> None:
    config = tmp_path / "instance.toml"
    config.write_text('log_level = "info"\n')
    primary = Primary(prefix, shared_root, "--config", str(config), "--huge-pages", "off", "--memory", "8M")
    try:
        primary.wait_ready()
        config.write_text('log_level = "debug"\n')
        primary.proc.send_signal(signal.SIGHUP)
        primary.wait_for("reloaded ")
        assert f"reloaded {config}: log_level debug" in primary.text
        run_python(f"from hugeshmd.wire.client import Control; from hugeshmd.shm.paths import RuntimePaths\n"
                   f"Control(RuntimePaths({prefix!r}, {shared_root!r})).request('hello')", shared_root)
        config.write_text('memory = "16M"\nlog_level = "loud"\n')  # bad: nothing changes
        primary.proc.send_signal(signal.SIGHUP)
        primary.wait_for("reload: ")
        assert "invalid log_level" in primary.text and "nothing changed" in primary.text
        primary.proc.send_signal(signal.SIGTERM)
        assert primary.wait_exit() == 0
    finally:
        primary.stop()
    assert leftovers(prefix, shared_root) == []


def test_a_reload_names_options_that_wait_for_a_restart(shared_root: str, prefix: str, tmp_path: Any) -> None:
    config = tmp_path / "instance.toml"
    config.write_text('log_level = "info"\n')
    primary = Primary(prefix, shared_root, "--config", str(config), "--huge-pages", "off", "--memory", "8M")
    try:
        primary.wait_ready()
        config.write_text('log_level = "warning"\nmax_zones = 8\n')
        primary.proc.send_signal(signal.SIGHUP)
        primary.wait_for("max_zones changed")
    finally:
        assert primary.stop() == 0


READ_ONLY = textwrap.dedent("""
    import ctypes, json, sys, hugeshmd
    shm = hugeshmd.attach(sys.argv[1], timeout=5, read_only=True)
    zone = shm.lookup("frames")
    out = {"type": type(zone).__name__, "data": bytes(zone[:5]).decode()}
    for name, attempt in [("view", lambda: zone.view().__setitem__(0, 1)),
                          ("ndarray", lambda: zone.ndarray().__setitem__(0, 1)),
                          ("reserve", lambda: shm.reserve("mine", 4096)),
                          ("free", lambda: shm.free("frames"))]:
        try:
            attempt()
            out[name] = "wrote"
        except (TypeError, ValueError, hugeshmd.AccessDenied) as err:
            out[name] = type(err).__name__
    out["maps"] = [line.split()[1] for line in open("/proc/self/maps") if "hugeshmd." in line]
    print(json.dumps(out), flush=True)
    if sys.argv[2] == "poke":
        ctypes.c_char.from_address(zone.address).value = b"X"  # the kernel must refuse: SIGSEGV
        print("wrote through the mapping")
""")


@pytest.mark.parametrize("mode", ["off", "on"])
def test_a_read_only_worker_cannot_write(start_primary: Any, root: str, prefix: str, mode: str) -> None:
    if mode == "on":
        from conftest import free_hugepages

        if os.environ.get("CI") != "true" and free_hugepages() < 8:
            pytest.skip("needs 8 free 2 MiB hugepages")
    start_primary("--huge-pages", mode, "--memory", "8M")
    run_python(f"import hugeshmd; hugeshmd.attach({prefix!r}).reserve('frames', 4096)[:5] = b'hello'", root)
    out = json.loads(run_python(READ_ONLY.replace("sys.argv[1]", repr(prefix)).replace("sys.argv[2]", "'look'"),
                                root).stdout)
    assert out == {"type": "ReadOnlyZone", "data": "hello", "view": "TypeError", "ndarray": "ValueError",
                   "reserve": "AccessDenied", "free": "AccessDenied", "maps": ["r--s"]}
    poked = run_python(READ_ONLY.replace("sys.argv[1]", repr(prefix)).replace("sys.argv[2]", "'poke'"), root,
                       check=False)
    assert poked.returncode == -signal.SIGSEGV and "wrote through" not in poked.stdout
    # and the zone is as it was, for everyone
    check = f"import hugeshmd; print(bytes(hugeshmd.attach({prefix!r}).lookup('frames')[:5]).decode())"
    assert run_python(check, root).stdout.strip() == "hello"


def test_one_process_cannot_hold_an_instance_both_read_only_and_writable(start_primary: Any, root: str,
                                                                           prefix: str) -> None:
    start_primary("--huge-pages", "off", "--memory", "8M")
    code = (f"import hugeshmd\nrw = hugeshmd.attach({prefix!r})\n"
            f"try:\n    hugeshmd.attach({prefix!r}, read_only=True)\nexcept hugeshmd.AddressUnavailable as e:\n"
            f"    print('refused', e.conflicts != [])\n")
    assert run_python(code, root).stdout.strip() == "refused True"


def test_access_denied_is_a_permission_error() -> None:
    assert issubclass(AccessDenied, PermissionError) and AccessDenied.code == 13


@pytest.mark.parametrize(("uid", "logind", "risk"), [
    (0, "", False),
    (999, "", False),  # a system user (SYS_UID_MAX 999): exempt
    (1000, "", True),  # RemoveIPC defaults to yes
    (1000, "[Login]\nRemoveIPC=no\n", False),
    (1000, "[Login]\n#RemoveIPC=no\n", True),  # commented out: the default holds
])
def test_the_remove_ipc_trap_is_named_for_non_system_users(tmp_path: Any, uid: int, logind: str, risk: bool) -> None:
    from hugeshmd.daemon.access import remove_ipc_risk

    (tmp_path / "logind.conf").write_text(logind)
    (tmp_path / "login.defs").write_text("SYS_UID_MAX\t\t999\n")
    found = remove_ipc_risk(uid, str(tmp_path), str(tmp_path / "login.defs"))
    assert (found is not None) == risk
    if risk:
        assert "RemoveIPC=no" in found and f"uid {uid}" in found


def test_a_drop_in_overrides_logind_conf(tmp_path: Any) -> None:
    from hugeshmd.daemon.access import remove_ipc_risk

    (tmp_path / "logind.conf").write_text("[Login]\nRemoveIPC=no\n")
    (tmp_path / "logind.conf.d").mkdir()
    (tmp_path / "logind.conf.d" / "50-x.conf").write_text("[Login]\nRemoveIPC=yes\n")
    assert remove_ipc_risk(5000, str(tmp_path), "/nonexistent") is not None


def test_a_primary_run_by_a_plain_user_warns_of_remove_ipc_and_gives_files_to_its_group(
        shared_root: str, prefix: str, users: Any, service_python: str) -> None:
    user = users.user()
    own_root = os.path.join(shared_root, "own")
    os.mkdir(own_root)
    os.chown(own_root, getpwnam(user).pw_uid, getpwnam(user).pw_gid)
    primary = subprocess.Popen([*as_user(user), service_python, "-m", "hugeshmd", "primary", "--prefix", prefix,
                                "--runtime-root", own_root, "--huge-pages", "off", "--memory", "8M"],
                               stderr=subprocess.PIPE, text=True, env={"PATH": "/usr/bin:/bin"})
    try:
        assert primary.stderr is not None
        lines = []
        for line in primary.stderr:
            lines.append(line)
            if " ready: " in line:
                break
        text = "".join(lines)
        from hugeshmd.daemon.access import remove_ipc_risk

        expected = remove_ipc_risk(getpwnam(user).pw_uid) is not None  # this host's logind.conf decides
        assert ("logind's RemoveIPC=yes is in force" in text) == expected, text
        st = os.stat(f"/dev/shm/hugeshmd.{prefix}.seg0")
        assert (st.st_uid, st.st_gid) == (getpwnam(user).pw_uid, getpwnam(user).pw_gid)
    finally:
        primary.terminate()
        assert primary.wait(30) == 0
    assert leftovers(prefix, own_root) == []


def test_an_unknown_group_fails_before_anything_is_touched(root: str, prefix: str) -> None:
    failed = Primary(prefix, root, "--group", "no-such-group-z", "--huge-pages", "off", "--memory", "8M")
    assert failed.wait_exit() == 1
    assert "invalid group: no group 'no-such-group-z' on this host" in failed.text
    assert leftovers(prefix, root) == [] and os.listdir(root) == []
