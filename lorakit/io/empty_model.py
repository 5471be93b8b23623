"""A model built empty (meta tensors) from its config.json, its weights read from its safetensors files a module
at a time later on: under FSDP each rank fills one block, shards it and goes on, so no rank ever holds the whole
model. An NF4 base is quantised as each weight is read."""
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
from lorakit.quant.nf4 import empty_nf4, quantize_nf4


class NotStreamable(ValueError):
    """Why a model cannot be built empty and filled from its checkpoint (the caller loads it whole instead)."""


class Weights:
    """A model's checkpoint tensors by the model's own names, each read in the dtype loading gives it."""

    def __init__(self, checkpoint: Checkpoint, keys: dict[str, str], dtypes: dict[str, torch.dtype]):
        self.checkpoint, self.keys, self.dtypes = checkpoint, keys, dtypes
        self.made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(meta tensor) -> (it, its real one)

    def read(self, name: str) -> torch.Tensor:
        if name not in self.keys:
            raise KeyError(f"{name} is not in the checkpoint {self.checkpoint.folder}")
        return self.checkpoint.tensor(self.keys[name]).to(self.dtypes[name])

    def fill(self, module: nn.Module, name: str) -> None:
        """Make the meta tensors `module` holds itself real (on the CPU); `name` is its path in the model. An
        NF4Linear's storage is its checkpoint weight quantised; a tensor met before (tied) since the last forget()
        stays one tensor."""
        if isinstance(module, NF4Linear) and module.weight_packed.is_meta:
            q = quantize_nf4(self.read(f"{name}.weight"), module.blocksize, module.weight_nested_absmax is not None)
            module.offset = q.offset
            for attr, value in (("weight_packed", q.data), ("weight_absmax", q.absmax),
                                ("weight_nested_absmax", q.nested_absmax), ("weight_nested_code", q.nested_code)):
                if value is not None:
                    self._put(module, attr, value)
        for attr, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None and tensor.is_meta:
                made = self.made.get(id(tensor))  # read in the dtype loading gives it, then cast as the model was
                self._put(module, attr, made[1] if made else self.read(f"{name}.{attr}").to(tensor.dtype))

    def forget(self) -> None:
        """Let go of the tensors filled so far (once they are sharded, only their shards should stay)."""
        self.made.clear()

    def _put(self, module: nn.Module, attr: str, value: torch.Tensor) -> None:
        old = module._parameters.get(attr, module._buffers.get(attr))
        if attr in module._parameters:
            value = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=old.requires_grad)
            module._parameters[attr] = value
        else:
            module._buffers[attr] = value
        self.made[id(old)] = (old, value)


def empty_model(model_path: str, task: str, labels: list[str], dtype: torch.dtype, quantize: bool = False,
                keep_dense: tuple[str, ...] = ()) -> tuple[nn.Module, Weights]:
    """The model load_model would give, with every checkpoint tensor left empty (meta) for Weights.fill, and
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
