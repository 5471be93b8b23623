"""An adapter folder as the toolbox reads it: its config, and its tensors grouped per adapted module."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.config import CONFIG_NAME, LoraConfig
from lorakit.model.adapter_files import PREFIX, WEIGHTS_NAME, normalise_key, read_adapter_file
from lorakit.model.targeting import pattern_value

# The tensors of one LoRA module, by their name after the module path (PEFT's keys).
FACTOR_NAMES = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "A", "lora_embedding_B": "B",
                "lora_magnitude_vector": "magnitude"}


@dataclass
class LoraModule:
    """One adapted module: its factors as stored (A: r x d_in..., B: d_out x r...), rank, alpha, scaling."""

    path: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # PEFT's suffix -> tensor
    rank: int = 0
    alpha: float = 0.0
    scaling: float = 0.0

    @property
    def A(self) -> torch.Tensor:
        return self._factor("A")

    @property
    def B(self) -> torch.Tensor:
        return self._factor("B")

    @property
    def magnitude(self) -> torch.Tensor | None:
        return self.tensors.get("lora_magnitude_vector")

    @property
    def is_embedding(self) -> bool:
        return "lora_embedding_A" in self.tensors

    def _factor(self, which: str) -> torch.Tensor:
        found = [t for k, t in self.tensors.items() if FACTOR_NAMES[k] == which]
        if len(found) != 1:
            raise ValueError(f"adapter module {self.path}: expected one lora_{which} tensor, found {len(found)}")
        return found[0]


@dataclass
class Adapter:
    """An adapter folder: its LoraConfig, its LoRA modules by path, and its other tensors (trained biases,
    modules_to_save copies, saved embedding layers) by key."""

    folder: Path
    config: LoraConfig
    modules: dict[str, LoraModule]
    extras: dict[str, torch.Tensor]

    @property
    def method(self) -> str:
        """LoRA, DoRA, rsLoRA or DoRA + rsLoRA."""
        names = [n for n, on in (("DoRA", self.config.use_dora), ("rsLoRA", self.config.use_rslora)) if on]
        return " + ".join(names) or "LoRA"

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors under PEFT's keys, as adapter_model.safetensors holds them."""
        state = {f"{PREFIX}{m.path}.{suffix}": t for m in self.modules.values() for suffix, t in m.tensors.items()}
        return {**state, **self.extras}


def read_adapter(folder: str | os.PathLike) -> Adapter:
    """Read a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder not found: {folder} (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
    return adapter_from(folder, LoraConfig.from_pretrained(folder), read_adapter_file(folder))


def adapter_from(folder: Path, config: LoraConfig, state: dict[str, torch.Tensor]) -> Adapter:
    """An Adapter from its config and PEFT-keyed tensors; `folder` names it in errors."""
    modules: dict[str, LoraModule] = {}
    extras = {}
    for key, tensor in state.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"{folder / WEIGHTS_NAME}: tensor {key} does not start with {PREFIX!r} as PEFT's keys do")
        path, suffix = _split(normalise_key(key)[len(PREFIX):])
        if suffix is None:
            extras[key] = tensor
        else:
            modules.setdefault(path, LoraModule(path)).tensors[suffix] = tensor
    for module in modules.values():
        module.rank = module.A.shape[0]
        module.alpha = pattern_value(module.path, config.alpha_pattern, config.lora_alpha)
        module.scaling = config.scaling_for(module.rank, module.alpha)
        declared = pattern_value(module.path, config.rank_pattern, config.r)
        if declared != module.rank or module.B.shape[1] != module.rank:
            raise ValueError(f"{folder}: module {module.path} has lora_A {tuple(module.A.shape)} and lora_B "
                             f"{tuple(module.B.shape)}, but {CONFIG_NAME} gives it rank {declared}")
    if not modules:
        raise ValueError(f"{folder / WEIGHTS_NAME} holds no LoRA tensors (lora_A / lora_B)")
    return Adapter(folder, config, modules, extras)


def _split(name: str) -> tuple[str, str | None]:
    """(module path, factor suffix) of a key without PEFT's prefix; suffix None for a non-LoRA tensor."""
    for suffix in FACTOR_NAMES:
        if name.endswith(f".{suffix}"):
            return name[: -len(suffix) - 1], suffix
    return name, None
