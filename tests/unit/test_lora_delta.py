"""lorakit.lora.delta: the LoRA autograd function against plain autograd, and its dropout masks."""
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_same_gradients
from lorakit.lora.delta import LoraMatmul, keep_mask, lora_delta
from lorakit.lora.dora import dora_scale


def reference(x, A, B, scale, mask):
    dropped = x if mask is None else x * mask
    return F.linear(F.linear(dropped, A), B) * scale


@pytest.mark.parametrize("p", [0.0, 0.3, 0.7])
@pytest.mark.parametrize("x_grad", [False, True])
def test_gradients_equal_plain_autograd(p, x_grad):
    """Flipped positions (with repeats) are the dropped ones up to p = 0.5 and the kept ones above."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 12, generator=g, dtype=torch.float64)
    A, B = torch.randn(4, 12, generator=g, dtype=torch.float64), torch.randn(7, 4, generator=g, dtype=torch.float64)
    flipped = torch.randint(0, x.numel(), (70,), generator=g, dtype=torch.int32) if p else None
    mask = None
    if p:
        mask = torch.full((x.numel(),), p <= 0.5)
        mask[flipped.long()] = p > 0.5
        mask = mask.view(x.shape)
    grads = []
    for fn in (lambda *t: LoraMatmul.apply(None, *t, 1.7, p, flipped), lambda *t: reference(*t, 1.7, mask)):
        leaves = [t.clone().requires_grad_(t is not x or x_grad) for t in (x, A, B)]
        out = fn(*leaves)
        out.backward(torch.cos(out.detach()))
        grads.append((out.detach(), *[t.grad for t in leaves]))
    assert_same_gradients(*grads)


def test_keep_mask_rate_and_rng():
    torch.manual_seed(3)
    mask = keep_mask(torch.Size([400, 500]), 0.05, torch.device("cpu"))
    assert mask.dtype == torch.bool and mask.shape == (400, 500)
    assert abs((~mask).float().mean().item() - 0.05) < 0.002  # 200k draws: 5 standard errors
    torch.manual_seed(3)
    assert torch.equal(mask, keep_mask(torch.Size([400, 500]), 0.05, torch.device("cpu")))
    assert keep_mask(torch.Size([7]), 0.0, torch.device("cpu")).all()
    columns = keep_mask(torch.Size([1000, 30]), 0.5, torch.device("cpu")).float().mean(0)
    assert (columns - 0.5).abs().max() < 0.08  # every position is random
    high = keep_mask(torch.Size([400, 500]), 0.8, torch.device("cpu"))  # kept positions drawn instead
    assert abs((~high).float().mean().item() - 0.8) < 0.005


def test_keep_mask_elements_are_independent():
    """Neighbouring positions are dropped together as often as independence predicts (p^2)."""
    torch.manual_seed(4)
    dropped = ~keep_mask(torch.Size([2000, 500]), 0.2, torch.device("cpu"))
    both = (dropped[:, 1:] & dropped[:, :-1]).float().mean().item()
    assert abs(both - 0.04) < 0.002


def test_lora_delta_without_grad_matches_with_grad():
    g = torch.Generator().manual_seed(1)
    x, A, B = torch.randn(6, 8, generator=g), torch.randn(2, 8, generator=g), torch.randn(5, 2, generator=g)
    torch.manual_seed(0)
    with torch.no_grad():
        plain = lora_delta(x, A, B, 2.0, 0.25)
    torch.manual_seed(0)
    fused = lora_delta(x, A.requires_grad_(), B, 2.0, 0.25)
    assert fused.grad_fn is not None
    torch.testing.assert_close(plain, fused.detach())


def test_autocast_runs_in_the_autocast_dtype_and_returns_fp32_grads():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 8, generator=g, requires_grad=True)
    A = torch.randn(2, 8, generator=g, requires_grad=True)
    B = torch.randn(3, 2, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lora_delta(x, A, B, 1.0, 0.0)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert A.grad.dtype == B.grad.dtype == x.grad.dtype == torch.float32
    want = (torch.ones(4, 3) @ B.detach()).T @ x.detach()
    torch.testing.assert_close(A.grad, want, rtol=0.05, atol=0.05)


def test_dora_scale_gradients_equal_autograd_and_it_keeps_its_output():
    g = torch.Generator().manual_seed(6)
    combined = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    magnitude = torch.rand(7, generator=g, dtype=torch.float64) + 0.5
    norm = torch.rand(7, generator=g, dtype=torch.float64) + 0.5
    results = []
    for fused in (True, False):
        c, m = combined.clone().requires_grad_(), magnitude.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t) or t, lambda t: t):
            out = dora_scale(c, m, norm) if fused else c * (m / norm)
        out.backward(torch.sin(out.detach()))
        results.append((out.detach(), c.grad, m.grad))
        if fused:
            assert any(t is out for t in saved) and not any(t is c for t in saved)
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
