"""Unit tests of hugeshmd.config: defaults, a TOML file, overrides, and errors naming the key."""

from __future__ import annotations

import re
from dataclasses import fields

import pytest

from hugeshmd.daemon.config import DEFAULT_BASE_ADDRESS, OPTIONS, Config, default_base_address, load
from hugeshmd.errors import InvalidArgument

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.fixture
def write(tmp_path):
    """Write a TOML file; returns its path."""

    def write_(text: str) -> str:
        path = tmp_path / "hugeshmd.toml"
        path.write_text(text)
        return str(path)

    return write_


def test_defaults() -> None:
    assert load() == Config(
        prefix="default", memory=None, page_size=2 * MiB, huge_pages="try", base_address=DEFAULT_BASE_ADDRESS,
        window=None, hugepage_dir=None, runtime_root=None, max_zones=1024, max_workers=1024, log_level="info",
    )
    assert DEFAULT_BASE_ADDRESS == 0x1000_0000_0000


def test_every_option_is_a_config_field() -> None:
    assert [o.name for o in OPTIONS] == [f.name for f in fields(Config) if f.name != "path"]


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.default is not None], ids=lambda o: o.name)
def test_every_default_passes_its_own_parser(option) -> None:
    assert option.parse(option.default) == option.default


def test_values_from_a_file(write) -> None:
    path = write(
        'prefix = "cfg_1"\n'
        'memory = "1G"\n'
        'page_size = "1G"\n'
        'huge_pages = "on"\n'
        'base_address = "0x200000000000"\n'
        'window = "128G"\n'
        'hugepage_dir = "/mnt/huge-1G"\n'
        'runtime_root = "/tmp/rt"\n'
        "max_zones = 64\n"
        "max-workers = 32\n"  # dashes, as on the command line, are accepted too
        'log_level = "debug"\n'
        'group = "staff"\n'
    )
    assert load(path) == Config(
        prefix="cfg_1", memory=GiB, page_size=GiB, huge_pages="on", base_address=0x2000_0000_0000,
        window=128 * GiB, hugepage_dir="/mnt/huge-1G", runtime_root="/tmp/rt", max_zones=64, max_workers=32,
        log_level="debug", group="staff", path=path,
    )


def test_file_accepts_toml_integers_for_sizes_and_addresses(write) -> None:
    config = load(write("memory = 4194304\nbase_address = 0x3000_0000_0000\n"))
    assert (config.memory, config.base_address) == (4 * MiB, 0x3000_0000_0000)


@pytest.mark.parametrize("value", ['""', '"all"'])
def test_memory_all_means_every_free_page(write, value: str) -> None:
    assert load(write(f"memory = {value}\n")).memory is None


def test_empty_strings_mean_the_default_directory(write) -> None:
    config = load(write('hugepage_dir = ""\nruntime_root = ""\n'))
    assert (config.hugepage_dir, config.runtime_root) == (None, None)


def test_overrides_beat_the_file(write) -> None:
    path = write('memory = "1G"\nmax_zones = 64\nlog_level = "debug"\n')
    config = load(path, {"memory": "2G", "max_zones": 128})
    assert (config.memory, config.max_zones, config.log_level) == (2 * GiB, 128, "debug")


def test_none_overrides_are_ignored(write) -> None:
    path = write('memory = "1G"\nprefix = "fromfile"\n')
    config = load(path, {"memory": None, "prefix": None, "max_zones": None})
    assert (config.memory, config.prefix, config.max_zones) == (GiB, "fromfile", 1024)


def test_overrides_alone() -> None:
    config = load(None, {"huge_pages": "off", "page_size": 4096, "max-zones": 8})
    assert (config.huge_pages, config.page_size, config.max_zones) == ("off", 4096, 8)


# -- the default base address ---------------------------------------------------------


def test_default_base_address_depends_on_the_prefix() -> None:
    assert default_base_address("default") == DEFAULT_BASE_ADDRESS
    other = default_base_address("other")
    assert other == default_base_address("other")  # stable
    assert other % TiB == 0
    assert DEFAULT_BASE_ADDRESS + TiB <= other <= DEFAULT_BASE_ADDRESS + 63 * TiB
    assert load(None, {"prefix": "other"}).base_address == other


def test_default_base_addresses_spread_over_the_slots() -> None:
    bases = {default_base_address(f"p{i}") for i in range(1000)}
    assert len(bases) == 63
    assert all(base + TiB <= 1 << 47 for base in bases)


def test_a_configured_base_address_beats_the_prefix_default() -> None:
    assert load(None, {"prefix": "other", "base_address": 0x2000_0000_0000}).base_address == 0x2000_0000_0000


def test_base_address_must_be_a_multiple_of_the_page_size() -> None:
    with pytest.raises(InvalidArgument, match="invalid base_address: 0x100000001000 is not a multiple of page_size"):
        load(None, {"base_address": 0x1000_0000_1000})
    assert load(None, {"base_address": 0x1000_0000_1000, "page_size": 4096}).base_address == 0x1000_0000_1000
    with pytest.raises(InvalidArgument, match="invalid base_address"):
        load(None, {"base_address": 0x1000_0020_0000, "page_size": "1G"})


# -- bad values ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "detail"),
    [
        ('colour = "red"\n', "colour", "unknown option 'colour'; known: adopt, base_address, "),
        ("[section]\nx = 1\n", "section", "unknown option 'section'"),
        ('memory = "12Q"\n', "memory", "invalid memory: not a size: '12Q'"),
        ("memory = -1\n", "memory", "invalid memory: size must not be negative"),
        ("memory = 1.5\n", "memory", "invalid memory"),
        ('page_size = "huge"\n', "page_size", "invalid page_size: not a size"),
        ('huge_pages = "maybe"\n', "huge_pages", "invalid huge_pages: 'maybe' is not one of try, on, off"),
        ("huge_pages = true\n", "huge_pages", "invalid huge_pages: True is not one of"),
        ('base_address = "0x0"\n', "base_address", "invalid base_address: not a user-space address: 0"),
        ("base_address = 0x8000_0000_0000\n", "base_address",
         "invalid base_address: not a user-space address: 140737488355328"),  # 2**47
        ('base_address = "0x800000000000"\n', "base_address", "invalid base_address: not a user-space address"),
        ("base_address = -4096\n", "base_address", "invalid base_address: not a user-space address: -4096"),
        ('base_address = "somewhere"\n', "base_address", "invalid base_address: invalid literal"),
        ("base_address = true\n", "base_address", "invalid base_address: not a user-space address: True"),
        ("max_zones = 0\n", "max_zones", "invalid max_zones: 0 is not a whole number from 1 to 1048576"),
        ('max_zones = "x"\n', "max_zones", "invalid max_zones: 'x' is not a whole number"),
        ("max_zones = 1048577\n", "max_zones", "invalid max_zones: 1048577 is not a whole number"),
        ("max_workers = 1.5\n", "max_workers", "invalid max_workers: 1.5 is not"),
        ("max_workers = true\n", "max_workers", "invalid max_workers: True is not"),
        ('prefix = "../x"\n', "prefix", "invalid prefix: invalid prefix '../x'"),
        ('log_level = "trace"\n', "log_level", "invalid log_level: 'trace' is not one of debug, info"),
        ("hugepage_dir = 5\n", "hugepage_dir", "invalid hugepage_dir: 5 is not a string"),
        ('window = "lots"\n', "window", "invalid window: not a size"),
        ("group = 7\n", "group", "invalid group: 7 is not a string"),
    ],
)
def test_bad_file_values_name_the_key_and_the_file(write, text: str, key: str, detail: str) -> None:
    path = write(text)
    with pytest.raises(InvalidArgument, match=re.escape(f"{path}: {detail}")) as info:
        load(path)
    assert info.value.name == key


def test_bad_override_names_the_key_without_a_file() -> None:
    with pytest.raises(InvalidArgument, match="^invalid max_zones: 0 is not a whole number") as info:
        load(None, {"max_zones": 0})
    assert info.value.name == "max_zones"


def test_unknown_override_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="^unknown option 'colour'"):
        load(None, {"colour": "red"})


@pytest.mark.parametrize("size", [3000, 2048, 6144, 0])
def test_page_size_must_be_a_power_of_two_of_at_least_4096(size: int) -> None:
    with pytest.raises(InvalidArgument, match=f"invalid page_size: {size} is not a power of two") as info:
        load(None, {"page_size": size})
    assert info.value.name == "page_size"


@pytest.mark.parametrize("size", [4096, 2 * MiB, GiB])
def test_page_sizes_that_are_accepted(size: int) -> None:
    assert load(None, {"page_size": size}).page_size == size


@pytest.mark.parametrize(
    ("text", "key", "detail"),
    [
        ("page_size = 3000\n", "page_size", "invalid page_size: 3000 is not a power of two"),
        ('base_address = "0x100000001000"\n', "base_address",
         "invalid base_address: 0x100000001000 is not a multiple of page_size 0x200000"),
        ('window = "1G"\nmemory = "2G"\n', "window", "invalid window: 1073741824 bytes cannot hold memory of"),
    ],
)
def test_cross_checked_file_values_name_the_file(write, text: str, key: str, detail: str) -> None:
    path = write(text)
    with pytest.raises(InvalidArgument, match=re.escape(f"{path}: {detail}")) as info:
        load(path)
    assert info.value.name == key


def test_a_cross_checked_override_is_not_blamed_on_the_file(write) -> None:
    path = write('memory = "2G"\n')
    with pytest.raises(InvalidArgument, match="^invalid window: 1073741824 bytes cannot hold memory of 2147483648"):
        load(path, {"window": "1G"})


def test_invalid_toml_names_the_file(write) -> None:
    path = write("memory = \n")
    with pytest.raises(InvalidArgument, match=f"^{re.escape(path)} is not valid TOML: ") as info:
        load(path)
    assert info.value.path == path


def test_missing_file_names_the_file(tmp_path) -> None:
    path = str(tmp_path / "absent.toml")
    with pytest.raises(InvalidArgument, match=f"cannot read config file {re.escape(path)}: No such file"):
        load(path)


# -- window size --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "memory", "expected"),
    [
        ({}, GiB, 64 * GiB),  # room to grow
        ({}, 100 * GiB + 1, 100 * GiB + 2 * MiB),  # rounded up to 2 MiB
        ({}, TiB, TiB),
        ({"window": "3M"}, MiB, 4 * MiB),  # as configured, rounded up
        ({"window": "1536M", "page_size": "1G"}, GiB, 2 * GiB),  # rounded up to the page size
        ({"window": 4097, "page_size": 4096}, 4096, 2 * MiB),  # never below 2 MiB alignment
        ({"page_size": "1G"}, 3 * GiB, 64 * GiB),
        ({}, 2 * TiB, 2 * TiB),  # no cap below the memory
        ({"window": "2G"}, 2 * GiB, 2 * GiB),  # exactly enough
    ],
)
def test_window_for(overrides: dict[str, object], memory: int, expected: int) -> None:
    assert load(None, overrides).window_for(memory) == expected


def test_window_for_refuses_a_configured_window_smaller_than_the_memory() -> None:
    # memory may be known only at start (all free hugepages): checked here, not only in load()
    config = load(None, {"window": "1G"})
    message = "invalid window: 1073741824 bytes cannot hold memory of 1075838976"
    with pytest.raises(InvalidArgument, match=message) as info:
        config.window_for(GiB + 2 * MiB)
    assert info.value.name == "window"


def test_counts_from_the_command_line_are_strings():
    config = load(None, {"max_zones": "4096", "max_workers": " 8 "})
    assert (config.max_zones, config.max_workers) == (4096, 8)
    with pytest.raises(InvalidArgument, match="invalid max_zones"):
        load(None, {"max_zones": "-3"})


def test_max_memory_below_memory_or_beyond_the_window_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="max_memory"):
        load(None, {"memory": "1G", "max_memory": "512M"})
    with pytest.raises(InvalidArgument, match="cannot hold max_memory"):
        load(None, {"max_memory": "8G", "window": "4G"})
    assert load(None, {"memory": "1G", "max_memory": "100G"}).window_for(1 << 30) >= 100 << 30
