"""Optional memory savers behind one door: the same numbers as the model's own code, less kept
for backward. `enable(model)` installs them, `disable(model)` restores the model's own code paths,
`installed(model)` says what is changed where.

- loss: a causal LM's loss without autograd's vocab-sized copies;
- gated_mlp: gated MLPs recompute their product in backward instead of keeping it;
- norm_outputs: adapters after a norm keep a recipe for its output instead of the output.
"""
from __future__ import annotations

from torch import nn

from lorakit.memory import gated_mlp, loss, norm_outputs

SAVERS = {"loss": loss, "gated_mlp": gated_mlp, "norm_outputs": norm_outputs}


def _chosen(savers) -> list[str]:
    chosen = list(SAVERS) if savers is None else list(savers)
    unknown = [s for s in chosen if s not in SAVERS]
    if unknown:
        raise ValueError(f"unknown memory savers {unknown}; there are {list(SAVERS)}")
    return chosen


def enable(model: nn.Module, savers: list[str] | None = None) -> dict[str, list[str]]:
    """Install the savers (default: all) wherever they apply; blocks already changed are left as they are.
    Returns `installed(model)`."""
    for name in _chosen(savers):
        SAVERS[name].install(model)
    return installed(model)


def disable(model: nn.Module, savers: list[str] | None = None) -> nn.Module:
    """Remove the savers (default: all): the model runs its own code again."""
    for name in _chosen(savers):
        SAVERS[name].uninstall(model)
    return model


def installed(model: nn.Module) -> dict[str, list[str]]:
    """saver -> the paths of the modules it changed ('' is the model itself), for savers in use."""
    return {name: found for name, saver in SAVERS.items() if (found := saver.installed(model))}
