"""``hugeshmd``: run a primary, ask one for its status or metrics, manage hugepages, install the units."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from .errors import HugeshmdError, InvalidArgument, PrimaryUnavailable
from .units import format_size

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
    from .config import OPTIONS

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
    pages = commands.add_parser("hugepages", help="show hugepage pools and hugetlbfs mounts")
    pages.add_argument("--json", action="store_true")
    pages.set_defaults(command=_hugepages)
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
    unit.add_argument("action", choices=("install", "show", "prestart"),
                      help="install: write the units; show: print them; prestart: what a unit runs as root first")
    unit.add_argument("--instance", default="default", help="prestart: the instance (its config file is read)")
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
    from . import config

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
    from . import primary
    from .systemd import setup_logging

    conf, overrides = _load_config(args)
    setup_logging(conf.log_level)
    return primary.run(conf, overrides)


def _config(args: argparse.Namespace) -> int:
    from .config import OPTIONS

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
    from . import metrics
    from .client import Control
    from .runtime import RuntimePaths

    status: dict[str, Any] | None = None
    try:
        with Control(RuntimePaths.for_prefix(args.prefix, args.runtime_root), args.timeout) as control:
            status = control.request("status")
    except PrimaryUnavailable as err:
        print(f"hugeshmd: {err.message}", file=sys.stderr)
    text = metrics.render(args.prefix, status)
    if args.textfile:
        metrics.write_textfile(args.textfile, args.prefix, text)
    else:
        sys.stdout.write(text)
    return 0 if status is not None else 1


def _prestart(instance: str, user: str) -> int:
    from . import hugepages, install

    conf, _ = _load_config(argparse.Namespace(config=None, instance=instance))
    if conf.huge_pages == "off":
        return 0
    mounts = [m.path for m in hugepages.mounts() if m.page_size == conf.page_size]
    if conf.hugepage_dir is None:
        for line in install.prestart(conf, user, mounts[:1]):
            print(line)
    return 0


def _systemd(args: argparse.Namespace) -> int:
    from . import install

    user = args.user or install.SERVICE_USER
    if args.action == "prestart":
        return _prestart(args.instance, user)
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


def _status(args: argparse.Namespace) -> int:
    from .client import Control
    from .runtime import RuntimePaths

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
        ("requests", s["requests"]), ("errors", sum(s["errors"].values())),
    ]
    return "\n".join(f"{name:<10} {value}" for name, value in rows)


def _hugepages(args: argparse.Namespace) -> int:
    from . import hugepages

    report = hugepages.report()
    print(json.dumps(report, indent=2) if args.json else hugepages.format_report(report))
    return 0
