"""Efficiency figures: parameter counts, disk size, FLOPs, prefill / decode timing and peak memory."""

import json

import pytest
import torch

import foldgpt
from foldgpt.cli.main import main
from foldgpt.eval.efficiency import decode_step_seconds, measure_efficiency
from foldgpt.formats.plain import folder_weight_bytes
from foldgpt.surgery.budget import model_flops_per_token
from foldgpt.surgery.removal import count_parameters
from tiny import save_tiny, tiny_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-qwen3", family="qwen3")


def test_figures_are_positive_and_consistent(tiny_folder):
    loaded = foldgpt.load_model(str(tiny_folder))
    report = measure_efficiency(loaded.model, loaded.source, prefill_tokens=48, decode_tokens=5, repeats=1)
    assert report.parameters_total == report.parameters_unique == count_parameters(loaded.model)
    assert report.disk_bytes == folder_weight_bytes(tiny_folder) > 0
    assert report.flops_per_token == model_flops_per_token(loaded.model, 2048) > 0
    assert report.prefill_tokens == 48 and report.decode_tokens == 5
    for value in (report.prefill_latency_s, report.prefill_tokens_per_s, report.decode_latency_s, report.decode_tokens_per_s):
        assert value > 0
    assert report.prefill_tokens_per_s == pytest.approx(48 / report.prefill_latency_s)
    assert report.device == "cpu" and report.peak_memory_bytes > 0


def test_decode_runs_one_cached_forward_per_new_token():
    model = tiny_model("llama")
    lengths = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    times = decode_step_seconds(model, torch.randint(3, 100, (1, 20)), 7, torch.device("cpu"))
    handle.remove()
    assert len(times) == 7 and lengths == [20] + [1] * 7  # one prefill, then one token per step through the KV cache
    report = measure_efficiency(model, prefill_tokens=20, decode_tokens=7, repeats=2)
    assert report.decode_tokens == 7 and report.disk_bytes is None


def test_a_folded_model_has_fewer_unique_than_total_parameters(tiny_folder, tmp_path):
    folded = foldgpt.fold_model(foldgpt.load_model(str(tiny_folder)), group_size=2, out=tmp_path / "folded")
    loaded = foldgpt.load_model(str(tmp_path / "folded"))
    report = measure_efficiency(loaded.model, loaded.source, prefill_tokens=16, decode_tokens=2, repeats=1)
    assert report.parameters_unique < report.parameters_total
    assert (report.parameters_unique, report.parameters_total) == (folded.report.unique, folded.report.materialised)
    assert report.disk_bytes == folder_weight_bytes(tmp_path / "folded")


def test_cli_efficiency_alone_writes_json_without_perplexity(capsys, tiny_folder, tmp_path):
    out = tmp_path / "eff.json"
    code = main(["eval", str(tiny_folder), "--efficiency", "--prefill-tokens", "32", "--decode-tokens", "4", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0 and "decode 4 tokens" in stdout and "parameters" in stdout
    result = json.loads(out.read_text())
    assert result["perplexity"] == {} and "tasks" not in result
    assert result["efficiency"]["decode_tokens"] == 4 and result["efficiency"]["prefill_tokens"] == 32
    assert result["efficiency"]["parameters_unique"] <= result["efficiency"]["parameters_total"]


def test_a_peft_wrapped_model_counts_its_adapter():
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    model = tiny_model("llama")
    plain = count_parameters(model)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).eval()
    lora = sum(p.numel() for name, p in wrapped.named_parameters() if "lora_" in name)
    report = measure_efficiency(wrapped, prefill_tokens=16, decode_tokens=3, repeats=1)
    assert lora > 0 and report.parameters_total == report.parameters_unique == plain + lora
    assert report.decode_tokens == 3 and report.flops_per_token > model_flops_per_token(tiny_model("llama"), 2048)
