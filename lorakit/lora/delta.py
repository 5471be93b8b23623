"""The training hot path of a LoRA Linear as one autograd function: s * B A dropout(x).

Autograd on `B(A(dropout(x)))` keeps, per adapted layer, a float dropout mask and the dropped
input (8 bytes per input element), and draws the mask with a Bernoulli sampler that costs about
as much as the layer's frozen matmul on a CPU. Here the function keeps the input itself (shared
by q/k/v, which read the same tensor) and the dropped positions, which it draws directly instead
of one random number per element, and remakes the mask from them in backward. The maths is
unchanged; with dropout 0 the results equal the plain modules'.
"""
from __future__ import annotations

import math

import torch


def _flipped_positions(n: int, p: float, device: torch.device) -> torch.Tensor:
    """Positions (int32 where n allows, repeats possible) whose keep-mask value differs from the
    majority: the dropped ones for p <= 0.5, the kept ones above.

    Drawing one uniform number per element is what makes dropout slow on a CPU. Instead, a
    Poisson(lambda n) count of uniform indices, lambda = -ln(1 - q), hits each element a
    Poisson(lambda) number of times independently, so each is hit at least once with probability
    exactly q (q = min(p, 1 - p)). For p = 0.05 that is 0.05 n draws."""
    q = min(p, 1 - p)
    rate = torch.tensor([-math.log1p(-q) * n], dtype=torch.float64)
    dtype = torch.int32 if n <= torch.iinfo(torch.int32).max else torch.int64
    return torch.randint(0, n, (int(torch.poisson(rate).item()),), device=device, dtype=dtype)


def _mask_from(positions: torch.Tensor, shape: torch.Size, p: float) -> torch.Tensor:
    mask = torch.full((shape.numel(),), p <= 0.5, dtype=torch.bool, device=positions.device)
    mask[positions] = p > 0.5
    return mask.view(shape)


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A bool tensor whose elements are independently True with probability 1 - p, from torch's RNG."""
    return _mask_from(_flipped_positions(shape.numel(), p, device), shape, p)


def compute_dtype(x: torch.Tensor, default: torch.dtype) -> torch.dtype:
    """The dtype autocast would run a matmul on x in, or `default` outside autocast."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return default


def _apply(mask: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
    """t with the dropped elements zeroed (where() reads the bool mask directly; t * mask would
    first convert it to t's dtype)."""
    return t if mask is None else torch.where(mask, t, 0.0)


def _low_rank_out(base: torch.Tensor | None, h: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """base + scale * h B^T as one GEMM (the product alone when base is None), shaped like h's rows."""
    h2 = h.reshape(-1, h.shape[-1])
    if base is None:
        out = (h2 @ B.T).mul_(scale)
    else:
        out = torch.addmm(base.reshape(-1, B.shape[0]).to(h.dtype), h2, B.T, alpha=scale)
    return out.view(*h.shape[:-1], B.shape[0])


class LoraMatmul(torch.autograd.Function):
    """base + scale * dropout(x) A^T B^T for x [..., d_in], or the delta alone when base is None.

    The dropout is given by its flipped positions (`_flipped_positions`, None for no dropout), and
    scale already includes 1 / (1 - p). Backward keeps those positions (4 bytes per 20 elements at
    p = 0.05), not the mask. Adding into the base output inside the GEMM saves two passes over the
    layer's output, and the scale is applied to the rank-r tensors only."""

    @staticmethod
    def forward(ctx, base, x, A, B, scale: float, p: float, flipped):
        dtype = compute_dtype(x, A.dtype)
        x_, A_, B_ = x.to(dtype), A.to(dtype), B.to(dtype)
        mask = None if flipped is None else _mask_from(flipped, x.shape, p)
        h = _apply(mask, x_) @ A_.T
        ctx.save_for_backward(x, A, B, h, flipped)
        ctx.scale, ctx.p, ctx.dtype = scale, p, dtype
        ctx.base_dtype = None if base is None else base.dtype
        return _low_rank_out(base, h, B_, scale)

    @staticmethod
    def backward(ctx, grad_out):
        x, A, B, h, flipped = ctx.saved_tensors
        dtype, scale, p = ctx.dtype, ctx.scale, ctx.p
        mask = None if flipped is None else _mask_from(flipped, x.shape, p)
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
        grad_base = grad_out.to(ctx.base_dtype) if ctx.needs_input_grad[0] else None
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[3]:
            grad_B = (g.T @ h.reshape(-1, h.shape[-1])).mul_(scale).to(B.dtype)
        grad_h = (g @ B.to(dtype)).mul_(scale)
        if ctx.needs_input_grad[2]:
            dropped = _apply(mask, x.to(dtype))
            grad_A = (grad_h.T @ dropped.reshape(-1, x.shape[-1])).to(A.dtype)
        if ctx.needs_input_grad[1]:
            grad_x = (grad_h @ A.to(dtype)).view(x.shape)
            if flipped is not None and p <= 0.5:  # zero the few dropped positions rather than pass over all
                grad_x.view(-1).index_fill_(0, flipped.long(), 0.0)
            else:
                grad_x = _apply(mask, grad_x)
            grad_x = grad_x.to(x.dtype)
        return grad_base, grad_x, grad_A, grad_B, None, None, None


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, p: float,
               base: torch.Tensor | None = None) -> torch.Tensor:
    """base + scaling * B A dropout_p(x) (the delta alone without base), through LoraMatmul when
    anything needs a gradient."""
    flipped = _flipped_positions(x.numel(), p, x.device) if p > 0 else None
    scale = scaling / (1 - p) if p > 0 else scaling
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (base, x, A, B)):
        return LoraMatmul.apply(base, x, A, B, scale, p, flipped)
    dtype = compute_dtype(x, A.dtype)
    mask = None if flipped is None else _mask_from(flipped, x.shape, p)
    return _low_rank_out(base, _apply(mask, x.to(dtype)) @ A.to(dtype).T, B.to(dtype), scale)
