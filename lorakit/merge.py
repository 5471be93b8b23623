"""Merging adapters into the base weights, and taking the LoRA layers out again."""
from __future__ import annotations

from torch import nn

from .inject import LoraModel, _replace_module


def merge_adapter(lora_model: LoraModel, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
    """Fold adapters (default: the active ones) into the base weights; unmerge_adapter undoes it."""
    names = adapter_names if adapter_names is not None else lora_model.active_adapters
    lora_model._check_exists(names)
    for _, layer in lora_model.lora_layers():
        layer.merge(names, safe_merge=safe_merge)


def unmerge_adapter(lora_model: LoraModel) -> None:
    """Undo every merge, last merged first."""
    for _, layer in lora_model.lora_layers():
        layer.unmerge()


def unload(lora_model: LoraModel, merge: bool = False, safe_merge: bool = False,
           adapter_names: list[str] | None = None) -> nn.Module:
    """Give back the plain model: LoRA layers replaced by their base modules (merged first if asked),
    modules_to_save replaced by the active adapter's trained copy."""
    if merge:
        merge_adapter(lora_model, adapter_names, safe_merge)
    model = lora_model.model
    for name, layer in list(lora_model.lora_layers()):
        _replace_module(model, name, layer.base_layer)
    for name, module in list(lora_model.saved_modules()):
        replacement = module.modules_to_save[module.active_adapter] if module.active_adapter else module.base_layer
        _replace_module(model, name, replacement)
    return model
