"""Saved-tensor recipes: a tensor autograd would keep for backward, stored as a way to remake it;
and the per-module forward patches (`patch_forward`, `patched_with`) that put them in place.

Within `saved_as_recipes(recipe_for)`, every tensor an op saves is offered to `recipe_for`; when it
returns a function, that function is kept instead of the tensor and called (under no_grad) when
backward unpacks it. Tensors it declines go to the enclosing saved-tensor hooks (for example
`torch.autograd.graph.save_on_cpu`, or gradient checkpointing's), so the two compose.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

Recompute = Callable[[], torch.Tensor]


class _Recipe:
    """Stands in for a saved tensor that is recomputed on unpack."""

    def __init__(self, recompute: Recompute):
        self.recompute = recompute


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when a and b are the same values in the same memory (a view of b with another shape is not)."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


def _identity(t):
    return t


@contextmanager
def saved_as_recipes(recipe_for: Callable[[torch.Tensor], Recompute | None]):
    """Within the block, store each saved tensor t as recipe_for(t) when that is not None."""
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
    outer_pack, outer_unpack = outer if outer is not None else (_identity, _identity)

    active = [recipe_for]  # emptied on exit: autograd keeps `pack`, which must not keep what recipe_for holds

    def pack(saved):
        recompute = active[0](saved) if active else None
        return _Recipe(recompute) if recompute is not None else outer_pack(saved)

    def unpack(stored):
        if isinstance(stored, _Recipe):
            with torch.no_grad():
                return stored.recompute()
        return outer_unpack(stored)

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        active.clear()


def patch_forward(module: nn.Module, forward: Callable) -> None:
    """Give `module` its own forward, `forward(module, ...)`, in place of its class's (a partial,
    so that the patched model still pickles)."""
    module.forward = functools.partial(forward, module)


def patched_with(model: nn.Module, forward: Callable) -> list[tuple[str, nn.Module]]:
    """(name, module) of each module of `model` that `patch_forward` gave `forward`."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m.__dict__.get("forward"), functools.partial) and m.__dict__["forward"].func is forward]
