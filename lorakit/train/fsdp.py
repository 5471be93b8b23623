"""FSDP2 (torch's `fully_shard`): parameters, gradients and optimiser state split across ranks.

Each transformer block is one unit (its weights all-gathered just before its forward and backward,
freed after); the rest of the model (embeddings, final norm, head) is the root unit. Under --bf16 the
gathered weights are cast to bf16 for compute while the sharded weights, their gradients' reduction
and the optimiser state stay fp32. A 4-bit (NF4) base is sharded too: its packed codes become frozen
uint8 parameters of their block, gathered as bytes and dequantised after gathering.

Every rank builds the model empty (meta) from its config and attaches the adapters, drawing the random
numbers one process draws; then, block by block, it shards the block and reads only its own rows of the
block's tensors from the checkpoint (a 4-bit weight whole, to quantise it, then sliced), so no rank ever
holds the whole model. Where a model cannot be built empty (io.empty_model.NotStreamable: a checkpoint that is not
local safetensors, ...), rank 0 loads it whole on the CPU and hands every other rank its shards one tensor at
a time. Saving gathers the shards back into whole tensors on rank 0.
"""
from __future__ import annotations

import io
import pickle
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit.io.empty_model import Weights
from lorakit.lora.layers import LoraLayer, LoraLinear
from lorakit.model.peft_model import PeftModel
from lorakit.quant.linear4bit import NF4Linear


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


def built_empty(load_empty: Callable[[], tuple[nn.Module, Weights]], prepare: Callable[[nn.Module], nn.Module]
                ) -> tuple[nn.Module, Weights]:
    """prepare(the model built empty), with its adapters made on the CPU as one process makes them; the base's
    tensors stay meta until shard() fills each rank's shards from the returned Weights."""
    base, weights = load_empty()
    with torch.device("meta"):
        model = prepare(base)
    _create_adapters(model)
    return model, weights


def _create_adapters(model: nn.Module) -> None:
    """Each adapter's tensors made again, on the CPU, in module order: the random draws get_peft_model makes on
    a loaded model (the base's weights draw none), so every rank starts from the one-process run's adapters."""
    if not isinstance(model, PeftModel):
        return
    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            for name, r in layer.r.items():
                layer.create_adapter(name, r, model.peft_config[name].init_lora_weights)


SAVED_COPY = re.compile(r"\.modules_to_save\.[^.]+")  # a modules_to_save copy's part of a module path
NF4_STORAGE = {"weight_packed": "data", "weight_absmax": "absmax", "weight_nested_absmax": "nested_absmax",
               "weight_nested_code": "nested_code"}  # an NF4Linear's tensors -> NF4Weight's fields


@torch.no_grad()
def _fill_shards(hf: nn.Module, module: nn.Module, path: str, weights: Weights, device: torch.device, world: int,
                 rank: int) -> None:
    """After fully_shard(`module`), the module at `path` in the transformers model `hf` built empty: each of its
    meta tensors
    allocated on the device and filled with this rank's rows (FSDP2 gives rank r the r-th chunk of dim 0,
    torch.chunk's way; a buffer whole). Dense rows are read alone from the checkpoint; a 4-bit weight is read
    whole, quantised, and its storage sliced; a modules_to_save copy reads its original's."""
    todo = {}  # a tied parameter stays one (see _allocate), filled once, from the first module that holds it
    for name, sub in reversed(list(module.named_modules(prefix=path))):
        for attr, t in [*sub._parameters.items(), *sub._buffers.items()]:
            if t is not None and t.is_meta:
                todo[id(t) if attr in sub._parameters else (id(sub), attr)] = sub, attr, SAVED_COPY.sub("", name)
    _allocate(module, device)
    for sub, attr, name in todo.values():
        if attr in sub._buffers:  # replicated: the tensor itself (a code table stays shared, as loading shares it)
            sub._buffers[attr] = _rows(hf, sub, attr, name, 0, None, weights).to(device)
            continue
        local = sub._parameters[attr].to_local()
        start = rank * -(-sub._parameters[attr].shape[0] // world)
        local.copy_(_rows(hf, sub, attr, name, start, local.shape[0], weights))


def _rows(hf: nn.Module, owner: nn.Module, attr: str, name: str, start: int, count: int | None,
          weights: Weights) -> torch.Tensor:
    """Rows [start, start + count) (all: None) of the tensor `attr` of `owner`, the module at `name` in `hf`."""
    base = getattr(owner, "base_layer", owner)
    if isinstance(base, NF4Linear) and attr in NF4_STORAGE:
        q = weights.quantized(f"{name}.weight", base.blocksize, base.weight_nested_absmax is not None)
        base.offset = q.offset
        value = getattr(q, NF4_STORAGE[attr])
        return value if count is None else value[start:start + count]
    if name.endswith(".lora_magnitude_vector"):
        layer_name = name.removesuffix(".lora_magnitude_vector")
        return _magnitude_rows(hf.get_submodule(layer_name), layer_name, attr, start, count, weights)
    return weights.read(f"{name}.{attr}", start, count)


def _magnitude_rows(layer: LoraLinear, name: str, adapter: str, start: int, count: int, weights: Weights
                    ) -> torch.Tensor:
    """DoRA's starting magnitude ||W + s·B·A|| for rows [start, start + count) of the output features: the rows'
    norms of W, since B starts at zero (checked on this rank's rows of B)."""
    from lorakit.lora.dora import weight_norm
    from lorakit.quant.nf4 import dequantize_nf4

    if layer.lora_B[adapter].weight.to_local().any():
        raise ValueError(f"{name}: DoRA's magnitude is computed from the base weight's rows under --fsdp, which "
                         "needs the adapter's B to start at zero (lorakit's initialisation)")
    base = layer.base_layer
    if isinstance(base, NF4Linear):
        weight = dequantize_nf4(weights.quantized(f"{name}.weight", base.blocksize,
                                                  base.weight_nested_absmax is not None))[start:start + count]
    elif layer.fan_in_fan_out:  # GPT-2's Conv1D stores W as in x out: a row of W is a column there
        weight = weights.read(f"{name}.weight").T[start:start + count]
    else:
        weight = weights.read(f"{name}.weight", start, count)
    return weight_norm(weight, torch.zeros_like(weight)).to(layer.lora_A[adapter].weight.dtype)


def built_on_main(load: Callable[[], nn.Module], prepare: Callable[[nn.Module], nn.Module], rank: int) -> nn.Module:
    """prepare(load()) on rank 0 (on the CPU). Every other rank receives the loaded model's structure with each
    tensor empty on the meta device, and prepares that (adapters, patches and hooks as on rank 0, all on the meta
    device); shard() then hands each rank its part of rank 0's weights."""
    import torch.distributed as dist

    base = load() if rank == 0 else None
    box = [skeleton(base) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    if rank == 0:
        return prepare(base)
    with torch.device("meta"):
        return prepare(pickle.loads(box[0]))  # rank 0's bytes, not a file


def skeleton(model: nn.Module) -> bytes:
    """`model` pickled with every tensor as an empty one on the meta device (ties and shared tensors kept)."""
    out = io.BytesIO()
    try:
        _MetaPickler(out).dump(model)
    except (pickle.PicklingError, TypeError, AttributeError) as err:
        raise TypeError(f"--fsdp loads the model on rank 0 and sends its structure to the other ranks, but the "
                        f"loaded {type(model).__name__} does not pickle ({err}); train it without --fsdp "
                        "(data parallel, DDP)") from None
    return out.getvalue()


class _MetaPickler(pickle.Pickler):
    """Pickles a module with each tensor as an empty one of its shape and dtype on the meta device."""

    def reducer_override(self, obj):
        if isinstance(obj, nn.Parameter):
            return _meta_parameter, (obj.shape, obj.dtype, obj.requires_grad)
        if isinstance(obj, torch.Tensor):
            return _meta_tensor, (obj.shape, obj.dtype)
        return NotImplemented


def _meta_tensor(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _meta_parameter(shape: torch.Size, dtype: torch.dtype, requires_grad: bool) -> nn.Parameter:
    return nn.Parameter(_meta_tensor(shape, dtype), requires_grad=requires_grad)


def shard(root: nn.Module, model: nn.Module, device: torch.device, world: int, rank: int, bf16: bool,
          weights: Weights | None = None) -> None:
    """fully_shard each transformer block of `model`, then `root` (the module whose forward runs the step). A
    model built empty (built_empty, with its `weights`) has each unit's shards filled as it is sharded, every
    rank reading its own rows; otherwise every rank's shards come from rank 0's weights (the other ranks'
    `model` is built_on_main's empty one). Each unit moves to the device as it is sharded, so no device ever
    holds the whole model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    for layer in nf4_layers(model):  # buffers are replicated; parameters are sharded
        layer.storage_as_parameters()
    hf = model.get_base_model() if isinstance(model, PeftModel) else model
    whole = {name: p.detach() for name, p in root.named_parameters()} if rank == 0 and weights is None else {}
    mesh = init_device_mesh(device.type, (world,))
    precision = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
                 else MixedPrecisionPolicy())
    paths = {id(m): name for name, m in hf.named_modules()}
    for block in tqdm(transformer_blocks(model), desc="shard and read", unit="block",
                      disable=weights is None or rank != 0, dynamic_ncols=True):
        fully_shard(block, mesh=mesh, mp_policy=precision)
        if weights is not None:
            _fill_shards(hf, block, paths[id(block)], weights, device, world, rank)
    fully_shard(root, mesh=mesh, mp_policy=precision)
    if weights is not None:
        _fill_shards(hf, hf, "", weights, device, world, rank)
    else:
        _hand_out(root, whole, device, world, rank)


@torch.no_grad()
def _hand_out(root: nn.Module, whole: dict[str, torch.Tensor], device: torch.device, world: int, rank: int) -> None:
    """Rank 0's weights to every rank, one tensor at a time: each rank keeps its rows of a sharded parameter
    (FSDP2 gives rank r the r-th chunk of dim 0, torch.chunk's way) and a copy of each buffer."""
    import torch.distributed as dist

    if rank != 0:
        _allocate(root, device)
    for name, param in root.named_parameters():
        full = whole.pop(name).to(device) if rank == 0 else torch.empty(param.shape, dtype=param.dtype, device=device)
        dist.broadcast(full, src=0)
        local = param.to_local()
        rows = -(-full.shape[0] // world)
        local.copy_(full[rank * rows:rank * rows + local.shape[0]])
    for buffer in root.buffers():
        dist.broadcast(buffer, src=0)


def _allocate(module: nn.Module, device: torch.device) -> None:
    """Uninitialised storage on `device` for every meta tensor of `module`, as to_empty() allocates (the others
    kept), but a tensor held in several places (a code table shared by layers) stays one tensor."""
    made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def empty(t: torch.Tensor) -> torch.Tensor:
        if not t.is_meta:
            return t
        if id(t) not in made:
            made[id(t)] = (t, torch.empty_like(t, device=device))
        return made[id(t)][1]

    module._apply(empty)


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def reshard(module: nn.Module) -> None:
    """Every FSDP unit back to its shards (the root stays gathered after a forward without backward)."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def nf4_layers(model: nn.Module) -> list[NF4Linear]:
    """The model's 4-bit layers (a LoRA layer's base is not its child: found through base_layer)."""
    modules = [getattr(m, "base_layer", m) for m in model.modules()]
    return list({id(m): m for m in modules if isinstance(m, NF4Linear)}.values())


def nf4_storage(model: nn.Module) -> list[torch.Tensor]:
    """The 4-bit base's storage that grows with the weights: packed codes, block scales and nested scales
    (not the 256-entry code table each layer keeps, a constant of the format)."""
    names = ("weight_packed", "weight_absmax", "weight_nested_absmax")
    return [t for layer in nf4_layers(model) for t in (getattr(layer, n) for n in names) if t is not None]


def local_bytes(tensors: Iterable[torch.Tensor]) -> tuple[int, int]:
    """(bytes of `tensors` this rank holds, bytes of the whole tensors): a sharded one counts its local shard."""
    from torch.distributed.tensor import DTensor

    mine = whole = 0
    for p in tensors:
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
