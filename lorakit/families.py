"""What lorakit knows of model architectures, in one table keyed by transformers' `model_type`.

Every per-architecture fact lives here: the modules PEFT adapts when `target_modules` is not
given, the class of a gated MLP whose forward the memory savers may replace, whether a
causal LM's logits are exactly `lm_head(decoder(...))` (so the head and the loss can be fused), and
the pooling layer between a sequence classifier's encoder and its head.
An architecture missing from the table still works: it gets the general paths.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Family:
    default_targets: tuple[str, ...] = ()  # PEFT's default target_modules; () = none, ask the user
    gated_mlp: str | None = None  # its MLP class, exactly down_proj(act_fn(gate_proj(x)) * up_proj(x))
    plain_head: bool = False  # causal-LM logits are lm_head(decoder(...).last_hidden_state), nothing more
    cls_pooler: str | None = None  # the layer a sequence classifier's head reads (BERT's pooler)


_QV = ("q_proj", "v_proj")
FAMILIES: dict[str, Family] = {
    "llama": Family(_QV, "LlamaMLP", True),
    "mistral": Family(_QV, "MistralMLP", True),
    "qwen2": Family(_QV, "Qwen2MLP", True),
    "qwen3": Family(_QV, "Qwen3MLP", True),
    "qwen2_5_vl": Family(gated_mlp="Qwen2_5_VLMLP"),  # the vision tower's (with biases); the LM's is Qwen2MLP
    "olmo2": Family(gated_mlp="Olmo2MLP", plain_head=True),
    "gpt2": Family(("c_attn",), plain_head=True),
    "phi3": Family(plain_head=True),
    "starcoder2": Family(plain_head=True),
    **dict.fromkeys(["mixtral", "gemma", "gemma2", "opt", "gptj", "gpt_neo", "bart", "stablelm", "vit"], Family(_QV)),
    "bert": Family(("query", "value"), cls_pooler="pooler"),
    **dict.fromkeys(["roberta", "xlm-roberta", "electra"], Family(("query", "value"))),  # their heads hold the dense
    **dict.fromkeys(["albert", "mobilebert"], Family(cls_pooler="pooler")),
    "distilbert": Family(cls_pooler="pre_classifier"),
    "deberta": Family(("in_proj",), cls_pooler="pooler"),
    "gpt_bigcode": Family(("c_attn",)),
    **dict.fromkeys(["bloom", "gpt_neox", "falcon"], Family(("query_key_value",))),
    **dict.fromkeys(["t5", "mt5"], Family(("q", "v"))),
    "phi": Family(("q_proj", "v_proj", "fc1", "fc2")),
    "deberta-v2": Family(("query_proj", "value_proj"), cls_pooler="pooler"),
}
GATED_MLP_CLASSES = frozenset(f.gated_mlp for f in FAMILIES.values() if f.gated_mlp)


@dataclass(frozen=True)
class VlmParts:
    """Module-path prefixes of a vision-language model's three parts (ms-swift's vit / aligner / llm).
    A prefix may sit inside another part's (Qwen2-VL's merger inside its vision tower): the longest wins."""
    vit: tuple[str, ...]
    aligner: tuple[str, ...]
    llm: tuple[str, ...]


_LLAVA = VlmParts(vit=("model.vision_tower",), aligner=("model.multi_modal_projector",),
                  llm=("model.language_model", "lm_head"))
_QWEN_VL = VlmParts(vit=("model.visual",), aligner=("model.visual.merger",), llm=("model.language_model", "lm_head"))
VLM_PARTS: dict[str, VlmParts] = {"llava": _LLAVA, "llava_next": _LLAVA, "qwen2_vl": _QWEN_VL, "qwen2_5_vl": _QWEN_VL}

# Attribute names of a sequence classifier's fresh head (trained in full, saved with the adapter).
SEQ_CLS_HEADS = ("classifier", "score")


def family(model: nn.Module) -> Family:
    """The model's row of the table (an empty Family for an architecture lorakit has no facts on)."""
    return FAMILIES.get(getattr(getattr(model, "config", None), "model_type", None), Family())


def vlm_parts(model: nn.Module) -> VlmParts | None:
    """The model's vision-language parts, or None for a text-only model (or one lorakit has no facts on)."""
    return VLM_PARTS.get(getattr(getattr(model, "config", None), "model_type", None))


def is_norm(module: nn.Module) -> bool:
    """A LayerNorm or RMSNorm, torch's or a model's own class of that name."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))
