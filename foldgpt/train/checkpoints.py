"""Training checkpoints written atomically and refused when they belong to another run."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from foldgpt.errors import FoldGPTError

CHECKPOINT_FILE = "checkpoint.pt"


def save_checkpoint(folder: Path, state: dict) -> None:
    """Write a checkpoint atomically: a temporary file ``os.replace``-d over ``checkpoint.pt``."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{CHECKPOINT_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, folder / CHECKPOINT_FILE)


def load_checkpoint(folder: Path, expected: dict) -> dict:
    """The checkpoint in ``folder``, refused if it was written for another student, teacher or configuration."""
    path = folder / CHECKPOINT_FILE
    if not path.is_file():
        raise FoldGPTError(f"--resume: no checkpoint in '{folder}'; run without --resume to start, or give --checkpoint-dir")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as error:
        raise FoldGPTError(f"cannot read checkpoint {path}: {str(error).splitlines()[0]}; delete it and start again") from error
    stored = state.get("identity", {})
    if isinstance(stored.get("config"), dict):
        stored["config"].setdefault("world_size", 1)  # written before data-parallel runs existed: one process
    for name, value in expected.items():
        if stored.get(name) == value:
            continue
        if isinstance(value, dict) and isinstance(stored.get(name), dict):
            differing = [key for key in value if stored[name].get(key) != value[key]]
            what = ", ".join(f"{key} {stored[name].get(key)!r} (now {value[key]!r})" for key in differing)
        else:
            what = f"{stored.get(name)!r} (now {value!r})"
        raise FoldGPTError(
            f"--resume: the checkpoint in '{folder}' was written with another {name}: {what}; resume with the same "
            "settings or start without --resume"
        )
    return state
