"""`lorakit plan`: the memory a training recipe needs, predicted from a model's config.json alone.

    shape.py     config.json -> the model's dimensions (and the configs lorakit ships)
    estimate.py  the breakdown and the peak of one training step
    levers.py    the changes that make a recipe fit
    report.py    text and JSON
"""
from __future__ import annotations

from lorakit.plan.estimate import Plan, Recipe, estimate
from lorakit.plan.shape import read_shape

__all__ = ["Plan", "Recipe", "estimate", "predict_peak", "read_shape"]


def predict_peak(model: str, args) -> int:
    """The predicted peak bytes of tensors (max_memory_allocated) of a `lorakit train` run: `model` is a folder,
    config.json or known hub id, `args` its TrainArgs. For logging beside the measured peak."""
    return estimate(read_shape(model), Recipe.from_train_args(args)).peak_bytes
