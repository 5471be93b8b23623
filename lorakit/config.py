"""LoraConfig: PEFT's field names and defaults, validation, adapter_config.json in and out."""
from __future__ import annotations

import dataclasses
import enum
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from lorakit.io import files

CONFIG_NAME = "adapter_config.json"


class TaskType(str, enum.Enum):
    """The task a model is adapted for (PEFT's names)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


# Fields PEFT's LoraConfig has that lorakit does not implement, with the value that means
# "off". A file holding the default loads silently; any other value is refused by name.
UNSUPPORTED_PEFT_FIELDS: dict[str, Any] = {
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "trainable_token_indices": None,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "qalora_group_size": 16,
    "monteclora_config": None,
    "layer_replication": None,
    "runtime_config": {"ephemeral_gpu_offload": False},
    "lora_bias": False,
    "target_parameters": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "ensure_weight_tying": False,
}
# Settings of PEFT's data-driven inits: they shape the weights before training, never the trained
# adapter, so a file's values are accepted and not kept (init_lora_weights says what is supported).
INIT_SETTINGS_FIELDS: dict[str, Any] = {"loftq_config": {}, "eva_config": None, "corda_config": None,
                                        "lora_ga_config": None}
# Bookkeeping fields PEFT writes; read and written back, never acted on.
PEFT_METADATA_FIELDS = ("peft_type", "auto_mapping", "peft_version", "revision")

INIT_CHOICES = (True, False, "gaussian")
# Inits that leave the base weights alone: their trained adapters are plain LoRA, loaded as such.
LOAD_ONLY_INITS = ("orthogonal", "eva")
# Data-driven inits that rewrite the base weights too; PEFT makes them and converts their adapters to plain LoRA.
CONVERTIBLE_INITS = ("corda", "lora_ga")
BIAS_CHOICES = ("none", "all", "lora_only")


@dataclass
class LoraConfig:
    """What to adapt and how: rank, scaling, targets, init. Field names and defaults as PEFT's."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: Union[bool, str] = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    fan_in_fan_out: bool = False
    task_type: Optional[Union[TaskType, str]] = None
    base_model_name_or_path: Optional[str] = None
    inference_mode: bool = False
    revision: Optional[str] = None
    peft_type: str = "LORA"

    def __post_init__(self) -> None:
        self.rank_pattern = {} if self.rank_pattern is None else self.rank_pattern  # PEFT allows null
        self.alpha_pattern = {} if self.alpha_pattern is None else self.alpha_pattern
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.task_type, TaskType):
            self.task_type = self.task_type.value
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field and what would be accepted."""
        _check_types(self)
        _check_rank("r", self.r)
        for pattern, rank in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{pattern!r}]", rank)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.bias not in BIAS_CHOICES:
            raise ValueError(f"bias must be one of {BIAS_CHOICES}, got {self.bias!r}")
        _check_init(self.init_lora_weights)
        for name, alpha in [("lora_alpha", self.lora_alpha),
                            *((f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items())]:
            if alpha < 0:
                warnings.warn(f"{name}={alpha} is negative: the adapter's update is subtracted (scaling "
                              "lora_alpha / r < 0); PEFT allows it, but it is most likely a mistake",
                              UserWarning, stacklevel=4)
        if self.peft_type != "LORA":
            raise ValueError(f"lorakit reads LoRA adapters only; this config has peft_type={self.peft_type!r}")
        if isinstance(self.target_modules, str) and (
            self.layers_to_transform is not None or self.layers_pattern is not None
        ):
            raise ValueError("layers_to_transform / layers_pattern need target_modules as a list, not a regex string")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern is set but layers_to_transform is not: give the layer indices too")
        valid_tasks = {t.value for t in TaskType}
        if self.task_type is not None and self.task_type not in valid_tasks:
            raise ValueError(f"task_type must be one of {sorted(valid_tasks)} or None, got {self.task_type!r}")

    def scaling_for(self, rank: int, alpha: float) -> float:
        """lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
        return alpha / (rank**0.5) if self.use_rslora else alpha / rank

    def to_dict(self) -> dict[str, Any]:
        """The JSON PEFT writes: our fields plus PEFT's unsupported ones at their defaults."""
        out = {**UNSUPPORTED_PEFT_FIELDS, **INIT_SETTINGS_FIELDS, **dataclasses.asdict(self)}
        out.pop("runtime_config")  # PEFT keeps it out of files too
        for key in ("target_modules", "exclude_modules"):
            if isinstance(out[key], (set, tuple)):
                out[key] = sorted(out[key])
        return out

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        payload = {**self.to_dict(), "inference_mode": True}
        files.write_text(os.path.join(directory, CONFIG_NAME), json.dumps(payload, indent=2, sort_keys=True))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> LoraConfig:
        """Build from a PEFT-style dict: known fields used, PEFT-only fields checked, others warned."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in UNSUPPORTED_PEFT_FIELDS:
                if not _is_default(value, UNSUPPORTED_PEFT_FIELDS[key]):
                    raise ValueError(
                        f"{source}: {key}={value!r} is a PEFT feature lorakit does not support; "
                        f"lorakit accepts only {UNSUPPORTED_PEFT_FIELDS[key]!r} there"
                    )
            elif key not in PEFT_METADATA_FIELDS and key not in INIT_SETTINGS_FIELDS:
                warnings.warn(f"{source}: ignoring unknown LoraConfig field {key!r}", UserWarning, stacklevel=2)
        try:
            return cls(**kwargs)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from err

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, subfolder: str | None = None) -> LoraConfig:
        path = os.path.join(directory, subfolder or "", CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no {CONFIG_NAME} in {os.path.dirname(path)!r}: an adapter folder holds {CONFIG_NAME} "
                "and adapter_model.safetensors (as written by save_pretrained)"
            )
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object of LoraConfig fields")
        config = cls.from_dict(data, source=path)
        if (weight_init(config.init_lora_weights) or (None, None))[1] is not None:
            warnings.warn(f"{path}: init_lora_weights={config.init_lora_weights!r} rewrites the base weights again "
                          "on load by a randomized SVD, so they match the ones this adapter was trained on only "
                          "with the same random draws; save it converted (save_pretrained(..., "
                          "path_initial_model_for_weight_conversion=...)) or load it onto the saved residual model "
                          "with init_lora_weights=True", UserWarning, stacklevel=2)
        return config


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_names(value: Any, allow_str: bool = True) -> bool:
    return value is None or (allow_str and isinstance(value, str)) or (
        isinstance(value, list) and all(isinstance(v, str) for v in value))


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_layers(value: Any) -> bool:
    return value is None or _is_index(value) or (isinstance(value, list) and all(map(_is_index, value)))


# field -> (test, what is accepted), checked before any value is used
FIELD_TYPES: dict[str, tuple[Any, str]] = {
    "lora_alpha": (_is_number, "a number"),
    "lora_dropout": (_is_number, "a number"),
    **dict.fromkeys(["use_rslora", "use_dora", "fan_in_fan_out", "inference_mode"],
                    (lambda v: isinstance(v, bool), "true or false")),
    **dict.fromkeys(["target_modules", "exclude_modules", "layers_pattern"],
                    (_is_names, "a string, a list of strings or null")),
    "modules_to_save": (lambda v: _is_names(v, allow_str=False), "a list of module names or null"),
    "layers_to_transform": (_is_layers, "a layer index, a list of layer indices or null"),
    **dict.fromkeys(["rank_pattern", "alpha_pattern"], (lambda v: isinstance(v, dict), "an object (name -> value)")),
    **dict.fromkeys(["task_type", "base_model_name_or_path", "revision"],
                    (lambda v: v is None or isinstance(v, str), "a string or null")),
}


def _check_types(config: LoraConfig) -> None:
    for name, (ok, accepted) in FIELD_TYPES.items():
        value = getattr(config, name)
        if not ok(value):
            raise ValueError(f"{name} must be {accepted}, got {value!r} ({type(value).__name__})")
    for key, alpha in config.alpha_pattern.items():
        if not _is_number(alpha):
            raise ValueError(f"alpha_pattern[{key!r}] must be a number, got {alpha!r} ({type(alpha).__name__})")


def weight_init(init: Any) -> tuple[str, int | None] | None:
    """The inits that rewrite the base weight (W - scaling * B A, so the model starts as the base; lora/init.py):
    ("pissa", None) for PiSSA by full SVD, ("pissa", n) for "pissa_niter_<n>" (randomized SVD, n subspace
    iterations), ("olora", None) for OLoRA by QR (any case, as PEFT); None for any other init.
    save_pretrained(..., path_initial_model_for_weight_conversion=...) turns such adapters into plain LoRA."""
    if not isinstance(init, str):
        return None
    if init == "pissa" or init.lower() == "olora":
        return init.lower(), None
    niter = init.removeprefix("pissa_niter_")
    return ("pissa", int(niter)) if niter != init and niter.isdigit() else None


def _check_init(init: Any) -> None:
    if init in INIT_CHOICES or init in LOAD_ONLY_INITS or weight_init(init):
        return
    accepted = ("init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_<n>' (e.g. "
                "'pissa_niter_4') or 'olora' (or, in a trained adapter, 'orthogonal' or 'eva')")
    if isinstance(init, str) and init.startswith("pissa"):
        raise ValueError(f"{accepted}, got {init!r}: PiSSA's fast SVD is spelled 'pissa_niter_' and a number of "
                         "subspace iterations")
    if isinstance(init, str) and init.lower().startswith(CONVERTIBLE_INITS):
        raise ValueError(
            f"{accepted}, got {init!r}: that init rewrites the base model's weights, so the trained adapter fits "
            "only those. Convert it to plain LoRA with PEFT: save the adapter before training (with "
            "init_lora_weights=True), then save the trained one with save_pretrained(..., "
            "path_initial_model_for_weight_conversion=<that folder>); the result loads onto the original base"
        )
    raise ValueError(f"{accepted}, got {init!r}")


def _check_rank(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer (the LoRA rank), got {value!r}")


def _is_default(value: Any, default: Any) -> bool:
    if isinstance(default, dict):
        return value in (None, {}) or value == default
    return value == default

