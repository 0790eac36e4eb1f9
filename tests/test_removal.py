"""Removing blocks must give exactly the smaller model of the same architecture (DESIGN.md pitfalls)."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from foldgpt.errors import FoldGPTError
from foldgpt.models import adapter_for
from foldgpt.removal import blocks_removed_temporarily, blocks_to_remove_count, remove_blocks, validate_removed
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
    state = {}
    for name, tensor in original.state_dict().items():
        if ".layers." in name:
            prefix, rest = name.split(".layers.", 1)
            index, suffix = rest.split(".", 1)
            if int(index) not in KEPT:
                continue
            name = f"{prefix}.layers.{KEPT.index(int(index))}.{suffix}"
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
    layers = adapter_for(pruned).layers(pruned)
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(len(KEPT)))


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2"])
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


def test_gemma3_layer_types_follow_the_kept_blocks():
    model = tiny_model("gemma3")
    before = list(model.config.layer_types)
    remove_blocks(model, [2, 3])  # drops one full and one sliding layer
    assert model.config.layer_types == [before[i] for i in (0, 1, 4, 5)]
    attention_types = [layer.self_attn.layer_type for layer in model.model.layers]
    assert attention_types == model.config.layer_types


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_pruned_folder_reloads_with_vanilla_transformers_to_identical_logits(family, tmp_path):
    pruned = remove_blocks(tiny_model(family), REMOVED)
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, pruned(ids).logits)
    assert reloaded.config.num_hidden_layers == len(KEPT)
    assert getattr(reloaded.config, "layer_types", None) == getattr(pruned.config, "layer_types", None)


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
