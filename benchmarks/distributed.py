"""`lorakit train` on 1 process vs 2 (DDP, FSDP2) on the CPU: step time and each rank's peak memory.

    python benchmarks/distributed.py                     # LoRA and full fine-tuning, 12 steps each
    python benchmarks/distributed.py --steps 4 --layers 2   # a smoke run
    python benchmarks/distributed.py --layers 24 --steps 3 --train_types lora qlora full \
        --runs "1 process, 1 thread" "2 ranks, DDP" "2 ranks, FSDP2" "2 ranks, FSDP2, rank 0 loads"
        # memory: a ~80M-parameter model

A Llama of ~20M parameters (hidden 512, 6 layers) with a small BPE tokenizer, built in a temporary
folder; 64 short alpaca rows; global batch 16 (1 process x 16, or 2 x 8), fp32, gloo. Each run is
`lorakit train` itself, started through this file's --worker mode, which times every optimiser step
(loop.train_step) and reads the process's VmHWM (peak resident memory) twice: when training starts
(the peak of loading the model and, under FSDP2, sharding it; lorakit.train.peak then resets it) and
at the end (the peak of training). Step time is the median of the steps after the first. One process
runs with every core (OMP_NUM_THREADS = cores) and with one thread; two ranks get cores / 2 threads
each, so on a 2-core machine the two ranks share the two cores.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # helpers: the tests' tiny tokenizer and data rows
# name -> (processes, extra flags, threads per process; None: cores / processes). RANK_0_LOADS is this file's
# worker flag: FSDP2 as it loads a model it cannot build empty (rank 0 loads it whole and hands out the shards).
RANK_0_LOADS = "--rank_0_loads"
RUNS = {"1 process": (1, [], None), "1 process, 1 thread": (1, [], 1), "2 ranks, DDP": (2, [], None),
        "2 ranks, FSDP2": (2, ["--fsdp"], None), "2 ranks, FSDP2, rank 0 loads": (2, ["--fsdp", RANK_0_LOADS], None)}


def build_model(folder: Path, layers: int) -> str:
    """The tests' tiny tokenizer and a ~20M-parameter Llama beside it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from helpers import save_tiny_causal_lm

    save_tiny_causal_lm(folder)
    torch.manual_seed(0)
    config = json.loads((folder / "config.json").read_text())
    model = LlamaForCausalLM(LlamaConfig(vocab_size=config["vocab_size"], hidden_size=512, intermediate_size=1408,
                                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                                         pad_token_id=0, bos_token_id=1, eos_token_id=2))
    model.save_pretrained(str(folder))
    return str(folder)


def vmhwm_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024


def worker(out: str, flags: list[str]) -> None:
    """Run `lorakit train flags` here, timing each step; write this rank's step times and its VmHWM when training
    starts (loading) and at the end (training) to out.<rank>."""
    from lorakit.cli import main
    from lorakit.io.empty_model import NotStreamable
    from lorakit.train import fsdp, loop, peak

    if RANK_0_LOADS in flags:
        flags.remove(RANK_0_LOADS)

        def not_empty(*_):
            raise NotStreamable("benchmarks/distributed.py " + RANK_0_LOADS)

        fsdp.built_empty = not_empty

    times, real, loading, reset = [], loop.train_step, [], peak.reset

    def reset_after_reading(device):
        loading.append(vmhwm_mib())
        reset(device)

    def timed(run):
        start = time.perf_counter()
        result = real(run)
        times.append(time.perf_counter() - start)
        return result

    loop.train_step, peak.reset = timed, reset_after_reading
    assert main(["train", *flags]) == 0
    Path(f"{out}.{os.environ.get('RANK', '0')}").write_text(
        json.dumps({"times": times, "load_mib": loading[0], "peak_mib": vmhwm_mib()}))


def run(name: str, train_type: str, model: str, data: str, work: Path, steps: int) -> dict:
    processes, extra, threads = RUNS[name]
    threads = threads or max(1, (os.cpu_count() or 1) // processes)
    out = work / f"{train_type}-{processes}-{threads}-{'-'.join(extra) or 'ddp'}"
    flags = ["--model", model, "--dataset", data, "--output_dir", str(out), "--train_type", train_type,
             "--max_steps", str(steps), "--per_device_train_batch_size", str(16 // processes),
             "--learning_rate", "1e-4", "--lora_rank", "16", "--val_split_ratio", "0", "--save_steps", "1000",
             "--report_to", "none", "--bf16", "false", *extra]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, *(launcher if processes > 1 else []), __file__, "--worker", f"{out}.json", *flags]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} {train_type} failed:\n{done.stderr[-3000:]}")
    ranks = [json.loads(Path(f"{out}.json.{r}").read_text()) for r in range(processes)]
    step_s = statistics.median(ranks[0]["times"][1:] or ranks[0]["times"])
    return {"run": name, "train_type": train_type, "step_s": step_s, "peak_mib": [r["peak_mib"] for r in ranks],
            "load_mib": [r["load_mib"] for r in ranks]}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        return worker(sys.argv[2], sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--train_types", nargs="+", default=["lora", "full"], choices=["lora", "dora", "qlora", "full"])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    args = parser.parse_args()
    from helpers import alpaca_rows, write_jsonl

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_model(work / "model", args.layers)
        data = write_jsonl(work / "rows.jsonl", alpaca_rows(64))
        results = [run(name, kind, model, data, work, args.steps) for kind in args.train_types for name in args.runs]
    print(f"{os.cpu_count()} cores; {args.layers} layers; global batch 16; fp32; median step after the first of "
          f"{args.steps}")
    print("| train type | run | step (s) | vs the faster 1-process run | peak RSS per rank, loading (MiB, VmHWM) "
          "| peak RSS per rank, training (MiB, VmHWM) |")
    print("|---|---|---|---|---|---|")
    for result in results:
        base = min((r for r in results if r["train_type"] == result["train_type"] and r["run"].startswith("1 ")),
                   key=lambda r: r["step_s"], default=result)
        loading, peaks = (" / ".join(f"{p:.0f}" for p in result[key]) for key in ("load_mib", "peak_mib"))
        print(f"| {result['train_type']} | {result['run']} | {result['step_s']:.3f} | "
              f"{result['step_s'] / base['step_s']:.2f}x | {loading} | {peaks} |")


if __name__ == "__main__":
    main()
