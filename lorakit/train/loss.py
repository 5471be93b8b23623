"""The summed training loss of a collated batch.

Causal LMs whose logits are exactly `lm_head(decoder(...))` get the output head and the
cross-entropy only at the positions that carry a label, in chunks (lorakit.memory.loss), so the
[tokens x vocab] logits never exist. Other models (classifiers, heads with a bias, models that
scale or cap their logits) and vision-language models (whose batches carry pixel_values) take the
plain path through the full logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.families import family
from lorakit.memory.loss import IGNORE_INDEX, FusedHeadCrossEntropy


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy in fp32: next-token for [B, T, V] logits, per example for [B, C]."""
    if logits.dim() == 3:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(decoder, lm_head) of a causal LM whose family has a plain head, with a bias-free Linear head."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not family(hf).plain_head:
        return None
    if not hasattr(hf, "get_decoder"):
        return None
    head = hf.get_output_embeddings()
    if type(head) is not nn.Linear or head.bias is not None:  # a LoRA-wrapped or trained-copy head
        return None
    return hf.get_decoder(), head


def batch_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor],
                   fused_head: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(summed loss, logits or None): logits only come back from the full-logits path. With
    `fused_head`, a plain-head causal LM gets the head and the loss fused (no full logits)."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    parts = decoder_and_head(model) if fused_head and inputs.keys() == {"input_ids", "attention_mask"} else None
    if parts is None:
        logits = model(**inputs).logits
        return loss_sum(logits, batch["labels"]), logits
    decoder, head = parts
    hidden = decoder(**inputs).last_hidden_state[:, :-1]
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    return FusedHeadCrossEntropy.apply(hidden[keep], head.weight, labels[keep]), None
