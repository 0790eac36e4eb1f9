"""Sub-layer gates (--granularity sublayer): one gate on each attention and each MLP update; removing a single branch
is exact, saves as a vanilla folder with zeroed output projections, and loads back through foldgpt.load without the
branch's weights."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import foldgpt
from foldgpt.arch.adapters import adapter_for
from foldgpt.cli.main import main
from foldgpt.errors import FoldGPTError
from foldgpt.formats.loading import LoadedModel
from foldgpt.selection.config import GateConfig
from foldgpt.selection.gates import (
    GateTrainingResult,
    gated,
    next_lambda,
    selection_from_sublayer_gates,
    sublayer_flops_weights,
    train_gates,
)
from foldgpt.surgery.budget import RemovalTarget, branch_parameters, sublayer_budget
from foldgpt.surgery.removal import count_parameters, remove_blocks
from foldgpt.surgery.sublayers import REMOVED_SUBLAYERS_KEY as CONFIG_KEY
from foldgpt.surgery.sublayers import ZeroBranch, drop_removed_sublayers, zero_branch_output
from tiny import DEPTH, FAMILIES, random_ids, save_tiny, tiny_model, tiny_tokenizer

# t = 1.5: with t = 1 a gate above the mean feels only the regulariser's coupling term, and with the unequal FLOPs
# weights of attentions and MLPs a gate that gets no signal from the KL (an identity branch) can land above the mean in
# the first steps and then drift open; t > 1 gives every gate a net pull towards 0
FAST = GateConfig(restarts=1, steps=30, lr=0.1, lam=0.2, t=1.5)
BRANCH_INDEX = {"attention": 0, "mlp": 1}


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def zeroed_model(family, branches):
    """A tiny model whose listed (block, branch) sub-layers add exactly nothing (zeroed output projections)."""
    model = tiny_model(family)
    for block, branch in branches:
        zero_branch_output(model, block, branch)
    return model


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 40)
    return path


def calibration(text_file, nsamples=8, seqlen=16):
    return foldgpt.CalibrationConfig(data=str(text_file), nsamples=nsamples, seqlen=seqlen)


def test_identity_sublayers_close_and_exactly_those_are_removed(text_file, tmp_path):
    # attention of block 1, MLP of block 3, and both branches of block 4 add nothing: their gates get no gradient from
    # the KL and the regulariser closes them; block 4 then goes as a block, the other two as single branches
    identity = [(1, "attention"), (3, "mlp"), (4, "attention"), (4, "mlp")]
    model = zeroed_model("llama", identity)
    ids = random_ids(batch=2, length=12)
    before = logits_of(model, ids)
    result = foldgpt.prune(LoadedModel(model, tiny_tokenizer(), "tiny"), "gates", remove=4, calibration=calibration(text_file),
                           gate_config=FAST, granularity="sublayer", out=tmp_path / "out")
    gates = result.selection.details["final_gates"]
    closed = {2 * block + BRANCH_INDEX[branch] for block, branch in identity}
    assert max(gates[i] for i in closed) < 0.05, gates
    assert min(gates[i] for i in range(2 * DEPTH) if i not in closed) > 0.3, gates
    assert result.selection.removed == [4]
    assert result.selection.removed_sublayers == {"attention": [1], "mlp": [3]}
    meta = json.loads((tmp_path / "out" / "foldgpt.json").read_text())
    assert meta["granularity"] == "sublayer" and meta["removed"] == [4] and meta["num_blocks_after"] == DEPTH - 1
    assert meta["removed_sublayers_saved"] == {"attention": [1], "mlp": [3]}  # block 4 went: numbering unchanged below it
    assert meta["details"]["closed_sublayers"] == {"attention": [1, 4], "mlp": [3, 4]}
    assert len(meta["details"]["gate_history"]) == FAST.steps and len(meta["details"]["gate_history"][0]) == 2 * DEPTH
    assert meta["details"]["gate_order"][:2] == ["0.attention", "0.mlp"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config[CONFIG_KEY] == {"attention": [1], "mlp": [3]} and config["num_hidden_layers"] == DEPTH - 1
    assert (tmp_path / "out" / "gates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the removed branches did nothing, so the pruned model is the dense one; in memory they hold no weights
    assert torch.allclose(logits_of(result.loaded.model, ids), before, atol=1e-5)
    assert isinstance(result.loaded.model.model.layers[1].self_attn, ZeroBranch)
    assert isinstance(result.loaded.model.model.layers[3].mlp, ZeroBranch)
    assert meta["parameters_after"] == count_parameters(result.loaded.model) < meta["parameters_after_plain"]
    reloaded = foldgpt.load(str(tmp_path / "out"))
    assert count_parameters(reloaded.model) == meta["parameters_after"]
    assert torch.allclose(logits_of(reloaded.model, ids), before, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("branch", ["attention", "mlp"])
def test_removing_one_sublayer_is_exact_and_loads_without_its_weights(family, branch, tmp_path):
    model = tiny_model(family)
    ids = random_ids(batch=2, length=10)
    with gated(model, "sublayer") as gates:
        with torch.no_grad():
            gates.values[2 * 2 + BRANCH_INDEX[branch]] = 0.0
        gated_logits = logits_of(model, ids)
    assert not torch.allclose(gated_logits, logits_of(model, ids), atol=1e-4)  # the branch mattered
    zero_branch_output(model, 2, branch)
    assert torch.allclose(logits_of(model, ids), gated_logits, atol=1e-5)
    setattr(model.config, CONFIG_KEY, {branch: [2]})
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    vanilla = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(logits_of(vanilla, ids), gated_logits, atol=1e-5)
    loaded = foldgpt.load(str(tmp_path)).model
    block = adapter_for(loaded).layers(loaded)[2]
    saved = branch_parameters(vanilla, adapter_for(vanilla).layers(vanilla)[2], branch)
    assert saved > 0 and count_parameters(loaded) == count_parameters(vanilla) - saved
    assert any(isinstance(m, ZeroBranch) for m in block.modules())
    assert torch.allclose(logits_of(loaded, ids), gated_logits, atol=1e-5)
    # generation with the KV cache: the weightless attention still counts the positions
    prompt = ids[:1, :6]
    expected = vanilla.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0), expected)


def test_a_block_with_both_gates_at_zero_is_the_block_removed():
    model = tiny_model("gemma2")
    ids = random_ids(batch=2, length=10)
    with gated(model, "sublayer") as gates:
        with torch.no_grad():
            gates.values[2 * 3] = gates.values[2 * 3 + 1] = 0.0
        closed = logits_of(model, ids)
    assert torch.allclose(closed, logits_of(remove_blocks(copy.deepcopy(model), [3]), ids), atol=1e-5)


def test_training_is_seeded_and_leaves_the_model_as_it_was():
    model = zeroed_model("llama", [(2, "mlp")])
    ids = random_ids(batch=8, length=16)
    before = logits_of(model, ids)
    config = GateConfig(restarts=1, steps=6, lr=0.1)
    first = train_gates(model, ids, config, 0, 1.0, granularity="sublayer")
    again = train_gates(model, ids, config, 0, 1.0, granularity="sublayer")
    other = train_gates(model, ids, config, 1, 1.0, granularity="sublayer")
    assert first.gate_history == again.gate_history and len(first.gates) == 2 * DEPTH
    assert first.gate_history != other.gate_history
    assert torch.equal(logits_of(model, ids), before)
    assert not any(m._forward_hooks for m in model.modules())


def test_flops_weights_are_each_branch_share():
    model = tiny_model("llama")
    weights = sublayer_flops_weights(model)
    attention, mlp = 32 * 32 * 2 + 32 * 16 * 2, 3 * 32 * 64
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert weights[:2].tolist() == pytest.approx([attention / (DEPTH * (attention + mlp)), mlp / (DEPTH * (attention + mlp))])
    opt = sublayer_flops_weights(tiny_model("opt"))  # OPT's MLP is fc1 + fc2 on the block; q, k, v, out all 32 x 32
    assert opt[:2].tolist() == pytest.approx([4 * 32 * 32 / (DEPTH * 8192), 2 * 32 * 64 / (DEPTH * 8192)])


def test_budget_targets_count_sublayers_or_their_cost():
    model = tiny_model("llama")
    costs, needed = sublayer_budget(model, RemovalTarget(remove=3))
    assert costs == [1.0] * 2 * DEPTH and needed == 3
    assert sublayer_budget(model, RemovalTarget(remove_ratio=0.25))[1] == 3  # of 12 sub-layers
    costs, needed = sublayer_budget(model, RemovalTarget(target_params=0.9))
    assert needed == pytest.approx(0.1 * count_parameters(model))
    assert costs[0] == branch_parameters(model, model.model.layers[0], "attention") < costs[1]
    with pytest.raises(FoldGPTError, match="counts sub-layers"):
        sublayer_budget(model, RemovalTarget(remove=2 * DEPTH))
    with pytest.raises(FoldGPTError, match="cannot be met by removing sub-layers"):
        sublayer_budget(model, RemovalTarget(target_params=0.05))


def test_selection_removes_the_fewest_sublayers_by_ascending_gate_until_the_budget_is_met():
    gates = [0.9, 0.1, 0.8, 0.05, 0.02, 0.3, 0.7, 0.6]  # attention 0, MLP 0, attention 1, ...
    costs = [1.0, 3.0, 1.0, 3.0, 1.0, 3.0, 1.0, 3.0]
    result = GateTrainingResult(gates, [gates], [0.0], [0.0], [0.0], [1.0], [0.125] * 8, FAST, "sublayer")
    selection = selection_from_sublayer_gates(result, costs, needed=5.0)  # 0.02 (1), 0.05 (3), 0.1 (3): 7 >= 5
    assert selection.details["closed_sublayers"] == {"attention": [2], "mlp": [0, 1]}
    assert selection.removed == [] and selection.removed_sublayers == {"attention": [2], "mlp": [0, 1]}
    both = selection_from_sublayer_gates(result, costs, needed=8.0)  # ... and 0.3 (MLP 2): block 2 goes whole
    assert both.removed == [2] and both.removed_sublayers == {"attention": [], "mlp": [0, 1]}
    with pytest.raises(FoldGPTError, match="every"):
        selection_from_sublayer_gates(result, costs, needed=sum(costs))


def test_budget_control_counts_costs():
    config = GateConfig(lam_growth=0.5)
    gates = torch.tensor([0.9, 0.1, 0.8, 0.2])
    costs = torch.tensor([1.0, 3.0, 1.0, 3.0])
    assert next_lambda(1.0, gates, 7.0, config, costs) == pytest.approx(1.5)  # closed cost 6 < 7
    assert next_lambda(1.0, gates, 6.0, config, costs) == 1.0
    assert next_lambda(1.0, gates, 3.0, config, costs) == pytest.approx(1 / 1.5)  # one of them could reopen


def test_target_params_prune_meets_the_budget_and_records_it(text_file):
    loaded = LoadedModel(tiny_model("qwen3"), tiny_tokenizer(), "tiny")
    result = foldgpt.prune(loaded, "gates", target_params=0.9, calibration=calibration(text_file, 2, 16),
                           gate_config=GateConfig(restarts=1, steps=4), granularity="sublayer")
    meta = result.metadata
    assert meta["parameters_after"] <= 0.9 * meta["parameters_before"]
    assert meta["parameters_after"] == count_parameters(loaded.model)
    assert meta["flops_per_token_after"] < meta["flops_per_token_before"]
    assert meta["details"]["removed_cost"] >= meta["details"]["needed_cost"]


def test_post_layernorm_opt_is_refused():
    model = tiny_model("opt")
    model.config.do_layer_norm_before = False
    with pytest.raises(FoldGPTError, match="post-LayerNorm OPT"), gated(model, "sublayer"):
        pass


def test_drop_is_a_no_op_without_the_config_key():
    model = tiny_model("llama")
    before = count_parameters(model)
    assert drop_removed_sublayers(model) is model and count_parameters(model) == before


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr()


def assert_one_line_error(code, captured, *phrases):
    assert code == 2
    lines = [line for line in captured.err.strip().splitlines() if line.startswith("foldgpt:")]
    assert len(lines) == 1 and lines[0].startswith("foldgpt: error: "), captured.err
    assert "Traceback" not in captured.err
    for phrase in phrases:
        assert phrase in lines[0]


def test_cli_sublayer_prune_and_one_line_errors(capsys, text_file, tmp_path):
    model = save_tiny(tmp_path / "tiny")
    common = ["--calibration", text_file, "--nsamples", 2, "--seqlen", 16]
    code, captured = run_cli(capsys, "prune", model, "--method", "bi", "--granularity", "sublayer", "--remove", 2, *common,
                             "--out", tmp_path / "bi")
    assert_one_line_error(code, captured, "--granularity sublayer needs --method gates")
    code, captured = run_cli(capsys, "prune", model, "--method", "gates", "--granularity", "sublayer", "--remove", 2 * DEPTH,
                             *common, "--out", tmp_path / "all")
    assert_one_line_error(code, captured, "counts sub-layers")
    code, captured = run_cli(capsys, "prune", model, "--method", "gates", "--granularity", "sublayer", "--target-params", 0.01,
                             *common, "--out", tmp_path / "small")
    assert_one_line_error(code, captured, "cannot be met by removing sub-layers")
    out = tmp_path / "sub"
    code, captured = run_cli(capsys, "prune", model, "--method", "gates", "--granularity", "sublayer", "--remove", 3,
                             "--gate-steps", 3, *common, "--out", out)
    assert code == 0 and "removed sub-layers of kept blocks" in captured.out
    meta = json.loads((out / "foldgpt.json").read_text())
    assert meta["sublayers_removed"] == 3
    if any(meta["removed_sublayers_saved"].values()):  # folding and re-pruning such a folder are refused
        code, captured = run_cli(capsys, "fold", out, "--group-size", 2, "--out", tmp_path / "folded")
        assert_one_line_error(code, captured, "removed attention/MLP sub-layers")
        code, captured = run_cli(capsys, "prune", out, "--method", "bi", "--remove", 1, *common, "--out", tmp_path / "again")
        assert_one_line_error(code, captured, "removed attention/MLP sub-layers")


def test_heal_fold_and_export_refuse_a_model_with_removed_sublayers(tmp_path):
    model = zeroed_model("llama", [(2, "mlp")])
    setattr(model.config, CONFIG_KEY, {"mlp": [2]})
    loaded = LoadedModel(drop_removed_sublayers(model), tiny_tokenizer(), "tiny")
    teacher = LoadedModel(tiny_model("llama"), tiny_tokenizer(), "tiny")
    with pytest.raises(FoldGPTError, match="healing is not supported"):
        foldgpt.heal(loaded, teacher)
    with pytest.raises(FoldGPTError, match="folding is not supported"):
        foldgpt.fold_model(loaded, group_size=2)
    with pytest.raises(FoldGPTError, match="exporting"):
        foldgpt.export_plain(loaded, tmp_path / "plain")
