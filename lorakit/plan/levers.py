"""What makes a recipe fit: single changes first (cheapest to the run's quality or speed first), then the
same changes stacked in that order until the plan fits."""
from __future__ import annotations

from dataclasses import dataclass, replace

from lorakit.plan.estimate import Plan, Recipe, estimate
from lorakit.plan.shape import Shape


@dataclass(frozen=True)
class Lever:
    """A change to the recipe, as the flags that make it, and the plan it gives."""
    flags: str
    recipe: Recipe
    plan: Plan


def _changes(recipe: Recipe) -> list[tuple[str, Recipe]]:
    """Candidate changes, each one step from `recipe`, the least costly first."""
    out = []
    if not recipe.memory_savers:
        out.append(("--memory_savers true", replace(recipe, memory_savers=True)))
    if recipe.batch > 1:
        batch, steps = recipe.batch // 2, recipe.accumulation * 2
        out.append((f"--per_device_train_batch_size {batch} --gradient_accumulation_steps {steps}",
                    replace(recipe, batch=batch, accumulation=steps)))
    if not recipe.checkpointing:
        out.append(("--gradient_checkpointing true", replace(recipe, checkpointing=True)))
    if recipe.optim in ("adamw_torch", "adamw_torch_fused", "paged_adamw_32bit") and not recipe.lora:
        out.append(("--optim adamw_8bit", replace(recipe, optim="adamw_8bit")))
    if recipe.lora and not recipe.quantize:
        out.append(("--train_type qlora" if recipe.train_type == "lora" else "--quant_bits 4",
                    replace(recipe, quantize=True, train_type="qlora" if recipe.train_type == "lora" else
                            recipe.train_type)))
    if not recipe.lora:
        out.append(("--train_type lora", replace(recipe, train_type="lora", optim="adamw_torch")))
    if recipe.seq > 512:
        out.append((f"--max_length {recipe.seq // 2}", replace(recipe, seq=recipe.seq // 2)))
    return out


def levers(shape: Shape, recipe: Recipe, budget: int, limit: int = 5) -> list[Lever]:
    """Changes whose plan fits in `budget` bytes of device memory: single ones, else stacked ones."""
    singles = [Lever(flags, r, estimate(shape, r)) for flags, r in _changes(recipe)]
    fitting = [lever for lever in singles if lever.plan.device_bytes <= budget]
    if fitting:
        return fitting[:limit]
    stacked, flags, current = [], [], recipe
    for _ in range(8):
        options = _changes(current)
        if not options:
            break
        step_flags, current = options[0] if len(options) == 1 else min(
            options, key=lambda o: estimate(shape, o[1]).device_bytes)
        flags.append(step_flags)
        plan = estimate(shape, current)
        stacked.append(Lever(" ".join(flags), current, plan))
        if plan.device_bytes <= budget:
            return stacked[-1:]
    return []
