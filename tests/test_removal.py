"""Removing blocks must give exactly the smaller model of the same architecture (docs/design.md, "Pitfalls known from peers")."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from foldgpt.arch.adapters import LINEAR_TYPES, adapter_for
from foldgpt.errors import FoldGPTError
from foldgpt.surgery.removal import blocks_removed_temporarily, blocks_to_remove_count, remove_blocks, validate_removed
from tiny import DEPTH, FAMILIES, random_ids, tiny_model

REMOVED = [1, 3]
KEPT = [i for i in range(DEPTH) if i not in REMOVED]


def fresh_smaller_model(original):
    """The reference: a model built from a config with the new depth, loaded with the kept blocks' weights."""
    config = copy.deepcopy(original.config)
    config.num_hidden_layers = len(KEPT)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in KEPT]
    reference = AutoModelForCausalLM.from_config(config).eval()
    prefix = adapter_for(original).layers_path + "."
    state = {}
    for name, tensor in original.state_dict().items():
        if name.startswith(prefix):
            index, suffix = name.removeprefix(prefix).split(".", 1)
            if int(index) not in KEPT:
                continue
            name = f"{prefix}{KEPT.index(int(index))}.{suffix}"
        state[name] = tensor
    reference.load_state_dict(state, strict=True)
    return reference


@pytest.mark.parametrize("family", list(FAMILIES))
def test_removal_equals_fresh_model_built_with_new_depth(family):
    original = tiny_model(family)
    reference = fresh_smaller_model(original)
    pruned = remove_blocks(original, REMOVED)
    ids = random_ids(length=20)  # longer than the sliding window (4)
    with torch.no_grad():
        assert torch.equal(pruned(ids).logits, reference(ids).logits)
    assert pruned.config.num_hidden_layers == len(KEPT)
    adapter = adapter_for(pruned)
    assert [adapter.attention_module(layer).layer_idx for layer in adapter.layers(pruned)] == list(range(len(KEPT)))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_adapter_names_the_parts_of_every_block(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    for index, block in enumerate(adapter.layers(model)):
        assert adapter.attention_module(block).layer_idx == index
        assert all(isinstance(norm, torch.nn.Module) for norm in adapter.block_norms(block))
        assert isinstance(adapter.attention_output_layer(block), LINEAR_TYPES)
        assert isinstance(adapter.mlp_output_layer(block), LINEAR_TYPES)
        linear_names = {name.rsplit(".", 1)[-1] for name, module in block.named_modules() if isinstance(module, LINEAR_TYPES)}
        assert linear_names == set(adapter.lora_targets)  # healing's default adapts every projection of the block


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2", "phi3", "opt", "gpt2", "gpt_neox"])
def test_greedy_generation_with_kv_cache_matches_fresh_model(family):
    original = tiny_model(family)
    reference = fresh_smaller_model(original)
    pruned = remove_blocks(original, REMOVED)
    prompt = random_ids(batch=1, length=6)
    settings = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    with_cache = pruned.generate(prompt, use_cache=True, **settings)
    without_cache = pruned.generate(prompt, use_cache=False, **settings)
    reference_tokens = reference.generate(prompt, use_cache=True, **settings)
    assert with_cache.shape[1] == prompt.shape[1] + 20
    assert torch.equal(with_cache, reference_tokens)
    assert torch.equal(with_cache, without_cache)


def test_gpt2_with_attention_scaled_by_block_position_is_refused():
    config = FAMILIES["gpt2"]()
    config.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(FoldGPTError, match="scale_attn_by_inverse_layer_idx=True"):
        adapter_for(config)


def test_gemma3_layer_types_follow_the_kept_blocks():
    model = tiny_model("gemma3")
    before = list(model.config.layer_types)
    remove_blocks(model, [2, 3])  # drops one full and one sliding layer
    assert model.config.layer_types == [before[i] for i in (0, 1, 4, 5)]
    attention_types = [layer.self_attn.layer_type for layer in model.model.layers]
    assert attention_types == model.config.layer_types


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_pruned_folder_reloads_with_vanilla_transformers_to_identical_logits(family, tmp_path):
    pruned = remove_blocks(tiny_model(family), REMOVED)
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, pruned(ids).logits)
    assert reloaded.config.num_hidden_layers == len(KEPT)
    assert getattr(reloaded.config, "layer_types", None) == getattr(pruned.config, "layer_types", None)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved.get("num_hidden_layers", saved.get("n_layer")) == len(KEPT)  # GPT-2 calls it n_layer


def test_temporary_removal_restores_the_model_exactly():
    model = tiny_model("gemma3")
    ids = random_ids()
    with torch.no_grad():
        before = model(ids).logits
        with blocks_removed_temporarily(model, [0, 4]):
            during = model(ids).logits
            assert model.config.num_hidden_layers == DEPTH - 2
        after = model(ids).logits
    assert not torch.allclose(before, during)
    assert torch.equal(before, after)
    assert model.config.num_hidden_layers == DEPTH
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(DEPTH))


@pytest.mark.parametrize("removed", [[0, 0], [6], [-1], list(range(DEPTH))])
def test_invalid_removed_sets_are_refused(removed):
    with pytest.raises(FoldGPTError):
        validate_removed(removed, DEPTH)


@pytest.mark.parametrize(
    ("remove", "ratio", "expected"),
    [(1, None, 1), (5, None, 5), (None, 0.5, 3), (None, 0.2, 1)],
)
def test_targets_convert_to_block_counts(remove, ratio, expected):
    assert blocks_to_remove_count(DEPTH, remove, ratio) == expected


@pytest.mark.parametrize(("remove", "ratio"), [(0, None), (6, None), (-1, None), (None, 0.0), (None, 1.0), (None, -0.3), (None, 0.01), (None, None), (2, 0.5)])
def test_out_of_range_targets_are_refused(remove, ratio):
    with pytest.raises(FoldGPTError):
        blocks_to_remove_count(DEPTH, remove, ratio)
