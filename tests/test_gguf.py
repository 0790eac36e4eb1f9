"""GGUF export: transformers' GGUF reader (the inverse of llama.cpp's converter) gives the folder's logits back, for a
tiny model of each exported family, after block removal and after folding; bad input is one line and writes nothing."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import gguf
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from foldgpt.cli.main import main
from foldgpt.core.manifest import file_sha256
from foldgpt.data.text import load_text
from foldgpt.data.windows import evaluation_windows, tokenize
from foldgpt.errors import FoldGPTError
from foldgpt.eval.perplexity import windows_perplexity
from foldgpt.formats.gguf_export import METADATA_KEY, export_gguf
from foldgpt.formats.loading import load_model
from foldgpt.workflows.compress import compress
from tiny import DEPTH, random_ids, tiny_model, tiny_tokenizer

BPE_VOCAB = 300
TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs."
SLIDING_GEMMA2 = ["sliding_attention", "full_attention"] * (DEPTH // 2)  # llama.cpp's fixed gemma2 pattern
SLIDING_GEMMA3 = ["sliding_attention"] * 5 + ["full_attention"]  # llama.cpp's fixed gemma3 pattern (DEPTH == 6)
# transformers' qwen2/qwen3 readers take no head_dim nor sliding window from the file, its gemma readers no query
# scale (llama.cpp uses 1/sqrt(head_dim)): the tiny models keep the defaults those readers assume
OVERRIDES = {
    "llama": {},
    "mistral": {},
    "qwen2": {"use_sliding_window": False, "layer_types": ["full_attention"] * DEPTH},
    "qwen3": {"head_dim": 128},
    "gemma2": {"layer_types": SLIDING_GEMMA2, "tie_word_embeddings": True, "head_dim": 256},
    "gemma3": {"layer_types": SLIDING_GEMMA3, "head_dim": 256},
}


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (what llama.cpp's gpt2 tokenizer model holds), trained on one sentence."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([TEXT] * 10, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<unk>")
    tokenizer.chat_template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    return tokenizer


def save_family(folder: Path, family: str) -> Path:
    tiny_model(family, vocab_size=BPE_VOCAB, **OVERRIDES[family]).save_pretrained(folder)
    bpe_tokenizer().save_pretrained(folder)
    return folder


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def read_back(folder: Path, path: Path):
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=str(path.resolve()), dtype=torch.float32).eval()


def ids() -> torch.Tensor:
    return random_ids(length=24) + 150  # the trained merges' ids, past the byte alphabet's


@pytest.mark.parametrize("family", list(OVERRIDES))
def test_transformers_reads_each_family_back_to_the_folders_logits(tmp_path, family):
    folder = save_family(tmp_path / family, family)
    reference = logits_of(load_model(str(folder)).model, ids())
    for kind, tolerance in (("f32", 1e-4), ("f16", 0.01)):
        out = export_gguf(load_model(str(folder)), tmp_path / f"{family}.{kind}.gguf", kind)
        got = logits_of(read_back(folder, out), ids())
        error = (got - reference).abs().max().item()
        assert error < tolerance * max(1.0, reference.abs().max().item()), (family, kind, error)


def test_removed_and_folded_models_export_with_the_kept_blocks_only(tmp_path, capsys):
    folder = save_family(tmp_path / "dense", "llama")
    assert main(["prune", str(folder), "--blocks", "1,3", "--out", str(tmp_path / "pruned")]) == 0
    assert main(["fold", str(tmp_path / "pruned"), "--group-size", "2", "--out", str(tmp_path / "folded")]) == 0
    assert main(["fold", str(tmp_path / "pruned"), "--ties", "4:5", "--tie-rank", "2", "--tie-fit-steps", "0",
                 "--out", str(tmp_path / "tied")]) == 0  # a tie's delta is merged into its position
    for name in ("pruned", "folded", "tied"):
        reference = logits_of(load_model(str(tmp_path / name)).model, ids())
        out = tmp_path / f"{name}.gguf"
        assert main(["export", str(tmp_path / name), "--gguf", str(out), "--type", "f32"]) == 0
        assert "GGUF" in capsys.readouterr().out
        reader = gguf.GGUFReader(out)
        assert int(reader.fields["llama.block_count"].parts[-1][0]) == DEPTH - 2
        assert not any(tensor.name.startswith(f"blk.{DEPTH - 2}.") for tensor in reader.tensors)
        assert torch.allclose(logits_of(read_back(tmp_path / "pruned", out), ids()), reference, atol=1e-4)
        manifest = json.loads(out.with_name(out.name + ".json").read_text())
        assert manifest["sha256"] == file_sha256(out) and manifest["num_blocks"] == DEPTH - 2
        embedded = json.loads(bytes(reader.fields[METADATA_KEY].parts[-1]).decode())
        source = embedded["source_metadata"]
        assert (source["removed"] if name == "pruned" else source["source_metadata"]["removed"]) == [1, 3]


def test_per_block_settings_tokenizer_and_chat_template_follow_the_kept_blocks(tmp_path):
    folder = save_family(tmp_path / "gemma3", "gemma3")
    out = export_gguf(load_model(str(folder)), tmp_path / "g.gguf", "q8_0")
    reader = gguf.GGUFReader(out)
    pattern = reader.fields["gemma3.attention.sliding_window_pattern"]
    assert [bool(pattern.parts[index][0]) for index in pattern.data] == [t == "sliding_attention" for t in SLIDING_GEMMA3]
    assert bytes(reader.fields["tokenizer.chat_template"].parts[-1]).decode().startswith("{% for m in messages %}")
    assert {tensor.tensor_type.name for tensor in reader.tensors} == {"Q8_0", "F32"}
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=str(out.resolve()))
    assert tokenizer(TEXT)["input_ids"] == bpe_tokenizer()(TEXT)["input_ids"]
    reference = logits_of(load_model(str(folder)).model, ids())
    got = logits_of(read_back(folder, out), ids())
    assert (got - reference).abs().max() < 0.1 * reference.abs().max()


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    opt = tmp_path / "opt"
    tiny_model("opt").save_pretrained(opt)
    tiny_tokenizer().save_pretrained(opt)
    char_level = tmp_path / "chars"
    tiny_model("llama").save_pretrained(char_level)
    tiny_tokenizer().save_pretrained(char_level)
    llama = save_family(tmp_path / "llama", "llama")
    gemma = tmp_path / "gemma2"
    tiny_model("gemma2", vocab_size=BPE_VOCAB, tie_word_embeddings=True, head_dim=256).save_pretrained(gemma)  # s,s,f
    bpe_tokenizer().save_pretrained(gemma)
    query_scale = tmp_path / "gemma3"
    tiny_model("gemma3", vocab_size=BPE_VOCAB, layer_types=SLIDING_GEMMA3).save_pretrained(query_scale)  # 256 vs 8
    bpe_tokenizer().save_pretrained(query_scale)
    out = tmp_path / "x.gguf"
    for argv, phrase in (
        (["export", str(opt), "--gguf", str(out)], "not 'opt'"),
        (["export", str(char_level), "--gguf", str(out)], "writes BPE tokenizers"),
        (["export", str(llama), "--gguf", str(out), "--type", "q4_k_m"], "invalid choice"),
        (["export", str(gemma), "--gguf", str(out)], "sliding-window blocks"),
        (["export", str(query_scale), "--gguf", str(out)], "scales queries"),
        (["export", str(llama)], "needs an output"),
    ):
        capsys.readouterr()
        with pytest.raises(SystemExit) if phrase == "invalid choice" else _no_raise():
            assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and phrase in err and "Traceback" not in err, err
        assert not out.exists() and not out.with_name(out.name + ".json").exists()
        assert not list(tmp_path.glob(".x.gguf.tmp-*"))
    with pytest.raises(FoldGPTError, match="unknown GGUF type 'q4_k'"):
        export_gguf(load_model(str(llama)), out, "q4_k")


class _no_raise:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed (README: 'llama.cpp'; pip install llama-cpp-python builds llama.cpp, minutes)")


def llama_cpp_runner(path: Path, n_ctx: int = 64):
    """llama.cpp on ``path`` with a float32 KV cache (its default f16 cache alone moves logits by ~1e-3, enough to
    flip a near-tied greedy choice of a random tiny model), every position's logits kept."""
    import llama_cpp  # noqa: PLC0415 (optional, compiled dependency)

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, verbose=False, logits_all=True,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, n_threads=1)


def llama_cpp_greedy(runner, prompt: list[int], count: int = 20) -> list[int]:
    """Up to ``count`` greedy tokens, ending with the end-of-sequence token as transformers' ``generate`` does."""
    tokens = []
    for token in runner.generate(prompt, temp=0.0, top_k=1):
        tokens.append(token)
        if len(tokens) == count or token == runner.token_eos():
            break
    return tokens


def llama_cpp_logits(runner, tokens: list[int]) -> torch.Tensor:
    runner.reset()
    runner.eval(tokens)
    return torch.tensor(runner.scores[: len(tokens)]).float()


def llama_cpp_perplexity(runner, windows: torch.Tensor) -> float:
    """exp(mean NLL) over ``windows`` as ``windows_perplexity`` computes it, with llama.cpp's logits."""
    total, count = 0.0, 0
    for window in windows:
        logits = llama_cpp_logits(runner, window.tolist())
        total += torch.nn.functional.cross_entropy(logits[:-1], window[1:], reduction="sum").item()
        count += len(window) - 1
    return math.exp(total / count)


@pytest.mark.llama_cpp
@needs_llama_cpp
@pytest.mark.parametrize("family", list(OVERRIDES))
def test_llama_cpp_runs_each_family_to_the_folders_logits_and_greedy_tokens(tmp_path, family):
    folder = save_family(tmp_path / family, family)
    out = export_gguf(load_model(str(folder)), tmp_path / f"{family}.gguf", "f32")
    runner = llama_cpp_runner(out)
    prompt = ids()[0, :8].tolist()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    reference = logits_of(model, torch.tensor([prompt]))[0]
    error = (llama_cpp_logits(runner, prompt) - reference).abs().max().item()
    tolerance = 1e-3 if family.startswith("gemma") else 1e-4  # ggml's GELU reads an f16 table; SiLU is exact
    assert error < tolerance * max(1.0, reference.abs().max().item()), (family, error)
    ours = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt):].tolist()
    runner.reset()
    assert llama_cpp_greedy(runner, prompt) == ours


@pytest.mark.llama_cpp
@pytest.mark.real_model
@needs_llama_cpp
def test_llama_cpp_runs_smollm2_with_six_blocks_removed_as_transformers_does(tmp_path):
    """f32: 20 greedy tokens equal; every type's perplexity on 8 x 512 WikiText-2 test windows within 1% of ours."""
    assert main(["prune", "smollm2-135m", "--method", "bi", "--remove", "6", "--nsamples", "8", "--seqlen", "256",
                 "--out", str(tmp_path / "p")]) == 0
    loaded = load_model(str(tmp_path / "p"))
    prompt = loaded.tokenizer("The capital of France is Paris, and the capital of Italy is")["input_ids"]
    ours = loaded.model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt):].tolist()
    windows = evaluation_windows(tokenize(loaded.tokenizer, load_text("wikitext2", "evaluation")), 512, 8 * 512)
    with torch.no_grad():
        reference = windows_perplexity(loaded.model, windows, progress=False)
    for kind in ("f32", "f16", "q8_0"):
        runner = llama_cpp_runner(export_gguf(loaded, tmp_path / f"p.{kind}.gguf", kind), n_ctx=512)
        if kind == "f32":
            assert llama_cpp_greedy(runner, prompt) == ours
        theirs = llama_cpp_perplexity(runner, windows)
        assert abs(theirs / reference - 1) < 0.01, (kind, theirs, reference)
    # 4 bits cost this small model a lot, so q4_0 is held to llama.cpp's own quantizer run on our f16 file
    ours_q4 = llama_cpp_perplexity(llama_cpp_runner(export_gguf(loaded, tmp_path / "p.q4_0.gguf", "q4_0"), 512), windows)
    theirs_q4 = llama_cpp_perplexity(llama_cpp_runner(llama_cpp_quantized(tmp_path / "p.f16.gguf", tmp_path / "l.gguf"),
                                                      512), windows)
    assert abs(ours_q4 / theirs_q4 - 1) < 0.01, (ours_q4, theirs_q4)


def llama_cpp_quantized(source: Path, out: Path) -> Path:
    """``source`` quantized to Q4_0 by llama.cpp itself (``llama-quantize``'s library call)."""
    import ctypes  # noqa: PLC0415

    import llama_cpp  # noqa: PLC0415 (optional, compiled dependency)

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out


@pytest.mark.real_model
def test_smollm2_with_six_blocks_removed_reads_back(tmp_path):
    assert main(["prune", "smollm2-135m", "--method", "bi", "--remove", "6", "--nsamples", "8", "--seqlen", "256",
                 "--out", str(tmp_path / "p")]) == 0
    reference_model = load_model(str(tmp_path / "p"))
    text = reference_model.tokenizer("The capital of France is Paris, and the capital of Italy is", return_tensors="pt")
    reference = logits_of(reference_model.model, text["input_ids"])
    out = export_gguf(reference_model, tmp_path / "p.gguf", "f32")
    assert torch.allclose(logits_of(read_back(tmp_path / "p", out), text["input_ids"]), reference, atol=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "p", gguf_file=str(out.resolve()))
    assert tokenizer("Hello, world! 123")["input_ids"] == reference_model.tokenizer("Hello, world! 123")["input_ids"]
    windows = evaluation_windows(tokenize(reference_model.tokenizer, load_text("wikitext2", "evaluation")), 256, 4 * 256)
    with torch.no_grad():
        dense = windows_perplexity(reference_model.model, windows, progress=False)
        half = windows_perplexity(read_back(tmp_path / "p", export_gguf(reference_model, tmp_path / "h.gguf", "f16")),
                                  windows, progress=False)
    assert abs(half / dense - 1) < 0.01, (dense, half)


def test_compress_exports_the_healed_model_as_its_last_stage_and_refuses_early(tmp_path, capsys):
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT * 40)
    folder = save_family(tmp_path / "llama", "llama")
    out = tmp_path / "run"
    compress(str(folder), out, method="gates", remove=2, gate_steps=3, calibration=str(text_file), nsamples=2, seqlen=32,
             group_size=2, heal_steps=2, heal_data=str(text_file), heal_seqlen=32, heal_eval_windows=1,
             ppl=[str(text_file)], eval_seqlen=64, max_tokens=256, tasks=None, efficiency=False, gate_probe_sets=0,
             gguf="f32")
    summary = json.loads((out / "summary.json").read_text())
    path = Path(summary["gguf"])
    assert path == out / "gguf" / "model.gguf" and not summary["stages"]["gguf"]["skipped"]
    reference = logits_of(load_model(summary["final_model"]).model, ids())
    assert torch.allclose(logits_of(read_back(out / "pruned", path), ids()), reference, atol=1e-4)
    assert main(["verify", str(out / "gguf")]) == 0

    char_level = tmp_path / "chars"
    tiny_model("llama").save_pretrained(char_level)
    tiny_tokenizer().save_pretrained(char_level)
    capsys.readouterr()
    assert main(["compress", str(char_level), "--out", str(tmp_path / "refused"), "--gguf", "f16"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "writes BPE tokenizers" in err
    assert not (tmp_path / "refused" / "dense").exists()
