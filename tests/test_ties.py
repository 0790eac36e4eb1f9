"""Ties (issue 22): a kept block runs its neighbour's weights plus a fitted low-rank delta; exact at full rank, stored
unmerged, trained on by healing, merged by the plain export; bad plans get one-line errors."""

import json
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from foldgpt.arch.adapters import adapter_for
from foldgpt.cli.main import main
from foldgpt.errors import FoldGPTError
from foldgpt.formats.loading import LoadedModel, load_model
from foldgpt.formats.plain import export_plain
from foldgpt.healing.config import HealConfig
from foldgpt.healing.loop import heal
from foldgpt.healing.lora import add_lora
from foldgpt.surgery.config import TieConfig
from foldgpt.surgery.removal import count_parameters, remove_blocks
from foldgpt.surgery.ties import TiePlan, parse_ties, tie_candidates, tie_groups, tie_saving, validate_tie_plan
from foldgpt.workflows.fold import tie_model
from tiny import DEPTH, FAMILIES, random_ids, save_tiny, tiny_model, tiny_tokenizer

FULL_RANK = 64  # at least every projection's smaller side in the tiny models (hidden 32, intermediate 64)


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "fit.txt"
    path.write_text("The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 60)
    return str(path)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def tiny(family: str = "llama", removed: tuple[int, ...] = ()) -> LoadedModel:
    model = tiny_model(family)
    if removed:
        remove_blocks(model, list(removed))
    return LoadedModel(model, tiny_tokenizer(), f"tiny-{family}")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_full_rank_delta_from_the_svd_reproduces_the_untied_logits_in_the_folder_and_the_plain_export(family, text, tmp_path):
    ids = random_ids()
    expected = logits(tiny_model(family), ids)
    config = TieConfig(ties="1:2,4:3", rank=FULL_RANK, fit_steps=0, data=text)
    result = tie_model(tiny(family), tiny(family), config, out=tmp_path / "tied")
    layers = adapter_for(result.loaded.model.get_base_model()).layers(result.loaded.model.get_base_model())
    shared = [name for name, _ in layers[2].named_parameters() if name.endswith("base_layer.weight")]
    assert shared and all(layers[2].get_parameter(name) is layers[1].get_parameter(name.replace(".base_layer", ""))
                          for name in shared)  # the child's base weights are the parent's Parameters
    reloaded = load_model(str(tmp_path / "tied"))
    torch.testing.assert_close(logits(reloaded.model, ids), expected, atol=1e-4, rtol=1e-4)
    export_plain(load_model(str(tmp_path / "tied")), tmp_path / "plain")
    vanilla = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", attn_implementation="eager").eval()
    torch.testing.assert_close(logits(vanilla, ids), expected, atol=1e-4, rtol=1e-4)


def test_a_tie_saves_what_the_folder_counts_and_the_local_fit_lowers_its_error(text):
    dense = tiny()
    removed = (3,)
    config = TieConfig(ties="1:2", rank=4, fit_steps=30, fit_windows=6, fit_seqlen=24, fit_lr=1e-2, data=text)
    student = tiny(removed=removed)
    pruned_params = count_parameters(student.model)
    saving = tie_saving(student.model.model.layers[1], 4)
    student.source = "tiny"  # no foldgpt.json: the ties' indices are the pruned model's own
    result = tie_model(student, dense, config)
    assert result.report.unique == pruned_params - saving
    (fit,) = result.metadata["tie_fits"]
    assert fit["losses"][-1] < 0.9 * fit["losses"][0]


def test_healing_carries_the_deltas_at_their_rank_frozen_unless_asked(text, tmp_path):
    folder = tmp_path / "tied"
    tie_model(tiny(), tiny(), TieConfig(ties="2:3", rank=6, fit_steps=0, data=text), out=folder)
    student = load_model(str(folder))
    ids = random_ids()
    tied = logits(student.model, ids)
    wrapped = add_lora(load_model(str(folder)).model, HealConfig(lora_rank=2))
    torch.testing.assert_close(logits(wrapped, ids), tied)  # the new adapters start at zero, the deltas as fitted
    shapes = {name: tuple(p.shape) for name, p in wrapped.named_parameters() if name.endswith("q_proj.lora_A.default.weight")}
    assert shapes["base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight"] == (6, 32)
    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"] == (2, 32)
    delta = "base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight"
    fitted = dict(student.model.named_parameters())[delta].detach().clone()
    config = HealConfig(data=text, steps=2, seqlen=24, eval_windows=1, lora_rank=2, tail_layers=1)
    trained = heal(load_model(str(folder)), tiny(), replace(config, train_tie_deltas=True)).loaded.model
    assert not torch.equal(dict(trained.named_parameters())[delta], fitted)
    healed = heal(student, tiny(), config, out=tmp_path / "healed")
    after = logits(healed.loaded.model, ids)
    assert not torch.allclose(after, tied)
    assert torch.equal(dict(healed.loaded.model.named_parameters())[delta], fitted)  # frozen by default
    export_plain(load_model(str(tmp_path / "healed")), tmp_path / "plain")
    vanilla = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", attn_implementation="eager").eval()
    torch.testing.assert_close(logits(vanilla, ids), after, atol=1e-4, rtol=1e-4)
    with pytest.raises(FoldGPTError, match="already healed"):
        heal(load_model(str(tmp_path / "healed")), tiny(), config)


@pytest.mark.parametrize(
    ("ties", "removed", "message"),
    [
        ("1:3", (2,), "across removed blocks"),
        ("1:4", (), "not neighbours"),
        ("1:2", (2,), "block 2 is removed"),
        ("1:2,2:3", (), "already in another tie"),
        ("5:6", (), "block 6 does not exist"),
    ],
)
def test_bad_tie_plans_get_one_line_errors(ties, removed, message):
    with pytest.raises(FoldGPTError, match=message) as caught:
        validate_tie_plan(TiePlan(removed, parse_ties(ties), 8), DEPTH)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("text_spec", ["1-2", "1:", "a:b", ""])
def test_unreadable_ties_get_one_line_errors(text_spec):
    with pytest.raises(FoldGPTError, match="--ties"):
        parse_ties(text_spec)


def test_the_plan_maps_original_indices_to_groups_over_the_kept_blocks():
    plan = TiePlan(removed=(0, 3), ties=((2, 1), (4, 5)), rank=8)
    assert tie_groups(plan, DEPTH) == ([[0, 1], [2, 3]], [1, 2])
    assert tie_candidates([3, 1, 5, 2, 0, 4], [3], 2, DEPTH) == ((0, 1), (4, 5))


def test_cli_fold_ties_a_pruned_folder_against_the_model_it_came_from(text, tmp_path, capsys):
    dense = save_tiny(tmp_path / "dense")
    assert main(["prune", str(dense), "--method", "bi", "--remove", "1", "--calibration", text, "--nsamples", "2",
                 "--seqlen", "16", "--out", str(tmp_path / "pruned")]) == 0
    removed = load_model(str(tmp_path / "pruned"))
    kept = [i for i in range(DEPTH) if i not in _removed(tmp_path / "pruned")]
    pair = next((a, b) for a, b in zip(kept, kept[1:]) if b == a + 1)
    assert main(["fold", str(tmp_path / "pruned"), "--ties", f"{pair[0]}:{pair[1]}", "--tie-rank", "4", "--tie-data", text,
                 "--tie-fit-windows", "2", "--tie-fit-seqlen", "16", "--tie-fit-steps", "3", "--out", str(tmp_path / "t")]) == 0
    assert "local error" in capsys.readouterr().out
    tied = load_model(str(tmp_path / "t"))
    assert count_parameters(tied.model) < count_parameters(removed.model)
    assert main(["fold", str(tmp_path / "pruned"), "--ties", f"{pair[0]}:{pair[1]}", "--group-size", "2",
                 "--out", str(tmp_path / "both")]) == 2
    assert not (tmp_path / "both").exists()
    assert main(["fold", str(tmp_path / "pruned"), "--fold", "auto", "--tie-rank", "2", "--tie-data", text,
                 "--tie-fit-windows", "2", "--tie-fit-seqlen", "16", "--tie-fit-steps", "3", "--tie-check-tokens", "64",
                 "--tie-check-seqlen", "16", "--tie-probe-steps", "0", "--out", str(tmp_path / "auto")]) == 0
    printed = capsys.readouterr().out
    assert "remove " in printed and "kept: " in printed
    chosen = json.loads((tmp_path / "auto" / "foldgpt.json").read_text())
    assert chosen["fold_choice"] in ("remove", "ties") and len(chosen["fold_candidates"]) == 2
    assert main(["fold", str(dense), "--fold", "auto", "--out", str(tmp_path / "dense-auto")]) == 2


def test_cli_prune_fold_auto_is_prune_then_fold_auto_in_one_folder(text, tmp_path, capsys):
    dense = save_tiny(tmp_path / "dense")
    removal = ["--method", "bi", "--remove", "2", "--calibration", text, "--nsamples", "2", "--seqlen", "16"]
    plan = ["--fold", "auto", "--tie-rank", "2", "--tie-data", text, "--tie-fit-windows", "2", "--tie-fit-seqlen", "16",
            "--tie-fit-steps", "3", "--tie-check-tokens", "64", "--tie-check-seqlen", "16", "--tie-probe-steps", "0"]
    assert main(["prune", str(dense), *removal, *plan, "--out", str(tmp_path / "one")]) == 0
    assert "kept: " in capsys.readouterr().out
    assert main(["prune", str(dense), *removal, "--out", str(tmp_path / "pruned")]) == 0
    assert main(["fold", str(tmp_path / "pruned"), *plan, "--out", str(tmp_path / "two")]) == 0
    one, two = (json.loads((tmp_path / name / "foldgpt.json").read_text()) for name in ("one", "two"))
    assert one["source_metadata"]["stage"] == "prune" and one["source_metadata"]["removed"] == _removed(tmp_path / "pruned")
    assert one["fold_choice"] == two["fold_choice"]
    for mine, theirs in zip(one["fold_candidates"], two["fold_candidates"], strict=True):
        assert (mine["removed"], mine["ties"], mine["unique_parameters"]) == (theirs["removed"], theirs["ties"], theirs["unique_parameters"])
        assert mine["perplexity"] == pytest.approx(theirs["perplexity"], rel=1e-4)
    ids = random_ids(2, 12)
    assert torch.allclose(logits(load_model(str(tmp_path / "one")).model, ids), logits(load_model(str(tmp_path / "two")).model, ids), atol=1e-4)
    for extra in (["--offload", "blocks"], ["--granularity", "sublayer"]):
        assert main(["prune", str(dense), *removal, *plan, *extra, "--out", str(tmp_path / "refused")]) == 2
        assert "--fold auto" in capsys.readouterr().err and not (tmp_path / "refused").exists()


def _removed(folder) -> list[int]:
    return json.loads((folder / "foldgpt.json").read_text())["removed"]
