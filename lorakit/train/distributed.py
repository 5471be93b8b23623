"""Data-parallel plumbing: process groups under torchrun, and summing gradients across ranks."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> Dist:
    """Join the torchrun process group (nccl on GPU, gloo on CPU), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if world == 1:
        return Dist(device=device)
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
    if ctx.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def sum_gradients(params: list[torch.nn.Parameter], ctx: Dist) -> None:
    """Sum each parameter's gradient over ranks with one flat all-reduce (missing grads count as 0)."""
    if ctx.world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()


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
