"""Files written whole or not at all: written to a temp file beside the target, then renamed over it.

The file gets the mode any new file gets under the user's umask (safetensors alone would write
0600), and a write that fails or is killed leaves the old file as it was. Folders likewise
(staged_dir): filled beside the target, renamed into place when complete.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
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


def require_new_dir(path: str | os.PathLike, flag: str = "--output_dir") -> Path:
    """`path`, refused if it exists and is not an empty folder (checked before long work, and again at the end)."""
    target = Path(path)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{flag} {target} exists and is not empty; give a new folder (nothing was written)")
    return target


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike, flag: str = "--output_dir") -> Iterator[Path]:
    """A temp folder beside `path` to fill, renamed to `path` when the block ends without error and
    removed when it fails. A `path` that exists and is not an empty folder is refused, untouched."""
    target = require_new_dir(path, flag)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())
        if target.exists():
            target.rmdir()  # empty, as checked above
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
