"""Writing results so that a failure never leaves half an output behind.

Every output folder is built in a hidden temporary sibling and renamed into place only when complete; single files
are written to a temporary name and ``os.replace``-d. Each folder carries ``foldgpt.json``, which records what
produced it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from foldgpt.core.manifest import write_manifest
from foldgpt.errors import FoldGPTError

METADATA_FILE = "foldgpt.json"


def disk_full_error(error: OSError, out: Path, hint: str) -> FoldGPTError | None:
    """The one-line error for a write to ``out`` that ran out of disk space or quota (None for any other error)."""
    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    message = f"no space left on the device while writing '{out}'; nothing was kept: free some space or {hint}"
    return FoldGPTError(message)


def check_output_free(out: Path, overwrite: bool) -> None:
    """Refuse to replace an existing output unless asked to (checked before any slow work starts)."""
    if out.exists() and not overwrite:
        raise FoldGPTError(f"output '{out}' already exists; choose another --out or pass --overwrite")


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it gets its ``manifest.json`` and becomes ``out``; on any error it is deleted."""
    out = Path(out)
    check_output_free(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        write_manifest(tmp)
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    except OSError as error:
        full = disk_full_error(error, out, "choose an --out on another disk")
        if full is None:
            raise
        raise full from error
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to ``path`` through a temporary file, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def read_metadata(model_path: str | Path) -> dict:
    """The ``foldgpt.json`` of a folder foldgpt wrote, or ``{}`` for any other model."""
    path = Path(model_path) / METADATA_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise FoldGPTError(f"{path} is not valid JSON ({error.msg}); delete it or re-run the stage that wrote it") from error


