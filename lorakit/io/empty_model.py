"""A model built empty (meta tensors) from its config.json, its weights read from its safetensors files later,
a tensor (or a range of its rows) at a time: under FSDP each rank shards a block and reads only its own rows
into it, so no rank ever holds the whole model. An NF4 base is quantised as each weight is read."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lorakit.families import SEQ_CLS_HEADS
from lorakit.io.checkpoint4bit import initialise_heads, nf4_layer_names
from lorakit.io.pretrained import (
    head_fields,
    is_vision_language,
    kept_dense,
    load_config,
    model_class,
    with_pad_token,
)
from lorakit.io.weights import Checkpoint
from lorakit.modules import replace_module
from lorakit.quant.linear4bit import NF4Linear, linears_to_quantize
from lorakit.quant.nf4 import NF4Weight, empty_nf4, quantize_nf4


class NotStreamable(ValueError):
    """Why a model cannot be built empty and filled from its checkpoint (the caller loads it whole instead)."""


class Weights:
    """A model's checkpoint tensors by the model's own names, read whole or a range of rows at a time, each in
    the dtype loading gives it; a 4-bit layer's weight quantised as it is read."""

    def __init__(self, checkpoint: Checkpoint, keys: dict[str, str], dtypes: dict[str, torch.dtype]):
        self.checkpoint, self.keys, self.dtypes = checkpoint, keys, dtypes
        self._quantized: tuple[str, NF4Weight] | None = None  # the last weight quantised (its storage is 4 tensors)

    def read(self, name: str, start: int = 0, count: int | None = None) -> torch.Tensor:
        """The tensor `name`, or `count` of its rows from `start`."""
        if name not in self.keys:
            raise KeyError(f"{name} is not in the checkpoint {self.checkpoint.folder}")
        return self.checkpoint.tensor(self.keys[name], start, count).to(self.dtypes[name])

    def quantized(self, name: str, blocksize: int, double_quant: bool) -> NF4Weight:
        """The weight `name` in NF4, as 4-bit loading stores it."""
        if self._quantized is None or self._quantized[0] != name:
            self._quantized = name, quantize_nf4(self.read(name), blocksize, double_quant)
        return self._quantized[1]


def empty_model(model_path: str, task: str, labels: list[str], dtype: torch.dtype, quantize: bool = False,
                keep_dense: tuple[str, ...] = ()) -> tuple[nn.Module, Weights]:
    """The model load_model would give, with every checkpoint tensor left empty (meta) to be filled from Weights, and
    its Linear layers as empty NF4Linears with `quantize`. What the checkpoint lacks (a new classifier head) is
    initialised here, drawing the random numbers from_pretrained draws. Raises NotStreamable where that
    cannot be done: not a local folder of safetensors, a quantised checkpoint, tensors that loading fuses or
    splits, or missing tensors other than a head."""
    from accelerate import init_empty_weights

    folder = Path(model_path)
    if not folder.is_dir():
        raise NotStreamable(f"{model_path} is not a local folder")
    config = load_config(model_path, **head_fields(task, labels))
    if getattr(config, "quantization_config", None):
        raise NotStreamable("the checkpoint is quantised")
    try:
        checkpoint = Checkpoint(folder)
    except FileNotFoundError as err:
        raise NotStreamable(str(err)) from None
    with init_empty_weights(include_buffers=False):
        model = model_class(config, task).from_config(config, dtype=dtype)
    if getattr(config, "tie_word_embeddings", False):  # init_empty_weights makes a new tensor of each it moves
        model.tie_weights()
    state = model.state_dict(keep_vars=True)  # the tensors themselves: a tied one under each of its names
    keys = checkpoint_names(model, state, checkpoint)
    loaded = {id(state[name]): key for name, key in keys.items()}
    keys.update({name: loaded[id(t)] for name, t in state.items() if id(t) in loaded})  # a tied tensor's other names
    missing = [name for name, t in state.items() if t.is_meta and id(t) not in loaded]
    try:
        initialise_heads(model, missing)
    except ValueError as err:
        raise NotStreamable(str(err)) from None
    for name, tensor in state.items():  # persistent buffers (built real) as the checkpoint has them
        if not tensor.is_meta and name in keys:
            tensor.copy_(checkpoint.tensor(keys[name]))
    weights = Weights(checkpoint, keys, {name: state[name].dtype for name in keys})
    if quantize:
        vlm = is_vision_language(config)
        for name in (linears_to_quantize(model, kept_dense(model, keep_dense)) if vlm else
                     nf4_layer_names(model, {*SEQ_CLS_HEADS, *keep_dense})):
            linear = model.get_submodule(name)
            replace_module(model, name, NF4Linear(empty_nf4(linear.weight.shape, dtype), linear.bias))
    model.requires_grad_(False)
    return with_pad_token(model.eval()), weights


def checkpoint_names(model: nn.Module, state: dict[str, torch.Tensor], checkpoint: Checkpoint) -> dict[str, str]:
    """{model name: checkpoint key} for each checkpoint tensor that loads as one model tensor of its shape (a head
    for other labels does not), the key renamed as transformers renames it while loading (a vision-language
    model's parts, the base model's prefix, legacy names). Raises NotStreamable where loading converts tensors
    (several into one, or one into several)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    names = {}
    for key in checkpoint.file_of:
        name, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, state)
        if converted is not None:
            raise NotStreamable(f"transformers converts the checkpoint's {key} as it loads (fused or split tensors)")
        if name in state and checkpoint.shape(key) == tuple(state[name].shape):
            names[name] = key
    return names
