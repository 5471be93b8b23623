"""Module-tree surgery that every part shares."""
from torch import nn


def is_within(name: str, modules) -> bool:
    """Whether the module `name` is one of `modules` or inside one, each given by its full path or a dotted run of
    whole name parts (PEFT's modules_to_save rule: "pooler" holds "bert.pooler.dense", "ert.pooler" nothing)."""
    parts = name.split(".")
    return any(".".join(parts[start:end]) in modules for end in range(1, len(parts) + 1) for start in range(end))


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
