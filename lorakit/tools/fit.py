"""An adapter laid over a base model's structure: the base built with empty (meta) tensors from its
config.json, each adapted module found there and wrapped in lorakit's own LoRA layer, shapes checked."""
from __future__ import annotations

import copy

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.lora.layers import LoraLayer, lora_layer_class
from lorakit.model.adapter_files import PREFIX
from lorakit.tools.adapter import Adapter, LoraModule

NAME = "toolbox"  # the adapter's name inside the layers built here


def skeleton(folder: str, labels: list[str] | None = None) -> nn.Module:
    """The base model's modules with meta tensors (no memory), of the class config.json names; with `labels`,
    its sequence classifier for them (a fresh head)."""
    import transformers

    from lorakit.io.pretrained import head_fields, load_config

    config = load_config(folder)
    if getattr(config, "quantization_config", None):
        raise ValueError(f"{folder}/config.json has a quantization_config: the folder holds a quantised checkpoint; "
                         "give the full-precision base model the adapter was trained on")
    classes = [getattr(transformers, name, None) for name in (config.architectures or [])]
    cls = next((c for c in classes if c is not None), None)
    with torch.device("meta"):
        if labels is not None:
            config.update(head_fields("seq_cls", labels))
            return transformers.AutoModelForSequenceClassification.from_config(config).eval()
        if cls is not None:
            return cls(config).eval()
        try:
            return transformers.AutoModelForCausalLM.from_config(config).eval()
        except ValueError:
            return transformers.AutoModel.from_config(config).eval()


def find_module(model: nn.Module, path: str, base: str) -> nn.Module:
    """The module at `path`, or an error naming it and what the base model has instead."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        leaf = path.rsplit(".", 1)[-1]
        alike = [n for n, _ in model.named_modules() if n.endswith(f".{leaf}")][:3]
        raise ValueError(f"the adapter adapts {path}, which the base model {base} ({type(model).__name__}) does not "
                         f"have{f' (it has e.g. {alike})' if alike else ''}: the adapter was made for another "
                         "base model") from None


def lora_layer(module: nn.Module, lora: LoraModule, config: LoraConfig,
               weight: torch.Tensor | None = None) -> LoraLayer:
    """lorakit's LoRA layer around a copy of `module` (from the skeleton) holding `lora`'s tensors. With
    `weight` (the base weight as stored) it is real, so merged_weight works, DoRA included; without, the
    layer only checks the shapes. Raises naming the module when a shape does not fit."""
    base = copy.deepcopy(module)
    kind = lora_layer_class(base)
    if kind is None:
        raise ValueError(f"the adapter adapts {lora.path}, a {type(module).__name__} in the base model; LoRA adapts "
                         "Linear, Conv1D, Embedding and Conv2d layers")
    if weight is not None:
        base.weight = nn.Parameter(weight, requires_grad=False)
    layer = kind(base)
    dora = lora.magnitude is not None and weight is not None
    layer.add_adapter(NAME, lora.rank, lora.alpha, 0.0, config.use_rslora, dora, init=False)
    slots = {key.replace(f".{NAME}", "", 1): p for key, p in layer.adapter_parameters(NAME).items()}
    if lora.magnitude is not None and not dora:
        slots["lora_magnitude_vector"] = torch.empty(layer.out_features, device="meta")
    for suffix, tensor in lora.tensors.items():
        slot = slots.get(suffix)
        if slot is None or slot.shape != tensor.shape:
            shape = tuple(module.weight.shape)
            wanted = "no such tensor" if slot is None else f"shape {tuple(slot.shape)}"
            raise ValueError(f"adapter module {lora.path}: {suffix} has shape {tuple(tensor.shape)}, but the base "
                             f"model's {type(module).__name__} there (weight {shape}) needs {wanted}: the adapter was "
                             "made for another base model")
        if slot.device.type != "meta":
            with torch.no_grad():
                slot.copy_(tensor.to(slot.dtype))
    return layer


def check_fits(model: nn.Module, adapter: Adapter, base: str) -> None:
    """Every adapted module exists in the base model with the shapes the adapter's tensors need."""
    for lora in adapter.modules.values():
        lora_layer(find_module(model, lora.path, base), lora, adapter.config)


def tie_groups(model: nn.Module) -> list[list[str]]:
    """Names that share one parameter (a head tied to the input embeddings), groups of two or more."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def extra_param_name(key: str) -> str | None:
    """The base model parameter an adapter file's non-LoRA tensor replaces (a trained bias, a modules_to_save
    copy, a saved embedding layer), or None for a copy of the base's own tensor (PEFT's original_module)."""
    name = key[len(PREFIX):]
    if ".original_module." in name:
        return None
    name = name.replace(".base_layer.", ".")
    head, sep, tail = name.partition(".modules_to_save.")
    return f"{head}.{tail.split('.', 1)[1]}" if sep else name
