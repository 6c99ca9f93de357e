"""The primary's options: defaults, a TOML file, command-line overrides.

Every option is declared once in :data:`OPTIONS` with its default, parser and
help text; the CLI and the TOML loader both read that table, so a file key and
a flag always mean the same thing. An invalid file or value fails with the key
named, before any hugepage is touched.
"""

from __future__ import annotations

import os
import tomllib
import zlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from ..errors import InvalidArgument
from ..shm.paths import validate_prefix
from ..sizes import GiB, MiB, parse_size

__all__ = ["Config", "OPTIONS", "load", "default_base_address", "instance_path", "DEFAULT_BASE_ADDRESS",
           "CONFIG_DIR", "RELOADABLE"]

CONFIG_DIR = "/etc/hugeshmd"  # an instance's file: CONFIG_DIR/<prefix>.toml (see instance_path)

DEFAULT_BASE_ADDRESS = 0x1000_0000_0000  # 16 TiB: far above brk, far below PIE binaries and the mmap base
BASE_SLOT = 1 << 40  # other prefixes default to one of 63 further 1 TiB slots, up to 80 TiB
DEFAULT_FALLBACK_MEMORY = 256 * MiB
MIN_WINDOW = 64 * GiB


def _size(value: Any) -> int:
    return parse_size(value)


def _optional_size(value: Any) -> int | None:
    return None if value in (None, "", "all") else parse_size(value)


def _address(value: Any) -> int:
    if isinstance(value, str):
        value = int(value, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value >= 1 << 47:
        raise ValueError(f"not a user-space address: {value!r}")
    return value


def _choice(*allowed: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in allowed:
            raise ValueError(f"{value!r} is not one of {', '.join(allowed)}")
        return str(value)
    return parse


def _count(value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():  # from the command line
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1 << 20:
        raise ValueError(f"{value!r} is not a whole number from 1 to 1048576")
    return value


def _optional_str(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    return value or None


@dataclass(frozen=True)
class Option:
    name: str
    default: Any
    parse: Callable[[Any], Any]
    help: str


OPTIONS = (
    Option("prefix", "default", validate_prefix, "instance name; files, sockets and the lock are named by it"),
    Option("memory", None, _optional_size,
           "memory to map, e.g. 1G; default: all free hugepages of page_size (256M in fallback)"),
    Option("page_size", 2 * MiB, _size, "hugepage size: 2M or 1G"),
    Option("huge_pages", "try", _choice("try", "on", "off"),
           "try: hugepages, else 4 KiB /dev/shm; on: hugepages or refuse to start; off: /dev/shm"),
    Option("base_address", None, _address,
           "start of the address window in every process; default 0x100000000000 for prefix 'default', "
           "a 1 TiB slot above it chosen by the prefix's CRC-32 otherwise"),
    Option("window", None, _optional_size, "size of the address window; default max(64G, memory)"),
    Option("hugepage_dir", None, _optional_str,
           "hugetlbfs mount (or a directory on one) for the segment files; default the first mount of "
           "page_size, or its hugeshmd/ subdirectory if there is one (the units make it for the service user)"),
    Option("runtime_root", None, _optional_str,
           "parent of the runtime dir; default /run/hugeshmd (root) or $XDG_RUNTIME_DIR/hugeshmd"),
    Option("max_zones", 1024, _count, "capacity of the zone table"),
    Option("max_workers", 1024, _count, "capacity of the worker table"),
    Option("log_level", "info", _choice("debug", "info", "warning", "error"),
           "log verbosity (reloaded on SIGHUP)"),
    Option("group", None, _optional_str,
           "group that owns the instance's files (runtime dir 0750, files 0660) and whose members (with root and "
           "the primary's own user) the sockets admit: they may attach; default the primary's own group"),
    Option("adopt", "auto", _choice("auto", "never", "require"),
           "a dead predecessor's instance: auto: adopt it if it verifies, else start afresh; never: always start "
           "afresh; require: adopt it or refuse to start, keeping its files"),
    Option("on_stop", "release", _choice("release", "keep"),
           "on SIGTERM/SIGINT: release the instance (pages go once workers detach); keep: leave it for the next "
           "primary to adopt (the units pass keep: their stop-post releases on a stop). Run by hand, SIGUSR2 "
           "keeps it whatever this says"),
    Option("max_memory", None, _optional_size,
           "the most memory the instance may grow to at run time, e.g. 4G: a worker whose allocation finds no "
           "room asks the primary for another segment (`hugeshmd grow` does it by hand); default: memory (no "
           "growth)"),
)
RELOADABLE = frozenset({"log_level"})


@dataclass(frozen=True)
class Config:
    prefix: str
    memory: int | None
    page_size: int
    huge_pages: str
    base_address: int
    window: int | None
    hugepage_dir: str | None
    runtime_root: str | None
    max_zones: int
    max_workers: int
    log_level: str
    group: str | None = None
    adopt: str = "auto"
    on_stop: str = "release"
    max_memory: int | None = None
    path: str | None = None  # the file it was read from, if any: what SIGHUP reads again

    def window_for(self, memory: int) -> int:
        """The window size: as configured, else room for growth to max(64 GiB, memory).

        Never less than ``memory`` (which may be known only at start, from the
        free pool): InvalidArgument if a configured window cannot hold it.
        """
        align = max(self.page_size, 2 * MiB)
        size = self.window or max(MIN_WINDOW, memory, self.max_memory or 0)
        if size < memory:
            raise InvalidArgument(f"invalid window: {size} bytes cannot hold memory of {memory} bytes",
                                  name="window")
        return -(-size // align) * align


def load(path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the TOML file at ``path``, then ``overrides`` (None values skipped).

    Raises InvalidArgument naming the key (and the file) of the first bad value.
    """
    values = {o.name: o.default for o in OPTIONS}
    where = dict.fromkeys(values, "")
    if path is not None:
        from_file = _parse(_read_toml(path), f"{path}: ")
        values.update(from_file)
        where.update(dict.fromkeys(from_file, f"{path}: "))
    from_flags = _parse({k: v for k, v in (overrides or {}).items() if v is not None}, "")
    values.update(from_flags)
    where.update(dict.fromkeys(from_flags, ""))
    _cross_check(values, where)
    return Config(**{f.name: values[f.name] for f in fields(Config) if f.name != "path"}, path=path)


def instance_path(prefix: str) -> str:
    """Where the instance ``prefix`` keeps its options: ``/etc/hugeshmd/<prefix>.toml``.

    ``$CONFIGURATION_DIRECTORY`` (set by systemd's ``ConfigurationDirectory=``)
    takes the place of ``/etc/hugeshmd`` when set.
    """
    directory = os.environ.get("CONFIGURATION_DIRECTORY", "").split(":")[0] or CONFIG_DIR
    return os.path.join(directory, f"{validate_prefix(prefix)}.toml")


def _cross_check(values: dict[str, Any], where: dict[str, str]) -> None:
    """Checks of one value against another, naming where the offending one came from."""
    size = values["page_size"]
    if size < 4096 or size & (size - 1):
        raise InvalidArgument(f"{where['page_size']}invalid page_size: {size} is not a power of two "
                              "of at least 4096", name="page_size")
    if values["base_address"] is None:
        values["base_address"] = default_base_address(values["prefix"])
    if values["base_address"] % size:
        raise InvalidArgument(f"{where['base_address']}invalid base_address: {values['base_address']:#x} "
                              f"is not a multiple of page_size {size:#x}", name="base_address")
    if (values["max_memory"] is not None and values["memory"] is not None
            and values["max_memory"] < values["memory"]):
        raise InvalidArgument(f"{where['max_memory']}invalid max_memory: {values['max_memory']} bytes is less than "
                              f"memory ({values['memory']} bytes)", name="max_memory")
    if values["window"] is not None and values["max_memory"] is not None and values["window"] < values["max_memory"]:
        raise InvalidArgument(f"{where['window']}invalid window: {values['window']} bytes cannot hold "
                              f"max_memory of {values['max_memory']} bytes", name="window")
    if values["window"] is not None and values["memory"] is not None and values["window"] < values["memory"]:
        raise InvalidArgument(f"{where['window']}invalid window: {values['window']} bytes cannot hold "
                              f"memory of {values['memory']} bytes", name="window")


def default_base_address(prefix: str) -> int:
    """Where an instance's window starts unless configured: distinct per prefix, mostly.

    Two instances with the same base cannot both be attached by one worker
    (that worker gets AddressUnavailable naming the option), so the default
    spreads prefixes over 64 slots; ``default`` keeps the first.
    """
    if prefix == "default":
        return DEFAULT_BASE_ADDRESS
    return DEFAULT_BASE_ADDRESS + (1 + zlib.crc32(prefix.encode()) % 63) * BASE_SLOT


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as err:
        raise InvalidArgument(f"cannot read config file {path}: {err.strerror}", path=path) from err
    except tomllib.TOMLDecodeError as err:
        raise InvalidArgument(f"{path} is not valid TOML: {err}", path=path) from err


def _parse(raw: dict[str, Any], where: str) -> dict[str, Any]:
    known = {o.name: o for o in OPTIONS}
    parsed = {}
    for key, value in raw.items():
        option = known.get(key.replace("-", "_"))
        if option is None:
            raise InvalidArgument(f"{where}unknown option {key!r}; known: {', '.join(sorted(known))}", name=key)
        try:
            parsed[option.name] = option.parse(value)
        except (ValueError, TypeError, InvalidArgument) as err:
            raise InvalidArgument(f"{where}invalid {key}: {err}", name=key) from err
    return parsed
