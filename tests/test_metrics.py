"""``hugeshmd metrics``: the Prometheus text format, against a real primary and without one."""

from __future__ import annotations

import os
import re
import subprocess
from typing import Any

import pytest
from conftest import PYTHON, run_python

from hugeshmd.host.metrics import render

pytestmark = pytest.mark.process

SAMPLE = re.compile(r'^(hugeshmd_[a-z_]+)(\{(?:[a-z_]+="(?:[^"\\\n]|\\.)*",?)*\})? (-?[0-9.e+]+)$')


def parse(text: str) -> dict[str, float]:
    """Every sample, keyed by name and labels; fails on any line the format does not allow."""
    samples, typed = {}, set()
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("gauge", "counter") and name not in typed
            typed.add(name)
            continue
        match = SAMPLE.match(line)
        assert match, line
        assert match.group(1) in typed, f"{match.group(1)} has no TYPE line before it"
        samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


def metrics(root: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "hugeshmd", "metrics", "--prefix", prefix, "--runtime-root", root, *args],
                          capture_output=True, text=True, timeout=60)


def test_metrics_of_a_live_instance(start_primary: Any, root: str, prefix: str) -> None:
    start_primary("--huge-pages", "off", "--memory", "16M")
    run_python("import hugeshmd\nfrom hugeshmd.wire.client import Control\n"
               "from hugeshmd.shm.paths import RuntimePaths\n"
               f"shm = hugeshmd.attach({prefix!r}); shm.reserve('a', 1 << 20)\n"
               f"c = Control(RuntimePaths({prefix!r}, {root!r}))\nc.request('lookup', name='a')\n"
               f"try:\n    c.request('lookup', name='nope')\nexcept hugeshmd.NotFound:\n    pass\n"
               f"try:\n    c.request('nonsense')\nexcept hugeshmd.ProtocolError:\n    pass\n", root)
    done = metrics(root, prefix)
    assert done.returncode == 0, done.stderr
    samples = parse(done.stdout)
    own = f'{{prefix="{prefix}"}}'
    assert samples[f"hugeshmd_up{own}"] == 1
    assert samples[f"hugeshmd_memory_bytes{own}"] == 16 << 20
    assert samples[f"hugeshmd_memory_used_bytes{own}"] == 1 << 20
    assert samples[f"hugeshmd_memory_free_bytes{own}"] == 15 << 20
    assert samples[f"hugeshmd_zones{own}"] == 1
    assert samples[f'hugeshmd_requests_total{{prefix="{prefix}",op="lookup"}}'] == 2
    assert samples[f'hugeshmd_errors_total{{prefix="{prefix}",kind="NotFound"}}'] == 1
    assert samples[f'hugeshmd_requests_total{{prefix="{prefix}",op="invalid"}}'] == 1
    assert samples[f'hugeshmd_errors_total{{prefix="{prefix}",kind="ProtocolError"}}'] == 1
    assert samples[f"hugeshmd_refused_connections_total{own}"] == 0
    assert samples[f'hugeshmd_info{{prefix="{prefix}",mode="fallback"}}'] == 1
    assert samples[f"hugeshmd_primary_pid{own}"] > 1
    assert samples[f'hugeshmd_requests_total{{prefix="{prefix}",op="status"}}'] == 1  # this very scrape


def test_metrics_without_a_primary_say_down_and_exit_1(root: str, prefix: str, tmp_path: Any) -> None:
    done = metrics(root, prefix, "--timeout", "0.2", "--textfile", str(tmp_path))
    assert done.returncode == 1 and "no primary answered" in done.stderr
    written = (tmp_path / f"hugeshmd_{prefix}.prom").read_text()
    assert parse(written) == {f'hugeshmd_up{{prefix="{prefix}"}}': 0}
    assert os.listdir(tmp_path) == [f"hugeshmd_{prefix}.prom"]  # no temp file left


def test_label_values_are_escaped() -> None:
    status = {"mode": 'odd"mode\\\n', "pid": 1, "memory": 1, "used": 0, "free": 1, "page_size": 4096, "segments": 1,
              "zones": 0, "workers": 0, "uptime": 1.5, "requests_by_op": {}, "errors": {}, "refused": 0}
    samples = parse(render("p", status))
    assert 'hugeshmd_info{prefix="p",mode="odd\\"mode\\\\\\n"}' in samples


def test_heap_figures_are_exported() -> None:
    heap = {"used": 4096, "free": 8192, "arena_bytes": 12288, "arenas": 2, "arenas_owned": 1, "allocations": 7,
            "large_allocations": 1, "reclaimed_allocations": 10001, "reclaimed_bytes": 2048576, "growths": 2,
            "handed": 5, "pins": 3, "channels": 2, "queued": 4,
            "per_arena": [{"index": 0, "used": 4000}, {"index": 1, "used": 96}]}
    status = {"mode": "hugepages", "pid": 1, "memory": 1, "used": 0, "free": 1, "page_size": 4096, "segments": 3,
              "zones": 0, "workers": 0, "uptime": 1.5, "requests_by_op": {}, "errors": {}, "refused": 0, "heap": heap}
    samples = parse(render("p", status))
    assert samples['hugeshmd_heap_reclaimed_allocations_total{prefix="p"}'] == 10001
    assert samples['hugeshmd_heap_growths_total{prefix="p"}'] == 2
    assert samples['hugeshmd_channel_messages_queued{prefix="p"}'] == 4
    assert samples['hugeshmd_heap_pins{prefix="p"}'] == 3
    assert samples['hugeshmd_heap_arena_used_bytes{prefix="p",arena="1"}'] == 96
