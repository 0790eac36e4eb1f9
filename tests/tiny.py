"""Tiny random-weight models of every supported family, and a character-level tokenizer, for fast exact tests."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from foldgpt.arch.adapters import adapter_for

VOCAB = 128
DEPTH = 6
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=DEPTH,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
# sliding and full layers interleaved, with a window short enough to matter on test sequences
_LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention"] * (DEPTH // 3)
# the same sizes for the families whose configs name them differently (GPT-2: n_embd, ...; OPT: ffn_dim); no dropout
_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}

FAMILIES = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=4, max_window_layers=2),
    "qwen3": lambda: Qwen3Config(**_COMMON),
    "gemma2": lambda: Gemma2Config(**_COMMON, sliding_window=4, layer_types=_LAYER_TYPES),
    "gemma3": lambda: Gemma3TextConfig(**_COMMON, sliding_window=4, layer_types=_LAYER_TYPES),
    "phi3": lambda: Phi3Config(**_COMMON),
    "opt": lambda: OPTConfig(vocab_size=VOCAB, hidden_size=32, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=DEPTH,
                             num_attention_heads=4, max_position_embeddings=256, dropout=0.0, **_IDS),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_inner=64, n_layer=DEPTH, n_head=4, n_positions=256,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **_IDS),
    # parallel residual (the default): the attention and the MLP both read the block's input
    "gpt_neox": lambda: GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=DEPTH,
                                      num_attention_heads=4, max_position_embeddings=256, **_IDS),
}


def tiny_model(family: str = "llama", seed: int = 0, **config_overrides: object) -> PreTrainedModel:
    """A randomly initialised model of ``family`` (seeded), float32, eval mode, eager attention; ``config_overrides``
    set config attributes (e.g. ``resid_pdrop=0.5``) before the model is built."""
    torch.manual_seed(seed)
    config = FAMILIES[family]()
    for name, value in config_overrides.items():
        setattr(config, name, value)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger weights than the HF init, so blocks really differ and tests are meaningful
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2 and "embed" not in name:
                parameter.normal_(0.0, 0.2)
    return model.eval()


def identity_block_model(identity_blocks: list[int], family: str = "llama") -> PreTrainedModel:
    """A tiny model whose given blocks add nothing to the residual stream (zeroed output projections and biases)."""
    model = tiny_model(family)
    adapter = adapter_for(model)
    layers = adapter.layers(model)
    with torch.no_grad():
        for index in identity_blocks:
            for output in (adapter.attention_output_layer(layers[index]), adapter.mlp_output_layer(layers[index])):
                for parameter in output.parameters():
                    parameter.zero_()
    return model


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer whose vocabulary fits the tiny models."""
    characters = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(characters)}}
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>")


def save_tiny(folder: Path, family: str = "llama", seed: int = 0) -> Path:
    """A tiny model folder (config, safetensors, tokenizer), as a user's MODEL argument."""
    tiny_model(family, seed).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def random_ids(batch: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)
