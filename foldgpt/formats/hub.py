"""MODEL as a Hugging Face Hub ID (``org/name`` or ``org/name@revision``): the files foldgpt needs, in the Hub cache.

``huggingface_hub.snapshot_download`` fetches only the config, tokenizer and weight files (safetensors when the
repository has them, PyTorch ``.bin`` files only when it has none; Python files only for a trusted remote-code
checkpoint) into the ordinary Hub cache, so ``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and the usual token
locations (``HF_TOKEN``, ``hf auth login``) work as for any Hugging Face tool, and a model that is already cached loads
offline. Where the files came from (ID, revision, commit) is read back from the cache path by
``foldgpt.core.manifest.hub_origin``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from foldgpt.errors import FoldGPTError

HUB_ID = re.compile(r"^(?P<repo_id>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt", "*.tiktoken",
                   "chat_template.jinja", "chat_template.json")
SAFETENSORS_FILES = ("model*.safetensors", "model*.safetensors.index.json")
PYTORCH_FILES = ("pytorch_model*.bin", "pytorch_model*.bin.index.json")
REMOTE_CODE_FILES = ("*.py",)


@dataclass(frozen=True)
class HubModelId:
    """A Hub model reference as the user typed it: the repository and, after ``@``, a branch, tag or commit."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"


def parse_hub_id(spec: str) -> HubModelId | None:
    """``spec`` as a Hub ID when it has the shape ``org/name[@revision]``, else None (a local path, an alias)."""
    match = HUB_ID.match(spec)
    if match is None or ".." in match["repo_id"] or "--" in match["repo_id"]:
        return None
    return HubModelId(match["repo_id"], match["revision"])


def has_weights(folder: Path) -> bool:
    """Whether a snapshot folder holds model weights foldgpt can read (safetensors, or PyTorch .bin files)."""
    return any(folder.glob("model*.safetensors")) or any(folder.glob("pytorch_model*.bin"))


def download_model(hub_id: HubModelId, trust_remote_code: bool = False) -> Path:
    """The snapshot folder of ``hub_id`` in the Hub cache, with the files a model needs (downloaded if missing)."""
    wanted = [*CONFIG_FILES, *TOKENIZER_FILES, *(REMOTE_CODE_FILES if trust_remote_code else ())]
    folder = _snapshot(hub_id, [*wanted, *SAFETENSORS_FILES])
    if not has_weights(folder):  # an older repository with PyTorch weights only
        folder = _snapshot(hub_id, [*wanted, *PYTORCH_FILES])
    if not (folder / "config.json").is_file():
        raise FoldGPTError(f"Hub model '{hub_id}' has no config.json, so it is not a transformers model; give a "
                           "repository (or local folder) in the Hugging Face format")
    if not has_weights(folder):
        raise FoldGPTError(f"Hub model '{hub_id}' has no model*.safetensors or pytorch_model*.bin weights in {folder}; "
                           "give a repository with transformers weights (a GGUF-only repository: download the .gguf file "
                           "and give its path)")
    return folder


def _snapshot(hub_id: HubModelId, patterns: list[str]) -> Path:
    """``snapshot_download`` restricted to ``patterns``, its failures turned into one line naming the ID and the fix."""
    name = str(hub_id)
    try:
        return Path(snapshot_download(hub_id.repo_id, revision=hub_id.revision, allow_patterns=patterns))
    except GatedRepoError as error:
        raise FoldGPTError(f"Hub model '{name}' is gated; accept its terms at https://huggingface.co/{hub_id.repo_id} "
                           "and log in (hf auth login, or set HF_TOKEN) with that account") from error
    except RevisionNotFoundError as error:
        raise FoldGPTError(f"Hub model '{hub_id.repo_id}' has no revision '{hub_id.revision}'; give a branch, tag or "
                           "commit that exists (org/name@main)") from error
    except RepositoryNotFoundError as error:
        raise FoldGPTError(f"Hub model '{name}' does not exist (or is private); check the ID, log in (HF_TOKEN) for a "
                           "private one, or give a local folder that holds config.json") from error
    except IncompleteSnapshotError as error:
        raise FoldGPTError(f"the cached copy of Hub model '{name}' is incomplete and the Hub cannot be reached; "
                           "download it again with network access") from error
    except LocalEntryNotFoundError as error:
        raise FoldGPTError(_not_cached(name)) from error
    except HFValidationError as error:
        raise FoldGPTError(f"'{name}' is neither a local path nor a valid Hub ID (org/name or org/name@revision)") from error
    except HfHubHTTPError as error:
        raise FoldGPTError(f"the Hugging Face Hub refused '{name}' ({_first_line(error)}); retry later, or give a "
                           "local model folder") from error


def _not_cached(name: str) -> str:
    """Why an uncached model cannot be read: the Hub is switched off, or it is out of reach."""
    where = f"not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        return (f"Hub model '{name}' is {where} and HF_HUB_OFFLINE is set; download it once with network access "
                f"(hf download {name.split('@')[0]}), point HF_HOME at a cache that holds it, or give a local folder")
    return (f"Hub model '{name}' is {where} and the Hub cannot be reached; check the network (or a proxy), or give "
            "a local model folder")


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
