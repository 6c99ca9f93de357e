"""The command line: hugepages report, options from a TOML file and flags, and their errors."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import PYTHON, Primary

from hugeshmd.daemon.config import OPTIONS

pytestmark = pytest.mark.process


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "hugeshmd", *args], capture_output=True, text=True, timeout=60)


def test_hugepages_report_as_json_and_table():
    report = json.loads(run("hugepages", "--json").stdout)
    assert set(report) == {"default_page_size", "pools", "mounts", "instances"}
    table = run("hugepages").stdout
    for pool in report["pools"]:
        assert str(pool["total"]) in table


def test_every_option_is_a_flag():
    helptext = run("primary", "--help").stdout
    for option in OPTIONS:
        assert "--" + option.name.replace("_", "-") in helptext


def test_config_file_then_flags(start_primary, prefix, root, tmp_path, workers):
    config = tmp_path / "hugeshmd.toml"
    config.write_text('memory = "4M"\nhuge_pages = "off"\nmax_zones = 2\nlog_level = "debug"\n')
    start_primary("--config", str(config), "--memory", "8M")  # the flag beats the file
    w = workers()
    w.ok("attach", prefix=prefix)
    zones = [w.ok("reserve", name=f"z{i}", size=4096)["address"] for i in range(2)]
    assert zones[1] - zones[0] == 4096
    full = w.call("reserve", name="z2", size=4096)
    assert full["error"] == "TableFull" and "larger max_zones" in full["message"]
    status = json.loads(run("status", "--prefix", prefix, "--runtime-root", root, "--json").stdout)
    assert (status["memory"], status["mode"], status["zones"]) == (8 << 20, "fallback", 2)


def test_bad_config_names_the_key_and_touches_nothing(prefix, root, tmp_path):
    cases = {
        'memory = "12Q"\n': "invalid memory",
        'huge_pages = "maybe"\n': "invalid huge_pages",
        'colour = "blue"\n': "unknown option 'colour'",
        'max_zones = 0\n': "invalid max_zones",
        "memory = [\n": "is not valid TOML",
    }
    for text, expected in cases.items():
        config = tmp_path / "bad.toml"
        config.write_text(text)
        primary = Primary(prefix, root, "--config", str(config))
        assert primary.wait_exit() == 1, text
        assert expected in primary.text and str(config) in primary.text, primary.text
        assert not os.path.exists(os.path.join(root, prefix))


def test_a_reader_that_leaves_early_gets_no_traceback():
    # `hugeshmd hugepages | head -0`: the pipe is closed before anything is written
    proc = subprocess.Popen([PYTHON, "-m", "hugeshmd", "hugepages"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141 and b"Traceback" not in err
