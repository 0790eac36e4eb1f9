"""Do ties still pay after healing? Removal only against removing one block fewer and tying two, both healed (issue 22).

``research/tie_plan.py`` showed that, before healing, removing ``k - 1`` blocks of Block Influence's ranking and tying
the next two (each child runs its kept neighbour's weights plus its norms and a rank-64 delta fitted on the plan's own
stream) beats removing ``k`` at fewer unique parameters. This script asks whether the lead survives the default heal
(``HealConfig()``: 25 x 1,024 Alpaca tokens, LoRA rank 8 on every position, norms trained), the same for every
variant:

- ``remove``: the ``k`` lowest-influence blocks removed, then healed;
- ``linear``: the same blocks removed with ``--replace linear``'s maps folded in, then healed;
- ``tie``: ``k - 1`` removed and two ties fitted as in ``tie_plan.py``; the tie's delta is merged into the child's
  weights and frozen while healing;
- ``product`` / ``product-trained``: the same plan built by ``foldgpt.tie_model`` (the delta a LoRA adapter on the
  shared weights) and healed by ``foldgpt heal`` with the deltas frozen (the default) or trained at the heal's rate
  (``--heal-train-tie-deltas``).

Scored before and after healing on validation text only (choosing, not testing): WikiText-2 validation in windows of
1,024 that skip the fitting windows, and the first 16,384 tokens of PTB validation in windows of 1,024.

    OMP_NUM_THREADS=1 python research/tie_heal.py --targets 10,16 --out research/results/tie_heal.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tie_init import TiedChild, add_fit_arguments, dense_streams, fit_child, fit_setup, linears, truncated
from tie_plan import plan_inputs

from foldgpt.analysis.redundancy import redundancy_stats
from foldgpt.arch.adapters import adapter_for
from foldgpt.data.text import load_text
from foldgpt.data.windows import evaluation_windows, tokenize, windows_avoiding
from foldgpt.eval.perplexity import windows_perplexity
from foldgpt.formats.blockwise import ResidentBlocks
from foldgpt.formats.loading import LoadedModel, load_model
from foldgpt.healing.config import HealConfig
from foldgpt.healing.loop import heal
from foldgpt.surgery.config import ReplacementConfig, TieConfig
from foldgpt.surgery.removal import count_parameters, remove_blocks
from foldgpt.surgery.ties import tie_candidates
from foldgpt.workflows.fold import tie_model
from foldgpt.workflows.replace import replace_removed


def fit_ties(student: LoadedModel, teacher: ResidentBlocks, fit: torch.Tensor, removed: list[int],
             ties: tuple[tuple[int, int], ...], args: argparse.Namespace) -> int:
    """Fit each tie's norms and rank-``r`` delta on the plan's own stream, merge it into the child; the extra count."""
    runner = ResidentBlocks(student.model)
    adapter = adapter_for(student.model)
    extra = 0
    for parent, child in ties:
        targets = dense_streams(teacher, fit, child)[1]
        inputs = plan_inputs(runner, fit, child, set(removed))
        shared = {name: module.weight.data.clone() for name, module in linears(runner.blocks[parent]).items()}
        own = {name: module.weight.data.clone() for name, module in linears(runner.blocks[child]).items()}
        init = {name: truncated(own[name] - shared[name], args.rank) for name in own}
        tied = TiedChild(shared, args.rank, False, init, seed=0)
        fit_child(runner, child, tied, adapter.block_norms(runner.blocks[child]), (inputs, targets), args)
        extra += tied.extra()
        with torch.no_grad():
            for name, weight in tied.weights().items():
                linears(runner.blocks[child])[name].weight.data.copy_(weight)
    return extra


def product_row(args: argparse.Namespace, dense: LoadedModel, ranking: list[int], k: int, num_blocks: int,
                texts: dict[str, torch.Tensor], variant: str) -> dict:
    """The tie plan through the product: ``tie_model`` into a folder, then ``heal`` of that folder."""
    removed = sorted(ranking[: k - 1])
    ties = tie_candidates(ranking, removed, 2, num_blocks)
    student = load_model(args.model)
    remove_blocks(student.model, removed)
    folder = Path(args.work) / f"k{k}-{variant}"
    spec = ",".join(f"{parent}:{child}" for parent, child in ties)
    tie_model(student, dense, TieConfig(ties=spec, rank=args.rank), out=folder, overwrite=True, removed=removed)
    tied = load_model(str(folder))
    row = {"removed": removed, "ties": ties, "before": scores(tied.model, texts),
           "unique_params": sum(p.numel() for p in {id(p): p for p in tied.model.parameters()}.values())}
    config = HealConfig(seed=args.heal_seed, steps=args.heal_steps, train_tie_deltas=variant == "product-trained")
    row["after"] = scores(heal(tied, dense, config).loaded.model, texts)
    return row


def scores(model: torch.nn.Module, texts: dict[str, torch.Tensor]) -> dict[str, float]:
    with torch.no_grad():
        return {name: windows_perplexity(model, windows, progress=False) for name, windows in texts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fit_arguments(parser)
    parser.add_argument("--targets", default="10,16")
    parser.add_argument("--variants", default="remove,tie,linear")
    parser.add_argument("--heal-seed", type=int, default=0)
    parser.add_argument("--heal-steps", type=int, default=HealConfig().steps)
    parser.add_argument("--work", default="runs/tie_heal")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    setup = fit_setup(args)
    dense = setup.loaded
    teacher = ResidentBlocks(dense.model)
    num_blocks = teacher.num_blocks
    block_params = sum(m.weight.numel() for m in linears(teacher.blocks[0]).values())
    ptb = tokenize(dense.tokenizer, load_text("ptb", "calibration"))
    texts = {"wikitext2-val": windows_avoiding(setup.tokens, 1024, 16384, setup.fit_spans),
             "ptb-val": evaluation_windows(ptb, 1024, 16384)}
    influence = redundancy_stats(dense.model, setup.fit).block_influence
    ranking = sorted(range(num_blocks), key=lambda i: influence[i])
    record = {"model": args.model, "settings": vars(args), "ranking": ranking, "dense": scores(dense.model, texts),
              "heal": HealConfig(seed=args.heal_seed, steps=args.heal_steps).__dict__, "rows": []}
    print(f"dense {record['dense']}; bi ranking {ranking}", flush=True)
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    done = {(row["k"], row["variant"]) for row in previous["rows"]}
    record["rows"] = previous["rows"]
    for k in (int(x) for x in args.targets.split(",")):
        for variant in args.variants.split(","):
            if (k, variant) in done:
                continue
            start = time.perf_counter()
            student = load_model(args.model)
            for p in student.model.parameters():
                p.requires_grad_(False)
            row: dict = {"k": k, "variant": variant}
            if variant.startswith("product"):
                row.update(product_row(args, dense, ranking, k, num_blocks, texts, variant))
                row["seconds"] = time.perf_counter() - start
                print(f"k={k} {variant}: before {row['before']} after {row['after']} ({row['seconds']:.0f}s)", flush=True)
                record["rows"].append(row)
                out.write_text(json.dumps(record, indent=2, default=str) + "\n")
                continue
            if variant == "tie":
                removed = sorted(ranking[: k - 1])
                ties = tie_candidates(ranking, removed, 2, num_blocks)
                extra = fit_ties(student, teacher, setup.fit, removed, ties, args)
                row["ties"] = ties
            else:
                removed, ties, extra = sorted(ranking[:k]), [], 0
                if variant == "linear":
                    replace_removed(ResidentBlocks(student.model), setup.fit, removed, ReplacementConfig("linear"))
            remove_blocks(student.model, removed)
            row["removed"] = removed
            row["unique_params"] = count_parameters(student.model) - len(ties) * block_params + extra
            row["before"] = scores(student.model, texts)
            print(f"k={k} {variant}: before {row['before']} ({row['unique_params']:,})", flush=True)
            healed = heal(student, dense, HealConfig(seed=args.heal_seed, steps=args.heal_steps))
            row["after"] = scores(healed.loaded.model, texts)
            row["seconds"] = time.perf_counter() - start
            print(f"k={k} {variant}: after {row['after']} ({row['seconds']:.0f}s)", flush=True)
            record["rows"].append(row)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(record, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
