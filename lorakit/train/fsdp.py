"""FSDP2 (torch's `fully_shard`): parameters, gradients and optimiser state split across ranks.

Each transformer block is one unit (its weights all-gathered just before its forward and backward,
freed after); the rest of the model (embeddings, final norm, head) is the root unit. Under --bf16 the
gathered weights are cast to bf16 for compute while the sharded weights, their gradients' reduction
and the optimiser state stay fp32. Saving gathers the shards back into whole tensors on rank 0.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lorakit.model.peft_model import PeftModel


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, found by the class names transformers lists in `_no_split_modules`
    (LlamaDecoderLayer, BertLayer, ...): the outermost module of each listed class."""
    classes = {name for module in model.modules() for name in (getattr(module, "_no_split_modules", None) or [])}
    blocks, paths = [], []
    for path, module in model.named_modules():
        if type(module).__name__ in classes and not any(path.startswith(p + ".") for p in paths):
            blocks.append(module)
            paths.append(path)
    if not blocks:
        hf = model.get_base_model() if isinstance(model, PeftModel) else model
        model_type = getattr(getattr(hf, "config", None), "model_type", None)
        raise ValueError(f"--fsdp shards the model block by block, but {type(hf).__name__} (model_type "
                         f"{model_type!r}) names no block class (transformers' _no_split_modules) and none of its "
                         f"modules is one; train it without --fsdp (plain torchrun: data parallel, DDP)")
    return blocks


def shard(root: nn.Module, model: nn.Module, device: torch.device, world: int, bf16: bool) -> None:
    """fully_shard each transformer block of `model`, then `root` (the module whose forward runs the step)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    precision = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
                 else MixedPrecisionPolicy())
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=precision)
    fully_shard(root, mesh=mesh, mp_policy=precision)


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def reshard(module: nn.Module) -> None:
    """Every FSDP unit back to its shards (the root stays gathered after a forward without backward)."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def local_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of parameters this rank holds, bytes of the whole model's parameters)."""
    from torch.distributed.tensor import DTensor

    mine = whole = 0
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        mine += local.numel() * local.element_size()
        whole += p.numel() * p.element_size()
    return mine, whole


def _needed_for_saving(model: PeftModel) -> set[int]:
    """Ids of the parameters an adapter save reads: the trainable ones and the input / output embeddings
    (saved with the adapter when targeted)."""
    wanted = {id(p) for p in model.parameters() if p.requires_grad}
    base = model.get_base_model()
    for module in (base.get_input_embeddings(), base.get_output_embeddings()):
        wanted |= {id(p) for p in module.parameters()} if module is not None else set()
    return wanted


@contextmanager
def gathered(model: nn.Module, is_main: bool) -> Iterator[dict[str, torch.Tensor] | None]:
    """Whole weights on rank 0 (on the CPU) for saving; every rank must enter (all-gathers). An adapter
    model holds whole parameters in place of its shards inside (adapter saving reads the parameters); a
    whole model yields its whole state dict instead (under FSDP its state_dict() returns shards). Yields
    None where nothing is sharded."""
    from torch.distributed.tensor import DTensor

    if not is_sharded(model):
        yield None
        return
    reshard(model)
    if not isinstance(model, PeftModel):
        whole: dict[int, torch.Tensor] = {}
        state = {}
        for key, value in model.state_dict().items():
            if id(value) not in whole:  # a tied weight is gathered once and stays tied
                whole[id(value)] = (value.full_tensor() if isinstance(value, DTensor) else value).cpu()
            state[key] = whole[id(value)]
        yield state if is_main else None
        return
    wanted, whole, swapped = _needed_for_saving(model), {}, []
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if not isinstance(param, DTensor) or id(param) not in wanted:
                continue
            if id(param) not in whole:
                full = param.full_tensor().cpu()
                whole[id(param)] = nn.Parameter(full, requires_grad=param.requires_grad) if is_main else None
            if is_main:
                module._parameters[name] = whole[id(param)]
                swapped.append((module, name, param))
    try:
        yield None
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param
