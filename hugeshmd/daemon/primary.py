"""The primary's lifecycle: start (each step with its undo), serve, reload, shut down.

Start-up order matters and each step registers its own undo, so a failure at
any point (a second primary, no hugepages, a taken address) leaves nothing
behind: lock (before any socket: libzmq unlinks ipc paths it binds over), a
dead predecessor's files (:mod:`.predecessor`), backing choice
(:mod:`.backing`), address window, segment, table, sockets, then ``ready``.
Shutdown runs the same undo list in reverse.

What the loop serves lives elsewhere: requests in :mod:`.server`, access
checks in :mod:`.access` (:class:`~.access.ZapHandler`), the change stream in
:mod:`.publisher`. Every attribute is set in ``__init__``; those that start-up
fills stay None until their step has run.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import zmq

from ..errors import (
    AdoptionRefused,
    HugepagesUnavailable,
    HugeshmdError,
    InvalidArgument,
    OutOfMemory,
    TableCorrupt,
)
from ..shm.heapcheck import walk
from ..shm.identity import own_start_time
from ..shm.layout import MODE_HUGETLBFS, STATE_NAMES, STATE_READY, STATE_STOPPING, Layout, SegmentRecord
from ..shm.lock import PrimaryLock
from ..shm.paths import RuntimePaths
from ..shm.registry import Registry
from ..shm.table import Table
from ..shm.window import Window
from ..shm.zones import RESERVED
from ..sizes import format_size
from ..wire import protocol
from . import adoption, backing, predecessor
from .access import DIR_MODE, ZAP_DOMAIN, ZAP_ENDPOINT, Policy, ZapHandler, remove_ipc_risk
from .backing import Backing, Mapped
from .config import RELOADABLE, Config, instance_path, load
from .publisher import Publisher
from .reclaim import SCAN_S, Reclaimer
from .server import LOCK_WAIT_S, RequestServer
from .systemd import Notifier

__all__ = ["Primary", "run", "LOCK_WAIT_S"]

log = logging.getLogger("hugeshmd.primary")

HEARTBEAT_S = 1.0
GROW_MIN = 32 << 20  # a growth maps at least this much: an arena a time would be a segment a time
STOP_WAIT_S = 2.0  # how long shutdown waits for a worker holding the table's lock to mark it stopped


class Primary:
    """One instance's primary. :meth:`start`, then :meth:`serve`, then :meth:`shutdown`."""

    def __init__(self, config: Config, overrides: dict[str, Any] | None = None,
                 notifier: Notifier | None = None, instance: str | None = None) -> None:
        self.config = config
        self.config_name = instance  # started with --instance NAME: SIGHUP looks for NAME.toml again
        self.overrides = overrides or {}  # the command line's options: kept over the file on reload
        self.notifier = notifier or Notifier({})
        self.paths = RuntimePaths.for_prefix(config.prefix, config.runtime_root)
        self.policy = Policy.from_names(config.group)  # resolved first: a bad group touches nothing
        self.server = RequestServer(self)
        self.zap_handler = ZapHandler(self.policy)
        self.publisher = Publisher()
        # Filled by start-up, in this order:
        self.fallback_reason: str | None = None
        self.backing: Backing | None = None
        self.window: Window | None = None
        self.table_or_none: Table | None = None
        self.reclaimer: Reclaimer | None = None
        self.zap: zmq.Socket[bytes] | None = None
        self.router: zmq.Socket[bytes] | None = None
        self._files: list[Callable[[], None]] = []  # removers of the instance's files, in the order made
        self._keep_files = False  # whether the instance's files must outlive this process
        self._stop_keeps = False  # set by stop(keep=True): the stop leaves the instance for the next primary
        self._started_at = time.time()
        self._reload_pending = False
        self._progress_sent = 0.0  # when the last STATUS= of the mapping went out
        self._status_sent = ""  # the last STATUS= summary, sent again when it changes
        self._stopping = False
        self._undo = ExitStack()
        self._started = time.monotonic()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    @property
    def table(self) -> Table:
        """The instance's table; only once start-up has made it (RuntimeError before)."""
        if self.table_or_none is None:
            raise RuntimeError("the primary has no table before start() made it")
        return self.table_or_none

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
        self._make_runtime_dir()
        lock = PrimaryLock.acquire(self.paths.lock)
        self._undo.callback(lock.release)
        self.policy.own(self.paths.dir, DIR_MODE)  # ours now: a rival would have been refused the lock
        self.policy.own(self.paths.lock, 0o600)  # a member that could read it could flock it, and block a restart
        self._undo.callback(self._remove_files)  # after the sockets and the table are closed
        found = predecessor.find(self.paths, predecessor.directories(self.config.hugepage_dir))
        candidate = self._adoptable(found)
        if candidate is None:
            for path in found.remove():
                log.warning("removed stale %s left by a previous primary of prefix %r", path, self.config.prefix)
            self._start_fresh()
        else:
            self._adopt(candidate, found)
        assert self.backing is not None
        self.reclaimer = Reclaimer(self.table, self.window)
        self._undo.callback(self.reclaimer.close)
        if candidate is not None:
            self.reclaimer.reclaim_dead()  # what workers that died while no primary ran still owned
        risk = remove_ipc_risk(os.geteuid()) if self.backing.mode != MODE_HUGETLBFS else None
        if risk:
            log.warning("%s", risk)
        self._bind()
        self.table.set_state(STATE_READY, os.getpid(), own_start_time())
        self._keep_files = False  # serving: what happens to the files is shutdown's to say
        summary = self.summary()
        self.notifier.send(ready=1, status=summary)
        log.info("ready: %s", summary)

    def _start_fresh(self) -> None:
        choice = backing.choose(self.config, self.paths, self.policy.own_fd)
        self.fallback_reason = choice.fallback_reason
        window = Window.reserve(self.config.base_address, self.config.window_for(choice.memory))
        self._undo.callback(window.release)
        self.window = window
        mapped = self._map_first_segment(choice)
        self.table_or_none = self._create_table(mapped)

    def _adoptable(self, found: predecessor.Predecessor) -> adoption.Candidate | None:
        """The dead predecessor's instance if this primary may and can adopt it, else None (start
        afresh). With ``adopt = "require"``, AdoptionRefused (keeping its files) if it cannot."""
        if found.table is None or self.config.adopt == "never":
            if found.table is not None:
                log.info("adopt = never: starting afresh, removing the instance a dead primary left")
            return None
        try:
            return adoption.verify(found, self.config)
        except AdoptionRefused as err:
            if self.config.adopt == "require":
                self._keep_files = True
                log.error("%s; its files are kept (adopt = require): inspect them, then remove them with "
                          "`hugeshmd hugepages cleanup --prefix %s` to start afresh", err.message, self.config.prefix)
                raise
            log.warning("%s; starting afresh (adopt = auto)", err.message)
            return None

    def _adopt(self, candidate: adoption.Candidate, found: predecessor.Predecessor) -> None:
        """Take over a verified instance: its window, its segments re-mapped where they were
        (not populated: their pages are there), its table as it is, generation and all."""
        self._keep_files = True  # from here a failure leaves the instance for the next start
        table, snap, layout = candidate.table, candidate.snapshot, candidate.layout
        self._undo.callback(table.close)
        window = Window.reserve(layout.base, layout.window)
        self._undo.callback(window.release)
        self.window = window
        for segment in snap.segments:
            window.map(segment.id, segment.address, segment.length, segment.path, segment.offset)
        self.backing = backing.adopted(layout, snap.segments[0].path, self.paths, self.policy.own_fd)
        if self.backing.mode != MODE_HUGETLBFS and self.config.huge_pages != "off":
            self.fallback_reason = "adopted an instance in /dev/shm"
        table.lock_timeout = LOCK_WAIT_S  # the request loop must not wait behind a stuck writer
        # systemd hands a preserved RuntimeDirectory= back owned by the service's user and group,
        # all of it (path_chown_recursive): give the table back to the instance's group.
        self.policy.own(self.paths.table)
        self.table_or_none = table
        self._files += [functools.partial(self.backing.remove, s.id) for s in snap.segments]
        self._files.append(functools.partial(_unlink_quietly, self.paths.table))
        listed = {s.path for s in snap.segments}
        for path in found.others + [p for p in found.segments if p not in listed]:
            _unlink_quietly(path)  # sockets, half-written tables, segment files the table does not list
        count = table.count_adoption()
        used = sum(z.size for z in snap.zones)
        memory = sum(s.length for s in snap.segments)
        log.info("adopted prefix %s (adoption %d): %d segments, %d zones, %s used of %s, generation %d",
                 self.config.prefix, count, len(snap.segments), len(snap.zones), format_size(used),
                 format_size(memory), snap.generation)
        self._warn_unchanged(layout, memory)
        self.publisher.publish({"op": "segments", "segments": [s._asdict() for s in snap.segments]})

    def _warn_unchanged(self, layout: Layout, memory: int) -> None:
        c = self.config
        kept = [f"{key} {mine} (configured {theirs})" for key, mine, theirs in (
            ("memory", memory, c.memory), ("max_zones", layout.max_zones, c.max_zones),
            ("max_workers", layout.max_workers, c.max_workers)) if theirs is not None and mine != theirs]
        if kept:
            log.warning("the adopted instance keeps %s; a change applies at the next fresh start", ", ".join(kept))

    def _remove_files(self) -> None:
        """Remove the instance's files, unless they must outlive this process (an adoption that
        failed, a refusal, or a stop that keeps the instance for the next primary)."""
        if self._keep_files:
            return
        for remove in reversed(self._files):
            remove()

    def _make_runtime_dir(self) -> None:
        os.makedirs(self.paths.dir, mode=DIR_MODE, exist_ok=True)
        if os.path.islink(self.paths.dir):  # chown and chmod below would follow it
            raise InvalidArgument(f"invalid runtime_root: {self.paths.dir} is a symbolic link", name="runtime_root")
        self._undo.callback(_rmdir_quietly, self.paths.dir)  # last undo: fails if another primary uses it

    def _check_socket_paths(self) -> None:
        """An ipc:// path must fit in sun_path (unix(7): 108 bytes with the NUL), checked
        before any hugepage is touched rather than at bind, after mapping."""
        for path in self.paths.socket_paths():
            if len(path.encode()) > 107:
                raise InvalidArgument(
                    f"invalid runtime_root: the socket path {path} is {len(path.encode())} bytes, "
                    "more than a unix socket allows (107)", name="runtime_root")

    def _map_first_segment(self, choice: backing.Choice) -> Mapped:
        assert self.window is not None
        try:
            mapped = choice.backing.create(self.window, 0, self.window.base, choice.memory, self._progress)
        except HugepagesUnavailable as err:
            if self.config.huge_pages == "on":
                raise
            choice = backing.fall_back(self.config, self.paths, self.policy.own_fd, err)
            self.fallback_reason = choice.fallback_reason
            mapped = choice.backing.create(self.window, 0, self.window.base, choice.memory, self._progress)
        self.backing = choice.backing
        self._files.append(functools.partial(choice.backing.remove, 0))
        return mapped

    def _progress(self, done: int, total: int) -> None:
        log.debug("mapping: %s of %s", format_size(done), format_size(total))
        now = time.monotonic()
        if done == total or now - self._progress_sent >= 0.25:  # the manager needs no more
            self._progress_sent = now
            self.notifier.status(f"mapping {format_size(done)} of {format_size(total)} ({100 * done // total}%)")

    def _create_table(self, mapped: Mapped) -> Table:
        c = self.config
        assert self.window is not None and self.backing is not None
        layout = Layout.plan(base=self.window.base, window=self.window.size, page_size=self.backing.page_size,
                             mode=self.backing.mode, prefix=c.prefix, max_zones=c.max_zones, max_workers=c.max_workers)
        segment = SegmentRecord(0, mapped.address, mapped.length, self.backing.page_size, 0, mapped.numa_node,
                                mapped.iovas[0] if mapped.iovas else mapped.address, 0,
                                len(mapped.iovas or ()), mapped.path)
        table = Table.create(self.paths.table, layout, own_fd=self.policy.own_fd, segments=(segment,))
        self._files.append(functools.partial(_unlink_quietly, self.paths.table))
        self._undo.callback(table.close)
        table.lock_timeout = LOCK_WAIT_S  # the request loop must not wait behind a stuck writer
        if mapped.iovas is not None:
            table.write_iovas(0, mapped.iovas)
        self.publisher.publish({"op": "segments", "segments": [segment._asdict()]})
        return table

    def _bind(self) -> None:
        context = zmq.Context()
        self._undo.callback(context.term)
        # The ZAP handler first: see hugeshmd.daemon.access. It lives in this context
        # (inproc) and is answered from the serve loop, so no thread is needed.
        zap: zmq.Socket[bytes] = context.socket(zmq.REP)
        self._undo.callback(zap.close, 0)
        zap.bind(ZAP_ENDPOINT)
        self.zap = zap
        guarded: dict[int, int | bytes] = {zmq.ZAP_DOMAIN: ZAP_DOMAIN, zmq.ZAP_ENFORCE_DOMAIN: 1}
        # ZMQ_MAXMSGSIZE must be set before bind: libzmq copies a socket's
        # options into each listener when it binds, and ignores later changes.
        self.router = self._socket(context, zmq.ROUTER, self.paths.control,
                                   {zmq.MAXMSGSIZE: protocol.MAX_MESSAGE, **guarded})
        self.publisher.attach(self._socket(context, zmq.PUB, self.paths.events, guarded))

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
        assert self.zap is not None and self.router is not None, "serve() before start()"
        poller = zmq.Poller()
        poller.register(self.zap, zmq.POLLIN)
        poller.register(self.router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        # The watchdog is fed from this loop, so a loop that hangs is restarted.
        beat = min(HEARTBEAT_S, self.notifier.watchdog / 2) if self.notifier.watchdog else HEARTBEAT_S
        next_beat = next_scan = time.monotonic()
        reclaimer = self.reclaimer
        assert reclaimer is not None
        while not self._stopping:
            wait = min(next_beat, next_scan) - time.monotonic()
            ready = dict(poller.poll(timeout=max(0, int(wait * 1000 + 0.999))))
            for fd in [fd for fd in ready if isinstance(fd, int) and reclaimer.watching(fd)]:
                poller.unregister(fd)
                reclaimer.exited(fd)  # a heap owner died: the kernel said so through its pidfd
            if time.monotonic() >= next_scan:
                for fd in reclaimer.scan():
                    poller.register(fd, zmq.POLLIN)
                next_scan = time.monotonic() + SCAN_S
            if self.zap in ready:
                _drain(self.zap, self.zap_handler.reply)
            if self.router in ready:
                _drain(self.router, self.server.handle)
            if self._wake_r.fileno() in ready:
                self._drain_wakeups()
            if self._reload_pending:
                self.reload()
            if time.monotonic() >= next_beat:
                self._heartbeat()
                next_beat = time.monotonic() + beat

    def handle(self, frames: list[bytes]) -> list[bytes] | None:
        """The reply frames for one request's frames (:meth:`RequestServer.handle`)."""
        return self.server.handle(frames)

    def stop(self, keep: bool = False) -> None:
        """Ask :meth:`serve` to return. Safe from a signal handler. With ``keep`` (or ``on_stop =
        "keep"``) the shutdown leaves the instance for the next primary to adopt."""
        self._stop_keeps = self._stop_keeps or keep
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

    def _heartbeat(self) -> None:
        self.publisher.heartbeat(os.getpid())
        if self.reclaimer is not None:
            self.reclaimer.reclaim_dead()  # the backstop: owners no pidfd watched (see reclaim.py)
        if self.notifier.watchdog:
            self.notifier.send(watchdog=1)
        if self.notifier.enabled:
            summary = self.summary()
            if summary != self._status_sent:  # zones and workers change: keep `systemctl status` true
                self._status_sent = summary
                self.notifier.status(summary)

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
        if path is None and self.config_name is not None and os.path.exists(instance_path(self.config_name)):
            path = instance_path(self.config_name)  # made since start
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

    # -- growth -------------------------------------------------------------------

    def grow(self, size: int) -> SegmentRecord:
        """Map another segment of at least ``size`` bytes (at least GROW_MIN, within max_memory)
        right after the last one, and publish it; workers map it when they first meet it.

        Raises OutOfMemory, saying what is free and what to do, when max_memory, the window or
        the hugepage pool does not allow it. Nothing is left mapped or on disk after a refusal.
        """
        assert self.backing is not None and self.window is not None
        table, page = self.table, self.backing.page_size
        snap = table.snapshot()
        memory = sum(s.length for s in snap.segments)
        limit = max(self.config.max_memory or 0, memory)
        want = -(-size // page) * page
        length = min(max(want, -(-GROW_MIN // page) * page), limit - memory)
        last = max(snap.segments, key=lambda s: s.end)
        if last.end + max(length, want) > self.window.base + self.window.size:
            raise OutOfMemory(f"prefix {self.config.prefix!r} cannot grow by {format_size(want)}: its address "
                              f"window ({format_size(self.window.size)}) is full; start it with a larger window",
                              size=size)
        if length < want:
            raise OutOfMemory(f"prefix {self.config.prefix!r} cannot grow by {format_size(want)}: it maps "
                              f"{format_size(memory)} and may grow to {format_size(limit)} (max_memory"
                              f"{'' if self.config.max_memory else ', unset: no growth'}); raise max_memory "
                              "and restart the primary (adoption keeps every zone)", size=size)
        sid = max(s.id for s in snap.segments) + 1
        try:
            mapped = self.backing.create(self.window, sid, last.end, length, None)
        except HugepagesUnavailable as err:
            raise OutOfMemory(f"prefix {self.config.prefix!r} cannot grow by {format_size(length)}: "
                              f"{err.message}; {_pool_advice(page, length)}", size=size, errno=err.errno) from err
        remove = functools.partial(self.backing.remove, sid)
        first_iova = max((s.iova_index + s.iova_count for s in snap.segments), default=0)
        record = SegmentRecord(sid, mapped.address, mapped.length, page, 0, mapped.numa_node,
                               mapped.iovas[0] if mapped.iovas else mapped.address, first_iova,
                               len(mapped.iovas or ()), mapped.path)
        try:
            if mapped.iovas is not None:
                table.write_iovas(first_iova, mapped.iovas)
            with table.locked() as base:
                table.commit(base, segments=base.segments + (record,))
        except BaseException:
            self.window.unmap(sid)
            remove()
            raise
        self._files.append(remove)
        self.publisher.publish({"op": "segments", "segments": [s._asdict() for s in table.snapshot().segments]})
        log.info("grew prefix %s by %s (segment %d at %#x): %s mapped", self.config.prefix, format_size(length),
                 sid, mapped.address, format_size(memory + length))
        return record

    # -- figures ------------------------------------------------------------------

    def status(self, heap: bool = True) -> dict[str, Any]:
        """The instance's figures (without a walk of the heap unless ``heap``); TableCorrupt,
        naming the damage, if its table is damaged."""
        assert self.backing is not None and self.window is not None
        damage = self.table.damage()
        if damage is not None:
            raise TableCorrupt(f"the table of prefix {self.config.prefix!r} is damaged: {damage}; its workers see "
                               "TableCorrupt. Stop the instance (pages go once workers detach) and start it afresh",
                               path=self.paths.table)
        snap = self.table.snapshot()
        memory = sum(s.length for s in snap.segments)
        used = sum(z.size for z in snap.zones)
        server = self.server
        return {
            "prefix": self.config.prefix, "pid": os.getpid(), "state": STATE_NAMES[self.table.state()[0]],
            "mode": "hugepages" if self.backing.mode == MODE_HUGETLBFS else "fallback",
            "fallback_reason": self.fallback_reason, "page_size": self.backing.page_size,
            "base": self.window.base, "window": self.window.size, "memory": memory, "used": used,
            "free": memory - used, "segments": len(snap.segments),
            "zones": sum(1 for z in snap.zones if not z.name.startswith(RESERVED)) + self._named_zones(),
            "workers": len(Registry(self.table).live()),
            "generation": snap.generation, "requests": server.requests, "errors": dict(server.errors),
            "requests_by_op": dict(server.requests_by_op), "refused": self.zap_handler.refused,
            "uptime": round(time.monotonic() - self._started, 3),
            "created": self.table.layout.created_ns / 1e9, "started": self._started_at,
            "adoptions": self.table.adoptions(),
            "heap": self._heap_figures(len(snap.segments) - 1) if heap else {},
        }

    def _named_zones(self) -> int:
        """How many zones the name index holds (hugeshmd.shm.names); the heap's own are in "heap"."""
        try:
            index = self.server.names()
        except HugeshmdError:
            return 0  # damaged: the checker says how
        return index.published() if index is not None else 0

    def _heap_figures(self, growths: int) -> dict[str, Any]:
        try:
            return {**walk(self.table, self.window, rules=False).figures(), "growths": growths,
                    "max_memory": self.config.max_memory}
        except Exception:  # noqa: BLE001 - the figures must not cost the status reply
            log.exception("could not walk the heap for its figures")
            return {}

    def summary(self) -> str:
        """One line for systemd's STATUS= and the log; never raises (a damaged table is said)."""
        try:
            s = self.status(heap=False)  # at each heartbeat under systemd: the line shows no heap figures
        except HugeshmdError as err:
            return f"prefix {self.config.prefix}: {err.message}"
        mode = s["mode"] if s["mode"] == "hugepages" else f"fallback ({s['fallback_reason'] or 'huge_pages=off'})"
        return (f"prefix {s['prefix']}: {format_size(s['memory'])} of {format_size(s['page_size'])} pages, "
                f"{mode}, window {s['base']:#x}+{format_size(s['window'])}, {s['zones']} zones, "
                f"{s['workers']} workers")

    # -- shutdown ------------------------------------------------------------

    def shutdown(self) -> None:
        """Release the instance (tell workers, unmap, remove every file), or, for a stop that
        keeps it (:meth:`stop`, ``on_stop``), close this process's hold on it and leave it,
        zones, files and all, for the next primary to adopt. Idempotent.

        The removal runs whatever happens while telling workers: a table that
        fails its checks or a lock that cannot be had must not pin hugepages.
        """
        keep = self._stop_keeps or self.config.on_stop == "keep"
        self.notifier.send(stopping=1, status="stopping: " + ("keeping the instance for the next primary" if keep
                                                              else "telling workers, removing files"))
        try:
            if not keep:
                self._tell_workers()
        except Exception:  # noqa: BLE001 - log it, and still remove everything
            log.exception("could not mark the table stopped; removing the instance anyway")
        finally:
            self._keep_files = self._keep_files or keep
            self._undo.close()
            self._wake_r.close()
            self._wake_w.close()
            self.notifier.close()
        if keep:
            log.info("stopped: prefix %s kept for the next primary to adopt (its files stay)", self.config.prefix)
        else:
            log.info("stopped: prefix %s, all hugepage files and runtime files removed", self.config.prefix)

    def _tell_workers(self) -> None:
        table = self.table_or_none
        if table is None or table.state()[0] == STATE_STOPPING:
            return
        if not table.mark_stopped(STOP_WAIT_S):
            log.warning("the table's writer lock stayed taken for %g s; workers will see the stop "
                        "at their next reserve or free", STOP_WAIT_S)
        self.publisher.publish({"op": "stopping"})


def _drain(sock: zmq.Socket[bytes], answer: Any) -> None:
    """Answer every message queued on ``sock`` with ``answer(frames)`` (None: no reply)."""
    while True:
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        reply = answer(frames)
        if reply is not None:
            sock.send_multipart(reply)


def run(config: Config, overrides: dict[str, Any] | None = None, instance: str | None = None) -> int:
    """Run a primary in the foreground until SIGTERM or SIGINT; the exit status.

    The handlers go in before start-up, so a signal during a long mapping
    still ends in a clean shutdown. SIGHUP reloads what can change live
    (:meth:`Primary.reload`); one that arrives during start-up is applied
    once serving. Under systemd (``$NOTIFY_SOCKET``) the primary reports
    READY, STATUS, WATCHDOG, RELOADING and STOPPING (:mod:`hugeshmd.daemon.systemd`).
    """
    notifier = Notifier()
    try:
        primary = Primary(config, overrides, notifier, instance)
    except Exception as err:
        notifier.status(f"failed: {getattr(err, 'message', None) or err}")
        notifier.close()
        raise
    previous = signal.set_wakeup_fd(primary.wakeup_fd(), warn_on_full_buffer=False)
    handlers = {sig: signal.signal(sig, lambda *_: primary.stop()) for sig in (signal.SIGTERM, signal.SIGINT)}
    handlers[signal.SIGUSR2] = signal.signal(signal.SIGUSR2, lambda *_: primary.stop(keep=True))
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


def _pool_advice(page_size: int, wanted: int) -> str:
    """What the hugepage pool of ``page_size`` has free, and how to reserve more."""
    from .hugepages import pool

    found = pool(page_size)
    free = "unknown" if found is None else f"{found.available} pages ({format_size(found.available * page_size)})"
    return (f"the pool of {format_size(page_size)} pages has {free} free; reserve more with "
            f"`hugeshmd hugepages reserve SIZE --page-size {'1G' if page_size == 1 << 30 else f'{page_size >> 20}M'}` "
            f"(SIZE the whole pool, {format_size(wanted)} more than now)")


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
