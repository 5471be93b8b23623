"""`lorakit extract` on a real full fine-tune: MiniLM fully fine-tuned on SST-2, then LoRA adapters of rank R.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/extract_sst2.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/extract_sst2.py --train_rows 200 --val_rows 100 --epochs 1  # smoke

The full fine-tune is sst2_minilm.py's `full` row (same rows, split, seed and settings, through
lorakit.train.loop.train). Then, per rank R and per --modules_to_save choice:
    lorakit extract --model BASE_CLS --tuned FULL_FT --rank R --modules_to_save ... --output_dir ...
and the adapter is loaded with peft.PeftModel.from_pretrained onto the base and scored on the validation rows.
BASE_CLS is the pretrained MiniLM saved as BertForSequenceClassification (the tuned model's config; its
classifier is untrained and is replaced by the saved one): the package's folder is a headless BertModel,
whose tensor names extract does not pair with the fine-tune's (see docs/toolbox.md).
Prints a table and writes benchmarks/results/extract_sst2.json (see --out).
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sst2_minilm import DATA, split_rows, write_jsonl  # noqa: E402

SAVE = {"head": ["classifier"], "head+norms": ["classifier", "LayerNorm"]}


def accuracy(model, tokenizer, rows: list[dict], labels: list[str], max_length: int = 128) -> float:
    """Share of rows whose argmax class is the row's label (labels: lorakit's labels.json, index = class id)."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for k in range(0, len(rows), 64):
            chunk = rows[k:k + 64]
            enc = tokenizer([r["text"] for r in chunk], truncation=True, max_length=max_length, padding=True,
                            return_tensors="pt")
            gold = torch.tensor([labels.index(str(r["label"])) for r in chunk])
            correct += (model(**enc).logits.argmax(-1) == gold).sum().item()
    return correct / len(rows)


def lorakit(*argv: str) -> str:
    """Run the lorakit CLI as a user would; its stdout, or exit with its error."""
    proc = subprocess.run([sys.executable, "-m", "lorakit", *argv], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"lorakit {' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return proc.stdout


def delta_error(base: str, tuned: str, adapter: str) -> dict:
    """Over the extracted layers: sqrt(sum ||dW - BA||^2 / sum ||dW||^2); and the share of the whole
    fine-tune's change ||W_tuned - W_base||^2 that sits in tensors the adapter holds neither as LoRA nor whole."""
    from safetensors.torch import load_file

    b, t = load_file(f"{base}/model.safetensors"), load_file(f"{tuned}/model.safetensors")
    a = {k.removeprefix("base_model.model."): v for k, v in load_file(f"{adapter}/adapter_model.safetensors").items()}
    err = ref = lost = total = 0.0
    for key, after in t.items():
        d = (after.float() - b[key].float()).pow(2).sum().item()
        total += d
        layer = key.removesuffix(".weight")
        if f"{layer}.lora_A.weight" in a:
            delta = after.float() - b[key].float()
            err += (delta - a[f"{layer}.lora_B.weight"] @ a[f"{layer}.lora_A.weight"]).pow(2).sum().item()
            ref += d
        elif key not in a:
            lost += d
    return {"rel_error": (err / ref) ** 0.5, "uncaptured_share": lost / total}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=DATA)
    p.add_argument("--train_rows", type=int, default=4000)
    p.add_argument("--val_rows", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--full_lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64, 384], help="384 = full rank for MiniLM")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "extract_sst2.json"))
    args = p.parse_args()

    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from lorakit.io.pretrained import DEFAULT_MODEL, resolve_model_path
    from lorakit.train.args import TrainArgs
    from lorakit.train.loop import train

    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    train_rows, val_rows = split_rows(Path(args.data), args.train_rows, args.val_rows, args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="extract_sst2_"))
    full = str(tmp / "full")
    result = train(TrainArgs(
        model=DEFAULT_MODEL, dataset=[write_jsonl(train_rows, tmp / "train.jsonl")],
        val_dataset=[write_jsonl(val_rows, tmp / "val.jsonl")], train_type="full", learning_rate=args.full_lr,
        num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=64,
        output_dir=full, report_to=["none"], save_total_limit=1, max_length=args.max_length,
        eval_steps=10**9, save_steps=10**9, seed=args.seed))
    train_s = time.perf_counter() - started
    labels = json.loads(Path(full, "labels.json").read_text())

    # What a user would type first: the package's own base folder (a headless BertModel).
    try:
        lorakit("extract", "--model", DEFAULT_MODEL, "--tuned", full, "--rank", "8",
                "--modules_to_save", "classifier", "--output_dir", str(tmp / "plain"))
        plain_base = "worked"
    except RuntimeError as e:
        plain_base = str(e).splitlines()[-1]
        print(f"with the package's base folder: {plain_base}", flush=True)

    base_path = resolve_model_path(DEFAULT_MODEL)
    base_cls = str(tmp / "base_cls")
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    config = AutoConfig.from_pretrained(full)
    AutoModelForSequenceClassification.from_pretrained(base_path, config=config).save_pretrained(base_cls)

    def base_model():
        return AutoModelForSequenceClassification.from_pretrained(base_cls)

    tuned = AutoModelForSequenceClassification.from_pretrained(full)
    rows = {"base (untrained head)": {"accuracy": accuracy(base_model(), tokenizer, val_rows, labels)},
            "full fine-tune": {"accuracy": accuracy(tuned, tokenizer, val_rows, labels),
                               "lorakit_eval_accuracy": result["eval_accuracy"]}}
    head_only = base_model()
    head_only.classifier.load_state_dict(tuned.classifier.state_dict())
    rows["base + the fine-tune's classifier"] = {"accuracy": accuracy(head_only, tokenizer, val_rows, labels)}
    for save, modules in SAVE.items():
        for rank in args.ranks:
            out = str(tmp / f"r{rank}-{save}")
            start = time.perf_counter()
            text = lorakit("extract", "--model", base_cls, "--tuned", full, "--rank", str(rank),
                           "--modules_to_save", *modules, "--output_dir", out)
            errors = [float(m) for m in re.findall(r"^\S+\s+\d+\s+([0-9.e+-]+)$", text, re.M)]
            warn = next((line for line in text.splitlines() if line.startswith("WARNING")), "")
            row = {"extract_s": time.perf_counter() - start, "max_layer_error": max(errors),
                   "mean_layer_error": sum(errors) / len(errors), "layers": len(errors),
                   "not_captured": warn.rsplit(": ", 1)[-1].split(", ") if warn else [],
                   "adapter_mb": Path(out, "adapter_model.safetensors").stat().st_size / 1e6,
                   **delta_error(base_cls, full, out)}
            row["accuracy"] = accuracy(PeftModel.from_pretrained(base_model(), out), tokenizer, val_rows, labels)
            rows[f"extract r={rank}, --modules_to_save {' '.join(modules)}"] = row
            print(f"r={rank} {save}: {row['accuracy']:.4f}, error {row['rel_error']:.3f}", flush=True)

    head = ["model", "val accuracy", "rel. error (all extracted layers)", "max layer error",
            "change not captured", "adapter MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        extra = (f"{r['rel_error']:.3f} | {r['max_layer_error']:.3f} | {100 * r['uncaptured_share']:.2f}% | "
                 f"{r['adapter_mb']:.1f}") if "rel_error" in r else " | | | "
        lines.append(f"| {name} | {r['accuracy']:.4f} | {extra} |")
    total_s = time.perf_counter() - started
    print(f"\nSST-2, all-MiniLM-L6-v2 full fine-tune: {len(train_rows)} train / {len(val_rows)} val rows, "
          f"{args.epochs} epochs, batch {args.batch_size}, lr {args.full_lr}, seed {args.seed}; "
          f"lorakit's own eval after training {result['eval_accuracy']:.4f}; train {train_s:.0f}s, "
          f"total {total_s:.0f}s\n")
    print("\n".join(lines))
    for name, r in rows.items():
        if r.get("not_captured"):
            kinds = sorted({re.sub(r"\.\d+\.", ".N.", n) for n in r["not_captured"]})
            print(f"\n{name}: {len(r['not_captured'])} changed tensors not captured: {', '.join(kinds)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "total_s": round(total_s, 1), "train_s": round(train_s, 1),
                               "extract_with_package_base_folder": plain_base, "rows": rows,
                               "machine": {"platform": platform.platform(), "torch": torch.__version__,
                                           "threads": torch.get_num_threads()}}, indent=2))
    print(f"\nwrote {out}")
    subprocess.run(["rm", "-rf", str(tmp)])


if __name__ == "__main__":
    main()
