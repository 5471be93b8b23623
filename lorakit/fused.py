"""The training hot path of a LoRA Linear as one autograd function: s * B A dropout(x).

Autograd on `B(A(dropout(x)))` keeps, per adapted layer, a float dropout mask and the dropped
input (8 bytes per input element), and draws the mask with a Bernoulli sampler that costs about
as much as the layer's frozen matmul on a CPU. Here the function keeps the input itself (shared
by q/k/v, which read the same tensor) and a 1-byte keep mask, re-applies the mask in backward,
and draws only the dropped positions (`keep_mask`). The maths is unchanged; with dropout 0 the
results equal the plain modules'.
"""
from __future__ import annotations

import math

import torch


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A bool tensor whose elements are independently True with probability 1 - p, from torch's RNG.

    Drawing one uniform number per element is what makes dropout slow on a CPU. Instead, the
    dropped positions are drawn directly: a Poisson(lambda n) count of uniform indices, where
    lambda = -ln(1 - p), hits each element a Poisson(lambda) number of times independently, so
    each is hit at least once with probability exactly p. For p = 0.05 that is 0.05 n draws.
    Above p = 0.5 the kept positions are drawn the same way, to stay below 0.7 n draws."""
    n = shape.numel()
    hit_p = p if p <= 0.5 else 1 - p
    rate = torch.tensor([-math.log1p(-hit_p) * n], dtype=torch.float64)
    hits = torch.randint(0, n, (int(torch.poisson(rate).item()),), device=device)
    mask = torch.full((n,), p <= 0.5, dtype=torch.bool, device=device)
    mask[hits] = p > 0.5
    return mask.view(shape)


def compute_dtype(x: torch.Tensor, default: torch.dtype) -> torch.dtype:
    """The dtype autocast would run a matmul on x in, or `default` outside autocast."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return default


def _apply(mask: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
    """t with the dropped elements zeroed (where() reads the bool mask directly; t * mask would
    first convert it to t's dtype)."""
    return t if mask is None else torch.where(mask, t, 0.0)


class LoraMatmul(torch.autograd.Function):
    """scale * (mask * x) A^T B^T for x [..., d_in]; mask None means no dropout (scale already
    includes 1 / (1 - p) when a mask is given)."""

    @staticmethod
    def forward(ctx, x, A, B, scale: float, mask):
        dtype = compute_dtype(x, A.dtype)
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
    dtype = compute_dtype(x, A.dtype)
    return (_apply(mask, x.to(dtype)) @ A.to(dtype).T @ B.to(dtype).T) * scale


class _DoraScale(torch.autograd.Function):
    """combined * magnitude / norm (per output feature), keeping its output rather than its input:
    the output is what the next op keeps too (v_proj's for attention, gate/up's for the MLP), so
    the two share one tensor. Backward recovers the input as output * norm / magnitude."""

    @staticmethod
    def forward(ctx, combined, magnitude, norm):
        out = combined * (magnitude / norm).to(combined.dtype)
        ctx.save_for_backward(out, magnitude, norm)
        return out

    @staticmethod
    def backward(ctx, grad):
        out, magnitude, norm = ctx.saved_tensors
        scale = (magnitude / norm).to(grad.dtype)
        grad_magnitude = None
        if ctx.needs_input_grad[1]:
            combined = out / scale
            grad_magnitude = ((grad * combined).reshape(-1, grad.shape[-1]).sum(0) / norm).to(magnitude.dtype)
        return grad * scale, grad_magnitude, None


def dora_scale(combined: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """DoRA's rescaling m / ||W + sBA|| of (W x + s B A x), norm treated as a constant."""
    if torch.is_grad_enabled() and (combined.requires_grad or magnitude.requires_grad):
        return _DoraScale.apply(combined, magnitude, norm)
    return combined * (magnitude / norm).to(combined.dtype)
