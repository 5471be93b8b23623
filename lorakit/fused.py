"""The training hot path of a LoRA Linear as one autograd function: s * B A dropout(x).

Autograd on `B(A(dropout(x)))` keeps, per adapted layer, a float dropout mask and the dropped
input (8 bytes per input element), and draws the mask with a Bernoulli sampler that costs about
as much as the layer's frozen matmul on a CPU. Here the function keeps the input itself (shared
by q/k/v, which read the same tensor) and a 1-byte keep mask, re-applies the mask in backward,
and draws the mask from 16-bit slices of 64-bit random integers (p is rounded to a multiple of
1/65536). The maths is unchanged; with dropout 0 the results equal the plain modules'.
"""
from __future__ import annotations

import torch

_LEVELS = 1 << 16


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A bool tensor, True with probability 1 - p (p rounded to k / 65536), from torch's RNG.

    Each 64-bit draw gives three 16-bit values; the top one is skipped because torch draws
    int64 in [0, 2**63) on some devices, so its sign bit is not random."""
    n = shape.numel()
    draws = torch.empty((n + 2) // 3, dtype=torch.int64, device=device).random_()
    slices = draws.view(torch.int16).view(-1, 4)[:, :3]
    threshold = round(p * _LEVELS) - (_LEVELS // 2)
    return (slices >= threshold).reshape(-1)[:n].view(shape)


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run this matmul in, or the adapter's own dtype outside autocast."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


def _apply(mask: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
    """t with the dropped elements zeroed (where() reads the bool mask directly; t * mask would
    first convert it to t's dtype)."""
    return t if mask is None else torch.where(mask, t, 0.0)


class LoraMatmul(torch.autograd.Function):
    """scale * (mask * x) A^T B^T for x [..., d_in]; mask None means no dropout (scale already
    includes 1 / (1 - p) when a mask is given)."""

    @staticmethod
    def forward(ctx, x, A, B, scale: float, mask):
        dtype = compute_dtype(x, A)
        x_, A_, B_ = x.to(dtype), A.to(dtype), B.to(dtype)
        h = _apply(mask, x_) @ A_.T
        ctx.save_for_backward(x, A, B, h, mask)
        ctx.scale, ctx.dtype = scale, dtype
        return (h @ B_.T) * scale

    @staticmethod
    def backward(ctx, grad_out):
        x, A, B, h, mask = ctx.saved_tensors
        dtype, scale = ctx.dtype, ctx.scale
        g = grad_out.to(dtype) * scale
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[2]:
            grad_B = (g.reshape(-1, g.shape[-1]).T @ h.reshape(-1, h.shape[-1])).to(B.dtype)
        grad_h = g @ B.to(dtype)
        if ctx.needs_input_grad[1]:
            dropped = _apply(mask, x.to(dtype))
            grad_A = (grad_h.reshape(-1, grad_h.shape[-1]).T @ dropped.reshape(-1, x.shape[-1])).to(A.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = _apply(mask, grad_h @ A.to(dtype)).to(x.dtype)
        return grad_x, grad_A, grad_B, None, None


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, p: float) -> torch.Tensor:
    """scaling * B A dropout_p(x), through LoraMatmul when anything needs a gradient."""
    mask = keep_mask(x.shape, p, x.device) if p > 0 else None
    scale = scaling / (1 - p) if p > 0 else scaling
    if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad):
        return LoraMatmul.apply(x, A, B, scale, mask)
    dtype = compute_dtype(x, A)
    return (_apply(mask, x.to(dtype)) @ A.to(dtype).T @ B.to(dtype).T) * scale
