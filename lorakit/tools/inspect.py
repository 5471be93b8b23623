"""What an adapter is and does: method, ranks, scalings, targets, the size and spectrum of each update,
and, given the base model, whether each module is there with the right shape and how large its update
is next to the frozen weight."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from lorakit.model.adapter_files import WEIGHTS_NAME
from lorakit.tools.adapter import Adapter, LoraModule, read_adapter
from lorakit.tools.svd import effective_rank, factor_svd

EFFECTIVE_RANK = "exp(entropy of s_i / sum(s)), Roy & Vetterli 2007: 1 for one direction, r for r equal ones"


def inspect_adapter(adapter_dir: str | os.PathLike, base: str | None = None) -> dict:
    """A JSON-ready description of the adapter (and of how it sits on `base`, a model folder, if given)."""
    adapter = read_adapter(adapter_dir)
    config = adapter.config
    modules = {path: describe_module(m) for path, m in adapter.modules.items()}
    if base is not None:
        compare_with_base(adapter, base, modules)
    tensors = adapter.state_dict().values()
    weights_file = Path(adapter_dir) / WEIGHTS_NAME
    report = {
        "adapter": str(adapter_dir), "method": adapter.method, "base_model": base or config.base_model_name_or_path,
        "r": config.r, "lora_alpha": config.lora_alpha, "use_rslora": config.use_rslora, "use_dora": config.use_dora,
        "rank_pattern": config.rank_pattern, "alpha_pattern": config.alpha_pattern,
        "target_modules": config.target_modules, "modules_to_save": config.modules_to_save, "bias": config.bias,
        "task_type": config.task_type, "effective_rank_definition": EFFECTIVE_RANK,
        "parameters": sum(t.numel() for t in tensors), "bytes": sum(t.numel() * t.element_size() for t in tensors),
        "file_bytes": weights_file.stat().st_size if weights_file.is_file() else None,
        "modules": modules,
    }
    report["warnings"] = warnings(report, base)
    report["no_op"] = any(w.startswith("no-op") for w in report["warnings"])
    return report


def describe_module(m: LoraModule) -> dict:
    """Rank, alpha, scaling, shape, and the update's norm and singular values (of s·B·A)."""
    _, S, _ = factor_svd(m.scaling * m.B.flatten(1), m.A.flatten(1))
    return {"kind": "embedding" if m.is_embedding else "conv2d" if m.A.dim() == 4 else "linear",
            "rank": m.rank, "alpha": m.alpha, "scaling": m.scaling, "dora": m.magnitude is not None,
            "A_shape": list(m.A.shape), "B_shape": list(m.B.shape),
            "update_norm": S.norm().item(), "singular_values": S.tolist(), "effective_rank": effective_rank(S),
            "zero_update": not bool(S.any())}


def compare_with_base(adapter: Adapter, base: str, modules: dict[str, dict]) -> None:
    """Per module: in_base (found with fitting shapes, or why not), the frozen weight's norm and the update's
    norm relative to it."""
    from lorakit.io.pretrained import resolve_model_path
    from lorakit.io.weights import Checkpoint, model_key
    from lorakit.tools.fit import find_module, lora_layer, skeleton, tie_groups

    folder = resolve_model_path(base)
    model, checkpoint = skeleton(folder), Checkpoint(folder)
    names = set(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "")
    keys = {model_key(k, names, prefix): k for k in checkpoint.file_of}
    for group in tie_groups(model):  # a tied head's weight is stored under its twin's key
        stored = next((keys[n] for n in group if n in keys), None)
        keys.update({n: stored for n in group if n not in keys})
    for path, info in modules.items():
        try:
            lora_layer(find_module(model, path, base), adapter.modules[path], adapter.config)
        except ValueError as err:
            info.update(in_base=False, problem=str(err))
            continue
        key = keys.get(f"{path}.weight")
        weight_norm = torch.linalg.norm(checkpoint.tensor(key).double()).item() if key else None
        info.update(in_base=True, weight_norm=weight_norm,
                    relative_update=info["update_norm"] / weight_norm if weight_norm else None)


def warnings(report: dict, base: str | None) -> list[str]:
    """Loud findings: an adapter that changes nothing (no-op), modules missing from the base, zero updates."""
    modules = report["modules"]
    found = [p for p, m in modules.items() if m.get("in_base", True)]
    missing = [p for p in modules if p not in found]
    zero = [p for p, m in modules.items() if m["zero_update"]]
    out = [f"module {p} does not fit {base}: {modules[p]['problem']}" for p in missing]
    out += [f"module {p}: B is all zero, its update is zero" for p in zero if len(zero) < len(modules)]
    changes_other = bool(report["modules_to_save"]) or report["bias"] != "none"
    if not found:
        out.append(f"no-op: the adapter matches no module of {base}")
    elif all(modules[p]["zero_update"] for p in found) and not changes_other:
        out.append("no-op: every LoRA update is zero (B is all zero: an untrained adapter?)")
    return out
