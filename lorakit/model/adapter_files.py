"""PEFT-compatible adapter files: adapter_config.json + adapter_model.safetensors, both ways.

Keys are exactly PEFT's: `base_model.model.<module path>.lora_A.weight` (adapter name dropped),
`lora_embedding_A`, `lora_magnitude_vector`, `<path>.base_layer.bias` for a LoRA layer's bias,
`<path>.base_layer.weight` for targeted embed_tokens / lm_head (as PEFT's save_embedding_layers="auto"),
and modules_to_save copies at the module's plain path. Reading also takes what PEFT writes with
save_embedding_layers=True (see loadable_extras).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lorakit.config import CONFIG_NAME, LoraConfig
from lorakit.io import files
from lorakit.lora.init import as_plain_lora
from lorakit.lora.layers import LoraLayer, ModulesToSave
from lorakit.model.lora_model import LoraModel
from lorakit.model.targeting import is_adapter_internal, is_bias

WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def adapter_slots(lora_model: LoraModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """PEFT key -> the live tensor in the model, for everything one adapter saves."""
    config = lora_model.peft_config[adapter_name]
    slots: dict[str, torch.Tensor] = {}
    for path, layer in lora_model.lora_layers():
        for key, param in layer.adapter_parameters(adapter_name).items():
            container, _adapter, *rest = key.split(".")
            slots[".".join([f"{PREFIX}{path}", container, *rest])] = param
    if config.bias != "none":
        layer_paths = {p for p, layer in lora_model.lora_layers() if adapter_name in layer.r}
        saved_paths = [p for p, _ in lora_model.saved_modules()]
        own_copy = f"modules_to_save.{adapter_name}."
        for name, param in lora_model.model.named_parameters():
            owner = name.rpartition(".")[0]
            if not is_bias(name):
                continue
            saved_in = next((p for p in saved_paths if name.startswith(f"{p}.")), None)
            if saved_in is not None:  # PEFT's bias="all" names the wrapper's original and copy biases too
                rest = name[len(saved_in) + 1:]
                if config.bias == "all" and not rest.startswith("modules_to_save."):
                    slots[f"{PREFIX}{saved_in}.original_module.{rest}"] = param
                elif config.bias == "all" and rest.startswith(own_copy):
                    slots[f"{PREFIX}{saved_in}.modules_to_save.{rest[len(own_copy):]}"] = param
                continue
            if is_adapter_internal(name):
                continue
            if owner in layer_paths:
                slots[f"{PREFIX}{owner}.base_layer.bias"] = param
            elif config.bias == "all":
                slots[f"{PREFIX}{name}"] = param
    for path in _saved_embedding_paths(lora_model, config):
        for key, tensor in lora_model.model.get_submodule(path).base_layer.state_dict(keep_vars=True).items():
            slots[f"{PREFIX}{path}.base_layer.{key}"] = tensor
    for path, module in lora_model.saved_modules():
        if adapter_name in module.modules_to_save:
            for key, tensor in module.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                slots[f"{PREFIX}{path}.{key}"] = tensor
    return slots


def _saved_embedding_paths(lora_model: LoraModel, config) -> list[str]:
    """PEFT's save_embedding_layers="auto": if target_modules names embed_tokens or lm_head, the base
    weights of the model's LoRA-wrapped input / output embeddings go into the file too."""
    model, targets = lora_model.model, config.target_modules
    if isinstance(targets, str):
        targeted = any(re.fullmatch(targets, n) for n, _ in model.named_modules()
                       if re.match(rf"(.*\.)?({'|'.join(EMBEDDING_LAYER_NAMES)})$", n))
    else:
        targeted = any(e in (targets or []) for e in EMBEDDING_LAYER_NAMES)
    if not targeted or not hasattr(model, "get_input_embeddings"):
        return []
    embeddings = [model.get_input_embeddings(), model.get_output_embeddings()]
    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)
            and isinstance(m.base_layer, (nn.Linear, nn.Embedding)) and any(m is e for e in embeddings)]


def loadable_extras(lora_model: LoraModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """PEFT key -> live tensor for what PEFT's save_embedding_layers=True adds (after resize_token_embeddings):
    a modules_to_save wrapper's `original_module.*` (the base module) and `modules_to_save.*` (its copy
    again), and the weights of input / output embeddings that are neither targeted nor saved."""
    slots: dict[str, torch.Tensor] = {}
    for path, module in lora_model.saved_modules():
        if adapter_name in module.modules_to_save:
            parts = {"original_module": module.base_layer, "modules_to_save": module.modules_to_save[adapter_name]}
            for part, owner in parts.items():
                slots.update({f"{PREFIX}{path}.{part}.{k}": t for k, t in owner.state_dict(keep_vars=True).items()})
    model = lora_model.model
    if hasattr(model, "get_input_embeddings"):
        embeddings = [model.get_input_embeddings(), model.get_output_embeddings()]
        for path, module in model.named_modules():
            if any(module is e for e in embeddings) and not isinstance(module, (LoraLayer, ModulesToSave)):
                slots.update({f"{PREFIX}{path}.{k}": t for k, t in module.state_dict(keep_vars=True).items()})
    return slots


def adapter_state_dict(lora_model: LoraModel, adapter_name: str) -> dict[str, torch.Tensor]:
    return {k: t.detach().contiguous() for k, t in adapter_slots(lora_model, adapter_name).items()}


def save_adapter(lora_model: LoraModel, directory: str | os.PathLike, adapter_name: str,
                 initial: str | os.PathLike | None = None) -> None:
    """Write adapter_config.json and adapter_model.safetensors, each replaced atomically. `initial`: the folder
    of this adapter saved before training (PiSSA / OLoRA); the adapter is then saved as plain LoRA for the
    original base weights (as PEFT's path_initial_model_for_weight_conversion)."""
    os.makedirs(directory, exist_ok=True)
    state, config = adapter_state_dict(lora_model, adapter_name), lora_model.peft_config[adapter_name]
    if initial is not None:
        state, config = plain_lora_for_original_base(state, config, initial)
    storages = set()
    for key, tensor in state.items():  # safetensors refuses tensors sharing memory (tied weights); PEFT clones too
        storage = tensor.untyped_storage().data_ptr()
        state[key] = tensor.clone() if storage in storages else tensor
        storages.add(storage)
    files.save_safetensors(state, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    config.save_pretrained(directory)


def plain_lora_for_original_base(state: dict[str, torch.Tensor], config: LoraConfig,
                                 initial: str | os.PathLike) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """A trained PiSSA / OLoRA adapter (over W_res = W - s B0 A0) as plain LoRA over W, with (A0, B0) read from
    the adapter saved before training in `initial`: each lora_A / lora_B pair becomes as_plain_lora's rank-2r
    pair, and r, lora_alpha (by sqrt(2) with rsLoRA), rank_pattern and alpha_pattern double, as PEFT does.
    Other tensors (biases, modules_to_save) do not depend on W_res and are kept (PEFT drops them)."""
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError("path_initial_model_for_weight_conversion cannot convert an rsLoRA adapter with "
                         "rank_pattern or alpha_pattern (doubling r and alpha would change its scaling), as in PEFT")
    if config.use_dora:
        raise ValueError("path_initial_model_for_weight_conversion cannot convert a DoRA adapter: its magnitude "
                         "was measured against the rewritten base weights, which plain LoRA cannot express")
    start = read_adapter_file(initial)
    out = dict(state)
    for key_A in (k for k in state if k.endswith(".lora_A.weight")):
        key_B = key_A.replace(".lora_A.weight", ".lora_B.weight")
        A0, B0 = (_initial_tensor(start, key, state[key], initial) for key in (key_A, key_B))
        out[key_A], out[key_B] = as_plain_lora(state[key_A], state[key_B], A0, B0)
    doubled = {"init_lora_weights": True, "r": 2 * config.r,
               "lora_alpha": config.lora_alpha * (2**0.5 if config.use_rslora else 2),
               "rank_pattern": {k: 2 * v for k, v in config.rank_pattern.items()},
               "alpha_pattern": {k: 2 * v for k, v in config.alpha_pattern.items()}}
    return out, dataclasses.replace(config, **doubled)


def _initial_tensor(start: dict[str, torch.Tensor], key: str, trained: torch.Tensor,
                    initial: str | os.PathLike) -> torch.Tensor:
    """The tensor `key` of the initial adapter, checked to fit the trained one."""
    tensor = start.get(key)
    if tensor is None or tensor.shape != trained.shape:
        found = "is missing" if tensor is None else f"has shape {tuple(tensor.shape)}"
        raise ValueError(f"initial adapter {os.fspath(initial)!r}: {key} {found}, the trained adapter has "
                         f"{tuple(trained.shape)}; pass the folder this adapter was saved to before training")
    return tensor.to(trained.dtype)


def write_model_card(directory: str | os.PathLike, base_model: str | None, tags: list[str],
                     pipeline_tag: str | None = None) -> None:
    """README.md with the metadata the Hub and its tools read, as PEFT writes it. A README.md already
    there (the user's, or an earlier save's) is left as it is."""
    head = [f"base_model: {json.dumps(base_model)}"] if base_model else []
    head += ["library_name: peft"] + ([f"pipeline_tag: {pipeline_tag}"] if pipeline_tag else [])
    head += ["tags:", *(f"- {json.dumps(tag)}" for tag in sorted(set(tags)))]
    title = f"LoRA adapter for {base_model}" if base_model else "LoRA adapter"
    body = (f"# {title}\n\nSaved by lorakit in PEFT's format ({CONFIG_NAME} + {WEIGHTS_NAME}): it loads with "
            "PEFT's `PeftModel.from_pretrained`, with lorakit and in vLLM.\n")
    try:
        with open(os.path.join(directory, CARD_NAME), "x", encoding="utf-8") as f:
            f.write("\n".join(["---", *head, "---", "", body]))
    except FileExistsError:
        pass


def read_adapter_file(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an adapter folder: safetensors, or a .bin read with weights_only (never unpickled);
    each checked to be floating-point and finite."""
    st_path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(st_path):
        try:
            state = load_file(st_path, device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{st_path}: corrupt or truncated safetensors file ({err}); "
                             "save the adapter again") from err
        return _checked(st_path, state)
    return _checked(os.path.join(directory, LEGACY_WEIGHTS_NAME), _read_bin(directory))


def _checked(path: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{path}: tensor {key} has dtype {tensor.dtype}; adapter weights must be floating-point")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: tensor {key} holds NaN or Inf; adapter weights must be finite "
                             "(was training diverging when it was saved?)")
    return state


def _read_bin(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    bin_path = os.path.join(directory, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(bin_path):
        try:
            state = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as err:
            reason = str(err).strip().splitlines()[0]  # torch's advice to drop weights_only does not apply
            raise ValueError(f"{bin_path}: cannot be read as a weights-only torch file ({reason}); "
                             "lorakit never unpickles arbitrary objects: convert it to safetensors") from err
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{bin_path}: expected a dict of tensors")
        return state
    raise FileNotFoundError(f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {os.fspath(directory)!r}")


def normalise_key(key: str) -> str:
    """Older PEFT files store DoRA's magnitude as `lora_magnitude_vector.weight`."""
    return key[: -len(".weight")] if key.endswith("lora_magnitude_vector.weight") else key


def load_adapter_weights(lora_model: LoraModel, adapter_name: str, tensors: dict[str, torch.Tensor],
                         source: str) -> None:
    """Copy a PEFT-format state dict into the adapter, refusing anything that does not fit."""
    saved = adapter_slots(lora_model, adapter_name)
    slots = {**loadable_extras(lora_model, adapter_name), **saved}
    # what lorakit itself saves goes last, so it wins where PEFT wrote a tensor twice
    tensors = dict(sorted(((normalise_key(k), v) for k, v in tensors.items()), key=lambda kv: kv[0] in saved))
    unexpected = sorted(set(tensors) - set(slots))
    missing = sorted(k for k in set(saved) - set(tensors) if not k.endswith("bias") and ".base_layer." not in k)
    if unexpected or missing:
        raise ValueError(
            f"adapter {source} does not fit this model ({type(lora_model.model).__name__}): "
            f"{len(unexpected)} tensors in the file have no place here (e.g. {unexpected[:3]}), "
            f"{len(missing)} adapter weights are missing from the file (e.g. {missing[:3]}). "
            "Was it trained for another architecture or with another config?"
        )
    for key, tensor in tensors.items():
        slot = slots[key]
        if slot.shape != tensor.shape:
            module = key[len(PREFIX):]
            raise ValueError(
                f"adapter {source}: {module} has shape {tuple(tensor.shape)} in the file but "
                f"{tuple(slot.shape)} in the model; the adapter was made for a model of other dimensions "
                "(or its adapter_config.json has another r)"
            )
    with torch.no_grad():
        for key, tensor in tensors.items():
            slots[key].copy_(tensor.to(slots[key].dtype))



def read_run_config(directory: str | os.PathLike) -> dict:
    """The run_config.yaml `lorakit train` writes beside an adapter ({} when there is none); a file that is not
    a YAML mapping is refused, naming it."""
    import yaml

    path = Path(directory) / "run_config.yaml"
    if not path.is_file():
        return {}
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err}); fix it or remove it (it only records the run)") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of flag: value, got {type(values).__name__}")
    return values
