"""A model folder's safetensors files: its tensors by checkpoint key, read one at a time, and the model's
name for each key."""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
                      torch.float8_e5m2: "F8_E5M2"}
DTYPE_OF = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}


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
    """A model folder's tensors by checkpoint key, read from its safetensors files one at a time. Each read
    copies the tensor's bytes out of the file (no memory map), so a process holds only what it keeps."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.files = checkpoint_files(self.folder)
        self.entries: dict[str, tuple[Path, dict, int]] = {}  # key -> (file, header entry, where its data starts)
        for file in self.files:
            try:
                with open(file, "rb") as f:
                    size = struct.unpack("<Q", f.read(8))[0]
                    header = json.loads(f.read(size))
            except (struct.error, ValueError) as err:
                raise ValueError(f"{file} is not a safetensors file: its header does not read ({err})") from None
            header.pop("__metadata__", None)
            self.entries.update({key: (file, entry, 8 + size) for key, entry in header.items()})
        self.file_of: dict[str, Path] = {key: file for key, (file, _, _) in self.entries.items()}

    def tensor(self, key: str, start: int = 0, count: int | None = None) -> torch.Tensor:
        """The tensor, or `count` of its rows (along the first dimension) from `start`: only those bytes are read."""
        file, entry, data = self.entries[key]
        if entry["dtype"] not in DTYPE_OF:
            raise ValueError(f"{file}: tensor {key} has dtype {entry['dtype']}, which lorakit does not read "
                             f"(it reads {', '.join(DTYPE_OF)})")
        shape, (first, last) = list(entry["shape"]), entry["data_offsets"]
        if count is not None:
            row = (last - first) // shape[0] if shape[0] else 0
            first, last, shape = first + start * row, first + (start + count) * row, [count, *shape[1:]]
        buffer = bytearray(last - first)
        with open(file, "rb") as f:
            f.seek(data + first)
            f.readinto(buffer)
        flat = torch.frombuffer(buffer, dtype=torch.uint8) if buffer else torch.empty(0, dtype=torch.uint8)
        return flat.view(DTYPE_OF[entry["dtype"]]).reshape(shape)

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape, from the file's header (no data read)."""
        return tuple(self.entries[key][1]["shape"])

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, tensor) for every tensor, file by file, by key."""
        for file in self.files:
            for key in sorted(k for k, f in self.file_of.items() if f == file):
                yield key, self.tensor(key)
