"""The pipeline: every stage runs on a tiny model, finished stages are skipped on rerun, settings come from YAML."""

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

import foldgpt
from foldgpt.cli.main import main
from foldgpt.core.manifest import verify
from foldgpt.errors import FoldGPTError
from foldgpt.eval.perplexity import windows_perplexity
from foldgpt.workflows.compress import compress_config, settings_for
from foldgpt.workflows.fold_plan import fit_and_check_windows
from tiny import DEPTH, identity_block_model, save_tiny, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-llama", family="llama")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. " * 40)
    return path


def quick_options(text_file) -> dict:
    """Small settings so that every stage of the pipeline runs in seconds on the tiny model."""
    return {
        "method": "gates", "remove": 2, "gate_steps": 3, "calibration": str(text_file), "nsamples": 2, "seqlen": 32,
        "group_size": 2, "heal_steps": 2, "heal_data": str(text_file), "heal_seqlen": 32, "heal_eval_windows": 1,
        "ppl": [str(text_file)], "eval_seqlen": 64, "max_tokens": 256, "tasks": None, "efficiency": False,
        "gate_probe_sets": 0,
    }


def keyed(stage, options):
    """What ``stage``'s key hashes for these settings (flat names, the rest at the defaults)."""
    return settings_for(stage, compress_config(options, "test"))


def stage_records(out):
    return {stage: json.loads((out / stage / "stage.json").read_text())
            for stage in ("dense", "analysis", "pruned", "folded", "healed", "final", "plain")}


def test_every_stage_runs_and_a_rerun_skips_them_all(tiny_folder, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    options = {**quick_options(text_file), "tasks": ["piqa"], "limit": 2, "efficiency": True, "prefill_tokens": 32, "decode_tokens": 8}
    summary = foldgpt.compress(str(tiny_folder), out, **options)
    assert summary["num_blocks"] == [DEPTH, DEPTH - 2] and len(summary["removed_blocks"]) == 2
    assert summary["groups"] == [[0, 1], [2, 3]]
    assert summary["parameters"]["shared_base"] < summary["parameters"]["materialised"] < summary["parameters"]["dense"]
    assert all(not stage["skipped"] for stage in summary["stages"].values())
    healed = foldgpt.load(str(out / "healed"))  # compact base + LoRA adapter
    assert hasattr(healed.model, "get_base_model")
    plain = AutoModelForCausalLM.from_pretrained(summary["plain_model"]).eval()  # the same model as a vanilla folder
    ids = torch.randint(3, 100, (1, 16))
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, healed.model(ids).logits, atol=1e-5)
    for name in ("dense", "compressed"):
        assert summary[name]["perplexity"][str(text_file)]["perplexity"] > 1.0
    assert yaml.safe_load((out / "config.yaml").read_text())["sharing"]["group_size"] == 2
    assert "| run |" in (out / "report" / "report.md").read_text()
    # the pruned stage is written by foldgpt.prune itself: plain folder, foldgpt.json, gate plot, manifest
    assert (out / "pruned" / "gates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "pruned" / "foldgpt.json").read_text())["removed"] == summary["removed_blocks"]
    assert verify(out / "pruned").ok
    first = stage_records(out)
    capsys.readouterr()

    for name in ("dense", "compressed"):
        assert 0.0 <= summary[name]["tasks"]["metrics"]["piqa"]["acc"] <= 1.0
        assert summary[name]["efficiency"]["decode_tokens_per_s"] > 0
    parameters = summary["parameters"]
    assert parameters["unique"] == summary["compressed"]["efficiency"]["parameters_unique"]
    assert parameters["unique"] > parameters["shared_base"]  # the LoRA adapters count until merged
    again = foldgpt.compress(str(tiny_folder), out, **options)
    assert all(stage["skipped"] for stage in again["stages"].values())
    assert stage_records(out) == first
    assert again["compressed"] == summary["compressed"]
    assert capsys.readouterr().out.count("skipped") >= 6


def test_a_changed_setting_redoes_only_the_stages_after_it(tiny_folder, text_file, tmp_path):
    out = tmp_path / "run"
    foldgpt.compress(str(tiny_folder), out, **quick_options(text_file))
    changed = foldgpt.compress(str(tiny_folder), out, **{**quick_options(text_file), "heal_steps": 3})
    skipped = {name for name, stage in changed["stages"].items() if stage["skipped"]}
    assert skipped == {"dense", "analysis", "pruned", "folded"}


def test_gate_settings_invalidate_the_removal_only_when_the_gates_remove():
    base = {"model": "m", "method": "bi", "remove": 6, "gate_steps": 80, "gate_restarts": 3, "gradient_checkpointing": False,
            "heal_steps": 25}
    assert "gates" not in keyed("pruned", base) and "remove" in keyed("pruned", base)["target"]
    assert keyed("pruned", base) == keyed("pruned", {**base, "gate_restarts": 1, "gate_steps": 160})
    gates = {**base, "method": "gates"}
    assert keyed("pruned", gates)["gates"]["restarts"] == 3
    assert keyed("pruned", gates) != keyed("pruned", {**gates, "gate_restarts": 1})


def test_a_setting_given_at_its_default_keys_a_stage_as_if_it_were_left_out():
    # stage keys hash the resolved sections, so spelling out a default changes nothing (0.1's LATER_SETTINGS is gone)
    before = {"model": "m", "method": "gates", "remove": 6, "gate_steps": 80, "gradient_checkpointing": False}
    now = {**before, "gate_lora_rank": 0, "gate_lora_lr": 5e-3}
    assert keyed("pruned", now) == keyed("pruned", before)  # the defaults spelled out: not redone
    assert keyed("pruned", {**now, "gate_lora_rank": 8})["gates"]["lora_rank"] == 8  # set: a new removal


def test_the_pipeline_probes_by_default_and_prune_does_not(tiny_folder, text_file, tmp_path):
    from foldgpt.cli.commands.prune import settings_of
    from foldgpt.cli.main import build_parser

    assert compress_config({"model": str(tiny_folder)}, "test").probe.sets == 3  # compress heals: it picks its set by healing
    assert settings_of(build_parser().parse_args(["prune", "m", "--out", "o", "--remove", "1"])).probe.sets == 0
    options = {**quick_options(text_file), "group_size": 1, "gate_probe_sets": 2, "gate_probe_steps": 1,
               "gate_probe_tokens": 64, "gate_probe_screen": 3, "gate_probe_pool": 1}
    summary = foldgpt.compress(str(tiny_folder), tmp_path / "run", **options)
    probe = json.loads((tmp_path / "run" / "pruned" / "foldgpt.json").read_text())["details"]["probe"]
    assert summary["removed_blocks"] == probe["chosen"]
    assert len(probe["screened"]) == 3 and len(probe["candidates"]) == 2
    # the probes heal as the pipeline will: its data and window length, scored on its calibration text
    assert probe["config"]["data"] == probe["config"]["eval_data"] == str(text_file) and probe["config"]["seqlen"] == 32


def test_probe_settings_do_not_matter_to_a_finished_stage_while_probes_are_off():
    off = {"model": "m", "method": "gates", "remove": 6, "gate_probe_sets": 0, "gate_probe_steps": 25, "gate_probe_tokens": 32768}
    before = {"model": "m", "method": "gates", "remove": 6, "gate_probe_sets": 0}  # probes off, the rest at the defaults
    assert keyed("pruned", off) == keyed("pruned", before)
    on = {**off, "gate_probe_sets": 3}
    assert keyed("pruned", on)["probe"]["steps"] == 25 and keyed("pruned", on) != keyed("pruned", before)
    # a pipeline that does not heal heals no probes; without the screen its removal is the probe-less one
    unscreened = {"heal_steps": 0, "gate_probe_screen": 0}
    assert keyed("pruned", {**on, **unscreened}) == keyed("pruned", {**off, **unscreened}) == keyed("pruned", before)
    # with the screen (prune's default, --gate-probe-screen 24) it is a new removal, unlike any run without it
    screened = keyed("pruned", {**on, "heal_steps": 0, "gate_probe_screen": 24, "gate_probe_pool": 3})
    assert screened["probe"]["screen_only"] is True and screened != keyed("pruned", before)
    assert keyed("pruned", {**on, "gate_probe_screen": 24}) == keyed("pruned", on)  # healing: probes decide


def test_a_pipeline_that_does_not_heal_screens_as_prune_does(tiny_folder, text_file, tmp_path):
    options = {**quick_options(text_file), "heal_steps": 0, "group_size": 1, "gate_probe_sets": 3, "gate_probe_screen": 4}
    summary = foldgpt.compress(str(tiny_folder), tmp_path / "run", **options)
    probe = json.loads((tmp_path / "run" / "pruned" / "foldgpt.json").read_text())["details"]["probe"]
    assert len(probe["screened"]) == 4 and probe["candidates"] == []  # screened, nothing healed
    assert summary["removed_blocks"] == probe["chosen"] == min(probe["screened"], key=lambda r: r["ppl_before"])["removed"]
    assert probe["config"]["eval_data"] == str(text_file)


def test_a_run_killed_during_healing_resumes_without_redoing_earlier_stages(tiny_folder, text_file, tmp_path, monkeypatch):
    import foldgpt.workflows.compress

    out = tmp_path / "run"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(foldgpt.workflows.compress, "heal", crash)
    with pytest.raises(KeyboardInterrupt):
        foldgpt.compress(str(tiny_folder), out, **quick_options(text_file))
    assert (out / "folded" / "stage.json").is_file() and not (out / "healed").exists()
    monkeypatch.undo()
    summary = foldgpt.compress(str(tiny_folder), out, **quick_options(text_file))
    skipped = {name for name, stage in summary["stages"].items() if stage["skipped"]}
    assert skipped == {"dense", "analysis", "pruned", "folded"}


def test_the_saved_config_reproduces_the_run_through_the_cli(tiny_folder, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    foldgpt.compress(str(tiny_folder), out, **quick_options(text_file))
    assert main(["compress", str(tiny_folder), "--config", str(out / "config.yaml"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("skipped") >= 6
    # the command line wins over the YAML: a different group size redoes folding onwards
    assert main(["compress", str(tiny_folder), "--config", str(out / "config.yaml"), "--group-size", "1", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["groups"] == [[0], [1], [2], [3]] and not summary["stages"]["folded"]["skipped"]


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        ("group_sise: 2\n", "unknown setting 'group_sise'"),
        ("group_size: two\n", "setting 'group_size' has an invalid value"),
        ("heal_lr: [1, 2]\n", "setting 'heal_lr' has an invalid value"),
        ("method: magic\n", "must be one of"),
        ("- a\n- b\n", "must be a mapping"),
        ("out: somewhere\n", "give it on the command line"),
    ],
)
def test_bad_config_files_are_one_line_errors(tiny_folder, tmp_path, capsys, content, phrase):
    config = tmp_path / "bad.yaml"
    config.write_text(content)
    assert main(["compress", str(tiny_folder), "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("foldgpt: error:") == 1 and phrase in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_python_keywords_are_checked_like_the_cli(tiny_folder, tmp_path):
    with pytest.raises(FoldGPTError, match="unknown setting 'groupsize'"):
        foldgpt.compress(str(tiny_folder), tmp_path / "o", groupsize=2)
    with pytest.raises(FoldGPTError, match="not written by foldgpt compress"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "file.txt").write_text("user data")
        foldgpt.compress(str(tiny_folder), tmp_path / "other", remove=1)


def test_healing_can_be_switched_off(tiny_folder, text_file, tmp_path):
    summary = foldgpt.compress(str(tiny_folder), tmp_path / "run", **{**quick_options(text_file), "heal_steps": 0, "group_size": 1})
    assert "healed" not in summary["stages"] and summary["final_model"].endswith("folded")
    folded = foldgpt.load(str(tmp_path / "run" / "folded")).model
    pruned = foldgpt.load(str(tmp_path / "run" / "pruned")).model
    folded.set_attn_implementation("eager")
    pruned.set_attn_implementation("eager")
    ids = torch.randint(3, 100, (1, 16))
    with torch.no_grad():
        assert torch.equal(folded(ids).logits, pruned(ids).logits)  # G=1 is the pruned model itself


def test_a_parameter_target_counts_the_sharing_too(tiny_folder, text_file, tmp_path):
    options = {**quick_options(text_file), "remove": None, "target_params": 0.7, "heal_steps": 0, "method": "last"}
    summary = foldgpt.compress(str(tiny_folder), tmp_path / "run", **options)
    parameters = summary["parameters"]
    assert parameters["unique"] <= 0.7 * parameters["dense"]
    fewer = foldgpt.compress(str(tiny_folder), tmp_path / "run1", **{**options, "group_size": 1})
    # without sharing, removal alone must reach the target, so more blocks go
    assert len(fewer["removed_blocks"]) > len(summary["removed_blocks"])
    assert fewer["parameters"]["unique"] <= 0.7 * parameters["dense"]


def test_summary_table_columns_line_up_under_long_task_names():
    from foldgpt.workflows.compress import format_summary  # noqa: PLC0415

    results = {"perplexity": {"wikitext2": {"perplexity": 22.88}},
               "tasks": {"metrics": {"arc_challenge": {"acc": 0.23}, "winogrande": {"acc": 0.48}}}}
    summary = {"dense": results, "compressed": results, "parameters": {"dense": 134_515_008, "unique": 115_228_224},
               "removed_blocks": [3, 4], "method": "gates", "groups": [[0, 1], [2]],
               "stages": {"dense": {"skipped": False, "seconds": 573.2}, "final": {"skipped": True}}}
    header, _, dense_row, compressed_row, removed, stages = format_summary(summary).splitlines()
    for label, value in (("wikitext2 ppl", "22.88"), ("arc_challenge acc", "0.2300"), ("winogrande acc", "0.4800")):
        end = header.index(label) + len(label)  # right-aligned: each value ends where its label ends
        assert dense_row[end - len(value):end] == value and compressed_row[end - len(value):end] == value
        assert header[header.index(label) - 1] == " "  # labels never run into each other
    assert removed == "removed blocks [3, 4] (gates); shared groups [[0, 1]]"
    assert stages == "stages: dense 573s, final skipped"


def test_the_replacement_keys_the_removal_only_when_it_runs():
    before = {"model": "m", "method": "bi", "remove": 6}
    assert "replacement" not in keyed("pruned", before)  # runs from before --replace keep their key
    assert keyed("pruned", {**before, "replace_ridge": 1e-2}) == keyed("pruned", before)
    assert keyed("pruned", {**before, "replace": "linear"})["replacement"]["replace"] == "linear"


def test_the_gate_readout_keys_the_removal_only_when_it_is_not_the_old_one():
    before = {"model": "m", "method": "gates", "remove": 6}
    assert "readout" not in keyed("pruned", before)["gates"]  # runs from before --gate-readout keep their key
    assert keyed("pruned", {**before, "gate_readout": "on-target"})["gates"]["readout"] == "on-target"


def test_the_pipeline_replaces_the_removed_blocks_when_asked(tiny_folder, text_file, tmp_path):
    options = {**quick_options(text_file), "method": "bi", "replace": "linear", "replace_nsamples": 4, "replace_seqlen": 32, "heal_steps": 0,
               "group_size": 1}
    foldgpt.compress(str(tiny_folder), tmp_path / "run", **options)
    meta = json.loads((tmp_path / "run" / "pruned" / "foldgpt.json").read_text())
    assert meta["replacement"]["windows"] == 4 and meta["replacement"]["spans"]


def test_fold_auto_meets_the_budget_heals_the_ties_and_exports_them(tiny_folder, text_file, tmp_path):
    options = {**quick_options(text_file), "method": "bi", "group_size": 1, "fold": "auto", "tie_rank": 2, "tie_data": str(text_file), "tie_fit_windows": 2, "tie_fit_seqlen": 32,
               "tie_fit_steps": 5, "tie_check_tokens": 128, "tie_check_seqlen": 32}
    summary = foldgpt.compress(str(tiny_folder), tmp_path / "run", **options)
    folded = json.loads((tmp_path / "run" / "folded" / "foldgpt.json").read_text())
    remove, ties = folded["fold_candidates"]
    assert ties["unique_parameters"] <= remove["unique_parameters"] == summary["parameters"]["pruned"]
    assert len(ties["removed"]) == len(remove["removed"]) - 1 and ties["ties"]
    # the candidates are judged after a probe heal that is the heal that follows: the healed stage scores the same
    assert folded["fold_judged"] == "after a probe heal" and folded["fold_probe"]["steps"] == 2
    ties_win = ties["perplexity_healed"] < (1 - folded["fold_margin"]) * remove["perplexity_healed"]
    assert folded["fold_margin"] == 0.05 and folded["fold_choice"] == ("ties" if ties_win else "remove")
    chosen = remove if folded["fold_choice"] == "remove" else ties
    healed = foldgpt.load(str(tmp_path / "run" / "healed"))
    held_out = fit_and_check_windows(healed.tokenizer, compress_config(options, "test").ties)[1]
    healed_ppl = windows_perplexity(healed.model, held_out, progress=False)
    assert healed_ppl == pytest.approx(chosen["perplexity_healed"], rel=1e-4)
    written = {id(p): p for p in foldgpt.load(str(tmp_path / "run" / "folded")).model.parameters()}  # deltas included
    assert sum(p.numel() for p in written.values()) == chosen["unique_parameters"]
    assert summary["parameters"]["shared_base"] == folded["parameters"]["unique"]
    healed = foldgpt.load(str(tmp_path / "run" / "healed"))
    plain = AutoModelForCausalLM.from_pretrained(summary["plain_model"]).eval()
    ids = torch.randint(3, 100, (1, 16))
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, healed.model(ids).logits, atol=1e-5)
    assert keyed("folded", {"fold": "off"}) == keyed("folded", {})  # runs from before --fold keep their keys
    assert "ties" in keyed("folded", {"fold": "auto"})
    assert keyed("folded", {"fold": "auto"})["fold_probe"]["steps"] == 25  # the heal's whole budget by default
    assert keyed("folded", {"fold": "auto", "tie_probe_steps": 5})["fold_probe"]["steps"] == 5
    assert "fold_probe" not in keyed("folded", {"fold": "auto", "heal_steps": 0})
    assert "fold_probe" not in keyed("folded", {"fold": "auto", "tie_probe_steps": 0})


def test_fold_auto_keeps_removal_only_where_every_tie_loses(tmp_path, text_file):
    # blocks 1 and 4 add nothing, so removing them is exact; the rest is trained on the text, so that the tie
    # candidate (one of them kept, two blocks that matter tied with an unfitted rank-1 delta) can only be worse
    model = identity_block_model([1, 4])
    ids = tiny_tokenizer()(text_file.read_text()[:2000], return_tensors="pt").input_ids.view(-1, 50)[:8]
    trained = [p for name, p in model.named_parameters() if not any(f"layers.{i}." in name for i in (1, 4))]
    optimiser = torch.optim.Adam(trained, lr=1e-2)
    for _ in range(40):
        optimiser.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimiser.step()
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    options = {**quick_options(text_file), "method": "bi", "group_size": 1, "fold": "auto", "tie_rank": 1,
               "tie_data": str(text_file), "tie_fit_windows": 2, "tie_fit_seqlen": 32, "tie_fit_steps": 0,
               "tie_check_tokens": 128, "tie_check_seqlen": 32, "heal_steps": 0}
    summary = foldgpt.compress(str(tmp_path / "m"), tmp_path / "run", **options)
    folded = json.loads((tmp_path / "run" / "folded" / "foldgpt.json").read_text())
    assert summary["removed_blocks"] == [1, 4]
    assert folded["fold_choice"] == "remove" and len(folded["fold_candidates"]) == 2
    assert folded["fold_judged"] == "unhealed"  # the pipeline does not heal, so neither does the comparison
    assert folded["fold_candidates"][1]["perplexity"] > folded["fold_candidates"][0]["perplexity"]
    assert not (tmp_path / "run" / "folded" / "adapter").exists()


def test_fold_auto_refuses_explicit_groups():
    with pytest.raises(FoldGPTError, match="--fold auto plans its own ties"):
        compress_config({"fold": "auto", "group_size": 2}, "test")


def test_fold_auto_refuses_a_margin_or_probe_out_of_range():
    with pytest.raises(FoldGPTError, match="--tie-margin 1.2 is out of range"):
        compress_config({"fold": "auto", "tie_margin": 1.2}, "test")
    with pytest.raises(FoldGPTError, match="--tie-probe-steps -1 is out of range"):
        compress_config({"fold": "auto", "tie_probe_steps": -1}, "test")
