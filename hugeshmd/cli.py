"""``hugeshmd``: run a primary, ask one for its status or metrics, manage hugepages, install the units."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from .errors import HugeshmdError, InvalidArgument
from .sizes import format_size

__all__ = ["main"]

log = logging.getLogger("hugeshmd")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.command(args))
    except HugeshmdError as err:
        print(f"hugeshmd: {err.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `hugeshmd status | head`: the reader left, say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _parser() -> argparse.ArgumentParser:
    from .daemon.config import OPTIONS

    parser = argparse.ArgumentParser(
        prog="hugeshmd", description="Hugepage shared memory at the same address in every process."
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    primary = commands.add_parser("primary", help="run a primary in the foreground")
    _config_source(primary)
    for option in OPTIONS:
        primary.add_argument("--" + option.name.replace("_", "-"), dest=option.name, metavar="VALUE",
                             help=f"{option.help} (default: {_show(option.default)})")
    primary.set_defaults(command=_primary)
    status = commands.add_parser("status", help="ask a running primary for its figures; exit 1 if none runs")
    status.add_argument("--prefix", default="default")
    status.add_argument("--runtime-root", default=None)
    status.add_argument("--timeout", type=float, default=2.0)
    status.add_argument("--json", action="store_true")
    status.set_defaults(command=_status)
    _hugepages_parser(commands)
    grow = commands.add_parser("grow", help="map another segment of at least SIZE into a running instance "
                               "(within its max_memory); workers map it when they first meet it")
    grow.add_argument("size", metavar="SIZE", help="e.g. 1G")
    grow.add_argument("--prefix", default="default")
    grow.add_argument("--runtime-root", default=None)
    grow.add_argument("--timeout", type=float, default=60.0)
    grow.set_defaults(command=_grow)
    check = commands.add_parser("check", help="walk an instance's heap and zone table read-only; exit 1 on any "
                                "violation (safe on a live instance)")
    check.add_argument("--prefix", default="default")
    check.add_argument("--runtime-root", default=None)
    check.add_argument("--timeout", type=float, default=2.0)
    check.add_argument("--json", action="store_true")
    check.set_defaults(command=_check)
    metrics = commands.add_parser("metrics", help="an instance's figures in the Prometheus text format")
    metrics.add_argument("--prefix", default="default")
    metrics.add_argument("--runtime-root", default=None)
    metrics.add_argument("--timeout", type=float, default=2.0)
    metrics.add_argument("--textfile", metavar="DIR",
                         help="write DIR/hugeshmd_<prefix>.prom atomically (node_exporter's textfile collector)")
    metrics.set_defaults(command=_metrics)
    conf = commands.add_parser("config", help="check an instance's options and print them as TOML")
    _config_source(conf)
    conf.set_defaults(command=_config)
    unit = commands.add_parser("systemd", help="install the systemd units for this installation")
    unit.add_argument("action", choices=("install", "show", "prestart", "stop-post"),
                      help="install: write the units; show: print them; prestart and stop-post: what a unit runs "
                           "as root before its primary starts and after it ends")
    unit.add_argument("--instance", default="default",
                      help="prestart, stop-post: the instance (its config file is read)")
    unit.add_argument("--unit", default=None, help="stop-post: the unit, for its queued job (default: the instance's)")
    unit.add_argument("--dir", default=None, help="where units go (default /etc/systemd/system)")
    unit.add_argument("--sysusers-dir", default=None, help="where the sysusers.d entry goes (default /etc/sysusers.d)")
    unit.add_argument("--no-sysusers", action="store_true", help="do not write the sysusers.d entry or make the user")
    unit.add_argument("--user", default=None, help="the daemon's user and group (default hugeshmd)")
    unit.add_argument("--no-reload", action="store_true", help="do not run systemctl daemon-reload")
    unit.set_defaults(command=_systemd)
    return parser


def _config_source(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", metavar="FILE", help="TOML file of the options below (flags override it)")
    source.add_argument("--instance", metavar="PREFIX",
                        help="prefix PREFIX, options from /etc/hugeshmd/PREFIX.toml if it exists (what the units use)")


def _show(value: Any) -> str:
    return hex(value) if isinstance(value, int) and value > 1 << 32 else str(value)


def _load_config(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    from .daemon import config

    overrides = {o.name: getattr(args, o.name, None) for o in config.OPTIONS}
    path = args.config
    if args.instance is not None:
        if overrides["prefix"] not in (None, args.instance):
            raise InvalidArgument(f"--instance {args.instance} and --prefix {overrides['prefix']} disagree")
        overrides["prefix"] = args.instance
        candidate = config.instance_path(args.instance)
        path = candidate if os.path.exists(candidate) else None
    conf = config.load(path, overrides)
    if args.instance is not None and conf.prefix != args.instance:
        raise InvalidArgument(f"{path}: prefix {conf.prefix!r} is not the instance's name {args.instance!r}",
                              name="prefix")
    return conf, overrides


def _primary(args: argparse.Namespace) -> int:
    from .daemon import primary
    from .daemon.systemd import setup_logging

    conf, overrides = _load_config(args)
    setup_logging(conf.log_level)
    return primary.run(conf, overrides, args.instance)


def _config(args: argparse.Namespace) -> int:
    from .daemon.config import OPTIONS

    conf, _ = _load_config(args)
    print(f"# {conf.path or 'no file: defaults and flags'}")
    for option in OPTIONS:
        value = getattr(conf, option.name)
        if value is None:
            print(f"# {option.name} unset: {option.help}")
        else:
            print(f"{option.name} = {_toml(value)}")
    return 0


def _toml(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, int):
        return _show(value) if value > 1 << 32 else str(value)
    return json.dumps(value)


def _metrics(args: argparse.Namespace) -> int:
    from .host import metrics
    from .shm.paths import RuntimePaths
    from .wire.client import Control

    status: dict[str, Any] | None = None
    try:
        with Control(RuntimePaths.for_prefix(args.prefix, args.runtime_root), args.timeout) as control:
            status = control.request("status")
    except HugeshmdError as err:  # down, refused, busy: the file must still say so, not keep an old "up 1"
        print(f"hugeshmd: {err.message}", file=sys.stderr)
    text = metrics.render(args.prefix, status)
    if args.textfile:
        metrics.write_textfile(args.textfile, args.prefix, text)
    else:
        sys.stdout.write(text)
    return 0 if status is not None else 1


def _prestart(instance: str, user: str) -> int:
    """As root, before the daemon: grow the pool to the instance's memory, make the mount's directory."""
    from .daemon import hugepages
    from .host import install, pool

    conf, _ = _load_config(argparse.Namespace(config=None, instance=instance))
    if install.adoptable(conf):  # its pages are allocated already: growing the pool would take as many again
        print("an instance waits to be adopted: the pool stays as it is")
        return 0
    outcome = pool.reserve_for(conf)
    print(outcome.message, file=sys.stderr if outcome.message.startswith("warning") else sys.stdout)
    if conf.huge_pages != "off" and conf.hugepage_dir is None:
        mounts = [m.path for m in hugepages.mounts() if m.page_size == conf.page_size]
        for line in install.prestart(conf, user, mounts[:1]):
            print(line)
    return _HUGEPAGES_SHORT if outcome.short else 0


def _systemd(args: argparse.Namespace) -> int:
    from .host import install

    user = args.user or install.SERVICE_USER
    if args.action == "prestart":
        return _prestart(args.instance, user)
    if args.action == "stop-post":
        conf, _ = _load_config(argparse.Namespace(config=None, instance=args.instance))
        unit = args.unit or ("hugeshmd.service" if args.instance == "default" else f"hugeshmd@{args.instance}.service")
        print("\n".join(install.stop_post(conf, unit, os.environ.get("SERVICE_RESULT", ""))))
        return 0
    if args.action == "show":
        for name, text in install.units(install.this_command(), user).items():
            print(f"### {name}\n{text}")
        return 0
    written = install.install(args.dir or install.UNIT_DIR,
                              None if args.no_sysusers else args.sysusers_dir or install.SYSUSERS_DIR,
                              user, reload=not args.no_reload)
    print("\n".join(f"wrote {path}" for path in written))
    print(f"start the default instance with: systemctl enable --now hugeshmd.service; "
          f"another with: systemctl enable --now hugeshmd@NAME.service (options in /etc/hugeshmd/NAME.toml); "
          f"admit a worker's user with: usermod -aG {user} USER")
    return 0


def _grow(args: argparse.Namespace) -> int:
    from .shm.paths import RuntimePaths
    from .sizes import parse_size
    from .wire.client import Control

    with Control(RuntimePaths.for_prefix(args.prefix, args.runtime_root), args.timeout) as control:
        segment = control.request("grow", size=parse_size(args.size))
    print(f"prefix {args.prefix}: segment {segment['id']} of {format_size(segment['length'])} at "
          f"{segment['address']:#x} ({segment['path']})")
    return 0


def _check(args: argparse.Namespace) -> int:
    from .shm.heapcheck import walk
    from .shm.secondary import attach

    with attach(args.prefix, timeout=args.timeout, runtime_root=args.runtime_root, read_only=True) as shm:
        report = walk(shm._table, shm._window)
        if args.json:
            print(json.dumps({"ok": report.ok, "violations": report.violations, "pending": report.pending,
                              "figures": report.figures()}, indent=2))
        else:
            f = report.figures()
            print(f"heap of prefix {args.prefix}: {f['allocations']} allocations ({format_size(f['used'])}) in "
                  f"{f['arenas']} arenas and {f['large_allocations']} large; {len(report.violations)} violations, "
                  f"{len(report.pending)} pending")
            for line in report.violations:
                print(f"violation: {line}")
            for line in report.pending:
                print(f"pending: {line}")
    return 0 if report.ok else 1


def _status(args: argparse.Namespace) -> int:
    from .shm.paths import RuntimePaths
    from .wire.client import Control

    with Control(RuntimePaths.for_prefix(args.prefix, args.runtime_root), args.timeout) as control:
        status = control.request("status")
    status = {k: v for k, v in status.items() if k not in ("v", "ok")}
    print(json.dumps(status, indent=2) if args.json else _format_status(status))
    return 0


def _format_status(s: dict[str, Any]) -> str:
    mode = s["mode"] + (f" ({s['fallback_reason']})" if s.get("fallback_reason") else "")
    rows = [
        ("prefix", s["prefix"]), ("pid", s["pid"]), ("state", s["state"]), ("mode", mode),
        ("page size", format_size(s["page_size"])), ("window", f"{s['base']:#x} + {format_size(s['window'])}"),
        ("memory", format_size(s["memory"])), ("used", format_size(s["used"])), ("free", format_size(s["free"])),
        ("segments", s["segments"]), ("zones", s["zones"]), ("workers", s["workers"]),
        ("created", _when(s.get("created"))), ("started", _when(s.get("started"))),
        ("adoptions", s.get("adoptions", 0)),
        ("requests", s["requests"]), ("errors", sum(s["errors"].values())),
    ]
    heap = s.get("heap") or {}
    if heap:
        rows += [
            ("heap", f"{heap['allocations']} allocations, {format_size(heap['used'])} used, "
                     f"{format_size(heap['free'])} free in {heap['arenas']} arenas ({heap['arenas_owned']} owned), "
                     f"{heap['large_allocations']} large ({format_size(heap['large_bytes'])})"),
            ("reclaimed", f"{heap['reclaimed_allocations']} allocations, {format_size(heap['reclaimed_bytes'])}"),
            ("growths", heap.get("growths", 0)),
            ("channels", f"{heap.get('channels', 0)} ({heap.get('queued', 0)} messages queued), "
                         f"{heap.get('handed', 0)} allocations handed on, {heap.get('pins', 0)} pins"),
        ]
    return "\n".join(f"{name:<10} {value}" for name, value in rows)


def _when(epoch: float | None) -> str:
    """A wall-clock time in UTC, and how long ago."""
    import time

    if not epoch:
        return "unknown"
    ago = max(0, int(time.time() - epoch))
    hours, rest = divmod(ago, 3600)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))
    return f"{stamp} ({hours}h{rest // 60:02d}m{rest % 60:02d}s ago)"


_HUGEPAGES_SHORT = 3  # exit status: the kernel granted fewer pages than asked
_HUGEPAGES_EXIT = """exit status: 0 done; 1 refused (bad value, no such pool or node, not root);
2 bad usage; 3 the kernel granted fewer pages than asked (with --config: huge_pages = "on"
and the pool still short)"""


def _hugepages_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pages = commands.add_parser("hugepages", help="hugepage pools, mounts and instance files (default: show)",
                                description="Without an action: show.")
    _hugepages_show_options(pages, False)
    pages.set_defaults(command=_hugepages_show)
    actions = pages.add_subparsers(metavar="ACTION")
    # SUPPRESS: an option the action does not get keeps the value given before the action's name
    _hugepages_show_options(actions.add_parser("show", help="pools per size and node, mounts, "
                                               "which instance holds which files"), argparse.SUPPRESS)
    _hugepages_pool_parsers(actions)
    _hugepages_mount_parsers(actions)
    cleanup = actions.add_parser("cleanup", help="remove the files of dead instances (never a live one's)")
    cleanup.add_argument("--runtime-root", default=None)
    cleanup.add_argument("--prefix", action="append", help="only this prefix (repeatable)")
    cleanup.add_argument("--dry-run", action="store_true", help="say what would be removed")
    cleanup.set_defaults(command=_hugepages_cleanup)


def _hugepages_show_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--json", action="store_true", default=default)
    parser.add_argument("--runtime-root", default=None if default is False else default)
    parser.set_defaults(command=_hugepages_show)


def _hugepages_pool_parsers(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    reserve = actions.add_parser("reserve", epilog=_HUGEPAGES_EXIT,
                                 help="size the pool to SIZE in all (or on --node), or, with --config, "
                                      "grow it so an instance's memory is free")
    what = reserve.add_mutually_exclusive_group(required=True)
    what.add_argument("size", nargs="?", metavar="SIZE", help="the whole pool, e.g. 1G (not per node)")
    what.add_argument("--config", metavar="FILE", help="an instance's TOML file: grow, never shrink")
    clear = actions.add_parser("clear", help="release free pages that nothing uses or has reserved")
    for parser in (reserve, clear):
        parser.add_argument("--page-size", default=None, metavar="SIZE", help="2M (default) or 1G")
        parser.add_argument("--node", type=int, default=None, help="this NUMA node's pool only")
    reserve.set_defaults(command=_hugepages_reserve)
    clear.set_defaults(command=_hugepages_clear)


def _hugepages_mount_parsers(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    mount = actions.add_parser("mount", help="mount a hugetlbfs at PATH (made if missing)")
    mount.add_argument("path", metavar="PATH")
    mount.add_argument("--page-size", default="2M", metavar="SIZE", help="2M (default) or 1G")
    mount.add_argument("--owner", help="user (name or uid) owning the mount's root")
    mount.add_argument("--group", help="group (name or gid) of the mount's root")
    mount.add_argument("--mode", help="permissions of the mount's root, octal, e.g. 0770")
    mount.add_argument("--size", help="the most the mount may hold, e.g. 4G")
    mount.set_defaults(command=_hugepages_mount)
    unmount = actions.add_parser("unmount", help="unmount the hugetlbfs at PATH")
    unmount.add_argument("path", metavar="PATH")
    unmount.set_defaults(command=_hugepages_unmount)


def _hugepages_show(args: argparse.Namespace) -> int:
    from .host import census

    report = census.report(runtime_root=args.runtime_root)
    print(json.dumps(report, indent=2) if args.json else census.format_report(report).rstrip("\n"))
    return 0


def _hugepages_reserve(args: argparse.Namespace) -> int:
    from .host import pool

    if args.config is not None:
        return _hugepages_reserve_config(args)
    page_size = pool.page_size_of(args.page_size or "2M")
    size = _hugepages_size(args.size)
    pages = pool.pages_for(size, page_size)
    if size % page_size:
        print(f"rounding {format_size(size)} up to {pages} pages of {format_size(page_size)}")
    change = pool.set_pool(page_size, pages, args.node)
    print(pool.describe_set(change))
    return _HUGEPAGES_SHORT if change.after.persistent < pages else 0


def _hugepages_size(text: str) -> int:
    from .sizes import parse_size

    try:
        return parse_size(text)
    except ValueError as err:
        raise InvalidArgument(f"invalid SIZE: {err}", name="size") from err


def _hugepages_reserve_config(args: argparse.Namespace) -> int:
    from .daemon import config
    from .host import pool

    if args.page_size is not None or args.node is not None:
        raise InvalidArgument("--config takes the page size from the file, and reserves on no one node")
    outcome = pool.reserve_for(config.load(args.config, {}))
    print(outcome.message, file=sys.stderr if outcome.message.startswith("warning") else sys.stdout)
    return _HUGEPAGES_SHORT if outcome.short else 0


def _hugepages_clear(args: argparse.Namespace) -> int:
    from .host import pool

    print(pool.describe_clear(pool.clear(pool.page_size_of(args.page_size or "2M"), args.node)))
    return 0


def _hugepages_mount(args: argparse.Namespace) -> int:
    from .host import pool

    page_size = pool.page_size_of(args.page_size)
    size = None if args.size is None else _hugepages_size(args.size)
    options = pool.mount_options(page_size, args.owner, args.group, args.mode, size)
    print(f"mounted hugetlbfs at {pool.mount(args.path, options)} ({options})")
    return 0


def _hugepages_unmount(args: argparse.Namespace) -> int:
    from .host import pool

    print(f"unmounted the hugetlbfs at {pool.unmount(args.path)}")
    return 0


def _hugepages_cleanup(args: argparse.Namespace) -> int:
    from .host import census

    done = census.cleanup(args.runtime_root, args.prefix, args.dry_run)
    print("\n".join(cleaned.describe() for cleaned in done) or "no hugeshmd instance holds files")
    return 0
