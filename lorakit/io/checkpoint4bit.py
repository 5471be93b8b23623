"""Loading a transformers checkpoint straight into NF4, one tensor at a time.

The model is built with empty (meta) parameters; each checkpoint tensor is then read from its
safetensors file and either quantised on the spot (the weights of Linear layers) or kept in the
compute dtype (everything else). Peak memory stays near the quantised model's size plus one
layer, instead of the full-precision model that quantising after from_pretrained would need.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lorakit.families import SEQ_CLS_HEADS
from lorakit.io import files
from lorakit.io.weights import Checkpoint, model_key
from lorakit.modules import replace_module
from lorakit.quant.linear4bit import NF4Linear, linears_to_quantize
from lorakit.quant.nf4 import from_state_dict, quantize_nf4, to_state_dict


def nf4_layer_names(model: nn.Module, skip: set[str]) -> set[str]:
    """The layers 4-bit loading stores in NF4: every nn.Linear but the output head and those within a module of
    `skip`."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name in linears_to_quantize(model, skip) if model.get_submodule(name) is not head}


def _quant_state_owner(key: str) -> tuple[str, bool]:
    """("module", True) for a bitsandbytes quant-state key "module.weight.<state>"; else (key's module, False)."""
    head, _, tail = key.partition(".weight.")
    if tail in ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4"):
        return head, True
    return key.removesuffix(".weight"), False


def _put_nf4(model: nn.Module, module_name: str, q) -> None:
    """Replace a (still empty) Linear by an NF4Linear holding `q`, keeping its bias slot."""
    old = model.get_submodule(module_name)
    layer = NF4Linear(q)
    layer.bias = old.bias  # loaded already, or still empty until its key comes
    replace_module(model, module_name, layer)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._buffers:
        module._buffers[attr] = value
    else:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)


def load_nf4(auto_class, folder: str, dtype: torch.dtype, skip: set[str],
             **config_kwargs) -> tuple[nn.Module, list[str]]:
    """(model, names of the NF4 layers): every nn.Linear not within a module of `skip` in NF4,
    the rest in `dtype`. Parameters the checkpoint lacks, or holds for other labels (a new classifier head), are
    initialised as from_pretrained would; any other missing or misshapen key is an error."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, **config_kwargs)
    with init_empty_weights(include_buffers=False):
        model = auto_class.from_config(config, dtype=dtype)
    quantize = nf4_layer_names(model, skip)
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    prefix = getattr(model, "base_model_prefix", "")
    prequantized = {}
    checkpoint = Checkpoint(Path(folder))
    for key, tensor in checkpoint.items():  # each read into memory of its own, not mapped from the file
        owner, is_state = _quant_state_owner(key)
        if is_state or f"{key}.quant_state.bitsandbytes__nf4" in checkpoint.file_of:
            prequantized.setdefault(owner, {})[key] = tensor
            continue
        name = model_key(key, shapes.keys(), prefix)
        if name is None or head_for_other_labels(name, tensor.shape, shapes[name]):
            continue
        module_name, _, attr = name.rpartition(".")
        if module_name in quantize and attr == "weight":
            _put_nf4(model, module_name, quantize_nf4(tensor.to(dtype)))
        else:
            _set_tensor(model, name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    for owner, state in prequantized.items():  # a checkpoint saved in bitsandbytes' 4-bit form
        name = model_key(f"{owner}.weight", shapes.keys(), prefix)
        if name is None:
            raise ValueError(f"4-bit checkpoint weight {owner}.weight matches no module of {type(model).__name__}")
        _put_nf4(model, name.removesuffix(".weight"), from_state_dict(state, prefix=f"{owner}.weight"))
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    try:
        initialise_heads(model, [n for n, p in model.named_parameters() if p.is_meta])
    except ValueError as err:
        raise ValueError(f"{err}; cannot load it in 4-bit") from None
    model.requires_grad_(False)
    return model.eval(), sorted(quantize)  # eval mode, as from_pretrained returns models


def head_for_other_labels(name: str, shape: torch.Size, expected: torch.Size) -> bool:
    """True for a classifier head's tensor shaped for another label count (left to be initialised fresh, as
    from_pretrained's ignore_mismatched_sizes does); any other tensor of the wrong shape is an error."""
    if shape == expected:
        return False
    if name.split(".")[0] in SEQ_CLS_HEADS:
        return True
    raise ValueError(f"checkpoint tensor {name} has shape {tuple(shape)} where the model built from its "
                     f"config.json has {tuple(expected)}")


def initialise_heads(model: nn.Module, missing: list[str]) -> None:
    """Initialise the modules of the `missing` parameters as from_pretrained does (in module order, with the
    model's _init_weights); only a classifier head may be missing."""
    owners = {name.rpartition(".")[0] for name in missing}
    if not all(owner.split(".")[0] in SEQ_CLS_HEADS for owner in owners):
        raise ValueError(f"the checkpoint lacks {sorted(missing)[:5]} (of {len(missing)} missing)")
    for name, module in model.named_modules():
        if name in owners:
            module.to_empty(device="cpu")
            model._init_weights(module)


def save_nf4(model: nn.Module, folder: str) -> None:
    """Save a model holding NF4Linear layers as transformers saves a bitsandbytes 4-bit model: the
    same tensor keys and a `quantization_config` in config.json, so either library loads it."""

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    state, seen = {}, set()
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, NF4Linear)}
    for name, module in quantized.items():
        state.update(to_state_dict(module.quantized, prefix=f"{name}.weight"))
        if module.bias is not None:
            state[f"{name}.bias"] = module.bias.detach()
    for key, tensor in model.state_dict().items():
        if key.rpartition(".")[0] in quantized or tensor.data_ptr() in seen:  # tied weights: saved once
            continue
        seen.add(tensor.data_ptr())
        state[key] = tensor.detach().contiguous()
    files.save_safetensors(state, out / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    layers = list(quantized.values())
    config["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": layers[0].weight_nested_absmax is not None,
        "bnb_4bit_compute_dtype": str(layers[0].weight_dtype).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": None}
    files.write_text(out / "config.json", json.dumps(config, indent=2, default=str))
