"""Singular value decompositions for the toolbox: of a LoRA update from its factors, truncation to new
factors, the rank that keeps a share of the energy, and the effective rank of a spectrum."""
from __future__ import annotations

import torch


def factor_svd(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh (float64) of the product B @ A (B: m x r, A: r x n) without forming it: B = Qb Rb and
    A^T = Qa Ra give B A = Qb (Rb Ra^T) Qa^T, so only an r x r matrix is decomposed."""
    Qb, Rb = torch.linalg.qr(B.double())
    Qa, Ra = torch.linalg.qr(A.double().T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    return Qb @ U, S, Vh @ Qa.T


def truncated_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of rank k with B @ A the best rank-k approximation U_k S_k Vh_k (sqrt(S) on each side)."""
    root = S[:k].sqrt()
    return U[:, :k] * root, root[:, None] * Vh[:k]


def kept_energy(S: torch.Tensor, k: int) -> float:
    """The share of the squared Frobenius norm that the first k singular values keep (1 for a zero matrix)."""
    total = (S * S).sum()
    return 1.0 if total == 0 else ((S[:k] * S[:k]).sum() / total).item()


def relative_error(S: torch.Tensor, k: int) -> float:
    """||M - M_k||_F / ||M||_F of the rank-k truncation, from the dropped singular values (0 for a zero matrix)."""
    total = S.norm()
    return 0.0 if total == 0 else (S[k:].norm() / total).item()


def energy_rank(S: torch.Tensor, share: float) -> int:
    """The smallest rank (at least 1) keeping `share` of the squared Frobenius norm."""
    return next((k for k in range(1, S.numel() + 1) if kept_energy(S, k) >= share - 1e-12), S.numel())


def effective_rank(S: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank exp(H(p)), p_i = s_i / sum(s): 1 for one direction, n for n equal ones."""
    total = S.sum()
    if total == 0:
        return 0.0
    p = S[S > 0] / total
    return torch.exp(-(p * p.log()).sum()).item()
