"""LoRA / DoRA training step: lorakit vs PEFT, side by side in one process.

    python benchmarks/train_speed.py                       # 134M Llama, fp32, 4x256 and 2x1024
    python benchmarks/train_speed.py --shapes 2x64 --layers 2 --rounds 2    # a smoke run

Three variants on the same model and SFT batch (the first 40% of each row is prompt, label -100):
- peft: the HF model's own forward with labels after peft's `get_peft_model`;
- lorakit: the same call after lorakit's `get_peft_model` (the drop-in API);
- lorakit train: the loss `lorakit train` computes (`lorakit.train.loss.batch_loss_sum`: head and
  cross-entropy only at labelled positions), against peft with transformers' plain loss.
Step times are taken in one process, the variants taking turns and rotating who goes first each
round; the median of per-round ratios to peft is reported. Peak memory is measured in a fresh
process per (variant, adapter, shape). Matmul utilisation divides the matmul FLOPs of a full
step (forward and input-gradient of the frozen weights, all of the adapters) by a measured fp32
matmul peak, so a variant that skips work shows above its real utilisation.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

CONFIG = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
              intermediate_size=2048, vocab_size=32000)


VARIANTS = {"peft": "peft", "lorakit": "lorakit", "lorakit train": "lorakit"}  # variant -> library


def build(library: str, dora: bool, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**CONFIG, "num_hidden_layers": layers}))
    if library == "peft":
        from peft import LoraConfig, get_peft_model
    else:
        from lorakit import LoraConfig, get_peft_model
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", use_dora=dora)
    return get_peft_model(model, config).train()


def sft_batch(batch: int, seq: int) -> dict:
    ids = torch.randint(0, CONFIG["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :int(0.4 * seq)] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def step(model, inputs, variant: str) -> None:
    if variant == "lorakit train":
        from lorakit.train.loss import batch_loss_sum

        loss = batch_loss_sum(model, inputs)[0] / (inputs["labels"][:, 1:] != -100).sum()
    else:
        loss = model(**inputs).loss
    loss.backward()
    for p in model.parameters():
        p.grad = None


def matmul_peak_gflops(n: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def step_gflop(layers: int, batch: int, seq: int, r: int = 16) -> float:
    """Matmul GFLOP of one LoRA step: frozen weights forward + input grad (4 N T), head the same,
    adapters forward + both grads (6 r (d_in + d_out) T), attention scores (forward and backward)."""
    h, i, v, tokens = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["vocab_size"], batch * seq
    linears = [(h, h)] * 4 + [(h, i), (h, i), (i, h)]
    frozen = layers * sum(a * b for a, b in linears) + h * v
    adapters = layers * sum(r * (a + b) for a, b in linears)
    attention = layers * 4 * batch * seq * seq * h  # QK^T and PV, forward
    return (4 * frozen * tokens + 6 * adapters * tokens + 3 * attention) / 1e9


def peak_rss_child(variant: str, dora: bool, layers: int, batch: int, seq: int) -> float:
    model, inputs = build(VARIANTS[variant], dora, layers), sft_batch(batch, seq)
    step(model, inputs, variant)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step(model, inputs, variant)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4x256,2x1024", help="batch x seq, comma-separated")
    parser.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--adapters", default="lora,dora", help="lora and/or dora, comma-separated")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, dora, layers, batch, seq = args.child
        print(peak_rss_child(variant, dora == "dora", int(layers), int(batch), int(seq)))
        return
    peak = max(matmul_peak_gflops() for _ in range(3))  # the first runs cold
    print(f"fp32 matmul peak on this machine: {peak:.1f} GFLOP/s; Llama {args.layers} layers, LoRA r=16 "
          f"all-linear, dropout 0.05, 40% prompt tokens masked")
    print("| adapter | batch | variant | s/step | time / peft | peak MB | memory / peft | matmul util. |")
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for adapter in args.adapters.split(","):
        for shape in args.shapes.split(","):
            batch, seq = map(int, shape.split("x"))
            models = {v: build(lib, adapter == "dora", args.layers) for v, lib in VARIANTS.items()}
            inputs = sft_batch(batch, seq)
            for variant, model in models.items():
                step(model, inputs, variant)
            times = {v: [] for v in models}
            ratios = {v: [] for v in models}
            for r in range(args.rounds):
                order = list(models)[r % len(models):] + list(models)[:r % len(models)]
                this = {}
                for variant in order:
                    start = time.perf_counter()
                    step(models[variant], inputs, variant)
                    this[variant] = time.perf_counter() - start
                    times[variant].append(this[variant])
                for variant in models:
                    ratios[variant].append(this[variant] / this["peft"])
            del models
            memory = {v: float(subprocess.run(
                [sys.executable, __file__, "--child", v, adapter, str(args.layers), str(batch), str(seq)],
                capture_output=True, text=True, check=True).stdout.split()[-1]) for v in VARIANTS}
            flop = step_gflop(args.layers, batch, seq)
            for variant in VARIANTS:
                t = statistics.median(times[variant])
                row = {"adapter": adapter, "shape": shape, "variant": variant, "seconds": t,
                       "time_ratio": statistics.median(ratios[variant]), "peak_mb": memory[variant],
                       "memory_ratio": memory[variant] / memory["peft"], "util": flop / t / peak}
                results.append(row)
                print(f"| {adapter} | {shape} | {variant} | {t:.2f} | {row['time_ratio']:.2f} | {memory[variant]:.0f} "
                      f"| {row['memory_ratio']:.2f} | {row['util']:.0%} |", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
