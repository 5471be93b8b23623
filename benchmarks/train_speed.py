"""LoRA / DoRA training step: lorakit vs PEFT, side by side in one process.

    python benchmarks/train_speed.py                       # 134M Llama, fp32, 4x256 and 2x1024
    python benchmarks/train_speed.py --shapes 2x64 --layers 2 --rounds 2    # a smoke run
    python benchmarks/train_speed.py --dtype bf16          # CPU bf16 autocast, bf16 base, + lorakit fp32

Three variants on the same model and SFT batch (the first 40% of each row is prompt, label -100):
- peft: the HF model's own forward with labels after peft's `get_peft_model`;
- lorakit: the same call after lorakit's `get_peft_model` (the drop-in API);
- lorakit train: the loss `lorakit train` computes (`lorakit.train.loss.batch_loss_sum`: head and
  cross-entropy only at labelled positions), against peft with transformers' plain loss.
With --dtype bf16 every variant runs under CPU bf16 autocast over a bf16 base (adapters fp32, as
`lorakit train` does on a CPU with a bf16 matrix unit), and "lorakit fp32" is the fp32 step beside them.
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


# variant -> (library, bf16); the first is the reference of the ratios
VARIANTS = {"fp32": {"peft": ("peft", False), "lorakit": ("lorakit", False), "lorakit train": ("lorakit", False)},
            "bf16": {"peft": ("peft", True), "lorakit": ("lorakit", True), "lorakit train": ("lorakit", True),
                     "lorakit fp32": ("lorakit", False)}}


def build(library: str, dora: bool, layers: int, bf16: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**CONFIG, "num_hidden_layers": layers}))
    if bf16:
        model = model.to(torch.bfloat16)  # the frozen base in bf16; both libraries keep their adapters fp32
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


def step(model, inputs, variant: str, bf16: bool = False) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
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


def peak_rss_child(dtype: str, variant: str, dora: bool, layers: int, batch: int, seq: int) -> float:
    library, bf16 = VARIANTS[dtype][variant]
    model, inputs = build(library, dora, layers, bf16), sft_batch(batch, seq)
    step(model, inputs, variant, bf16)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step(model, inputs, variant, bf16)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4x256,2x1024", help="batch x seq, comma-separated")
    parser.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--adapters", default="lora,dora", help="lora and/or dora, comma-separated")
    parser.add_argument("--dtype", choices=VARIANTS, default="fp32",
                        help="bf16: every variant under CPU bf16 autocast over a bf16 base, plus lorakit fp32")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        dtype, variant, dora, layers, batch, seq = args.child
        print(peak_rss_child(dtype, variant, dora == "dora", int(layers), int(batch), int(seq)))
        return
    variants = VARIANTS[args.dtype]
    peak = max(matmul_peak_gflops() for _ in range(3))  # the first runs cold
    flags = {k: v for k, v in torch.cpu.get_capabilities().items() if k in ("avx512_f", "avx512_bf16", "amx_bf16")}
    print(f"fp32 matmul peak on this machine: {peak:.1f} GFLOP/s; CPU {flags}; Llama {args.layers} layers, "
          f"LoRA r=16 all-linear, dropout 0.05, 40% prompt tokens masked; --dtype {args.dtype}")
    print("| adapter | batch | variant | s/step | time / peft | peak MB | memory / peft | fp32 matmul util. |")
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for adapter in args.adapters.split(","):
        for shape in args.shapes.split(","):
            batch, seq = map(int, shape.split("x"))
            models = {v: build(lib, adapter == "dora", args.layers, bf16) for v, (lib, bf16) in variants.items()}
            inputs = sft_batch(batch, seq)
            for variant, model in models.items():
                step(model, inputs, variant, variants[variant][1])
            times = {v: [] for v in models}
            ratios = {v: [] for v in models}
            for r in range(args.rounds):
                order = list(models)[r % len(models):] + list(models)[:r % len(models)]
                this = {}
                for variant in order:
                    start = time.perf_counter()
                    step(models[variant], inputs, variant, variants[variant][1])
                    this[variant] = time.perf_counter() - start
                    times[variant].append(this[variant])
                for variant in models:
                    ratios[variant].append(this[variant] / this["peft"])
            del models
            memory = {v: float(subprocess.run(
                [sys.executable, __file__, "--child", args.dtype, v, adapter, str(args.layers), str(batch), str(seq)],
                capture_output=True, text=True, check=True).stdout.split()[-1]) for v in variants}
            flop = step_gflop(args.layers, batch, seq)
            for variant in variants:
                t = statistics.median(times[variant])
                row = {"adapter": adapter, "shape": shape, "variant": variant, "seconds": t,
                       "time_ratio": statistics.median(ratios[variant]), "peak_mb": memory[variant],
                       "memory_ratio": memory[variant] / memory["peft"], "util": flop / t / peak}
                results.append(row)
                print(f"| {adapter} | {shape} | {variant} | {t:.2f} | {row['time_ratio']:.2f} | {memory[variant]:.0f} "
                      f"| {row['memory_ratio']:.2f} | {row['util']:.0%} |", flush=True)
            if "lorakit fp32" in variants:  # bf16 against fp32: median of the per-round ratios
                for variant in ("lorakit", "lorakit train"):
                    rounds = [x / y for x, y in zip(times[variant], times["lorakit fp32"])]
                    print(f"{adapter} {shape}: {variant} (bf16) / lorakit fp32 (drop-in), median of per-round "
                          f"ratios: {statistics.median(rounds):.3f}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
