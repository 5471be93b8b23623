"""Which `lorakit train` defaults win? A seeded sweep of LoRA recipes on three classification tasks.

Every run trains the real pretrained all-MiniLM-L6-v2 through `lorakit.train.loop.train` with one
recipe (a set of `lorakit train` flags over lorakit's defaults) on one task and seed, then scores the
trained model on the task's validation rows (used to choose) and its test rows (never used to choose).

Tasks, each split once with a fixed seed (../shared/data, beside the checkout; the split files are
written under --work):
  sst2             GLUE SST-2 train rows: 8,000 train / 1,000 val / 2,000 test, 1 epoch
  support_intents  lorakit's built-in 8-intent dataset: 280 train / 60 val / 60 test, 3 epochs
  alpaca_input     does an Alpaca-GPT4 instruction come with an input? (alpaca_gpt4_en_demo: 999 rows,
                   label = input is non-empty; 41% yes): 700 train / 150 val / 149 test, 3 epochs
All at --max_length 64 (the budget, not part of a recipe).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/recipe_sweep.py --groups lr,rank --seeds 0,1 --jobs 2
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/recipe_sweep.py --report     # the table from stored runs

Runs are appended to --results (JSONL) as they finish; a run already stored is not run again (a failed one
is), so an interrupted sweep continues where it stopped and a wider one reuses the narrower one's runs.
--jobs N runs N trainings at once, each in its own process on --threads threads.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data"
TASKS = {  # name: (train, val, test rows; epochs)
    "sst2": (8000, 1000, 2000, 1.0),
    "support_intents": (280, 60, 60, 3.0),
    "alpaca_input": (700, 150, 149, 3.0),
}
MAX_LENGTH = 64
SPLIT_SEED = 1234

# Recipes: flags over lorakit's defaults ({} = the defaults as they are). Each group varies one thing.
GROUPS = {
    "defaults": [{}],
    "old_defaults": [{"lora_alpha": 32, "learning_rate": 1e-3}],  # lorakit's LoRA defaults before this sweep
    "lr": [{"learning_rate": lr} for lr in (2e-4, 5e-4, 1e-3, 2e-3)],
    "alpha_lr": [{"lora_alpha": a, "learning_rate": lr} for a, lr in ((8, 1e-3), (8, 2e-3), (8, 4e-3), (16, 1e-3),
                                                                      (16, 2e-3))],
    "alpha16": [{"lora_alpha": 16, "learning_rate": lr} for lr in (5e-4, 1.5e-3)]
    + [{"lora_alpha": 16, "learning_rate": 2e-3, "warmup_ratio": 0.1}],
    "rank": [{"lora_rank": r} for r in (4, 16, 32, 64)],
    "rank32": [{"lora_rank": 32}],
    "alpha": [{"lora_alpha": a} for a in (8, 32)],  # around the default 2 x rank = 16
    "rslora": [{"use_rslora": True}],
    "batch": [{"per_device_train_batch_size": b} for b in (4, 16, 32)],
    "warmup": [{"warmup_ratio": w} for w in (0.0, 0.1)],
    "schedule": [{"lr_scheduler_type": s} for s in ("linear", "constant")],
    "dropout": [{"lora_dropout": d} for d in (0.0, 0.1)],
    "targets": [{"target_modules": ["query", "value"]}],
    # all-linear plus the word embedding ("all-linear" takes no other name, so the Linear names are listed)
    "embeddings": [{"target_modules": ["query", "key", "value", "dense", "word_embeddings"]}],
    "loraplus": [{"loraplus_lr_ratio": k} for k in (4.0, 16.0)],
    "full": [{"train_type": "full", "learning_rate": lr} for lr in (None, 2e-5, 1e-4)],
    "full_default": [{"train_type": "full"}],
    "methods": [{"train_type": t} for t in ("dora", "qlora")],
    "qlora": [{"train_type": "qlora"}],
    "auto": [{"learning_rate": "auto"}],
    "fp32": [{"bf16": False}],  # lorakit's default on this CPU is bf16 autocast
    "fp32_rank32": [{"bf16": False, "lora_rank": 32}],
    # alpaca at twice its default rate, where runs collapse: what makes collapse less likely?
    "stress": [{"learning_rate": 2.5e-3, **change} for change in (
        {}, {"bf16": False}, {"torch_dtype": "float32"}, {"weight_decay": 0.1}, {"lora_dropout": 0.1},
        {"adam_beta2": 0.99}, {"adam_beta2": 0.95})],
    "beta2": [{"adam_beta2": 0.95}],  # Adam's second moment over ~20 steps instead of ~1,000
    "beta2_rank32": [{"adam_beta2": 0.95, "lora_rank": 32}],
    # BERT's classifier reads the pooler (a dense layer over [CLS]): trained in full, as full fine-tuning does
    "pooler": [{"modules_to_save": ["pooler"]}],
    "rank64": [{"lora_rank": 64}],
    "layernorm": [{"modules_to_save": ["pooler", "LayerNorm"]}],  # the LayerNorms too, as full fine-tuning trains them
    "full_auto": [{"train_type": "full", "learning_rate": "auto"}],
    "bias": [{"lora_bias": "all"}],  # every base bias trained too, as full fine-tuning trains them
    "rate_above_rule": [{"learning_rate": lr} for lr in (8e-4, 1e-3)],  # SST-2: the rule gives 6.3e-4
    "no_dropout": [{"lora_dropout": 0.0}],  # SST-2's one epoch shows no row twice: what does dropout buy there?
}


def defaults_id() -> str:
    """A short id of lorakit's defaults as they are now: the fields a recipe leaves unset and the values of the
    rules that fill the rest (learning rate over a grid of train types, tasks, steps and ranks; beta2; what a
    BERT classifier trains in full), not their source, so a reformat keeps the id. Fields left None are not
    part of it, so a new optional flag keeps the id of the runs before it. A recipe's runs under other
    defaults are kept apart."""
    import hashlib

    from lorakit.train.args import TrainArgs, default_adam_beta2
    from lorakit.train.prepare import default_learning_rate, default_modules_to_save

    fields = {k: v for k, v in TrainArgs().to_dict().items()
              if k not in ("output_dir", "model", "dataset") and v is not None}
    rates = [[t, task, steps, rank, default_learning_rate(t, task, steps, rank)]
             for t in ("lora", "dora", "qlora", "full") for task in ("seq_cls", "causal_lm")
             for steps in (10, 100, 105, 264, 1000, 5000) for rank in (4, 8, 16, 64)]
    betas = [[t, default_adam_beta2(t)] for t in ("lora", "dora", "qlora", "full")]
    saved = [[t, default_modules_to_save(t, "seq_cls", "bert")] for t in ("lora", "dora", "qlora", "full")]
    text = json.dumps([fields, rates, betas, saved], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def divisor(recipe: dict) -> float | None:
    """The range test's divisor, for a `--learning_rate auto` recipe (part of its key: the flags do not name it)."""
    from lorakit.train import lr_range

    return lr_range.DIVISOR if recipe.get("learning_rate") == "auto" else None


def key(task: str, recipe: dict, seed: int, defaults: str) -> str:
    fields = [task, {k: v for k, v in sorted(recipe.items()) if v is not None}, seed, defaults]
    return json.dumps(fields + ([divisor(recipe)] if divisor(recipe) else []))


def label_recipe(recipe: dict) -> str:
    shown = {k: v for k, v in recipe.items() if v is not None}
    return " ".join(f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in shown.items()) or "defaults"


# ---- data ---------------------------------------------------------------------------------------------

def task_rows(task: str) -> list[dict]:
    if task == "sst2":
        path = SHARED / "sst2" / "train.jsonl"
        return [{"text": r["text"], "label": ["negative", "positive"][int(r["label"])]} for r in read_jsonl(path)]
    if task == "support_intents":
        from lorakit.data.loading import resolve_builtin

        return read_jsonl(Path(resolve_builtin("builtin:support_intents")))
    if task == "alpaca_input":
        path = SHARED / "alpaca_gpt4_en_demo" / "data.jsonl"
        return [{"text": r["instruction"], "label": "with_input" if r["input"].strip() else "no_input"}
                for r in read_jsonl(path)]
    raise ValueError(f"unknown task {task!r}; accepted: {list(TASKS)}")


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        sys.exit(f"{path} not found: the sweep reads ../shared/data beside the checkout")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def split_files(task: str, work: Path) -> dict[str, Path]:
    """train/val/test JSONL files of one task, written once (seeded shuffle, then consecutive slices)."""
    folder = work / "data" / task
    files = {split: folder / f"{split}.jsonl" for split in ("train", "val", "test")}
    if all(f.is_file() for f in files.values()):
        return files
    rows = task_rows(task)
    random.Random(SPLIT_SEED).shuffle(rows)
    sizes = TASKS[task][:3]
    if sum(sizes) > len(rows):
        sys.exit(f"{task}: {sum(sizes)} rows asked for, {len(rows)} available")
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for path, size in zip(files.values(), sizes):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[start:start + size]))
        start += size
    return files


# ---- one run (in its own process) ---------------------------------------------------------------------

def run_one(task: str, recipe: dict, seed: int, work: Path) -> dict:
    from lorakit.train.args import TrainArgs
    from lorakit.train.loop import train

    files = split_files(task, work)
    out = Path(tempfile.mkdtemp(prefix=f"sweep_{task}_", dir=work))
    try:
        args = TrainArgs(model="all-MiniLM-L6-v2", dataset=[str(files["train"])], val_dataset=[str(files["val"])],
                         num_train_epochs=TASKS[task][3], max_length=MAX_LENGTH, seed=seed, output_dir=str(out),
                         report_to=["none"], save_total_limit=1, **recipe)
        start = time.perf_counter()
        result = train(args)
        wall = time.perf_counter() - start
        return {"val_accuracy": result["eval_accuracy"], "test_accuracy": test_accuracy(out, files["test"]),
                "wall_s": round(wall, 1), "train_runtime_s": result["train_runtime_s"],
                "steps": result["global_step"], "learning_rate": resolved_lr(out)}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def resolved_lr(out: Path):
    import yaml

    return yaml.safe_load((out / "run_config.yaml").read_text()).get("learning_rate")


def test_accuracy(out: Path, test_file: Path) -> float:
    """Accuracy of the trained adapter (or model) in `out` on the test rows, at the training max_length."""
    from extract_sst2 import accuracy

    from lorakit.cli.infer import InferArgs, load_for_inference

    model, tokenizer, labels = load_for_inference(InferArgs(adapter=str(out)))
    return accuracy(model, tokenizer, read_jsonl(test_file), labels, max_length=MAX_LENGTH)


# ---- the sweep ----------------------------------------------------------------------------------------

def stored(results: Path) -> dict[str, dict]:
    if not results.is_file():
        return {}
    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    return {r["key"]: r for r in records}


def launch(task: str, recipe: dict, seed: int, args) -> dict:
    """One run in a fresh process (its own threads and memory); returns its record."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    spec = json.dumps({"task": task, "recipe": recipe, "seed": seed, "work": str(args.work)})
    proc = subprocess.run([sys.executable, __file__, "--one", spec], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sweep(args) -> None:
    done = {k: r for k, r in stored(args.results).items() if "error" not in r}  # a failed run is tried again
    defaults = defaults_id()
    plan = [(task, recipe, seed) for group in args.groups for recipe in GROUPS[group]
            for task in args.tasks for seed in args.seeds]
    plan = list({key(*p, defaults): p for p in plan if key(*p, defaults) not in done}.values())
    print(f"{len(plan)} runs to do ({len(done)} stored in {args.results})", flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    for task in args.tasks:
        split_files(task, args.work)

    def one(item):
        task, recipe, seed = item
        record = {"key": key(task, recipe, seed, defaults), "task": task, "recipe": recipe, "seed": seed,
                  "defaults": defaults, "divisor": divisor(recipe),
                  **launch(task, recipe, seed, args)}
        with open(args.results, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"{task:16s} seed {seed} {label_recipe(recipe):50s} "
              + (f"val {record['val_accuracy']:.4f} test {record['test_accuracy']:.4f} {record['wall_s']:.0f} s"
                 if "error" not in record else f"FAILED: {record['error']}"), flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, plan))


def mean_se(values: list[float]) -> str:
    if not values:
        return "-"
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return f"{100 * statistics.mean(values):.1f} ± {100 * se:.1f}" if len(values) > 1 else f"{100 * values[0]:.1f}"


def report(args) -> str:
    records = [r for r in stored(args.results).values() if "error" not in r]
    current, recipes = defaults_id(), {}
    for r in records:
        recipe = {k: v for k, v in sorted(r["recipe"].items()) if v is not None}
        if r["recipe"].get("learning_rate") == "auto":
            recipe["range test divisor"] = r.get("divisor", 10.0)  # runs before it was recorded used 10
        recipes.setdefault(json.dumps([recipe, r.get("defaults", "unrecorded")]), []).append(r)
    tasks = [t for t in TASKS if any(r["task"] == t for r in records)]
    head = "| recipe | " + " | ".join(f"{t} val | {t} test | {t} s" for t in tasks) + " |"
    lines = [head, "|" + "---|" * (1 + 3 * len(tasks))]
    for name, runs in recipes.items():
        recipe, defaults = json.loads(name)
        cells = []
        for t in tasks:
            mine = [r for r in runs if r["task"] == t]
            cells += [mean_se([r["val_accuracy"] for r in mine]), mean_se([r["test_accuracy"] for r in mine]),
                      f"{statistics.mean(r['wall_s'] for r in mine):.0f}" if mine else "-"]
        n = max(len([r for r in runs if r["task"] == t]) for t in tasks)
        older = "" if defaults == current else f" [defaults {defaults}]"
        lines.append(f"| {label_recipe(recipe)}{older} (n={n}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", default="defaults", help=f"comma-separated, of {list(GROUPS)}")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {list(TASKS)}")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--results", type=Path, default=HERE / "results" / "recipe_sweep.jsonl")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lorakit_recipe_sweep")
    p.add_argument("--report", action="store_true", help="print the table of stored runs and exit")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        spec = json.loads(args.one)
        print(json.dumps(run_one(spec["task"], spec["recipe"], spec["seed"], Path(spec["work"]))))
        return
    args.groups = args.groups.split(",")
    args.tasks = args.tasks.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    for name in args.groups:
        if name not in GROUPS:
            sys.exit(f"unknown group {name!r}; accepted: {list(GROUPS)}")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    if not args.report:
        sweep(args)
    print(report(args))


if __name__ == "__main__":
    main()
