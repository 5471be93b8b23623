"""`lorakit plan`: will a model and a training recipe fit in GPU memory? The same flags as `lorakit train`,
plus --gpu_memory and --json; reads only the model's config.json."""
from __future__ import annotations

import argparse
import re
import sys

from lorakit import precision
from lorakit.plan.estimate import PLANNED_FAMILIES, Recipe, estimate
from lorakit.plan.levers import levers
from lorakit.plan.report import as_json, text
from lorakit.plan.shape import read_shape

UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_memory(value: str) -> int:
    """'24GiB', '24GB', '80G', '512MiB' or a number of bytes -> bytes (GB and G mean GiB, as on GPU spec sheets)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", value, re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"--gpu_memory {value!r}: expected a size such as 24GiB, 24GB, 80G, 512MiB or a number "
                         "of bytes")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def _refuse(message: str):
    raise ValueError(message)  # one line from the CLI instead of argparse's usage dump


def _own_flags(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """--gpu_memory, --json and --help; the rest are `lorakit train`'s flags."""
    parser = argparse.ArgumentParser(prog="lorakit plan", add_help=False)
    parser.error = _refuse
    parser.add_argument("--gpu_memory", "--gpu-memory")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("-h", "--help", action="store_true")
    return parser.parse_known_args(argv)


HELP = """usage: lorakit plan --model MODEL [lorakit train flags] [--gpu_memory SIZE] [--json]

Predicts the GPU memory of `lorakit train` with the same flags, from the model's config.json alone (a folder,
a config.json path, a hub id in the local cache, or a known id: {known}).
  --gpu_memory SIZE  the GPU's memory (24GiB, 24GB, 80G, bytes): says whether it fits, and what would make it fit
  --json             one JSON object (peak_bytes: the predicted peak of tensors)

This machine: {machine}.
"""


def run(argv: list[str]) -> int:
    """Parse the flags, plan, print; exit code 0 (it fits or no budget given) or 1 (it does not fit)."""
    from lorakit.plan.shape import known_ids
    from lorakit.train.args import parse_train_args

    own, rest = _own_flags(argv)
    if own.help:
        print(HELP.format(known=", ".join(known_ids()), machine=precision.describe("cpu")))
        return 0
    if not any(arg.split("=")[0] in ("--model", "--model_id_or_path") for arg in rest):
        raise ValueError("--model is required: a model folder, a config.json or a hub id")
    budget = parse_memory(own.gpu_memory) if own.gpu_memory else None
    args = parse_train_args(rest)
    shape, recipe = read_shape(args.model), Recipe.from_train_args(args)
    if shape.model_type not in PLANNED_FAMILIES:
        print(f"lorakit plan: warning: no measured terms for {shape.model_type or 'unnamed'} models (measured: "
              f"{', '.join(sorted(PLANNED_FAMILIES))}); activations are estimated as for a Llama-style block",
              file=sys.stderr)
    plan = estimate(shape, recipe)
    fits = budget is None or plan.device_bytes <= budget
    fixes = [] if fits else levers(shape, recipe, budget)
    if own.json:
        print(as_json(args.model, shape, recipe, plan, budget, fixes))
    else:
        print(text(args.model, shape, recipe, plan, budget, fixes) + f"\n\nthis machine: {precision.describe('cpu')}")
    return 0 if fits else 1
