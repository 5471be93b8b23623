"""DoRA's pieces as pure functions: the row norm of the adapted weight and the rescaling by
magnitude / norm (an autograd function that keeps its output rather than its input)."""
from __future__ import annotations

import torch


def weight_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """||W + delta|| per output feature (row), both d_out x d_in, in the weight's dtype."""
    return torch.linalg.norm(weight + delta.to(weight.dtype), dim=1)


def low_rank_weight_norm(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """||W + sBA|| per row from ||W||^2 + 2s <W A^T, B> + s^2 <B A A^T, B>: the same norm without the
    d_out x d_in sum (the training path's, once per forward)."""
    squared = (weight * weight).sum(1) + 2 * s * ((weight @ A.T) * B).sum(1) + s * s * ((B @ (A @ A.T)) * B).sum(1)
    return squared.clamp_min(0).sqrt()


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
