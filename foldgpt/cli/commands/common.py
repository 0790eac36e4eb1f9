"""What every command shares once it runs: the libraries quietened, the launcher check, loading with a timing line."""

from __future__ import annotations

import sys
import time

from transformers.utils import logging as hf_logging

from foldgpt.errors import FoldGPTError
from foldgpt.formats.config import ModelConfig
from foldgpt.formats.loading import LoadedModel
from foldgpt.formats.placement import load_placed
from foldgpt.healing.config import HealConfig
from foldgpt.surgery.config import TieConfig
from foldgpt.train.parallel import launched_world_size

DATA_PARALLEL = {("heal", None), ("prune", "gates")}
"""The commands that split their work over the processes of accelerate launch / torchrun (see docs/distributed.md)."""


def prepare(command: str, method: str | None) -> None:
    """Before any command runs: quiet the libraries, and refuse a launcher that every process would obey alike."""
    hf_logging.set_verbosity_error()  # transformers' per-tensor progress bars and advisory warnings; foldgpt prints its own
    hf_logging.disable_progress_bar()
    if launched_world_size() > 1 and (command, None if command == "heal" else method) not in DATA_PARALLEL:
        raise FoldGPTError(
            f"'foldgpt {command}' runs in one process; only 'foldgpt heal' and 'foldgpt prune --method gates' train "
            "data-parallel under accelerate launch / torchrun (for big models: --device-map auto in one process)"
        )


def load(config: ModelConfig) -> LoadedModel:
    """The model of ``config``, placed, with a line on stderr saying how long it took."""
    start = time.perf_counter()
    loaded = load_placed(config.model, dtype=config.dtype, device=config.device, device_map=config.device_map,
                         trust_remote_code=config.trust_remote_code)
    print(f"loaded {loaded.source} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return loaded


def fold_probe(ties: TieConfig) -> HealConfig | None:
    """The heal ``fold`` and ``prune`` give each ``--fold auto`` candidate: ``foldgpt heal``'s defaults, or
    ``--tie-probe-steps`` of them (0: none, the candidates are compared unhealed)."""
    steps = ties.probe_steps
    return None if steps == 0 else HealConfig() if steps is None else HealConfig(steps=steps)


def print_fold_choice(metadata: dict) -> None:
    """One line per ``--fold auto`` candidate (its removal, ties, size and held-out scores), then the one kept."""
    for candidate in metadata["fold_candidates"]:
        healed = f", after the probe heal {candidate['perplexity_healed']:.2f}" if "perplexity_healed" in candidate else ""
        print(f"{candidate['name']:<8} removed {candidate['removed']} ties {candidate['ties']}: "
              f"{candidate['unique_parameters']:,} unique parameters, held-out perplexity {candidate['perplexity']:.2f}{healed}")
    print(f"kept: {metadata['fold_choice']}")
