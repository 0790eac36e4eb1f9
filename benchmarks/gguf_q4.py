"""foldgpt's q4_0 GGUF file against llama.cpp's own Q4_0 quantization of foldgpt's f16 file, both run in llama.cpp:
SmolLM2-135M with 6 blocks removed by bi (8 x 256 calibration windows), perplexity on 8 x 512 WikiText-2 test
windows (float32 KV cache).

    OMP_NUM_THREADS=1 python benchmarks/gguf_q4.py runs/gguf_q4
"""

import ctypes
import sys
from pathlib import Path

import llama_cpp
from gguf_speed import llama_cpp_perplexity

from foldgpt.data.config import CalibrationConfig
from foldgpt.data.text import load_text
from foldgpt.data.windows import evaluation_windows, tokenize
from foldgpt.formats.gguf_export import export_gguf
from foldgpt.formats.loading import load_model
from foldgpt.workflows.prune import prune

work = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/gguf_q4")
work.mkdir(parents=True, exist_ok=True)
if not (work / "p" / "config.json").is_file():
    prune(load_model("smollm2-135m"), "bi", remove=6, calibration=CalibrationConfig(nsamples=8), out=work / "p")
loaded = load_model(str(work / "p"))
windows = evaluation_windows(tokenize(loaded.tokenizer, load_text("wikitext2", "evaluation")), 512, 8 * 512)
f16 = export_gguf(loaded, work / "p.f16.gguf", "f16", overwrite=True)
ours = export_gguf(loaded, work / "p.q4_0.gguf", "q4_0", overwrite=True)
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
theirs = work / "p.llama-quantize.q4_0.gguf"
assert llama_cpp.llama_model_quantize(str(f16).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
for name, path in (("f16", f16), ("foldgpt q4_0", ours), ("llama.cpp's Q4_0 of the f16 file", theirs)):
    print(f"{name}: {path.stat().st_size / 2**20:.1f} MiB, perplexity {llama_cpp_perplexity(path, windows, 1):.2f}", flush=True)
