"""The primary: maps the instance's memory, owns its table, serves its control socket.

Start-up order matters and each step registers its own undo, so a failure at
any point (a second primary, no hugepages, a taken address) leaves nothing
behind: lock (before any socket: libzmq unlinks ipc paths it binds over), stale
files of a dead predecessor, backing choice, address window, segment, table,
sockets, then ``ready``. Shutdown runs the same undo list in reverse.

The request loop never dies of a request: the frame shape is checked, then the
message, then the arguments (:mod:`hugeshmd.protocol`); refusals are answered
with a code; anything unexpected is logged with its traceback and answered as an
internal error, and the loop goes on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import time
from contextlib import ExitStack
from typing import Any

import zmq

from . import hugepages, protocol, zones
from .access import DIR_MODE, ZAP_DOMAIN, ZAP_ENDPOINT, Policy, parse_peer, remove_ipc_risk
from .backing import HugetlbfsBacking, Mapped, ShmBacking
from .config import DEFAULT_FALLBACK_MEMORY, RELOADABLE, Config, instance_path, load
from .errors import HugepagesUnavailable, HugeshmdError, InvalidArgument, TableBusy
from .hugepages import SERVICE_SUBDIR
from .pool import remove_stale_instance
from .runtime import PrimaryLock, RuntimePaths, own_start_time, process_alive
from .systemd import Notifier
from .table import MODE_HUGETLBFS, STATE_NAMES, STATE_READY, STATE_STOPPING, Layout, SegmentRecord, Table
from .units import format_size
from .window import Window

__all__ = ["Primary", "run"]

log = logging.getLogger("hugeshmd.primary")

HEARTBEAT_S = 1.0
LOCK_WAIT_S = 1.0  # a request waits this long for a worker holding the table's lock, then gets TableBusy
Backing = HugetlbfsBacking | ShmBacking


class Primary:
    """One instance's primary. :meth:`start`, then :meth:`serve`, then :meth:`shutdown`."""

    def __init__(self, config: Config, overrides: dict[str, Any] | None = None,
                 notifier: Notifier | None = None, instance: str | None = None) -> None:
        self.config = config
        self.instance = instance  # started with --instance: SIGHUP looks for its file again
        self.overrides = overrides or {}  # the command line's options: kept over the file on reload
        self.notifier = notifier or Notifier({})
        self.paths = RuntimePaths.for_prefix(config.prefix, config.runtime_root)
        self.fallback_reason: str | None = None
        self.requests = 0
        self.requests_by_op: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.refused = 0  # connections the ZAP check turned away
        self._reload_pending = False
        self._progress_sent = 0.0  # when the last STATUS= of the mapping went out
        self._status_sent = ""  # the last STATUS= summary, sent again when it changes
        self._refused_by_uid: dict[int | None, int] = {}
        self._seq = 0
        self._stopping = False
        self._undo = ExitStack()
        self._started = time.monotonic()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # -- start-up ------------------------------------------------------------

    def start(self) -> None:
        """Map the memory and bind the sockets; raises HugeshmdError, leaving nothing behind."""
        try:
            self._start()
        except BaseException:
            self._undo.close()
            self._wake_r.close()
            self._wake_w.close()
            raise

    def _start(self) -> None:
        self._check_socket_paths()
        c = self.config
        self.policy = Policy.from_names(c.group)
        os.makedirs(self.paths.dir, mode=DIR_MODE, exist_ok=True)
        if os.path.islink(self.paths.dir):  # chown and chmod below would follow it
            raise InvalidArgument(f"invalid runtime_root: {self.paths.dir} is a symbolic link", name="runtime_root")
        self._undo.callback(_rmdir_quietly, self.paths.dir)  # last undo: fails if another primary uses it
        lock = PrimaryLock.acquire(self.paths.lock)
        self._undo.callback(lock.release)
        self.policy.own(self.paths.dir, DIR_MODE)  # ours now: a rival would have been refused the lock
        self.policy.own(self.paths.lock, 0o600)  # a member that could read it could flock it, and block a restart
        self._remove_stale()
        backing, memory = self._choose_backing()
        window = Window.reserve(self.config.base_address, self.config.window_for(memory))
        self._undo.callback(window.release)
        backing, mapped = self._map_first_segment(backing, window, memory)
        self.backing, self.window = backing, window
        risk = remove_ipc_risk(os.geteuid()) if backing.mode != MODE_HUGETLBFS else None
        if risk:
            log.warning("%s", risk)
        self.table = self._create_table(mapped)
        self._bind()
        self.table.set_state(STATE_READY, os.getpid(), own_start_time())
        summary = self.summary()
        self.notifier.send(ready=1, status=summary)
        log.info("ready: %s", summary)

    def _remove_stale(self) -> None:
        dirs = hugepages.segment_dirs() + ([self.config.hugepage_dir] if self.config.hugepage_dir else [])
        for path in remove_stale_instance(self.paths, dirs):
            log.warning("removed stale %s left by a previous primary of prefix %r", path, self.config.prefix)

    def _check_socket_paths(self) -> None:
        """An ipc:// path must fit in sun_path (unix(7): 108 bytes with the NUL), checked
        before any hugepage is touched rather than at bind, after mapping."""
        for path in self.paths.socket_paths():
            if len(path.encode()) > 107:
                raise InvalidArgument(
                    f"invalid runtime_root: the socket path {path} is {len(path.encode())} bytes, "
                    "more than a unix socket allows (107)", name="runtime_root")

    def _choose_backing(self) -> tuple[Backing, int]:
        config = self.config
        shm = ShmBacking(self.paths.segment_stem(), self.policy.own_fd)
        if config.huge_pages == "off":
            return shm, _round_up(config.memory or DEFAULT_FALLBACK_MEMORY, shm.page_size)
        try:
            memory = self._hugepage_memory()  # first: "no such page size" beats "mount one"
            return self._hugetlbfs(), memory
        except HugepagesUnavailable as err:
            if config.huge_pages == "on":
                raise
            return shm, self._fall_back(err, shm)

    def _fall_back(self, err: HugepagesUnavailable, shm: ShmBacking) -> int:
        self.fallback_reason = err.message
        log.warning("huge_pages=try: falling back to 4 KiB pages in /dev/shm: %s", err.message)
        return _round_up(self.config.memory or DEFAULT_FALLBACK_MEMORY, shm.page_size)

    def _hugetlbfs(self) -> HugetlbfsBacking:
        size = self.config.page_size
        mounts = [m for m in hugepages.mounts() if m.page_size == size]
        wanted = self.config.hugepage_dir
        if wanted is not None:
            real = os.path.realpath(wanted)
            on_a_mount = any(os.path.commonpath([real, os.path.realpath(m.path)]) == os.path.realpath(m.path)
                             for m in mounts)
            if not on_a_mount or not os.path.isdir(real):
                raise HugepagesUnavailable(
                    f"{wanted} is not a hugetlbfs mount of {format_size(size)} pages (or a directory on one); "
                    f"mount one with: {hugepages.mount_hint(size)}")
            return HugetlbfsBacking(wanted, size, self.paths.segment_stem(), self.policy.own_fd)
        if not mounts:
            raise HugepagesUnavailable(
                f"no hugetlbfs mount of {format_size(size)} pages; mount one with: {hugepages.mount_hint(size)}")
        directory = os.path.join(mounts[0].path, SERVICE_SUBDIR)
        if not os.path.isdir(directory):
            directory = mounts[0].path
        return HugetlbfsBacking(directory, size, self.paths.segment_stem(), self.policy.own_fd)

    def _hugepage_memory(self) -> int:
        size = self.config.page_size
        pool = hugepages.pool(size)
        if pool is None:
            raise HugepagesUnavailable(f"this kernel has no {format_size(size)} hugepages")
        available = max(0, pool.free - pool.reserved)
        wanted = -(-self.config.memory // size) if self.config.memory else available
        if wanted == 0 or wanted > available:
            hint = hugepages.reserve_hint(size, pool.total + max(wanted, 1) - available)
            raise HugepagesUnavailable(
                f"asked for {wanted or 'all free'} hugepages of {format_size(size)}, {available} are free "
                f"(of {pool.total}); reserve more with: {hint}",
                size=wanted * size)
        return wanted * size

    def _map_first_segment(self, backing: Backing, window: Window, memory: int) -> tuple[Backing, Mapped]:
        try:
            mapped = backing.create(window, 0, window.base, memory, self._progress)
        except HugepagesUnavailable as err:
            if self.config.huge_pages == "on":
                raise
            backing = ShmBacking(self.paths.segment_stem(), self.policy.own_fd)
            memory = self._fall_back(err, backing)
            mapped = backing.create(window, 0, window.base, memory, self._progress)
        self._undo.callback(backing.remove, 0)
        return backing, mapped

    def _progress(self, done: int, total: int) -> None:
        log.debug("mapping: %s of %s", format_size(done), format_size(total))
        now = time.monotonic()
        if done == total or now - self._progress_sent >= 0.25:  # the manager needs no more
            self._progress_sent = now
            self.notifier.status(f"mapping {format_size(done)} of {format_size(total)} ({100 * done // total}%)")

    def _create_table(self, mapped: Mapped) -> Table:
        c = self.config
        layout = Layout.plan(base=self.window.base, window=self.window.size, page_size=self.backing.page_size,
                             mode=self.backing.mode, prefix=c.prefix, max_zones=c.max_zones, max_workers=c.max_workers)
        table = Table.create(self.paths.table, layout, own_fd=self.policy.own_fd)
        table.read_timeout = LOCK_WAIT_S  # the request loop must not wait behind a stuck writer
        self._undo.callback(os.unlink, self.paths.table)
        self._undo.callback(table.close)
        if mapped.iovas is not None:
            table.write_iovas(0, mapped.iovas)
        segment = SegmentRecord(0, mapped.address, mapped.length, self.backing.page_size, 0, mapped.numa_node,
                                mapped.iovas[0] if mapped.iovas else mapped.address, 0,
                                len(mapped.iovas or ()), mapped.path)
        with table.locked() as base:
            table.commit(base, segments=(segment,))
        self._publish({"op": "segments", "segments": [segment._asdict()]})
        return table

    def _bind(self) -> None:
        context = zmq.Context()
        self._undo.callback(context.term)
        # The ZAP handler first: see hugeshmd.access. It lives in this context
        # (inproc) and is answered from the serve loop, so no thread is needed.
        self.zap: zmq.Socket[bytes] = context.socket(zmq.REP)
        self._undo.callback(self.zap.close, 0)
        self.zap.bind(ZAP_ENDPOINT)
        guarded: dict[int, int | bytes] = {zmq.ZAP_DOMAIN: ZAP_DOMAIN, zmq.ZAP_ENFORCE_DOMAIN: 1}
        # ZMQ_MAXMSGSIZE must be set before bind: libzmq copies a socket's
        # options into each listener when it binds, and ignores later changes.
        self.router = self._socket(context, zmq.ROUTER, self.paths.control,
                                   {zmq.MAXMSGSIZE: protocol.MAX_MESSAGE, **guarded})
        self.publisher = self._socket(context, zmq.PUB, self.paths.events, guarded)

    def _socket(self, context: zmq.Context[zmq.Socket[bytes]], kind: int, endpoint: str,
                options: dict[int, int | bytes]) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = context.socket(kind)
        for option, value in options.items():
            sock.setsockopt(option, value)
        # libzmq leaves the ipc:// file behind when the socket closes: remove it after.
        self._undo.callback(_unlink_quietly, endpoint[len("ipc://"):])
        self._undo.callback(sock.close, 200)
        sock.setsockopt(zmq.LINGER, 200)
        sock.bind(endpoint)
        self.policy.own(endpoint[len("ipc://"):])
        return sock

    # -- serving -------------------------------------------------------------

    def serve(self) -> None:
        """Answer requests until :meth:`stop` is called (from a signal handler or another thread)."""
        poller = zmq.Poller()
        poller.register(self.zap, zmq.POLLIN)
        poller.register(self.router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        # The watchdog is fed from this loop, so a loop that hangs is restarted.
        beat = min(HEARTBEAT_S, self.notifier.watchdog / 2) if self.notifier.watchdog else HEARTBEAT_S
        next_beat = time.monotonic()
        while not self._stopping:
            ready = dict(poller.poll(timeout=max(0, int((next_beat - time.monotonic()) * 1000))))
            if self.zap in ready:
                self._serve_zap()
            if self.router in ready:
                self._serve_pending()
            if self._wake_r.fileno() in ready:
                self._drain_wakeups()
            if self._reload_pending:
                self.reload()
            if time.monotonic() >= next_beat:
                self._heartbeat()
                next_beat = time.monotonic() + beat

    def stop(self) -> None:
        """Ask :meth:`serve` to return. Safe from a signal handler."""
        self._stopping = True
        self._wake()

    def request_reload(self) -> None:
        """Ask :meth:`serve` to :meth:`reload` (from a SIGHUP handler)."""
        self._reload_pending = True
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending

    def wakeup_fd(self) -> int:
        return self._wake_w.fileno()

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _serve_pending(self) -> None:
        while True:
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            reply = self.handle(frames)
            if reply is not None:
                self.router.send_multipart(reply)

    def handle(self, frames: list[bytes]) -> list[bytes] | None:
        """The reply frames for one request's frames, or None when it cannot be answered."""
        self.requests += 1
        if len(frames) == 3 and frames[1] == b"":
            envelope, body = frames[:2], frames[2]  # a REQ client
        elif len(frames) == 2:
            envelope, body = frames[:1], frames[1]  # a DEALER client
        else:
            self._count("MalformedFrame")
            log.debug("dropped a request of %d frames", len(frames))
            return None
        return envelope + [protocol.encode(self._answer(body))]

    def _answer(self, body: bytes) -> dict[str, Any]:
        request_id, op = None, "?"
        try:
            message = protocol.decode(body)
            request_id = message.get("id")
            op, args = protocol.parse_request(message)
            self._count_op(op)
            return protocol.ok_reply(getattr(self, f"_op_{op}")(**args), request_id)
        except HugeshmdError as err:
            if op == "?":
                self._count_op("invalid")
            self._count(type(err).__name__)
            return protocol.error_reply(err, request_id)
        except Exception as err:  # a bug: keep serving, but say so loudly
            log.exception("internal error handling %r", op)
            self._count("InternalError")
            return protocol.error_reply(HugeshmdError(f"internal error in {op}: {type(err).__name__}"), request_id)

    def _count_op(self, op: str) -> None:
        self.requests_by_op[op] = self.requests_by_op.get(op, 0) + 1



    def _count(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def _publish(self, change: dict[str, Any]) -> None:
        self._seq += 1
        publisher = getattr(self, "publisher", None)
        if publisher is not None:
            publisher.send(protocol.encode({"v": protocol.VERSION, "seq": self._seq, **change}))

    def _heartbeat(self) -> None:
        self.publisher.send(protocol.encode({"v": protocol.VERSION, "seq": self._seq, "op": "heartbeat"}))
        if self.notifier.watchdog:
            self.notifier.send(watchdog=1)
        if self.notifier.enabled:
            summary = self.summary()
            if summary != self._status_sent:  # zones and workers change: keep `systemctl status` true
                self._status_sent = summary
                self.notifier.status(summary)

    def _serve_zap(self) -> None:
        """Answer the ZAP requests libzmq queued (RFC 27): 200 admits, 400 refuses.

        Every request gets a reply, whatever goes wrong: a REP socket left
        without one would take no further request, and every handshake after
        it would hang.
        """
        while True:
            try:
                frames = self.zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
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
            self.zap.send_multipart([b"1.0", request_id, *reply, b""])

    def _refuse(self, peer: tuple[int, int, int] | None) -> None:
        """Count a refusal; log a peer's 1st, 2nd, 4th, 8th... (libzmq reconnects a refused SUB every 100 ms)."""
        self.refused += 1
        uid = peer[0] if peer else None
        seen = self._refused_by_uid[uid] = self._refused_by_uid.get(uid, 0) + 1
        if seen & (seen - 1) == 0:
            who = "uid {} gid {} pid {}".format(*peer) if peer else "a peer without credentials"
            log.warning("refused a connection from %s (%d so far): not root, this primary's user, or a member of "
                        "the instance's group", who, seen)

    # -- reloading -----------------------------------------------------------

    def reload(self) -> None:
        """Read the config file again and apply what can change live (systemd's reload protocol).

        Only log_level reloads; a change to
        anything else is logged and waits for a restart. A bad file changes
        nothing: the error is logged and the primary goes on as it was.
        """
        self._reload_pending = False
        self.notifier.reloading()
        path = self.config.path
        if path is None and self.instance is not None and os.path.exists(instance_path(self.instance)):
            path = instance_path(self.instance)  # made since start
        try:
            fresh = load(path, self.overrides)
        except HugeshmdError as err:
            log.error("reload: %s; nothing changed", err.message)
        except Exception:  # noqa: BLE001 - a bug in reloading must not stop a serving primary
            log.exception("reload failed; nothing changed")
        else:
            kept = [f for f in fresh.__dataclass_fields__ if f not in RELOADABLE | {"path"}
                    and getattr(fresh, f) != getattr(self.config, f)]
            if kept:
                log.warning("reload: %s changed in %s; these apply at the next restart",
                            ", ".join(sorted(kept)), path)
            self.config = self._with(fresh)
            logging.getLogger().setLevel(fresh.log_level.upper())
            log.info("reloaded %s: log_level %s", fresh.path or "(no file)", fresh.log_level)
        self.notifier.send(ready=1, status=self.summary())

    def _with(self, fresh: Config) -> Config:
        return dataclasses.replace(self.config, path=fresh.path, **{k: getattr(fresh, k) for k in RELOADABLE})

    # -- operations (each returns the reply's fields) ------------------------------

    def _op_hello(self) -> dict[str, Any]:
        return {"prefix": self.config.prefix, "pid": os.getpid(), "table": self.paths.table,
                "state": STATE_NAMES[self.table.state()[0]], "generation": self.table.generation}

    def _op_snapshot(self) -> dict[str, Any]:
        snap = self.table.snapshot()
        layout = self.table.layout
        return {"seq": self._seq, "generation": snap.generation, "base": layout.base, "window": layout.window,
                "page_size": layout.page_size, "segments": [s._asdict() for s in snap.segments]}

    def _op_status(self) -> dict[str, Any]:
        return self.status()

    def _op_zones(self) -> dict[str, Any]:
        return {"zones": [z._asdict() for z in self.table.snapshot().zones]}

    def _op_reserve(self, name: str, size: int, align: int = 64) -> dict[str, Any]:
        return zones.reserve(self.table, name, size, align, LOCK_WAIT_S)[2]._asdict()

    def _op_lookup(self, name: str) -> dict[str, Any]:
        return zones.find(self.table.snapshot(), name)._asdict()

    def _op_free(self, name: str) -> dict[str, Any]:
        return zones.free(self.table, name, LOCK_WAIT_S)[2]._asdict()

    def status(self) -> dict[str, Any]:
        snap = self.table.snapshot()
        memory = sum(s.length for s in snap.segments)
        used = sum(z.size for z in snap.zones)
        return {
            "prefix": self.config.prefix, "pid": os.getpid(), "state": STATE_NAMES[self.table.state()[0]],
            "mode": "hugepages" if self.backing.mode == MODE_HUGETLBFS else "fallback",
            "fallback_reason": self.fallback_reason, "page_size": self.backing.page_size,
            "base": self.window.base, "window": self.window.size, "memory": memory, "used": used,
            "free": memory - used, "segments": len(snap.segments), "zones": len(snap.zones),
            "workers": sum(1 for pid, start in self.table.workers() if process_alive(pid, start)),
            "generation": snap.generation, "requests": self.requests, "errors": dict(self.errors),
            "requests_by_op": dict(self.requests_by_op), "refused": self.refused,
            "uptime": round(time.monotonic() - self._started, 3),
        }

    def summary(self) -> str:
        s = self.status()
        mode = s["mode"] if s["mode"] == "hugepages" else f"fallback ({s['fallback_reason'] or 'huge_pages=off'})"
        return (f"prefix {s['prefix']}: {format_size(s['memory'])} of {format_size(s['page_size'])} pages, "
                f"{mode}, window {s['base']:#x}+{format_size(s['window'])}, {s['zones']} zones, "
                f"{s['workers']} workers")

    # -- shutdown ------------------------------------------------------------

    def shutdown(self) -> None:
        """Tell workers, unmap, remove every file this primary made. Idempotent.

        The removal runs whatever happens while telling workers: a table that
        fails its checks or a lock that cannot be had must not pin hugepages.
        """
        self.notifier.send(stopping=1, status="stopping: telling workers, removing files")
        try:
            self._tell_workers()
        except Exception:  # noqa: BLE001 - log it, and still remove everything
            log.exception("could not mark the table stopped; removing the instance anyway")
        finally:
            self._undo.close()
            self._wake_r.close()
            self._wake_w.close()
            self.notifier.close()
        log.info("stopped: prefix %s, all hugepage files and runtime files removed", self.config.prefix)

    def _tell_workers(self) -> None:
        table = getattr(self, "table", None)
        if table is None or table.state()[0] == STATE_STOPPING:
            return
        mark_stopped(table)
        self._publish({"op": "stopping"})


def mark_stopped(table: Table, wait: float = 2.0) -> None:
    """Set the table's state to stopping and, if the writer lock can be had within
    ``wait`` seconds, commit a new generation so every worker's next call sees it."""
    table.set_state(STATE_STOPPING, *table.owner())
    try:
        with table.locked(timeout=wait) as base:
            table.commit(base)
    except TableBusy:
        log.warning("the table's writer lock stayed taken for %g s; workers will see the stop "
                    "at their next reserve or free", wait)


def run(config: Config, overrides: dict[str, Any] | None = None, instance: str | None = None) -> int:
    """Run a primary in the foreground until SIGTERM or SIGINT; the exit status.

    The handlers go in before start-up, so a signal during a long mapping
    still ends in a clean shutdown. SIGHUP reloads what can change live
    (:meth:`Primary.reload`); one that arrives during start-up is applied
    once serving. Under systemd (``$NOTIFY_SOCKET``) the primary reports
    READY, STATUS, WATCHDOG, RELOADING and STOPPING (:mod:`hugeshmd.systemd`).
    """
    primary = Primary(config, overrides, Notifier(), instance)
    previous = signal.set_wakeup_fd(primary.wakeup_fd(), warn_on_full_buffer=False)
    handlers = {sig: signal.signal(sig, lambda *_: primary.stop()) for sig in (signal.SIGTERM, signal.SIGINT)}
    hup = signal.signal(signal.SIGHUP, lambda *_: primary.request_reload())
    try:
        try:
            primary.start()
        except Exception as err:
            primary.notifier.status(f"failed: {getattr(err, 'message', None) or err}")
            raise
        try:
            primary.serve()
        finally:
            primary.shutdown()
    finally:
        signal.set_wakeup_fd(previous)
        for sig, handler in {**handlers, signal.SIGHUP: hup}.items():
            signal.signal(sig, handler)
    return 0


def _rmdir_quietly(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _round_up(size: int, to: int) -> int:
    return -(-size // to) * to
