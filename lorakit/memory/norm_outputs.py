"""Blocks whose adapters keep a recipe for a norm's output instead of the output itself.

In a pre-norm block the q/k/v adapters (and gate/up's) keep norm(h) for their weight gradients,
while the norm keeps h for its own: two [tokens x hidden] tensors where one would do. In a
patched block, a saved norm output is stored as a recipe that reruns the norm on h in backward
(one elementwise pass, the same values); h itself is saved through the enclosing saved-tensor hooks. Blocks
under transformers' gradient checkpointing are left as they are: the patch sits outside the checkpoint's
hooks, so it would change nothing there.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from lorakit.families import is_norm
from lorakit.lora.layers import LoraLayer
from lorakit.memory.recipes import Recipe, patch_forward, patched_with, same_tensor, saved_as_recipes


class _NormCall:
    """One call of a norm inside a patched block: its input and enough to run it again (not its output)."""

    def __init__(self, norm: nn.Module, x: torch.Tensor):
        self.norm, self.x = norm, x
        device = x.device.type
        self.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))

    def recipe(self) -> Recipe:
        """Its output from its input (saved through the enclosing hooks, like any saved tensor)."""
        return Recipe(partial(_rerun, self.norm, self.autocast), (self.x,), type(self.norm).__name__)


def _rerun(norm: nn.Module, autocast: tuple, x: torch.Tensor) -> torch.Tensor:
    device, dtype, enabled = autocast
    with torch.autocast(device, dtype=dtype, enabled=enabled):
        return norm(x)


def _record(block: nn.Module, norm: nn.Module, args, out) -> None:
    calls = block.__dict__.get("_lorakit_norm_calls")
    if calls is not None and args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
        calls.append((out, _NormCall(norm, args[0])))


def _recipe(calls: list[tuple[torch.Tensor, _NormCall]], saved: torch.Tensor) -> Recipe | None:
    return next((call.recipe() for out, call in calls if same_tensor(saved, out)), None)


def _lean_forward(self, *args, **kwargs):
    forward = type(self).forward.__get__(self)
    if not torch.is_grad_enabled() or (getattr(self, "gradient_checkpointing", False) and self.training):
        return forward(*args, **kwargs)
    calls = self.__dict__["_lorakit_norm_calls"] = []
    try:
        with saved_as_recipes(partial(_recipe, calls)):
            return forward(*args, **kwargs)
    finally:
        self.__dict__["_lorakit_norm_calls"] = None


def install(model: nn.Module) -> int:
    """Patch every block of `model` that has a norm child and a LoRA layer below it; returns how many."""
    count = 0
    for block in model.modules():
        norms = [child for child in block.children() if is_norm(child)]
        patched = "_lorakit_norm_hooks" in block.__dict__
        if not norms or patched or not any(isinstance(m, LoraLayer) for m in block.modules()):
            continue
        patch_forward(block, _lean_forward)
        block.__dict__["_lorakit_norm_calls"] = None
        block.__dict__["_lorakit_norm_hooks"] = [norm.register_forward_hook(partial(_record, block)) for norm in norms]
        count += 1
    return count


def uninstall(model: nn.Module) -> None:
    """Undo `install`: the blocks use their class's forward again and the norms lose their hooks."""
    for _, block in patched_with(model, _lean_forward):
        del block.forward
        for hook in block.__dict__.pop("_lorakit_norm_hooks"):
            hook.remove()
        del block.__dict__["_lorakit_norm_calls"]


def installed(model: nn.Module) -> list[str]:
    """The blocks of `model` whose adapters keep recipes for norm outputs."""
    return [name for name, _ in patched_with(model, _lean_forward)]
