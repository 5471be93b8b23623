"""A model with LoRA layers swapped in, and the registry of its named adapters (add / set / delete / disable)."""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator

from torch import nn

from lorakit.config import LoraConfig, TaskType
from lorakit.families import SEQ_CLS_HEADS, family
from lorakit.lora.layers import LoraLayer, LoraLinear, ModulesToSave, lora_layer_class
from lorakit.model import combine
from lorakit.model.targeting import (
    all_linear_names,
    is_adapter_internal,
    is_all_linear,
    is_bias,
    name_matches,
    pattern_value,
    resolve_targets,
    targetable_names,
)
from lorakit.modules import replace_module


class LoraModel(nn.Module):
    """A model with LoRA layers swapped in, and the registry of its named adapters."""

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default"):
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapters: list[str] = []
        self.add_adapter(adapter_name, config)
        self.set_adapter(adapter_name)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    @property
    def active_adapter(self) -> str:
        return self.active_adapters[0] if len(self.active_adapters) == 1 else self.active_adapters

    def lora_layers(self) -> Iterator[tuple[str, LoraLayer]]:
        return ((n, m) for n, m in self.model.named_modules() if isinstance(m, LoraLayer))

    def saved_modules(self) -> Iterator[tuple[str, ModulesToSave]]:
        return ((n, m) for n, m in self.model.named_modules() if isinstance(m, ModulesToSave))

    # --- registry -------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: LoraConfig) -> None:
        """Attach a new adapter (inactive until set_adapter) to the modules the config targets."""
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete it first or pick another name")
        if not adapter_name.isidentifier():
            raise ValueError(f"adapter name {adapter_name!r} must be a Python identifier (letters, digits, _)")
        config = self._complete_config(config)
        targets = resolve_targets(self.model, config)
        for name in targets:
            self._add_to_layer(name, adapter_name, config)
        for layer in (self.model.get_submodule(n) for n in targets):  # recorded as PEFT does: each Linear
            if isinstance(layer, LoraLinear):  # (False) or GPT-2 Conv1D (True) target sets it, the last one stays
                config.fan_in_fan_out = layer.fan_in_fan_out
        for name in self._saved_module_names(config):
            module = self.model.get_submodule(name)
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module)
                replace_module(self.model, name, module)
            module.add_adapter(adapter_name)
        self.peft_config[adapter_name] = config
        if not self.active_adapters:  # as PEFT: an added (inactive) adapter's `bias` makes nothing trainable
            self._freeze_base(config, targets)
        self._refresh_trainable()

    def _complete_config(self, config: LoraConfig) -> LoraConfig:
        """A copy of the config with defaults resolved against this model, as PEFT saves it."""
        config = dataclasses.replace(config)
        if config.target_modules is None:
            defaults = family(self.model).default_targets
            if not defaults:
                model_type = getattr(getattr(self.model, "config", None), "model_type", None)
                raise ValueError(
                    f"target_modules is not set and lorakit has no default for model type {model_type!r}; "
                    f"pass target_modules (e.g. 'all-linear' or some of {targetable_names(self.model)})"
                )
            config.target_modules = list(defaults)
        if config.task_type == TaskType.SEQ_CLS.value:
            extra = [h for h in SEQ_CLS_HEADS if h not in (config.modules_to_save or [])]
            config.modules_to_save = list(config.modules_to_save or []) + extra
        if is_all_linear(config.target_modules):
            config.target_modules = all_linear_names(self.model, config)
        return config

    def _saved_module_names(self, config: LoraConfig) -> list[str]:
        wanted = config.modules_to_save or []
        found = [n for n, _ in self.model.named_modules()
                 if n and not is_adapter_internal(n) and name_matches(n, wanted)]
        missing = [w for w in wanted if w not in SEQ_CLS_HEADS and not any(name_matches(n, [w]) for n in found)]
        if missing:
            raise ValueError(f"modules_to_save {missing} match no module of the model")
        return [n for n in found if not any(n.startswith(f"{o}.") for o in found)]

    def _add_to_layer(self, name: str, adapter_name: str, config: LoraConfig) -> None:
        module = self.model.get_submodule(name)
        if not isinstance(module, LoraLayer):
            module = lora_layer_class(module)(module)
            replace_module(self.model, name, module)
        rank = pattern_value(name, config.rank_pattern, config.r)
        alpha = pattern_value(name, config.alpha_pattern, config.lora_alpha)
        module.add_adapter(adapter_name, rank, alpha, config.lora_dropout, config.use_rslora,
                           config.use_dora, config.init_lora_weights)
        module.train(module.training)  # the new adapter's modules take the layer's train / eval mode

    def _freeze_base(self, config: LoraConfig, targets: list[str]) -> None:
        """Only adapters train; biases too when config.bias says so."""
        for name, p in self.model.named_parameters():
            if not is_adapter_internal(name):
                p.requires_grad_(False)
        if config.inference_mode or config.bias == "none":
            return
        saved = tuple(f"{n}." for n, _ in self.saved_modules())  # as PEFT: their originals stay frozen
        for name, p in self.model.named_parameters():
            owner = name.rpartition(".")[0]
            if is_bias(name) and not is_adapter_internal(name) \
                    and not name.startswith(saved) and (config.bias == "all" or owner in targets):
                p.requires_grad_(True)

    def _refresh_trainable(self) -> None:
        """Parameters of active, trainable adapters get gradients; all other adapters' do not."""
        def trains(name: str) -> bool:
            return name in self.active_adapters and not self.peft_config[name].inference_mode

        for _, layer in self.lora_layers():
            layer.active_adapters = list(self.active_adapters)
            for name in layer.r:
                for p in layer.adapter_parameters(name).values():
                    p.requires_grad_(trains(name))
        for _, module in self.saved_modules():
            module.active_adapter = next((a for a in self.active_adapters if a in module.modules_to_save), None)
            for name, copy in module.modules_to_save.items():
                copy.requires_grad_(trains(name))

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Make these adapters the active ones (their outputs add up); only they train."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_exists(names)
        merged = [layer for _, layer in self.lora_layers() if layer.merged_adapters]
        if merged:  # as PEFT: a merged adapter would otherwise stay in the weights beside the new active ones
            warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.", stacklevel=2)
            for layer in merged:
                layer.unmerge()
        self.active_adapters = names
        self._refresh_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_exists([adapter_name])
        for _, layer in self.lora_layers():
            layer.delete_adapter(adapter_name)
        for _, module in self.saved_modules():
            module.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        remaining = [a for a in self.active_adapters if a != adapter_name]
        if not remaining and adapter_name in self.active_adapters and self.peft_config:
            remaining = [sorted(self.peft_config)[0]]  # as PEFT: the first remaining adapter by name takes over
            warnings.warn(f"Adapter {adapter_name} was active which is now deleted. "
                          f"Setting active adapter to {remaining[0]}.", stacklevel=2)
        self.active_adapters = remaining
        self._refresh_trainable()

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             svd_clamp: float | None = None, svd_full_matrices: bool = True,
                             svd_driver: str | None = None, density: float | None = None,
                             majority_sign_method: str = "total") -> None:
        """A new adapter (inactive until set_adapter) combining existing ones, as PEFT's of that name.

        combination_type: 'svd' (default), 'linear', 'cat', 'ties', 'ties_svd', 'dare_linear', 'dare_ties',
        'dare_linear_svd', 'dare_ties_svd', 'magnitude_prune', 'magnitude_prune_svd'. 'cat' and 'svd' are
        exact (svd up to its rank, svd_rank, default the largest source rank); 'linear' and the other
        kinds without '_svd' mix the factors themselves and need one rank. The TIES and DARE kinds keep
        `density` of each tensor (DARE at random, from torch's global generator); the TIES ones elect
        signs by `majority_sign_method` ('total' or 'frequency'). svd_clamp clips the factors to a quantile."""
        combine.add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp,
                                     svd_full_matrices, svd_driver, density, majority_sign_method)

    def _check_exists(self, names: list[str]) -> None:
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"no adapter named {unknown[0]!r}; this model has {sorted(self.peft_config)}")

    # --- enable / disable -----------------------------------------------------------------
    def _set_disabled(self, disabled: bool) -> None:
        for _, module in [*self.lora_layers(), *self.saved_modules()]:
            module.disabled = disabled

    def disable_adapter_layers(self) -> None:
        self._set_disabled(True)

    def enable_adapter_layers(self) -> None:
        self._set_disabled(False)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within this block the model computes as the base model."""
        self._set_disabled(True)
        try:
            yield
        finally:
            self._set_disabled(False)

