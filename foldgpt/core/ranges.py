"""Ranges of block indices as users write them: ``"0-3,4-5,6"``."""

from __future__ import annotations

from foldgpt.errors import FoldGPTError


def parse_ranges(text: str, option: str) -> list[list[int]]:
    """Ranges of block indices from ``"0-3,4-5,6"`` (one list per comma-separated part), for ``option``'s errors."""
    ranges: list[list[int]] = []
    for part in (piece.strip() for piece in text.split(",")):
        first, _, last = part.partition("-")
        try:
            start, end = int(first), int(last or first)
        except ValueError:
            raise FoldGPTError(f"{option}: '{part}' is not a range like 4-7 or a single block like 8") from None
        if end < start:
            raise FoldGPTError(f"{option}: range '{part}' runs backwards; write it as {end}-{start}")
        ranges.append(list(range(start, end + 1)))
    return ranges
