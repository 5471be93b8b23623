"""A model folder's safetensors files: its tensors by checkpoint key, read one at a time, and the model's
name for each key."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder (sharded or not)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{folder} has no model.safetensors (or sharded index); lorakit reads safetensors "
                            "checkpoints here")


def model_key(key: str, model_keys: set[str], prefix: str) -> str | None:
    """The model's name for a checkpoint key (task models add or drop the base model's prefix)."""
    for candidate in (key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")):
        if candidate in model_keys:
            return candidate
    return None


class Checkpoint:
    """A model folder's tensors by checkpoint key, read from its safetensors files one at a time."""

    def __init__(self, folder: str | os.PathLike):
        from safetensors import safe_open

        self.folder = Path(folder)
        self.files = checkpoint_files(self.folder)
        self.readers = {file: safe_open(str(file), framework="pt") for file in self.files}  # each opened once
        self.file_of: dict[str, Path] = {key: file for file, reader in self.readers.items() for key in reader.keys()}

    def tensor(self, key: str) -> torch.Tensor:
        return self.readers[self.file_of[key]].get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape, from the file's header (no data read)."""
        return tuple(self.readers[self.file_of[key]].get_slice(key).get_shape())

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, tensor) for every tensor, file by file, in each file's order."""
        for reader in self.readers.values():
            for key in reader.keys():
                yield key, reader.get_tensor(key)
