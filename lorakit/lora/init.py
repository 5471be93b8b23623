"""Inits that start an adapter from the base weight W (d_out x d_in) and rewrite W, so the adapted model
starts equal to the base: W_res = W - scaling * B A. PiSSA takes W's principal singular directions, OLoRA
the first r columns of its QR decomposition. A trained adapter of this kind becomes plain LoRA on the
original W by `as_plain_lora`.

Each init computes in fp32 (fp64 for an fp64 weight) and returns (A, B, W_res) in that precision.
"""
from __future__ import annotations

import torch

from lorakit.config import weight_init


def from_weight(init: str, weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, ...]:
    """(A, B, W_res) for init_lora_weights `init` ('pissa', 'pissa_niter_<n>' or 'olora')."""
    kind, niter = weight_init(init)
    _check_rank(weight, r)
    if kind == "olora":
        return olora(weight, r, scaling)
    return pissa(weight, r, scaling, niter)


def pissa(weight: torch.Tensor, r: int, scaling: float, niter: int | None = None) -> tuple[torch.Tensor, ...]:
    """PiSSA: B A holds W's top-r singular triplets, each singular value split as sqrt(S / scaling) between
    A and B, so scaling * B A is W's best rank-r part. niter: torch.svd_lowrank (randomized, drawing from
    torch's global generator) with that many subspace iterations instead of the full SVD."""
    if scaling <= 0:
        raise ValueError(f"PiSSA needs a positive scaling (lora_alpha > 0), got {scaling}: it takes "
                         "sqrt(singular value / scaling)")
    w = _working_copy(weight)
    if niter is None:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(w, q=r, niter=niter)
        Vh = V.T
    root = torch.sqrt(S / scaling)
    A = torch.diag(root) @ Vh
    B = U @ torch.diag(root)
    return A, B, w - scaling * B @ A


def olora(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, ...]:
    """OLoRA: W = Q R; B is Q's first r columns (orthonormal), A the first r rows of R."""
    w = _working_copy(weight)
    Q, R = torch.linalg.qr(w)
    A, B = R[:r].contiguous(), Q[:, :r].contiguous()
    return A, B, w - scaling * B @ A


def as_plain_lora(A: torch.Tensor, B: torch.Tensor, A0: torch.Tensor,
                  B0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A rank-2r adapter for the original weight equal to the trained (A, B) on W_res = W - s B0 A0:
    s B A - s B0 A0 = s [B, -B0] [A; A0]. Its config needs r and lora_alpha doubled (same scaling)."""
    return torch.cat([A, A0], dim=0), torch.cat([B, -B0], dim=1)


def _working_copy(weight: torch.Tensor) -> torch.Tensor:
    """The weight detached, in fp32 (or fp64), never aliasing the module's own tensor."""
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return weight.detach().to(dtype, copy=True)


def _check_rank(weight: torch.Tensor, r: int) -> None:
    if r > min(weight.shape):
        raise ValueError(f"r={r} is larger than this {weight.shape[0]}x{weight.shape[1]} weight's rank can be "
                         f"(at most {min(weight.shape)}): PiSSA / OLoRA take r directions of the weight itself")
