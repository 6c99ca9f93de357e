"""Walk the whole heap: its figures (status, metrics) and every rule it must keep (the checker).

Read-only and lock-free, so it runs on a live instance: each arena is read
between two reads of its directory entry, and read again if the entry moved
(a claim or a reclaim in between). What a process killed mid-operation may
leave is not a violation, but *pending*: a dead owner's memory not reclaimed
yet (a primary reclaims it within a moment; with none running, the next one
does at start), an arena zone that a claimer committed but did not publish
(the next claim of that entry takes it).

The rules (each broken one is a line of :attr:`HeapReport.violations`):

* the table passes its checks, and the directory is one (magic, version, size);
* every entry's state is known; its address is its ``.arena.<i>`` zone's, and
  that arena's header names it;
* spans 0 and 1 are never carved; a carved span's class is known; every state
  byte is one of the four, and zero past the span's last block and in spans
  not carved; a live block's slack is less than its class size;
* an arena no one owns holds no LIVE block (reclaim turned them FREE);
* every zone whose name starts with ``.`` is the heap's: flagged, and named as
  the directory, an arena or a large allocation.
"""

from __future__ import annotations

from .heap import (
    _COUNTS,
    ARENA,
    BLOCKS,
    CLAIMS_AT,
    CLASS_SIZES,
    DIRECTORY,
    DISOWNED,
    E_FREE,
    ENTRY_STATES,
    LARGE_RECLAIMED_AT,
    LARGE_RECLAIMED_BYTES_AT,
    LIVE,
    META_SPANS,
    REMOTE,
    SPAN,
    SPANS,
    Arena,
    Directory,
    arena_name,
)
from .identity import process_alive
from .layout import ZONE_DISOWNED, ZONE_HEAP, ZONE_HEAP_META
from .table import Table
from .zones import RESERVED

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["HeapReport", "walk"]

_STATES = frozenset((0, LIVE, DISOWNED, REMOTE))


class HeapReport:
    """What :func:`walk` found: figures, violations, and what is pending."""

    def __init__(self) -> None:
        self.violations: list[str] = []
        self.pending: list[str] = []
        self.arenas: list[dict[str, Any]] = []
        self.allocations = 0  # live and disowned, small and large
        self.used = 0  # bytes they take (small: by class size)
        self.capacity = 0  # bytes the arenas can hand out
        self.large_allocations = 0
        self.large_bytes = 0
        self.disowned = 0
        self.reclaimed_allocations = 0
        self.reclaimed_bytes = 0
        self.claims = 0

    @property
    def ok(self) -> bool:
        return not self.violations

    def figures(self) -> dict[str, Any]:
        return {
            "arenas": len(self.arenas), "arenas_owned": sum(1 for a in self.arenas if a["state"] != "free"),
            "allocations": self.allocations, "used": self.used, "free": self.capacity - self.used + self.large_bytes,
            "arena_bytes": self.capacity, "large_allocations": self.large_allocations,
            "large_bytes": self.large_bytes, "disowned": self.disowned,
            "reclaimed_allocations": self.reclaimed_allocations, "reclaimed_bytes": self.reclaimed_bytes,
            "claims": self.claims, "per_arena": self.arenas,
        }


def walk(table: Table, keepalive: object, rules: bool = True) -> HeapReport:
    """Walk the heap of the instance whose table is ``table`` (its memory mapped in this process,
    kept by ``keepalive``). Without ``rules``, only the figures and the cheap checks (a look per
    span, not per block: what status and metrics ask for at each heartbeat)."""
    report = HeapReport()
    damage = table.damage()
    if damage is not None:
        report.violations.append(f"the table is damaged: {damage}")
        return report
    snap = table.snapshot()
    for zone in snap.zones:
        if not zone.name.startswith(RESERVED):
            continue
        if zone.flags & ZONE_HEAP:
            if not zone.name.startswith(".h."):
                report.violations.append(f"zone {zone.name!r} is flagged as a heap allocation but not named as one")
            report.large_allocations += 1
            report.large_bytes += zone.size
            report.allocations += 1
            report.used += zone.size
            if zone.flags & ZONE_DISOWNED:
                report.disowned += 1
            elif not process_alive(zone.owner.pid, zone.owner.start):
                report.pending.append(f"large allocation {zone.name} at {zone.address:#x} ({zone.size} bytes) "
                                      f"of pid {zone.owner.pid}, which exited: not reclaimed yet")
        elif not zone.flags & ZONE_HEAP_META or not (zone.name == DIRECTORY or zone.name.startswith(".arena.")):
            report.violations.append(f"zone {zone.name!r} has a name of the heap's but is not the heap's")
    record = snap.by_name.get(DIRECTORY)
    if record is None:
        if any(z.name.startswith(".arena.") for z in snap.zones):
            report.violations.append("arena zones exist but the heap has no directory")
        return report
    try:
        directory = Directory(record, keepalive)
    except Exception as err:  # noqa: BLE001 - TableCorrupt, said as a violation
        report.violations.append(str(err))
        return report
    report.claims = directory.counter(CLAIMS_AT)
    report.reclaimed_allocations = directory.counter(LARGE_RECLAIMED_AT)
    report.reclaimed_bytes = directory.counter(LARGE_RECLAIMED_BYTES_AT)
    for i, entry in directory.entries():
        arena_zone = snap.by_name.get(arena_name(i))
        address, state = entry[0], entry[1]
        report.reclaimed_allocations += entry[8]
        report.reclaimed_bytes += entry[9]
        if state not in ENTRY_STATES:
            report.violations.append(f"arena {i}: unknown state {state}")
            continue
        if not address:
            if arena_zone is not None:
                report.pending.append(f"arena {i}: zone {arena_zone.name} at {arena_zone.address:#x} was made by "
                                      f"a claimer that died before publishing it; the next claim of entry {i} takes it")
            elif state != E_FREE:
                report.violations.append(f"arena {i} is {ENTRY_STATES[state]} but has no memory")
            continue
        if arena_zone is None or arena_zone.address != address or arena_zone.size != ARENA:
            report.violations.append(f"arena {i} at {address:#x} is not its zone {arena_name(i)} "
                                     f"({'missing' if arena_zone is None else hex(arena_zone.address)})")
            continue
        _walk_arena(directory, Arena(i, address, keepalive), report, rules)
    return report


def _walk_arena(directory: Directory, arena: Arena, report: HeapReport, rules: bool) -> None:
    i = arena.index
    for _ in range(8):  # read between two reads of the entry; again if it moved
        before = directory.entry(i)
        found: list[str] = []
        figures = _arena_figures(arena, found, rules)
        after = directory.entry(i)
        if before[1:8] == after[1:8]:
            break
    else:
        report.pending.append(f"arena {i} kept changing owner while read; not checked")
        return
    state, pid, start = after[1], after[4], after[7]
    count, used, disowned, carved, live = figures
    if state == E_FREE and live:
        found.append(f"arena {i} is owned by no one but holds {live} LIVE blocks (reclaim leaves none)")
    problem = arena.problem()
    if problem is not None:
        found.append(problem)
    report.violations += found
    if state != E_FREE and not process_alive(pid, start):
        report.pending.append(f"arena {i} of pid {pid}, which exited: {live} allocations not reclaimed yet")
    report.allocations += count
    report.used += used
    report.disowned += disowned
    report.capacity += (SPANS - META_SPANS) * SPAN
    report.arenas.append({"index": i, "state": ENTRY_STATES[state], "pid": pid if state != E_FREE else None,
                          "allocations": count, "used": used, "spans": carved})


def _arena_figures(arena: Arena, found: list[str], rules: bool) -> tuple[int, int, int, int, int]:
    """(allocations, bytes used, disowned, carved spans, LIVE blocks) of one arena, with what breaks a rule."""
    i = arena.index
    count = used = disowned = carved = live = 0
    classes = arena.meta[128 : 128 + SPANS].tobytes()
    states = arena.state.tobytes()
    for span in range(SPANS):
        c = classes[span] - 1
        lo = span * BLOCKS
        chunk = states[lo : lo + BLOCKS]
        if c < 0:
            if any(chunk):
                found.append(f"arena {i} span {span} is not carved but has state bytes set")
            continue
        if span < META_SPANS:
            found.append(f"arena {i} span {span} holds the arena's metadata but is carved (class {c})")
            continue
        if c >= len(CLASS_SIZES):
            found.append(f"arena {i} span {span} has unknown class {c}")
            continue
        carved += 1
        n = _COUNTS[c]
        blocks, rest = chunk[:n], chunk[n:]
        if any(rest):
            found.append(f"arena {i} span {span} has state bytes set past its {n} blocks")
        bad = set(blocks) - _STATES
        if bad:
            found.append(f"arena {i} span {span} has unknown state bytes {sorted(bad)}")
        span_live = blocks.count(LIVE)
        span_disowned = blocks.count(DISOWNED)
        live += span_live
        disowned += span_disowned
        count += span_live + span_disowned
        used += (span_live + span_disowned) * CLASS_SIZES[c]
        for at, s in enumerate(blocks if rules else ()):
            if (s == LIVE or s == DISOWNED) and arena.slack[lo + at] >= CLASS_SIZES[c]:
                found.append(f"arena {i} span {span} block {at}: slack {arena.slack[lo + at]} "
                             f"is not less than its class size {CLASS_SIZES[c]}")
    return count, used, disowned, carved, live
