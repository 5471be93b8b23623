"""Which adapters a server may serve, and which are loaded.

Two kinds of names: a folder directly inside the adapters directory (its name, nothing else: no
path separators, no `..`, no symlink that leads out of the directory), and a name registered with
a folder (`--lora_modules`, or POST /v1/load_lora_adapter), whose folder must lie inside the adapters
directory unless the server allows others. Only safetensors weights are read. Adapters load into
the AdapterBank on first use; past `max_loaded` the least recently used one not needed now is
unloaded. Messages name adapters by name, never by their path on the server.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from lorakit.config import CONFIG_NAME, LoraConfig
from lorakit.model.adapter_files import WEIGHTS_NAME

log = logging.getLogger("lorakit.serve")


class UnknownAdapter(LookupError):
    """The name is not a servable adapter folder."""


class AdapterLoadError(RuntimeError):
    """The adapter folder exists but could not be loaded into the model."""


class AdapterExists(ValueError):
    """A name registered twice, or one that a folder of the adapters directory already has."""


class PathNotAllowed(ValueError):
    """A folder outside the adapters directory, on a server that serves only folders inside it."""


MAX_NAME = 256  # characters in a registered adapter name


@dataclass
class Registered:
    """A name registered with a folder, and its tensors as read ahead (dropped once in the bank)."""
    folder: Path
    stamp: tuple
    modules: dict | None


class AdapterRegistry:
    """Adapter folders under `root` (None: no adapters directory, registered names only) and registered names,
    loaded into `bank` on demand with least-recently-used eviction. `stats` counts cache hits, loads and
    evictions."""

    def __init__(self, bank, root: str | os.PathLike | None, max_loaded: int, allow_outside: bool = False):
        if max_loaded < 1:
            raise ValueError(f"max_loaded_adapters must be >= 1, got {max_loaded}")
        self.root = Path(root).resolve() if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise FileNotFoundError(f"adapters folder not found: {root}")
        self.bank = bank
        self.max_loaded = max_loaded
        self.allow_outside = allow_outside
        self.stats: Counter[str] = Counter()  # "hits", "loads", "evictions"
        self._loaded: OrderedDict[str, tuple] = OrderedDict()  # name -> (folder, file stamps), oldest use first
        self._checked: dict[str, tuple] = {}  # name -> (file stamps, what check() found wrong or None)
        self._skipped: dict[str, str] = {}  # folder -> why names() left it out (logged when it changes)
        self._registered: dict[str, Registered] = {}  # guarded by _lock: the HTTP threads change it
        self._retired: set[str] = set()  # unregistered names the worker unloads once no row uses them
        self._lock = threading.Lock()

    def folder(self, name: str) -> Path:
        """The folder of adapter `name`, or UnknownAdapter saying why it is not servable."""
        with self._lock:
            entry = self._registered.get(name)
        if entry is not None:
            return entry.folder
        if self.root is None:
            raise UnknownAdapter(f"model {name!r} not found: this server serves the base model and the adapters "
                                 "registered by name only (it has no adapters folder)")
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
        if self.root is None:
            return message
        return message.replace(f"{self.root}{os.sep}", "").replace(str(self.root), ".")

    def names(self) -> list[str]:
        """The adapters that pass check(): folders read from disk now (new folders appear without a
        restart), then registered names. A folder left out is logged with the reason, once (again if
        the reason changes)."""
        with self._lock:
            registered = list(self._registered)
        found = []
        for entry in sorted(os.listdir(self.root)) if self.root is not None else ():
            try:
                self.check(entry)
            except (UnknownAdapter, ValueError, OSError) as err:
                if self._skipped.get(entry) != str(err) and (self.root / entry).is_dir():
                    log.warning("not serving adapter folder %r: %s", entry, err)
                self._skipped[entry] = str(err)
                continue
            self._skipped.pop(entry, None)
            found.append(entry)
        return [*(n for n in found if n not in registered), *registered]

    def register(self, name: str, path: str | os.PathLike, trusted: bool = False) -> None:
        """Serve the adapter folder `path` as `name`: its files are checked and its tensors read now,
        in the caller's thread (never the model's); the worker puts them in the bank on first use.
        A relative path is taken inside the adapters directory. `trusted` (start-up flags) lifts the
        rule that the folder lies inside it. UnknownAdapter if there is no adapter at `path`;
        PathNotAllowed, AdapterExists, or ValueError saying what is wrong."""
        check_name(name)
        if self._is_folder(name):
            raise AdapterExists(f"adapter {name!r} is a folder of the adapters directory already")
        with self._lock:
            if name in self._registered:
                raise AdapterExists(f"the adapter {name!r} has already been loaded; unload it first")
        folder = self.registered_folder(path, trusted)
        problem = self._problem(folder)
        if problem:
            raise ValueError(problem)
        stamp = _stamp(folder)
        modules = self.bank.read(folder)
        with self._lock:
            if name in self._registered:
                raise AdapterExists(f"the adapter {name!r} has already been loaded; unload it first")
            self._registered[name] = Registered(folder, stamp, modules)
        log.info("registered adapter %r", name)

    def unregister(self, name: str) -> None:
        """Stop serving a registered name; the worker unloads it from the bank once no running row uses
        it (rows that use it finish with it). UnknownAdapter if the name is not registered."""
        with self._lock:
            if name not in self._registered:
                raise UnknownAdapter(f"the adapter {name!r} cannot be found among the adapters loaded by name "
                                     "(an adapter folder stops being served when its folder is removed)")
            del self._registered[name]
            self._retired.add(name)
        log.info("unregistered adapter %r", name)

    def _is_folder(self, name: str) -> bool:
        """Whether `name` is a plain name that a folder of the adapters directory has."""
        if self.root is None or name in (".", "..") or any(sep in name for sep in ("/", "\\", "\0")):
            return False
        try:
            return (self.root / name).is_dir()
        except OSError:  # a name too long for the file system
            return False

    def registered_folder(self, path: str | os.PathLike, trusted: bool) -> Path:
        """The adapter folder a registration names, resolved; PathNotAllowed or UnknownAdapter."""
        folder = (self.root / path if self.root is not None else Path(path)).resolve()  # absolute stays as is
        if not (trusted or self.allow_outside):
            if self.root is None:
                raise PathNotAllowed("this server has no adapters folder, and it loads adapters from other "
                                     "folders only when started with --allow_adapter_paths_outside")
            for part in (folder, folder / CONFIG_NAME, folder / WEIGHTS_NAME):
                if not _inside(part.resolve(), self.root):
                    raise PathNotAllowed(f"lora_path {os.fspath(path)!r} leads outside the adapters directory; "
                                         "this server loads adapters from inside it only "
                                         "(start it with --allow_adapter_paths_outside to lift this)")
        if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
            raise UnknownAdapter(f"no adapter found at lora_path {os.fspath(path)!r}: an adapter folder needs "
                                 f"{CONFIG_NAME} and {WEIGHTS_NAME} (only safetensors weights are served)")
        return folder

    @property
    def loaded(self) -> list[str]:
        """Loaded adapters, least recently used first."""
        return list(self._loaded)

    def prepare(self, names: set[str], busy: set[str] = frozenset()) -> dict[str, Exception]:
        """Unload the unregistered adapters that no running row uses (`busy`), then load every adapter
        in `names`, evicting others but never a busy one; the ones that failed, with why. Called by the
        worker before requests join the running batch."""
        keep = set(names) | set(busy)
        if len(keep) > self.max_loaded:
            raise ValueError(f"{len(keep)} adapters requested at once; at most {self.max_loaded} can be loaded")
        with self._lock:
            retired, self._retired = self._retired - keep, self._retired & keep  # busy ones go when unused
        for name in retired & set(self._loaded):
            self._unload(name)
        failures = {}
        for name in names:
            try:
                self._ensure(name, keep=keep)
            except UnknownAdapter as err:
                failures[name] = err
            except Exception as err:  # a broken adapter must fail its requests, not the server
                failures[name] = AdapterLoadError(f"adapter {name!r} could not be loaded: {self.relative(str(err))}")
        return failures

    def _ensure(self, name: str, keep: set[str]) -> None:
        folder = self.check(name)
        version = (folder, _stamp(folder))
        if self._loaded.get(name) == version:
            self._loaded.move_to_end(name)
            self.stats["hits"] += 1
            return
        if name in self._loaded:  # its files changed on disk: load the new version
            self._unload(name)
        while len(self._loaded) >= self.max_loaded:
            self._unload(next(n for n in self._loaded if n not in keep))
            self.stats["evictions"] += 1
        with self._lock:
            entry = self._registered.get(name)
        if entry is not None and entry.modules is not None and (entry.folder, entry.stamp) == version:
            self.bank.load(name, folder, entry.modules)  # read ahead, off the worker: only a copy here
            entry.modules = None
        else:
            self.bank.load(name, folder)
        self._loaded[name] = version
        self.stats["loads"] += 1

    def _unload(self, name: str) -> None:
        del self._loaded[name]
        self.bank.unload(name)


def check_name(name: str) -> None:
    """ValueError unless `name` can name a registered adapter: printable, no surrounding spaces, short."""
    if not name or not name.isprintable() or name != name.strip() or len(name) > MAX_NAME:
        raise ValueError(f"lora_name must be 1 to {MAX_NAME} printable characters without surrounding spaces")


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _stamp(folder: Path) -> tuple:
    """Size and modification time of the adapter's files: a change means a new version."""
    return tuple((s.st_size, s.st_mtime_ns) for s in ((folder / f).stat() for f in (CONFIG_NAME, WEIGHTS_NAME)))
