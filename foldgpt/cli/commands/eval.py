"""``foldgpt eval``: perplexity, zero-shot tasks and efficiency figures of one model."""

from __future__ import annotations

import argparse
from pathlib import Path

from foldgpt.cli.commands.common import load
from foldgpt.cli.schema import read_config
from foldgpt.cli.settings import EvalSettings
from foldgpt.core.outputs import write_json_atomic
from foldgpt.core.system import peak_rss_bytes
from foldgpt.errors import FoldGPTError
from foldgpt.eval.blockwise import blockwise_perplexity
from foldgpt.eval.efficiency import format_report, measure_efficiency
from foldgpt.eval.lm_tasks import evaluate_tasks, format_table, task_manager
from foldgpt.eval.perplexity import perplexity
from foldgpt.formats.blockwise import BlockwiseModel


def run(args: argparse.Namespace) -> None:
    settings: EvalSettings = read_config(args, EvalSettings())
    if settings.offload.offload == "blocks":
        run_blockwise(settings, args.out)
        return
    config = settings.eval
    manager = None
    if config.tasks:  # resolve the tasks (names, data files) before loading the model, so bad input fails fast
        manager = task_manager(config.tasks, include_path=config.include_path)
    loaded = load(settings.loading)
    results = [perplexity(loaded.model, loaded.tokenizer, name, config.seqlen, config.max_tokens, config.batch_size)
               for name in config.perplexity_sets]
    for result in results:
        print(f"{result.dataset}: perplexity {result.perplexity:.3f} ({result.tokens} tokens, seqlen {result.seqlen}, {result.seconds:.1f}s)")
    payload: dict = {"model": loaded.source, "perplexity": {r.dataset: r.to_dict() for r in results}}
    if config.tasks:
        tasks = evaluate_tasks(loaded.model, loaded.tokenizer, config.tasks, limit=config.limit, num_fewshot=config.num_fewshot,
                               batch_size=config.batch_size, include_path=config.include_path, manager=manager)
        print(format_table(tasks))
        payload["tasks"] = tasks.to_dict()
    if config.efficiency:
        report = measure_efficiency(loaded.model, loaded.source, prefill_tokens=config.prefill_tokens,
                                    decode_tokens=config.decode_tokens)
        print(format_report(report))
        payload["efficiency"] = report.to_dict()
    if args.out:
        write_json_atomic(Path(args.out), payload)


def run_blockwise(settings: EvalSettings, out: str | None) -> None:
    """``--offload blocks``: perplexity only, one block's weights in memory at a time."""
    config, model = settings.eval, settings.loading
    if config.tasks or config.efficiency:
        raise FoldGPTError("--offload blocks scores perplexity only; run --tasks / --efficiency without it")
    runner = BlockwiseModel(model.model, dtype=model.dtype, device=model.device)
    results = [blockwise_perplexity(runner, name, config.seqlen, config.max_tokens, config.batch_size, settings.offload.offload_dir)
               for name in config.perplexity_sets]
    for result in results:
        print(f"{result.dataset}: perplexity {result.perplexity:.3f} ({result.tokens} tokens, seqlen {result.seqlen}, {result.seconds:.1f}s)")
    print(f"block by block; peak resident memory {peak_rss_bytes() / 2**20:.0f} MiB")
    if out:
        write_json_atomic(Path(out), {"model": runner.source, "offload": "blocks",
                                      "perplexity": {r.dataset: r.to_dict() for r in results}})
