"""`lorakit merge`: base model + adapter(s) -> one plain model folder (sharded safetensors + config + tokenizer)."""
from __future__ import annotations

import argparse

import torch

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorakit merge", description=(
        "Fold LoRA adapter(s) into the base model's weights and write a model folder that transformers "
        "loads as a plain model (no PEFT needed). Written shard by shard: memory stays near one shard."))
    p.add_argument("--adapter", nargs="+", required=True, metavar="DIR", help="adapter folder(s) (PEFT format)")
    p.add_argument("--model", help="base model folder or cached hub id; default: the adapter's base_model_name_or_path")
    p.add_argument("--output_dir", required=True, help="a new (or empty) folder for the merged model")
    p.add_argument("--weights", nargs="+", type=float, help="one weight per adapter (several adapters); default 1 each")
    p.add_argument("--combination_type", default="linear",
                   help="how several adapters combine (PEFT's add_weighted_adapter): linear, cat, svd, ties, "
                        "dare_linear, dare_ties, magnitude_prune, ... (default linear)")
    p.add_argument("--density", type=float, help="share of values kept by ties / dare / magnitude_prune")
    p.add_argument("--torch_dtype", choices=DTYPES, default="auto",
                   help="dtype of the merged weights; auto keeps each tensor's stored dtype")
    p.add_argument("--max_shard_size", default="5GB", help="largest shard file, as transformers spells it (5GB, 500MB)")
    p.add_argument("--quant_bits", type=int, choices=[4],
                   help="4: the adapter was trained on the NF4 base (QLoRA): merge onto the dequantised NF4 weights "
                        "(found by itself for `lorakit train --train_type qlora` outputs)")
    return p


def run(argv: list[str]) -> int:
    from lorakit.tools.merge import merge_to_folder

    args = parser().parse_args(argv)
    report = merge_to_folder(args.adapter, args.output_dir, base=args.model, weights=args.weights,
                             combination_type=args.combination_type, density=args.density,
                             dtype=DTYPES[args.torch_dtype], max_shard_size=args.max_shard_size,
                             quant_bits=args.quant_bits)
    print(f"merged {report.merged_modules} LoRA weights (and replaced {report.replaced_tensors} tensors) into "
          f"{report.output_dir}: {len(report.shards)} shard(s)")
    if report.untied:
        print(f"the adapter changes tied weights {report.untied}: written apart, tie_word_embeddings=false")
    gap = report.quantized_gap
    if gap is not None:
        print(f"4-bit base: merged onto the dequantised NF4 weights; logits vs the 4-bit base + adapter differ by "
              f"max {gap['max_abs_diff']:.3g}, mean {gap['mean_abs_diff']:.3g} (mean |logit| "
              f"{gap['mean_abs_logit']:.3g})")
    return 0
