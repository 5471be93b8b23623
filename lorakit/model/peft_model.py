"""The drop-in names: get_peft_model, PeftModel and its methods, as PEFT users call them."""
from __future__ import annotations

import functools
import os
import sys
from contextlib import contextmanager

from torch import nn

from lorakit import memory
from lorakit.config import CONFIG_NAME, LOAD_ONLY_INITS, LoraConfig
from lorakit.model import adapter_files, merge
from lorakit.model.lora_model import LoraModel


class PeftModel(nn.Module):
    """A base model carrying LoRA adapters: PeftModel -> base_model (LoraModel) -> model.

    With `memory_savers` (the default), lorakit.memory's savers are installed on the model, and on
    the blocks of every adapter added later; `memory_savers=False` leaves the model's code as it is."""

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                 memory_savers: bool = True):
        super().__init__()
        self.base_model = LoraModel(model, peft_config, adapter_name)
        self.uses_memory_savers = memory_savers
        self._install_memory_savers()
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

    @property
    def __class__(self):
        """transformers' Trainer saves and resumes adapters (not the whole model) only for an
        isinstance of peft.PeftModel. Where peft is loaded (Trainer loads it), isinstance answers yes:
        this class offers PEFT's API. Nothing is inherited from PEFT's class; lorakit never imports it."""
        return _peft_lookalike(type(self), getattr(sys.modules.get("peft"), "PeftModel", None))

    def __reduce_ex__(self, protocol):
        """Pickled and copied as its own class (pickle refuses a __class__ other than the type)."""
        return _new, (type(self),), self.__getstate__()

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
    def memory_savers(self) -> dict[str, list[str]]:
        """What the memory savers changed on the model: saver -> module paths ('' = the model itself)."""
        return memory.installed(self.get_base_model())

    def _install_memory_savers(self) -> None:
        if self.uses_memory_savers:
            memory.enable(self.get_base_model())

    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str:
        return self.base_model.active_adapter

    # --- adapters -------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: LoraConfig) -> None:
        _check_new(peft_config)
        self.base_model.add_adapter(adapter_name, peft_config)
        self._install_memory_savers()

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        self.base_model.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    def add_weighted_adapter(self, *args, **kwargs) -> None:
        """A new adapter combining existing ones (LoraModel.add_weighted_adapter has the arguments)."""
        self.base_model.add_weighted_adapter(*args, **kwargs)
        self._install_memory_savers()

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
    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None,
                        is_main_process: bool = True,
                        path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
                        **_ignored) -> None:
        """PEFT's layout: 'default' at the top of the folder, any other adapter in a subfolder of its name;
        a model card (README.md) at the top unless one is there. path_initial_model_for_weight_conversion:
        the folder a PiSSA / OLoRA adapter was saved to before training; the trained adapter is then saved
        as plain LoRA (rank 2r) for the original base weights, as PEFT does."""
        if not is_main_process:
            return
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
            adapter_files.save_adapter(self.base_model, target, name, path_initial_model_for_weight_conversion)
        self._write_model_card(save_directory, self.peft_config[names[0]])

    def _write_model_card(self, directory: str | os.PathLike, config: LoraConfig) -> None:
        base, name = self.get_base_model(), config.base_model_name_or_path
        tags = ["lora", "lorakit", *(getattr(base, "model_tags", None) or [])]
        tags += [f"base_model:adapter:{name}"] if name else []
        tags += ["transformers"] if any(c.__name__ == "PreTrainedModel" for c in type(base).__mro__) else []
        pipeline = "text-generation" if config.task_type == "CAUSAL_LM" else None
        adapter_files.write_model_card(directory, name, tags, pipeline)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: LoraConfig | None = None,
                        subfolder: str | None = None, memory_savers: bool = True, **_ignored) -> PeftModel:
        """Attach the adapter saved in a local folder (by lorakit or PEFT) to `model`."""
        directory = _adapter_dir(model_id, subfolder)
        config = config or LoraConfig.from_pretrained(directory)
        config.inference_mode = not is_trainable
        tensors = adapter_files.read_adapter_file(directory)
        try:
            peft_model = cls(model, config, adapter_name, memory_savers)
        except ValueError as err:
            raise ValueError(f"adapter {os.fspath(directory)!r} does not fit this model: {err}") from err
        adapter_files.load_adapter_weights(peft_model.base_model, adapter_name, tensors, os.fspath(directory))
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     subfolder: str | None = None, **_ignored) -> None:
        """Add a saved adapter under a new name (inactive until set_adapter), or, as PEFT (and Trainer's
        resume), load its weights into the existing adapter of that name. Not trainable: eval mode, as PEFT."""
        directory = _adapter_dir(model_id, subfolder)
        tensors = adapter_files.read_adapter_file(directory)
        if adapter_name in self.peft_config:
            adapter_files.load_adapter_weights(self.base_model, adapter_name, tensors, os.fspath(directory))
        else:
            self._add_loaded(directory, adapter_name, is_trainable, tensors)
            self._install_memory_savers()
        if not is_trainable:
            self.eval()

    def _add_loaded(self, directory: str, adapter_name: str, is_trainable: bool, tensors: dict) -> None:
        config = LoraConfig.from_pretrained(directory)
        config.inference_mode = not is_trainable
        try:
            self.base_model.add_adapter(adapter_name, config)
        except ValueError as err:
            raise ValueError(f"adapter {os.fspath(directory)!r} does not fit this model: {err}") from err
        try:
            adapter_files.load_adapter_weights(self.base_model, adapter_name, tensors, os.fspath(directory))
        except ValueError:
            self.base_model.delete_adapter(adapter_name)
            raise


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                   memory_savers: bool = True, **_ignored) -> PeftModel:
    """Wrap `model` with a fresh LoRA adapter: the base frozen, the adapter trainable. With
    `memory_savers=False` the model's own loss and forward code stay untouched (lorakit.memory)."""
    _check_new(peft_config)
    return PeftModel(model, peft_config, adapter_name, memory_savers)


def _check_new(config: LoraConfig) -> None:
    if config.init_lora_weights in LOAD_ONLY_INITS:
        raise ValueError(f"init_lora_weights={config.init_lora_weights!r}: lorakit loads adapters trained this way "
                         "(they are plain LoRA) but does not initialise new ones so; use True or 'gaussian', "
                         "or create the adapter with PEFT")


@functools.cache
def _peft_lookalike(cls: type, peft_class: type | None) -> type:
    """`cls`, or where peft is loaded a subclass of `cls` and peft.PeftModel: for isinstance only,
    never instantiated."""
    if peft_class is None:
        return cls
    return type(cls.__name__, (cls, peft_class), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})


def _new(cls: type) -> PeftModel:
    return cls.__new__(cls)


def _plain(model: nn.Module) -> nn.Module:
    """The unloaded base model with its own loss, MLP and block forwards back."""
    return memory.disable(model)


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

