"""Who may use an instance: file ownership for the data plane, ZAP for the sockets.

Two gates, both from the instance's config:

* **Files** (kernel-enforced; what a worker maps). The runtime dir is
  ``0750``, the primary lock ``0600`` (a member who could open it could flock
  it and so keep a restarted primary out), and every other file the primary
  makes (table, sockets, hugepage files, shm objects) ``0660``, all owned by
  the primary's user and by the instance's ``group``. A process outside that group cannot open the table or
  reach a socket; a member can map every segment. Each file is given its group
  explicitly: no setgid directory, which the unit's ``RestrictSUIDSGID=`` forbids.
* **Sockets** (ZAP, RFC 27). Both endpoints set a ZAP domain with
  ``ZMQ_ZAP_ENFORCE_DOMAIN``: libzmq then refuses every connection for which no
  ZAP handler answers "200", so a handler that is missing means no entry, not
  open doors. The handler (in the primary's own loop, :class:`ZapHandler`)
  gets the peer's credentials: on ``ipc://`` libzmq reads ``SO_PEERCRED`` at
  accept and appends ``:uid:gid:pid`` to the ZAP request's address
  (stream_engine_base.cpp). It admits exactly whom the files admit: root, the
  primary's own user and members of ``group``. SO_PEERCRED carries the primary
  group only, so supplementary membership is read from the group database
  (getgrouplist(3)) for the peer's user. The check matters where the file
  modes do not hold: a socket or directory whose mode someone loosened.

One boundary, on purpose: a worker that may open the files can map and change
everything without the sockets, so an allow list for the sockets alone could
not keep anyone out, and hugetlbfs has no ACLs to widen the files' one group.

A refused peer sees the handshake fail (``ZMQ_EVENT_HANDSHAKE_FAILED_AUTH``
on its monitor); :class:`hugeshmd.wire.client.Control` turns that into AccessDenied.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
from dataclasses import dataclass

from ..errors import AccessDenied, InvalidArgument

__all__ = ["Policy", "ZapHandler", "ZAP_DOMAIN", "ZAP_ENDPOINT", "group_id", "parse_peer", "remove_ipc_risk"]

log = logging.getLogger("hugeshmd.access")

ZAP_DOMAIN = b"hugeshmd"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by RFC 27
DIR_MODE = 0o750
FILE_MODE = 0o660


def group_id(name: str | int, key: str) -> int:
    """A group name or number as a gid; InvalidArgument naming ``key`` if there is none."""
    try:
        return int(name) if isinstance(name, int) or name.isdigit() else grp.getgrnam(name).gr_gid
    except KeyError:
        raise InvalidArgument(f"invalid {key}: no group {name!r} on this host", name=key) from None


def groups_of(uid: int, gid: int) -> set[int]:
    """``gid`` and the groups the group database gives ``uid``'s user."""
    try:
        return {gid, *os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)}
    except KeyError:  # a uid with no name: only its primary group is known
        return {gid}


@dataclass(frozen=True)
class Policy:
    """The instance's owning group: whom its files and its sockets admit."""

    gid: int
    own_uid: int

    @classmethod
    def from_names(cls, group: str | None) -> Policy:
        """Resolve the name now, before anything is touched; InvalidArgument names the key."""
        gid = os.getegid() if group is None else group_id(group, "group")
        if os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
            raise InvalidArgument(
                f"invalid group: this process (uid {os.geteuid()}) is not in group {group!r}, "
                "so it cannot give the instance's files to it; add its user to the group "
                f"(usermod -aG {group} USER) and restart it", name="group")
        return cls(gid, os.geteuid())

    def admits(self, uid: int, gid: int) -> bool:
        return uid in (0, self.own_uid) or self.gid in groups_of(uid, gid)

    def own(self, path: str, mode: int = FILE_MODE) -> None:
        """Give ``path`` to the instance's group with ``mode``; AccessDenied if the kernel refuses."""
        try:
            os.chown(path, -1, self.gid)
            os.chmod(path, mode)
        except OSError as err:
            raise self._refused(path, mode, err) from err

    def own_fd(self, fd: int, mode: int = FILE_MODE) -> None:
        try:
            os.fchown(fd, -1, self.gid)
            os.fchmod(fd, mode)
        except OSError as err:
            raise self._refused(f"/proc/self/fd/{fd}", mode, err) from err

    def _refused(self, path: str, mode: int, err: OSError) -> AccessDenied:
        return AccessDenied(f"cannot give {path} to group {self.gid} with mode {mode:o}: {err.strerror}",
                            path=path, errno=err.errno)


def _login_defs(key: str, default: int, path: str = "/etc/login.defs") -> int:
    try:
        with open(path) as lines:
            for line in lines:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == key and fields[1].isdigit():
                    return int(fields[1])
    except OSError:
        pass
    return default


def _logind_removes_ipc(conf_dir: str = "/etc/systemd") -> bool:
    """logind.conf's RemoveIPC= (default yes), the drop-ins read after the main file."""
    files = [os.path.join(conf_dir, "logind.conf")]
    try:
        drop_ins = os.path.join(conf_dir, "logind.conf.d")
        files += sorted(os.path.join(drop_ins, n) for n in os.listdir(drop_ins) if n.endswith(".conf"))
    except OSError:
        pass
    removes = True
    for path in files:
        try:
            with open(path) as lines:
                for line in lines:
                    key, _, value = line.strip().partition("=")
                    if key == "RemoveIPC":
                        removes = value.strip().lower() not in ("no", "false", "0", "off")
        except OSError:
            continue
    return removes


def remove_ipc_risk(uid: int, conf_dir: str = "/etc/systemd", login_defs: str = "/etc/login.defs") -> str | None:
    """Why logind may delete this user's /dev/shm segments, or None.

    logind.conf(5): with RemoveIPC=yes (the default), when a user's last
    session ends, their System V IPC objects and POSIX shared memory and message
    queues are removed; system users (uid up to SYS_UID_MAX) are exempt.
    """
    if uid == 0 or uid <= _login_defs("SYS_UID_MAX", 999, login_defs) or not _logind_removes_ipc(conf_dir):
        return None
    return (f"uid {uid} is not a system user and logind's RemoveIPC=yes is in force: when this user's last "
            "login session ends, logind deletes its /dev/shm objects, this instance's segments among them. "
            "Run the primary as a system user (the units do), or set RemoveIPC=no in logind.conf")


def parse_peer(address: bytes) -> tuple[int, int, int] | None:
    """(uid, gid, pid) from a ZAP address such as ``b"localhost:1000:1000:4242"``; None if absent."""
    parts = address.rsplit(b":", 3)
    if len(parts) != 4:
        return None
    try:
        return int(parts[1]), int(parts[2]), int(parts[3])
    except ValueError:
        return None


class ZapHandler:
    """Answers libzmq's ZAP requests (RFC 27) for both sockets from the primary's own loop:
    200 admits, 400 refuses, by :meth:`Policy.admits` on the peer's SO_PEERCRED.

    Every request gets a reply, whatever goes wrong: a REP socket left without
    one would take no further request, and every handshake after it would hang.
    """

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.refused = 0  # connections turned away
        self._refused_by_uid: dict[int | None, int] = {}

    def reply(self, frames: list[bytes]) -> list[bytes]:
        """The reply frames for one ZAP request's frames."""
        request_id = frames[1] if len(frames) > 1 else b""
        peer = parse_peer(frames[3]) if len(frames) >= 6 and frames[0] == b"1.0" else None
        try:
            admitted = peer is not None and self.policy.admits(peer[0], peer[1])
        except Exception:  # noqa: BLE001 - the group database failed us: refuse, keep serving
            log.exception("access check of %s failed; refusing it", peer)
            admitted = False
        if admitted and peer is not None:
            reply = [b"200", b"OK", str(peer[0]).encode()]
        else:
            self._refuse(peer)
            reply = [b"400", b"not admitted", b""]
        return [b"1.0", request_id, *reply, b""]

    def _refuse(self, peer: tuple[int, int, int] | None) -> None:
        """Count a refusal; log a peer's 1st, 2nd, 4th, 8th... (libzmq reconnects a refused SUB every 100 ms)."""
        self.refused += 1
        uid = peer[0] if peer else None
        seen = self._refused_by_uid[uid] = self._refused_by_uid.get(uid, 0) + 1
        if seen & (seen - 1) == 0:
            who = "uid {} gid {} pid {}".format(*peer) if peer else "a peer without credentials"
            log.warning("refused a connection from %s (%d so far): not root, this primary's user, or a member of "
                        "the instance's group", who, seen)
