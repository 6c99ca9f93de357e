"""Unit tests of hugeshmd.units: sizes as people write them, and back."""

from __future__ import annotations

import pytest

from hugeshmd.sizes import GiB, KiB, MiB, TiB, format_size, parse_size


def test_unit_constants_are_binary() -> None:
    assert (KiB, MiB, GiB, TiB) == (1024, 1048576, 1073741824, 1099511627776)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2M", 2 * 1048576),
        ("1GiB", 1073741824),
        ("512k", 524288),
        ("512K", 524288),
        ("10", 10),
        ("0", 0),
        ("  4 G ", 4 * 1073741824),
        ("1MB", 1048576),
        ("1mib", 1048576),
        ("3T", 3 * 1099511627776),
        ("7b", 7),
        ("64KiB", 65536),
    ],
)
def test_parse_size_accepts_written_sizes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("value", [0, 1, 4096, 1 << 40])
def test_parse_size_passes_non_negative_ints_through(value: int) -> None:
    assert parse_size(value) == value


@pytest.mark.parametrize("text", ["-1", "1.5G", "M", "", "   ", "1 0", "0x10", "1e3", "2 M iB", "2X", "G2"])
def test_parse_size_rejects_malformed_text(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_parse_size_rejects_negative_int() -> None:
    with pytest.raises(ValueError, match="must not be negative: -1"):
        parse_size(-1)


@pytest.mark.parametrize("value", [True, False])
def test_parse_size_rejects_bool(value: bool) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(value)


@pytest.mark.parametrize("text", ["2i", "1iB", "1ib", "5Mi", "3kb b"])
def test_parse_size_rejects_binary_marker_without_unit(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (1536, "1.5 KiB"),
        (2 * MiB, "2 MiB"),
        (3 * GiB, "3 GiB"),
        (GiB + GiB // 2, "1.5 GiB"),
        (3 * TiB, "3 TiB"),
        (2048 * TiB, "2048 TiB"),
    ],
)
def test_format_size(size: int, expected: str) -> None:
    assert format_size(size) == expected


@pytest.mark.parametrize("size", [1, 4096, 2 * MiB, 1 * GiB, 5 * TiB])
def test_format_size_of_whole_units_parses_back(size: int) -> None:
    text = format_size(size).replace(" ", "")
    assert parse_size(text) == size
