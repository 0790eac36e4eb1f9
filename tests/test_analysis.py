"""The redundancy statistics must equal a direct, token-by-token computation."""

import copy
import math

import pytest
import torch

from foldgpt.analysis.redundancy import redundancy_stats
from foldgpt.arch.adapters import adapter_for
from foldgpt.eval.perplexity import windows_perplexity
from foldgpt.selection.base import select_blocks_with
from foldgpt.selection.config import GateConfig
from foldgpt.selection.gates import select_by_gates_with
from foldgpt.selection.registry import METHODS, select_blocks
from foldgpt.surgery.removal import remove_blocks
from tiny import DEPTH, FAMILIES, identity_block_model, random_ids, tiny_model


def final_norm(model):
    """The normalisation after the last block: the model's one norm module outside the decoder blocks."""
    in_blocks = {id(m) for m in adapter_for(model).layers(model).modules()}
    (norm,) = [m for m in model.modules() if type(m).__name__.endswith("Norm") and id(m) not in in_blocks]
    return norm


def direct_block_states(model, ids):
    """Block inputs from output_hidden_states, and the last block's output from the final norm's input."""
    captured = {}
    handle = final_norm(model).register_forward_pre_hook(lambda module, args: captured.setdefault("last", args[0]))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    handle.remove()
    inputs = list(hidden[:DEPTH])
    outputs = list(hidden[1:DEPTH]) + [captured["last"]]
    return inputs, outputs


def cosine(a, b):
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_block_influence_and_similarity_equal_direct_computation(family):
    model = tiny_model(family)
    ids = random_ids(batch=3, length=10)
    stats = redundancy_stats(model, ids, batch_size=2)
    inputs, outputs = direct_block_states(model, ids)
    tokens = [(b, t) for b in range(ids.shape[0]) for t in range(ids.shape[1])]
    for i in range(DEPTH):
        expected_bi = 1 - sum(cosine(inputs[i][b, t], outputs[i][b, t]) for b, t in tokens) / len(tokens)
        assert stats.block_influence[i] == pytest.approx(expected_bi, abs=1e-5)
        for j in range(DEPTH):
            expected_s = sum(cosine(outputs[i][b, t], outputs[j][b, t]) for b, t in tokens) / len(tokens)
            assert stats.similarity[i][j] == pytest.approx(expected_s, abs=1e-5)
    residual = inputs + [outputs[-1]]
    for a, c in [(0, 1), (2, 5), (0, DEPTH)]:
        expected_d = sum(math.acos(max(-1.0, min(1.0, cosine(residual[a][b, -1], residual[c][b, -1])))) / math.pi for b in range(3)) / 3
        assert stats.angular_distance[a][c] == pytest.approx(expected_d, abs=1e-5)
    assert stats.tokens == ids.numel()


def test_identity_blocks_have_zero_influence_and_are_removed_first_by_bi():
    model = identity_block_model([2, 4])
    ids = random_ids(batch=2, length=16)
    stats = redundancy_stats(model, ids)
    assert stats.block_influence[2] == pytest.approx(0.0, abs=1e-6)
    assert stats.block_influence[4] == pytest.approx(0.0, abs=1e-6)
    assert min(stats.block_influence[i] for i in (0, 1, 3, 5)) > 1e-3
    assert select_blocks("bi", model, ids, 2).removed == [2, 4]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_method_runs_on_every_family_and_block_influence_finds_its_identity_blocks(family):
    model = identity_block_model([2, 4], family)  # zeroed attention and MLP output projections
    ids = random_ids(batch=2, length=16)
    influence = redundancy_stats(model, ids).block_influence
    assert influence[2] == pytest.approx(0.0, abs=1e-6) and influence[4] == pytest.approx(0.0, abs=1e-6)
    assert min(influence[i] for i in (0, 1, 3, 5)) > 1e-3
    for method in sorted(METHODS):
        if method == "gates":  # a few steps: this checks the gate hooks and FLOPs weights work, not where gates go
            selection = select_blocks_with(select_by_gates_with(GateConfig(restarts=1, steps=2)), method, model, ids, 2, 0)
        else:
            selection = select_blocks(method, model, ids, 2)
        assert len(selection.removed) == 2 and all(0 <= i < DEPTH for i in selection.removed), method
        if method == "bi":
            assert selection.removed == [2, 4]


def test_sleb_greedily_takes_the_removal_with_the_lowest_calibration_perplexity():
    model = tiny_model("llama")
    ids = random_ids(batch=2, length=16)
    selection = select_blocks("sleb", model, ids, 2)
    first_step = {}
    for candidate in range(DEPTH):
        first_step[candidate] = windows_perplexity(remove_blocks(copy.deepcopy(model), [candidate]), ids)
    best = min(first_step, key=first_step.get)
    assert selection.details["order"][0] == best
    assert selection.details["steps"][0]["calibration_perplexity"] == pytest.approx(first_step[best], rel=1e-6)
    second = selection.details["order"][1]
    second_ppl = windows_perplexity(remove_blocks(copy.deepcopy(model), [best, second]), ids)
    for other in set(range(DEPTH)) - {best, second}:
        assert second_ppl <= windows_perplexity(remove_blocks(copy.deepcopy(model), [best, other]), ids) + 1e-9
    assert selection.removed == sorted([best, second])


def test_angular_picks_the_span_of_identity_blocks():
    model = identity_block_model([3, 4])
    selection = select_blocks("angular", model, random_ids(batch=2, length=16), 2)
    assert selection.removed == [3, 4]
    assert selection.scores[3] == pytest.approx(0.0, abs=1e-3)


def test_last_and_random_baselines():
    model = tiny_model("llama")
    ids = random_ids()
    assert select_blocks("last", model, ids, 2).removed == [3, 4]
    first = select_blocks("random", model, ids, 3, seed=7).removed
    assert first == select_blocks("random", model, ids, 3, seed=7).removed
    assert len(set(first)) == 3 and all(0 <= i < DEPTH for i in first)
    draws = {tuple(select_blocks("random", model, ids, 3, seed=s).removed) for s in range(6)}
    assert len(draws) > 1
