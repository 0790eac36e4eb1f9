"""Parameter and FLOPs targets resolve to the right number of blocks."""

import pytest
import torch
from torch import nn

from foldgpt.errors import FoldGPTError
from foldgpt.selection.gates import block_flops_weights
from foldgpt.surgery.budget import RemovalTarget, block_flops_per_token, blocks_to_remove, model_flops_per_token
from foldgpt.surgery.removal import count_parameters
from tiny import DEPTH, tiny_model

# tiny Llama: hidden 32, 4 heads x 8, 2 kv heads x 8, intermediate 64, vocab 128, untied head
LINEAR_WEIGHTS_PER_BLOCK = 32 * 32 + 2 * (32 * 16) + 32 * 32 + 3 * (32 * 64)


def test_flops_per_token_match_a_hand_count():
    model = tiny_model("llama")
    assert block_flops_per_token(model, context=100) == [2 * LINEAR_WEIGHTS_PER_BLOCK + 4 * 100 * 32] * DEPTH
    assert model_flops_per_token(model, context=100) == DEPTH * (2 * LINEAR_WEIGHTS_PER_BLOCK + 4 * 100 * 32) + 2 * 128 * 32


@pytest.mark.parametrize(
    ("family", "linear_weights"),
    [
        ("gpt2", 32 * 3 * 32 + 32 * 32 + 2 * (32 * 64)),  # GPT-2's Conv1D layers: c_attn (fused q, k, v), c_proj, c_fc, c_proj
        ("phi3", 32 * 64 + 32 * 32 + 32 * 2 * 64 + 64 * 32),  # fused qkv_proj (4 + 2 * 2 heads of 8) and gate_up_proj
        ("opt", 4 * 32 * 32 + 2 * (32 * 64)),  # q, k, v, out_proj; fc1, fc2 on the block itself
    ],
)
def test_flops_count_every_projection_of_other_families(family, linear_weights):
    model = tiny_model(family)
    assert block_flops_per_token(model, context=100) == [2 * linear_weights + 4 * 100 * 32] * DEPTH
    assert block_flops_weights(model).tolist() == pytest.approx([1 / DEPTH] * DEPTH)  # the gates' FLOPs shares


@pytest.mark.parametrize("fraction", [0.95, 0.8, 0.6, 0.45])
def test_parameter_target_removes_the_fewest_blocks_that_meet_it(fraction):
    model = tiny_model("llama")
    total = count_parameters(model)
    block = count_parameters(model.model.layers[0])
    n = blocks_to_remove(model, RemovalTarget(target_params=fraction))
    assert total - n * block <= fraction * total < total - (n - 1) * block or n == 1


def test_flops_target_uses_flops_not_parameters():
    model = tiny_model("llama")
    n_flops = blocks_to_remove(model, RemovalTarget(target_flops=0.5, flops_context=100))
    per_block = block_flops_per_token(model, 100)[0]
    total = model_flops_per_token(model, 100)
    assert total - n_flops * per_block <= 0.5 * total < total - (n_flops - 1) * per_block


@pytest.mark.parametrize(
    "target",
    [RemovalTarget(target_params=1.0), RemovalTarget(target_params=0.0), RemovalTarget(target_flops=-0.5),
     RemovalTarget(target_params=0.01), RemovalTarget(), RemovalTarget(remove=2, target_params=0.5)],
)
def test_bad_targets_are_refused(target):
    with pytest.raises(FoldGPTError):
        blocks_to_remove(tiny_model("llama"), target)


def test_budget_targets_refuse_blocks_of_different_sizes():
    model = tiny_model("llama")
    model.model.layers[2].mlp.up_proj = nn.Linear(32, 128, bias=False)
    with pytest.raises(FoldGPTError, match="equal size"):
        blocks_to_remove(model, RemovalTarget(target_params=0.7))
    assert blocks_to_remove(model, RemovalTarget(remove=2)) == 2


def test_prune_meets_a_parameter_target(tmp_path):
    import foldgpt
    from foldgpt.formats.loading import LoadedModel
    from tiny import tiny_tokenizer

    loaded = LoadedModel(tiny_model("llama"), tiny_tokenizer(), "tiny")
    text = tmp_path / "t.txt"
    text.write_text("abcdefghij " * 50)
    calibration = foldgpt.CalibrationConfig(data=str(text), nsamples=2, seqlen=16)
    result = foldgpt.prune(loaded, "bi", target_params=0.7, calibration=calibration)
    meta = result.metadata
    assert meta["parameters_after"] <= 0.7 * meta["parameters_before"]
    assert meta["target"] == {"target_params": 0.7}
    assert meta["flops_per_token_after"] < meta["flops_per_token_before"]
    with torch.no_grad():
        assert torch.isfinite(loaded.model(torch.tensor([[5, 6, 7]])).logits).all()
