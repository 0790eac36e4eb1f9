"""GGUF export read back by transformers: SmolLM2-135M with 6 of 30 blocks removed by Block Influence (8 x 256
calibration windows), perplexity on 8 x 512 WikiText-2 test windows and the largest logit difference, per type.

    OMP_NUM_THREADS=1 python benchmarks/gguf_roundtrip.py OUT_DIR

llama.cpp itself is not run here (see issue 25): this measures the file's fidelity through transformers' reader.
"""

import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from foldgpt.cli.main import main
from foldgpt.data.text import load_text
from foldgpt.data.windows import evaluation_windows, tokenize
from foldgpt.eval.perplexity import windows_perplexity
from foldgpt.formats.gguf_export import export_gguf
from foldgpt.formats.loading import load_model

d = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/gguf_roundtrip")
d.mkdir(parents=True, exist_ok=True)
if not (d / "p").exists():
    assert main(["prune", "smollm2-135m", "--method", "bi", "--remove", "6", "--nsamples", "8", "--seqlen", "256", "--out", str(d / "p")]) == 0
ref = load_model(str(d / "p"))
win = evaluation_windows(tokenize(ref.tokenizer, load_text("wikitext2", "evaluation")), 512, 8 * 512)
with torch.no_grad():
    base = windows_perplexity(ref.model, win, progress=False)
    ids = win[:1, :128]
    base_logits = ref.model(ids).logits
print(f"folder (SmolLM2-135M, 6 of 30 removed by BI): ppl {base:.3f} on {len(win)} x 512 WikiText-2 test windows", flush=True)
for kind in ("f32", "f16", "bf16", "q8_0"):
    t = time.perf_counter()
    out = export_gguf(load_model(str(d / "p")), d / f"p.{kind}.gguf", kind, overwrite=True)
    secs = time.perf_counter() - t
    g = AutoModelForCausalLM.from_pretrained(d / "p", gguf_file=str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        ppl = windows_perplexity(g, win, progress=False)
        diff = (g(ids).logits - base_logits).abs().max().item()
    print(f"{kind}: {out.stat().st_size / 2**20:.1f} MiB, written in {secs:.1f}s, ppl {ppl:.3f} ({(ppl / base - 1) * 100:+.3f}%), max |logit diff| {diff:.2e}", flush=True)
