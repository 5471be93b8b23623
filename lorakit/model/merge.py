"""Merging adapters into the base weights, and taking the LoRA layers out again."""
from __future__ import annotations

import warnings

from torch import nn

from lorakit.model.lora_model import LoraModel
from lorakit.modules import replace_module

QUANTIZED_MERGES = ("dequantize", "requantize")


def merge_adapter(lora_model: LoraModel, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
    """Fold adapters (default: the active ones) into the base weights; unmerge_adapter undoes it."""
    names = adapter_names if adapter_names is not None else lora_model.active_adapters
    lora_model._check_exists(names)
    quantized = [name for name, layer in lora_model.lora_layers() if getattr(layer, "is_quantized", False)]
    if quantized:
        raise ValueError(f"cannot merge into 4-bit base weights in place ({quantized[0]}, ...); use "
                         "merge_and_unload(quantized_merge='dequantize') for a 16/32-bit merged model, or "
                         "'requantize' to merge and quantise again (losing precision)")
    for _, layer in lora_model.lora_layers():
        layer.merge(names, safe_merge=safe_merge)


def unmerge_adapter(lora_model: LoraModel) -> None:
    """Undo every merge, last merged first."""
    for _, layer in lora_model.lora_layers():
        layer.unmerge()


def unload(lora_model: LoraModel, merge: bool = False, safe_merge: bool = False,
           adapter_names: list[str] | None = None, quantized_merge: str | None = None) -> nn.Module:
    """Give back the plain model: LoRA layers replaced by their base modules (merged first if asked),
    modules_to_save replaced by the active adapter's trained copy.

    Merging into a 4-bit base needs `quantized_merge`: 'dequantize' keeps the merged layer in the
    base's 16/32-bit dtype; 'requantize' quantises it to NF4 again, which rounds the update away
    in part (a warning says so).
    """
    requantize = []
    if merge:
        quantized = [(name, layer) for name, layer in lora_model.lora_layers() if getattr(layer, "is_quantized", False)]
        if quantized and quantized_merge not in QUANTIZED_MERGES:
            raise ValueError(f"the base weights are 4-bit; say how to merge into them: quantized_merge="
                             f"'dequantize' (a 16/32-bit merged model) or 'requantize' (back to NF4, losing "
                             f"precision); got {quantized_merge!r}")
        for _, layer in quantized:
            layer.dequantize_base()
        if quantized and quantized_merge == "requantize":
            warnings.warn("re-quantising merged weights to NF4 rounds away part of the LoRA update; outputs "
                          "will differ from the unmerged model. quantized_merge='dequantize' keeps them exact.",
                          stacklevel=3)
            requantize = [name for name, _ in quantized]
        merge_adapter(lora_model, adapter_names, safe_merge)
    model = lora_model.model
    for name, layer in list(lora_model.lora_layers()):
        replace_module(model, name, layer.base_layer)
    if requantize:
        from lorakit.quant.linear4bit import NF4Linear

        for name in requantize:
            merged = model.get_submodule(name)
            replace_module(model, name, NF4Linear.from_linear(merged).train(merged.training))
    for name, module in list(lora_model.saved_modules()):
        replacement = module.modules_to_save[module.active_adapter] if module.active_adapter else module.base_layer
        replace_module(model, name, replacement)
    return model
