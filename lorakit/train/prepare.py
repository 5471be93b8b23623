"""The data of a training run: dataset files read, split, encoded with the tokenizer (a vision-language
model's processor), and the settings that follow from them (task, learning rate, max_length within the
model's positions)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from lorakit import data as datasets_
from lorakit.data.encode import Encoded, EncodeReport, encode_examples
from lorakit.families import FAMILIES, Family
from lorakit.io.pretrained import load_config, position_limit, resolve_model_path, vlm_processor
from lorakit.train.args import TrainArgs


@dataclass
class PreparedData:
    task: str
    fmt: str
    labels: list[str]
    train: list[Encoded]
    val: list[Encoded]
    reports: dict[str, EncodeReport]
    processor: object = None  # a vision-language model's processor (saved with the adapter)


SHORT_RUN = 100  # optimiser steps up to which classification takes its peak default rate
BASE_RANK = 8  # the rank the adapter rates were measured at


def default_learning_rate(train_type: str, task: str, steps: int, rank: int = BASE_RANK) -> float:
    """lorakit's default peak rate for a run of `steps` optimiser steps (docs/training.md#defaults, measured with
    benchmarks/recipe_sweep.py). Classification: 2e-3 with adapters, 1e-4 in full, up to SHORT_RUN steps, then
    falling as 1/sqrt(steps), the step size of a fixed-length run (long runs at the short runs' rate collapsed
    to one class). SFT: 2e-4 with adapters, 1e-5 in full. Adapters above rank 8 take sqrt(8 / rank) of it: at
    alpha = 2 x rank the update B A grows as sqrt(rank) for a given rate (rank 64 at the rank-8 rate collapsed)."""
    full = train_type == "full"
    if task != "seq_cls":
        rate = 1e-5 if full else 2e-4
    else:
        rate = (1e-4 if full else 2e-3) * min(1.0, math.sqrt(SHORT_RUN / max(steps, 1)))
    return rate if full else rate * min(1.0, math.sqrt(BASE_RANK / rank))


def global_batch_size(args: TrainArgs, processes: int) -> int:
    """Examples per optimiser step over all processes and micro-batches."""
    return args.per_device_train_batch_size * processes * args.gradient_accumulation_steps


def steps_per_epoch(args: TrainArgs, examples: int, processes: int) -> int:
    return math.ceil(examples / global_batch_size(args, processes))


def total_steps(args: TrainArgs, examples: int, processes: int) -> int:
    """Optimiser steps of the run: --max_steps, else epochs over the global batch."""
    if args.max_steps > 0:
        return args.max_steps
    return math.ceil(args.num_train_epochs * steps_per_epoch(args, examples, processes))


def prepare_data(args: TrainArgs, tokenizer) -> PreparedData:
    """Read, check, split and tokenise the train and eval sets."""
    fmt = None if args.dataset_format == "auto" else args.dataset_format
    ratio = 0 if args.val_dataset else args.val_split_ratio
    train_pairs, val_pairs, fmt = datasets_.load_split(args.dataset, fmt or "auto", ratio, args.seed)
    if args.val_dataset:
        val_pairs, _ = datasets_.load_examples(args.val_dataset, fmt, args.seed)
    if args.system:
        train_pairs, val_pairs = (datasets_.add_system(pairs, args.system) for pairs in (train_pairs, val_pairs))
    task = args.task_type if args.task_type != "auto" else ("seq_cls" if fmt == "classification" else "causal_lm")
    if (task == "seq_cls") != (fmt == "classification"):
        raise ValueError(f"--task_type {task} needs {'classification' if task == 'seq_cls' else 'SFT'} "
                         f"data, but the dataset is in the {fmt} format")
    labels = []
    if task == "seq_cls":
        labels = datasets_.label_set(train_pairs, args.labels)
        datasets_.check_labels(train_pairs + val_pairs, labels)
    label_ids = {label: i for i, label in enumerate(labels)}
    model_path = resolve_model_path(args.model)
    processor = vlm_processor(model_path)
    reports, encoded = {}, {}
    for split, pairs in (("train", train_pairs), ("eval", val_pairs)):
        encoded[split], reports[split] = encode_examples(tokenizer, pairs, args.max_length, label_ids,
                                                         args.train_on_prompt, processor)
    if not encoded["train"]:
        dropped = reports["train"].dropped_all_masked
        raise ValueError(f"no training examples left: all {len(dropped)} rows have every label token "
                         f"masked after truncation to --max_length {args.max_length} (first: "
                         f"{dropped[:3]}); raise --max_length or check the responses are not empty")
    return PreparedData(task, fmt, labels, encoded["train"], encoded["eval"], reports, processor)


def fit_max_length(args: TrainArgs, model_path: str, say) -> TrainArgs:
    """args with max_length at most the model's position limit (said once when lowered)."""
    limit = position_limit(load_config(model_path))
    if limit is None or args.max_length <= limit[0]:
        return args
    say(f"--max_length {args.max_length} is more than the model's {limit[0]} positions ({limit[1]}); "
        f"using {limit[0]}")
    return dataclasses.replace(args, max_length=limit[0])


def default_modules_to_save(train_type: str, task: str, model_type: str | None) -> list[str]:
    """What adapters train in full beside them when --modules_to_save is not given: for a classifier, the pooling
    layer its head reads (BERT's pooler), which full fine-tuning trains and adapters would only nudge. On the
    support intents it lifted LoRA from 88.0 / 89.7% to 90.7 / 93.0%, level with full fine-tuning
    (docs/training.md#defaults)."""
    pooler = FAMILIES.get(model_type, Family()).cls_pooler
    return [pooler] if pooler and task == "seq_cls" and train_type != "full" else []


def resolve_args(args: TrainArgs, data: PreparedData, steps: int, model_type: str | None) -> TrainArgs:
    """Fill the 'auto' fields with what this run of `steps` optimiser steps on a `model_type` model uses (saved
    as run_config.yaml)."""
    return dataclasses.replace(
        args, task_type=data.task, dataset_format=data.fmt, labels=list(data.labels),
        learning_rate=(args.learning_rate if args.learning_rate is not None
                       else default_learning_rate(args.train_type, data.task, steps, args.lora_rank)),
        modules_to_save=(args.modules_to_save if args.modules_to_save is not None
                         else default_modules_to_save(args.train_type, data.task, model_type)))


def describe_data(data: PreparedData, args: TrainArgs) -> str:
    lines = [f"data: {len(data.train)} train / {len(data.val)} eval examples, format {data.fmt}, "
             f"task {data.task}" + (f", {len(data.labels)} labels" if data.labels else "")]
    for split, report in data.reports.items():
        if report.truncated:
            lines.append(f"  {split}: {report.truncated} examples longer than --max_length "
                         f"{args.max_length} were truncated")
        if report.dropped_all_masked:
            lines.append(f"  {split}: {len(report.dropped_all_masked)} examples dropped: no response "
                         f"token left to learn from (first: {report.dropped_all_masked[0]})")
    return "\n".join(lines)
