"""GGUF files that llama.cpp (and Ollama, LM Studio) run: a removal result written the way llama.cpp's
``convert_hf_to_gguf.py`` writes the dense model, with the block count and every per-block setting cut to the kept
blocks (the step ``llama-quantize --prune-layers`` gets wrong, issue 25).

The tensor names come from the ``gguf`` package's ``TensorNameMap``, and the family conversions are the converter's
(the q/k row permutation of llama.cpp's llama architecture, Gemma's ``1 + w`` norms), which are exactly what
transformers' GGUF reader undoes, so ``from_pretrained(dir, gguf_file=...)`` gives the folder's logits back.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from foldgpt._version import __version__
from foldgpt.core.manifest import file_sha256, model_identity
from foldgpt.core.outputs import check_output_free, disk_full_error, read_metadata, write_json_atomic
from foldgpt.errors import FoldGPTError
from foldgpt.formats.config import GGUF_TYPES, GgufType
from foldgpt.formats.loading import LoadedModel
from foldgpt.formats.plain import merged_model

QUANT_TYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
}
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}
KEPT_AT_8_BITS = ("token_embd.weight", "output.weight")
"""With ``q4_0``, the embedding and the output head stay q8_0 (``llama-quantize`` keeps the head above 4 bits too)."""
METADATA_KEY = "foldgpt.metadata"
"""A GGUF key holding the export's ``foldgpt.json`` as JSON (readers ignore keys they do not know)."""


@dataclass(frozen=True)
class GgufFamily:
    """How one of our families is written: llama.cpp's architecture, and the converter's per-family weight changes."""

    arch: gguf.MODEL_ARCH
    permute_qk: bool = False
    """llama.cpp's llama architecture rotates interleaved pairs where HF rotates halves: q/k rows are permuted."""
    norm_offset: float = 0.0
    """Gemma's RMSNorm scales by ``1 + w``; llama.cpp's by the stored weight, so ``1`` is added to every norm."""
    swa_period: int | None = None
    """llama.cpp fixes Gemma's sliding-window layers (every block but each ``period``-th), whatever the file says."""


FAMILIES = {
    "llama": GgufFamily(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "mistral": GgufFamily(gguf.MODEL_ARCH.LLAMA, permute_qk=True),  # the converter writes Mistral as llama
    "qwen2": GgufFamily(gguf.MODEL_ARCH.QWEN2),
    "qwen3": GgufFamily(gguf.MODEL_ARCH.QWEN3),
    "gemma2": GgufFamily(gguf.MODEL_ARCH.GEMMA2, norm_offset=1.0, swa_period=2),
    "gemma3_text": GgufFamily(gguf.MODEL_ARCH.GEMMA3, norm_offset=1.0, swa_period=6),
}
REFUSED = ("phi3 (fused qkv and gate_up tensors not converted yet), gpt2 and gpt_neox (fused, biased attention not "
           "converted yet), opt (llama.cpp has no OPT architecture)")


def gguf_family(config: PretrainedConfig) -> GgufFamily:
    """The family's conversion, or a one-line refusal naming the families that export and why the others do not."""
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise FoldGPTError(f"GGUF export supports llama, mistral, qwen2, qwen3, gemma2 and gemma3, not "
                           f"'{config.model_type}'; refused: {REFUSED}; export it with 'foldgpt export --plain' instead")
    return family


def check_model_family(config: PretrainedConfig) -> GgufFamily:
    """What can be refused from the dense model's config alone (``compress --gguf`` checks it before any stage)."""
    family = gguf_family(config)
    rope_theta(config)
    check_gemma_constants(config, family)
    return family


def check_gguf_type(kind: str) -> GgufType:
    if kind not in GGUF_TYPES:
        raise FoldGPTError(f"unknown GGUF type '{kind}'; choose one of {', '.join(GGUF_TYPES)} (k-quants such as "
                           "q4_k_m: quantize the f16 file with llama-quantize)")
    return kind  # type: ignore[return-value]


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_theta(config: PretrainedConfig) -> float:
    """The RoPE base; a scaled RoPE (llama3, yarn, linear, ...) is refused: its llama.cpp keys are not written yet."""
    parameters = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in parameters:  # per layer type (Gemma 3): the global layers' base is rope.freq_base
        parameters = parameters["full_attention"]
    kind = parameters.get("rope_type", "default")
    if kind != "default":
        raise FoldGPTError(f"GGUF export does not write scaled RoPE ('{kind}') yet; only models with plain RoPE export")
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def layer_types(config: PretrainedConfig) -> list[str]:
    """The attention kind of each kept block (the removal result's config holds them already cut)."""
    types = getattr(config, "layer_types", None)
    return list(types) if types else ["full_attention"] * config.num_hidden_layers


def check_attention_pattern(config: PretrainedConfig, family: GgufFamily) -> None:
    """llama.cpp cannot be told which blocks use a sliding window for our families: refuse what it would run wrongly."""
    types = layer_types(config)
    if family.swa_period is None:
        window = getattr(config, "sliding_window", None)
        sliding = "sliding_attention" in types or (config.model_type == "mistral" and window is not None
                                                   and window < config.max_position_embeddings)
        if sliding:
            raise FoldGPTError(f"{config.model_type} with sliding-window attention cannot be exported to GGUF: llama.cpp's "
                               f"{family.arch.name.lower()} architecture attends to the full context in every block")
        return
    expected = ["full_attention" if index % family.swa_period == family.swa_period - 1 else "sliding_attention"
                for index in range(len(types))]
    if types != expected:
        raise FoldGPTError(f"{config.model_type}: llama.cpp fixes the sliding-window blocks (every block but each "
                           f"{family.swa_period}th), and the kept blocks' pattern differs; choose removed blocks that keep "
                           "the pattern, or use the folder with transformers")


def check_gemma_constants(config: PretrainedConfig, family: GgufFamily) -> None:
    """llama.cpp hardcodes what Gemma's configs may vary: the sliding layers' RoPE base (10000) and the query scale
    1/sqrt(head_dim) (but for the 27B models it recognises by their block count, which removal changes)."""
    if family.swa_period is None:
        return
    local = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention", {}).get("rope_theta", 10000.0)
    if float(local) != 10000.0:
        raise FoldGPTError(f"{config.model_type}: llama.cpp fixes the sliding blocks' RoPE base at 10000, this model "
                           f"uses {local}; it cannot be exported to GGUF")
    if getattr(config, "query_pre_attn_scalar", head_dim(config)) != head_dim(config):
        raise FoldGPTError(f"{config.model_type}: llama.cpp scales queries by 1/sqrt(head_dim) for pruned models, this "
                           f"one by 1/sqrt({config.query_pre_attn_scalar}); it cannot be exported to GGUF")


def permute_rows(weights: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf's ``LlamaModel.permute``: HF's half-split rotary layout to llama.cpp's interleaved pairs."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def gguf_tensors(model: PreTrainedModel, family: GgufFamily) -> Iterator[tuple[str, np.ndarray]]:
    """Every weight as (llama.cpp name, float32 array), converted as llama.cpp's converter converts it."""
    config = model.config
    names = gguf.get_tensor_name_map(family.arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise FoldGPTError(f"GGUF export has no llama.cpp name for tensor '{name}' of {config.model_type}; "
                               "report it with the model's config.json")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if family.permute_qk and ".attn_q." in target:
            data = permute_rows(data, config.num_attention_heads)
        elif family.permute_qk and ".attn_k." in target:
            data = permute_rows(data, config.num_key_value_heads)
        if family.norm_offset and target.endswith("norm.weight"):
            data = data + family.norm_offset
        yield target, data


def check_tensor_names(model: PreTrainedModel, family: GgufFamily) -> None:
    """Refuse, before anything is written, a weight llama.cpp's architecture has no place for (e.g. an untied Gemma 2
    output layer: llama.cpp's gemma2 always reuses the embedding)."""
    names = gguf.get_tensor_name_map(family.arch, model.config.num_hidden_layers)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name in model.state_dict():
        if not (tied and name == "lm_head.weight") and names.get_name(name, try_suffixes=(".weight", ".bias")) is None:
            raise FoldGPTError(f"llama.cpp's {family.arch.name.lower()} architecture has no tensor for '{name}' of this "
                               f"{model.config.model_type} model (an untied output layer?), so it cannot be exported to GGUF")


def tensor_type(name: str, data: np.ndarray, kind: GgufType) -> gguf.GGMLQuantizationType:
    """convert_hf_to_gguf's choice: vectors (norms, biases) stay float32, a row that the blocks do not divide is f16;
    with ``q4_0`` the embedding and head are q8_0."""
    if data.ndim <= 1 or kind == "f32":
        return gguf.GGMLQuantizationType.F32
    quant = QUANT_TYPES["q8_0" if kind == "q4_0" and name in KEPT_AT_8_BITS else kind]
    block, _ = gguf.GGML_QUANT_SIZES[quant]
    return quant if data.shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def add_hyperparameters(writer: gguf.GGUFWriter, config: PretrainedConfig, family: GgufFamily) -> None:
    """The architecture's keys, as the converter writes them, for the kept blocks only."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_vocab_size(config.vocab_size)
    dim = head_dim(config)
    writer.add_rope_dimension_count(dim)
    if dim != config.hidden_size // config.num_attention_heads or family.swa_period:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    if family.swa_period:
        writer.add_sliding_window(config.sliding_window)
        writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in layer_types(config)])
        for key, add in (("attn_logit_softcapping", writer.add_attn_logit_softcapping),
                         ("final_logit_softcapping", writer.add_final_logit_softcapping)):
            if getattr(config, key, None) is not None:
                add(getattr(config, key))


def bpe_pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's name of the pre-tokenizer (its converter recognises it by a hash; the regexes say the same)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    text = json.dumps(pre)
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if "\\\\p{N}{1,3}" in text:
        return "llama-bpe"
    if "\\\\p{N}" in text:
        return "qwen2"
    return "default"


BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def sentencepiece_vocab(tokenizer_json: dict) -> tuple[list[bytes], list[float], list[gguf.TokenType]]:
    """A byte-fallback BPE tokenizer (Gemma's, Llama 2's, as Hugging Face converts sentencepiece) as llama.cpp's
    "llama" tokenizer model: each merged token scores minus its merge rank, so llama.cpp's best-score-first pairing
    replays the BPE merges in order."""
    model = tokenizer_json["model"]
    added = {item["id"]: item for item in tokenizer_json.get("added_tokens", [])}
    by_id = {index: text for text, index in model["vocab"].items()} | {index: item["content"] for index, item in added.items()}
    vocab = {text: index for index, text in by_id.items()}
    scores = dict.fromkeys(by_id, 0.0)
    for rank, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        index = vocab.get(left + right)
        if index is not None and scores[index] == 0.0:
            scores[index] = -float(rank + 1)
    tokens, values, types = [], [], []
    for index in range(max(by_id) + 1):
        text = by_id.get(index, f"[PAD{index}]")
        if index not in by_id:
            kind = gguf.TokenType.UNUSED
        elif index in added:
            kind = gguf.TokenType.CONTROL if added[index].get("special") else gguf.TokenType.USER_DEFINED
        else:
            kind = gguf.TokenType.BYTE if BYTE_TOKEN.fullmatch(text) else gguf.TokenType.NORMAL
        tokens.append(text.encode("utf-8"))
        values.append(scores.get(index, 0.0))
        types.append(kind)
    return tokens, values, types


def tokenizer_model(tokenizer_json: dict) -> str:
    """llama.cpp's tokenizer model for a ``tokenizer.json``: "gpt2" (byte-level BPE: SmolLM2, Qwen, Llama 3) or "llama"
    (byte-fallback BPE, sentencepiece converted: Gemma); any other kind is refused rather than written wrongly."""
    model = tokenizer_json.get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "llama"
    if model.get("type") == "BPE" and (tokenizer_json.get("decoder") or {}).get("type") == "ByteLevel":
        return "gpt2"
    raise FoldGPTError(f"GGUF export writes BPE tokenizers (byte-level: SmolLM2, Qwen, Llama 3; byte-fallback: Gemma) "
                       f"only, and this model's is a {model.get('type', 'slow, tokenizer.json-less')} one; export it with "
                       "'foldgpt export --plain'")


def check_tokenizer_file(folder: Path) -> None:
    """``tokenizer_model`` of a model folder's ``tokenizer.json`` (checked before a pipeline spends hours)."""
    file = Path(folder) / "tokenizer.json"
    tokenizer_model(json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {})


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """Vocabulary, merges, special tokens and chat template: byte-level BPE tokenizers (SmolLM2, Qwen, Llama 3) as
    llama.cpp's "gpt2" model, byte-fallback ones (Gemma) as its "llama" model; another kind is refused rather than
    written wrongly."""
    with tempfile.TemporaryDirectory(prefix="foldgpt-gguf-tok-") as folder:
        tokenizer.save_pretrained(folder)
        path = Path(folder)
        file = path / "tokenizer.json"
        tokenizer_json = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
        kind = tokenizer_model(tokenizer_json)
        scores: list[float] | None = None
        if kind == "llama":
            tokens, scores, types = sentencepiece_vocab(tokenizer_json)
            pre = "default"
        else:
            vocab = gguf.vocab.BpeVocab(path)
            tokens, types = [], []
            for text, _score, token_type in vocab.all_tokens():
                tokens.append(text)
                types.append(token_type)
            pre = bpe_pre_tokenizer(tokenizer_json)
        if len(tokens) > vocab_size:
            raise FoldGPTError(f"the tokenizer has {len(tokens)} tokens but the model only {vocab_size} embeddings")
        for index in range(len(tokens), vocab_size):  # embedding rows past the vocabulary, as the converter pads them
            tokens.append(f"[PAD{index}]".encode())
            types.append(gguf.TokenType.UNUSED)
            if scores is not None:
                scores.append(0.0)
        writer.add_tokenizer_model(kind)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        if scores is not None:
            writer.add_token_scores(scores)
        writer.add_token_types(types)
        gguf.SpecialVocab(path, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def gguf_metadata(loaded: LoadedModel, model: PreTrainedModel, kind: GgufType) -> dict:
    return {
        "foldgpt_version": __version__,
        "stage": "export",
        "format": "gguf",
        "gguf_type": kind,
        "llama_cpp_architecture": gguf_family(model.config).arch.name.lower(),
        "num_blocks": model.config.num_hidden_layers,
        "source_model": loaded.source,
        "source_hub": loaded.hub,
        "source_metadata": read_metadata(loaded.source),
    }


def write_gguf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path, kind: GgufType,
               metadata: dict) -> dict[str, int]:
    """Write the GGUF file at ``path``; returns how many tensors got each type."""
    config = model.config
    family = gguf_family(config)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[family.arch])
    # never just "mistral": transformers' reader then asks gguf-py for a "mistral" architecture, which it lacks
    writer.add_name(f"{Path(metadata['source_model']).name} (foldgpt {metadata['gguf_type']})")
    writer.add_file_type(FILE_TYPES[kind])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string(METADATA_KEY, json.dumps(metadata))
    add_hyperparameters(writer, config, family)
    add_tokenizer(writer, tokenizer, config.vocab_size)
    counts: dict[str, int] = {}
    for name, data in gguf_tensors(model, family):
        quant = tensor_type(name, data, kind)
        writer.add_tensor(name, gguf.quants.quantize(data, quant), raw_dtype=quant)
        counts[quant.name.lower()] = counts.get(quant.name.lower(), 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def sidecar_path(out: Path) -> Path:
    """The manifest beside the file (``OUT.gguf.json``): a GGUF is one file, so its record cannot live inside a folder."""
    return out.with_name(out.name + ".json")


def export_gguf(loaded: LoadedModel, out: str | Path, kind: str = "f16", overwrite: bool = False) -> Path:
    """Write ``loaded`` (plain, folded or healed: merged per position first) as a GGUF file, atomically, with
    ``OUT.json`` beside it (what produced it, its tensor types and SHA-256)."""
    out = Path(out)
    kind = check_gguf_type(kind)
    check_output_free(out, overwrite)
    family = check_model_family(loaded.model.config)  # refuse before merging anything
    check_attention_pattern(loaded.model.config, family)
    model = merged_model(loaded, "GGUF export")
    check_tensor_names(model, family)
    metadata = gguf_metadata(loaded, model, kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        counts = write_gguf(model, loaded.tokenizer, tmp, kind, metadata)
        os.chmod(tmp, 0o644)
        manifest = {**metadata, "file": out.name, "bytes": tmp.stat().st_size, "sha256": file_sha256(tmp),
                    "tensor_types": counts, "input": model_identity(loaded.source, loaded.hub)}
        os.replace(tmp, out)
    except OSError as error:
        full = disk_full_error(error, out, "choose another path")
        if full is None:
            raise
        raise full from error
    finally:
        tmp.unlink(missing_ok=True)
    write_json_atomic(sidecar_path(out), manifest)
    return out
