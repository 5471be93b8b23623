"""Dataset files -> checked examples: formats, label sets, the held-out split."""
from __future__ import annotations

import random

from .formats import FORMATS, Example, Labelled, detect_format, to_example
from .loading import read_rows

__all__ = ["FORMATS", "load_examples", "split_holdout", "label_set", "check_labels"]


def load_examples(specs: list[str], fmt: str = "auto") -> tuple[list[tuple[Example, str]], str]:
    """(example, source) pairs from every dataset in `specs`, and the format they are in."""
    pairs = []
    for spec in specs:
        rows = read_rows(spec)
        if not rows:
            raise ValueError(f"dataset {spec!r} has no rows")
        if fmt == "auto":
            fmt = detect_format(rows[0])
        pairs += [(to_example(row, fmt), row.source) for row in rows]
    return pairs, fmt


def split_holdout(pairs: list, ratio: float, seed: int) -> tuple[list, list]:
    """(train, held_out): a seeded random `ratio` share of the rows held out (at least one)."""
    if ratio <= 0:
        return pairs, []
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(ratio * len(pairs)))
    if n_held >= len(pairs):
        raise ValueError(f"--val_split_ratio {ratio} leaves no training rows out of {len(pairs)}")
    held = set(order[:n_held])
    return ([p for i, p in enumerate(pairs) if i not in held],
            [p for i, p in enumerate(pairs) if i in held])


def label_set(pairs: list[tuple[Example, str]], declared: list[str]) -> list[str]:
    """The classification labels: `declared`, or those seen in the rows (numbers in numeric order)."""
    seen = {ex.label for ex, _ in pairs if isinstance(ex, Labelled)}
    if declared:
        return list(declared)
    numeric = all(label.lstrip("-").isdigit() for label in seen)
    return sorted(seen, key=int) if numeric else sorted(seen)


def check_labels(pairs: list[tuple[Example, str]], labels: list[str]) -> None:
    """Raise at the first row whose label is outside the label set."""
    allowed = set(labels)
    for example, source in pairs:
        if isinstance(example, Labelled) and example.label not in allowed:
            raise ValueError(f"{source}: label {example.label!r} is not in the label set {labels}")
