"""Position ids of the running batch's rows on a model with M-RoPE (Qwen2-VL, Qwen2.5-VL).

Such a model gives each image token three positions (time, height and width on the image's grid), and
the text after an image goes on from the image's largest position + 1, so a row's positions fall behind
its token count. The prefill's positions (3 x rows x length) come from the model's own `get_rope_index`
over the left-padded batch (padding masked); each row's offset (its rope delta: largest position + 1 -
prompt length, 0 for a text row) is added to its token count at every decode step, as transformers'
generate does. A batch with no images, or a model without M-RoPE, keeps the plain positions.
"""
from __future__ import annotations

import torch


def uses_mrope(model) -> bool:
    """Whether the model places image tokens with M-RoPE (its inner model has transformers' get_rope_index)."""
    return hasattr(getattr(model, "model", None), "get_rope_index")


def prefill_positions(model, ids: torch.Tensor, mask: torch.Tensor, requests: list) -> tuple[torch.Tensor, list[int]]:
    """(position ids for the prefill of left-padded `ids`, each row's offset for its decode steps): each row's
    token count so far (rows x length), or M-RoPE's three rows where an image request joins such a model."""
    plain = (mask.cumsum(-1) - 1).clamp(min=0)
    grids = [r.media["image_grid_thw"] for r in requests if r.media and "image_grid_thw" in r.media]
    if not grids or not uses_mrope(model):
        return plain, [0] * len(requests)
    image_tokens = (ids == model.config.image_token_id).long()
    positions, deltas = model.model.get_rope_index(ids, image_tokens, image_grid_thw=torch.cat(grids).to(ids.device),
                                                   attention_mask=mask)
    return positions, deltas.flatten().tolist()
