"""Attaching LoRA / DoRA to the loaded base model (or unfreezing it all), and saving what was trained.
A vision-language model trains only the parts that --freeze_llm / --freeze_vit / --freeze_aligner leave open."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.families import vlm_parts
from lorakit.model.peft_model import PeftModel, get_peft_model
from lorakit.model.targeting import VLM_PART_NAMES, vlm_part, vlm_targets
from lorakit.train.args import TrainArgs


def lora_config(args: TrainArgs, task: str, targets: list[str] | None = None) -> LoraConfig:
    """The run's LoraConfig; `targets` (full module names) in place of --target_modules when given."""
    targets = targets or args.target_modules
    return LoraConfig(
        r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        use_rslora=args.use_rslora, bias=args.lora_bias, use_dora=args.train_type == "dora" or args.use_dora,
        modules_to_save=list(args.modules_to_save or []) or None,
        task_type="SEQ_CLS" if task == "seq_cls" else "CAUSAL_LM")


def prepare_model(model: nn.Module, args: TrainArgs, task: str) -> nn.Module:
    """Attach adapters (lora/dora) or unfreeze everything (full), in a VLM's open parts only; trainable
    weights in fp32."""
    frozen = frozen_parts(model, args)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.train_type == "full":
        parts = vlm_parts(model)
        for name, param in model.named_parameters():
            param.requires_grad = parts is None or vlm_part(name, parts) not in frozen
        return model.float()
    config = lora_config(args, task)
    if vlm_parts(model):
        config = lora_config(args, task, vlm_targets(model, config, frozen))
    peft_model = get_peft_model(model, config, memory_savers=args.memory_savers)
    trained_in_fp32(peft_model)
    return peft_model


def trained_in_fp32(model: nn.Module) -> None:
    """Trainable parameters in fp32. A module that trains any (a norm whose bias trains, --lora_bias all) computes
    in one dtype, so its frozen vectors (a norm's scale) join them; a frozen 2-D weight stays as it is (autocast,
    or the layer, casts for the matmul)."""
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        trains = any(p.requires_grad for p in own)
        for p in own:
            if p.is_floating_point() and p.dtype != torch.float32 and (p.requires_grad or trains and p.dim() == 1):
                p.data = p.data.float()


def frozen_parts(model: nn.Module, args: TrainArgs) -> set[str]:
    """The parts of a vision-language model the freeze flags leave untrained; refuses flags that cannot apply."""
    frozen = {part for part in VLM_PART_NAMES if getattr(args, f"freeze_{part}")}
    model_type, parts = getattr(model.config, "model_type", None), vlm_parts(model)
    if getattr(model.config, "vision_config", None) is not None and parts is None:
        raise ValueError(f"lorakit does not know the parts (vision tower, projector, language model) of "
                         f"model_type {model_type!r}; known: LLaVA and Qwen2-VL families (lorakit.families.VLM_PARTS)")
    if parts is None and (args.freeze_llm or not args.freeze_vit or not args.freeze_aligner):
        raise ValueError(f"--freeze_llm / --freeze_vit / --freeze_aligner choose parts of a vision-language model; "
                         f"{model_type!r} is text-only")
    return frozen


def part_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameters per part of a vision-language model ({} for a text-only one)."""
    parts = vlm_parts(model.get_base_model() if isinstance(model, PeftModel) else model)
    counts = dict.fromkeys(VLM_PART_NAMES, 0) if parts else {}
    for name, param in model.named_parameters() if parts else ():
        if param.requires_grad:
            part = vlm_part(name, parts) or "other"
            counts[part] = counts.get(part, 0) + param.numel()
    return counts


def save_trained(model: nn.Module, tokenizer, output_dir: Path, state_dict: dict | None = None) -> None:
    """The adapter in PEFT format (or, for full fine-tuning, the whole model: `state_dict` when given, as
    gathered from FSDP shards) plus the tokenizer (a vision-language model: its processor)."""
    if isinstance(model, PeftModel):
        model.save_pretrained(str(output_dir))
    else:
        model.save_pretrained(str(output_dir), state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(str(output_dir))
