"""An adapter at another rank: the truncated SVD of each module's update s·B·A, written as plain LoRA.

The output always has the scale folded into the factors: use_rslora off, no alpha_pattern, lora_alpha
equal to r, and modules whose rank differs listed in rank_pattern with their factors scaled so that
(lora_alpha / their rank)·B·A is the truncated update. Every reader then agrees on it, llama.cpp's
converter included (it reads lora_alpha alone and takes each module's rank from its tensors' shapes).
With `plain`, ranks are also made equal (zero rows and columns pad the smaller ones), so there is no
rank_pattern either. DoRA magnitudes are kept as they are.
"""
from __future__ import annotations

import dataclasses
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.config import CONFIG_NAME
from lorakit.io import files
from lorakit.model.adapter_files import PREFIX, WEIGHTS_NAME
from lorakit.tools.adapter import FACTOR_NAMES, read_adapter
from lorakit.tools.shards import copy_side_files
from lorakit.tools.svd import energy_rank, factor_svd, kept_energy, relative_error, truncated_factors


@dataclass
class Resized:
    """One module's new rank, the share of its update's squared Frobenius norm kept, the relative error."""

    path: str
    rank_before: int
    rank_after: int
    energy_kept: float
    relative_error: float


def resize_adapter(adapter_dir: str | os.PathLike, output_dir: str | os.PathLike, rank: int | None = None,
                   energy: float | None = None, plain: bool = False) -> list[Resized]:
    """Write `adapter_dir` at rank `rank` (or per module the smallest rank keeping `energy`) to `output_dir`."""
    if (rank is None) == (energy is None):
        raise ValueError("give --rank R (one rank for every module) or --energy E (per module, the smallest rank "
                         "keeping share E of the update's squared Frobenius norm), not both")
    if energy is not None and not 0 < energy <= 1:
        raise ValueError(f"--energy must be in (0, 1], got {energy}")
    files.require_new_dir(output_dir)
    adapter = read_adapter(adapter_dir)
    if rank is not None:
        _check_rank(rank, adapter.modules.values(), adapter_dir)
    spectra = {path: factor_svd(m.scaling * m.B.flatten(1), m.A.flatten(1)) for path, m in adapter.modules.items()}
    ranks = {path: rank or energy_rank(S, energy) for path, (_, S, _) in spectra.items()}
    r = max(ranks.values()) if plain else Counter(ranks.values()).most_common(1)[0][0]
    state = dict(adapter.extras)
    for path, m in adapter.modules.items():
        k = ranks[path]
        B, A = truncated_factors(*spectra[path], k)
        width = r if plain else k
        fold = (k / r) ** 0.5 if not plain else 1.0  # lora_alpha / rank = r / k is undone in the factors
        B = torch.nn.functional.pad(B * fold, (0, width - k))
        A = torch.nn.functional.pad(A * fold, (0, 0, 0, width - k))
        new = {"B": B.reshape(m.B.shape[0], width, *m.B.shape[2:]), "A": A.reshape(width, *m.A.shape[1:])}
        for suffix, tensor in m.tensors.items():  # a DoRA magnitude is kept
            state[f"{PREFIX}{path}.{suffix}"] = new.get(FACTOR_NAMES[suffix], tensor).to(tensor.dtype).contiguous()
    config = dataclasses.replace(adapter.config, r=r, lora_alpha=r, use_rslora=False, alpha_pattern={},
                                 rank_pattern={} if plain else {p: k for p, k in ranks.items() if k != r})
    with files.staged_dir(output_dir) as tmp:
        files.save_safetensors(state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        config.save_pretrained(tmp)
        copy_side_files(Path(adapter_dir), tmp, skip=(CONFIG_NAME,))
    return [Resized(p, adapter.modules[p].rank, k, kept_energy(spectra[p][1], k), relative_error(spectra[p][1], k))
            for p, k in ranks.items()]


def _check_rank(rank: int, modules, adapter_dir) -> None:
    if rank < 1:
        raise ValueError(f"--rank must be >= 1, got {rank}")
    smaller = sorted((m.rank, m.path) for m in modules if m.rank < rank)
    if smaller:
        raise ValueError(f"--rank {rank} is more than {len(smaller)} module(s) of {adapter_dir} have (e.g. "
                         f"{smaller[0][1]}: rank {smaller[0][0]}); an update of rank r has at most r singular values, "
                         f"so the largest --rank this adapter allows is {smaller[0][0]}")
