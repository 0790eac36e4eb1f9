"""Does a tie pay at the issue's budgets, before healing? Removal only against removing one block fewer and tying two.

For each target ``k`` (the blocks removal alone takes: 6, 10 and 16 on SmolLM2-135M are ``--target-params`` 0.85,
0.75 and 0.60), on Block Influence's ranking from the fitting windows:

- ``remove``: the ``k`` lowest-influence blocks removed; ``remove+linear``: the same, with ``--replace linear``'s maps;
- ``remove+tie``: the ``k - 1`` lowest removed, and the next two blocks of the ranking that have a kept neighbour tied
  to it (the neighbour before, else after), each with its norms and a rank-``r`` delta fitted by local reconstruction
  from the SVD (``fit-svd-lora`` of ``research/tie_init.py``, the best initialisation there), fitted on the plan's own
  stream (its removals and earlier ties in place) to the dense model's stream after the child. Two ties of rank 64 save
  1.63 blocks, so this plan has *fewer* unique parameters than ``remove``.

Scored by WikiText-2 validation perplexity on windows that skip the fitting windows (as ``tie_init.py``).

    OMP_NUM_THREADS=1 python research/tie_plan.py --targets 6,10,16 --out research/results/tie_plan.json
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from tie_init import (
    TiedChild,
    add_fit_arguments,
    dense_streams,
    fit_child,
    fit_setup,
    linears,
    norms_saved,
    truncated,
    weights_set,
)

from foldgpt.analysis.redundancy import redundancy_stats
from foldgpt.arch.adapters import adapter_for
from foldgpt.eval.perplexity import windows_perplexity
from foldgpt.formats.blockwise import ResidentBlocks
from foldgpt.surgery.config import ReplacementConfig
from foldgpt.surgery.removal import blocks_removed_temporarily, count_parameters
from foldgpt.surgery.ties import tie_candidates
from foldgpt.workflows.replace import replace_removed


def plan_inputs(runner: ResidentBlocks, windows: torch.Tensor, child: int, removed: set[int]) -> list[torch.Tensor]:
    """``child``'s input in the plan's model, one tensor per window: ``removed`` skipped, the ties made so far in place."""
    inputs = []
    for window in windows:
        hidden = runner.embed(window[None])
        for index in range(child):
            if index not in removed:
                hidden = runner.run_block(index, hidden, (1, window.numel()))
        inputs.append(hidden)
    return inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fit_arguments(parser)
    parser.add_argument("--targets", default="6,10,16")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    setup = fit_setup(args)
    fit, held_out = setup.fit, setup.held_out
    model, adapter = setup.loaded.model, adapter_for(setup.loaded.model)
    runner = ResidentBlocks(model)
    num_blocks = runner.num_blocks
    influence = redundancy_stats(model, fit).block_influence
    ranking = sorted(range(num_blocks), key=lambda i: influence[i])
    dense_params = count_parameters(model)
    block_params = sum(m.weight.numel() for m in linears(runner.blocks[0]).values())
    dense = windows_perplexity(model, held_out, progress=False)
    print(f"dense {dense:.2f}; bi ranking {ranking}", flush=True)
    saved = {i: {name: m.weight.data.clone() for name, m in linears(block).items()} for i, block in enumerate(runner.blocks)}

    rows = []
    for k in (int(x) for x in args.targets.split(",")):
        start = time.perf_counter()
        removed = sorted(ranking[:k])
        row: dict = {"k": k, "remove": {"removed": removed}}
        with blocks_removed_temporarily(model, removed) as pruned:
            row["remove"]["ppl"] = windows_perplexity(pruned, held_out, progress=False)
            row["remove"]["params"] = count_parameters(pruned)
        with ExitStack() as stack:
            for index in range(num_blocks):
                stack.enter_context(weights_set(runner.blocks[index], saved[index]))
            replace_removed(runner, fit, removed, ReplacementConfig("linear"))
            with blocks_removed_temporarily(model, removed) as pruned:
                row["remove+linear"] = {"removed": removed, "ppl": windows_perplexity(pruned, held_out, progress=False)}
        fewer = sorted(ranking[: k - 1])
        ties = tie_candidates(ranking, fewer, 2, num_blocks)
        extra = 0
        # the dense stream after each child, taken before any tie changes a block: the tie learns to stand in for
        # removed blocks before it too
        targets = {child: dense_streams(runner, fit, child)[1] for _, child in ties}
        with ExitStack() as stack:
            for parent, child in ties:
                norms = adapter.block_norms(runner.blocks[child])
                stack.enter_context(weights_set(runner.blocks[child], saved[child]))
                stack.enter_context(norms_saved(norms))
                init = {name: truncated(saved[child][name] - saved[parent][name], args.rank) for name in saved[child]}
                tied = TiedChild(saved[parent], args.rank, False, init, seed=0)
                with weights_set(runner.blocks[child], saved[parent]):
                    fit_child(runner, child, tied, norms, (plan_inputs(runner, fit, child, set(fewer)), targets[child]), args)
                extra += tied.extra()
                with torch.no_grad():
                    weights = tied.weights()
                    for name, module in linears(runner.blocks[child]).items():
                        module.weight.data.copy_(weights[name])
            with blocks_removed_temporarily(model, fewer) as pruned:
                ppl = windows_perplexity(pruned, held_out, progress=False)
                params = count_parameters(pruned) - len(ties) * block_params + extra
        row["remove+tie"] = {"removed": fewer, "ties": ties, "rank": args.rank, "ppl": ppl, "params": params}
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        print(f"k={k}: remove {row['remove']['ppl']:.2f} ({row['remove']['params']:,}), remove+linear "
              f"{row['remove+linear']['ppl']:.2f}, remove {k - 1} + tie {ties} {ppl:.2f} ({params:,})", flush=True)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"model": args.model, "settings": vars(args), "dense": dense, "dense_params": dense_params,
                                   "ranking": ranking, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
