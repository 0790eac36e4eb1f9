"""Calibration and evaluation text, and its tokenisation into fixed-length windows.

Named data sets resolve to files in the shared data folder (``../shared/data`` next to the repo by default, or
``$FOLDGPT_DATA``). Each name has a calibration split and, where one exists, an evaluation split, so that a method is
never calibrated on the text it is scored on:

=========== ========================================== ===============================================
name        calibration (used by analysis and pruning) evaluation (used by ``foldgpt eval --ppl``)
=========== ========================================== ===============================================
wikitext2   WikiText-2 validation (tokenized variant)  WikiText-2 raw test, rows joined with "\\n\\n"
ptb         PTB validation                             PTB test, sentences joined with " "
alpaca      5000 Alpaca records, ``ALPACA_TEMPLATE``   (none)
=========== ========================================== ===============================================

Any local ``.txt``, ``.jsonl`` or ``.json`` file works too (records with a ``text`` field, or Alpaca records), and so
does a Hugging Face ``datasets`` name when that data set is already in the local cache (we never download).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from foldgpt.errors import FoldGPTError

Split = Literal["calibration", "evaluation"]

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task{context}. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n{output}"
)
"""The Stanford Alpaca prompt, with and without the input section; records are joined with a blank line."""


@dataclass(frozen=True)
class NamedDataset:
    """Relative paths (under the data folder) of one named data set's splits, and how its lines are joined."""

    calibration: str
    evaluation: str | None
    line_joiner: str | None = None  # None: use the file's text as it is


NAMED_DATASETS: dict[str, NamedDataset] = {
    "wikitext2": NamedDataset("wikitext-2/wiki.valid.tokens", "wikitext-2-raw/test_joined.txt"),
    "ptb": NamedDataset("ptb/ptb.valid.txt", "ptb/ptb.test.txt", line_joiner=" "),
    "alpaca": NamedDataset("alpaca/alpaca_5000.json", None),
}


def data_dir() -> Path:
    """The shared data folder: ``$FOLDGPT_DATA``, else ``../shared/data`` beside the repo or the working directory."""
    if "FOLDGPT_DATA" in os.environ:
        return Path(os.environ["FOLDGPT_DATA"])
    candidates = [Path(__file__).resolve().parents[1] / ".." / "shared" / "data", Path.cwd() / ".." / "shared" / "data"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    return candidates[0]


def load_text(spec: str, split: Split = "calibration") -> str:
    """The text of a named data set's split, of a local file, or of a cached ``datasets`` data set."""
    if spec in NAMED_DATASETS:
        return _load_named(spec, split)
    path = Path(spec).expanduser()
    if path.suffix in {".txt", ".jsonl", ".json", ".raw", ".tokens"} or path.exists():
        return _read_file(path)
    return _load_hf_dataset(spec, split)


def _load_named(name: str, split: Split) -> str:
    named = NAMED_DATASETS[name]
    relative = named.calibration if split == "calibration" else named.evaluation
    if relative is None:
        raise FoldGPTError(f"data set '{name}' has no {split} split; use it for calibration or healing only")
    path = data_dir() / relative
    if not path.is_file():
        raise FoldGPTError(f"data file {path} is missing; set FOLDGPT_DATA to the folder that holds the shared data")
    if named.line_joiner is None or path.suffix == ".json":
        return _read_file(path)
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return named.line_joiner.join(line for line in lines if line)


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
    """A ``datasets`` data set from the local cache only (``HF_DATASETS_OFFLINE=1``); its ``text`` column."""
    try:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        import datasets  # noqa: PLC0415 - optional dependency
    except ImportError:
        datasets = None
    hint = f"use one of {', '.join(NAMED_DATASETS)}, a .txt/.jsonl/.json file, or a datasets name in the local cache"
    if datasets is None:
        raise FoldGPTError(f"unknown data '{name}'; {hint}")
    hf_split = "validation" if split == "calibration" else "test"
    try:
        loaded = datasets.load_dataset(name, split=hf_split)
    except Exception as error:  # datasets raises many types when offline
        raise FoldGPTError(f"cannot load data '{name}' offline ({type(error).__name__}); {hint}") from error
    if "text" not in loaded.column_names:
        raise FoldGPTError(f"data set '{name}' has no 'text' column; export it to a .jsonl file with a 'text' field")
    return "\n\n".join(loaded["text"])
















