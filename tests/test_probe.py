"""Healing probes: the candidate sets are the nearest-scored ones, the probe keeps the set that heals best, and prune
records the probes and removes the chosen set."""

import pytest
import torch
import torch.nn.functional as F

import foldgpt
from foldgpt.arch.adapters import adapter_for
from foldgpt.errors import FoldGPTError
from foldgpt.eval.perplexity import windows_perplexity
from foldgpt.formats.loading import LoadedModel
from foldgpt.selection.candidates import candidate_sets, heldout_windows, screen_sets, without
from foldgpt.selection.config import GateConfig, ProbeConfig
from foldgpt.workflows.probe import choose_by_probe
from tiny import DEPTH, FAMILIES, identity_block_model, random_ids, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "probe.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. " * 40)
    return path


def probe_config(text_file, **overrides) -> ProbeConfig:
    settings = dict(sets=2, pool=1, steps=2, seqlen=32, data=str(text_file), eval_data=str(text_file), eval_tokens=128)
    settings.update(overrides)
    return ProbeConfig(**settings)


def trained_model_with_identity_block(text_file, identity: int):
    """A tiny llama trained on the text (so removing a working block costs perplexity), then block ``identity``'s
    output projections zeroed (so removing it costs nothing)."""
    model = tiny_model("llama")
    ids = tiny_tokenizer()(text_file.read_text(), return_tensors="pt").input_ids[:, :512].view(16, 32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(60):
        logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    adapter = adapter_for(model)
    with torch.no_grad():
        block = adapter.layers(model)[identity]
        for output in (adapter.attention_output_layer(block), adapter.mlp_output_layer(block)):
            for parameter in output.parameters():
                parameter.zero_()
    return model.eval()


def test_candidates_are_the_sets_with_the_smallest_summed_scores_from_the_pool():
    scores = [0.9, 0.1, 0.5, 0.2, 0.3, 0.8]
    # pool of 2 + 2: blocks 1 (0.1), 3 (0.2), 4 (0.3), 2 (0.5); pair sums 0.3, 0.4, 0.5, 0.6, 0.7, 0.8
    assert candidate_sets(scores, 2, 4, pool=2) == [[1, 3], [1, 4], [3, 4], [1, 2]]
    assert candidate_sets(scores, 2, 1, pool=2) == [[1, 3]]  # the plain lowest-2 set comes first
    assert candidate_sets(scores, 5, 10, pool=3) == [[1, 2, 3, 4, 5]]  # the pool never takes every block
    with pytest.raises(FoldGPTError, match="cannot choose"):
        candidate_sets(scores, 6, 1, pool=0)


def test_probe_prefers_the_set_that_heals_best_over_the_best_scored_one(text_file):
    # block 3 is an identity (zeroed output projections): removing it costs nothing, removing block 1 does; the
    # scores rank block 1 first, so the probe must overrule them
    dense = LoadedModel(trained_model_with_identity_block(text_file, 3), tiny_tokenizer(), "dense")
    scores = [0.9, 0.1, 0.9, 0.2, 0.9, 0.9]
    outcome = choose_by_probe(dense, scores, 1, probe_config(text_file))
    assert outcome["first"] == [1]
    assert sorted(record["removed"] for record in outcome["candidates"]) == [[1], [3]]
    assert outcome["chosen"] == [3]
    by_set = {tuple(record["removed"]): record for record in outcome["candidates"]}
    assert by_set[(3,)]["ppl_before"] < 0.5 * by_set[(1,)]["ppl_before"]
    assert by_set[(3,)]["ppl_after"] < by_set[(1,)]["ppl_after"]
    assert len(dense.model.model.layers) == 6  # the dense model is probed through copies


def test_screening_heals_only_the_sets_with_the_lowest_perplexity_before_healing(text_file):
    dense = LoadedModel(trained_model_with_identity_block(text_file, 3), tiny_tokenizer(), "dense")
    outcome = choose_by_probe(dense, [0.9, 0.1, 0.9, 0.2, 0.3, 0.9], 1, probe_config(text_file, sets=1, screen=3, pool=2))
    assert sorted(record["removed"] for record in outcome["screened"]) == [[1], [3], [4]]
    assert [record["removed"] for record in outcome["candidates"]] == [[3]]  # the identity block screens best
    assert outcome["chosen"] == [3]


def test_without_heals_the_screen_alone_chooses_the_lowest_screened_set(text_file):
    # prune's default (PRUNE_SCREEN: sets 0): the scores rank block 1 first, the screen finds the identity block 3
    dense = LoadedModel(trained_model_with_identity_block(text_file, 3), tiny_tokenizer(), "dense")
    outcome = choose_by_probe(dense, [0.9, 0.1, 0.9, 0.2, 0.3, 0.9], 1, probe_config(text_file, sets=0, screen=3, pool=2))
    assert outcome["first"] == [1] and outcome["chosen"] == [3]
    assert outcome["candidates"] == []  # nothing healed
    assert min(outcome["screened"], key=lambda record: record["ppl_before"])["removed"] == [3]


def test_a_text_shorter_than_one_window_is_screened_in_one_window(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("The quick brown fox jumps over the lazy dog.")
    dense = LoadedModel(tiny_model("llama"), tiny_tokenizer(), "dense")
    windows = heldout_windows(dense, ProbeConfig(eval_data=str(short)))
    assert windows.shape == (1, len(tiny_tokenizer()(short.read_text()).input_ids))


def test_the_screen_scores_on_the_first_screen_tokens_and_the_probes_on_all(text_file):
    dense = LoadedModel(trained_model_with_identity_block(text_file, identity=3), tiny_tokenizer(), "dense")
    config = probe_config(text_file, sets=1, screen=2, pool=1, eval_tokens=128, screen_tokens=32)
    outcome = choose_by_probe(dense, [0.9, 0.1, 0.9, 0.2, 0.9, 0.9], 1, config)
    windows = heldout_windows(dense, config)
    assert windows.shape == (4, 32)
    for record in outcome["screened"]:  # one window of 32 tokens, not the four
        assert record["ppl_before"] == pytest.approx(windows_perplexity(without(dense, record["removed"]).model, windows[:1], progress=False))
    assert outcome["screened"][0]["ppl_before"] != pytest.approx(
        windows_perplexity(without(dense, outcome["screened"][0]["removed"]).model, windows, progress=False))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_screen_scores_each_set_as_a_copy_without_it_and_leaves_the_model_whole(family):
    # the screen removes blocks in place for its forward passes and puts them back (no second model in memory)
    dense = LoadedModel(tiny_model(family), tiny_tokenizer(), "dense")
    ids = random_ids(batch=2, length=16)
    before = dense.model(input_ids=ids, use_cache=False).logits
    screened = screen_sets(dense, [[1], [0, 4]], ids)
    for record in screened:
        copy_ppl = windows_perplexity(without(dense, record["removed"]).model, ids, progress=False)
        assert record["ppl_before"] == pytest.approx(copy_ppl, rel=1e-5)
    torch.testing.assert_close(dense.model(input_ids=ids, use_cache=False).logits, before, rtol=0, atol=0)
    assert dense.model.config.num_hidden_layers == len(adapter_for(dense.model).layers(dense.model)) == DEPTH


def test_prune_removes_the_probed_set_and_records_the_probes(text_file, tmp_path):
    loaded = LoadedModel(identity_block_model([2, 4]), tiny_tokenizer(), "dense")
    calibration = foldgpt.CalibrationConfig(data=str(text_file), nsamples=4, seqlen=32)
    result = foldgpt.prune(loaded, method="gates", remove=1, calibration=calibration, out=tmp_path / "out",
                           gate_config=GateConfig(restarts=1, steps=30, lr=0.1, lam=0.2),
                           probe=probe_config(text_file, sets=3, pool=2))
    probe = result.metadata["details"]["probe"]
    assert len(probe["candidates"]) == 3
    best = min(probe["candidates"], key=lambda record: record["ppl_after"])
    assert result.metadata["removed"] == probe["chosen"] == best["removed"]
    assert len(loaded.model.model.layers) == 5
    assert foldgpt.load(str(tmp_path / "out")).model.config.num_hidden_layers == 5


def test_probe_settings_are_checked(text_file):
    with pytest.raises(FoldGPTError, match="sets >= 0"):
        ProbeConfig(sets=-1)
    with pytest.raises(FoldGPTError, match="eval_tokens"):
        ProbeConfig(seqlen=1024, eval_tokens=512)
    loaded = LoadedModel(identity_block_model([2]), tiny_tokenizer(), "dense")
    calibration = foldgpt.CalibrationConfig(data=str(text_file), nsamples=4, seqlen=32)
    with pytest.raises(FoldGPTError, match="--gate-probe-sets needs --method gates"):
        foldgpt.prune(loaded, method="bi", remove=1, probe=probe_config(text_file), calibration=calibration)
    # the CLI's screen default is the gates' alone: other methods keep their own set
    bi = foldgpt.prune(loaded, method="bi", remove=1, probe=probe_config(text_file, sets=0, screen=24), calibration=calibration)
    assert "probe" not in bi.metadata["details"] and bi.metadata["method"] == "bi"
