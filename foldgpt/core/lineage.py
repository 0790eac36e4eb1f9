"""Where an output came from: the header every writer puts in ``foldgpt.json``, and block numbering across successive
prunes (indices of a pruned model in its original model's numbering)."""

from __future__ import annotations

from foldgpt._version import __version__
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


def origin_metadata(stage: str, source: str, hub: dict | None) -> dict:
    """The first keys of a written folder's ``foldgpt.json``: the version, the stage that wrote it, and the input
    (its path, its Hub origin, and its own ``foldgpt.json``, so the lineage of a chain of stages is kept)."""
    return {"foldgpt_version": __version__, "stage": stage, "source_model": source, "source_hub": hub,
            "source_metadata": read_metadata(source)}
