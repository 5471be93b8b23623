"""Model folders written one shard at a time (read one tensor at a time: lorakit.io.weights)."""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

import torch

from lorakit.io import files
from lorakit.io.weights import SAFETENSORS_DTYPES

INDEX_NAME = "model.safetensors.index.json"
# What a model folder holds besides its configuration, tokenizer and processor files.
WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf)$|.*\.safetensors\.index\.json$")


def parse_size(size: str | int) -> int:
    """Bytes from transformers' max_shard_size spelling ("5GB", "500MB", "10KiB", or a number)."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        value = convert_file_size_to_int(size)
    except ValueError:
        raise ValueError(f"--max_shard_size {size!r}: give bytes or a size like 5GB, 500MB, 10KiB") from None
    if value <= 0:
        raise ValueError(f"--max_shard_size must be positive, got {size!r}")
    return value


class ShardWriter:
    """Tensors written in order into safetensors shards of at most `max_bytes` of data each (a bigger tensor
    gets a shard of its own), named as transformers names them, with an index when there is more than one.

    Each tensor's bytes go to a scratch file as it comes; a full shard is the safetensors header followed by
    that file. So memory holds one tensor at a time: safetensors' save_file would need the whole shard, twice."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.scratch = open(folder / "shard-data.tmp", "w+b")  # closed in close()
        self.header: dict[str, dict] = {}
        self.shards: list[list[str]] = []  # the keys of each written shard
        self.total = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        if self.header and self.scratch.tell() + data.nbytes > self.max_bytes:
            self.flush()
        start = self.scratch.tell()
        self.scratch.write(memoryview(data))
        self.header[key] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                            "data_offsets": [start, start + data.nbytes]}
        self.total += data.nbytes

    def flush(self) -> None:
        if not self.header:
            return
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it

        def write(path: str) -> None:
            with open(path, "wb") as out:
                out.write(struct.pack("<Q", len(header)) + header)
                self.scratch.seek(0)
                shutil.copyfileobj(self.scratch, out, 1 << 24)

        files.atomic_write(self.folder / f"shard-{len(self.shards):05d}.tmp", write)
        self.shards.append(list(self.header))
        self.header = {}
        self.scratch.seek(0)
        self.scratch.truncate()

    def close(self) -> list[str]:
        """Write the last shard, give the shards their final names (and the index); returns the names."""
        self.flush()
        self.scratch.close()
        os.remove(self.scratch.name)
        n = len(self.shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            os.replace(self.folder / f"shard-{i:05d}.tmp", self.folder / name)
        if n > 1:
            weight_map = {key: name for name, keys in zip(names, self.shards) for key in keys}
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            files.write_text(self.folder / INDEX_NAME, json.dumps(index, indent=2) + "\n")
        return names


def copy_side_files(source: Path, dest: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy a model folder's configuration, tokenizer and processor files (everything at its top level but
    weights and the names in `skip`) into `dest`; returns the names copied."""
    copied = []
    for path in sorted(source.iterdir()):
        if path.is_file() and not WEIGHT_FILE.fullmatch(path.name) and path.name not in skip:
            shutil.copyfile(path, dest / path.name)
            copied.append(path.name)
    return copied
