"""The toolbox's SVD helpers against dense float64 references."""
import math

import pytest
import torch

from lorakit.tools.svd import effective_rank, energy_rank, factor_svd, kept_energy, relative_error, truncated_factors


@pytest.mark.parametrize("m, r, n", [(12, 4, 7), (5, 8, 9), (3, 2, 3)])
def test_factor_svd_is_the_svd_of_the_product(m, r, n):
    g = torch.Generator().manual_seed(m * r * n)
    B, A = torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)
    U, S, Vh = factor_svd(B, A)
    product = B.double() @ A.double()
    torch.testing.assert_close(S, torch.linalg.svdvals(product)[:S.numel()])
    torch.testing.assert_close((U * S) @ Vh, product)
    for k in range(1, S.numel() + 1):
        B_k, A_k = truncated_factors(U, S, Vh, k)
        residual = (product - B_k @ A_k).norm() / product.norm()
        assert residual.item() == pytest.approx(relative_error(S, k), abs=1e-9)
        assert kept_energy(S, k) == pytest.approx(1 - relative_error(S, k) ** 2, abs=1e-9)


def test_energy_rank_is_the_smallest_rank_keeping_the_share():
    S = torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64)  # energies 9, 4, 1 of 14
    assert [energy_rank(S, share) for share in (0.5, 9 / 14, 0.9, 13 / 14, 1.0)] == [1, 1, 2, 2, 3]


@pytest.mark.parametrize("values, want", [([1.0], 1.0), ([2.0, 2.0, 2.0], 3.0), ([1.0, 0.0, 0.0], 1.0),
                                          ([0.0, 0.0], 0.0), ([3.0, 1.0], math.exp(-(0.75 * math.log(0.75)
                                                                                       + 0.25 * math.log(0.25))))])
def test_effective_rank_is_the_exponential_of_the_spectrum_entropy(values, want):
    assert effective_rank(torch.tensor(values, dtype=torch.float64)) == pytest.approx(want)
