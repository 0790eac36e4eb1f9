"""Block-by-block execution (``--offload blocks``) must give what the whole model gives, holding one block at a time."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from foldgpt.analysis.blockwise import blockwise_redundancy_stats
from foldgpt.analysis.redundancy import redundancy_stats
from foldgpt.data.config import CalibrationConfig
from foldgpt.errors import FoldGPTError
from foldgpt.eval.blockwise import blockwise_windows_perplexity
from foldgpt.eval.perplexity import windows_perplexity
from foldgpt.formats import blockwise
from foldgpt.formats.blockwise import BlockwiseModel, SafetensorsFolder
from foldgpt.formats.loading import load_model
from foldgpt.surgery.removal import count_parameters
from foldgpt.workflows.prune import prune
from foldgpt.workflows.prune_blockwise import prune_blockwise
from tiny import DEPTH, FAMILIES, random_ids, save_tiny, tiny_model, tiny_tokenizer

TOL = 1e-6


def max_error(a, b):
    return (torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)).abs().max().item()


def assert_same_stats(expected, got):
    assert max_error(expected.block_influence, got.block_influence) < TOL
    assert max_error(expected.similarity, got.similarity) < TOL
    assert max_error(expected.angular_distance, got.angular_distance) < TOL
    assert (got.tokens, got.windows) == (expected.tokens, expected.windows)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("blockwise")
    return {family: save_tiny(root / family, family) for family in FAMILIES}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_statistics_and_perplexity_equal_the_whole_model(family, folders):
    """BI, similarity, angular distances and perplexity, block by block, equal the in-memory ones (all ten families:
    Gemma's and Qwen2's sliding-window layers, OPT's learned positions, GPT-NeoX's renamed head ...)."""
    loaded = load_model(str(folders[family]))
    ids = random_ids(batch=3, length=12)  # longer than the tiny sliding window (4)
    runner = BlockwiseModel(str(folders[family]))
    assert_same_stats(redundancy_stats(loaded.model, ids, batch_size=2), blockwise_redundancy_stats(runner, ids, batch_size=2))
    expected = windows_perplexity(loaded.model, ids, batch_size=2)
    assert blockwise_windows_perplexity(runner, ids, batch_size=2) == pytest.approx(expected, rel=TOL)
    assert runner.max_loaded_blocks == 1 and not runner.loaded_blocks


def test_hidden_states_on_disk_give_the_same_results(folders, tmp_path):
    loaded = load_model(str(folders["qwen2"]))
    ids = random_ids(batch=3, length=12)
    runner = BlockwiseModel(str(folders["qwen2"]))
    stats = blockwise_redundancy_stats(runner, ids, offload_dir=tmp_path / "offload")
    assert_same_stats(redundancy_stats(loaded.model, ids), stats)
    value = blockwise_windows_perplexity(runner, ids, offload_dir=tmp_path / "offload")
    assert value == pytest.approx(windows_perplexity(loaded.model, ids), rel=TOL)
    assert list((tmp_path / "offload").iterdir()) == []  # scratch files are removed


def test_selection_statistics_skip_the_similarity_matrix(folders):
    """bi and angular need no similarity matrix: without it the other statistics are the same."""
    loaded = load_model(str(folders["phi3"]))
    ids = random_ids(batch=2, length=12)
    stats = blockwise_redundancy_stats(BlockwiseModel(str(folders["phi3"])), ids, similarity=False)
    expected = redundancy_stats(loaded.model, ids)
    assert stats.similarity == []
    assert max_error(expected.block_influence, stats.block_influence) < TOL
    assert max_error(expected.angular_distance, stats.angular_distance) < TOL


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_never_more_than_one_block_of_weights_is_materialised(family, folders):
    """At every block call, that block's parameters are real and every other block's are on the meta device; the
    weights outside the blocks are the embedding, final norm and head only."""
    runner = BlockwiseModel(str(folders[family]))
    block_numel = sum(p.numel() for p in runner.blocks[0].parameters())
    calls = []

    def check(module, args):
        real = [i for i, block in enumerate(runner.blocks) if any(p.device.type != "meta" for p in block.parameters())]
        whole = all(p.device.type != "meta" for p in module.parameters())
        numel = sum(p.numel() for block in runner.blocks for p in block.parameters() if p.device.type != "meta")
        calls.append((real, runner.blocks.index(module), whole, numel))

    handles = [block.register_forward_pre_hook(check) for block in runner.blocks]
    ids = random_ids(batch=2, length=10)
    blockwise_redundancy_stats(runner, ids)
    blockwise_windows_perplexity(runner, ids)
    for handle in handles:
        handle.remove()
    assert len(calls) == 2 * 2 * DEPTH  # two sweeps, two windows, every block
    for real, index, whole, numel in calls:
        assert real == [index] and whole and numel == block_numel
    dense = tiny_model(family)
    outer = sum(p.numel() for p in dense.parameters()) - DEPTH * block_numel
    assert sum(p.numel() for p in runner.model.parameters() if p.device.type != "meta") == outer
    assert all(p.device.type == "meta" for block in runner.blocks for p in block.parameters())


def test_tied_embeddings_and_sharded_checkpoints(tmp_path):
    """A tied head (as SmolLM2's) and weights split over shards with an index, as big checkpoints are."""
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(tmp_path / "tied", max_shard_size="20KB")
    tiny_tokenizer().save_pretrained(tmp_path / "tied")
    assert (tmp_path / "tied" / "model.safetensors.index.json").is_file()
    assert "lm_head.weight" not in SafetensorsFolder(tmp_path / "tied")
    loaded = load_model(str(tmp_path / "tied"))
    runner = BlockwiseModel(str(tmp_path / "tied"))
    assert runner.model.lm_head.weight is runner.model.model.embed_tokens.weight
    assert count_parameters(runner.skeleton()) == count_parameters(loaded.model)  # what prune reports
    ids = random_ids(batch=2, length=10)
    assert_same_stats(redundancy_stats(loaded.model, ids), blockwise_redundancy_stats(runner, ids))
    assert blockwise_windows_perplexity(runner, ids) == pytest.approx(windows_perplexity(loaded.model, ids), rel=TOL)


@pytest.mark.parametrize(("family", "method"), [("gemma2", "bi"), ("gpt_neox", "angular"), ("opt", "bi")])
def test_pruning_block_by_block_writes_the_same_model(family, method, folders, tmp_path, monkeypatch):
    """The kept tensors are copied file to file; OPT's are split over small shards to test the sharded output."""
    if family == "opt":
        monkeypatch.setattr(blockwise, "SHARD_BYTES", 20_000)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    calibration = CalibrationConfig(data=str(text), nsamples=3, seqlen=16)
    expected = prune(load_model(str(folders[family])), method, remove=2, calibration=calibration, out=tmp_path / "dense")
    meta = prune_blockwise(str(folders[family]), method, remove=2, calibration=calibration, out=tmp_path / "blocks")
    assert meta["removed"] == expected.metadata["removed"]
    for key in ("parameters_before", "parameters_after", "flops_per_token_before", "flops_per_token_after", "num_blocks_after"):
        assert meta[key] == expected.metadata[key], key
    assert max_error(meta["scores"], expected.metadata["scores"]) < TOL
    assert json.loads((tmp_path / "blocks" / "foldgpt.json").read_text())["removed"] == meta["removed"]
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    blocks = AutoModelForCausalLM.from_pretrained(tmp_path / "blocks").eval()
    assert blocks.config.num_hidden_layers == DEPTH - 2
    assert (tmp_path / "blocks" / "model.safetensors.index.json").is_file() == (family == "opt")
    assert getattr(blocks.config, "layer_types", None) == getattr(dense.config, "layer_types", None)
    ids = random_ids(batch=2, length=12)
    with torch.no_grad():
        assert torch.equal(dense(ids).logits, blocks(ids).logits)


def test_cli_analyze_and_eval_block_by_block(folders, tmp_path, capsys):
    from foldgpt.cli.main import main  # noqa: PLC0415

    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    folder = folders["gemma3"]
    common = ["--calibration", str(text), "--nsamples", "3", "--seqlen", "16"]
    assert main(["analyze", str(folder), *common, "--out", str(tmp_path / "a")]) == 0
    assert main(["analyze", str(folder), *common, "--offload", "blocks", "--offload-dir", str(tmp_path / "off"),
                 "--out", str(tmp_path / "b")]) == 0
    assert "peak resident memory" in capsys.readouterr().out
    a, b = (json.loads((tmp_path / name / "analysis.json").read_text()) for name in "ab")
    assert max_error(a["block_influence"], b["block_influence"]) < TOL and max_error(a["similarity"], b["similarity"]) < TOL
    assert a["best_angular_span"] == b["best_angular_span"]
    ppl = ["--ppl", str(text), "--seqlen", "32", "--max-tokens", "128"]
    assert main(["eval", str(folder), *ppl, "--out", str(tmp_path / "a.json")]) == 0
    assert main(["eval", str(folder), *ppl, "--offload", "blocks", "--out", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f"{name}.json").read_text())["perplexity"][str(text)] for name in "ab")
    assert b["perplexity"] == pytest.approx(a["perplexity"], rel=TOL) and b["tokens"] == a["tokens"]


def test_cli_refuses_what_block_by_block_cannot_do(folders, tmp_path, capsys):
    from foldgpt.cli.main import main  # noqa: PLC0415

    folder = str(folders["llama"])
    assert main(["prune", folder, "--method", "gates", "--remove", "1", "--offload", "blocks", "--out", str(tmp_path / "p")]) == 2
    assert "bi, angular and sleb" in capsys.readouterr().err
    assert main(["eval", folder, "--tasks", "piqa", "--offload", "blocks"]) == 2
    assert "perplexity only" in capsys.readouterr().err
    assert main(["analyze", folder, "--offload-dir", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "--offload blocks" in capsys.readouterr().err
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_text((folders["llama"] / "config.json").read_text())
    with pytest.raises(FoldGPTError, match="safetensors"):
        BlockwiseModel(str(tmp_path / "no-weights"))
