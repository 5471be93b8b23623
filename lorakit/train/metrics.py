"""Training metrics: metrics.jsonl (always), TensorBoard (optional), and a loss-curve PNG."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from lorakit.io import files

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """One JSON record per log event, in a new file per run; on resume, drops records past the resumed step."""

    def __init__(self, output_dir: Path, tensorboard: bool, resumed_step: int | None = None):
        self.path = output_dir / METRICS_FILE
        if resumed_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resumed_step]
            files.write_text(self.path, "".join(line + "\n" for line in kept))
        self.file = self.path.open("w" if resumed_step is None else "a")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("note: no TensorBoard logs: the tensorboard package is not installed (pip install tensorboard); "
                      f"{METRICS_FILE} has the same numbers", file=sys.stderr)
                return
            # TensorBoard hides earlier events from this step on: a new run's start, or past the resumed step
            self.writer = SummaryWriter(str(output_dir / "tensorboard"),
                                        purge_step=0 if resumed_step is None else resumed_step + 1)

    def log(self, step: int, **metrics: float) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(name.replace("_", "/", 1), value, step)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def append_event(output_dir: Path, step: int, fields: dict) -> None:
    """One record that is not a scalar series (e.g. the run's memory check: {"event": "memory", ...}) appended to
    metrics.jsonl after the scalar log has closed; it carries the step it was taken at, as every record does."""
    with (output_dir / METRICS_FILE).open("a") as f:
        f.write(json.dumps({"step": step, **fields}) + "\n")


def plot_loss_curve(metrics_path: Path, png_path: Path) -> bool:
    """Train (and eval) loss against step, from metrics.jsonl; False if there is nothing to plot."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for points, label, style in ((train, "train loss", "-"), (evals, "eval loss", "o-")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return True
