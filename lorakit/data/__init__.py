"""Dataset files -> checked examples: formats, label sets, the held-out split."""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from lorakit.data.formats import FORMATS, Conversation, Example, Labelled, detect_format, to_example
from lorakit.data.loading import read_rows
from lorakit.data.multimodal import Multimodal

__all__ = ["FORMATS", "load_examples", "load_split", "split_holdout", "label_set", "check_labels", "add_system"]


def parse_spec(spec: str) -> tuple[str, int | None]:
    """ms-swift's `dataset#N` -> (dataset, N); (spec, None) without a suffix."""
    name, sep, count = spec.rpartition("#")
    if not sep or not count.isdigit() or Path(spec).exists():
        return spec, None
    if int(count) < 1:
        raise ValueError(f"{spec}: the number of rows to sample must be >= 1")
    return name, int(count)


def sample_rows(items: list, n: int, rng) -> list:
    """N items as ms-swift samples them: whole copies while N exceeds them, then a seeded random subset."""
    copies, rest = divmod(n, len(items))
    picked = list(range(len(items))) * copies
    if rest:
        picked += rng.permutation(len(items))[:rest].tolist()
    return [items[i] for i in picked]


def load_split(specs: list[str], fmt: str, ratio: float, seed: int) -> tuple[list, list, str]:
    """(train, held-out, format) from every dataset in `specs`, as (example, source) pairs. As in ms-swift,
    each dataset's held-out rows are drawn first (a seeded `ratio` share), then `dataset#N` fills the
    training part to N rows minus those, so no held-out row is also trained on."""
    import numpy as np

    train, held, rng = [], [], np.random.RandomState(seed)  # one generator for all specs, in order
    for spec in specs:
        name, count = parse_spec(spec)
        rows = read_rows(name)
        if not rows:
            raise ValueError(f"dataset {spec!r} has no rows")
        if fmt == "auto":
            fmt = detect_format(rows[0])
        pairs = [(to_example(row, fmt), row.source) for row in rows]
        try:
            kept, out = split_holdout(pairs, ratio, seed, of=min(len(pairs), count or len(pairs)))
        except ValueError as err:
            raise ValueError(f"{spec}: {err}") from None
        train += kept if count is None else sample_rows(kept, count - len(out), rng)
        held += out
    return train, held, fmt


def load_examples(specs: list[str], fmt: str = "auto", seed: int = 42) -> tuple[list[tuple[Example, str]], str]:
    """(example, source) pairs from every dataset in `specs` (`#N`: N rows sampled with `seed`), and their format."""
    pairs, _, fmt = load_split(specs, fmt, 0, seed)
    return pairs, fmt


def split_holdout(pairs: list, ratio: float, seed: int, of: int | None = None) -> tuple[list, list]:
    """(train, held_out): a seeded random `ratio` share of `of` rows (default: all) held out (at least one)."""
    if ratio <= 0:
        return pairs, []
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(ratio * (of or len(pairs))))
    if n_held >= (of or len(pairs)):
        raise ValueError(f"--val_split_ratio {ratio} leaves no training rows out of {of or len(pairs)}")
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


def add_system(pairs: list[tuple[Example, str]], system: str) -> list[tuple[Example, str]]:
    """Give `system` as the system message to every conversation that has none."""
    if pairs and not isinstance(pairs[0][0], (Conversation, Multimodal)):
        raise ValueError("--system sets the system prompt of conversations (alpaca or messages data); "
                         "this dataset holds plain text or labelled text")
    return [(ex if ex.messages[0]["role"] == "system" else _with_system(ex, system), source) for ex, source in pairs]


def _with_system(example: Conversation | Multimodal, system: str) -> Conversation | Multimodal:
    """The conversation with `system` as its first message (as content parts for a Multimodal one)."""
    content = [{"type": "text", "text": system}] if isinstance(example, Multimodal) else system
    return dataclasses.replace(example, messages=[{"role": "system", "content": content}, *example.messages])


def check_labels(pairs: list[tuple[Example, str]], labels: list[str]) -> None:
    """Raise at the first row whose label is outside the label set."""
    allowed = set(labels)
    for example, source in pairs:
        if isinstance(example, Labelled) and example.label not in allowed:
            raise ValueError(f"{source}: label {example.label!r} is not in the label set {labels}")
