"""Gate-training throughput against a plain training step of the same model on the same tokens.

    python benchmarks/gate_throughput.py --steps 5 --seqlen 256

"plain" is one forward + backward of the next-token loss with every weight trainable (a standard fine-tuning step);
"gates" is one step of ``train_gates`` (teacher forward without gradients, gated forward, backward into the gates
only, regulariser, Adam). Both see the same windows; the first step of each is a warm-up and is not timed.
Prints tokens/s and the ratio; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from foldgpt.data.windows import load_windows
from foldgpt.formats.loading import load_model
from foldgpt.selection.config import GateConfig
from foldgpt.selection.gates import train_gates


def plain_steps(model, windows: torch.Tensor) -> float:
    """Seconds for forward+backward of each window after the first (weights trainable, no optimiser step)."""
    model.train(False)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    start = 0.0
    for index, window in enumerate(windows):
        if index == 1:
            start = time.perf_counter()
        ids = window[None]
        logits = model(input_ids=ids, use_cache=False).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/results/gate_throughput.json")
    args = parser.parse_args()
    loaded = load_model(args.model)
    windows = load_windows(loaded.tokenizer, "wikitext2", args.steps + 1, args.seqlen, 0)
    timed_tokens = args.steps * args.seqlen
    start = time.perf_counter()
    train_gates(loaded.model, windows[:1], GateConfig(steps=1), seed=0)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    train_gates(loaded.model, windows[1:], GateConfig(steps=args.steps), seed=0)
    gate_seconds = time.perf_counter() - start
    plain_seconds = plain_steps(loaded.model, windows)
    result = {"model": loaded.source, "seqlen": args.seqlen, "timed_tokens": timed_tokens, "threads": torch.get_num_threads(),
              "gates_tokens_per_s": timed_tokens / gate_seconds, "plain_tokens_per_s": timed_tokens / plain_seconds,
              "gate_warmup_seconds": warmup}
    result["ratio"] = result["gates_tokens_per_s"] / result["plain_tokens_per_s"]
    print(f"| stage | tokens/s |\n|---|---|\n| plain forward+backward | {result['plain_tokens_per_s']:.0f} |\n"
          f"| gate training step | {result['gates_tokens_per_s']:.0f} |\n| ratio | {result['ratio']:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
