"""Gated MLPs, down(act(gate(x)) * up(x)), that keep less for backward, with the same results.

Autograd keeps four [tokens x intermediate] tensors per gated MLP: gate(x) and act(gate(x)) for
the product's and the activation's gradients, up(x), and the product itself for down_proj's
adapter. Here the product is one autograd function that keeps gate(x) and up(x) only, and any
later save of the product (the down_proj adapter's input) is stored as a recipe that recomputes
it from those two when backward runs: one elementwise pass instead of two stored tensors. The recipe's
gate and up are saved through the enclosing hooks, so under gradient checkpointing they are recomputed
with the block like everything else, not kept for every block.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from lorakit.families import GATED_MLP_CLASSES
from lorakit.memory.recipes import Recipe, patch_forward, patched_with, same_tensor, saved_as_recipes


class GatedProduct(torch.autograd.Function):
    """act(gate) * up, keeping gate and up and recomputing act(gate) in backward."""

    @staticmethod
    def forward(ctx, gate, up, act):
        ctx.save_for_backward(gate, up)
        ctx.act = act
        return act(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        with torch.enable_grad():
            gate_ = gate.detach().requires_grad_(ctx.needs_input_grad[0])
            up_ = up.detach().requires_grad_(ctx.needs_input_grad[1])
            inputs = [t for t in (gate_, up_) if t.requires_grad]
            grads = iter(torch.autograd.grad(ctx.act(gate_) * up_, inputs, grad))
        return (next(grads) if gate_.requires_grad else None, next(grads) if up_.requires_grad else None, None)


def _product(act, gate, up):
    return act(gate) * up


def _lean_forward(self, x):
    gate, up = self.gate_proj(x), self.up_proj(x)
    if not torch.is_grad_enabled():
        return self.down_proj(self.act_fn(gate) * up)
    product = GatedProduct.apply(gate, up, self.act_fn)
    recipe = Recipe(partial(_product, self.act_fn), (gate, up), f"{type(self).__name__}'s product")
    with saved_as_recipes(lambda t: recipe if same_tensor(t, product) else None):
        return self.down_proj(product)


def install(model: nn.Module) -> int:
    """Give every known gated MLP of `model` the lean forward; returns how many."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in GATED_MLP_CLASSES and all(
                hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            patch_forward(module, _lean_forward)
            count += 1
    return count


def uninstall(model: nn.Module) -> None:
    """Undo `install`: the modules use their class's forward again."""
    for _, module in patched_with(model, _lean_forward):
        del module.forward


def installed(model: nn.Module) -> list[str]:
    """The gated MLPs of `model` that have the lean forward."""
    return [name for name, _ in patched_with(model, _lean_forward)]
