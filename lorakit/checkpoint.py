"""PEFT-compatible adapter files: adapter_config.json + adapter_model.safetensors, both ways.

Keys are exactly PEFT's: `base_model.model.<module path>.lora_A.weight` (adapter name dropped),
`lora_embedding_A`, `lora_magnitude_vector`, `<path>.base_layer.bias` for a LoRA layer's bias,
and modules_to_save copies at the module's plain path.
"""
from __future__ import annotations

import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .inject import LoraModel, is_adapter_internal

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


def adapter_slots(lora_model: LoraModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """PEFT key -> the live tensor in the model, for everything one adapter saves."""
    config = lora_model.peft_config[adapter_name]
    slots: dict[str, torch.Tensor] = {}
    for path, layer in lora_model.lora_layers():
        for key, param in layer.adapter_parameters(adapter_name).items():
            container, _adapter, *rest = key.split(".")
            slots[".".join([f"{PREFIX}{path}", container, *rest])] = param
    if config.bias != "none":
        layer_paths = {p for p, layer in lora_model.lora_layers() if adapter_name in layer.r}
        for name, param in lora_model.model.named_parameters():
            owner = name.rpartition(".")[0]
            if not name.endswith("bias") or is_adapter_internal(name):
                continue
            if owner in layer_paths:
                slots[f"{PREFIX}{owner}.base_layer.bias"] = param
            elif config.bias == "all":
                slots[f"{PREFIX}{name}"] = param
    for path, module in lora_model.saved_modules():
        if adapter_name in module.modules_to_save:
            for key, tensor in module.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                slots[f"{PREFIX}{path}.{key}"] = tensor
    return slots


def adapter_state_dict(lora_model: LoraModel, adapter_name: str) -> dict[str, torch.Tensor]:
    return {k: t.detach().contiguous() for k, t in adapter_slots(lora_model, adapter_name).items()}


def save_adapter(lora_model: LoraModel, directory: str | os.PathLike, adapter_name: str) -> None:
    """Write adapter_config.json and adapter_model.safetensors, each replaced atomically."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, WEIGHTS_NAME)
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(adapter_state_dict(lora_model, adapter_name), tmp, metadata={"format": "pt"})
    os.replace(tmp, path)
    lora_model.peft_config[adapter_name].save_pretrained(directory)


def read_adapter_file(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an adapter folder: safetensors, or a .bin read with weights_only (never unpickled)."""
    st_path = os.path.join(directory, WEIGHTS_NAME)
    bin_path = os.path.join(directory, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(st_path):
        try:
            return load_file(st_path, device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{st_path}: corrupt or truncated safetensors file ({err}); save the adapter again") from err
    if os.path.isfile(bin_path):
        try:
            state = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"{bin_path}: cannot be read as a weights-only torch file ({err}); "
                             "lorakit never unpickles arbitrary objects: convert it to safetensors") from err
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{bin_path}: expected a dict of tensors")
        return state
    raise FileNotFoundError(f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {os.fspath(directory)!r}")


def _normalise_key(key: str) -> str:
    """Older PEFT files store DoRA's magnitude as `lora_magnitude_vector.weight`."""
    return key[: -len(".weight")] if key.endswith("lora_magnitude_vector.weight") else key


def load_adapter_weights(lora_model: LoraModel, adapter_name: str, tensors: dict[str, torch.Tensor],
                         source: str) -> None:
    """Copy a PEFT-format state dict into the adapter, refusing anything that does not fit."""
    slots = adapter_slots(lora_model, adapter_name)
    tensors = {_normalise_key(k): v for k, v in tensors.items()}
    unexpected = sorted(set(tensors) - set(slots))
    missing = sorted(k for k in set(slots) - set(tensors) if not k.endswith("bias"))
    if unexpected or missing:
        raise ValueError(
            f"adapter {source} does not fit this model ({type(lora_model.model).__name__}): "
            f"{len(unexpected)} tensors in the file have no place here (e.g. {unexpected[:3]}), "
            f"{len(missing)} adapter weights are missing from the file (e.g. {missing[:3]}). "
            "Was it trained for another architecture or with another config?"
        )
    for key, tensor in tensors.items():
        slot = slots[key]
        if slot.shape != tensor.shape:
            module = key[len(PREFIX):]
            raise ValueError(
                f"adapter {source}: {module} has shape {tuple(tensor.shape)} in the file but "
                f"{tuple(slot.shape)} in the model; the adapter was made for a model of other dimensions "
                "(or its adapter_config.json has another r)"
            )
    with torch.no_grad():
        for key, tensor in tensors.items():
            slots[key].copy_(tensor.to(slots[key].dtype))

