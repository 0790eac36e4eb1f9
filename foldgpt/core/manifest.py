"""Every output folder carries ``manifest.json``: what wrote it, from what, and the checksum of every file.

The manifest records the foldgpt version, the settings that produced the folder (``foldgpt.json``'s contents, which
hold the method, targets, calibration and hyper-parameters), the input model's identity (its path, a hash of its
``config.json`` and weight index, and for a model read from the Hugging Face cache its Hub ID, revision and commit),
and a SHA-256 of each file. ``foldgpt verify DIR`` recomputes the checksums, so a
truncated copy, a half-synced upload or an edited weight file is caught before anyone evaluates it.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from foldgpt._version import __version__
from foldgpt.errors import FoldGPTError

MANIFEST_FILE = "manifest.json"
# files that a stage may add after the folder itself was completed (the compress stage marker)
UNTRACKED = {MANIFEST_FILE, "stage.json"}
COMMIT_HASH = re.compile(r"^[0-9a-f]{40}$")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hub_origin(source: str | Path | None) -> dict | None:
    """The Hub ID, revision and commit of a model folder inside the Hugging Face cache, else None.

    The cache layout says it all (``.../models--org--name/snapshots/<commit>``, ``refs/<revision>`` holding the commit),
    so every writer can record where a Hub model came from from its path alone. The revision is ``main`` when that
    branch points at the commit, else another cached branch or tag that does, else the commit itself.
    """
    if not source:
        return None
    path = Path(source)
    if path.is_file():  # a .gguf file inside a snapshot
        path = path.parent
    if path.parent.name != "snapshots" or not path.parent.parent.name.startswith("models--") or not COMMIT_HASH.match(path.name):
        return None
    repo = path.parent.parent
    refs = repo / "refs"
    pointing = sorted(str(ref.relative_to(refs)) for ref in refs.rglob("*")
                      if ref.is_file() and ref.read_text(encoding="utf-8").strip() == path.name) if refs.is_dir() else []
    revision = "main" if "main" in pointing else (pointing[0] if pointing else path.name)
    return {"id": repo.name.removeprefix("models--").replace("--", "/"), "revision": revision, "commit": path.name}


def model_identity(source: str | None, hub: dict | None = None) -> dict | None:
    """Path of the input model and a hash of its config and weight index (file names and sizes), cheap even for 70B;
    ``hub`` (what the writer recorded, else ``hub_origin`` of the path) for a model from the Hugging Face cache."""
    if not source:
        return None
    path = Path(source)
    identity: dict = {"path": str(path)}
    hub = hub or hub_origin(path)
    if hub:
        identity["hub"] = hub
    if path.is_dir():
        digest = hashlib.sha256()
        for name in ("config.json", "model.safetensors.index.json"):
            if (path / name).is_file():
                digest.update(name.encode() + (path / name).read_bytes())
        for weights in sorted(path.glob("*.safetensors")):
            digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
        identity["sha256"] = digest.hexdigest()
    elif path.is_file():
        identity["sha256"] = hashlib.sha256(f"{path.name}:{path.stat().st_size}".encode()).hexdigest()
    return identity


def write_manifest(folder: Path) -> None:
    """Write ``folder/manifest.json`` for the files now in ``folder`` (called by ``atomic_output_dir`` before the rename)."""

    folder = Path(folder)
    metadata_path = folder / "foldgpt.json"
    metadata = json.loads(metadata_path.read_text()) if metadata_path.is_file() else {}
    files = {str(path.relative_to(folder)): file_sha256(path) for path in sorted(folder.rglob("*"))
             if path.is_file() and str(path.relative_to(folder)) not in UNTRACKED}
    manifest = {
        "foldgpt_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": metadata,
        "input_model": model_identity(metadata.get("source_model"), metadata.get("source_hub")),
        "files": files,
    }
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


@dataclass
class Verification:
    """What ``verify`` found: files changed or missing (failures) and files not in the manifest (notes)."""

    checked: int
    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.changed and not self.missing


def verify(folder: str | Path) -> Verification:
    """Recompute every checksum of ``folder``'s manifest."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise FoldGPTError(f"'{folder}' has no {MANIFEST_FILE}; only folders written by foldgpt can be verified")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as error:
        raise FoldGPTError(f"{manifest_path} is damaged ({error}); the folder cannot be verified, re-create it") from error
    result = Verification(checked=len(files))
    for name, checksum in files.items():
        path = folder / name
        if not path.is_file():
            result.missing.append(name)
        elif file_sha256(path) != checksum:
            result.changed.append(name)
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    result.extra = sorted(present - set(files) - UNTRACKED)
    return result
