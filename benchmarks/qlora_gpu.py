"""QLoRA vs LoRA on a CUDA GPU: model memory, training peak memory and step time, bf16 compute.

    python benchmarks/qlora_gpu.py [--batch 4 --seq 256 --rounds 10]

The 134M-param Llama config of the CPU benchmark (random weights, saved once to a temp folder).
LoRA keeps the base in bf16; QLoRA in NF4 (embeddings, norms and head in bf16). Memory is
torch.cuda.max_memory_allocated, exact; step times alternate between the two, first one swapped
each round, and the median of per-round ratios is reported.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from qlora_memory import LLAMA_134M, save_llama

import lorakit
from lorakit.io.checkpoint4bit import load_nf4


def load(variant: str, folder: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if variant == "qlora":
        model = load_nf4(AutoModelForCausalLM, folder, torch.bfloat16, set())[0]
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    model = lorakit.get_peft_model(model.cuda(), lorakit.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                                    target_modules="all-linear"))
    return model.train()


def step(model, ids) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for p in model.parameters():
        p.grad = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "lorakit-llama134m"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    folder = save_llama(Path(args.cache))
    ids = torch.randint(0, LLAMA_134M["vocab_size"], (args.batch, args.seq), device="cuda")
    memory = {}
    for variant in ("lora", "qlora"):  # one at a time, for clean peaks
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        model = load(variant, folder)
        weights = torch.cuda.memory_allocated() - start
        step(model, ids)
        torch.cuda.reset_peak_memory_stats()
        step(model, ids)
        memory[variant] = (weights / 2**20, (torch.cuda.max_memory_allocated() - start) / 2**20)
        del model
    models = {v: load(v, folder) for v in ("lora", "qlora")}
    for model in models.values():
        step(model, ids)
    times, ratios = {v: [] for v in models}, []
    for r in range(args.rounds):
        this = {}
        for variant in (("lora", "qlora") if r % 2 == 0 else ("qlora", "lora")):
            torch.cuda.synchronize()
            t = time.perf_counter()
            step(models[variant], ids)
            torch.cuda.synchronize()
            this[variant] = time.perf_counter() - t
            times[variant].append(this[variant])
        ratios.append(this["qlora"] / this["lora"])
    print(f"{torch.cuda.get_device_name()}, batch {args.batch} x {args.seq}, LoRA r=16 all-linear, bf16 autocast")
    print("| | model on GPU, MB | training peak, MB | step ms |\n|---|---|---|---|")
    for v, name in (("lora", "LoRA (bf16 base)"), ("qlora", "QLoRA (NF4 base)")):
        print(f"| {name} | {memory[v][0]:.0f} | {memory[v][1]:.0f} | {1000 * statistics.median(times[v]):.1f} |")
    print(f"QLoRA/LoRA: model {memory['qlora'][0] / memory['lora'][0]:.2f}, "
          f"peak {memory['qlora'][1] / memory['lora'][1]:.2f}, "
          f"step time {statistics.median(ratios):.2f} (median of {args.rounds} per-round ratios)")


if __name__ == "__main__":
    main()
