"""Block-by-block ("sequential") execution for the calibration-only stages: analysis, bi, angular, SLEB and perplexity.

The model is built on the meta device; only the tensors outside the decoder blocks (embedding, final norm, head)
are read from the safetensors files up front. Every calibration window is embedded once, then the blocks run one at
a time: block ``i``'s tensors are read from disk onto the compute device, all windows go through it, the statistics
are recorded and the block is put back on the meta device before block ``i + 1`` is read. So the weights in memory
are the outer tensors plus one block, whatever the depth; the hidden states of the calibration set (``n x seq x d``)
stay on the CPU, or in a file with ``offload_dir``.

The blocks are called with exactly the arguments the model's own forward passes them: the model's forward is run
with its blocks replaced by stand-ins (:class:`_Stage`) that record each block's arguments (attention mask -- the
sliding-window one for Gemma/Qwen2 sliding layers --, rotary position embeddings, position ids ...) and stop before
the final norm. Perplexity runs the forward once more per window with stand-ins that return the last block's stored
output, so the final norm, head and any logit soft-capping are the model's own.

SLEB (:func:`blockwise_sleb`) reads every block once per greedy step, not once per candidate: it carries one
hidden-state stream per candidate removal through a single sweep (see :func:`_sleb_step`).

Tensors are read with plain positioned reads (no memory mapping), so neither the weight files nor the offloaded
hidden states count towards the process's resident memory or address space.
"""

from __future__ import annotations

import copy
import json
import math
import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from foldgpt.arch.adapters import ArchitectureAdapter, adapter_for, hidden_of
from foldgpt.errors import FoldGPTError
from foldgpt.formats.compact import is_compact_folder
from foldgpt.formats.loading import DTYPES, load_config, resolve_model_path

OFFLOAD_MODES = ("none", "blocks")
"""``--offload`` choices: ``none`` loads the whole model; ``blocks`` runs the calibration-only stages block by block."""


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def read_exact(path: Path, offset: int, out: torch.Tensor) -> None:
    """Fill the contiguous CPU tensor ``out`` with bytes of ``path`` from ``offset`` (positioned read, no mmap)."""
    view = out.view(torch.uint8).numpy().data.cast("B") if out.numel() else memoryview(b"")
    with open(path, "rb", buffering=0) as handle:
        handle.seek(offset)
        done = 0
        while done < len(view):
            count = handle.readinto(view[done:])
            if not count:
                raise FoldGPTError(f"'{path}' is truncated: expected {len(view)} bytes at offset {offset}")
            done += count


class SafetensorsFolder:
    """Lazy reader of a model folder's safetensors weights (one file, or shards listed in ``model.safetensors.index.json``)."""

    def __init__(self, folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise FoldGPTError(f"'{folder}' has no model.safetensors (or index); block-by-block runs read safetensors weights")
        self.entries: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        for name in files:
            path = folder / name
            try:
                with open(path, "rb") as handle:
                    (length,) = struct.unpack("<Q", handle.read(8))
                    header = json.loads(handle.read(length))
            except (OSError, ValueError, struct.error) as error:
                raise FoldGPTError(f"cannot read the safetensors header of '{path}': {error}") from error
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                start, end = info["data_offsets"]
                self.entries[key] = (path, _ST_DTYPES[info["dtype"]], tuple(info["shape"]), 8 + length + start, end - start)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def read(self, key: str) -> torch.Tensor:
        """The tensor ``key``, read into fresh CPU memory."""
        path, dtype, shape, offset, nbytes = self.entries[key]
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        read_exact(path, offset, buffer)
        return buffer.view(dtype).reshape(shape)


class _Stop(Exception):
    """Raised by the last stand-in block to end a forward pass once every block's arguments are recorded."""


class _Stage(nn.Module):
    """Stands in for decoder block ``index`` inside the model's forward (see :class:`BlockwiseModel`)."""

    def __init__(self, owner: StagedBlocks, index: int) -> None:
        super().__init__()
        self.index = index
        self._owner = [owner]  # a list, so that the owner is not registered as a sub-module

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return self._owner[0]._stage(self.index, hidden_states, args, kwargs)


class HiddenStates:
    """The hidden states of every calibration batch between two blocks: on the CPU, or in a file (``folder``)."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self.memory: list[torch.Tensor] = []
        self.slots: list[tuple[int, torch.Size, torch.dtype]] = []  # offset, shape, dtype in the file
        self.path = None if folder is None else folder / "hidden_states.bin"
        if self.path is not None:
            self.path.write_bytes(b"")

    def append(self, hidden: torch.Tensor) -> None:
        if self.path is None:
            self.memory.append(hidden.detach().to("cpu"))
            return
        offset = self.slots[-1][0] + _nbytes(self.slots[-1][1], self.slots[-1][2]) if self.slots else 0
        self.slots.append((offset, hidden.shape, hidden.dtype))
        self._write(len(self.slots) - 1, hidden)

    def __len__(self) -> int:
        return len(self.memory) if self.path is None else len(self.slots)

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.path is None:
            return self.memory[index]
        offset, shape, dtype = self.slots[index]
        out = torch.empty(shape, dtype=dtype)
        read_exact(self.path, offset, out)
        return out

    def __setitem__(self, index: int, hidden: torch.Tensor) -> None:
        if self.path is None:
            self.memory[index] = hidden.detach().to("cpu")
        else:
            self._write(index, hidden)

    def _write(self, index: int, hidden: torch.Tensor) -> None:
        offset, _, _ = self.slots[index]
        assert self.path is not None
        data = hidden.detach().to("cpu").contiguous().view(torch.uint8).numpy()
        with open(self.path, "r+b") as handle:
            handle.seek(offset)
            handle.write(data.data.cast("B"))


def _nbytes(shape: torch.Size, dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty(0, dtype=dtype).element_size()


class StagedBlocks:
    """Running a model's decoder blocks one call at a time, each with exactly the arguments its forward gives it.

    :meth:`embed` runs the model's forward with stand-ins (:class:`_Stage`) in place of the blocks: they record each
    block's arguments for the batch's shape and stop before the final norm. :meth:`run_block` then calls a real
    block with them. A subclass sets ``model``, ``adapter``, ``blocks``, ``num_blocks`` and ``device``, and says in
    :meth:`_staged` how the stand-ins get into the model.
    """

    model: PreTrainedModel
    adapter: ArchitectureAdapter
    blocks: list[nn.Module]
    num_blocks: int
    device: torch.device

    def __init__(self) -> None:
        self._mode = "capture"
        self._captured: list[tuple[tuple, dict]] = []
        self._first_hidden: torch.Tensor | None = None
        self._final_hidden: torch.Tensor | None = None
        self._arguments: dict[tuple[int, ...], list[tuple[tuple, dict]]] = {}

    def _staged(self) -> AbstractContextManager:
        """While inside, the model's layer list holds the stand-ins."""
        return nullcontext()

    def load_block(self, index: int) -> nn.Module:
        return self.blocks[index]

    def free_block(self, index: int) -> None:
        """Nothing to free for blocks in memory."""

    # the model's own forward, with stand-in blocks -------------------------------------------------------------

    def _stage(self, index: int, hidden: torch.Tensor, args: tuple, kwargs: dict):
        if self._mode == "capture":
            if index == 0:
                self._first_hidden = hidden
            self._captured.append((args, kwargs))
            if index == self.num_blocks - 1:
                raise _Stop
            return hidden
        return self._final_hidden if index == self.num_blocks - 1 else hidden

    @torch.no_grad()
    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """The first block's input for ``batch``; records the arguments every block gets for this batch shape."""
        self._mode, self._captured = "capture", []
        try:
            with self._staged():
                self.model(input_ids=batch.to(self.device), use_cache=False)
        except _Stop:
            pass
        else:  # pragma: no cover - every supported family calls each block
            raise FoldGPTError("the model's forward did not call every decoder block")
        self._arguments.setdefault(tuple(batch.shape), self._captured)
        hidden, self._first_hidden, self._captured = self._first_hidden, None, []
        assert hidden is not None
        return hidden

    @torch.no_grad()
    def run_block(self, index: int, hidden: torch.Tensor, batch_shape: Sequence[int]) -> torch.Tensor:
        """Block ``index`` (loaded) on ``hidden``, with the arguments the model's forward gives it."""
        return self.call_block(index, hidden, batch_shape)

    def call_block(self, index: int, hidden: torch.Tensor, batch_shape: Sequence[int]) -> torch.Tensor:
        """:meth:`run_block` with autograd on: for fitting a block's own parameters to recorded outputs."""
        args, kwargs = self._arguments[tuple(batch_shape)][index]
        return hidden_of(self.blocks[index](hidden.to(self.device), *args, **kwargs))


class ResidentBlocks(StagedBlocks):
    """:class:`StagedBlocks` over a model already in memory (``--offload none``): the same block-by-block algorithms
    (linear replacement) run on it, with the stand-ins swapped in only while a batch is embedded."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model
        self.adapter = adapter_for(model)
        self.blocks = list(self.adapter.layers(model))
        self.num_blocks = len(self.blocks)
        self.device = next(model.parameters()).device

    @contextmanager
    def _staged(self) -> Iterator[None]:
        layers = self.adapter.layers(self.model)
        self.adapter.set_layers(self.model, nn.ModuleList(_Stage(self, i) for i in range(self.num_blocks)))
        try:
            yield
        finally:
            self.adapter.set_layers(self.model, layers)


class BlockwiseModel(StagedBlocks):
    """A model whose decoder blocks are read from disk one at a time (see the module docstring).

    ``spec`` is what ``load_model`` accepts, restricted to safetensors folders (or the alias ``smollm2-135m``).
    ``loaded_blocks`` is the set of blocks whose weights are materialised now; ``max_loaded_blocks`` the most ever
    materialised at once (1 for every run of this module).
    """

    def __init__(self, spec: str, dtype: str = "float32", device: str = "cpu") -> None:
        from accelerate import init_empty_weights  # noqa: PLC0415
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415


        super().__init__()
        if dtype not in DTYPES:
            raise FoldGPTError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
        path = resolve_model_path(spec)
        if path.is_file():
            raise FoldGPTError(f"--offload blocks reads safetensors folders lazily; '{spec}' is a GGUF file (convert it to a folder first)")
        if is_compact_folder(path):
            raise FoldGPTError(f"--offload blocks does not read folded (compact) folders; export '{spec}' with 'foldgpt export --plain' first")
        config = load_config(path)
        self.adapter = adapter_for(config)
        self.source = str(path)
        self.dtype = DTYPES[dtype]
        self.device = torch.device(device)
        self.weights = SafetensorsFolder(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        self.model = model.eval()
        self.config = model.config
        self.blocks = list(self.adapter.layers(model))
        self.num_blocks = len(self.blocks)
        # every parameter once, with all the (module, attribute) places it sits (tied embedding and head)
        groups: dict[int, list[tuple[str, nn.Module, str]]] = {}
        for module_name, module in model.named_modules(remove_duplicate=False):
            for name, parameter in module.named_parameters(recurse=False):
                full = f"{module_name}.{name}" if module_name else name
                groups.setdefault(id(parameter), []).append((full, module, name))
        self._tie_embeddings(groups)
        prefix = self.adapter.layers_path + "."
        self._block_groups: list[list[list[tuple[str, nn.Module, str]]]] = [[] for _ in self.blocks]
        outer = []
        for places in groups.values():
            full = places[0][0]
            if full.startswith(prefix):
                self._block_groups[int(full[len(prefix):].split(".")[0])].append(places)
            else:
                outer.append(places)
        for module in model.modules():  # rotary inverse frequencies, Gemma's embedding scale: real, small, to the device
            for name, buffer in module.named_buffers(recurse=False):
                module._buffers[name] = buffer.to(self.device)
        for places in outer:
            self._materialise(places)
        self.adapter.set_layers(model, nn.ModuleList(_Stage(self, i) for i in range(self.num_blocks)))
        self.loaded_blocks: set[int] = set()
        self.max_loaded_blocks = 0

    def skeleton(self) -> PreTrainedModel:
        """A fresh copy of the model on the meta device, with its real (weightless) blocks: for counting parameters
        and FLOPs and for removing blocks from the config without reading any weights."""
        from accelerate import init_empty_weights  # noqa: PLC0415
        from transformers import AutoModelForCausalLM  # noqa: PLC0415

        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(copy.deepcopy(self.config), dtype=self.dtype).eval()
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
        if getattr(text_config, "tie_word_embeddings", False) and head is not None and embedding is not None:
            head.weight = embedding.weight  # tied, as a loaded model is (the empty-weights context unties them)
        return model

    @property
    def hidden_size(self) -> int:
        weight = self.model.get_input_embeddings().weight
        assert isinstance(weight, torch.Tensor)
        return weight.shape[-1]

    # weights ---------------------------------------------------------------------------------------------------

    def _tie_embeddings(self, groups: dict[int, list[tuple[str, nn.Module, str]]]) -> None:
        """One parameter for a tied input embedding and head (the empty-weights context unties them)."""
        text_config = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        head, embedding = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        if not getattr(text_config, "tie_word_embeddings", False) or head is None or embedding is None:
            return
        head_id, embedding_id = id(head.weight), id(embedding.weight)
        if head_id != embedding_id and head_id in groups and embedding_id in groups:
            groups[embedding_id].extend(groups.pop(head_id))

    def _renamed_keys(self) -> dict[str, str]:
        """Model parameter name -> checkpoint key, for the renamings transformers applies on loading (GPT-NeoX's
        ``embed_out`` -> ``lm_head``, legacy ``gamma``/``beta``)."""
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping  # noqa: PLC0415
            from transformers.core_model_loading import WeightRenaming  # noqa: PLC0415

            renamings = [t for t in get_model_conversion_mapping(self.model) if type(t) is WeightRenaming]
        except (ImportError, AttributeError, TypeError):  # pragma: no cover - other transformers versions
            return {}
        renamed: dict[str, str] = {}
        for key in self.weights.entries:
            for transform in renamings:
                if len(transform.target_patterns) != 1:
                    continue
                for source in transform.source_patterns:
                    new = re.sub(source, transform.target_patterns[0], key)
                    if new != key:
                        renamed.setdefault(new, key)
        return renamed

    def _checkpoint_key(self, places: list[tuple[str, nn.Module, str]]) -> str:
        base = getattr(self.model, "base_model_prefix", "") + "."
        if not hasattr(self, "_renamed"):
            self._renamed = self._renamed_keys()
        for full, _, _ in places:
            for key in (full, full.removeprefix(base), base + full):
                if key in self.weights:
                    return key
                if key in self._renamed:
                    return self._renamed[key]
        raise FoldGPTError(f"the weights of '{self.source}' lack '{places[0][0]}'; check that its safetensors files are complete")

    def _materialise(self, places: list[tuple[str, nn.Module, str]]) -> None:
        _, module, name = places[0]
        meta = module._parameters[name]
        assert meta is not None
        tensor = self.weights.read(self._checkpoint_key(places))
        if tuple(tensor.shape) != tuple(meta.shape):
            raise FoldGPTError(f"'{places[0][0]}' has shape {tuple(tensor.shape)} on disk but {tuple(meta.shape)} in the config")
        dtype = self.dtype if tensor.is_floating_point() else tensor.dtype
        parameter = nn.Parameter(tensor.to(device=self.device, dtype=dtype), requires_grad=False)
        for _, owner, attribute in places:
            owner._parameters[attribute] = parameter

    def load_block(self, index: int) -> nn.Module:
        """Read block ``index``'s tensors onto the compute device; the block, ready to run."""
        if index not in self.loaded_blocks:
            self._meta_params = getattr(self, "_meta_params", {})
            self._meta_params[index] = [[(owner, attr, owner._parameters[attr]) for _, owner, attr in places]
                                        for places in self._block_groups[index]]
            for places in self._block_groups[index]:
                self._materialise(places)
            self.loaded_blocks.add(index)
            self.max_loaded_blocks = max(self.max_loaded_blocks, len(self.loaded_blocks))
        return self.blocks[index]

    def checkpoint_key(self, index: int, name: str) -> str:
        """The key in the checkpoint of parameter ``name`` (relative to block ``index``, e.g. ``mlp.down_proj.weight``)."""
        full = f"{self.adapter.layers_path}.{index}.{name}"
        for places in self._block_groups[index]:
            if any(place[0] == full for place in places):
                return self._checkpoint_key(places)
        raise FoldGPTError(f"block {index} of '{self.source}' has no parameter '{name}'")

    def free_block(self, index: int) -> None:
        """Put block ``index`` back on the meta device (its weights are freed)."""
        if index in self.loaded_blocks:
            for group in self._meta_params.pop(index):
                for owner, attribute, meta in group:
                    owner._parameters[attribute] = meta
            self.loaded_blocks.discard(index)

    @torch.no_grad()
    def logits(self, batch: torch.Tensor, final_hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits for ``batch`` given its last block's output (final norm, head, soft-capping)."""
        self._mode, self._final_hidden = "replay", final_hidden.to(self.device)
        try:
            return self.model(input_ids=batch.to(self.device), use_cache=False).logits
        finally:
            self._mode, self._final_hidden = "capture", None

    @torch.no_grad()
    def sweep(self, windows: torch.Tensor, batch_size: int, visit, offload_dir: Path | None = None, desc: str = "blocks") -> HiddenStates:
        """Run every window through every block, block by block; ``visit(index, batch_number, rows, x, y)`` sees each
        block's input and output per batch. Returns the last block's outputs."""
        batches = window_batches_of(windows, batch_size)
        states = HiddenStates(offload_dir)
        for batch in batches:
            states.append(self.embed(batch))
        for index in tqdm(range(self.num_blocks), desc=desc, leave=False):
            self.load_block(index)
            row = 0
            for number, batch in enumerate(batches):
                x = states[number].to(self.device)
                y = self.run_block(index, x, batch.shape)
                visit(index, number, slice(row, row + len(batch)), x, y)
                states[number] = y
                row += len(batch)
            self.free_block(index)
        return states


# the statistics --------------------------------------------------------------------------------------------------


# SLEB ------------------------------------------------------------------------------------------------------------


# the workflows ---------------------------------------------------------------------------------------------------


_ST_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items()}
SHARD_BYTES = 5 * 2**30


def write_without_blocks(runner: BlockwiseModel, skeleton: PreTrainedModel, removed: Sequence[int], folder: Path,
                         replaced: Mapping[str, torch.Tensor] | None = None) -> None:
    """A vanilla HF folder of ``runner``'s model without the blocks ``removed``: the checkpoint's tensors (in the run's
    dtype) copied one at a time, the kept blocks renumbered, those keyed in ``replaced`` (checkpoint keys) written from
    there instead; ``skeleton`` carries the shrunk config."""
    replaced = replaced or {}
    import shutil  # noqa: PLC0415

    removed_set = set(removed)
    kept = [i for i in range(runner.num_blocks) if i not in removed_set]
    new_index = {old: new for new, old in enumerate(kept)}
    base = getattr(skeleton, "base_model_prefix", "") + "."
    prefixes = {runner.adapter.layers_path + ".", runner.adapter.layers_path.removeprefix(base) + "."}
    plan: list[tuple[str, str, torch.dtype, tuple[int, ...]]] = []  # (new key, old key, dtype, shape)
    for key, (_, dtype, shape, _, _) in runner.weights.entries.items():
        new_key: str | None = key
        for prefix in prefixes:
            if key.startswith(prefix):
                index, rest = key[len(prefix):].split(".", 1)
                new_key = None if int(index) in removed_set else f"{prefix}{new_index[int(index)]}.{rest}"
                break
        if new_key is not None:
            plan.append((new_key, key, runner.dtype if dtype.is_floating_point else dtype, shape))
    plan.sort()
    shards: list[list[tuple[str, str, torch.dtype, tuple[int, ...]]]] = [[]]
    size = 0
    for entry in plan:
        nbytes = _nbytes(torch.Size(entry[3]), entry[2])
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        header: dict[str, object] = {}
        offset = 0
        for new_key, _, dtype, shape in shard:
            nbytes = _nbytes(torch.Size(shape), dtype)
            header[new_key] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[new_key] = name
        header["__metadata__"] = {"format": "pt"}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(folder / name, "wb") as handle:
            handle.write(struct.pack("<Q", len(encoded)))
            handle.write(encoded)
            for _, old_key, dtype, _ in shard:
                tensor = (replaced[old_key] if old_key in replaced else runner.weights.read(old_key)).to(dtype).contiguous()
                handle.write(tensor.view(torch.uint8).numpy().data.cast("B"))
    if len(shards) > 1:
        total = sum(_nbytes(torch.Size(shape), dtype) for _, _, dtype, shape in plan)
        index_file = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2) + "\n")
    skeleton.config.dtype = runner.dtype
    skeleton.config.save_pretrained(folder)
    generation = Path(runner.source) / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, folder / "generation_config.json")
    runner.tokenizer.save_pretrained(folder)


def window_batches_of(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [windows[start : start + batch_size] for start in range(0, len(windows), batch_size)]
