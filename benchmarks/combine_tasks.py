"""Two task adapters combined by add_weighted_adapter: does each task survive, with its own classifier head?

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/combine_tasks.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/combine_tasks.py --sst2_train_rows 200 --sst2_val_rows 100  # smoke

Two all-linear LoRA adapters (r=8, alpha=16) are trained on all-MiniLM-L6-v2 with lorakit.train.loop.train:
SST-2 sentiment (2 classes, 1 epoch) and the built-in support-intents dataset (8 classes, 300 rows, 5 epochs:
one epoch of 19 steps left it at 0.42 accuracy), each with its own classifier head (lorakit saves `classifier`
in modules_to_save). The heads differ in shape, so the two adapters cannot be loaded onto one model as they are.
Each adapter is split into its LoRA part (a copy of the adapter without the head tensors, with modules_to_save
and task_type empty: for SEQ_CLS, PEFT and lorakit add `classifier` to modules_to_save by themselves) and its
head (classifier.weight/bias). The LoRA parts are loaded into one lorakit PeftModel and combined with
add_weighted_adapter (linear, cat, ties, dare_ties; density 0.5), each combination saved as a plain adapter
folder. A task is scored on a fresh model: AutoModelForSequenceClassification with that task's number of labels,
its classifier set to the task's trained head, then peft.PeftModel.from_pretrained(model, LORA_FOLDER) (or no
LoRA at all).
Prints a table and writes benchmarks/results/combine_tasks.json (see --out).
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extract_sst2 import accuracy  # noqa: E402
from sst2_minilm import DATA, split_rows, write_jsonl  # noqa: E402

COMBINATIONS = ["linear", "cat", "ties", "dare_ties"]
HEAD = "base_model.model.classifier."


def train_adapter(name: str, train_rows: list[dict], val_rows: list[dict], tmp: Path, args) -> dict:
    from lorakit.io.pretrained import DEFAULT_MODEL
    from lorakit.train.args import TrainArgs
    from lorakit.train.loop import train

    out = tmp / name
    start = time.perf_counter()
    result = train(TrainArgs(
        model=DEFAULT_MODEL, dataset=[write_jsonl(train_rows, tmp / f"{name}-train.jsonl")],
        val_dataset=[write_jsonl(val_rows, tmp / f"{name}-val.jsonl")], train_type="lora",
        target_modules=["all-linear"], lora_rank=args.rank, lora_alpha=args.alpha, learning_rate=args.lr,
        num_train_epochs=args.sst2_epochs if name == "sst2" else args.intent_epochs,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=64,
        output_dir=str(out), report_to=["none"], save_total_limit=1, max_length=args.max_length,
        eval_steps=10**9, save_steps=10**9, seed=args.seed))
    return {"folder": out, "labels": json.loads((out / "labels.json").read_text()), "val": val_rows,
            "lorakit_eval_accuracy": result["eval_accuracy"], "train_s": time.perf_counter() - start}


def split_head(adapter: Path, lora_only: Path) -> dict[str, torch.Tensor]:
    """Write the adapter's LoRA part to lora_only; return its head's tensors (classifier.weight / .bias)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    head = {k.removeprefix(HEAD): v for k, v in tensors.items() if k.startswith(HEAD)}
    lora_only.mkdir()
    save_file({k: v for k, v in tensors.items() if not k.startswith(HEAD)},
              str(lora_only / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(modules_to_save=None, task_type=None)
    (lora_only / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return head


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=DATA)
    p.add_argument("--sst2_train_rows", type=int, default=2000)
    p.add_argument("--sst2_val_rows", type=int, default=500)
    p.add_argument("--intent_val_rows", type=int, default=100, help="of the 400 support-intents rows; the rest train")
    p.add_argument("--sst2_epochs", type=float, default=1)
    p.add_argument("--intent_epochs", type=float, default=5, help="1 epoch (19 steps) gave 0.42 on support-intents")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--weights", type=float, nargs="+", default=[1.0, 0.5], help="w: both adapters weighted w")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "combine_tasks.json"))
    args = p.parse_args()

    import peft
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from lorakit import PeftModel
    from lorakit.data.loading import resolve_builtin
    from lorakit.io.pretrained import DEFAULT_MODEL, resolve_model_path

    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="combine_tasks_"))
    sst2_train, sst2_val = split_rows(Path(args.data), args.sst2_train_rows, args.sst2_val_rows, args.seed)
    intents = [json.loads(line) for line in Path(resolve_builtin("builtin:support_intents")).read_text().splitlines()]
    random.Random(args.seed).shuffle(intents)
    tasks = {"sst2": train_adapter("sst2", sst2_train, sst2_val, tmp, args),
             "intents": train_adapter("intents", intents[args.intent_val_rows:], intents[:args.intent_val_rows],
                                      tmp, args)}
    for name, task in tasks.items():
        task["head"] = split_head(task["folder"], tmp / f"{name}-lora")

    base = resolve_model_path(DEFAULT_MODEL)
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), tmp / "sst2-lora",
                                      adapter_name="sst2")
    model.load_adapter(tmp / "intents-lora", adapter_name="intents")
    loras = {f"{name} LoRA": tmp / f"{name}-lora" for name in tasks}
    for weight in args.weights:
        for kind in COMBINATIONS:
            name = f"{kind}_w{round(weight * 100)}"  # adapter names are identifiers
            torch.manual_seed(args.seed)  # dare_ties drops at random
            model.add_weighted_adapter(["sst2", "intents"], [weight, weight], name, combination_type=kind,
                                       density=None if kind in ("linear", "cat") else args.density)
            model.save_pretrained(tmp / "combined", selected_adapters=[name])
            loras[f"{kind}, weights {weight:g}/{weight:g}"] = tmp / "combined" / name

    tokenizer = AutoTokenizer.from_pretrained(base)

    def score(task: dict, lora: Path | None) -> float:
        net = AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(task["labels"]))
        net.classifier.load_state_dict(task["head"])
        net = peft.PeftModel.from_pretrained(net, str(lora)) if lora else net
        return accuracy(net, tokenizer, task["val"], task["labels"], args.max_length)

    rows = {"base + task head (no LoRA)": {t: score(task, None) for t, task in tasks.items()}}
    for name, folder in loras.items():
        rows[name] = {t: score(task, folder) for t, task in tasks.items()}
        print(f"{name}: {rows[name]}", flush=True)

    total_s = time.perf_counter() - started
    print(f"\nall-MiniLM-L6-v2, LoRA r={args.rank} alpha={args.alpha} all-linear, batch {args.batch_size}, "
          f"lr {args.lr}, seed {args.seed}. SST-2: {len(sst2_train)} train / {len(sst2_val)} val rows, "
          f"{args.sst2_epochs:g} epoch(s); support-intents: {len(intents) - args.intent_val_rows} train / "
          f"{args.intent_val_rows} val rows, {args.intent_epochs:g} epochs; "
          f"density {args.density}. lorakit's own eval after training: "
          + ", ".join(f"{t} {task['lorakit_eval_accuracy']:.4f}" for t, task in tasks.items())
          + f"; total {total_s:.0f}s\n")
    print("| LoRA (each task with its own head) | SST-2 accuracy | support-intents accuracy |\n|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['sst2']:.4f} | {r['intents']:.4f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "total_s": round(total_s, 1), "rows": rows,
                               "train": {t: {k: task[k] for k in ("lorakit_eval_accuracy", "train_s")}
                                         for t, task in tasks.items()},
                               "machine": {"platform": platform.platform(), "torch": torch.__version__,
                                           "threads": torch.get_num_threads()}}, indent=2))
    print(f"\nwrote {out}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
