"""Block numbering across successive prunes: indices of a pruned model in its original model's numbering."""

from __future__ import annotations

from foldgpt.core.outputs import read_metadata


def in_original_numbering(source: str, removed: list[int], num_blocks: int) -> list[int]:
    """Map indices of an already-pruned model back to its original model's blocks (via its ``foldgpt.json``)."""
    previous = read_metadata(source)
    if "removed_original" not in previous:
        return removed
    original_depth = previous["num_blocks_before"]
    removed_before = set(previous["removed_original"])
    kept_original = [i for i in range(original_depth) if i not in removed_before]
    if len(kept_original) != num_blocks:
        return removed
    return [kept_original[i] for i in removed]
