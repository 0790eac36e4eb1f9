"""Peak memory of the calibration-only stages on SmolLM2-135M: the whole model vs ``--offload blocks``, and both under
a hard address-space cap (``RLIMIT_AS``, what ``prlimit --as`` / ``ulimit -v`` set) that leaves the model less room than
its float32 weights.

``--deep R`` instead builds SmolLM2-135M with its 30 blocks repeated R times (R = 5: 150 blocks, 2.24 GB of float32
weights, more than the cap) and analyses it under a 2 GiB address-space cap: block by block it completes, the whole
model cannot even be loaded. Writes benchmarks/results/blockwise_memory_deep.json.

Each command runs in its own process (``foldgpt`` CLI, in a child Python that reports ``VmHWM`` / ``VmPeak`` from
/proc/self/status at exit). Writes benchmarks/results/blockwise_memory.json.

    OMP_NUM_THREADS=1 python benchmarks/blockwise_memory.py
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import sys
def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    return {key: int(fields[key].split()[0]) * 1024 for key in ("VmHWM", "VmPeak", "VmRSS", "VmSize")}
if sys.argv[1] == "--baseline":
    import foldgpt.analysis.blockwise, foldgpt.analysis.figures, foldgpt.cli.main, foldgpt.workflows.prune_blockwise, matplotlib.pyplot  # everything a run imports
    from foldgpt.formats.blockwise import BlockwiseModel
    runner = BlockwiseModel("smollm2-135m")  # the skeleton and outer tensors (embedding = tied head, final norm)
    print("MEMORY", status(), flush=True)
    sys.exit(0)
from foldgpt.cli.main import main
code = main(sys.argv[1:])
print("MEMORY", status(), flush=True)
sys.exit(code)
"""

MODEL = "smollm2-135m"
WEIGHTS_BYTES = 538_000_000  # float32: 134.5 M parameters x 4 bytes (the tied head stored once)
MiB = 2**20


def run(argv: list[str], cap: int | None = None) -> dict:
    def limit() -> None:
        if cap is not None:
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, preexec_fn=limit,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    seconds = time.perf_counter() - start
    memory = {}
    for line in done.stdout.splitlines():
        if line.startswith("MEMORY "):
            memory = eval(line[len("MEMORY "):])  # our own child's dict literal
    error = [line for line in (done.stderr + done.stdout).splitlines() if "error" in line.lower() or "Error" in line]
    result = {"argv": argv, "cap_bytes": cap, "returncode": done.returncode, "seconds": round(seconds, 1),
              "peak_rss_mib": round(memory["VmHWM"] / MiB) if memory else None,
              "peak_address_space_mib": round(memory["VmPeak"] / MiB) if memory else None,
              "error": error[-1][:300] if error and done.returncode else None,
              "stdout_tail": done.stdout.strip().splitlines()[-4:]}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    out = Path(__file__).parent / "results" / "blockwise_memory.json"
    scratch = Path(tempfile.mkdtemp(prefix="foldgpt-bench-"))
    analyze = ["analyze", MODEL, "--overwrite"]
    ppl = ["eval", MODEL, "--ppl", "wikitext2", "--seqlen", "2048", "--max-tokens", "8192"]
    results: dict = {"model": MODEL, "weights_float32_bytes": WEIGHTS_BYTES, "calibration": "wikitext2, 16 x 256 tokens (default)",
                     "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1")}
    results["baseline"] = run(["--baseline"])
    results["analyze_whole"] = run([*analyze, "--out", str(scratch / "a")])
    results["analyze_blocks"] = run([*analyze, "--offload", "blocks", "--out", str(scratch / "b")])
    results["analyze_blocks_disk"] = run([*analyze, "--offload", "blocks", "--offload-dir", str(scratch / "off"), "--out", str(scratch / "c")])
    results["ppl_whole"] = run([*ppl, "--out", str(scratch / "p1.json")])
    results["ppl_blocks"] = run([*ppl, "--offload", "blocks", "--out", str(scratch / "p2.json")])
    # the cap: what the block-by-block run needed, plus 128 MiB; the model gets less than its weights under it
    cap = (results["analyze_blocks"]["peak_address_space_mib"] + 128) * MiB
    results["cap_bytes"] = cap
    results["cap_minus_baseline_mib"] = round((cap - results["baseline"]["peak_address_space_mib"] * MiB) / MiB)
    results["analyze_whole_capped"] = run([*analyze, "--out", str(scratch / "d")], cap=cap)
    results["analyze_blocks_capped"] = run([*analyze, "--offload", "blocks", "--out", str(scratch / "e")], cap=cap)
    a, b = (json.loads((scratch / name / "analysis.json").read_text()) for name in ("a", "b"))
    results["max_abs_difference_block_influence"] = max(abs(x - y) for x, y in zip(a["block_influence"], b["block_influence"]))
    results["max_abs_difference_similarity"] = max(abs(x - y) for r, s in zip(a["similarity"], b["similarity"]) for x, y in zip(r, s))
    p1, p2 = (json.loads((scratch / name).read_text())["perplexity"]["wikitext2"]["perplexity"] for name in ("p1.json", "p2.json"))
    results["perplexity_whole_vs_blocks"] = [p1, p2]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


def build_deep(folder: Path, repeat: int) -> int:
    """SmolLM2-135M with its blocks repeated ``repeat`` times (real weights, so the hidden states are realistic)."""
    import shutil  # noqa: PLC0415

    from safetensors.torch import load_file, save_file  # noqa: PLC0415

    from foldgpt.formats.loading import resolve_model_path  # noqa: PLC0415

    source = resolve_model_path(MODEL)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = load_file(source / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    depth = config["num_hidden_layers"]
    deep = {}
    for key, tensor in tensors.items():
        if key.startswith("model.layers."):
            index, rest = key[len("model.layers."):].split(".", 1)
            for copy in range(repeat):
                deep[f"model.layers.{copy * depth + int(index)}.{rest}"] = tensor.clone()
        else:
            deep[key] = tensor
    save_file(deep, folder / "model.safetensors", metadata={"format": "pt"})
    config["num_hidden_layers"] = depth * repeat
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = config["layer_types"] * repeat
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in source.iterdir():
        if name.name not in ("model.safetensors", "config.json"):
            shutil.copyfile(name, folder / name.name)
    return sum(t.numel() * t.element_size() for t in deep.values())


def main_deep(repeat: int) -> None:
    out = Path(__file__).parent / "results" / "blockwise_memory_deep.json"
    scratch = Path(tempfile.mkdtemp(prefix="foldgpt-bench-deep-"))
    folder = scratch / f"smollm2-x{repeat}"
    weights = build_deep(folder, repeat)
    cap = 2 * 2**30
    analyze = ["analyze", str(folder), "--nsamples", "4", "--overwrite"]
    results: dict = {"model": f"SmolLM2-135M, blocks repeated {repeat} times", "blocks": 30 * repeat,
                     "weights_float32_bytes": weights, "cap_bytes": cap, "calibration": "wikitext2, 4 x 256 tokens",
                     "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1")}
    results["analyze_blocks_capped"] = run([*analyze, "--offload", "blocks", "--out", str(scratch / "b")], cap=cap)
    results["analyze_whole_capped"] = run([*analyze, "--out", str(scratch / "a")], cap=cap)
    results["analyze_whole"] = run([*analyze, "--out", str(scratch / "a")])
    a, b = (json.loads((scratch / name / "analysis.json").read_text()) for name in ("a", "b"))
    results["max_abs_difference_block_influence"] = max(abs(x - y) for x, y in zip(a["block_influence"], b["block_influence"]))
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    import shutil  # noqa: PLC0415

    shutil.rmtree(scratch)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--deep":
        main_deep(int(sys.argv[2]))
    else:
        main()
