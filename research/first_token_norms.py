"""The norm of the hidden state at each window's first position against the rest, before and after angular's
8-block span (11-18) of SmolLM2-135M: why a least-squares map fitted on short windows is dominated by first tokens.

    OMP_NUM_THREADS=1 python research/first_token_norms.py

4 WikiText-2 validation windows of 256 tokens (seed 0). ``hidden_states[k]`` is the stream after block k-1.
"""

import torch

from foldgpt.data.windows import load_windows
from foldgpt.formats.loading import load_model

loaded = load_model("smollm2-135m")
windows = load_windows(loaded.tokenizer, "wikitext2", 4, 256, 0)
with torch.no_grad():
    states = loaded.model(windows, output_hidden_states=True).hidden_states
for index in (11, 19):
    norms = states[index].norm(dim=-1)
    print(f"after block {index - 1}: position 0 {norms[:, 0].mean():.0f}, positions 1-3 {norms[:, 1:4].mean():.0f}, "
          f"the rest {norms[:, 4:].mean():.0f}")
