"""Byte sizes as people write them (``2M``, ``1GiB``, ``512k``) and back."""

from __future__ import annotations

import re

__all__ = ["parse_size", "format_size", "KiB", "MiB", "GiB", "TiB"]

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

_SIZE = re.compile(r"\s*(\d+)\s*(?:([kmgt])(?:i?b)?|b)?\s*", re.IGNORECASE | re.ASCII)
_FACTORS = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB}


def parse_size(text: str | int) -> int:
    """``"2M"`` -> 2097152. Suffixes are binary (k, M, G, T, optional ``iB``/``B``).

    Raises ValueError for anything else, including negative numbers.
    """
    if isinstance(text, bool):
        raise ValueError(f"not a size: {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative: {text}")
        return text
    if not isinstance(text, str):
        raise ValueError(f"not a size: {text!r}")
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"not a size: {text!r} (write e.g. 512M, 2G, 1GiB)")
    number, unit = match.groups()
    return int(number) * _FACTORS[(unit or "").lower()]


def format_size(size: int) -> str:
    """2097152 -> ``"2 MiB"``; sizes that are not whole units keep one decimal."""
    for unit, factor in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= factor:
            value = size / factor
            return f"{value:.0f} {unit}" if size % factor == 0 else f"{value:.1f} {unit}"
    return f"{size} B"
