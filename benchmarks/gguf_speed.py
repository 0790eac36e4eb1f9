"""llama.cpp speed of pruned SmolLM2-135M exported to GGUF: prefill and decode tokens/s against the ideal FLOPs ratio.

    OMP_NUM_THREADS=1 python benchmarks/gguf_speed.py --threads 1 --out benchmarks/results/gguf_speed.json

Models: dense SmolLM2-135M, and 6 and 10 of its 30 blocks removed by Block Influence (16 x 256 WikiText-2
validation windows, prune's default), each exported with ``foldgpt export --gguf`` as f16 and q8_0 into ``--work``.
llama.cpp runs through llama-cpp-python (``pip install llama-cpp-python``). Prefill: one 512-token prompt evaluated
from an empty cache; decode: 128 greedy tokens after it; each the median of ``--repeats`` runs. The ideal speed-up is
the dense model's matmul FLOPs per token over the pruned model's (``foldgpt.surgery.budget``, at context 576, the
decode's mean context). Also the file sizes, and llama.cpp's perplexity on the first 8 x 512 WikiText-2 test windows
(float32 KV cache) against transformers' on the folder. Target (issue 25): decode speed-up >= 0.9 x the ideal ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import llama_cpp
import torch

from foldgpt.data.text import load_text
from foldgpt.data.windows import evaluation_windows, tokenize
from foldgpt.eval.perplexity import windows_perplexity
from foldgpt.formats.gguf_export import export_gguf
from foldgpt.formats.loading import load_model
from foldgpt.surgery.budget import model_flops_per_token
from foldgpt.workflows.prune import prune

PROMPT_TOKENS = 512
DECODE_TOKENS = 128
CONTEXT = PROMPT_TOKENS + DECODE_TOKENS // 2


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--types", default="f16,q8_0")
    parser.add_argument("--remove", default="6,10")
    parser.add_argument("--work", default="runs/gguf_speed")
    parser.add_argument("--out", default="benchmarks/results/gguf_speed.json")
    return parser.parse_args()


def folder_for(work: Path, n_remove: int) -> Path:
    """The dense alias (0) or a bi-pruned folder under ``work``, made once."""
    if n_remove == 0:
        return Path(load_model("smollm2-135m").source)
    folder = work / f"bi{n_remove}"
    if not (folder / "config.json").is_file():
        prune(load_model("smollm2-135m"), "bi", remove=n_remove, out=folder)
    return folder


def timed_run(path: Path, threads: int, prompt: list[int]) -> tuple[float, float]:
    """Prefill and decode tokens/s of one fresh llama.cpp context."""
    runner = llama_cpp.Llama(model_path=str(path), n_ctx=PROMPT_TOKENS + DECODE_TOKENS + 8, n_threads=threads,
                             n_threads_batch=threads, n_batch=PROMPT_TOKENS, verbose=False)
    start = time.perf_counter()
    runner.eval(prompt)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    token = runner.sample(top_k=1, temp=0.0)
    for _ in range(DECODE_TOKENS):
        runner.eval([token])
        token = runner.sample(top_k=1, temp=0.0)
    decode = time.perf_counter() - start
    runner.close()
    return PROMPT_TOKENS / prefill, DECODE_TOKENS / decode


def llama_cpp_perplexity(path: Path, windows: torch.Tensor, threads: int) -> float:
    """exp(mean NLL) of llama.cpp's logits over ``windows`` (float32 KV cache), as ``windows_perplexity`` computes it."""
    runner = llama_cpp.Llama(model_path=str(path), n_ctx=windows.shape[1], n_batch=windows.shape[1], n_threads=threads,
                             logits_all=True, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
    total, count = 0.0, 0
    for window in windows:
        runner.reset()
        runner.eval(window.tolist())
        logits = torch.tensor(runner.scores[: len(window)]).float()
        total += torch.nn.functional.cross_entropy(logits[:-1], window[1:], reduction="sum").item()
        count += len(window) - 1
    runner.close()
    return math.exp(total / count)


def add_speedups(rows: list[dict]) -> None:
    """Each row's speed-ups over the dense row of its type: from the medians, and from the best of the runs (the
    fastest run is the one least slowed by other processes, as ``timeit`` takes the minimum)."""
    for row in rows:
        base = next(r for r in rows if r["removed"] == 0 and r["type"] == row["type"])
        row["prefill_speedup"] = row["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
        row["decode_speedup"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        row["decode_vs_ideal"] = row["decode_speedup"] / row["ideal_speedup"]
        row["decode_best_tokens_per_s"] = max(run[1] for run in row["runs"])
        row["decode_best_speedup"] = row["decode_best_tokens_per_s"] / max(run[1] for run in base["runs"])
        row["decode_best_vs_ideal"] = row["decode_best_speedup"] / row["ideal_speedup"]


def main() -> None:
    args = parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    dense = load_model("smollm2-135m")
    dense_flops = model_flops_per_token(dense.model, CONTEXT)
    prompt = dense.tokenizer("The history of the city " * 200)["input_ids"][:PROMPT_TOKENS]
    windows = evaluation_windows(tokenize(dense.tokenizer, load_text("wikitext2", "evaluation")), 512, 8 * 512)
    rows = []
    for n_remove in [0, *map(int, args.remove.split(","))]:
        folder = folder_for(work, n_remove)
        loaded = load_model(str(folder))
        flops = model_flops_per_token(loaded.model, CONTEXT)
        with torch.no_grad():
            ours = windows_perplexity(loaded.model, windows, progress=False)
        for kind in args.types.split(","):
            path = export_gguf(loaded, work / f"bi{n_remove}.{kind}.gguf", kind, overwrite=True)
            runs = [timed_run(path, args.threads, prompt) for _ in range(args.repeats)]
            rows.append({"removed": n_remove, "type": kind, "bytes": path.stat().st_size, "flops_per_token": flops,
                         "ideal_speedup": dense_flops / flops,
                         "prefill_tokens_per_s": statistics.median(r[0] for r in runs),
                         "decode_tokens_per_s": statistics.median(r[1] for r in runs), "runs": runs,
                         "perplexity_transformers": ours,
                         "perplexity_llama_cpp": llama_cpp_perplexity(path, windows, args.threads)})
            print(json.dumps(rows[-1]), flush=True)
    add_speedups(rows)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "repeats": args.repeats, "prompt_tokens": PROMPT_TOKENS,
                                          "decode_tokens": DECODE_TOKENS, "llama_cpp_python": llama_cpp.__version__,
                                          "rows": rows}, indent=1) + "\n")
    print("| blocks removed | type | MiB | ppl ours / llama.cpp | prefill tok/s | decode tok/s | decode speed-up | "
          "ideal (FLOPs) | ratio | best-run ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['removed']} | {row['type']} | {row['bytes'] / 2**20:.1f} | {row['perplexity_transformers']:.2f} / "
              f"{row['perplexity_llama_cpp']:.2f} | {row['prefill_tokens_per_s']:.0f} | "
              f"{row['decode_tokens_per_s']:.1f} | {row['decode_speedup']:.3f} | {row['ideal_speedup']:.3f} | "
              f"{row['decode_vs_ideal']:.3f} | {row['decode_best_vs_ideal']:.3f} |")


if __name__ == "__main__":
    main()
