"""`lorakit resize`: an adapter at another rank (truncated SVD of each module's update), written as plain LoRA."""
from __future__ import annotations

import argparse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorakit resize", description=(
        "Change an adapter's rank by the truncated SVD of each module's update s*B*A. The output has the scale "
        "folded in (lora_alpha == r, no rsLoRA, no alpha_pattern), so PEFT, vLLM and llama.cpp's converter all "
        "read it the same way."))
    p.add_argument("--adapter", required=True, metavar="DIR", help="adapter folder (PEFT format)")
    p.add_argument("--output_dir", required=True, help="a new (or empty) folder for the resized adapter")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="the new rank of every module (at most the adapter's)")
    size.add_argument("--energy", type=float,
                      help="per module, the smallest rank keeping this share of the update's squared Frobenius norm")
    p.add_argument("--plain", action="store_true",
                   help="one rank for all modules (smaller ones padded with zeros): no rank_pattern either")
    return p


def run(argv: list[str]) -> int:
    from lorakit.tools.resize import resize_adapter

    args = parser().parse_args(argv)
    layers = resize_adapter(args.adapter, args.output_dir, rank=args.rank, energy=args.energy, plain=args.plain)
    width = max(len(layer.path) for layer in layers)
    print(f"{'module':<{width}}  rank      kept ||dW||^2  rel. error")
    for layer in layers:
        print(f"{layer.path:<{width}}  {layer.rank_before:>3} -> {layer.rank_after:<3}  {layer.energy_kept:>12.6f}  "
              f"{layer.relative_error:.2e}")
    print(f"wrote {args.output_dir}")
    return 0
