"""The plan as text a person can act on, or as one JSON object."""
from __future__ import annotations

import json

from lorakit.plan.estimate import ALLOCATOR_SLACK, CUDA_CONTEXT, Plan, Recipe
from lorakit.plan.levers import Lever
from lorakit.plan.shape import Shape
from lorakit.precision import cpu_matrix_unit

GiB = 1 << 30


def gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def describe(model: str, shape: Shape, recipe: Recipe) -> str:
    kind = recipe.train_type + (" + NF4 base" if recipe.quantize and recipe.train_type != "qlora" else "")
    return (f"{model} ({shape.model_type}, {shape.layers} layers, hidden {shape.hidden}): {kind}, rank "
            f"{recipe.rank}, {recipe.batch} x {recipe.seq} tokens, {'bf16' if recipe.bf16 else 'fp32'}, "
            f"{recipe.optim}, checkpointing {'on' if recipe.checkpointing else 'off'}, memory savers "
            f"{'on' if recipe.memory_savers else 'off'}")


def text(model: str, shape: Shape, recipe: Recipe, plan: Plan, budget: int | None, fixes: list[Lever]) -> str:
    """The breakdown, the peak and where it falls, fits or not, and the changes that make it fit."""
    lines = [describe(model, shape, recipe), ""]
    lines += [f"  {name:<28} {gib(value):>12}" for name, value in plan.parts.items() if value]
    lines += ["", "  step timeline (tensors live):"]
    lines += [f"    {name:<26} {gib(value):>12}" for name, value in plan.timeline.items()]
    lines += ["", f"  predicted peak (max_memory_allocated) {gib(plan.peak_bytes)}, at {plan.peak_at}",
              f"  + runtime overhead {gib(plan.overhead_bytes)} (CUDA context ~{CUDA_CONTEXT >> 20} MiB, "
              f"allocator slack {ALLOCATOR_SLACK:.0%})",
              f"  = device memory needed {gib(plan.device_bytes)}"]
    lines += [f"  note: {note}" for note in plan.notes]
    if budget is None:
        return "\n".join(lines)
    fits = plan.device_bytes <= budget
    lines += ["", f"{'fits' if fits else 'does not fit'} in {gib(budget)}"
              + ("" if fits else f" (short by {gib(plan.device_bytes - budget)})")]
    if not fits:
        lines += ["changes that make it fit:" if fixes else "no change tried here makes it fit"]
        lines += [f"  {lever.flags}: {gib(lever.plan.device_bytes)} (peak {gib(lever.plan.peak_bytes)})"
                  for lever in fixes]
    return "\n".join(lines)


def as_json(model: str, shape: Shape, recipe: Recipe, plan: Plan, budget: int | None, fixes: list[Lever]) -> str:
    """The same as `text`, as one JSON object; `peak_bytes` is the predicted peak of tensors."""
    return json.dumps({
        "model": model, "model_type": shape.model_type, "recipe": recipe.__dict__,
        "parts_bytes": plan.parts, "timeline_bytes": plan.timeline, "peak_bytes": plan.peak_bytes,
        "peak_at": plan.peak_at, "overhead_bytes": plan.overhead_bytes, "device_bytes": plan.device_bytes,
        "gpu_memory_bytes": budget, "fits": None if budget is None else plan.device_bytes <= budget,
        "changes": [{"flags": lever.flags, "device_bytes": lever.plan.device_bytes,
                     "peak_bytes": lever.plan.peak_bytes} for lever in fixes],
        "notes": plan.notes, "cpu_matrix_unit": cpu_matrix_unit()}, indent=2)
