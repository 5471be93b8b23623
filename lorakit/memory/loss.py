"""Cross-entropy that computes its gradient in the forward pass, chunk by chunk, and keeps only that.

Autograd's `cross_entropy(logits)` keeps the [tokens x vocab] log-softmax and, in backward, makes
two more tensors of that size; the gradient (softmax - one_hot) is all backward needs, so it is
computed while the chunk is hot and stored alone.

- `LeanCrossEntropy`: over given logits; `causal_lm_loss` wraps it as a transformers
  `loss_function` with the same results as `ForCausalLMLoss` (installed by `PeftModel`).
- `FusedHeadCrossEntropy`: output head and loss together, for the rows that carry a label only,
  so the full logits never exist (the trainer uses it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lorakit.lora.delta import compute_dtype

IGNORE_INDEX = -100
_CHUNK_ELEMENTS = 1 << 24  # logits per chunk at most: 64 MB in fp32


def _rows_per_chunk(rows: int, vocab: int) -> int:
    """Equal chunks of at most _CHUNK_ELEMENTS logits (a small last chunk is a slow matmul)."""
    chunks = -(-rows // max(1, _CHUNK_ELEMENTS // vocab))
    return max(1, -(-rows // max(chunks, 1)))


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, want_grad: bool, out: torch.Tensor | None = None):
    """Summed CE of one chunk and d(loss)/d(logits) (zero on ignored rows), in fp32 or wider.
    The gradient is written into `out` when given (and returned); `out` may be `logits` itself."""
    logits = logits.to(_loss_dtype(logits.dtype))
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, 0).unsqueeze(1)
    picked = logits.gather(1, safe)
    if not want_grad:
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        return torch.where(valid, (lse - picked).squeeze(1), 0.0).sum(), None
    top = logits.amax(dim=-1, keepdim=True)
    direct = out is not None and out.dtype == logits.dtype
    grad = torch.sub(logits, top, out=out if direct else None).exp_()
    sums = grad.sum(dim=-1, keepdim=True)
    loss = torch.where(valid, (top + sums.log() - picked).squeeze(1), 0.0).sum()
    grad.div_(sums).scatter_add_(1, safe, torch.full_like(safe, -1, dtype=grad.dtype)).mul_(valid.unsqueeze(1))
    if out is not None and not direct:
        out.copy_(grad)
    return loss, grad


class _OnceBackward(torch.autograd.Function):
    """Shared backward: the stored gradients scaled in place by the incoming scalar gradient."""

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.used:
            raise RuntimeError("lorakit's lean cross-entropy keeps one gradient and scales it in place, "
                               "so it can be backpropagated once; recompute the loss to backward again")
        ctx.used = True
        grads = [g.mul_(grad_loss.to(g.dtype)) if g is not None else None for g in ctx.grads]
        return (*grads, None)


class LeanCrossEntropy(_OnceBackward):
    """sum over rows of CE(logits [N, V], targets [N]), ignoring IGNORE_INDEX."""

    @staticmethod
    def forward(ctx, logits, targets):
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(logits) if want_grad else None
        total = logits.new_zeros((), dtype=_loss_dtype(logits.dtype))
        step = _rows_per_chunk(logits.shape[0], logits.shape[-1])
        for start in range(0, logits.shape[0], step):
            out = grad[start:start + step] if want_grad else None
            total += _loss_and_grad(logits[start:start + step], targets[start:start + step], want_grad, out)[0]
        ctx.grads, ctx.used = [grad], False
        return total


def causal_lm_loss(logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = IGNORE_INDEX,
                   shift_labels=None, **kwargs) -> torch.Tensor:
    """transformers' ForCausalLMLoss (next-token CE, mean or sum / num_items_in_batch) computed
    with LeanCrossEntropy."""
    if ignore_index != IGNORE_INDEX:
        raise ValueError(f"lorakit's causal-LM loss supports ignore_index={IGNORE_INDEX}, not {ignore_index}")
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    logits = logits.reshape(-1, vocab_size)
    targets = shift_labels.reshape(-1).to(logits.device)
    total = LeanCrossEntropy.apply(logits, targets)
    if num_items_in_batch is None:
        return total / (targets != IGNORE_INDEX).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class FusedHeadCrossEntropy(_OnceBackward):
    """sum over rows of CE(hidden [M, H] @ weight[V, H]^T, targets [M]) without the [M, V] logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        dtype = compute_dtype(hidden, hidden.dtype)
        h, w = hidden.to(dtype), weight.to(dtype)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None
        total = hidden.new_zeros((), dtype=_loss_dtype(dtype))
        step = _rows_per_chunk(h.shape[0], weight.shape[0])
        for start in range(0, h.shape[0], step):
            rows = h[start:start + step]
            logits = rows @ w.T  # overwritten by its gradient: one chunk-sized buffer, not two
            loss, g = _loss_and_grad(logits, targets[start:start + step], want_h or want_w, out=logits)
            total += loss
            if g is not None:
                if want_h:
                    grad_h[start:start + step] = logits @ w
                if want_w:
                    grad_w += (logits.T @ rows).to(grad_w.dtype)
        ctx.grads, ctx.used = [grad_h, grad_w], False
        return total


def install(model) -> bool:
    """Make a transformers causal LM compute its loss with `causal_lm_loss` (same results, less
    memory). Models with another loss (classification, a custom loss_function) are left alone."""
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING
    except ImportError:
        return False
    if getattr(model, "loss_function", None) is not LOSS_MAPPING.get("ForCausalLM"):
        return False
    model.loss_function = causal_lm_loss
    return True


def uninstall(model) -> None:
    """Undo `install` (the model handed back to the user computes its loss as before)."""
    if installed(model):
        del model._loss_function


def installed(model) -> list[str]:
    """[''] (the model itself) when `model` computes its loss with `causal_lm_loss`, else []."""
    return [""] if model.__dict__.get("_loss_function") is causal_lm_loss else []
