"""``hugeshmd``: run a primary, ask one for its status, show the host's hugepages."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from .errors import HugeshmdError
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
    primary.add_argument("--config", metavar="FILE", help="TOML file of the options below (flags override it)")
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
    return parser


def _show(value: Any) -> str:
    return hex(value) if isinstance(value, int) and value > 1 << 32 else str(value)


def _primary(args: argparse.Namespace) -> int:
    from . import config, primary

    overrides = {o.name: getattr(args, o.name) for o in config.OPTIONS}
    conf = config.load(args.config, overrides)
    logging.basicConfig(level=conf.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return primary.run(conf)


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
