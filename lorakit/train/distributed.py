"""Beyond one device, with PyTorch's own engines: process groups under torchrun, and the module that runs a
training step wrapped in DistributedDataParallel (replicated weights, gradients averaged in buckets while
backward runs) or sharded with FSDP2 (lorakit.train.fsdp)."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lorakit.io.empty_model import NotStreamable, Weights
from lorakit.train import fsdp


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    own_group: bool = False  # a one-process group set up here for --fsdp (torchrun sets up the others)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(sharded: bool = False) -> Dist:
    """Join the torchrun process group (nccl on GPU, gloo on CPU), or run alone: under --fsdp (`sharded`) in a
    group of one, so that one process runs FSDP2's code path too."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if world == 1:
        if not sharded or dist.is_initialized():
            return Dist(device=device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1, device_id=device if device.type == "cuda" else None)
        return Dist(device=device, own_group=True)
    if device.type == "cuda" and local_rank >= torch.cuda.device_count():
        raise ValueError(f"torchrun started more processes per node than the {torch.cuda.device_count()} "
                         "visible GPU(s); use --nproc_per_node <= the GPU count, or CUDA_VISIBLE_DEVICES= "
                         "to train on the CPU")
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), device)


def teardown(ctx: Dist) -> None:
    if (ctx.world > 1 or ctx.own_group) and dist.is_initialized():
        dist.destroy_process_group()


class StepModule(nn.Module):
    """The model and its loss as one module, so that DDP's and FSDP's forward hooks see the whole
    forward (the fused head-and-loss path calls the decoder and the head apart). forward(batch) ->
    (summed loss, logits or None)."""

    def __init__(self, model: nn.Module, loss: Callable):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.loss(self.model, batch)


@dataclass
class Built:
    model: nn.Module
    weights: Weights | None = None  # a model built empty: its checkpoint, read as wrap() shards it
    note: str = ""  # how it was loaded, when that is worth saying


def build(load: Callable[[], nn.Module], load_empty: Callable[[], tuple[nn.Module, Weights]],
          prepare: Callable[[nn.Module], nn.Module], ctx: Dist, sharded: bool) -> Built:
    """This rank's model: prepare(load()) (load the base on the CPU, attach adapters), moved to the device.
    Under FSDP2 every rank builds it empty (load_empty) and wrap() fills and shards it block by block; where
    it cannot be built empty, only rank 0 loads it, the others prepare its structure with empty tensors
    (fsdp.built_on_main) and wrap() hands them their shards."""
    if not sharded:
        return Built(prepare(load()).to(ctx.device))
    try:
        return Built(*fsdp.built_empty(load_empty, prepare), note="--fsdp: each rank shards the model block by "
                     "block and reads only its own rows from the checkpoint (no rank holds the whole model)")
    except NotStreamable as why:
        note = f"--fsdp: rank 0 loads the whole model on the CPU and hands out the shards ({why})"
    if ctx.world > 1:
        return Built(fsdp.built_on_main(load, prepare, ctx.rank), note=note)
    return Built(prepare(load()), note=note)


def wrap(built: Built, loss: Callable, ctx: Dist, sharded: bool, bf16: bool) -> nn.Module:
    """The module that runs a step: FSDP2-sharded (`sharded`, one process or more), in DDP (more than one
    process), or as is. DDP registers only trainable parameters; a parameter a batch leaves unused (a
    vision tower on text rows, an idle expert) is reduced as zero, as one process would have it."""
    step = StepModule(built.model, loss)
    if sharded:
        fsdp.shard(step, built.model, ctx.device, ctx.world, ctx.rank, bf16, built.weights)
        return step
    if ctx.world == 1:
        return step
    return nn.parallel.DistributedDataParallel(step, device_ids=[ctx.device] if ctx.device.type == "cuda" else None,
                                               find_unused_parameters=True, broadcast_buffers=False)


def unwrap(engine: nn.Module) -> StepModule:
    """The StepModule inside DDP (for evaluation, which needs no gradient sync)."""
    return engine.module if isinstance(engine, nn.parallel.DistributedDataParallel) else engine


def sync_gradients(engine: nn.Module, last: bool):
    """A context for one micro-batch's backward: DDP all-reduces only on the last micro-batch of a step
    (no_sync() on the others, gradients accumulate locally). FSDP2 reduce-scatters every micro-batch, so
    that no rank ever holds whole gradients."""
    if isinstance(engine, nn.parallel.DistributedDataParallel) and not last:
        return engine.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip the gradients' global norm (sharded ones included) to max_norm; the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()


def sum_across(values: list[float], ctx: Dist) -> list[float]:
    """Element-wise sum of a few numbers over ranks."""
    if ctx.world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_objects(obj, ctx: Dist) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    if ctx.world == 1:
        return [obj]
    out = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: Dist) -> None:
    if ctx.world > 1:
        dist.barrier()


def describe(model: nn.Module, ctx: Dist, sharded: bool) -> str:
    """How the run spreads over processes (FSDP: each rank's measured share of the parameter bytes, and of a
    4-bit base's storage)."""
    if ctx.world == 1 and not sharded:
        return "processes: 1"
    if not sharded:
        return f"processes: {ctx.world}, data parallel (DDP): every rank holds the whole model"
    line = f"processes: {ctx.world}, FSDP2: " + _shares("parameter bytes", model.parameters(), ctx)
    storage = fsdp.nf4_storage(model)
    return line + ("; " + _shares("4-bit base bytes", storage, ctx) if storage else "")


def _shares(what: str, tensors, ctx: Dist) -> str:
    shares = gather_objects(fsdp.local_bytes(tensors), ctx)
    whole = shares[0][1]
    return (f"{what} per rank [{' '.join(str(m) for m, _ in shares)}] of {whole} in the model "
            f"(1/{ctx.world}: {whole // ctx.world})")
