"""SLEB block by block (``prune --method sleb --offload blocks``) must make the whole-model SLEB's choices, reading each
block once per greedy step and holding one block at a time."""

import json

import pytest

from foldgpt.eval.perplexity import windows_perplexity
from foldgpt.formats.blockwise import BlockwiseModel, window_batches_of
from foldgpt.formats.loading import load_model
from foldgpt.selection import blockwise
from foldgpt.selection.blockwise import blockwise_selection, blockwise_sleb
from foldgpt.selection.sleb import select_by_sleb
from foldgpt.surgery.removal import blocks_removed_temporarily
from tiny import DEPTH, random_ids, save_tiny

RTOL = 1e-4
FAMILIES = ["llama", "gemma3", "gpt2", "opt"]  # rotary; sliding-window layers; learned positions (two flavours)
N_REMOVE = 3


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("blockwise_sleb")
    return {family: save_tiny(root / family, family) for family in FAMILIES}


@pytest.fixture(scope="module")
def windows():
    return random_ids(batch=3, length=12)  # longer than the tiny sliding window (4)


def assert_same_search(expected, got):
    assert got.removed == expected.removed
    assert got.details["order"] == expected.details["order"]
    assert [s["removed"] for s in got.details["steps"]] == [s["removed"] for s in expected.details["steps"]]
    for step_got, step_expected in zip(got.details["steps"], expected.details["steps"]):
        assert step_got["calibration_perplexity"] == pytest.approx(step_expected["calibration_perplexity"], rel=RTOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_same_blocks_in_the_same_order_as_the_whole_model(family, folders, windows):
    expected = select_by_sleb(load_model(str(folders[family])).model, windows, N_REMOVE, seed=0)
    runner = BlockwiseModel(str(folders[family]))
    got = blockwise_sleb(runner, windows, N_REMOVE)
    assert_same_search(expected, got)
    assert runner.max_loaded_blocks == 1 and not runner.loaded_blocks


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_every_candidate_score_equals_the_whole_model_perplexity(family, folders, windows):
    """Not only the winners: after one removal, every remaining candidate's stream scores what the whole model without
    both blocks scores (a stream that ran a block too many or too few would differ)."""
    model = load_model(str(folders[family])).model
    runner = BlockwiseModel(str(folders[family]))
    removed = [2]
    scores = blockwise.sleb_step(runner, window_batches_of(windows, 2), removed, None, desc="test")
    assert list(scores) == [i for i in range(DEPTH) if i not in removed]
    for candidate, score in scores.items():
        with blocks_removed_temporarily(model, [*removed, candidate]):
            assert score == pytest.approx(windows_perplexity(model, windows, progress=False), rel=RTOL), candidate


def test_each_block_is_read_once_per_step(folders, windows, monkeypatch):
    runner = BlockwiseModel(str(folders["llama"]))
    loads = []
    original = runner.load_block
    monkeypatch.setattr(runner, "load_block", lambda index: loads.append(index) or original(index))
    selection = blockwise_sleb(runner, windows, 2)
    first = selection.details["order"][0]
    assert loads == list(range(DEPTH)) + [i for i in range(DEPTH) if i != first]


def test_streams_in_files_under_offload_dir(folders, windows, tmp_path, monkeypatch):
    """With ``offload_dir`` every stream is a file there (removed after each step), and the search is unchanged."""
    runner = BlockwiseModel(str(folders["gemma3"]))
    in_memory = blockwise_sleb(runner, windows, 2)
    paths = []
    original = blockwise.new_stream

    def spy(folder, name):
        stream = original(folder, name)
        paths.append(stream.path)
        return stream

    monkeypatch.setattr(blockwise, "new_stream", spy)
    offload = tmp_path / "offload"
    on_disk = blockwise_selection("sleb", runner, windows, 2, offload_dir=offload)
    assert_same_search(in_memory, on_disk)
    assert len(paths) == 2 + DEPTH + (DEPTH - 1)  # a base stream and one stream per candidate, each step
    assert all(path is not None and offload in path.parents for path in paths)
    assert list(offload.iterdir()) == []
    assert on_disk.method == "sleb" and on_disk.seconds > 0


def test_cli_prune_sleb_block_by_block_removes_what_the_whole_model_does(folders, tmp_path):
    from foldgpt.cli.main import main  # noqa: PLC0415

    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    folder = str(folders["gemma3"])
    common = ["prune", folder, "--method", "sleb", "--remove", "2", "--calibration", str(text), "--nsamples", "3",
              "--seqlen", "16"]
    assert main([*common, "--out", str(tmp_path / "whole")]) == 0
    assert main([*common, "--offload", "blocks", "--offload-dir", str(tmp_path / "off"), "--out", str(tmp_path / "blocks")]) == 0
    whole, blocks = (json.loads((tmp_path / name / "foldgpt.json").read_text()) for name in ("whole", "blocks"))
    assert blocks["removed"] == whole["removed"] and blocks["details"]["order"] == whole["details"]["order"]
    assert blocks["offload"] == "blocks" and blocks["num_blocks_after"] == DEPTH - 2
    for step_blocks, step_whole in zip(blocks["details"]["steps"], whole["details"]["steps"]):
        assert step_blocks["calibration_perplexity"] == pytest.approx(step_whole["calibration_perplexity"], rel=RTOL)
