"""Gated block removal: gates close on blocks that do nothing, the regulariser is the published formula, and
training leaves the model exactly as it found it."""

import copy
import math

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaMLP

from foldgpt.analysis.figures import plot_gate_history
from foldgpt.errors import FoldGPTError
from foldgpt.selection.config import METHOD_NAMES, GateConfig
from foldgpt.selection.gates import (
    block_flops_weights,
    closed_count_direction,
    ensemble_gates,
    gated,
    hard_removal_mask,
    next_lambda,
    polarization_regularizer,
    run_readout,
    select_by_gates,
    select_by_gates_with,
    target_center,
    train_gates,
)
from foldgpt.selection.registry import METHODS
from foldgpt.surgery.removal import remove_blocks
from foldgpt.train.lora import adapters_off, compensating_lora
from tiny import DEPTH, identity_block_model, random_ids, tiny_model

FAST = GateConfig(restarts=1, steps=30, lr=0.1, lam=0.2)  # on the tiny model the identity gates are 0 by step 10


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_gates_close_on_identity_blocks_and_those_blocks_are_removed():
    # an identity block's gate gets no gradient from the KL (scaling a zero update changes nothing), so only the
    # regulariser moves it: it must go to 0 while the gates of working blocks stay open
    model = identity_block_model([2, 4])
    selection = select_by_gates_with(FAST)(model, random_ids(batch=8, length=16), 2, 0)
    gates = selection.details["final_gates"]
    assert gates[2] < 0.2 and gates[4] < 0.2
    assert min(gates[i] for i in (0, 1, 3, 5)) > 0.5
    assert selection.removed == [2, 4]
    assert selection.scores == gates
    assert len(selection.details["gate_history"]) == FAST.steps == len(selection.details["loss_history"])
    assert selection.details["hyperparameters"]["lam"] == FAST.lam
    assert METHODS["gates"] is select_by_gates and "gates" in METHOD_NAMES
    assert set(METHODS) == set(METHOD_NAMES)  # the CLI's choices are the registry's methods


def test_polarization_regularizer_value_and_gradient_match_hand_computation():
    g, w, t = [1.0, 0.2, 0.7], [0.5, 0.3, 0.2], 1.2
    mean = sum(g) / 3
    expected = sum(wl * (t * abs(gl) - abs(gl - mean)) for gl, wl in zip(g, w))
    sign = [1.0 if gl > mean else -1.0 for gl in g]
    # d/dg_k: w_k t sign(g_k) - w_k sign(g_k - m) + (1/L) sum_l w_l sign(g_l - m), since dm/dg_k = 1/L
    coupling = sum(wl * sl for wl, sl in zip(w, sign)) / 3
    expected_grad = [wk * t * 1.0 - wk * sk + coupling for wk, sk in zip(w, sign)]

    gates = torch.tensor(g, dtype=torch.float64, requires_grad=True)
    value = polarization_regularizer(gates, torch.tensor(w, dtype=torch.float64), t)
    value.backward()
    assert value.item() == pytest.approx(expected, abs=1e-12)
    assert gates.grad.tolist() == pytest.approx(expected_grad, abs=1e-12)


def test_flops_weights_are_shares_of_linear_weights():
    model = tiny_model("llama")
    config = model.config
    bigger = config.__class__(**{**config.to_dict(), "intermediate_size": 2 * config.intermediate_size})
    model.model.layers[1].mlp = LlamaMLP(bigger)
    hidden, inter, heads, kv, head_dim = 32, 64, 4, 2, 8
    attention = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2  # q, o and k, v
    counts = [attention + 3 * hidden * inter] * DEPTH
    counts[1] = attention + 3 * hidden * 2 * inter
    weights = block_flops_weights(model)
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert weights.tolist() == pytest.approx([c / sum(counts) for c in counts], abs=1e-7)
    assert weights[1] > weights[0]


def test_training_is_seeded_and_leaves_the_model_as_it_was():
    model = identity_block_model([2, 4])
    model.model.embed_tokens.weight.requires_grad_(False)  # a mixed set of flags must come back as it was
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    ids = random_ids(batch=8, length=16)
    before = logits_of(model, ids)
    config = GateConfig(restarts=1, steps=6, lr=0.1)
    first = select_by_gates_with(config)(model, ids, 2, 0)
    again = select_by_gates_with(config)(model, ids, 2, 0)
    other_seed = select_by_gates_with(config)(model, ids, 2, 1)
    assert first.details["gate_history"] == again.details["gate_history"]
    assert first.removed == again.removed
    assert first.details["gate_history"] != other_seed.details["gate_history"]  # the seed orders the windows
    assert torch.equal(logits_of(model, ids), before)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.training
    assert all(not layer._forward_hooks for layer in model.model.layers)


def test_gated_hooks_scale_the_residual_update_and_are_removed_on_exit():
    model = tiny_model("llama")
    ids = random_ids(batch=2, length=8)
    before = logits_of(model, ids)
    with gated(model) as gates:
        with torch.no_grad():
            gates.values[3] = 0.0
        closed = logits_of(model, ids)
        with gates.bypassed():
            assert torch.equal(logits_of(model, ids), before)
    without_block = remove_blocks(copy.deepcopy(model), [3])  # gate 0 is exactly the model without the block
    assert torch.allclose(closed, logits_of(without_block, ids), atol=1e-5)
    assert torch.equal(logits_of(model, ids), before)


def test_nan_loss_raises_naming_the_step_and_restores_the_model():
    model = tiny_model("llama")
    flags = [p.requires_grad for p in model.parameters()]
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(FoldGPTError, match=r"step 1/5: the kl loss is nan"):
        train_gates(model, random_ids(batch=2, length=8), GateConfig(restarts=1, steps=5), seed=0)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(not layer._forward_hooks for layer in model.model.layers)


def test_losses_at_the_first_step():
    # at g = 1 the gated model is the teacher (KL 0); the LM loss is the model's own next-token cross-entropy
    model = tiny_model("llama")
    ids = random_ids(batch=4, length=12)
    kl = train_gates(model, ids, GateConfig(restarts=1, steps=1, micro_batch=4), seed=0)
    assert kl.distill_history[0] == pytest.approx(0.0, abs=1e-6)
    lm = train_gates(model, ids, GateConfig(restarts=1, steps=1, micro_batch=4, loss="lm"), seed=0)
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids, use_cache=False).loss.item()
    assert lm.distill_history[0] == pytest.approx(expected, rel=1e-5)


def test_gradient_accumulation_and_checkpointing_do_not_change_training():
    model = tiny_model("llama")
    ids = random_ids(batch=8, length=12)
    calls = []
    mlp = model.model.layers[3].mlp
    forward = mlp.forward
    mlp.forward = lambda x: calls.append(1) or forward(x)  # a forward hook would not see the recomputation
    reference = train_gates(model, ids, GateConfig(restarts=1, steps=3, micro_batch=2), seed=0)
    assert len(calls) == 3 * 2  # teacher + student per step
    accumulated = train_gates(model, ids, GateConfig(restarts=1, steps=3, grad_accum=2), seed=0)
    calls.clear()
    checkpointed = train_gates(model, ids, GateConfig(restarts=1, steps=3, micro_batch=2, gradient_checkpointing=True), seed=0)
    assert len(calls) == 3 * 3  # checkpointing recomputes the student's blocks in the backward pass
    for result in (accumulated, checkpointed):
        for got, want in zip(result.gate_history, reference.gate_history):
            assert got == pytest.approx(want, abs=1e-5)
    assert not model.is_activation_checkpointing
    assert not any(layer.training for layer in model.model.layers)
    assert not model.model.embed_tokens._forward_hooks


def test_gate_config_rejects_bad_values():
    with pytest.raises(FoldGPTError, match="unknown gate loss"):
        GateConfig(loss="mse")
    with pytest.raises(FoldGPTError, match="steps >= 1"):
        GateConfig(restarts=1, steps=0)


def test_target_center_splits_off_the_gates_the_removal_target_needs():
    gates = torch.tensor([0.9, 0.1, 0.8, 0.3, 0.95])
    assert target_center(gates, 2) == pytest.approx(0.55)  # between 0.3 (2nd smallest) and 0.8
    assert target_center(gates, 1) == pytest.approx(0.2)
    # costs: the gate at 0.3 costs 3, so a cost target of 2 already needs it, and 4 needs it too
    assert target_center(gates, 2, torch.tensor([1.0, 1.0, 1.0, 3.0, 1.0])) == pytest.approx(0.55)
    assert target_center(gates, 5, torch.tensor([1.0, 1.0, 1.0, 3.0, 1.0])) == pytest.approx(0.85)


def test_target_centered_regulariser_pushes_only_the_gates_below_the_split():
    # with t = 1 a gate above the center feels no pull (t - 1 = 0); below it the push is (t + 1) * w
    gates = torch.tensor([0.9, 0.1, 0.8, 0.3], requires_grad=True)
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4])
    polarization_regularizer(gates, weights, t=1.0, center=target_center(gates, 2)).backward()
    assert gates.grad.tolist() == pytest.approx([0.0, 0.4, 0.0, 0.8])


def test_target_centered_gates_close_on_identity_blocks():
    model = identity_block_model([2, 4])
    config = GateConfig(restarts=1, steps=30, lr=0.1, lam=0.2, polarization_center="target")
    selection = select_by_gates_with(config)(model, random_ids(batch=8, length=16), 2, 0)
    gates = selection.details["final_gates"]
    assert selection.removed == [2, 4], gates
    assert max(gates[2], gates[4]) < 0.05 and min(g for i, g in enumerate(gates) if i not in (2, 4)) > 0.5, gates


def test_plot_gate_history(tmp_path):
    path = tmp_path / "gates.png"
    plot_gate_history([[1.0, 0.9, 0.95], [0.9, 0.4, 1.0], [0.8, 0.0, 1.0]], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_budget_control_moves_lambda_towards_the_target():
    config = GateConfig(lam_growth=0.5)
    gates = torch.tensor([0.9, 0.1, 0.8, 0.95])  # one gate closed (below 0.5)
    assert next_lambda(1.0, gates, n_remove=2, config=config) == pytest.approx(1.5)
    assert next_lambda(1.0, gates, n_remove=1, config=config) == 1.0
    assert next_lambda(1.5, gates, n_remove=0, config=config) == pytest.approx(1.0)
    assert next_lambda(1.0, gates, n_remove=3, config=GateConfig(lam_growth=0.0)) == 1.0  # off
    assert next_lambda(1.0, gates, n_remove=None, config=config) == 1.0


def test_budget_control_damping_shrinks_the_step_after_each_reversal():
    # the controller multiplies lambda by (1 + growth) towards the target; each time it has to turn back (it
    # overshot) the growth is multiplied by lam_damping, so lambda settles instead of swinging for ever
    model = tiny_model("llama")
    config = GateConfig(restarts=1, steps=60, lr=0.1, lam=0.05, lam_growth=0.4, lam_damping=0.5)
    result = train_gates(model, random_ids(batch=4, length=16), config, seed=0, n_remove=2)
    lams = result.lambda_history
    steps = [math.log(b / a) for a, b in zip(lams, lams[1:]) if not math.isclose(a, b)]
    growth, reversals = config.lam_growth, 0
    for before, after in zip(steps, steps[1:]):
        if (before > 0) != (after > 0):
            growth *= config.lam_damping
            reversals += 1
        assert abs(after) == pytest.approx(math.log1p(growth)), (before, after)
    assert reversals >= 1, lams  # the test exercises a reversal
    with pytest.raises(FoldGPTError, match="lam_damping"):
        GateConfig(lam_damping=0.0)


def test_budget_control_closes_the_target_number_of_gates_on_a_real_block_stack():
    model = tiny_model("llama")
    config = GateConfig(restarts=1, steps=60, lr=0.1, lam=0.05, lam_growth=0.2)
    result = train_gates(model, random_ids(batch=4, length=16), config, seed=0, n_remove=2)
    closed_counts = [sum(g < config.closed_below for g in gates) for gates in result.gate_history]
    assert closed_counts[0] == 0 and 2 <= closed_counts[-1] <= 3, result.gates  # the controller may overshoot by one
    assert max(result.lambda_history) > 10 * config.lam


def test_hard_removal_mask_takes_the_smallest_gates_until_the_target():
    gates = torch.tensor([0.9, 0.1, 0.8, 0.3, 0.3])
    assert hard_removal_mask(gates, 2).tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]  # ties: the earlier gate
    assert hard_removal_mask(gates, 0).tolist() == [1.0] * 5
    # costs: the gate at 0.1 costs 3, so it alone meets a cost target of 2
    assert hard_removal_mask(gates, 2, torch.tensor([1.0, 3.0, 1.0, 1.0, 1.0])).tolist() == [1.0, 0.0, 1.0, 1.0, 1.0]


def test_a_hard_mask_runs_the_model_without_the_masked_blocks_and_passes_the_gradient_straight_through():
    # forward: exactly the model with the masked blocks removed, whatever the soft values are; backward: the
    # gradient the soft gates would get if they sat at the mask's 0s and 1s
    model = tiny_model("llama")
    ids = random_ids(batch=2, length=8)
    mask = torch.ones(DEPTH)
    mask[[1, 3]] = 0.0
    with gated(model) as gates:
        with torch.no_grad():
            gates.values.copy_(torch.linspace(0.2, 0.9, DEPTH))
        gates.hard_mask = mask
        hard_logits = model(input_ids=ids, use_cache=False).logits
        hard_logits.square().mean().backward()
        straight_through = gates.values.grad.clone()
        gates.hard_mask, gates.values.grad = None, None
        with torch.no_grad():
            gates.values.copy_(mask)
        model(input_ids=ids, use_cache=False).logits.square().mean().backward()
        assert torch.allclose(straight_through, gates.values.grad, atol=1e-6)
    assert torch.allclose(hard_logits.detach(), logits_of(remove_blocks(copy.deepcopy(model), [1, 3]), ids), atol=1e-5)


def test_hard_phase_holds_lambda_and_still_removes_identity_blocks():
    model = identity_block_model([2, 4])
    config = GateConfig(restarts=1, steps=40, hard_steps=10, lr=0.1, lam=0.2)
    result = train_gates(model, random_ids(batch=8, length=16), config, seed=0, n_remove=2)
    assert len(set(result.lambda_history[-config.hard_steps:])) == 1  # the mask holds the budget, not lambda
    assert len(set(result.lambda_history[:-config.hard_steps])) > 1
    assert sorted(sorted(range(DEPTH), key=lambda i: result.gates[i])[:2]) == [2, 4], result.gates
    with pytest.raises(FoldGPTError, match="hard_steps"):
        GateConfig(restarts=1, steps=10, hard_steps=11)


def test_sgd_gates_close_on_identity_blocks():
    model = identity_block_model([2, 4])
    config = GateConfig(restarts=1, steps=40, optimizer="sgd", lr=1.0, lam=0.2)
    result = train_gates(model, random_ids(batch=8, length=16), config, seed=0, n_remove=2)
    assert sorted(sorted(range(DEPTH), key=lambda i: result.gates[i])[:2]) == [2, 4], result.gates
    assert max(result.gates[2], result.gates[4]) < 0.2 < 0.5 < min(g for i, g in enumerate(result.gates) if i not in (2, 4))
    with pytest.raises(FoldGPTError, match="unknown gate optimizer"):
        GateConfig(optimizer="lion")


def test_ensemble_gates_average_each_runs_last_quarter_then_the_runs():
    run_a = [[1.0, 1.0], [0.9, 0.8], [0.1, 0.9], [0.3, 0.5], [0.2, 0.7], [0.0, 0.5], [0.4, 0.9], [0.6, 0.1]]
    run_b = [[1.0, 1.0], [0.5, 0.5], [0.2, 0.4], [0.8, 0.0]]
    # last quarter: run_a's last 2 steps -> [0.5, 0.5]; run_b's last step -> [0.8, 0.0]; mean -> [0.65, 0.25]
    assert ensemble_gates([run_a, run_b]) == pytest.approx([0.65, 0.25])
    assert ensemble_gates([[[0.3, 0.7]]]) == pytest.approx([0.3, 0.7])  # a one-step run is its own last quarter


def test_the_on_target_readout_averages_the_second_halfs_on_target_steps_else_the_last_quarter():
    history = [[1.0, 1.0], [0.2, 0.9], [0.9, 0.8], [0.1, 0.9], [0.3, 0.5], [0.2, 0.7], [0.0, 0.5], [0.6, 0.1]]
    flags = [False, True, False, False, True, True, False, False]  # step 1 is in the first half: not read
    assert run_readout(history, flags, "on-target", single=True) == pytest.approx([0.25, 0.6])
    assert run_readout(history, [False] * 8, "on-target", single=True) == pytest.approx([0.3, 0.3])  # last quarter
    assert run_readout(history, flags, "final", single=True) == [0.6, 0.1]
    assert ensemble_gates([history, history[:4]], [flags, [False, False, True, True]], "on-target") == pytest.approx(
        [(0.25 + 0.5) / 2, (0.6 + 0.85) / 2])
    with pytest.raises(FoldGPTError, match="unknown gate readout 'middle'"):
        GateConfig(readout="middle")


def test_a_run_records_when_exactly_the_target_was_closed_and_reads_its_gates_there():
    model = identity_block_model([2, 4])
    ids = random_ids(batch=8, length=16)
    config = GateConfig(steps=20, lr=0.1, lam=0.2, restarts=2, readout="on-target")
    result = train_gates(model, ids, config, seed=3, n_remove=2)
    assert len(result.on_target_history) == 2 * config.steps
    for gates, flag in zip(result.gate_history, result.on_target_history, strict=True):
        assert flag == (closed_count_direction(torch.tensor(gates), 2, config.closed_below) == 0)
    assert any(result.on_target_history[10:20]) and any(result.on_target_history[30:40])  # the identity gates close by step 10
    runs = [result.gate_history[:20], result.gate_history[20:]]
    flags = [result.on_target_history[:20], result.on_target_history[20:]]
    assert result.gates == pytest.approx(ensemble_gates(runs, flags, "on-target"))
    assert result.gates != pytest.approx(ensemble_gates(runs))
    assert select_by_gates_with(config)(model, ids, 2, 3).removed == [2, 4]


def test_restarts_are_runs_with_the_next_seeds_and_remove_by_their_ensemble():
    model = identity_block_model([2, 4])
    ids = random_ids(batch=8, length=16)
    config = GateConfig(steps=20, lr=0.1, lam=0.2, restarts=2)
    result = train_gates(model, ids, config, seed=3, n_remove=2)
    single = GateConfig(restarts=1, steps=20, lr=0.1, lam=0.2)
    runs = [train_gates(model, ids, single, seed=seed, n_remove=2) for seed in (3, 4)]
    assert result.restarts == 2 and len(result.gate_history) == len(result.lambda_history) == 2 * config.steps
    assert result.gate_history == runs[0].gate_history + runs[1].gate_history
    assert runs[0].gate_history != runs[1].gate_history
    assert result.gates == pytest.approx(ensemble_gates([run.gate_history for run in runs]))
    selection = select_by_gates_with(config)(model, ids, 2, 3)
    assert selection.removed == [2, 4] and selection.details["restarts"] == 2
    with pytest.raises(FoldGPTError, match="restarts >= 1"):
        GateConfig(restarts=0)


def test_heal_aware_gates_close_identity_blocks_and_leave_no_adapters_behind():
    model = identity_block_model([2, 4])
    ids = random_ids(batch=8, length=16)
    before, names = logits_of(model, ids), [name for name, _ in model.named_parameters()]
    flags = [p.requires_grad for p in model.parameters()]
    config = GateConfig(restarts=1, steps=30, lr=0.1, lam=0.2, lora_rank=4)
    result = train_gates(model, ids, config, seed=0, n_remove=2)
    assert max(result.gates[2], result.gates[4]) < 0.2 < 0.5 < min(g for i, g in enumerate(result.gates) if i not in (2, 4))
    assert result.distill_history != train_gates(model, ids, GateConfig(restarts=1, steps=30, lr=0.1, lam=0.2), 0, 2).distill_history
    assert torch.equal(logits_of(model, ids), before)
    assert [name for name, _ in model.named_parameters()] == names and "peft_config" not in vars(model)
    assert [p.requires_grad for p in model.parameters()] == flags
    with pytest.raises(FoldGPTError, match="lora_rank"):
        GateConfig(lora_rank=-1)


def test_compensating_adapters_change_the_student_but_not_the_teacher():
    model = tiny_model()
    ids = random_ids(batch=2, length=16)
    before, flags = logits_of(model, ids), [p.requires_grad for p in model.parameters()]
    with compensating_lora(model, rank=4, seed=0) as lora:
        adapters = [p for p in model.parameters() if p.requires_grad]
        assert adapters and all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)
        assert torch.equal(logits_of(model, ids), before)  # B starts at 0: the adapters start as no change
        with torch.no_grad():
            for parameter in adapters:
                parameter.add_(0.1)
        assert not torch.allclose(logits_of(model, ids), before)
        with adapters_off(lora):
            assert torch.equal(logits_of(model, ids), before)
    assert torch.equal(logits_of(model, ids), before)
    assert [p.requires_grad for p in model.parameters()] == flags
