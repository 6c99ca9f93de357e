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
* an arena no one owns holds no LIVE block (reclaim turned them FREE) but
  handed ones (a holder other than the owner);
* a free block has no holder; a block a channel holds is in that channel, and
  every message queued in a channel is a block (or a large allocation) the
  channel holds at that message's number;
* every zone whose name starts with ``.`` is the heap's or a channel: flagged,
  and named as the directory, an arena, a large allocation or a channel.

A block held by a worker that is gone is pending: the primary frees it.
"""

from __future__ import annotations

from .heap import (
    _COUNTS,
    ARENA,
    BLOCKS,
    CLAIMS_AT,
    CLASS_SIZES,
    CUSTODY,
    DIRECTORY,
    DISOWNED,
    E_FREE,
    ENTRY_STATES,
    HOLDER_AT,
    LARGE_RECLAIMED_AT,
    LARGE_RECLAIMED_BYTES_AT,
    LIVE,
    META,
    META_SPANS,
    REMOTE,
    SPAN,
    SPANS,
    Arena,
    Directory,
    arena_name,
    custody,
    holder_arena,
    holder_gone,
    named_zone_held,
)
from .identity import process_alive
from .layout import ZONE_CHANNEL, ZONE_DISOWNED, ZONE_HANDED, ZONE_HEAP, ZONE_HEAP_META
from .names import EMPTY, FREEING, INSERTING, NAMES, PUBLISHED, SHARDS, STATE_NAMES, Names, zone_custody
from .pins import PINNED
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
        self.handed = 0  # allocations held by a channel or by a worker that received them
        self.channels = 0
        self.queued = 0  # messages in channels
        self.pins = 0  # live entries of the pin table (shared arrays held, or in flight)
        self._custody: set[int] = set()  # holder words of the messages queued (and one being taken)
        self._channels: dict[int, memoryview] = {}  # channel indexes: their header words
        self._directory: Directory | None = None
        self.named_zones = 0  # zones of the name index (hugeshmd.shm.names)
        self.named_bytes = 0  # the bytes of their blocks (by class size)
        self._names: Any = None  # the name index, if the instance has one
        self._segments: Any = ()  # the segments of the version walked

    @property
    def ok(self) -> bool:
        return not self.violations

    def figures(self) -> dict[str, Any]:
        return {
            "arenas": len(self.arenas), "arenas_owned": sum(1 for a in self.arenas if a["state"] != "free"),
            "allocations": self.allocations, "used": self.used,
            "free": self.capacity - self.used - self.named_bytes + self.large_bytes,
            "arena_bytes": self.capacity, "large_allocations": self.large_allocations,
            "large_bytes": self.large_bytes, "disowned": self.disowned,
            "reclaimed_allocations": self.reclaimed_allocations, "reclaimed_bytes": self.reclaimed_bytes,
            "claims": self.claims, "per_arena": self.arenas, "handed": self.handed, "channels": self.channels,
            "queued": self.queued, "pins": self.pins, "named_zones": self.named_zones,
            "named_bytes": self.named_bytes,
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
    report._segments = snap.segments
    for zone in snap.zones:
        if zone.flags & ZONE_CHANNEL:
            _walk_channel(zone, keepalive, report)
    for zone in snap.zones:
        if not zone.name.startswith(RESERVED):
            continue
        if zone.flags & ZONE_CHANNEL:
            if not zone.name.startswith(".ch."):
                report.violations.append(f"zone {zone.name!r} is flagged as a channel but not named as one")
        elif zone.flags & ZONE_HEAP:
            if not zone.name.startswith(".h."):
                report.violations.append(f"zone {zone.name!r} is flagged as a heap allocation but not named as one")
            report.large_allocations += 1
            report.large_bytes += zone.size
            report.allocations += 1
            report.used += zone.size
            if zone.flags & ZONE_HANDED:
                report.handed += 1
                word = zone.owner.epoch
                if word != PINNED and ((word >> 31) != 1 or (word & 0xFFF) not in report._channels):
                    report.violations.append(f"large allocation {zone.name} is in the custody of no channel")
            elif zone.flags & ZONE_DISOWNED:
                report.disowned += 1
            elif not process_alive(zone.owner.pid, zone.owner.start):
                report.pending.append(f"large allocation {zone.name} at {zone.address:#x} ({zone.size} bytes) "
                                      f"of pid {zone.owner.pid}, which exited: not reclaimed yet")
        elif not zone.flags & ZONE_HEAP_META or not (zone.name in (DIRECTORY, ".pins", NAMES)
                                                     or zone.name.startswith(".arena.")):
            report.violations.append(f"zone {zone.name!r} has a name of the heap's but is not the heap's")
    record = snap.record(DIRECTORY)
    if record is None:
        if any(z.name.startswith(".arena.") for z in snap.zones):
            report.violations.append("arena zones exist but the heap has no directory")
        return report
    try:
        directory = Directory(record, keepalive)
    except Exception as err:  # noqa: BLE001 - TableCorrupt, said as a violation
        report.violations.append(str(err))
        return report
    report._directory = directory
    report.claims = directory.counter(CLAIMS_AT)
    pins = snap.record(".pins")
    if pins is not None:
        _walk_pins(pins, keepalive, directory, report)
    names = snap.record(NAMES)
    if names is not None:
        _walk_names(names, keepalive, snap.segments, report, rules)
    report.reclaimed_allocations = directory.counter(LARGE_RECLAIMED_AT)
    report.reclaimed_bytes = directory.counter(LARGE_RECLAIMED_BYTES_AT)
    for i, entry in directory.entries():
        arena_zone = snap.record(arena_name(i))
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
        states = arena.state.tobytes()  # one reading, for the figures and the holders alike
        figures = _arena_figures(arena, states, found, rules)
        after = directory.entry(i)
        if before[1:8] == after[1:8]:
            break
    else:
        report.pending.append(f"arena {i} kept changing owner while read; not checked")
        return
    state, pid, start = after[1], after[4], after[7]
    count, used, disowned, carved, live = figures
    named = [0, 0]  # blocks of named zones (hugeshmd.shm.names): zones, not allocations
    live -= _holders(arena, states, report, found, rules, named)
    count -= named[0]
    used -= named[1]
    report.named_bytes += named[1]
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


def _holders(arena: Arena, states: bytes, report: HeapReport, found: list[str], rules: bool,
             named: list[int]) -> int:
    """Check the holder words of ``arena``'s blocks, whose state bytes were read as ``states``
    (the reading the figures counted); the LIVE blocks that are handed (or named zones':
    ``named`` gets their count and bytes added)."""
    raw = arena.meta[HOLDER_AT:META].tobytes()
    if raw.count(0) == len(raw):
        return 0
    handed_live = 0
    directory = report._directory
    for k, word in enumerate(memoryview(raw).cast("I")):
        if not word:
            continue
        s = states[k]
        if s == 0:
            # read again: the arena's owner may have collected a freed block between the readings
            if rules and arena.state[k] == 0 and arena.holder[k]:
                found.append(f"arena {arena.index} block {k} is free but names a holder ({arena.holder[k]:#x})")
            continue
        if s == REMOTE:
            continue  # freed by its holder; its owner collects it
        if named_zone_held(word):  # a named zone: not an allocation
            handed_live += s == LIVE
            c = arena.span_class(k // BLOCKS)
            named[0] += 1
            named[1] += CLASS_SIZES[c] if c >= 0 else 0
            if rules:
                _check_named_block(arena, k, word, report, found)
            continue
        report.handed += 1
        handed_live += s == LIVE
        if word == PINNED:
            continue  # its pins hold it (hugeshmd.shm.pins)
        if word & CUSTODY:
            if rules and word not in report._custody and not _queued_now(report, word):
                found.append(f"arena {arena.index} block {k} is held by channel {word & 0xFFF} at message "
                             f"{(word >> 12) & 0x7FFFF}, which is not queued there")
            continue
        i, claim = holder_arena(word)
        if directory is None or not 0 <= i < directory.max_arenas:
            found.append(f"arena {arena.index} block {k} names a holder of no arena ({word:#x})")
            continue
        if holder_gone(directory, i, claim, _exited):
            report.pending.append(f"arena {arena.index} block {k} is held by a worker that exited (its arena {i}); "
                                  "not freed yet")
    return handed_live


def _walk_pins(zone: Any, keepalive: object, directory: Directory, report: HeapReport) -> None:
    """Count the live pins; a pin of a worker that is gone is pending (the primary drops it)."""
    from .. import _sys
    from .pins import COUNT, ENTRIES_AT, MAGIC

    mem = _sys.memory(zone.address, zone.size, keepalive)
    if bytes(mem[:8]) != MAGIC:
        report.violations.append("the pin table is not one (bad magic)")
        return
    words = mem[ENTRIES_AT:].cast("I")
    for i in range(COUNT):
        word = words[4 * i + 3]
        if not word:
            continue
        report.pins += 1
        if holder_gone(directory, *holder_arena(word), _exited):
            report.pending.append(f"pin {i} of {words[4 * i] | words[4 * i + 1] << 32:#x} is held by a worker that "
                                  "exited; not dropped yet")


def _walk_names(zone: Any, keepalive: object, segments: Any, report: HeapReport, rules: bool) -> None:
    """Count the named zones of the name index; check each entry (its state; a published one's
    checksum, segment, and block: live, and held by the entry). A reserve or free that a death
    interrupted is pending: the next reserve or free of a name in its shard finishes it."""
    try:
        names = Names(zone, keepalive, 0.0)
    except Exception as err:  # noqa: BLE001 - TableCorrupt, said as a violation
        report.violations.append(str(err))
        return
    report._names = names
    directory = report._directory
    arenas = {e[0]: Arena(i, e[0], None) for i, e in directory.entries() if e[0]} if directory is not None else {}
    for entry, state in names.entries():
        if state in (INSERTING, FREEING):
            report.pending.append(f"zone name entry {entry}: a {'reserve' if state == INSERTING else 'free'} was "
                                  "interrupted; the primary's next heartbeat finishes it, or the next reserve or "
                                  "free of a name in its shard if that comes first")
            continue
        if state != PUBLISHED:
            if names.state(entry) not in STATE_NAMES:
                report.violations.append(f"zone name entry {entry} has unknown state {state}")
            continue
        record = names.read(entry, segments)
        if isinstance(record, str):
            if names.state(entry) == PUBLISHED:  # not a reserve or free meanwhile: damage
                report.violations.append(f"the zone name index: {record}")
            continue
        report.named_zones += 1
        if rules and not _named_block_held(arenas, record.address, entry):
            if names.state(entry) == PUBLISHED and names.read(entry, segments) == record:
                report.violations.append(f"zone {record.name!r} (name entry {entry}) names {record.address:#x}, "
                                         "which is not a live block held by that entry")


def _named_block_held(arenas: dict[int, Arena], address: int, entry: int) -> bool:
    """Whether the block at ``address`` is live and held by name entry ``entry`` (``arenas``: the
    directory's arenas by address, read once for the walk)."""
    arena = arenas.get(address & ~(ARENA - 1))
    found = arena.locate(address) if arena is not None else None
    return found is not None and arena is not None and arena.state[found[0]] == LIVE and \
        arena.holder[found[0]] == zone_custody(entry)


def _check_named_block(arena: Arena, k: int, word: int, report: HeapReport, found: list[str]) -> None:
    """A block held by a name entry: the entry is published (or being changed) and names it."""
    names = report._names
    entry = (word >> 12) & 0x7FFFF
    span, i = divmod(k, BLOCKS)
    c = arena.span_class(span)
    address = arena.address_of(span, c, i) if c >= 0 else 0
    if names is None or entry >= SHARDS * names.per_shard:
        found.append(f"arena {arena.index} block {k} is held by zone name entry {entry}, which is no entry")
        return
    state = names.state(entry)
    if state == EMPTY or state == PUBLISHED:
        record = names.read(entry, report._segments)
        if state == EMPTY or isinstance(record, str) or record.address != address:
            if arena.holder[k] == word and arena.state[k] == LIVE:  # still so: not a reserve meanwhile
                found.append(f"arena {arena.index} block {k} at {address:#x} is held by zone name entry {entry}, "
                             f"which {'is empty' if state == EMPTY else 'names another block'}")


def _exited(pid: int, start: int) -> bool:
    return not process_alive(pid, start)


def _queued_now(report: HeapReport, word: int) -> bool:
    """Whether the message ``word`` names is queued in its channel now (it may have been sent since
    the channel was read: the walk takes no lock)."""
    from .channel import HEAD_AT, TAIL_AT

    words = report._channels.get(word & 0xFFF)
    if words is None:
        return False
    seq = (word >> 12) & 0x7FFFF
    head, tail = words[HEAD_AT // 8], words[TAIL_AT // 8]
    return any((n & 0x7FFFF) == seq for n in range(max(0, head - 1), tail + 1))


def _walk_channel(zone: Any, keepalive: object, report: HeapReport) -> None:
    from .. import _sys
    from .channel import _HEAD, HEAD_AT, REMOVER_AT, SLOTS_AT, TAIL_AT, _bad_header

    mem = _sys.memory(zone.address, zone.size, keepalive)
    magic, capacity, slots, index, openers = _HEAD.unpack_from(mem, 0)
    if _bad_header(magic, capacity, slots, index, openers, zone.size):
        report.violations.append(f"channel zone {zone.name!r} has a bad header")
        return
    report.channels += 1
    words = mem[:SLOTS_AT].cast("Q")
    report._channels[index] = words
    if words[REMOVER_AT // 8]:
        report.pending.append(f"channel {zone.name[4:]!r} is being removed, or its remover died on the way "
                              "(the primary finishes it at its next heartbeat; Secondary.remove_channel, "
                              "or opening it, finishes it if it comes first)")
    head, tail = words[HEAD_AT // 8], words[TAIL_AT // 8]
    if not head <= tail <= head + capacity:
        report.violations.append(f"channel {zone.name[4:]!r}: head {head} and tail {tail} out of order")
        return
    report.queued += tail - head
    for seq in range(max(0, head - 1), tail + 1):  # a message half taken, the queue, one half sent
        report._custody.add(custody(index, seq))


def _arena_figures(arena: Arena, states: bytes, found: list[str], rules: bool) -> tuple[int, int, int, int, int]:
    """(allocations, bytes used, disowned, carved spans, LIVE blocks) of one arena whose state bytes
    were read as ``states``, with what breaks a rule."""
    i = arena.index
    count = used = disowned = carved = live = 0
    classes = arena.meta[128 : 128 + SPANS].tobytes()
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
