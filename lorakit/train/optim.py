"""The optimiser of a run, chosen with `--optim` by the names transformers' Trainer uses.

    adamw_torch          torch.optim.AdamW (the default)
    adamw_torch_fused    torch.optim.AdamW(fused=True): one kernel per step (CPU and CUDA)
    adamw_8bit           AdamW with 8-bit state: bitsandbytes on CUDA, lorakit.train.adam8bit elsewhere
    paged_adamw_8bit     bitsandbytes' paged AdamW8bit on CUDA; elsewhere adamw_8bit (said once)
    paged_adamw_32bit    bitsandbytes' paged AdamW on CUDA; elsewhere adamw_torch (said once)
    sgd                  torch.optim.SGD, no momentum (as the Trainer's `--optim sgd`)
    adafactor            transformers' Adafactor with the Trainer's settings: the given rate, no
                         relative step, no parameter scaling
"""
from __future__ import annotations

import os
import sys

import torch

from lorakit.families import vlm_parts
from lorakit.model.targeting import vlm_part
from lorakit.train.adam8bit import AdamW8bit
from lorakit.train.args import TrainArgs

BITSANDBYTES = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit",
                "paged_adamw_32bit": "PagedAdamW32bit"}
UNPAGED = {"paged_adamw_8bit": "adamw_8bit", "paged_adamw_32bit": "adamw_torch"}
_said: set[str] = set()


def param_groups(model: torch.nn.Module, args: TrainArgs) -> list[dict]:
    """The trainable parameters by learning rate: --learning_rate; a vision-language model's vision tower and
    projector at --vit_lr / --aligner_lr when given; with LoRA+ each group's B matrices at its rate x
    loraplus_lr_ratio. The language model's group comes first (its rate is the one logged)."""
    parts = vlm_parts(model.get_base_model() if hasattr(model, "get_base_model") else model)
    rates = {"": args.learning_rate, "vit": args.vit_lr, "aligner": args.aligner_lr}
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = vlm_part(name, parts) if parts else ""
        is_b = bool(args.loraplus_lr_ratio) and (".lora_B." in name or ".lora_embedding_B." in name)
        groups.setdefault((part if rates.get(part) is not None else "", is_b), []).append(p)
    order = sorted(groups, key=lambda key: (list(rates).index(key[0]), key[1]))
    return [{"params": groups[key], "lr": rates[key[0]] * (args.loraplus_lr_ratio if key[1] else 1)}
            for key in order]


def build_optimizer(model: torch.nn.Module, args: TrainArgs) -> torch.optim.Optimizer:
    """The `--optim` optimiser over the model's trainable parameters, weight decay on all of them."""
    groups = param_groups(model, args)
    adam = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon,
            "weight_decay": args.weight_decay}
    if args.optim == "adamw_torch":
        return torch.optim.AdamW(groups, **adam)
    if args.optim == "adamw_torch_fused":
        return torch.optim.AdamW(groups, fused=True, **adam)
    if args.optim == "sgd":
        return torch.optim.SGD(groups, lr=args.learning_rate, weight_decay=args.weight_decay)
    if args.optim == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=args.learning_rate, scale_parameter=False, relative_step=False,
                         weight_decay=args.weight_decay)
    if any(p.is_cuda for group in groups for p in group["params"]):
        return getattr(_bitsandbytes(args.optim).optim, BITSANDBYTES[args.optim])(groups, **adam)
    if args.optim in UNPAGED:
        say_once(f"--optim {args.optim}: paged optimisers page their state through CUDA unified memory; "
                 f"without CUDA this run uses {UNPAGED[args.optim]} (the same algorithm, its state in ordinary memory)")
    return AdamW8bit(groups, **adam) if "8bit" in args.optim else torch.optim.AdamW(groups, **adam)


def _bitsandbytes(optim: str):
    """The bitsandbytes module, or an error naming the install command."""
    try:
        import bitsandbytes
    except ImportError:
        raise ImportError(f"--optim {optim} on CUDA uses bitsandbytes, which is not installed: "
                          "pip install bitsandbytes") from None
    return bitsandbytes


def say_once(message: str) -> None:
    """A note on stderr, once per process (and from the first process only under torchrun)."""
    if message not in _said and os.environ.get("RANK", "0") == "0":
        print(f"lorakit train: note: {message}", file=sys.stderr)
    _said.add(message)
