"""The command line: the happy path on a tiny model folder, and one-line errors for bad input."""

import json
import math
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM, BloomConfig, BloomForCausalLM

from cli_helpers import assert_one_line_error, run_cli
from foldgpt.cli.main import build_parser
from tiny import DEPTH, save_tiny


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-gemma3", family="gemma3")


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    return path


def test_prune_writes_a_vanilla_folder_with_metadata(capsys, tiny_folder, text_file, tmp_path):
    out = tmp_path / "pruned"
    code, stdout, _ = run_cli(capsys, "prune", tiny_folder, "--method", "bi", "--remove", 2, "--calibration", text_file,
                              "--nsamples", 2, "--seqlen", 32, "--out", out)
    assert code == 0 and "removed blocks" in stdout
    metadata = json.loads((out / "foldgpt.json").read_text())
    assert metadata["method"] == "bi" and len(metadata["removed"]) == 2
    assert metadata["num_blocks_after"] == DEPTH - 2
    assert len(metadata["scores"]) == DEPTH
    assert metadata["parameters_after"] < metadata["parameters_before"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == DEPTH - 2 and len(model.config.layer_types) == DEPTH - 2
    assert (out / "tokenizer.json").is_file()


def test_pruning_a_pruned_folder_records_original_block_numbers(capsys, tiny_folder, text_file, tmp_path):
    common = ["--calibration", text_file, "--nsamples", 2, "--seqlen", 32]
    run_cli(capsys, "prune", tiny_folder, "--method", "random", "--remove", 2, *common, "--out", tmp_path / "a")
    code, _, _ = run_cli(capsys, "prune", tmp_path / "a", "--method", "last", "--remove", 1, *common, "--out", tmp_path / "b")
    assert code == 0
    first = json.loads((tmp_path / "a" / "foldgpt.json").read_text())
    second = json.loads((tmp_path / "b" / "foldgpt.json").read_text())
    assert first["removed"] == first["removed_original"] == [2, 4]  # random, seed 0
    assert second["removed"] == [2] and second["removed_original"] == [3]  # kept were 0, 1, 3, 5


def test_prune_removes_exactly_the_given_blocks(capsys, tiny_folder, tmp_path):
    code, stdout, _ = run_cli(capsys, "prune", tiny_folder, "--blocks", "1,3-4", "--out", tmp_path / "given")
    assert code == 0 and "[1, 3, 4]" in stdout
    metadata = json.loads((tmp_path / "given" / "foldgpt.json").read_text())
    assert metadata["method"] == "given" and metadata["removed"] == metadata["removed_original"] == [1, 3, 4]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "given").config.num_hidden_layers == DEPTH - 3
    for args, message in ((["--blocks", "2,9"], "between 0 and"), (["--blocks", "2,2"], "distinct"),
                          (["--blocks", "2-1"], "backwards"), (["--blocks", "2", "--remove", 1], "without --remove"),
                          (["--blocks", "2", "--method", "bi"], "without --method"), (["--remove", 1], "needs --method")):
        code, _, err = run_cli(capsys, "prune", tiny_folder, *args, "--out", tmp_path / "bad")
        assert_one_line_error(code, err, message)
    assert not (tmp_path / "bad").exists()


def test_analyze_writes_json_and_figures(capsys, tiny_folder, text_file, tmp_path):
    out = tmp_path / "analysis"
    code, _, _ = run_cli(capsys, "analyze", tiny_folder, "--calibration", text_file, "--nsamples", 2, "--seqlen", 32, "--out", out)
    assert code == 0
    analysis = json.loads((out / "analysis.json").read_text())
    assert len(analysis["block_influence"]) == DEPTH
    assert len(analysis["similarity"]) == DEPTH and analysis["similarity"][0][0] == pytest.approx(1.0)
    for png in ("similarity_heatmap.png", "block_influence.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_on_a_text_file_writes_json(capsys, tiny_folder, text_file, tmp_path):
    out = tmp_path / "ppl.json"
    code, stdout, _ = run_cli(capsys, "eval", tiny_folder, "--ppl", text_file, "--seqlen", 64, "--out", out)
    assert code == 0
    result = json.loads(out.read_text())["perplexity"][str(text_file)]
    assert result["tokens"] == 64 * (2700 // 64) and result["perplexity"] > 1.0
    assert f"{result['perplexity']:.3f}" in stdout


def test_existing_output_is_refused_without_overwrite(capsys, tiny_folder, text_file, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    code, _, err = run_cli(capsys, "prune", tiny_folder, "--method", "last", "--remove", 1, "--out", out)
    assert_one_line_error(code, err, "already exists", "--overwrite")


@pytest.mark.parametrize(
    ("args", "phrases"),
    [
        (["--remove", "6"], ["out of range", "between 1 and 5"]),
        (["--remove", "0"], ["out of range"]),
        (["--remove-ratio", "1.5"], ["out of range"]),
    ],
)
def test_out_of_range_targets_fail_with_one_line_and_no_output(capsys, tiny_folder, text_file, tmp_path, args, phrases):
    out = tmp_path / "never"
    code, _, err = run_cli(capsys, "prune", tiny_folder, "--method", "bi", *args, "--calibration", text_file, "--out", out)
    assert_one_line_error(code, err, *phrases)
    assert not out.exists() and list(tmp_path.iterdir()) == [text_file]


def test_missing_model_path(capsys, tmp_path):
    code, _, err = run_cli(capsys, "prune", tmp_path / "nope", "--method", "bi", "--remove", 1, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "does not exist")
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture_lists_the_supported_ones(capsys, tmp_path):
    BloomForCausalLM(BloomConfig(n_layer=2, hidden_size=16, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "bloom")
    code, _, err = run_cli(capsys, "analyze", tmp_path / "bloom", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "'bloom' is not supported", "llama", "gemma3_text", "phi3", "opt", "gpt2", "gpt_neox")
    assert not (tmp_path / "o").exists()


def test_folder_without_config(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "eval", tmp_path / "empty")
    assert_one_line_error(code, err, "no config.json")


def test_corrupt_weights_are_a_clear_error(capsys, tiny_folder, tmp_path):
    broken = save_tiny(tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    code, _, err = run_cli(capsys, "eval", broken, "--ppl", "wikitext2", "--max-tokens", 64, "--seqlen", 32)
    assert_one_line_error(code, err, "cannot load the model")


def test_unknown_method_exits_non_zero_without_traceback(tiny_folder, tmp_path):
    result = subprocess.run([sys.executable, "-m", "foldgpt.cli", "prune", str(tiny_folder), "--method", "magic",
                             "--remove", "1", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "invalid choice: 'magic'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_help_explains_every_command():
    parser = build_parser()
    help_text = parser.format_help()
    for command in ("analyze", "prune", "eval", "compress"):
        assert command in help_text
    subparsers = parser._subparsers._group_actions[0].choices
    prune_help = subparsers["prune"].format_help()
    for option in ("--method", "--remove", "--remove-ratio", "--calibration", "--nsamples", "--seqlen", "--seed", "--out", "--overwrite"):
        assert option in prune_help
    for action in subparsers["prune"]._actions:
        assert action.help, f"option {action.option_strings} has no help"


def test_data_dir_option_points_named_sets_elsewhere_for_one_command(capsys, tiny_folder, tmp_path):
    import os

    before = os.environ.get("FOLDGPT_DATA")
    code, _, err = run_cli(capsys, "--data-dir", tmp_path / "nowhere", "eval", tiny_folder, "--ppl", "wikitext2")
    assert_one_line_error(code, err, "nowhere", "FOLDGPT_DATA")
    assert os.environ.get("FOLDGPT_DATA") == before


def test_prune_accepts_a_flops_target(capsys, tiny_folder, text_file, tmp_path):
    out = tmp_path / "flops"
    code, stdout, _ = run_cli(capsys, "prune", tiny_folder, "--method", "last", "--target-flops", "0.7", "--calibration",
                              text_file, "--nsamples", 2, "--seqlen", 32, "--out", out)
    assert code == 0 and "FLOPs/token" in stdout
    metadata = json.loads((out / "foldgpt.json").read_text())
    assert metadata["target"] == {"target_flops": 0.7}
    assert metadata["flops_per_token_after"] <= 0.7 * metadata["flops_per_token_before"]


def test_prune_with_gates_records_the_gate_trajectory_and_draws_it(capsys, tiny_folder, text_file, tmp_path):
    out = tmp_path / "gates"
    code, _, _ = run_cli(capsys, "prune", tiny_folder, "--method", "gates", "--remove", 2, "--gate-steps", 5,
                         "--gate-lambda-growth", "0.3", "--gate-lambda-damping", "0.5", "--gate-center", "target",
                         "--gate-optimizer", "sgd", "--gate-hard-steps", 2, "--gate-restarts", 2, "--calibration", text_file, "--nsamples", 2, "--seqlen", 32, "--out", out)
    assert code == 0
    metadata = json.loads((out / "foldgpt.json").read_text())
    history = metadata["details"]["gate_history"]
    assert len(history) == 2 * 5 and all(len(step) == DEPTH for step in history)  # two runs of 5 steps
    assert metadata["details"]["hyperparameters"]["steps"] == 5
    assert metadata["details"]["hyperparameters"]["restarts"] == 2 == metadata["details"]["restarts"]
    assert metadata["details"]["hyperparameters"]["lam_growth"] == 0.3
    assert metadata["details"]["hyperparameters"]["lam_damping"] == 0.5
    assert metadata["details"]["hyperparameters"]["polarization_center"] == "target"
    assert metadata["details"]["hyperparameters"]["optimizer"] == "sgd"
    assert metadata["details"]["hyperparameters"]["hard_steps"] == 2
    assert len(set(metadata["details"]["lambda_history"][-2:])) == 1
    gates = metadata["scores"]
    # prune screens the gates' near-ties by default (PRUNE_SCREEN): it removes the screen's lowest, no heals
    screen = metadata["details"]["probe"]
    assert screen["first"] == sorted(sorted(range(DEPTH), key=lambda i: (gates[i], i))[:2])
    assert len(screen["screened"]) == min(24, math.comb(min(DEPTH - 1, 2 + 3), 2)) and screen["candidates"] == []
    assert metadata["removed"] == screen["chosen"] == min(screen["screened"], key=lambda r: r["ppl_before"])["removed"]
    assert (out / "gates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prune_without_the_screen_removes_the_gates_own_pick(capsys, tiny_folder, text_file, tmp_path):
    out = tmp_path / "gates"
    code, stdout, _ = run_cli(capsys, "prune", tiny_folder, "--method", "gates", "--remove", 2, "--gate-steps", 3,
                              "--gate-restarts", 1, "--gate-probe-screen", 0, "--calibration", text_file, "--nsamples", 2,
                              "--seqlen", 32, "--out", out)
    assert code == 0 and "screened" not in stdout
    metadata = json.loads((out / "foldgpt.json").read_text())
    gates = metadata["scores"]
    assert "probe" not in metadata["details"]
    assert metadata["removed"] == sorted(sorted(range(DEPTH), key=lambda i: (gates[i], i))[:2])


def test_nsamples_defaults_to_64_windows_for_gates_and_16_for_scoring_methods(capsys, tiny_folder, text_file, tmp_path):
    # gate training draws one window per step, so the gates get more windows by default (foldgpt.data.default_calibration)
    for method, expected in (("gates", 64), ("bi", 16)):
        out = tmp_path / method
        code, _, _ = run_cli(capsys, "prune", tiny_folder, "--method", method, "--remove", 1, "--gate-steps", 2,
                             "--calibration", text_file, "--seqlen", 16, "--out", out)
        assert code == 0
        assert json.loads((out / "foldgpt.json").read_text())["calibration"]["nsamples"] == expected
    prune_help = build_parser()._subparsers._group_actions[0].choices["prune"].format_help()
    assert "64 for --method gates, 16 for the others" in " ".join(prune_help.split())


def test_docs_cli_md_is_generated_from_the_current_settings():
    from pathlib import Path

    from foldgpt.cli.docs import render

    path = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
    assert path.read_text() == render(), "docs/cli.md is stale: run python -m foldgpt.cli.docs > docs/cli.md"


def test_heal_and_compress_take_the_same_settings_under_the_same_names():
    from foldgpt.core.settings import options
    from foldgpt.healing.config import HealConfig

    subparsers = build_parser()._subparsers._group_actions[0].choices
    flags = {name: {flag for action in subparsers[name]._actions for flag in action.option_strings} for name in ("heal", "compress")}
    for option in options(HealConfig):
        assert option.flag in flags["heal"] and "--heal-" + option.flag.removeprefix("--") in flags["compress"], option.flag
    assert {"--lora-targets", "--train-norms", "--no-train-norms"} <= flags["heal"]
    assert {"--heal-lora-targets", "--heal-train-norms", "--no-heal-train-norms"} <= flags["compress"]
    assert "--freeze-norms" not in flags["heal"] and "--heal-target-modules" not in flags["compress"]


def test_a_nested_config_a_flat_one_and_the_command_line_resolve_alike(tmp_path):
    import yaml

    from foldgpt.cli.schema import read_config
    from foldgpt.core.settings import to_mapping
    from foldgpt.workflows.compress import config_from_file

    nested, flat = tmp_path / "nested.yaml", tmp_path / "flat.yaml"
    nested.write_text(yaml.safe_dump({"gates": {"steps": 40, "lam": 0.3}, "heal": {"steps": 5, "train_norms": False},
                                      "target": {"remove_ratio": 0.2}, "eval": {"tasks": ["piqa"]}}))
    flat.write_text("gate_steps: 40\ngate_lambda: 0.3\nheal_steps: 5\nheal_train_norms: false\nremove_ratio: 0.2\ntasks: piqa\n")
    config = config_from_file(nested)
    assert config == config_from_file(flat)
    assert (config.gates.steps, config.heal.train_norms, config.target.remove, config.target.remove_ratio) == (40, False, None, 0.2)
    assert config.eval.tasks == ("piqa",) and config.eval.limit == 100  # the rest: compress's defaults
    args = build_parser().parse_args(["compress", "m", "--config", str(nested), "--gate-steps", "7", "--remove", "2",
                                      "--heal-lora-targets", "q_proj,v_proj", "--heal-train-norms", "--out", "o"])
    cli = read_config(args, config_from_file(args.config))
    assert (cli.gates.steps, cli.gates.lam, cli.heal.steps, cli.heal.train_norms) == (7, 0.3, 5, True)  # command line wins
    assert (cli.target.remove, cli.target.remove_ratio) == (2, None)  # a target given later replaces the file's
    assert cli.heal.target_modules == ("q_proj", "v_proj") and cli.loading.model == "m"
    saved = tmp_path / "saved.yaml"
    saved.write_text(yaml.safe_dump(to_mapping(cli)))
    assert config_from_file(saved) == cli  # the saved config.yaml reads back as the same config


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        ("heal: {stepz: 3}\n", "unknown setting 'heal.stepz'; did you mean 'heal.steps'?"),
        ("heal: 3\n", "setting 'heal' must be a mapping"),
        ("gates: {center: mean}\n", "unknown setting 'gates.center'"),  # sections take the field names, flat keys the flags'
        ("gate_center: middle\n", "setting 'gate_center' must be one of mean, target"),
        ("heal: {steps: 1.5}\n", "setting 'heal.steps' has an invalid value 1.5: give an integer"),
        ("gate_steps: null\n", "setting 'gate_steps' has an invalid value None"),
        ("gates: {steps: 0}\n", "gate training needs steps >= 1"),
        ("remove: 2\nremove_ratio: 0.5\n", "give exactly one target"),
        ("loading: {device_map: auto}\n", "unknown setting 'loading.device_map'"),
        ("probe: {seqlen: 8}\n", "unknown setting 'probe.seqlen'"),  # set by the pipeline (the heal's)
    ],
)
def test_config_errors_name_the_setting_as_it_was_written(tmp_path, content, phrase):
    from foldgpt.errors import FoldGPTError
    from foldgpt.workflows.compress import config_from_file

    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(FoldGPTError) as error:
        config_from_file(path)
    assert phrase in str(error.value) and f"config '{path}'" in str(error.value) and "\n" not in str(error.value)


def test_tasks_none_skips_the_zero_shot_tasks():
    from foldgpt.eval.config import EvalConfig

    assert EvalConfig(tasks=("none",)).tasks is None and EvalConfig(tasks=("piqa",)).tasks == ("piqa",)
