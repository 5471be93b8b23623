"""Saved-tensor recipes: a tensor autograd would keep for backward, stored as a way to remake it;
and the per-module forward patches (`patch_forward`, `patched_with`) that put them in place.

Within `saved_as_recipes(recipe_for)`, every tensor an op saves is offered to `recipe_for`; when it
returns a `Recipe`, that recipe is kept instead of the tensor and run (under no_grad) when backward
unpacks it. Tensors it declines, and a recipe's own inputs, go to the enclosing saved-tensor hooks
(for example `torch.autograd.graph.save_on_cpu`, or gradient checkpointing's), so the two compose: a
recipe keeps no more than those hooks keep (nothing between blocks under checkpointing, whose
recompute then brings the inputs back).
"""
from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Recipe:
    """How to remake a saved tensor: `remake(*inputs)`. `remake` must not hold tensors itself (they would
    outlive the enclosing hooks); `what` is named in the error when an input changed in place."""
    remake: Callable[..., torch.Tensor]
    inputs: tuple[torch.Tensor, ...]
    what: str


class _Packed:
    """A recipe as autograd keeps it: its inputs packed by the enclosing hooks, and their versions, checked on
    unpack where those hooks give back the very tensors (none, or a chain of identities)."""

    def __init__(self, recipe: Recipe, pack: Callable):
        self.remake, self.what = recipe.remake, recipe.what
        self.inputs = [pack(t) for t in recipe.inputs]
        self.versions = [(weakref.ref(t), t._version) for t in recipe.inputs]

    def unpack(self, unpack: Callable) -> torch.Tensor:
        inputs = [unpack(t) for t in self.inputs]
        if any(ref() is t and t._version != version for t, (ref, version) in zip(inputs, self.versions)):
            raise RuntimeError(f"the input of {self.what} was modified in place after the forward pass, so "
                               "lorakit cannot recompute its output for backward; leave it unchanged until "
                               "backward has run")
        with torch.no_grad():
            return self.remake(*inputs)


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when a and b are the same values in the same memory (a view of b with another shape is not)."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


def _identity(t):
    return t


@contextmanager
def saved_as_recipes(recipe_for: Callable[[torch.Tensor], Recipe | None]):
    """Within the block, store each saved tensor t as recipe_for(t) when that is not None."""
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
    outer_pack, outer_unpack = outer if outer is not None else (_identity, _identity)

    active = [recipe_for]  # emptied on exit: autograd keeps `pack`, which must not keep what recipe_for holds

    def pack(saved):
        recipe = active[0](saved) if active else None
        return _Packed(recipe, outer_pack) if recipe is not None else outer_pack(saved)

    def unpack(stored):
        return stored.unpack(outer_unpack) if isinstance(stored, _Packed) else outer_unpack(stored)

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
