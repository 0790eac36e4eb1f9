"""Grouped sharing, the compact format and the plain export: exact logits, real storage savings, clear errors."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from foldgpt.arch.adapters import adapter_for
from foldgpt.cli.main import main
from foldgpt.errors import FoldGPTError
from foldgpt.formats.compact import WEIGHTS_FILE
from foldgpt.formats.loading import LoadedModel, load_model
from foldgpt.formats.plain import export_plain, folder_weight_bytes
from foldgpt.surgery.removal import remove_blocks
from foldgpt.surgery.sharing import choose_parents, contiguous_groups, parse_groups
from foldgpt.workflows.fold import fold_model
from foldgpt.workflows.prune import prune
from tiny import DEPTH, FAMILIES, random_ids, tiny_model, tiny_tokenizer


def loaded_tiny(family: str = "llama", seed: int = 0) -> LoadedModel:
    return LoadedModel(model=tiny_model(family, seed), tokenizer=tiny_tokenizer(), source=f"tiny-{family}")


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def eager(model):
    """Models loaded from disk default to sdpa attention; the tiny reference models use eager (bitwise comparisons)."""
    model.set_attn_implementation("eager")
    return model.eval()


def test_children_use_the_parents_storage_and_an_optimiser_step_moves_the_whole_group():
    loaded = loaded_tiny()
    fold_model(loaded, group_size=3)
    layers = loaded.model.model.layers
    for child in (1, 2):
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
            assert layers[child].get_submodule(name).weight is layers[0].get_submodule(name).weight
        assert layers[child].input_layernorm.weight is not layers[0].input_layernorm.weight  # norms stay per position
        assert layers[child].self_attn.layer_idx == child  # each position keeps its own KV-cache slot
    assert layers[3].mlp.up_proj.weight is not layers[0].mlp.up_proj.weight  # another group

    before = layers[2].mlp.up_proj.weight.detach().clone()
    optimiser = torch.optim.SGD([layers[0].mlp.up_proj.weight], lr=0.1)
    loaded.model(random_ids()).logits.sum().backward()
    optimiser.step()
    assert not torch.equal(layers[2].mlp.up_proj.weight, before)
    assert torch.equal(layers[2].mlp.up_proj.weight, layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_compact_and_plain_folders_reload_to_the_folded_models_logits(family, tmp_path):
    loaded = loaded_tiny(family)
    fold_model(loaded, group_size=2, out=tmp_path / "compact")
    ids = random_ids()
    expected = logits(loaded.model, ids)

    compact = load_model(str(tmp_path / "compact"))
    eager(compact.model)
    assert torch.equal(logits(compact.model, ids), expected)
    adapter = adapter_for(compact.model)
    layers = adapter.layers(compact.model)
    for output_layer in (adapter.attention_output_layer, adapter.mlp_output_layer):
        assert output_layer(layers[1]).weight is output_layer(layers[0]).weight
        assert output_layer(layers[2]).weight is not output_layer(layers[0]).weight
        if output_layer(layers[0]).bias is not None:
            assert output_layer(layers[1]).bias is output_layer(layers[0]).bias
    for norm, parent_norm in zip(adapter.block_norms(layers[1]), adapter.block_norms(layers[0])):
        assert norm.weight is not parent_norm.weight

    export_plain(compact, tmp_path / "plain")
    vanilla = eager(AutoModelForCausalLM.from_pretrained(tmp_path / "plain"))
    assert torch.equal(logits(vanilla, ids), expected)
    assert not hasattr(vanilla.config, "foldgpt_sharing")
    assert vanilla.config.num_hidden_layers == DEPTH
    if hasattr(vanilla.config, "layer_types"):
        assert vanilla.config.layer_types == loaded.model.config.layer_types


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "opt"])
def test_greedy_generation_with_kv_cache_is_identical_across_folded_compact_and_plain(family, tmp_path):
    loaded = loaded_tiny(family)
    fold_model(loaded, group_size=2, out=tmp_path / "compact")
    compact = load_model(str(tmp_path / "compact"))
    eager(compact.model)
    export_plain(load_model(str(tmp_path / "compact")), tmp_path / "plain")
    vanilla = eager(AutoModelForCausalLM.from_pretrained(tmp_path / "plain"))
    prompt = random_ids(batch=1, length=6)
    settings = {"max_new_tokens": 20, "do_sample": False, "pad_token_id": 0}
    reference = loaded.model.generate(prompt, use_cache=True, **settings)
    assert torch.equal(loaded.model.generate(prompt, use_cache=False, **settings), reference)
    assert torch.equal(compact.model.generate(prompt, use_cache=True, **settings), reference)
    assert torch.equal(vanilla.generate(prompt, use_cache=True, **settings), reference)


@pytest.mark.parametrize(
    ("family", "variant"),
    [
        # OPT-350m's layout: each block normalises after its residual additions, no final norm, embeddings projected
        ("opt", {"do_layer_norm_before": False, "word_embed_proj_dim": 16}),
        ("gpt_neox", {"use_parallel_residual": False}),  # the MLP reads the attention's output, as in Llama
    ],
)
def test_family_variants_prune_fold_and_export_exactly(family, variant, tmp_path):
    config = FAMILIES[family]()
    for name, value in variant.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    loaded = LoadedModel(remove_blocks(model, [1, 3]), tiny_tokenizer(), f"tiny-{family}-variant")
    fold_model(loaded, group_size=2, out=tmp_path / "compact")
    ids = random_ids()
    expected = logits(loaded.model, ids)
    compact = load_model(str(tmp_path / "compact"))
    assert torch.equal(logits(eager(compact.model), ids), expected)
    export_plain(compact, tmp_path / "plain")
    vanilla = eager(AutoModelForCausalLM.from_pretrained(tmp_path / "plain"))
    assert torch.equal(logits(vanilla, ids), expected) and vanilla.config.num_hidden_layers == DEPTH - 2


def test_group_size_one_changes_nothing(tmp_path):
    reference = tiny_model("qwen3")
    loaded = loaded_tiny("qwen3")
    result = fold_model(loaded, group_size=1, out=tmp_path / "g1")
    ids = random_ids()
    assert torch.equal(logits(loaded.model, ids), logits(reference, ids))
    assert result.report.unique == result.report.materialised
    assert torch.equal(logits(eager(load_model(str(tmp_path / "g1")).model), ids), logits(reference, ids))


def test_gemma3_keeps_four_own_norms_per_block_and_its_layer_types(tmp_path):
    loaded = loaded_tiny("gemma3")
    with torch.no_grad():  # make every norm distinct, so a norm accidentally shared or reset would show
        for index, layer in enumerate(loaded.model.model.layers):
            for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
                getattr(layer, name).weight.fill_(0.1 * index)
    fold_model(loaded, groups="0-2,3-5", out=tmp_path / "compact")
    compact = load_model(str(tmp_path / "compact")).model
    layers = compact.model.layers
    for index in (1, 2, 4, 5):
        assert layers[index].self_attn.q_proj.weight is layers[index - 1 if index in (1, 4) else index - 2].self_attn.q_proj.weight
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
            norm = getattr(layers[index], name).weight
            assert torch.allclose(norm, torch.full_like(norm, 0.1 * index))
        assert layers[index].self_attn.q_norm.weight is not layers[0].self_attn.q_norm.weight
    assert compact.config.layer_types == loaded.model.config.layer_types


def test_compact_weights_are_within_two_percent_of_unique_parameter_bytes(tmp_path):
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config).eval()
    result = fold_model(LoadedModel(model, tiny_tokenizer(), "tiny"), group_size=4, out=tmp_path / "compact")
    unique_bytes = result.report.unique * 4
    size = folder_weight_bytes(tmp_path / "compact")
    assert unique_bytes <= size <= 1.02 * unique_bytes
    assert result.report.materialised > 2 * result.report.unique - model.model.embed_tokens.weight.numel() * 2
    reloaded = load_model(str(tmp_path / "compact")).model
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in reloaded.parameters()}
    assert sum(storages.values()) == unique_bytes  # nothing materialised per position in memory either
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight  # the tie survives


def test_saving_in_bfloat16_halves_the_weights_and_keeps_the_sharing(tmp_path):
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    code = main(["fold", str(folder), "--group-size", "2", "--dtype", "bfloat16", "--out", str(tmp_path / "bf16")])
    assert code == 0
    model = load_model(str(tmp_path / "bf16"), dtype="bfloat16").model
    assert model.dtype == torch.bfloat16
    assert model.model.layers[1].mlp.gate_proj.weight is model.model.layers[0].mlp.gate_proj.weight
    metadata = json.loads((tmp_path / "bf16" / "foldgpt.json").read_text())
    unique_bytes = metadata["parameters"]["unique"] * 2
    assert unique_bytes < folder_weight_bytes(tmp_path / "bf16") < unique_bytes + 8192  # + the safetensors header


def test_parent_rules_pick_first_middle_or_the_most_open_gate():
    groups = [[0, 1, 2], [3, 4]]
    assert choose_parents(groups, "first") == [0, 3]
    assert choose_parents(groups, "middle") == [1, 3]
    assert choose_parents(groups, "largest-gate", [0.2, 0.9, 0.5, 0.1, 0.3]) == [1, 4]
    with pytest.raises(FoldGPTError, match="prune --method gates"):
        choose_parents(groups, "largest-gate", None)


def test_largest_gate_parents_come_from_a_gates_pruned_folder(tmp_path):
    folder = tmp_path / "pruned"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    gates = [0.9, 0.1, 0.2, 0.8, 0.7, 0.95, 0.3, 0.6]  # an 8-block original with blocks 1 and 2 removed
    (folder / "foldgpt.json").write_text(json.dumps({"method": "gates", "scores": gates, "removed": [1, 2],
                                                     "num_blocks_before": 8}))
    result = fold_model(load_model(str(folder)), group_size=2, parent="largest-gate")
    # current blocks 0..5 are original 0,3,4,5,6,7 with gates 0.9,0.8,0.7,0.95,0.3,0.6
    assert result.metadata["parents"] == [0, 3, 5]


def test_group_specs_are_checked():
    assert contiguous_groups(5, 2) == [[0, 1], [2, 3], [4]]
    assert parse_groups("0-3,4-5,6", 7) == [[0, 1, 2, 3], [4, 5], [6]]
    for bad in ("0-3,5-6", "0-2,2-6", "0-3", "a-b", "3-0,4-6"):
        with pytest.raises(FoldGPTError):
            parse_groups(bad, 7)
    with pytest.raises(FoldGPTError, match="larger than the 6 blocks"):
        contiguous_groups(6, 7)
    with pytest.raises(FoldGPTError, match="out of range"):
        contiguous_groups(6, 0)


def test_a_folded_model_is_not_folded_again_or_pruned(tmp_path):
    loaded = loaded_tiny()
    fold_model(loaded, group_size=2)
    with pytest.raises(FoldGPTError, match="already folded"):
        fold_model(loaded, group_size=2)
    with pytest.raises(FoldGPTError, match="remove blocks first"):
        prune(loaded, method="last", remove=1)


def test_cli_fold_and_export_report_parameters_and_refuse_bad_input(capsys, tmp_path):
    folder = tmp_path / "tiny"
    tiny_model("mistral").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    assert main(["fold", str(folder), "--group-size", "3", "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "compression" in out and "0-2" in out
    metadata = json.loads((tmp_path / "c" / "foldgpt.json").read_text())
    assert metadata["parameters"]["unique"] < metadata["parameters"]["materialised"]
    assert [g["blocks"] for g in metadata["parameters"]["per_group"]] == [[0, 1, 2], [3, 4, 5]]
    assert (tmp_path / "c" / WEIGHTS_FILE).is_file() and not (tmp_path / "c" / "model.safetensors").exists()
    assert main(["export", str(tmp_path / "c"), "--plain", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "model.safetensors").is_file()

    for argv, phrase in (
        (["fold", str(folder), "--group-size", "9", "--out", str(tmp_path / "x")], "larger than the 6 blocks"),
        (["fold", str(folder), "--groups", "0-2,4-5", "--out", str(tmp_path / "x")], "contiguous ranges"),
        (["fold", str(tmp_path / "c"), "--group-size", "2", "--out", str(tmp_path / "x")], "already folded"),
        (["fold", str(folder), "--group-size", "2", "--parent", "largest-gate", "--out", str(tmp_path / "x")], "--method gates"),
        (["export", str(tmp_path / "c"), "--plain", str(tmp_path / "p")], "already exists"),
    ):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("foldgpt: error:") == 1 and phrase in err and "Traceback" not in err
        assert not (tmp_path / "x").exists()


def test_a_truncated_compact_weights_file_is_a_one_line_error(capsys, tmp_path):
    fold_model(loaded_tiny(), group_size=2, out=tmp_path / "c")
    weights = tmp_path / "c" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["eval", str(tmp_path / "c"), "--ppl", "wikitext2", "--max-tokens", "64"]) == 2
    err = capsys.readouterr().err
    assert "corrupt or truncated" in err and "Traceback" not in err
