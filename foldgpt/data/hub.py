"""The Hub copies of the named data sets, for machines without the shared data folder.

A split is a few files of a Hub data set repository (parquet, or Alpaca's JSON file). ``huggingface_hub`` fetches
just those files into the ordinary Hub cache (``HF_HOME``, ``HF_HUB_OFFLINE`` and tokens as usual) and ``datasets``
reads them with its own cache. We do not call ``datasets.load_dataset(repo)`` on the repository itself because,
offline, it only finds data sets it has prepared before in its arrow cache, not the same files in the Hub cache;
fetching the split's files first works the same online and offline, and reads exactly the files that
``load_dataset(repo, config, split=...)`` would. docs/data.md says which repositories and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from foldgpt.errors import FoldGPTError


@dataclass(frozen=True)
class HubSplit:
    """One split of a named data set on the Hub: the files that hold it, and how its rows become one text."""

    repo_id: str
    files: tuple[str, ...]  # glob patterns inside the repository (its parquet shards, or one JSON file)
    column: str | None  # the text column; None: Alpaca records (instruction, input, output)
    joiner: str  # between rows
    revision: str = "main"
    strip_rows: bool = False  # strip each row and drop the empty ones before joining (PTB, as the local file is read)
    rows: int | None = None  # the first N rows only

    def __str__(self) -> str:
        revision = "" if self.revision == "main" else f"@{self.revision}"
        return f"{self.repo_id}{revision}/{self.files[0]}"


class HubUnavailable(Exception):
    """A split's files could not be fetched (offline and not cached, gated, missing); the message says why."""


def split_files(split: HubSplit) -> list[Path]:
    """The local paths of ``split``'s files in the Hub cache, downloaded if missing (empty: the repository has none)."""
    try:
        folder = Path(snapshot_download(split.repo_id, repo_type="dataset", revision=split.revision,
                                        allow_patterns=list(split.files)))
    except GatedRepoError as error:
        raise HubUnavailable(f"{split.repo_id} is gated: accept its terms at https://huggingface.co/datasets/"
                             f"{split.repo_id} and log in (HF_TOKEN)") from error
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise HubUnavailable(f"{split.repo_id}@{split.revision} is not on the Hub") from error
    except LocalEntryNotFoundError as error:
        state = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise HubUnavailable(f"{split.repo_id} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {state}") from error
    except HfHubHTTPError as error:
        raise HubUnavailable(f"the Hub refused {split.repo_id} ({type(error).__name__})") from error
    return sorted({path for pattern in split.files for path in folder.glob(pattern) if path.is_file()})


def read_rows(split: HubSplit, files: list[Path]) -> list:
    """The rows of ``split`` read by ``datasets``: its text column, or whole records for Alpaca."""
    import datasets  # noqa: PLC0415 - takes a second to import; only the Hub path needs it

    datasets.disable_progress_bars()
    builder = "json" if all(path.suffix in {".json", ".jsonl"} for path in files) else "parquet"
    table = datasets.load_dataset(builder, data_files=[str(path) for path in files], split="train")
    if split.rows is not None:
        table = table.select(range(min(split.rows, len(table))))
    if split.column is None:
        return table.to_list()
    if split.column not in table.column_names:
        raise FoldGPTError(f"{split} has no '{split.column}' column (it has {', '.join(table.column_names)}); "
                           "the Hub copy changed its layout, use the shared data folder (--data-dir)")
    return list(table[split.column])


def join_rows(split: HubSplit, rows: list[str]) -> str:
    """The rows as one text, the way the papers join them (and the way foldgpt reads the local file)."""
    if split.strip_rows:
        rows = [row.strip() for row in rows if row and row.strip()]
    return split.joiner.join(rows)


def first_available(candidates: tuple[HubSplit, ...]) -> tuple[HubSplit, list[Path]]:
    """The first candidate whose files are in the cache or on the Hub, with those files; raises ``HubUnavailable``
    with every candidate's reason when none is."""
    reasons = []
    for candidate in candidates:
        try:
            files = split_files(candidate)
        except HubUnavailable as error:
            reasons.append(str(error))
            continue
        if files:
            return candidate, files
        reasons.append(f"{candidate} has no such files")
    raise HubUnavailable("; ".join(dict.fromkeys(reasons)))
