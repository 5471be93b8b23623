"""`--learning_rate auto`: a learning-rate range test (Smith, "Cyclical Learning Rates", 2017) before the run.

A few steps on the run's own batches with the rate rising geometrically from LOW to HIGH; the loss
(smoothed) falls, bottoms out and blows up. The run takes the rate at the bottom divided by DIVISOR.
Afterwards the trainable weights and the random state are put back, so the run that follows is the
run `--learning_rate <picked rate>` would give.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lorakit.train import checkpoints
from lorakit.train.optim import build_optimizer, param_groups

RANGES = {"full": (1e-7, 1e-2), "adapter": (1e-6, 1e-1)}  # Adam rates: full fine-tuning, adapters
MAX_STEPS = 100
MIN_STEPS = 30
DIVISOR = 4.0
SMOOTHING = 0.9  # exponential moving average of the loss, bias-corrected
BLOW_UP = 4.0  # stop once the smoothed loss passes this multiple of its minimum


@dataclasses.dataclass
class RangeTest:
    rates: list[float]
    losses: list[float]  # smoothed
    picked: float

    def to_dict(self) -> dict:
        return {"learning_rate": self.picked, "divisor": DIVISOR,
                "points": [{"lr": r, "smoothed_loss": loss} for r, loss in zip(self.rates, self.losses)]}


def test_steps(total_steps: int) -> int:
    """Steps of the test: half the run's, within [MIN_STEPS, MAX_STEPS]."""
    return max(MIN_STEPS, min(MAX_STEPS, total_steps // 2))


def run_range_test(run, step_fn, steps: int) -> RangeTest:
    """The test on `run` (a loop.Run, before its first step); `step_fn(run, step, optimizer) -> loss` takes one
    optimiser step on the step-th batch. Weights and random state are restored afterwards."""
    low, high = RANGES["full" if run.args.train_type == "full" else "adapter"]
    params = run.params
    saved = [p.detach().clone() for p in params]
    rng = checkpoints.capture_rng(run.ctx.device)
    optimizer = build_optimizer(run.model, dataclasses.replace(run.args, learning_rate=low))
    rates, losses, average, best = [], [], 0.0, math.inf
    bar = tqdm(total=steps, desc="lr range test", unit="step", disable=not run.ctx.is_main, dynamic_ncols=True)
    try:
        for step in range(steps):
            lr = low * (high / low) ** (step / (steps - 1))
            for group, rate in zip(optimizer.param_groups, group_rates(run, lr)):
                group["lr"] = rate
            loss = step_fn(run, step, optimizer)
            if not math.isfinite(loss):
                break
            average = SMOOTHING * average + (1 - SMOOTHING) * loss
            smoothed = average / (1 - SMOOTHING ** (step + 1))
            rates.append(lr)
            losses.append(smoothed)
            best = min(best, smoothed)
            bar.update(1)
            bar.set_postfix(lr=f"{lr:.1e}", loss=f"{smoothed:.4f}")
            if smoothed > BLOW_UP * best:
                break
    finally:
        bar.close()
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)
        for p in params:
            p.grad = None
        checkpoints.restore_rng(rng, run.ctx.device)
    if len(rates) < 3:
        raise RuntimeError(f"--learning_rate auto: the loss was not finite from {low:.0e} on; give --learning_rate")
    return RangeTest(rates, losses, pick(rates, losses))


def group_rates(run, lr: float) -> list[float]:
    """Every optimiser group's rate when the run's rate is `lr` (LoRA+ and --vit_lr / --aligner_lr kept)."""
    return [g["lr"] for g in param_groups(run.model, dataclasses.replace(run.args, learning_rate=lr))]


def pick(rates: list[float], losses: list[float]) -> float:
    """The rate at the smoothed loss's minimum, divided by DIVISOR (never below the first rate tried)."""
    at_min = min(range(len(losses)), key=losses.__getitem__)
    return max(rates[at_min] / DIVISOR, rates[0])


def ascii_plot(test: RangeTest, width: int = 50, height: int = 8) -> str:
    """The smoothed loss against log10(rate) in text, the picked rate marked with |."""
    lo, hi = math.log10(test.rates[0]), math.log10(test.rates[-1])
    shown = [min(loss, 2 * min(test.losses)) for loss in test.losses]  # the blow-up would flatten the rest
    bottom, top = min(shown), max(shown)
    grid = [[" "] * width for _ in range(height)]
    for rate, loss in zip(test.rates, shown):
        x = round((math.log10(rate) - lo) / max(hi - lo, 1e-9) * (width - 1))
        y = round((top - loss) / max(top - bottom, 1e-9) * (height - 1))
        grid[y][x] = "*"
    mark = round((math.log10(test.picked) - lo) / max(hi - lo, 1e-9) * (width - 1))
    for row in grid:
        if row[mark] == " ":
            row[mark] = "|"
    lines = [f"{top:8.3f} " + "".join(grid[0])] + ["         " + "".join(r) for r in grid[1:-1]]
    lines.append(f"{bottom:8.3f} " + "".join(grid[-1]))
    lines.append(f"         {test.rates[0]:<10.0e}{'lr (log scale)':^{width - 20}}{test.rates[-1]:>10.0e}")
    return "\n".join(lines)


def save(test: RangeTest, out: Path) -> None:
    """lr_range_test.json and lr_range_test.png in the run's folder."""
    (out / "lr_range_test.json").write_text(json.dumps(test.to_dict(), indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(test.rates, test.losses)
    ax.axvline(test.picked, color="tab:red", linestyle="--", label=f"picked {test.picked:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("smoothed train loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "lr_range_test.png")
    plt.close(fig)


def saved_rate(resume: str, out: Path) -> float:
    """The rate a checkpointed `--learning_rate auto` run picked (--resume does not test again)."""
    path = checkpoints.resolve_resume(resume, out)
    rate = checkpoints.read_state(path).get("trajectory", {}).get("learning_rate")
    if not isinstance(rate, (int, float)):
        raise ValueError(f"--resume {path}: the checkpoint records no learning rate; give --learning_rate")
    return float(rate)
