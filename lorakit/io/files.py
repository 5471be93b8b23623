"""Files written whole or not at all: written to a temp file beside the target, then renamed over it.

The file gets the mode any new file gets under the user's umask (safetensors alone would write
0600), and a write that fails or is killed leaves the old file as it was.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp)` with a temp path beside `path`, then rename the result over `path`."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        open(tmp, "wb").close()  # created as any new file is, so it takes the umask's mode
        mode = os.stat(tmp).st_mode & 0o777
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
