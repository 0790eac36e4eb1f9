"""The gates' removal is decided on real removals (issue: on Gemma-3-270M the gates' near-ties all held the last
blocks, whose joint removal wrecked the model): the baselines' sets join the screened candidates, the held-out text
skips the calibration windows, a gate stage that ends half open says so, and the recorded candidate scores are what a
fresh load of each pruned set gives."""

import json

import pytest
import torch

import foldgpt
from foldgpt.data.windows import calibration_starts, calibration_windows, windows_avoiding
from foldgpt.eval.perplexity import windows_perplexity
from foldgpt.formats.loading import LoadedModel
from foldgpt.selection.candidates import heldout_windows, merged_candidates, polarization
from foldgpt.selection.config import GateConfig, ProbeConfig
from foldgpt.selection.gates import gated
from foldgpt.surgery.removal import blocks_removed_temporarily
from foldgpt.train.losses import distillation_loss
from foldgpt.workflows.probe import choose_by_probe
from tiny import DEPTH, random_ids, save_tiny, tiny_model, tiny_tokenizer

ANCHOR = 1  # the block whose removal is ruinous


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. " * 60)
    return path


def anchored_model(scale: float = 500.0) -> torch.nn.Module:
    """A tiny llama whose block ``ANCHOR`` adds one huge vector along a fixed direction to the stream: every later
    norm sees that direction, so scaling the block's update by a gate changes little (the norms undo the scale) while
    removing it changes everything."""
    model = tiny_model("llama")
    mlp = model.model.layers[ANCHOR].mlp
    direction = torch.randn(mlp.down_proj.out_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mlp.up_proj.weight.copy_(mlp.gate_proj.weight)  # silu(x) * x >= -0.28: a mostly positive activation
        mlp.down_proj.weight.copy_(scale * (direction / direction.norm())[:, None].expand(-1, mlp.down_proj.in_features)
                                   / mlp.down_proj.in_features)
    return model.eval()


def test_the_constructed_block_is_cheap_to_dim_and_ruinous_to_remove():
    model, ids = anchored_model(), random_ids(batch=4, length=32)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        with gated(model) as gates:
            gates.values[ANCHOR] = 0.5
            dimmed = distillation_loss(model(input_ids=ids).logits, dense, 1.0).item()
        with blocks_removed_temporarily(model, [ANCHOR]):
            removed = distillation_loss(model(input_ids=ids).logits, dense, 1.0).item()
        others = []
        for block in (b for b in range(DEPTH) if b != ANCHOR):
            with blocks_removed_temporarily(model, [block]):
                others.append(distillation_loss(model(input_ids=ids).logits, dense, 1.0).item())
    assert removed > 50 * dimmed and removed > 50 * max(others)


def test_a_block_that_soft_gates_would_drop_first_is_kept_when_its_removal_is_ruinous(text_file):
    # the gates' scores put the anchor first and, with no pool, every near-tie holds it (as on Gemma-3-270M)
    dense = LoadedModel(anchored_model(), tiny_tokenizer(), "dense")
    scores = [0.9] * DEPTH
    scores[ANCHOR] = 0.1
    calibration = foldgpt.CalibrationConfig(data=str(text_file), nsamples=4, seqlen=32)
    windows = calibration_windows(torch.tensor(tiny_tokenizer()(text_file.read_text()).input_ids), 4, 32)
    config = ProbeConfig(sets=0, screen=1, pool=0, seqlen=32, eval_data=str(text_file), eval_tokens=256, screen_tokens=128)
    gates_only = choose_by_probe(dense, scores, 1, config)
    assert gates_only["chosen"] == [ANCHOR]  # without the baselines the screen has nothing else to choose
    outcome = choose_by_probe(dense, scores, 1, config, calibration, windows)
    assert ANCHOR not in outcome["chosen"]
    by_set = {tuple(record["removed"]): record for record in outcome["screened"]}
    assert by_set[(ANCHOR,)]["ppl_before"] > by_set[tuple(outcome["chosen"])]["ppl_before"]
    assert {name for record in outcome["screened"] for name in record["origin"]} >= {"gates", "bi", "angular"}
    assert outcome["baselines"]["bi"] != [ANCHOR]


def test_the_held_out_text_skips_every_calibration_window():
    tokens = torch.arange(1000)
    starts = calibration_starts(len(tokens), 5, 40, seed=3)
    assert calibration_windows(tokens, 5, 40, seed=3)[:, 0].tolist() == starts  # the same draw
    held_out = windows_avoiding(tokens, 50, 400, [(start, start + 40) for start in starts])
    assert len(held_out) == 8
    for window in held_out.tolist():
        assert all(window[-1] < start or window[0] >= start + 40 for start in starts)
    assert windows_avoiding(tokens, 50, 400, [(0, 1000)]).shape == (0, 50)  # nothing free


def test_a_calibration_text_too_small_to_leave_a_free_window_is_screened_all_the_same(text_file, capsys):
    dense = LoadedModel(tiny_model("llama"), tiny_tokenizer(), "dense")
    config = ProbeConfig(seqlen=1024, eval_data=str(text_file), eval_tokens=2048, screen_tokens=1024)
    crowded = foldgpt.CalibrationConfig(data=str(text_file), nsamples=64, seqlen=64)
    assert heldout_windows(dense, config, crowded).tolist() == heldout_windows(dense, config).tolist()
    assert "overlaps a calibration window" in capsys.readouterr().err


def test_held_out_windows_avoid_the_calibration_windows_of_the_same_text(text_file):
    dense = LoadedModel(tiny_model("llama"), tiny_tokenizer(), "dense")
    config = ProbeConfig(seqlen=32, eval_data=str(text_file), eval_tokens=512, screen_tokens=64)
    calibration = foldgpt.CalibrationConfig(data=str(text_file), nsamples=6, seqlen=32, seed=1)
    tokens = torch.tensor(tiny_tokenizer()(text_file.read_text()).input_ids)
    spans = [(start, start + 32) for start in calibration_starts(len(tokens), 6, 32, seed=1)]
    held_out = heldout_windows(dense, config, calibration)
    starts = [start for start in range(0, len(tokens) - 31, 32)
              if not any(start < end and begin < start + 32 for begin, end in spans)][:16]
    assert held_out.tolist() == [tokens[start : start + 32].tolist() for start in starts]
    other = foldgpt.CalibrationConfig(data="wikitext2", nsamples=6, seqlen=32)  # another text: nothing to avoid
    assert heldout_windows(dense, config, other).tolist() == heldout_windows(dense, config).tolist()


def test_candidates_are_merged_with_what_proposed_them():
    merged = merged_candidates([[1, 3], [1, 4]], {"bi": [4, 1], "angular": [2, 3]})
    assert merged == [([1, 3], ["gates"]), ([1, 4], ["gates", "bi"]), ([2, 3], ["angular"])]


def test_half_open_gates_are_reported():
    assert polarization([0.0, 0.95, 0.1, 1.0]) == {"polarized": True, "half_open": [], "low": 0.3, "high": 0.7}
    assert polarization([0.0, 0.5, 0.69, 1.0])["half_open"] == [1, 2]


def test_recorded_candidate_scores_are_what_a_fresh_load_of_each_pruned_set_gives(text_file, tmp_path, capsys):
    folder = save_tiny(tmp_path / "tiny")
    calibration = foldgpt.CalibrationConfig(data=str(text_file), nsamples=4, seqlen=32)
    config = ProbeConfig(sets=0, screen=3, pool=2, seqlen=32, eval_data=str(text_file), eval_tokens=256, screen_tokens=64)
    result = foldgpt.prune(foldgpt.load(str(folder)), method="gates", remove=2, calibration=calibration, probe=config,
                           gate_config=GateConfig(restarts=1, steps=6), out=tmp_path / "pruned")
    meta = json.loads((tmp_path / "pruned" / "foldgpt.json").read_text())
    probe = meta["details"]["probe"]
    assert meta["removed"] == probe["chosen"] == min(probe["screened"], key=lambda r: r["ppl_before"])["removed"]
    assert "polarized" in meta["details"]["polarization"]
    if not meta["details"]["polarization"]["polarized"]:  # six steps do not split the gates: the stage says so
        assert "did not polarize" in capsys.readouterr().err
    dense = foldgpt.load(str(folder))
    windows = heldout_windows(dense, config, calibration)[: config.screen_tokens // config.seqlen]
    for number, record in enumerate(probe["screened"]):
        foldgpt.prune(foldgpt.load(str(folder)), blocks=record["removed"], out=tmp_path / f"set{number}")
        fresh = foldgpt.load(str(tmp_path / f"set{number}"))
        assert record["ppl_before"] == pytest.approx(windows_perplexity(fresh.model, windows, progress=False), rel=1e-5)
    assert result.metadata["removed"] == meta["removed"]
