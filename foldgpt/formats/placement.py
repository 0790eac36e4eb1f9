"""Placing a loaded model on devices: one device, or its blocks spread over several with accelerate."""

from __future__ import annotations

from typing import Any

import torch

from foldgpt.arch.adapters import adapter_for
from foldgpt.errors import FoldGPTError
from foldgpt.formats.loading import load_model

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def load_placed(spec: str, dtype: str = "float32", device: str = "cpu", device_map: str | None = None,
                trust_remote_code: bool = False):
    """``load_model``, then with ``device_map`` the blocks spread over the visible devices by accelerate.

    ``device_map`` is ``auto`` / ``balanced`` / ``balanced_low_0`` (every block whole on one device, the blocks
    balanced over the GPUs), ``sequential`` (fill GPU 0 first), or one device (``cpu``, ``cuda:1``). The model is read
    on the CPU first (so compact and GGUF folders work the same way), then dispatched: accelerate moves each block's
    input to its device, and the logits come out on the last block's device. Shared (folded) weights stay one
    Parameter, so a group is kept on one device. ``trust_remote_code`` as in ``load_model``.
    """

    if device_map is None:
        return load_model(spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    loaded = load_model(spec, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code)
    loaded.model = dispatch(loaded.model, device_map)
    return loaded


def dispatch(model: Any, device_map: str) -> Any:
    """``model`` placed according to ``device_map`` (see ``load_placed``); a strategy sets ``model.hf_device_map``."""
    from accelerate import dispatch_model, infer_auto_device_map  # noqa: PLC0415
    from accelerate.utils import get_balanced_memory  # noqa: PLC0415


    if device_map in DEVICE_MAP_STRATEGIES:
        layers = adapter_for(model).layers(model)
        no_split = sorted({type(layer).__name__ for layer in layers})
        max_memory = None
        if device_map != "sequential":
            max_memory = get_balanced_memory(model, no_split_module_classes=no_split, low_zero=device_map == "balanced_low_0")
        placement = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    else:
        try:
            torch.empty(0, device=device_map)
        except (RuntimeError, ValueError) as error:
            raise FoldGPTError(
                f"--device-map '{device_map}' is neither one of {', '.join(DEVICE_MAP_STRATEGIES)} nor a usable device "
                f"({str(error).splitlines()[0]})"
            ) from error
        return model.to(device_map)  # one device: no dispatch hooks needed
    if any(str(where) == "disk" for where in placement.values()):
        raise FoldGPTError("--device-map: the model does not fit in GPU and CPU memory (accelerate would offload it to disk)")
    return dispatch_model(model, device_map=placement)
