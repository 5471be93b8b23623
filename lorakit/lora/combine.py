"""Merging several task tensors into one (task arithmetic, TIES, DARE, magnitude pruning) and the truncated
SVD that turns a merged weight delta back into LoRA factors: the math of add_weighted_adapter.

Each function follows the paper's steps in PEFT's order, so a merge here equals PEFT's value for value;
DARE draws its masks from torch's global generator, one tensor after another, as PEFT does.
"""
from __future__ import annotations

import torch

MERGES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_METHODS = ("total", "frequency")


def prune_by_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """t with only its int(density * numel) entries of largest magnitude kept, the rest zero."""
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    keep[t.abs().reshape(-1).topk(int(density * t.numel())).indices] = 1
    return t * keep.reshape(t.shape)


def prune_at_random(t: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: each entry kept with probability `density` and the kept ones divided by it (same expectation)."""
    return t * torch.bernoulli(torch.full_like(t, density)) / density


def elect_sign(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """TIES' sign election over dim 0: where each task's entry has the sign of the elected one, which is the
    sign of the tasks' sum ('total') or of their sign count ('frequency'), ties going to +."""
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else signs.sum(dim=0)
    return signs == torch.where(votes >= 0, 1, -1)


def disjoint_mean(stacked: torch.Tensor, agrees: torch.Tensor) -> torch.Tensor:
    """TIES' disjoint merge: per entry, the mean over the tasks that agree with the elected sign (0 if none)."""
    return (stacked * agrees).sum(dim=0) / agrees.sum(dim=0).clamp(min=1.0)


PRUNERS = {"ties": prune_by_magnitude, "magnitude_prune": prune_by_magnitude,
           "dare_linear": prune_at_random, "dare_ties": prune_at_random}


def merge_tasks(tensors: list[torch.Tensor], weights: torch.Tensor, method: str = "linear",
                density: float | None = None, sign_method: str = "total") -> torch.Tensor:
    """One tensor from several of one shape: each pruned to `density` (by magnitude for ties /
    magnitude_prune, at random for dare_*; not at all for linear or density >= 1), then weighted and
    summed, or for the ties kinds averaged over the tasks that agree with the sign elected before weighting."""
    if method in PRUNERS and density < 1:
        tensors = [PRUNERS[method](t, density) for t in tensors]
    stacked = torch.stack(tensors)
    weighted = stacked * weights.to(stacked.device).view(-1, *[1] * (stacked.dim() - 1))
    if method.endswith("ties"):
        return disjoint_mean(weighted, elect_sign(stacked, sign_method))
    return weighted.sum(dim=0)


def truncated_svd(delta: torch.Tensor, rank: int, clamp: float | None = None, full_matrices: bool = True,
                  driver: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B @ A the best approximation of `delta` of rank <= `rank` (the singular values folded into
    B); with `clamp`, every entry of both is clipped to +-(the `clamp` quantile of all their entries)."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    k = min(rank, S.numel())
    B, A = U[:, :k] @ torch.diag(S[:k]), Vh[:k, :]
    if clamp is not None:
        hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
    return A, B
