"""What to evaluate: perplexity sets, zero-shot tasks (lm-evaluation-harness) and efficiency figures."""

from __future__ import annotations

from dataclasses import dataclass

from foldgpt.core.settings import setting
from foldgpt.errors import FoldGPTError

PERPLEXITY_SETS = ("wikitext2", "ptb")
"""The sets of the depth-pruning papers, scored by default."""


@dataclass(frozen=True)
class EvalConfig:
    """Perplexity with the protocol of the pruning papers (the test split as one text, non-overlapping windows of
    ``seqlen`` tokens), lm-eval tasks offline, and size / FLOPs / speed / memory. The defaults are ``foldgpt eval``'s;
    ``compress`` evaluates more by default (``foldgpt.workflows.config``)."""

    ppl: tuple[str, ...] | None = setting(None, metavar="SETS",
                                          none_means=f"{','.join(PERPLEXITY_SETS)}, unless {{tasks}} or {{efficiency}} is given",
                                          help="comma-separated perplexity sets: wikitext2, ptb, or text files")
    seqlen: int = setting(2048, help="tokens per evaluation window")
    max_tokens: int | None = setting(None, metavar="N", none_means="the whole test split",
                                     help="score only the first N tokens of each set, for quick runs")
    batch_size: int = setting(1, help="windows per forward pass (with {tasks}: requests per forward pass)")
    tasks: tuple[str, ...] | None = setting(None, metavar="TASKS",
                                            help="comma-separated lm-eval tasks: piqa, arc_easy, arc_challenge, boolq, winogrande "
                                            "(shipped, read from --data-dir), any other lm-eval task whose data is in the "
                                            "Hugging Face cache, or a task YAML file; reports acc and acc_norm as the harness does; "
                                            "none: no tasks (compress evaluates the five shipped ones by default)")
    limit: int | None = setting(None, metavar="N", none_means="every document",
                                help="score only the first N documents of each task, for quick runs")
    num_fewshot: int = setting(0, help="few-shot examples per prompt")
    include_path: tuple[str, ...] | None = setting(None, metavar="DIR",
                                                   help="folders of your own lm-eval task YAMLs (e.g. hellaswag with "
                                                   "dataset_path: json and local data_files); they override tasks of the same "
                                                   "name; comma-separated or repeated")
    efficiency: bool = setting(False, help="also measure parameters (total, unique), weight bytes on disk, FLOPs per token, "
                               "prefill and decode throughput and latency, and peak memory on --device")
    prefill_tokens: int = setting(256, help="prompt length of the timing runs")
    decode_tokens: int = setting(32, help="greedy one-token steps with the KV cache")

    def __post_init__(self) -> None:
        for name in ("seqlen", "batch_size", "prefill_tokens", "decode_tokens"):
            if getattr(self, name) < 1:
                raise FoldGPTError(f"evaluation needs {name} >= 1, got {getattr(self, name)}")
        for name in ("max_tokens", "limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise FoldGPTError(f"evaluation needs {name} >= 1 (or none for all), got {getattr(self, name)}")
        if self.num_fewshot < 0:
            raise FoldGPTError(f"evaluation needs num_fewshot >= 0, got {self.num_fewshot}")
        if self.ppl is not None and not self.ppl:
            raise FoldGPTError("give at least one perplexity set, e.g. wikitext2,ptb")
        if self.tasks is not None and tuple(name.lower() for name in self.tasks) == ("none",):
            object.__setattr__(self, "tasks", None)  # --tasks none: skip the tasks (compress runs five by default)
        if self.tasks is not None and not self.tasks:
            raise FoldGPTError("give at least one task, e.g. piqa,arc_easy")

    @property
    def perplexity_sets(self) -> tuple[str, ...]:
        """``ppl``, or when it is None the papers' sets unless tasks or efficiency are asked for instead."""
        if self.ppl is not None:
            return self.ppl
        return () if self.tasks or self.efficiency else PERPLEXITY_SETS
