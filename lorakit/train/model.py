"""Attaching LoRA / DoRA to the loaded base model (or unfreezing it all), and saving what was trained."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.model.peft_model import PeftModel, get_peft_model
from lorakit.train.args import TrainArgs


def lora_config(args: TrainArgs, task: str) -> LoraConfig:
    targets = args.target_modules
    return LoraConfig(
        r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        use_rslora=args.use_rslora, use_dora=args.train_type == "dora" or args.use_dora,
        modules_to_save=list(args.modules_to_save) or None,
        task_type="SEQ_CLS" if task == "seq_cls" else "CAUSAL_LM")


def prepare_model(model: nn.Module, args: TrainArgs, task: str) -> nn.Module:
    """Attach adapters (lora/dora) or unfreeze everything (full); trainable weights in fp32."""
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.train_type == "full":
        model.requires_grad_(True)
        return model.float()
    peft_model = get_peft_model(model, lora_config(args, task), memory_savers=args.memory_savers)
    for param in peft_model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return peft_model


def save_trained(model: nn.Module, tokenizer, output_dir: Path) -> None:
    """The adapter in PEFT format (or, for full fine-tuning, the whole model) plus the tokenizer."""
    if isinstance(model, PeftModel):
        model.save_pretrained(str(output_dir))
    else:
        model.save_pretrained(str(output_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(output_dir))
