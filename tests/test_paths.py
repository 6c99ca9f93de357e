"""Unit tests of hugeshmd.shm.paths: prefixes, runtime roots, every name of an instance."""

from __future__ import annotations

import os

import pytest

from hugeshmd.errors import InvalidArgument
from hugeshmd.shm import paths as paths_mod
from hugeshmd.shm.paths import RuntimePaths, parse_segment_name, validate_prefix

# -- prefixes -------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["default", "a", "A-1", "x_y.z", "_x", "a" * 64, "0", "a-", "a.."])
def test_validate_prefix_accepts(prefix: str) -> None:
    assert validate_prefix(prefix) == prefix


@pytest.mark.parametrize(
    "prefix",
    ["", "../x", "..", ".", ".hidden", "-flag", "a/b", "/abs", "a" * 65, "a b", "é", "a\0b", "tab\t", "a:b", "a*"],
)
def test_validate_prefix_rejects(prefix: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid prefix") as info:
        validate_prefix(prefix)
    assert info.value.name == prefix


@pytest.mark.parametrize("prefix", [None, 5, b"default"])
def test_validate_prefix_rejects_non_str(prefix: object) -> None:
    with pytest.raises(InvalidArgument, match="invalid prefix"):
        validate_prefix(prefix)  # type: ignore[arg-type]


@pytest.mark.parametrize("prefix", ["abc\n", "abc\n\n", "\nabc"])
def test_validate_prefix_rejects_newlines(prefix: str) -> None:
    # a regex ending in "$" also matches before a final newline
    with pytest.raises(InvalidArgument, match="invalid prefix"):
        validate_prefix(prefix)


# -- runtime paths ------------------------------------------------------------------------


def test_runtime_paths_of_a_prefix() -> None:
    paths = RuntimePaths.for_prefix("inst", "/run/hsd")
    assert (paths.prefix, paths.root, paths.dir) == ("inst", "/run/hsd", "/run/hsd/inst")
    assert paths.lock == "/run/hsd/inst/primary.lock"
    assert paths.table == "/run/hsd/inst/table"
    assert paths.control == "ipc:///run/hsd/inst/control"
    assert paths.events == "ipc:///run/hsd/inst/events"
    assert paths.socket_paths() == ["/run/hsd/inst/control", "/run/hsd/inst/events"]
    assert paths.segment_stem() == "hugeshmd.inst.seg"


def test_runtime_root_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("HUGESHMD_RUNTIME_ROOT", "/srv/rt")
    assert RuntimePaths.for_prefix("p").dir == "/srv/rt/p"
    assert RuntimePaths.for_prefix("p", "/given").dir == "/given/p"  # an explicit root wins


def test_default_runtime_root(monkeypatch) -> None:
    monkeypatch.delenv("HUGESHMD_RUNTIME_ROOT", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    monkeypatch.setattr(paths_mod.os, "geteuid", lambda: 0)
    assert RuntimePaths.for_prefix("p").root == "/run/hugeshmd"
    monkeypatch.setattr(paths_mod.os, "geteuid", lambda: 1000)
    assert RuntimePaths.for_prefix("p").root == "/run/user/1000/hugeshmd"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert RuntimePaths.for_prefix("p").root == "/tmp/hugeshmd-1000/hugeshmd"


def test_runtime_paths_validate_the_prefix() -> None:
    with pytest.raises(InvalidArgument, match="invalid prefix '../etc'"):
        RuntimePaths.for_prefix("../etc", "/run/hsd")


def test_worker_looks_in_its_own_root_then_the_system_root(monkeypatch) -> None:
    monkeypatch.delenv("HUGESHMD_RUNTIME_ROOT", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    monkeypatch.setattr(paths_mod.os, "geteuid", lambda: 1000)
    assert [p.dir for p in RuntimePaths.candidates("p")] == ["/run/user/1000/hugeshmd/p", "/run/hugeshmd/p"]
    monkeypatch.setattr(paths_mod.os, "geteuid", lambda: 0)
    assert [p.dir for p in RuntimePaths.candidates("p")] == ["/run/hugeshmd/p"]


def test_an_explicit_runtime_root_is_the_only_place_a_worker_looks(monkeypatch) -> None:
    monkeypatch.setattr(paths_mod.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("HUGESHMD_RUNTIME_ROOT", "/srv/rt")
    assert [p.dir for p in RuntimePaths.candidates("p")] == ["/srv/rt/p"]
    assert [p.dir for p in RuntimePaths.candidates("p", "/given")] == ["/given/p"]


def test_segment_names_are_spelled_in_one_place() -> None:
    paths = RuntimePaths("a.seg1", "/run/hsd")
    assert paths.segment_name(0) == "hugeshmd.a.seg1.seg0"
    assert paths.shm_name(3) == "/hugeshmd.a.seg1.seg3"
    assert paths.table_temp(42) == "/run/hsd/a.seg1/table.new.42"
    assert parse_segment_name("hugeshmd.a.seg1.seg0") == ("a.seg1", 0)  # greedy: not prefix "a"
    assert parse_segment_name("hugeshmd.a.seg12") == ("a", 12)


@pytest.mark.parametrize("name", ["hugeshmd.a.seg", "hugeshmd.a.segx", "hugeshmd..seg0", "other.a.seg0",
                                  "hugeshmd.a.seg\u0661", "hugeshmd.-a.seg0"])
def test_parse_segment_name_rejects(name: str) -> None:
    assert parse_segment_name(name) is None


def test_a_worker_never_looks_in_a_tmp_root_someone_else_could_have_made(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("HUGESHMD_RUNTIME_ROOT", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(paths_mod.os, "geteuid", lambda: 4242)  # /tmp/hugeshmd-4242: not this user's
    assert [p.root for p in RuntimePaths.candidates("p")] == ["/run/hugeshmd"]
    mine = tmp_path / "hugeshmd-mine"
    mine.mkdir(mode=0o700)
    uid = os.getuid() or 4242  # a user's, not root's (root looks in /run/hugeshmd only)
    if os.getuid() == 0:
        os.chown(mine, uid, -1)
    monkeypatch.setattr(paths_mod.os, "geteuid", lambda: uid)
    monkeypatch.setattr(paths_mod, "_user_runtime_root", lambda: str(mine / "hugeshmd"))
    assert [p.root for p in RuntimePaths.candidates("p")] == [str(mine / "hugeshmd"), "/run/hugeshmd"]
    mine.chmod(0o777)  # anyone may write it: anyone may have planted a table
    assert [p.root for p in RuntimePaths.candidates("p")] == ["/run/hugeshmd"]
