"""Calibration and evaluation text, and its tokenisation into fixed-length windows.

A named data set is read from the data folder when it holds the file: the folder given by ``--data-dir`` /
``$FOLDGPT_DATA``, else ``../shared/data`` beside the working directory. Without such a file its Hub copy is read
(``foldgpt.data.hub``), unless a data folder was given explicitly: then the missing file is an error, so a wrong
folder never silently turns into a download. Each name has a calibration split and, where one exists, an evaluation
split, so that a method is never calibrated on the text it is scored on:

=========== ========================================== ===============================================
name        calibration (used by analysis and pruning) evaluation (used by ``foldgpt eval --ppl``)
=========== ========================================== ===============================================
wikitext2   local: WikiText-2 validation (tokenized    WikiText-2 raw test, rows joined with "\\n\\n"
            variant); Hub: WikiText-2 raw validation,  (local and Hub: the same text)
            rows joined with "\\n\\n"
ptb         PTB validation, sentences joined with " "  PTB test, sentences joined with " "
alpaca      5000 Alpaca records, ``ALPACA_TEMPLATE``   (none)
            (Hub: the first 5000 of Alpaca-cleaned)
=========== ========================================== ===============================================

Any local ``.txt``, ``.jsonl`` or ``.json`` file works too (records with a ``text`` field, or Alpaca records), and so
does any Hugging Face ``datasets`` name (its ``text`` column; downloaded into the ``datasets`` cache if missing).
docs/data.md names the Hub repositories and splits.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from foldgpt.data.hub import HubSplit, HubUnavailable, first_available, join_rows, read_rows
from foldgpt.errors import FoldGPTError

Split = Literal["calibration", "evaluation"]

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task{context}. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n{output}"
)
"""The Stanford Alpaca prompt, with and without the input section; records are joined with a blank line."""


ALPACA_RECORDS = 5000
"""Records of the Hub's Alpaca-cleaned used as ``alpaca`` (the first ones): as many as the local file holds."""
_WIKITEXT = "Salesforce/wikitext"
_PTB = "ptb-text-only/ptb_text_only"


def _ptb_split(split: str) -> tuple[HubSplit, ...]:
    """PTB's split as parquet in the repository's main branch, else in the Hub's parquet export of it (the
    repository was a loading script, which ``datasets`` 4+ no longer runs)."""
    return (HubSplit(_PTB, (f"penn_treebank/{split}-*.parquet",), "sentence", " ", strip_rows=True),
            HubSplit(_PTB, (f"penn_treebank/{split}/*.parquet",), "sentence", " ", revision="refs/convert/parquet",
                     strip_rows=True))


@dataclass(frozen=True)
class NamedDataset:
    """One named data set: its splits' relative paths under the data folder, how its lines are joined, and its
    splits' Hub copies (each a list of places to try in order)."""

    calibration: str
    evaluation: str | None
    hub_calibration: tuple[HubSplit, ...]
    hub_evaluation: tuple[HubSplit, ...] = ()
    line_joiner: str | None = None  # None: use the file's text as it is


NAMED_DATASETS: dict[str, NamedDataset] = {
    "wikitext2": NamedDataset(
        "wikitext-2/wiki.valid.tokens", "wikitext-2-raw/test_joined.txt",
        hub_calibration=(HubSplit(_WIKITEXT, ("wikitext-2-raw-v1/validation-*.parquet",), "text", "\n\n"),),
        hub_evaluation=(HubSplit(_WIKITEXT, ("wikitext-2-raw-v1/test-*.parquet",), "text", "\n\n"),)),
    "ptb": NamedDataset("ptb/ptb.valid.txt", "ptb/ptb.test.txt", hub_calibration=_ptb_split("validation"),
                        hub_evaluation=_ptb_split("test"), line_joiner=" "),
    "alpaca": NamedDataset(
        "alpaca/alpaca_5000.json", None,
        hub_calibration=(HubSplit("yahma/alpaca-cleaned", ("alpaca_data_cleaned.json",), None, "\n\n", rows=ALPACA_RECORDS),)),
}


def data_dir() -> Path:
    """The shared data folder: ``$FOLDGPT_DATA`` (``--data-dir`` sets it), else ``../shared/data`` beside the working
    directory (never a path found through foldgpt's own location: an installed wheel has no data beside it)."""
    if data_dir_given():
        return Path(os.environ["FOLDGPT_DATA"]).expanduser()
    return (Path.cwd() / ".." / "shared" / "data").resolve()


def data_dir_given() -> bool:
    """Whether the user named a data folder (``--data-dir`` / ``$FOLDGPT_DATA``), which then must hold the files."""
    return bool(os.environ.get("FOLDGPT_DATA"))


def load_text(spec: str, split: Split = "calibration") -> str:
    """The text of a named data set's split, of a local file, or of a cached ``datasets`` data set."""
    if spec in NAMED_DATASETS:
        return _load_named(spec, split)
    path = Path(spec).expanduser()
    if path.suffix in {".txt", ".jsonl", ".json", ".raw", ".tokens"} or path.exists():
        return _read_file(path)
    return _load_hf_dataset(spec, split)


def _load_named(name: str, split: Split) -> str:
    """A named split from the data folder when the file is there, else from its Hub copy."""
    named = NAMED_DATASETS[name]
    relative = named.calibration if split == "calibration" else named.evaluation
    if relative is None:
        raise FoldGPTError(f"data set '{name}' has no {split} split; use it for calibration or healing only")
    path = data_dir() / relative
    if path.is_file():
        if named.line_joiner is None or path.suffix == ".json":
            return _read_file(path)
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        return named.line_joiner.join(line for line in lines if line)
    if data_dir_given():
        raise FoldGPTError(f"data file {path} is missing; point --data-dir (or FOLDGPT_DATA) at the folder that holds the "
                           f"shared data, or unset FOLDGPT_DATA to read the Hub copy of '{name}'")
    return _load_named_from_hub(name, split, path)


def _load_named_from_hub(name: str, split: Split, local: Path) -> str:
    named = NAMED_DATASETS[name]
    candidates = named.hub_calibration if split == "calibration" else named.hub_evaluation
    try:
        chosen, files = first_available(candidates)
    except HubUnavailable as error:
        raise FoldGPTError(f"data set '{name}' ({split}) is not in {local} and its Hub copy cannot be read: {error}; "
                           "give --data-dir DIR (or FOLDGPT_DATA) with the shared data, or reach the Hub once") from error
    rows = read_rows(chosen, files)
    text = "\n\n".join(render_alpaca(r) for r in rows) if chosen.column is None else join_rows(chosen, rows)
    if not text.strip():
        raise FoldGPTError(f"the Hub copy of '{name}' ({chosen}) is empty; delete it from the Hugging Face cache and retry")
    return text


def _read_file(path: Path) -> str:
    if not path.is_file():
        raise FoldGPTError(f"data file '{path}' does not exist; give a data set name ({', '.join(NAMED_DATASETS)}) or an existing file")
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in raw.splitlines() if line.strip()]
        text = _records_to_text(records, path)
    elif path.suffix == ".json":
        loaded = json.loads(raw)
        text = _records_to_text(loaded if isinstance(loaded, list) else [loaded], path)
    else:
        text = raw
    if not text.strip():
        raise FoldGPTError(f"data file '{path}' is empty; give a file with text in it")
    return text


def _records_to_text(records: list[dict], path: Path) -> str:
    """Join JSON records: a ``text`` field as it is, Alpaca records through ``ALPACA_TEMPLATE``."""
    if records and all(isinstance(r, dict) and "text" in r for r in records):
        return "\n\n".join(str(r["text"]) for r in records)
    if records and all(isinstance(r, dict) and "instruction" in r and "output" in r for r in records):
        return "\n\n".join(render_alpaca(r) for r in records)
    raise FoldGPTError(f"cannot read text from '{path}': records need a 'text' field, or 'instruction'/'output' (Alpaca)")


def render_alpaca(record: dict) -> str:
    """One Alpaca record as a training text (the original Stanford Alpaca prompt)."""
    has_input = bool(str(record.get("input", "")).strip())
    return ALPACA_TEMPLATE.format(
        context=", paired with an input that provides further context" if has_input else "",
        instruction=record["instruction"],
        input_block=f"### Input:\n{record['input']}\n\n" if has_input else "",
        output=record["output"],
    )


def _load_hf_dataset(name: str, split: Split) -> str:
    """A ``datasets`` data set (its validation split for calibration, test for evaluation), through the ``datasets``
    cache (downloaded when missing, unless ``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE`` is set); its ``text`` column."""
    import datasets  # noqa: PLC0415 - takes a second to import; only this path needs it

    hint = f"use one of {', '.join(NAMED_DATASETS)}, a .txt/.jsonl/.json file, or a Hugging Face datasets name"
    hf_split = "validation" if split == "calibration" else "test"
    try:
        loaded = datasets.load_dataset(name, split=hf_split)
    except Exception as error:  # datasets raises many types (offline, missing, gated, no such split)
        first = (str(error).strip().splitlines() or [""])[0][:160]
        raise FoldGPTError(f"cannot load data '{name}' ({type(error).__name__}: {first}); {hint}") from error
    if "text" not in loaded.column_names:
        raise FoldGPTError(f"data set '{name}' has no 'text' column; export it to a .jsonl file with a 'text' field")
    return "\n\n".join(loaded["text"])
















