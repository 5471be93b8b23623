"""`lorakit extract`: a LoRA adapter from a fully fine-tuned model and its base (truncated SVD per layer)."""
from __future__ import annotations

import argparse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorakit extract", description=(
        "Approximate a full fine-tune by a LoRA adapter: per layer, the truncated SVD of W_tuned - W_base. "
        "Writes a PEFT adapter (lora_alpha == r) and prints each layer's relative reconstruction error."))
    p.add_argument("--model", required=True, help="the base model folder")
    p.add_argument("--tuned", required=True, help="the fully fine-tuned model folder (same architecture)")
    p.add_argument("--rank", type=int, required=True, help="rank of every extracted layer")
    p.add_argument("--output_dir", required=True, help="a new (or empty) folder for the adapter")
    p.add_argument("--target_modules", nargs="+",
                   help="layers to extract (names or dotted suffixes, as PEFT's target_modules); default: every "
                        "linear layer but the output head")
    p.add_argument("--modules_to_save", nargs="+",
                   help="modules kept whole from the tuned model (e.g. norm embed_tokens): changes LoRA cannot hold")
    return p


def run(argv: list[str]) -> int:
    from lorakit.tools.extract import extract_adapter

    args = parser().parse_args(argv)
    report = extract_adapter(args.model, args.tuned, args.output_dir, args.rank, args.target_modules,
                             args.modules_to_save)
    width = max(len(p) for p in report.layers)
    print(f"{'layer':<{width}}  rank  rel. error ||dW - BA||_F / ||dW||_F")
    for path, (rank, error) in report.layers.items():
        print(f"{path:<{width}}  {rank:>4}  {error:.3e}")
    if report.unchanged:
        print(f"unchanged, left out: {', '.join(report.unchanged)}")
    if report.saved:
        print(f"kept whole (modules_to_save): {', '.join(report.saved)}")
    if report.not_captured:
        print(f"WARNING: changed but not captured (add their modules to --modules_to_save or --target_modules): "
              f"{', '.join(report.not_captured)}")
    print(f"wrote {args.output_dir}")
    return 0
