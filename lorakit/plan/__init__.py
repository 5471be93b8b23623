"""`lorakit plan`: the memory a training recipe needs, predicted from a model's config.json alone.

    shape.py     config.json -> the model's dimensions (and the configs lorakit ships)
    estimate.py  the breakdown and the peak of one training step
    levers.py    the changes that make a recipe fit
    report.py    text and JSON
"""
from __future__ import annotations

from lorakit.plan.estimate import PLANNED_FAMILIES, Plan, Recipe, estimate
from lorakit.plan.shape import read_shape

__all__ = ["Plan", "Recipe", "estimate", "predict_peak", "read_shape"]


def predict_peak(model: str, args) -> int:
    """The predicted peak bytes of tensors (max_memory_allocated) of a `lorakit train` run: `model` is a folder,
    config.json or known hub id, `args` its TrainArgs. For logging beside the measured peak; a ValueError for
    runs whose memory the estimate does not describe (another task, a family it has no terms for)."""
    if getattr(args, "task_type", "causal_lm") == "seq_cls":
        raise ValueError("lorakit plan predicts causal-LM training, not sequence classification")
    shape = read_shape(model)
    if shape.model_type not in PLANNED_FAMILIES:
        raise ValueError(f"lorakit plan has no terms for {shape.model_type or 'unnamed'} models "
                         f"(it plans {', '.join(sorted(PLANNED_FAMILIES))})")
    return estimate(shape, Recipe.from_train_args(args)).peak_bytes
