"""add_weighted_adapter: a new adapter made of weighted existing ones, with PEFT's rules and numbers.

Three ways to fill each LoRA layer's new A and B from the sources there:
- "cat": the sources' factors side by side (rank = the sum of theirs), each A times weight * scaling;
- "linear", "ties", "dare_*", "magnitude_prune": the A's merged and the B's merged (rank kept), each
  weighted by sqrt(|weight * scaling|), the sign on A's side only;
- "svd" and the "*_svd" kinds: the scaled deltas s·B·A merged, then cut back to rank r by an SVD.
The new adapter has lora_alpha = r, so its scaling is 1; its other settings are the first source's. As in
PEFT, DoRA sources give only their LoRA deltas (the new magnitude starts from its own init), and a module
the first source trains in full (modules_to_save) starts again from the original module.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.lora.combine import MERGES, SIGN_METHODS, merge_tasks, truncated_svd
from lorakit.lora.layers import LoraEmbedding, LoraLayer

SVD_MERGES = {"svd": "linear", "ties_svd": "ties", "dare_linear_svd": "dare_linear",
              "dare_ties_svd": "dare_ties", "magnitude_prune_svd": "magnitude_prune"}
COMBINATIONS = ("svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
                "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd")
PLAIN_INITS = (True, False, "gaussian")  # inits that leave the base weights as they are


def add_weighted_adapter(model: nn.Module, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None,
                         svd_clamp: float | None = None, svd_full_matrices: bool = True,
                         svd_driver: str | None = None, density: float | None = None,
                         majority_sign_method: str = "total") -> None:
    """Add `adapter_name` to a LoraModel (inactive, like any added adapter): `adapters` combined with
    `weights` (negative ones subtract) by `combination_type`; see LoraModel.add_weighted_adapter."""
    combination = _check(model, adapters, weights, combination_type, density, majority_sign_method,
                         svd_rank, svd_clamp)
    rank = _new_rank(combination, [_max_rank(model.peft_config[a]) for a in adapters], svd_rank)
    merge = functools.partial(merge_tasks, method=SVD_MERGES.get(combination, combination), density=density,
                              sign_method=majority_sign_method)
    svd = functools.partial(truncated_svd, rank=rank, clamp=svd_clamp, full_matrices=svd_full_matrices,
                            driver=svd_driver)
    model.add_adapter(adapter_name, _new_config(model, adapters, rank))
    try:
        with torch.no_grad():
            for name, layer in model.lora_layers():
                if adapter_name in layer.r:
                    sources = [(a, w) for a, w in zip(adapters, weights) if a in layer.r]
                    _fill(name, layer, adapter_name, sources, combination, merge, svd)
    except Exception:
        model.delete_adapter(adapter_name)  # no half-made adapter is left behind
        raise


# --- checks, where the values enter -------------------------------------------------------------
def _check(model: nn.Module, adapters: list[str], weights: list[float], combination: str,
           density: float | None, sign_method: str, svd_rank: int | None, svd_clamp: float | None) -> str:
    """The combination to use (PEFT's: 'linear' for a single adapter), once every argument is checked."""
    if combination not in COMBINATIONS:
        raise ValueError(f"combination_type {combination!r} is not one of {list(COMBINATIONS)}")
    if not adapters or len(adapters) != len(weights):
        raise ValueError(f"give one weight per adapter: got {len(adapters)} adapters and {len(weights)} weights")
    model._check_exists(adapters)
    combination = "linear" if len(adapters) == 1 else combination
    if combination not in ("svd", "linear", "cat") and (density is None or not 0 < density <= 1):
        raise ValueError(f"combination_type {combination!r} needs density in (0, 1] (the fraction of "
                         f"entries kept), got {density!r}")
    if sign_method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {list(SIGN_METHODS)}, got {sign_method!r}")
    if svd_rank is not None and svd_rank < 1:
        raise ValueError(f"svd_rank must be a positive rank or None (the largest source rank), got {svd_rank}")
    if svd_clamp is not None and not 0 <= svd_clamp <= 1:
        raise ValueError(f"svd_clamp is a quantile in [0, 1] (or None for no clamping), got {svd_clamp}")
    _check_compatible(model, sorted(set(adapters)), combination)
    return combination


def _check_compatible(model: nn.Module, adapters: list[str], combination: str) -> None:
    configs = {a: model.peft_config[a] for a in adapters}
    ranks = {a: _max_rank(c) for a, c in configs.items()}
    if combination in MERGES and len(set(ranks.values())) > 1:
        raise ValueError(f"combination_type {combination!r} merges the factors themselves and needs adapters of "
                         f"one rank; got ranks {ranks}. Use 'cat' or an '_svd' kind for mixed ranks")
    if len({isinstance(c.target_modules, str) for c in configs.values()}) > 1:
        raise ValueError("the adapters' target_modules mix a regex string and a list of names; "
                         f"combining them is not supported: {({a: c.target_modules for a, c in configs.items()})}")
    for name, module in model.saved_modules():
        owners = [a for a in adapters if a in module.modules_to_save]
        if len(owners) > 1:
            raise ValueError(f"adapters {owners} each train their own copy of {name!r} (modules_to_save); "
                             "those copies cannot be combined")


def _max_rank(config: LoraConfig) -> int:
    return max([config.r, *config.rank_pattern.values()])


def _new_rank(combination: str, ranks: list[int], svd_rank: int | None) -> int:
    if combination == "cat":
        return sum(ranks)
    if combination in SVD_MERGES:
        return svd_rank or max(ranks)
    return ranks[0]


def _new_config(model: nn.Module, adapters: list[str], rank: int) -> LoraConfig:
    """The first adapter's config, with rank r, lora_alpha r (scaling 1) and the union of the targets.

    Unlike PEFT, rsLoRA is switched off (PEFT keeps it, scaling its combination by sqrt(r)) and an init
    that rewrites the base weights (PiSSA, OLoRA, ...) is not run again."""
    first = model.peft_config[adapters[0]]
    targets = [model.peft_config[a].target_modules for a in adapters]
    if isinstance(targets[0], str):
        union = "|".join(f"({t})" for t in targets)
    else:
        union = sorted(set().union(*targets))
    init = first.init_lora_weights if first.init_lora_weights in PLAIN_INITS else True
    return dataclasses.replace(first, r=rank, lora_alpha=rank, use_rslora=False, target_modules=union,
                               rank_pattern={}, alpha_pattern={}, init_lora_weights=init)


# --- one layer ----------------------------------------------------------------------------------
def _factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """An adapter's (A, B) in a layer: A is rank x ..., B is ... x rank (x 1 x 1 for Conv2d)."""
    if isinstance(layer, LoraEmbedding):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def _fill(name: str, layer: LoraLayer, new: str, sources: list[tuple[str, float]], combination: str,
          merge: Callable, svd: Callable) -> None:
    """The new adapter's A and B in one layer, zero beyond the rank the sources fill there (and zero
    everywhere in a layer none of them adapts, where PEFT raises)."""
    new_A, new_B = _factors(layer, new)
    new_A.zero_()
    new_B.zero_()
    if not sources:
        return
    if combination == "cat":
        A, B = _concatenated(layer, sources)
    elif combination in SVD_MERGES:
        A, B = svd(_merged_delta(layer, sources, merge))
    else:
        A, B = _merged_factors(name, layer, sources, merge)
    new_A.flatten(1)[:A.shape[0]] = A
    new_B.flatten(1)[:, :B.shape[1]] = B


def _concatenated(layer: LoraLayer, sources: list[tuple[str, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """'cat': the A's stacked, each times weight then times scaling (PEFT's rounding), the B's side by side."""
    pairs = [_factors(layer, a) for a, _ in sources]
    A = torch.cat([A.flatten(1) * w * layer.scaling[a] for (A, _), (a, w) in zip(pairs, sources)])
    return A, torch.cat([B.flatten(1) for _, B in pairs], dim=1)


def _merged_factors(name: str, layer: LoraLayer, sources: list[tuple[str, float]],
                    merge: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """The A's merged and the B's merged, weighted by sqrt(|weight * scaling|) with the sign on A's side."""
    pairs = [_factors(layer, a) for a, _ in sources]
    if len({A.shape[0] for A, _ in pairs}) > 1:
        raise ValueError(f"{name}: the adapters' ranks differ here ({[layer.r[a] for a, _ in sources]}, from "
                         "rank_pattern); merging their factors needs one rank: use 'cat' or an '_svd' kind")
    scaled = [w * layer.scaling[a] for a, w in sources]
    roots = [math.sqrt(abs(x)) for x in scaled]
    A = merge([A.flatten(1) for A, _ in pairs], torch.tensor([r if x >= 0 else -r for r, x in zip(roots, scaled)]))
    return A, merge([B.flatten(1) for _, B in pairs], torch.tensor(roots))


def _merged_delta(layer: LoraLayer, sources: list[tuple[str, float]], merge: Callable) -> torch.Tensor:
    """The sources' deltas s·B·A merged (pruned in the base weight's layout, as PEFT), as B-side x A-side."""
    delta = merge([layer.delta_weight(a) for a, _ in sources], torch.tensor([w for _, w in sources]))
    if isinstance(layer, LoraEmbedding) or getattr(layer, "fan_in_fan_out", False):
        return delta.T
    return delta.flatten(1)  # Conv2d: out x (in * kernel)
