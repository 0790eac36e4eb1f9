"""Data resolution and windowing."""

import json

import pytest
import torch

from foldgpt.data.text import NAMED_DATASETS, data_dir, data_dir_given, load_text, render_alpaca
from foldgpt.data.windows import calibration_windows, evaluation_windows
from foldgpt.errors import FoldGPTError


def test_named_sets_resolve_to_separate_calibration_and_evaluation_files():
    wiki_test = load_text("wikitext2", "evaluation")
    assert wiki_test == (data_dir() / "wikitext-2-raw" / "test_joined.txt").read_text(encoding="utf-8")
    assert wiki_test.startswith("\n\n = Robert Boulter = \n")
    assert load_text("wikitext2", "calibration") != wiki_test
    ptb = load_text("ptb", "evaluation")
    assert "\n" not in ptb and ptb.startswith("no it was n't black monday but while")
    with pytest.raises(FoldGPTError, match="no evaluation split"):
        load_text("alpaca", "evaluation")


def test_alpaca_records_use_the_stanford_template():
    text = load_text("alpaca", "calibration")
    assert text.startswith("Below is an instruction that describes a task")
    assert text.count("### Response:\n") == 5000
    with_input = render_alpaca({"instruction": "Add.", "input": "2 and 3", "output": "5"})
    assert "### Input:\n2 and 3\n\n### Response:\n5" in with_input and "paired with an input" in with_input
    without = render_alpaca({"instruction": "Say hi.", "input": "", "output": "hi"})
    assert "### Input" not in without and without.endswith("### Instruction:\nSay hi.\n\n### Response:\nhi")


def test_local_text_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    assert load_text(str(tmp_path / "a.txt")) == "hello world"
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["one", "two"]))
    assert load_text(str(tmp_path / "b.jsonl")) == "one\n\ntwo"
    (tmp_path / "c.jsonl").write_text(json.dumps({"question": "?"}))
    with pytest.raises(FoldGPTError, match="'text' field"):
        load_text(str(tmp_path / "c.jsonl"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(FoldGPTError, match="empty"):
        load_text(str(tmp_path / "empty.txt"))
    with pytest.raises(FoldGPTError, match="does not exist"):
        load_text(str(tmp_path / "missing.txt"))


def test_the_data_folder_is_found_from_the_working_directory_never_from_the_source_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv("FOLDGPT_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    assert data_dir() == (tmp_path / ".." / "shared" / "data").resolve() and not data_dir_given()
    monkeypatch.setenv("FOLDGPT_DATA", str(tmp_path / "mine"))
    assert data_dir() == tmp_path / "mine" and data_dir_given()


def test_a_missing_file_in_a_data_folder_given_explicitly_is_an_error_not_a_download(tmp_path, monkeypatch):
    monkeypatch.setenv("FOLDGPT_DATA", str(tmp_path))
    with pytest.raises(FoldGPTError, match=r"wikitext-2-raw/test_joined.txt is missing; point --data-dir"):
        load_text("wikitext2", "evaluation")


def test_every_named_split_has_a_hub_copy_with_the_papers_joiner():
    for name, named in NAMED_DATASETS.items():
        assert named.hub_calibration, name
        assert bool(named.hub_evaluation) == (named.evaluation is not None), name
    wikitext = NAMED_DATASETS["wikitext2"].hub_evaluation[0]
    assert (wikitext.repo_id, wikitext.files, wikitext.column, wikitext.joiner) == (
        "Salesforce/wikitext", ("wikitext-2-raw-v1/test-*.parquet",), "text", "\n\n")
    assert all(split.column == "sentence" and split.joiner == " " for split in NAMED_DATASETS["ptb"].hub_evaluation)
    assert NAMED_DATASETS["alpaca"].hub_calibration[0].rows == 5000


def test_unknown_data_name_is_a_clear_error():
    with pytest.raises(FoldGPTError, match="unknown data|cannot load data"):
        load_text("no-such-dataset-name")


def test_calibration_windows_are_seeded_and_inside_the_text():
    ids = torch.arange(1000)
    first = calibration_windows(ids, nsamples=8, seqlen=32, seed=3)
    assert first.shape == (8, 32)
    assert torch.equal(first, calibration_windows(ids, nsamples=8, seqlen=32, seed=3))
    assert not torch.equal(first, calibration_windows(ids, nsamples=8, seqlen=32, seed=4))
    assert torch.equal(first[:, 1:] - first[:, :-1], torch.ones(8, 31, dtype=torch.long))  # contiguous slices
    assert int(first.max()) < 1000


def test_evaluation_windows_are_non_overlapping_and_respect_max_tokens():
    ids = torch.arange(1000)
    windows = evaluation_windows(ids, seqlen=128)
    assert windows.shape == (7, 128) and torch.equal(windows.flatten(), ids[:896])
    assert evaluation_windows(ids, seqlen=128, max_tokens=300).shape == (2, 128)


def test_text_too_short_for_one_window_is_refused():
    with pytest.raises(FoldGPTError, match="too short"):
        calibration_windows(torch.arange(10), nsamples=1, seqlen=32)
    with pytest.raises(FoldGPTError, match="too short"):
        evaluation_windows(torch.arange(100), seqlen=64, max_tokens=50)
