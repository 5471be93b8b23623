"""`lorakit plan`'s predicted peak against the measured one, over a grid of real training steps on CPU.

    OMP_NUM_THREADS=1 python benchmarks/plan_accuracy.py            # the grid of docs/plan.md (~10 min)
    OMP_NUM_THREADS=1 python benchmarks/plan_accuracy.py --only S   # the small model's cells only

Each cell builds a random-weight Llama-style model (10M to 350M parameters), prepares it as `lorakit train`
does (lorakit.train.model.prepare_model; NF4 for qlora), and runs two optimiser steps of lorakit's loss
(lorakit.train.loss.batch_loss_sum), clipping and the optimiser as it runs on a GPU (torch AdamW's foreach
path). The measured peak is the exact maximum of live tensor bytes, from every allocation and free of torch's
CPU allocator (tests/live_bytes.py), not RSS. The predicted peak is lorakit.plan.estimate's.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from live_bytes import Cell, measure_step  # noqa: E402
from lorakit.plan.estimate import Recipe, estimate  # noqa: E402
from lorakit.plan.shape import shape_from_config  # noqa: E402

SIZES = {  # name: (hidden, intermediate, layers, heads, kv_heads, vocab)
    "S": Cell(hidden=256, intermediate=688, layers=4, heads=4, kv_heads=2, vocab=16000),
    "M": Cell(hidden=512, intermediate=1376, layers=8, heads=8, kv_heads=4, vocab=16000),
    "L": Cell(hidden=768, intermediate=2048, layers=12, heads=12, kv_heads=4, vocab=32000),
    "XL": Cell(hidden=1024, intermediate=2816, layers=24, heads=16, kv_heads=8, vocab=32000),
}
QV = ("q_proj", "v_proj")
GRID = [
    ("S", dict(rank=8, batch=1, seq=256)),
    ("S", dict(rank=64, targets=QV, batch=2, seq=256)),
    ("S", dict(train_type="dora", rank=16, seq=512)),
    ("S", dict(train_type="qlora", rank=16, batch=2, seq=256)),
    ("S", dict(train_type="full", seq=256)),
    ("S", dict(train_type="full", optim="sgd", checkpointing=True, batch=2, seq=256)),
    ("S", dict(train_type="full", optim="adafactor", seq=256)),
    ("S", dict(rank=8, checkpointing=True, batch=4, seq=256)),
    ("S", dict(rank=8, memory_savers=False, seq=256)),
    ("S", dict(rank=8, bf16=True, seq=512)),
    ("S", dict(train_type="qlora", rank=8, bf16=True, seq=512)),
    ("S", dict(rank=8, accumulation=2, batch=2, seq=128)),
    ("M", dict(rank=16, batch=2, seq=512)),
    ("M", dict(train_type="qlora", rank=64, checkpointing=True, seq=1024)),
    ("M", dict(train_type="full", optim="adamw_torch_fused", seq=256)),
    ("M", dict(train_type="dora", rank=8, targets=QV, bf16=True, seq=512)),
    ("L", dict(rank=16, seq=512)),
    ("L", dict(train_type="qlora", rank=16, batch=2, seq=256, bf16=True)),
    ("L", dict(train_type="full", seq=128)),
    ("XL", dict(rank=16, seq=256)),
    ("XL", dict(train_type="qlora", rank=64, checkpointing=True, seq=512)),
]


def recipe_of(cell: Cell) -> Recipe:
    """The planner's recipe for a measured cell."""
    return Recipe(train_type=cell.train_type, quantize=cell.train_type == "qlora", targets=cell.targets,
                  rank=cell.rank, dropout=cell.dropout, bf16=cell.bf16, batch=cell.batch, seq=cell.seq,
                  accumulation=cell.accumulation, checkpointing=cell.checkpointing, optim=cell.optim,
                  memory_savers=cell.memory_savers)


def params(cell: Cell) -> int:
    shape = shape_from_config(cell.config_json())
    return sum(lin.d_in * lin.d_out for lin in shape.block_linears()) * shape.layers + sum(
        shape.other_params().values())


def label(size: str, cell: Cell) -> str:
    parts = [f"{size} ({params(cell) / 1e6:.0f}M)", cell.train_type]
    if cell.train_type != "full":
        parts.append(f"r{cell.rank} {'q,v' if cell.targets == QV else 'all-linear'}")
    parts += [f"{cell.batch}x{cell.seq}", cell.optim]
    parts += [flag for flag, on in (("ckpt", cell.checkpointing), ("bf16", cell.bf16),
                                    ("savers off", not cell.memory_savers),
                                    (f"GA{cell.accumulation}", cell.accumulation > 1)) if on]
    return ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="model sizes to run (S, M, L, XL)")
    parser.add_argument("--out", help="write the rows as JSON lines here too")
    opts = parser.parse_args()
    rows = []
    print("| cell | predicted MiB | measured MiB | error | peak at | s |\n|---|---|---|---|---|---|")
    for size, changes in GRID:
        if opts.only and size not in opts.only:
            continue
        cell = replace(SIZES[size], **changes)
        start = time.time()
        plan = estimate(shape_from_config(cell.config_json()), recipe_of(cell))
        measured = measure_step(cell)
        row = {"cell": label(size, cell), "predicted": plan.peak_bytes, "measured": measured,
               "error": plan.peak_bytes / measured - 1, "peak_at": plan.peak_at, "seconds": time.time() - start,
               **asdict(cell)}
        rows.append(row)
        print(f"| {row['cell']} | {plan.peak_bytes / 2**20:.1f} | {measured / 2**20:.1f} | {row['error']:+.1%} | "
              f"{plan.peak_at} | {row['seconds']:.0f} |", flush=True)
        if opts.out:
            with open(opts.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    errors = [abs(r["error"]) for r in rows]
    worst = max(rows, key=lambda r: abs(r["error"]))
    print(f"\n{len(rows)} cells: median |error| {statistics.median(errors):.1%}, worst {worst['error']:+.1%} "
          f"({worst['cell']})")


if __name__ == "__main__":
    main()
