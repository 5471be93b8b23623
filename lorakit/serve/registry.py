"""Which adapters a server may serve (folders directly inside one directory), and which are loaded.

A name is a folder name under the adapters directory, nothing else: no path separators, no `..`,
no symlink that leads out of the directory, and only safetensors weights. Adapters load into the
AdapterBank on first use; past `max_loaded` the least recently used one not needed now is unloaded.
Messages name adapters by folder name, never by their path on the server.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path

from safetensors import safe_open

from lorakit.config import CONFIG_NAME, LoraConfig
from lorakit.model.adapter_files import WEIGHTS_NAME

log = logging.getLogger("lorakit.serve")


class UnknownAdapter(LookupError):
    """The name is not a servable adapter folder."""


class AdapterLoadError(RuntimeError):
    """The adapter folder exists but could not be loaded into the model."""


class AdapterRegistry:
    """Adapter folders under `root`, loaded into `bank` on demand with least-recently-used eviction."""

    def __init__(self, bank, root: str | os.PathLike, max_loaded: int):
        if max_loaded < 1:
            raise ValueError(f"max_loaded_adapters must be >= 1, got {max_loaded}")
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"adapters folder not found: {root}")
        self.bank = bank
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[str, tuple] = OrderedDict()  # name -> file stamps, oldest use first
        self._checked: dict[str, tuple] = {}  # name -> (file stamps, what check() found wrong or None)
        self._skipped: dict[str, str] = {}  # folder -> why names() left it out (logged when it changes)

    def folder(self, name: str) -> Path:
        """The folder of adapter `name`, or UnknownAdapter saying why it is not servable."""
        if not name or name in (".", "..") or any(sep in name for sep in ("/", "\\", "\0")):
            raise UnknownAdapter(f"model {name!r} not found: adapter names are plain folder names "
                                 "(no '/', '\\' or '..')")
        try:
            return self._folder(name)
        except (OSError, RuntimeError):  # a name too long for the file system, a symlink loop, ...
            raise UnknownAdapter(f"model {name!r} not found") from None

    def _folder(self, name: str) -> Path:
        """folder() past the name's form: the folder, its files, and where they lead."""
        folder = self.root / name
        if not folder.is_dir():
            raise UnknownAdapter(f"model {name!r} not found")
        for path in (folder, folder / CONFIG_NAME, folder / WEIGHTS_NAME):
            real = path.resolve()
            if real != self.root and self.root not in real.parents:
                raise UnknownAdapter(f"model {name!r} not found: {path.relative_to(self.root)} "
                                     "leads outside the adapters folder")
        if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
            raise UnknownAdapter(f"model {name!r} not found: an adapter folder needs {CONFIG_NAME} and "
                                 f"{WEIGHTS_NAME} (only safetensors weights are served)")
        return folder

    def check(self, name: str) -> Path:
        """The folder of adapter `name` if its files pass cheap checks (again whenever they change):
        UnknownAdapter, or ValueError saying what is wrong."""
        folder = self.folder(name)
        stamp = _stamp(folder)
        if self._checked.get(name, (None,))[0] != stamp:
            self._checked[name] = (stamp, self._problem(folder))
        if self._checked[name][1]:
            raise ValueError(self._checked[name][1])
        return folder

    def _problem(self, folder: Path) -> str | None:
        """What makes this adapter unloadable, found without reading its weights; None if nothing."""
        try:
            LoraConfig.from_pretrained(folder)
        except Exception as err:  # a config that does not parse or holds bad fields
            return self.relative(str(err))
        try:
            with safe_open(folder / WEIGHTS_NAME, "pt") as f:
                dtypes = {key: f.get_slice(key).get_dtype() for key in f.keys()}
        except Exception as err:  # safetensors raises its own error type
            return f"{WEIGHTS_NAME} cannot be read as safetensors ({self.relative(str(err))})"
        bad = next((key for key, dtype in dtypes.items() if not dtype.startswith(("F", "BF"))), None)
        return None if bad is None else f"{WEIGHTS_NAME}: tensor {bad!r} is {dtypes[bad]}, not floating point"

    def relative(self, message: str) -> str:
        """`message` with the adapters folder's path cut out: answers show no server paths."""
        return message.replace(f"{self.root}{os.sep}", "").replace(str(self.root), ".")

    def names(self) -> list[str]:
        """The adapters that pass check(), read from disk now (new folders appear without a restart).
        A folder left out is logged with the reason, once (again if the reason changes)."""
        found = []
        for entry in sorted(os.listdir(self.root)):
            try:
                self.check(entry)
            except (UnknownAdapter, ValueError, OSError) as err:
                if self._skipped.get(entry) != str(err) and (self.root / entry).is_dir():
                    log.warning("not serving adapter folder %r: %s", entry, err)
                self._skipped[entry] = str(err)
                continue
            self._skipped.pop(entry, None)
            found.append(entry)
        return found

    @property
    def loaded(self) -> list[str]:
        """Loaded adapters, least recently used first."""
        return list(self._loaded)

    def prepare(self, names: set[str]) -> dict[str, Exception]:
        """Load every adapter in `names` (evicting others); the ones that failed, with why."""
        if len(names) > self.max_loaded:
            raise ValueError(f"{len(names)} adapters requested at once; at most {self.max_loaded} can be loaded")
        failures = {}
        for name in names:
            try:
                self._ensure(name, keep=names)
            except UnknownAdapter as err:
                failures[name] = err
            except Exception as err:  # a broken adapter must fail its requests, not the server
                failures[name] = AdapterLoadError(f"adapter {name!r} could not be loaded: {self.relative(str(err))}")
        return failures

    def _ensure(self, name: str, keep: set[str]) -> None:
        folder = self.check(name)
        stamp = _stamp(folder)
        if self._loaded.get(name) == stamp:
            self._loaded.move_to_end(name)
            return
        if name in self._loaded:  # its files changed on disk: load the new version
            self._unload(name)
        while len(self._loaded) >= self.max_loaded:
            self._unload(next(n for n in self._loaded if n not in keep))
        self.bank.load(name, folder)
        self._loaded[name] = stamp

    def _unload(self, name: str) -> None:
        del self._loaded[name]
        self.bank.unload(name)


def _stamp(folder: Path) -> tuple:
    """Size and modification time of the adapter's files: a change means a new version."""
    return tuple((s.st_size, s.st_mtime_ns) for s in ((folder / f).stat() for f in (CONFIG_NAME, WEIGHTS_NAME)))
