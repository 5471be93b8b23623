"""The drop-in names: get_peft_model, PeftModel and its methods, as PEFT users call them."""
from __future__ import annotations

import functools
import os
from contextlib import contextmanager

from torch import nn

from . import checkpoint, lean_loss, lean_mlp, lean_norm, merge
from .config import CONFIG_NAME, LoraConfig
from .inject import LoraModel


class PeftModel(nn.Module):
    """A base model carrying LoRA adapters: PeftModel -> base_model (LoraModel) -> model."""

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default"):
        super().__init__()
        self.base_model = LoraModel(model, peft_config, adapter_name)
        lean_loss.install(model)  # the same causal-LM loss, without autograd's vocab-sized copies
        lean_mlp.install(model)  # gated MLPs recompute their product instead of keeping it
        lean_norm.install(model)  # adapters after a norm keep a recipe for its output
        if hasattr(model, "enable_input_require_grads") and any(
                getattr(m, "gradient_checkpointing", False) for m in model.modules()):
            model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
        # transformers' Trainer keeps the dataset columns that forward's signature names: show the base's
        self.__dict__["forward"] = functools.update_wrapper(functools.partial(PeftModel.forward, self),
                                                            model.forward)

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # --- parameters -----------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str:
        return self.base_model.active_adapter

    # --- adapters -------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: LoraConfig) -> None:
        self.base_model.add_adapter(adapter_name, peft_config)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        self.base_model.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    @contextmanager
    def disable_adapter(self):
        with self.base_model.disable_adapter():
            yield

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        merge.merge_adapter(self.base_model, adapter_names, safe_merge)

    def unmerge_adapter(self) -> None:
        merge.unmerge_adapter(self.base_model)

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: list[str] | None = None,
                         quantized_merge: str | None = None) -> nn.Module:
        """The base model with the active adapters folded into its weights, plain modules only.
        Over a 4-bit base, quantized_merge='dequantize' or 'requantize' says what the merged layers become."""
        return _plain(merge.unload(self.base_model, merge=True, safe_merge=safe_merge,
                                   adapter_names=adapter_names, quantized_merge=quantized_merge))

    def unload(self) -> nn.Module:
        """The base model with the LoRA layers taken out, nothing merged."""
        return _plain(merge.unload(self.base_model, merge=False))

    # --- files ----------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike,
                        selected_adapters: list[str] | None = None, **_ignored) -> None:
        """PEFT's layout: 'default' at the top of the folder, any other adapter in a subfolder of its name."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {os.fspath(save_directory)!r} is a file; give a folder")
        names = selected_adapters or list(self.peft_config)
        self.base_model._check_exists(names)
        base_name = _model_name(self.get_base_model())
        for name in names:
            config = self.peft_config[name]
            if config.base_model_name_or_path is None:
                config.base_model_name_or_path = base_name
            target = save_directory if name == "default" else os.path.join(save_directory, name)
            checkpoint.save_adapter(self.base_model, target, name)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: LoraConfig | None = None,
                        subfolder: str | None = None, **_ignored) -> "PeftModel":
        """Attach the adapter saved in a local folder (by lorakit or PEFT) to `model`."""
        directory = _adapter_dir(model_id, subfolder)
        config = config or LoraConfig.from_pretrained(directory)
        config.inference_mode = not is_trainable
        tensors = checkpoint.read_adapter_file(directory)
        try:
            peft_model = cls(model, config, adapter_name)
        except ValueError as err:
            raise ValueError(f"adapter {os.fspath(directory)!r} does not fit this model: {err}") from err
        checkpoint.load_adapter_weights(peft_model.base_model, adapter_name, tensors, os.fspath(directory))
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     subfolder: str | None = None, **_ignored) -> None:
        """Add a saved adapter under a new name (inactive until set_adapter)."""
        directory = _adapter_dir(model_id, subfolder)
        config = LoraConfig.from_pretrained(directory)
        config.inference_mode = not is_trainable
        tensors = checkpoint.read_adapter_file(directory)
        try:
            self.base_model.add_adapter(adapter_name, config)
        except ValueError as err:
            raise ValueError(f"adapter {os.fspath(directory)!r} does not fit this model: {err}") from err
        try:
            checkpoint.load_adapter_weights(self.base_model, adapter_name, tensors, os.fspath(directory))
        except ValueError:
            self.base_model.delete_adapter(adapter_name)
            raise


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                   **_ignored) -> PeftModel:
    """Wrap `model` with a fresh LoRA adapter: the base frozen, the adapter trainable."""
    return PeftModel(model, peft_config, adapter_name)


def _plain(model: nn.Module) -> nn.Module:
    """The unloaded base model with its own loss, MLP and block forwards back."""
    return lean_norm.uninstall(lean_mlp.uninstall(lean_loss.uninstall(model)))


def _adapter_dir(model_id: str | os.PathLike, subfolder: str | None) -> str:
    directory = os.path.join(os.fspath(model_id), subfolder or "")
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"adapter folder {directory!r} does not exist. lorakit loads adapters from local folders "
            f"holding {CONFIG_NAME} and adapter_model.safetensors (download hub adapters first)"
        )
    return directory


def _model_name(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None

