"""Figures of this process and scratch space: peak resident memory, temporary folders."""

from __future__ import annotations

import tempfile
from contextlib import ExitStack
from pathlib import Path


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM), in bytes; 0 where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def scratch_folder(stack: ExitStack, offload_dir: str | Path | None) -> Path:
    """``offload_dir`` (created), or a temporary folder removed when ``stack`` closes."""
    if offload_dir is None:
        return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="foldgpt-blocks-")))
    folder = Path(offload_dir)
    folder.mkdir(parents=True, exist_ok=True)
    scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="foldgpt-blocks-", dir=folder)))
    return scratch
