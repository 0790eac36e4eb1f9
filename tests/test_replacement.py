"""``--replace linear`` (ReplaceMe): a map fitted per removed span and folded into the carrier's MLP output projection."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from cli_helpers import assert_one_line_error, run_cli
from foldgpt.arch.adapters import adapter_for
from foldgpt.data.config import CalibrationConfig
from foldgpt.errors import FoldGPTError
from foldgpt.formats.blockwise import ResidentBlocks
from foldgpt.formats.loading import LoadedModel, load_model
from foldgpt.surgery.config import ReplacementConfig
from foldgpt.surgery.removal import count_parameters, remove_blocks
from foldgpt.surgery.replacement import Span, fold_into_mlp_output, removed_spans
from foldgpt.workflows.prune import prune
from foldgpt.workflows.prune_blockwise import prune_blockwise
from foldgpt.workflows.replace import carrier_weights, held_out_check, replace_removed
from tiny import DEPTH, identity_block_model, random_ids, save_tiny, tiny_model, tiny_tokenizer

FOLDABLE = ("llama", "mistral", "qwen2", "qwen3", "phi3", "opt", "gpt2", "gpt_neox")
LINEAR = ReplacementConfig("linear", nsamples=8, seqlen=24, check_tokens=0)


@pytest.fixture
def calibration(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 40)
    return CalibrationConfig(data=str(text), nsamples=6, seqlen=24)


def test_spans_are_the_runs_of_consecutive_blocks():
    assert removed_spans([7, 2, 3, 9, 8]) == [Span(2, 3), Span(7, 9)]
    assert [span.carrier for span in removed_spans([4, 1])] == [0, 3]


def block_parts(model, index, ids):
    """Block ``index``'s output and its MLP update for ``ids``."""
    adapter = adapter_for(model)
    block = adapter.layers(model)[index]
    seen = {}
    handles = [adapter.branch_update(block, "mlp").register_forward_hook(lambda m, i, o: seen.__setitem__("update", o)),
               block.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o[0] if isinstance(o, tuple) else o))]
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    return seen["out"], seen["update"].reshape(seen["out"].shape)


@pytest.mark.parametrize("family", FOLDABLE)
def test_the_fold_makes_the_carrier_add_its_update_times_the_map(family):
    """Weight and bias folded: the block's output becomes Y + M T, exactly (float64 reference)."""
    model = tiny_model(family).double()
    ids = random_ids()
    out, update = block_parts(model, 2, ids)
    transform = torch.randn(out.shape[-1], out.shape[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fold_into_mlp_output(adapter_for(model), adapter_for(model).layers(model)[2], transform)
    folded, _ = block_parts(model, 2, ids)
    assert torch.allclose(folded, out - update + update @ transform, atol=1e-9)


def test_a_span_that_adds_nothing_is_replaced_by_the_identity_and_the_logits_stay():
    """Blocks 2-3 add nothing to the stream, so L = Y + M: the fit must find T = I and change no logit."""
    model = identity_block_model([2, 3])
    ids = random_ids(batch=4, length=24)
    with torch.no_grad():
        dense = model(ids).logits
    report, _ = replace_removed(ResidentBlocks(model), ids, [2, 3], ReplacementConfig("linear", ridge=0.0))
    assert report["spans"][0]["fit_error"] < 1e-8
    down = adapter_for(model).mlp_output_layer(adapter_for(model).layers(model)[1])
    replaced_model = tiny_model("llama")
    assert torch.allclose(down.weight, adapter_for(replaced_model).mlp_output_layer(
        adapter_for(replaced_model).layers(replaced_model)[1]).weight, atol=1e-5)
    remove_blocks(model, [2, 3])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, dense, atol=1e-5)


def test_the_held_out_check_keeps_whichever_carrier_weights_score_lower(capsys):
    """Run twice with the roles of the fitted and the plain weights swapped: one run keeps the model's weights, the
    other puts back the ones it was given (and warns), and the model ends with the lower-scoring ones both times."""
    model = tiny_model("llama")
    layer = adapter_for(model).mlp_output_layer(adapter_for(model).layers(model)[1])
    plain = carrier_weights(model, [2, 3])
    replace_removed(ResidentBlocks(model), random_ids(batch=6, length=24), [2, 3], LINEAR)
    fitted = carrier_weights(model, [2, 3])
    windows = random_ids(batch=2, length=24, seed=5)
    first = held_out_check(model, [2, 3], plain, windows)  # the model holds the fitted maps
    assert torch.equal(layer.weight, (fitted if first["kept"] else plain)[1]["weight"])
    layer.load_state_dict(plain[1])
    second = held_out_check(model, [2, 3], fitted, windows)  # now it holds the plain weights as its "maps"
    assert second["perplexity_with_maps"] == pytest.approx(first["perplexity_without"])
    assert first["kept"] != second["kept"]
    assert torch.equal(layer.weight, (plain if second["kept"] else fitted)[1]["weight"])
    assert capsys.readouterr().err.count("made held-out perplexity worse") == 1


def test_prune_checks_the_maps_on_held_out_text_and_records_it(calibration, tmp_path):
    result = prune(LoadedModel(tiny_model("llama"), tiny_tokenizer(), "llama"), blocks=[2, 3], calibration=calibration,
                   replacement=ReplacementConfig("linear", nsamples=8, seqlen=24, check_tokens=240))
    check = result.metadata["replacement"]["check"]
    assert check["tokens"] == 240 and check["kept"] == (check["perplexity_with_maps"] <= check["perplexity_without"])


def test_the_fit_lowers_the_error_of_every_span_it_replaces():
    report, _ = replace_removed(ResidentBlocks(tiny_model("llama")), random_ids(batch=6, length=24), [1, 3, 4], LINEAR)
    assert [span["removed"] for span in report["spans"]] == [[1], [3, 4]]
    for span in report["spans"]:
        assert 0 <= span["fit_error"] < span["error_without"]


def test_the_cosine_objective_lowers_the_cosine_distance_the_least_squares_map_leaves():
    ids = random_ids(batch=6, length=24)
    cosine = ReplacementConfig("linear", objective="cosine", cosine_steps=50, cosine_lr=1e-3)
    spans = {name: replace_removed(ResidentBlocks(tiny_model("llama")), ids, [3, 4], config)[0]["spans"][0]
             for name, config in (("lstsq", LINEAR), ("cosine", cosine))}
    assert spans["cosine"]["cosine_distance"] < spans["lstsq"]["cosine_distance"] < spans["lstsq"]["cosine_distance_without"]


@pytest.mark.parametrize(("options", "phrase"), [({"replace": "cubic"}, "--replace"), ({"ridge": -1.0}, "--replace-ridge"),
                                                 ({"nsamples": 0}, "--replace-nsamples"), ({"seqlen": 1}, "--replace-seqlen"),
                                                 ({"objective": "l1"}, "--replace-objective"),
                                                 ({"cosine_lr": 0.0}, "--replace-cosine-lr")])
def test_bad_replacement_settings_get_one_line_errors(options, phrase):
    with pytest.raises(FoldGPTError, match=phrase):
        ReplacementConfig(**options)


@pytest.mark.parametrize("family", FOLDABLE)
def test_a_replaced_folder_reloads_to_the_same_logits_with_the_parameters_of_plain_removal(family, calibration, tmp_path):
    plain = prune(LoadedModel(tiny_model(family), tiny_tokenizer(), family), blocks=[2, 3])
    result = prune(LoadedModel(tiny_model(family), tiny_tokenizer(), family), blocks=[2, 3], calibration=calibration,
                   replacement=LINEAR, out=tmp_path / "out")
    ids = random_ids()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        expected, got, unreplaced = result.loaded.model(ids).logits, reloaded(ids).logits, plain.loaded.model(ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, unreplaced, atol=1e-3)  # the map changed the model
    assert count_parameters(reloaded) == count_parameters(plain.loaded.model)
    meta = json.loads((tmp_path / "out" / "foldgpt.json").read_text())
    assert meta["replacement"]["spans"][0]["removed"] == [2, 3]
    assert meta["replacement"]["spans"][0]["carrier_saved"] == 1
    assert meta["calibration"]["nsamples"] == calibration.nsamples


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_block_by_block_replacement_writes_the_model_the_in_memory_one_does(family, calibration, tmp_path):
    folder = save_tiny(tmp_path / "dense", family)
    memory = prune(load_model(str(folder)), "bi", remove=2, calibration=calibration, replacement=LINEAR, out=tmp_path / "m")
    meta = prune_blockwise(str(folder), "bi", remove=2, calibration=calibration, replacement=LINEAR, out=tmp_path / "b",
                           offload_dir=tmp_path / "scratch")
    assert meta["removed"] == memory.metadata["removed"]
    for ours, theirs in zip(meta["replacement"]["spans"], memory.metadata["replacement"]["spans"]):
        assert ours["fit_error"] == pytest.approx(theirs["fit_error"], rel=1e-5)
    ids = random_ids()
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / name).eval() for name in ("m", "b"))
    with torch.no_grad():
        assert torch.allclose(a(ids).logits, b(ids).logits, atol=1e-5)


@pytest.mark.parametrize(("family", "blocks", "phrase"), [
    ("gemma3", [2, 3], "post_feedforward_layernorm"),
    ("gemma2", [2], "Gemma2"),
    ("llama", [0, 1], "no kept block comes before them"),
])
def test_what_cannot_be_folded_is_refused_in_one_line_with_no_output(family, blocks, phrase, calibration, tmp_path):
    with pytest.raises(FoldGPTError, match=phrase):
        prune(LoadedModel(tiny_model(family), tiny_tokenizer(), family), blocks=blocks, calibration=calibration,
              replacement=LINEAR, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_zero_or_nan_fit_is_refused_with_no_output(calibration, tmp_path):
    zero = tiny_model("llama")
    with torch.no_grad():
        adapter_for(zero).mlp_output_layer(adapter_for(zero).layers(zero)[1]).weight.zero_()
    with pytest.raises(FoldGPTError, match="MLP output is zero"):
        prune(LoadedModel(zero, tiny_tokenizer(), "zero"), blocks=[2], calibration=calibration, replacement=LINEAR,
              out=tmp_path / "zero")
    broken = tiny_model("llama")
    with torch.no_grad():
        adapter_for(broken).mlp_output_layer(adapter_for(broken).layers(broken)[0]).weight[0, 0] = float("nan")
    with pytest.raises(FoldGPTError, match="not finite"):
        prune(LoadedModel(broken, tiny_tokenizer(), "nan"), blocks=[2], calibration=calibration, replacement=LINEAR,
              out=tmp_path / "nan")
    assert not (tmp_path / "zero").exists() and not (tmp_path / "nan").exists()


def test_the_cli_replaces_and_says_how_much_of_the_error_the_map_removed(calibration, tmp_path, capsys):
    folder = save_tiny(tmp_path / "dense")
    code, out, err = run_cli(capsys, "prune", folder, "--blocks", "2,3", "--replace", "linear", "--calibration",
                             calibration.data, "--nsamples", "4", "--seqlen", "24", "--replace-seqlen", "24",
                             "--replace-check-tokens", "0", "--out", tmp_path / "out")
    assert code == 0, err
    assert "blocks 2-3 replaced by a linear map in block 1's MLP output" in out
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_hidden_layers == DEPTH - 2
    with pytest.raises(SystemExit):
        run_cli(capsys, "prune", folder, "--blocks", "2,3", "--replace", "cubic", "--out", tmp_path / "x")
    assert "--replace: invalid choice: 'cubic'" in capsys.readouterr().err
    code, _, err = run_cli(capsys, "prune", folder, "--blocks", "0,1", "--replace", "linear", "--calibration",
                           calibration.data, "--seqlen", "24", "--out", tmp_path / "y")
    assert_one_line_error(code, err, "blocks 0-1", "no kept block")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
