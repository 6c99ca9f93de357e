"""An instance's figures in the Prometheus text format (version 0.0.4).

For node_exporter's textfile collector: ``hugeshmd metrics --textfile DIR``
writes ``DIR/hugeshmd_<prefix>.prom`` atomically (a temp file renamed over the
old one, as the collector's documentation asks, so it never reads half a file).
An instance with no primary still gets a file, with ``hugeshmd_up 0``.
"""

from __future__ import annotations

import os
from typing import Any

from .files import write_file

__all__ = ["render", "write_textfile"]

_GAUGES = (
    ("memory_bytes", "memory", "Bytes of shared memory the instance maps."),
    ("memory_used_bytes", "used", "Bytes reserved by zones."),
    ("memory_free_bytes", "free", "Bytes not reserved by any zone."),
    ("page_size_bytes", "page_size", "Page size of the instance's memory."),
    ("segments", "segments", "Mapped segments."),
    ("zones", "zones", "Reserved zones."),
    ("workers", "workers", "Live workers attached read-write."),
    ("uptime_seconds", "uptime", "Seconds since the primary started."),
)


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: object) -> str:
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items()) + "}"


def _family(lines: list[str], name: str, kind: str, text: str) -> None:
    lines += [f"# HELP hugeshmd_{name} {text}", f"# TYPE hugeshmd_{name} {kind}"]


def render(prefix: str, status: dict[str, Any] | None) -> str:
    """The exposition text for ``prefix``; ``status`` is the primary's status reply, None if it is down."""
    lines: list[str] = []
    own = _labels(prefix=prefix)
    _family(lines, "up", "gauge", "1 if the instance's primary answered, else 0.")
    lines.append(f"hugeshmd_up{own} {0 if status is None else 1}")
    if status is None:
        return "\n".join(lines) + "\n"
    _family(lines, "info", "gauge", "The instance's mode (always 1).")
    lines.append(f"hugeshmd_info{_labels(prefix=prefix, mode=status['mode'])} 1")
    _family(lines, "primary_pid", "gauge", "Process id of the instance's primary (changes at a restart).")
    lines.append(f"hugeshmd_primary_pid{own} {status['pid']}")
    for name, key, text in _GAUGES:
        _family(lines, name, "gauge", text)
        lines.append(f"hugeshmd_{name}{own} {status[key]}")
    _family(lines, "requests_total", "counter",
            "Control-socket requests, by operation (op=\"invalid\": no valid operation named).")
    for op, count in sorted(status.get("requests_by_op", {}).items()):
        lines.append(f"hugeshmd_requests_total{_labels(prefix=prefix, op=op)} {count}")
    _family(lines, "errors_total", "counter", "Requests refused, by error kind.")
    for kind, count in sorted(status.get("errors", {}).items()):
        lines.append(f"hugeshmd_errors_total{_labels(prefix=prefix, kind=kind)} {count}")
    _family(lines, "refused_connections_total", "counter", "Connections refused by the access check.")
    lines.append(f"hugeshmd_refused_connections_total{own} {status.get('refused', 0)}")
    _family(lines, "adoptions_total", "counter", "Primaries that adopted the instance after the one that made it.")
    lines.append(f"hugeshmd_adoptions_total{own} {status.get('adoptions', 0)}")
    _family(lines, "created_seconds", "gauge", "When the instance was made (Unix time; adoption keeps it).")
    lines.append(f"hugeshmd_created_seconds{own} {status.get('created', 0)}")
    heap = status.get("heap")
    if heap:
        _heap(lines, prefix, own, heap)
    return "\n".join(lines) + "\n"


_HEAP = (
    ("heap_used_bytes", "gauge", "used", "Bytes of the heap in live allocations (small ones by size class)."),
    ("heap_free_bytes", "gauge", "free", "Bytes the heap's arenas can still hand out."),
    ("heap_arena_bytes", "gauge", "arena_bytes", "Bytes of the heap's arenas that blocks are carved from."),
    ("heap_arenas", "gauge", "arenas", "Arenas of the heap (owned or free)."),
    ("heap_arenas_owned", "gauge", "arenas_owned", "Arenas owned by a process."),
    ("heap_allocations", "gauge", "allocations", "Live heap allocations, small and large."),
    ("heap_large_allocations", "gauge", "large_allocations", "Live allocations over 64 KiB (zones of their own)."),
    ("heap_reclaimed_allocations_total", "counter", "reclaimed_allocations",
     "Allocations freed because their owner died."),
    ("heap_reclaimed_bytes_total", "counter", "reclaimed_bytes", "Bytes freed because their owner died."),
    ("heap_growths_total", "counter", "growths", "Segments added to the instance at run time."),
    ("heap_handed", "gauge", "handed", "Heap allocations held by a channel or by the worker that received one."),
    ("heap_pins", "gauge", "pins", "Pins of shared arrays: one per process holding one, one per copy in flight."),
    ("heap_named_zones", "gauge", "named_zones", "Zones of up to 64 KiB: blocks of the heap named in its index."),
    ("heap_named_zone_bytes", "gauge", "named_bytes", "Bytes of those zones' blocks (by size class)."),
    ("channels", "gauge", "channels", "Channels of the instance."),
    ("channel_messages_queued", "gauge", "queued", "Messages waiting in channels, all channels together."),
)


def _heap(lines: list[str], prefix: str, own: str, heap: dict[str, Any]) -> None:
    for name, kind, key, text in _HEAP:
        _family(lines, name, kind, text)
        lines.append(f"hugeshmd_{name}{own} {heap.get(key, 0)}")
    _family(lines, "heap_arena_used_bytes", "gauge", "Bytes in live allocations, per arena.")
    for arena in heap.get("per_arena", ()):
        lines.append(f"hugeshmd_heap_arena_used_bytes{_labels(prefix=prefix, arena=arena['index'])} {arena['used']}")


def write_textfile(directory: str, prefix: str, text: str) -> str:
    """Write ``text`` to ``directory/hugeshmd_<prefix>.prom`` atomically; the path."""
    return write_file(os.path.join(directory, f"hugeshmd_{prefix}.prom"), text)
