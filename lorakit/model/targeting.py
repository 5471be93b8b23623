"""Which modules a LoraConfig adapts: PEFT's matching rules for names, regexes, layers and 'all-linear';
for a vision-language model, the modules inside the parts that are not frozen."""
from __future__ import annotations

import difflib
import re

from torch import nn

from lorakit.config import LoraConfig, TaskType
from lorakit.families import SEQ_CLS_HEADS, VlmParts, vlm_parts
from lorakit.lora.layers import LoraLayer, LoraLinear, is_conv1d, lora_layer_class
from lorakit.modules import is_within
from lorakit.quant.linear4bit import NF4Linear


def name_matches(name: str, targets: str | list[str]) -> bool:
    """PEFT's rule: a string is a full-match regex; a list entry matches exactly or as a dotted suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in targets)


def layer_index_ok(name: str, config: LoraConfig) -> bool:
    """layers_to_transform: keep only modules inside the listed layer indices."""
    wanted = config.layers_to_transform
    if wanted is None or wanted == []:
        return True
    patterns = config.layers_pattern or []
    patterns = [patterns] if isinstance(patterns, str) else patterns
    regexes = [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in patterns] or [r".*?\.[^.]*\.(?P<idx>\d+)\."]
    match = next((m for m in (re.match(rx, name) for rx in regexes) if m), None)
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == wanted if isinstance(wanted, int) else index in wanted


def pattern_value(name: str, patterns: dict, default):
    """rank_pattern / alpha_pattern: the first key that matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def is_adapter_internal(name: str) -> bool:
    """Modules that lorakit itself added (lora_A.x, modules_to_save.x) are never targets."""
    return bool(re.search(r"(^|\.)(lora_[A-Za-z_]+|modules_to_save)(\.|$)", name))


def is_bias(name: str) -> bool:
    """A parameter named `bias` (not `q_bias` or `logit_bias`), as PEFT's bias modes read it."""
    return name == "bias" or name.endswith(".bias")


def is_all_linear(targets) -> bool:
    """Whether target_modules is PEFT's 'all-linear' shorthand (any case)."""
    return isinstance(targets, str) and targets.lower() == "all-linear"


def all_linear_names(model: nn.Module, config: LoraConfig) -> list[str]:
    """'all-linear': every Linear / Conv1D except the output head (as PEFT expands it) and those inside the
    modules trained in full (modules_to_save: PEFT leaves them unadapted too)."""
    names = {n for n, m in model.named_modules()
             if (isinstance(m, (nn.Linear, NF4Linear, LoraLinear)) or is_conv1d(m)) and not is_adapter_internal(n)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None and config.task_type == TaskType.SEQ_CLS.value:
        head = next((getattr(model, h) for h in SEQ_CLS_HEADS if hasattr(model, h)), None)
    names -= {n for n, m in model.named_modules() if head is not None and m is head}
    return sorted(n for n in names if not is_within(n, config.modules_to_save or []))


def targetable_names(model: nn.Module) -> list[str]:
    """Leaf names of the modules LoRA can wrap, for error messages."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if n and lora_layer_class(m) is not None and not is_adapter_internal(n)})


def resolve_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Full names of the modules this config adapts; raises naming what is wrong if none or a typo."""
    names = [n for n, _ in model.named_modules() if n and not is_adapter_internal(n)]
    candidates = [n for n in names
                  if not (config.exclude_modules and name_matches(n, config.exclude_modules))
                  and not is_within(n, config.modules_to_save or [])]
    if isinstance(config.target_modules, list):
        unknown = [t for t in config.target_modules if not any(name_matches(n, [t]) for n in names)]
        if unknown:
            raise ValueError(_no_match_message(model, f"target_modules {unknown} match no module", unknown))
    targets = [n for n in candidates if name_matches(n, config.target_modules) and layer_index_ok(n, config)]
    if not targets:
        raise ValueError(_no_match_message(model, f"target_modules={config.target_modules!r} matched no module", []))
    for n in targets:
        module = model.get_submodule(n)
        if lora_layer_class(module) is None and not isinstance(module, LoraLayer):
            raise ValueError(
                f"target module {n!r} is a {type(module).__name__}; LoRA can target nn.Linear, "
                "transformers' Conv1D, nn.Embedding and nn.Conv2d"
            )
    return targets


def _no_match_message(model: nn.Module, problem: str, unknown: list[str]) -> str:
    options = targetable_names(model)
    hints = [f"{u!r} -> did you mean {close}?" for u in unknown
             if (close := difflib.get_close_matches(u.rsplit(".", 1)[-1], options, n=3))]
    return (f"{problem}. Modules LoRA can target here: {options} (or 'all-linear', or a regex "
            "that fully matches module paths)." + (" " + "; ".join(hints) if hints else ""))


VLM_PART_NAMES = ("vit", "aligner", "llm")


def vlm_part(name: str, parts: VlmParts) -> str | None:
    """The part ('vit', 'aligner' or 'llm') a module or parameter path lies in: its longest matching prefix."""
    name = name.removeprefix("base_model.model.")
    matches = [(len(prefix), part) for part in VLM_PART_NAMES for prefix in getattr(parts, part)
               if name == prefix or name.startswith(prefix + ".")]
    return max(matches)[1] if matches else None


def vlm_targets(model: nn.Module, config: LoraConfig, frozen: set[str]) -> list[str]:
    """Full names of the modules `config` targets (all-linear, or names) inside the parts not in `frozen`,
    as an explicit list that PEFT reloads the same way."""
    parts = vlm_parts(model)
    if parts is None:
        raise ValueError(f"{type(model).__name__} is not a vision-language model lorakit knows the parts of")
    targets = config.target_modules
    names = all_linear_names(model, config) if is_all_linear(targets) else resolve_targets(model, config)
    kept = [n for n in names if vlm_part(n, parts) not in (frozen | {None})]
    if not kept:
        open_parts = ", ".join(p for p in VLM_PART_NAMES if p not in frozen) or "none"
        raise ValueError(f"target_modules {targets!r} match no module inside the parts that are not frozen "
                         f"({open_parts}); unfreeze a part (--freeze_llm / --freeze_vit / --freeze_aligner false) "
                         "or name modules inside one")
    return kept
