"""Distillation healing: the loss goes down, only LoRA and norms train, shared tensors stay shared, resuming is exact,
and the saved compact folder loads back to the same logits."""

import copy
import json
import signal
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import foldgpt
from cli_helpers import run_cli
from foldgpt.arch.adapters import adapter_for
from foldgpt.cli.main import interrupt_on_sigterm
from foldgpt.errors import FoldGPTError
from foldgpt.formats.loading import LoadedModel
from foldgpt.healing import loop as healing
from foldgpt.healing.config import HealConfig
from foldgpt.healing.data import WindowSchedule, learning_rate
from foldgpt.healing.loop import heal
from foldgpt.healing.save import save_healed
from foldgpt.surgery.removal import remove_blocks
from foldgpt.surgery.sharing import contiguous_groups, fold
from foldgpt.train.lora import norm_parameters
from foldgpt.train.losses import tail_loss
from tiny import DEPTH, FAMILIES, random_ids, save_tiny, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "heal.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. " * 40)
    return path


def config(text_file, **overrides):
    """A tiny budget: 32-token windows, a high learning rate so a few steps show progress."""
    settings = dict(data=str(text_file), steps=8, seqlen=32, lr=1e-2, eval_windows=2, checkpoint_every=0, lm_weight=0.5)
    settings.update(overrides)
    return HealConfig(**settings)


def teacher_and_student(family="qwen3", folded=True):
    """The dense tiny model as the teacher; a copy with block 2 removed (and folded in groups of 2) as the student."""
    teacher = tiny_model(family)
    student = copy.deepcopy(teacher)
    remove_blocks(student, [2])
    if folded:
        fold(student, contiguous_groups(DEPTH - 1, 2), [0, 2, 4])
    tokenizer = tiny_tokenizer()
    return LoadedModel(student, tokenizer, "student"), LoadedModel(teacher, tokenizer, "teacher")


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_tiny_folded_model_heals_only_lora_and_norms_change_and_shared_tensors_stay_shared(text_file):
    student, teacher = teacher_and_student("qwen3")
    layers = student.model.model.layers
    norms = {id(p) for p in norm_parameters(student.model)}
    assert any(id(layers[0].self_attn.q_norm.weight) == i for i in norms)  # norms inside attention train too
    before = {name: p.detach().clone() for name, p in student.model.named_parameters(remove_duplicate=False)}
    base_norm_names = {name for name, p in student.model.named_parameters(remove_duplicate=False) if id(p) in norms}

    result = heal(student, teacher, config(text_file, steps=15, micro_batch=4))

    losses = [record["loss"] for record in result.history]
    assert len(losses) == 15 and sum(losses[-3:]) / 3 < 0.8 * losses[0]
    first, last = result.evals[0], result.evals[-1]
    assert last["kl"] < first["kl"] and last["tail"] < first["tail"] and last["ppl"] < first["ppl"]  # held-out windows
    base = result.loaded.model.get_base_model()
    after = dict(base.named_parameters(remove_duplicate=False))
    for name, value in before.items():
        lora_name = name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        current = after[name] if name in after else after[lora_name]
        if name in base_norm_names:
            assert not torch.equal(current, value), f"norm {name} did not train"
        else:
            assert torch.equal(current, value), f"frozen weight {name} changed"
    lora_b = [p for name, p in after.items() if "lora_B" in name]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    assert all("lora_" in name or name in base_norm_names for name, p in base.named_parameters() if p.requires_grad)
    blocks = base.model.layers
    for child, parent in ((1, 0), (3, 2)):
        assert blocks[child].self_attn.q_proj.base_layer.weight is blocks[parent].self_attn.q_proj.base_layer.weight
        assert blocks[child].mlp.down_proj.base_layer.weight is blocks[parent].mlp.down_proj.base_layer.weight
        # one adapter per position: the child's LoRA is its own tensor and learned its own delta
        child_b = blocks[child].self_attn.q_proj.lora_B["default"].weight
        assert child_b is not blocks[parent].self_attn.q_proj.lora_B["default"].weight
        assert not torch.equal(child_b, blocks[parent].self_attn.q_proj.lora_B["default"].weight)
        assert blocks[child].input_layernorm.weight is not blocks[parent].input_layernorm.weight


def test_healed_compact_folder_loads_back_to_the_same_logits_and_stores_shared_tensors_once(text_file, tmp_path):
    student, teacher = teacher_and_student("llama")
    result = heal(student, teacher, config(text_file, steps=3), out=tmp_path / "healed", plain=True)
    folder = tmp_path / "healed"
    assert (folder / "adapter" / "adapter_config.json").is_file()
    metadata = json.loads((folder / "foldgpt.json").read_text())
    assert metadata["stage"] == "heal" and metadata["steps_done"] == 3 and metadata["tokens_seen"] == 3 * 32
    assert not (tmp_path / "healed.checkpoint").exists()
    with safe_open(str(folder / "model.compact.safetensors"), framework="pt") as handle:
        stored = list(handle.keys())
    assert any("layers.0.self_attn.q_proj" in name for name in stored)
    assert not any("layers.1.self_attn.q_proj" in name for name in stored)  # the child's weight is the parent's
    assert any("layers.1.input_layernorm" in name for name in stored)  # its trained norm is its own
    ids = random_ids(length=20)
    loaded = foldgpt.load(str(folder))
    blocks = loaded.model.get_base_model().model.layers
    assert blocks[1].self_attn.q_proj.base_layer.weight is blocks[0].self_attn.q_proj.base_layer.weight
    torch.testing.assert_close(logits_of(loaded.model, ids), logits_of(result.loaded.model, ids), rtol=0, atol=0)
    plain = AutoModelForCausalLM.from_pretrained(folder / "plain")
    torch.testing.assert_close(logits_of(plain, ids), logits_of(loaded.model, ids), rtol=1e-4, atol=1e-4)
    assert plain.config.num_hidden_layers == DEPTH - 1


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_heals_with_lora_on_every_projection_and_its_folders_reload_to_the_same_logits(family, text_file, tmp_path):
    student, teacher = teacher_and_student(family)
    result = heal(student, teacher, config(text_file, steps=2, eval_windows=1))
    base = result.loaded.model.get_base_model()
    adapter = adapter_for(base)
    blocks = adapter.layers(base)
    adapted = {name.rsplit(".", 1)[-1] for name, module in blocks[1].named_modules() if hasattr(module, "lora_A")}
    assert adapted == set(adapter.lora_targets) and result.metadata["config"]["target_modules"] == list(adapter.lora_targets)
    child, parent = adapter.mlp_output_layer(blocks[1]), adapter.mlp_output_layer(blocks[0])
    assert child.base_layer.weight is parent.base_layer.weight  # the child adapts the parent's shared weight
    assert child.lora_B["default"].weight.abs().sum() > 0
    ids = random_ids(length=20)
    expected = logits_of(result.loaded.model, ids)
    reloaded = save_healed(result.loaded, tmp_path / "healed", result.metadata, plain=True).model
    reloaded.get_base_model().set_attn_implementation("eager")  # as the tiny models: bitwise comparable
    torch.testing.assert_close(logits_of(reloaded, ids), expected, rtol=0, atol=0)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "healed" / "plain", attn_implementation="eager")
    torch.testing.assert_close(logits_of(plain, ids), expected, rtol=1e-4, atol=1e-4)
    assert plain.config.num_hidden_layers == DEPTH - 1


def test_resume_after_an_interruption_gives_the_same_weights_as_an_uninterrupted_run(text_file, tmp_path):
    settings = config(text_file, steps=6, micro_batch=2, grad_accum=2, lora_dropout=0.1, schedule="linear", warmup_steps=2)
    student, teacher = teacher_and_student("gemma3")
    full = heal(student, teacher, settings)

    student, teacher = teacher_and_student("gemma3")
    first = heal(student, teacher, settings, checkpoint_dir=tmp_path / "ckpt", stop_after_steps=4)
    assert not first.completed and len(first.history) == 4
    student, teacher = teacher_and_student("gemma3")
    resumed = heal(student, teacher, settings, checkpoint_dir=tmp_path / "ckpt", resume=True)

    assert resumed.completed and [r["step"] for r in resumed.history] == list(range(1, 7))
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    full_params = dict(full.loaded.model.named_parameters())
    for name, parameter in resumed.loaded.model.named_parameters():
        assert torch.equal(parameter, full_params[name]), name
    assert resumed.metadata["resumed_from_step"] == 4


@pytest.fixture
def cli_sigterm():
    """SIGTERM mapped to KeyboardInterrupt as ``foldgpt.cli.main`` does (so without the deferral it interrupts at once,
    instead of killing the test process); the previous handler back afterwards."""
    previous = signal.getsignal(signal.SIGTERM)
    interrupt_on_sigterm()
    # Ctrl-C as Python sets it up in a terminal: a job started in the background of a shell inherits SIGINT ignored,
    # which healing rightly leaves alone, so the Ctrl-C case would not interrupt at all
    previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, previous)
    signal.signal(signal.SIGINT, previous_sigint)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_finishes_the_step_writes_a_checkpoint_and_resume_completes_the_same_run(
        text_file, tmp_path, monkeypatch, cli_sigterm, signum):
    settings = config(text_file, steps=4)
    student, teacher = teacher_and_student("llama")
    full = heal(student, teacher, settings)

    original = healing.train_step

    def step_then_signal(*args, **kwargs):
        record = original(*args, **kwargs)
        if record["step"] == 2:
            signal.raise_signal(signum)  # as if the user pressed Ctrl-C, or a scheduler sent SIGTERM, during step 2
        return record

    handler_before = signal.getsignal(signum)
    monkeypatch.setattr(healing, "train_step", step_then_signal)
    student, teacher = teacher_and_student("llama")
    with pytest.raises(KeyboardInterrupt):
        heal(student, teacher, settings, out=tmp_path / "healed")
    assert signal.getsignal(signal.SIGTERM) is cli_sigterm and signal.getsignal(signum) is handler_before  # restored
    assert not (tmp_path / "healed").exists()
    assert torch.load(tmp_path / "healed.checkpoint" / "checkpoint.pt", weights_only=False)["step"] == 2
    monkeypatch.setattr(healing, "train_step", original)
    student, teacher = teacher_and_student("llama")
    resumed = heal(student, teacher, settings, out=tmp_path / "healed", resume=True)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    assert (tmp_path / "healed" / "adapter").is_dir() and not (tmp_path / "healed.checkpoint").exists()


def test_resume_refuses_a_checkpoint_written_with_other_settings(text_file, tmp_path):
    student, teacher = teacher_and_student("llama", folded=False)
    heal(student, teacher, config(text_file, steps=4), checkpoint_dir=tmp_path / "ckpt", stop_after_steps=2)
    student, teacher = teacher_and_student("llama", folded=False)
    with pytest.raises(FoldGPTError, match="another config"):
        heal(student, teacher, config(text_file, steps=4, lr=5e-3), checkpoint_dir=tmp_path / "ckpt", resume=True)


def test_tail_loss_is_zero_when_student_and_teacher_are_the_same_model(text_file):
    model = tiny_model("gemma2")
    student = LoadedModel(model, tiny_tokenizer(), "same")
    teacher = LoadedModel(copy.deepcopy(model), tiny_tokenizer(), "same")
    result = heal(student, teacher, config(text_file, steps=1, tail_layers=3))
    assert result.evals[0]["tail"] == 0.0 and result.history[0]["tail"] == 0.0
    assert abs(result.history[0]["kl"]) < 1e-6
    hidden = torch.randn(2, 5, 8)
    assert tail_loss([hidden + 1], [hidden]).item() > 0


def test_teacher_cache_gives_the_same_training_as_on_the_fly_teacher(text_file, tmp_path):
    runs = []
    for cache in (None, tmp_path / "cache", tmp_path / "cache"):  # on the fly, cache filled, cache read
        student, teacher = teacher_and_student("llama", folded=False)
        runs.append(heal(student, teacher, config(text_file, steps=3, teacher_cache=str(cache) if cache else None)))
    assert runs[1].metadata["teacher_windows_computed"] > 0 and runs[2].metadata["teacher_windows_computed"] == 0
    # the cache stores float16 logits: the same run up to that rounding
    for run in runs[1:]:
        for a, b in zip(runs[0].history, run.history):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-2)
    assert [r["loss"] for r in runs[1].history] == [r["loss"] for r in runs[2].history]


def test_gradient_checkpointing_gives_the_same_losses_and_bf16_autocast_trains(text_file):
    runs = {}
    for name, overrides in {"plain": {}, "checkpointed": {"gradient_checkpointing": True}, "bf16": {"bf16": True}}.items():
        student, teacher = teacher_and_student("mistral", folded=False)
        runs[name] = [r["loss"] for r in heal(student, teacher, config(text_file, steps=3, **overrides)).history]
    assert runs["checkpointed"] == pytest.approx(runs["plain"], rel=1e-5)
    assert runs["bf16"] == pytest.approx(runs["plain"], rel=0.05)


def gpt2_pair(dropout: float) -> tuple[LoadedModel, LoadedModel]:
    """Student (block 2 removed) and teacher of the tiny GPT-2 with resid/embd/attn dropout ``dropout`` (the same
    weights for every ``dropout``)."""
    teacher = tiny_model("gpt2", resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    assert any(isinstance(m, torch.nn.Dropout) and m.p == dropout for m in teacher.modules())
    student = copy.deepcopy(teacher)
    remove_blocks(student, [2])
    return LoadedModel(student, tiny_tokenizer(), "student"), LoadedModel(teacher, tiny_tokenizer(), "teacher")


def test_healing_trains_with_the_base_model_dropout_off(text_file):
    losses = {}
    for name, dropout in (("dropout", 0.5), ("again", 0.5), ("none", 0.0)):
        result = heal(*gpt2_pair(dropout), config(text_file, steps=2))
        losses[name] = [r["loss"] for r in result.history]
        assert not any(m.training for m in result.loaded.model.modules())  # left in eval mode
    assert losses["dropout"] == losses["again"] == losses["none"]


def opt_pair(dropout: float) -> tuple[LoadedModel, LoadedModel]:
    """Student (block 2 removed) and teacher of the tiny OPT, whose layers apply ``config.dropout`` functionally
    (``F.dropout(training=self.training)``), the case activation checkpointing's ``layer.training = True`` would switch on."""
    teacher = tiny_model("opt", dropout=dropout)
    student = copy.deepcopy(teacher)
    remove_blocks(student, [2])
    return LoadedModel(student, tiny_tokenizer(), "student"), LoadedModel(teacher, tiny_tokenizer(), "teacher")


def test_checkpointed_healing_keeps_functional_dropout_off(text_file):
    settings = config(text_file, steps=2, gradient_checkpointing=True)
    losses = {dropout: [r["loss"] for r in heal(*opt_pair(dropout), settings).history] for dropout in (0.5, 0.0)}
    assert losses[0.5] == losses[0.0]
    student, _ = opt_pair(0.5)
    heal(student, opt_pair(0.5)[1], settings)
    assert all(layer.dropout == 0.5 for layer in student.model.model.decoder.layers)  # restored after training


def test_lora_dropout_still_applies_while_the_base_model_is_in_eval_mode(text_file, monkeypatch):
    original = healing.train_step
    modes: list[dict[str, tuple[type, bool]]] = []

    def recording_modes(model, *args, **kwargs):
        modes.append({name: (type(module), module.training) for name, module in model.named_modules()})
        return original(model, *args, **kwargs)

    monkeypatch.setattr(healing, "train_step", recording_modes)
    settings = config(text_file, steps=2, lora_dropout=0.5, gradient_checkpointing=True)
    with_lora_dropout = [r["loss"] for r in heal(*gpt2_pair(0.5), settings).history]
    layers = {f"base_model.model.transformer.h.{i}" for i in range(DEPTH - 1)}
    assert len(modes) == 2
    for step in modes:
        dropouts = {name: training for name, (kind, training) in step.items() if kind is torch.nn.Dropout}
        lora = {name for name in dropouts if ".lora_dropout." in name}
        assert lora and len(dropouts) > len(lora)  # the LoRA layers' dropout and GPT-2's own
        assert {name for name, training in dropouts.items() if training} == lora
        # everything else in eval mode, but the decoder layers keep activation checkpointing's flag
        assert {name for name, (_, training) in step.items() if training and ".lora_dropout" not in name} == layers
    monkeypatch.setattr(healing, "train_step", original)
    without = [r["loss"] for r in heal(*gpt2_pair(0.5), replace(settings, lora_dropout=0.0)).history]
    assert with_lora_dropout[0] == without[0]  # LoRA's B starts at zero: its dropout cannot matter in step 1
    assert with_lora_dropout[1] != without[1]


def test_nan_loss_stops_with_an_error_naming_the_step_and_the_loss(text_file):
    student, teacher = teacher_and_student("llama", folded=False)
    with torch.no_grad():
        student.model.model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(FoldGPTError, match=r"diverged at step 1/8: the loss is nan"):
        heal(student, teacher, config(text_file))


def test_learning_rate_schedule_and_window_order():
    settings = HealConfig(steps=10, warmup_steps=2, lr=1.0, schedule="cosine")
    rates = [learning_rate(step, settings) for step in range(1, 11)]
    assert rates[:3] == [0.5, 1.0, 1.0] and all(a >= b for a, b in zip(rates[1:], rates[2:])) and rates[-1] > 0
    schedule = WindowSchedule(5, seed=0)
    seen = [i for step in range(1, 6) for i in schedule.indices(step, 0, HealConfig(micro_batch=2))]
    assert sorted(seen[:5]) == list(range(5)) and sorted(seen[5:10]) == list(range(5))


def test_config_rejects_bad_values():
    with pytest.raises(FoldGPTError, match="all loss weights are 0"):
        HealConfig(kl_weight=0, tail_weight=0, lm_weight=0)
    with pytest.raises(FoldGPTError, match="schedule"):
        HealConfig(schedule="step")
    assert HealConfig(tokens=1000, seqlen=256, micro_batch=2).total_steps == 2


def test_cli_heal_writes_a_compact_folder(capsys, tmp_path, text_file):
    teacher = save_tiny(tmp_path / "teacher", "qwen2")
    pruned = tmp_path / "pruned"
    assert run_cli(capsys, "prune", teacher, "--method", "last", "--remove", 2, "--calibration", text_file,
                   "--seqlen", 32, "--nsamples", 2, "--out", pruned)[0] == 0
    code, out, err = run_cli(capsys, "heal", pruned, "--teacher", teacher, "--data", text_file, "--steps", 2, "--seqlen", 32,
                             "--eval-windows", 1, "--tail-layers", 2, "--lm-weight", 1, "--out", tmp_path / "healed")
    assert code == 0, err
    assert "healed 2 steps" in out and "perplexity" in out
    assert (tmp_path / "healed" / "adapter" / "adapter_config.json").is_file()
    metadata = json.loads((tmp_path / "healed" / "foldgpt.json").read_text())
    assert metadata["config"]["tail_layers"] == 2 and metadata["source_metadata"]["method"] == "last"


@pytest.mark.parametrize(
    ("extra", "phrase"),
    [
        (["--tail-layers", "99"], "--tail-layers 99"),
        (["--lora-targets", "nope_proj"], "nope_proj"),
        (["--kl-weight", "0", "--tail-weight", "0", "--lm-weight", "0"], "all loss weights are 0"),
        (["--resume"], "no checkpoint"),
    ],
)
def test_cli_heal_bad_input_is_one_line(capsys, tmp_path, text_file, extra, phrase):
    teacher = save_tiny(tmp_path / "teacher", "llama")
    code, _, err = run_cli(capsys, "heal", teacher, "--teacher", teacher, "--data", text_file, "--steps", 1, "--seqlen", 32,
                           "--out", tmp_path / "healed", *extra)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("foldgpt:")]
    assert len(lines) == 1 and lines[0].startswith("foldgpt: error: ") and phrase in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "healed").exists()


def test_cli_heal_missing_teacher_is_one_line(capsys, tmp_path, text_file):
    student = save_tiny(tmp_path / "student", "llama")
    code, _, err = run_cli(capsys, "heal", student, "--teacher", tmp_path / "nowhere", "--data", text_file, "--out", tmp_path / "o")
    assert code == 2 and "nowhere" in err and "Traceback" not in err
