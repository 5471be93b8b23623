"""lorakit.memory.loss against autograd's cross-entropy and transformers' ForCausalLMLoss."""
import pytest
import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

from helpers import assert_same_gradients, build_model
from lorakit import LoraConfig, get_peft_model
from lorakit.memory import loss as lean_loss
from lorakit.memory.loss import FusedHeadCrossEntropy, LeanCrossEntropy, causal_lm_loss


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(lean_loss, "_CHUNK_ELEMENTS", 3 * 50)  # 3 rows of a 50-word vocab per chunk


def targets_with_ignored(n, vocab, generator):
    targets = torch.randint(0, vocab, (n,), generator=generator)
    targets[::3] = -100
    return targets


def test_lean_cross_entropy_equals_autograd():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(11, 50, generator=g, dtype=torch.float64) * 3
    targets = targets_with_ignored(11, 50, g)
    results = []
    for fn in (LeanCrossEntropy.apply,
               lambda x, t: F.cross_entropy(x, t, ignore_index=-100, reduction="sum")):
        x = logits.clone().requires_grad_()
        loss = fn(x, targets)
        (loss * 0.7).backward()
        results.append((loss.detach(), x.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("num_items", [None, 7])
def test_causal_lm_loss_equals_transformers(num_items):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 9, 50, generator=g)
    labels = torch.randint(0, 50, (2, 9), generator=g)
    labels[:, :3] = -100
    results = []
    for fn in (causal_lm_loss, ForCausalLMLoss):
        x = logits.clone().requires_grad_()
        loss = fn(x, labels, 50, num_items_in_batch=num_items)
        loss.backward()
        results.append((loss.detach(), x.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("head_trains", [False, True])
def test_fused_head_equals_head_then_cross_entropy(head_trains):
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(10, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(50, 8, generator=g, dtype=torch.float64)
    targets = targets_with_ignored(10, 50, g)
    results = []
    for fused in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(head_trains)
        loss = FusedHeadCrossEntropy.apply(h, w, targets) if fused else \
            F.cross_entropy(h @ w.T, targets, ignore_index=-100, reduction="sum")
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    assert_same_gradients(*results)


def test_a_second_backward_is_refused():
    logits = torch.randn(4, 50, requires_grad=True)
    loss = LeanCrossEntropy.apply(logits, torch.tensor([1, 2, -100, 3]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated once"):
        loss.backward()


def test_peft_model_uses_the_lean_loss_and_gives_it_back_on_unload():
    model = build_model("llama")
    inputs = {"input_ids": torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))}
    inputs["labels"] = inputs["input_ids"]
    want = model(**inputs).loss
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert model.loss_function is causal_lm_loss
    torch.testing.assert_close(peft_model(**inputs).loss, want)  # B = 0: the base model's loss
    plain = peft_model.merge_and_unload()
    assert plain.loss_function is ForCausalLMLoss


def test_classifiers_keep_their_loss():
    model = build_model("bert")
    before = model.loss_function
    get_peft_model(model, LoraConfig(r=2, target_modules=["query"]))
    assert model.loss_function is before
