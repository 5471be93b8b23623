"""The adapter registry (names resolve only inside the adapters folder; LRU loading) and the batcher."""
import asyncio
import os
import time

import pytest
import torch
from safetensors.torch import save_file

from lorakit.serve import batcher as batcher_module
from lorakit.serve.batcher import Batcher
from lorakit.serve.generate import GenerationRequest, GenerationResult
from lorakit.serve.registry import AdapterLoadError, AdapterRegistry, UnknownAdapter


class FakeBank:
    """Records loads and unloads; fails to load adapters whose config says so."""

    def __init__(self):
        self.loaded, self.log, self.model = set(), [], None

    def load(self, name, folder):
        if "broken" in (folder / "adapter_config.json").read_text():
            raise ValueError(f"{folder}: does not fit")
        self.loaded.add(name)
        self.log.append(("load", name))

    def unload(self, name):
        self.loaded.remove(name)
        self.log.append(("unload", name))


def make_adapter(folder, config: str = "{}"):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(config)
    save_file({"x.lora_A.weight": torch.zeros(1, 2)}, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.fixture
def adapters(tmp_path):
    for name in ["a", "b", "c"]:
        make_adapter(tmp_path / "adapters" / name)
    return tmp_path / "adapters"


@pytest.mark.parametrize("name", ["../adapters/a", "/etc", "a/", "a/../b", "..", ".", "", "a\\b", "x\0"])
def test_names_with_paths_are_refused(adapters, name):
    with pytest.raises(UnknownAdapter, match="plain folder names|not found"):
        AdapterRegistry(FakeBank(), adapters, 2).folder(name)


def test_symlinks_out_of_the_folder_are_refused(adapters, tmp_path):
    outside = make_adapter(tmp_path / "outside")
    (adapters / "link").symlink_to(outside, target_is_directory=True)
    (adapters / "inside-link").symlink_to(adapters / "a", target_is_directory=True)
    make_adapter(adapters / "weights-link")
    (adapters / "weights-link" / "adapter_model.safetensors").unlink()
    (adapters / "weights-link" / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    registry = AdapterRegistry(FakeBank(), adapters, 2)
    for name in ["link", "weights-link"]:
        with pytest.raises(UnknownAdapter, match="leads outside the adapters folder"):
            registry.folder(name)
    assert registry.folder("inside-link") == adapters / "inside-link"
    assert registry.names() == ["a", "b", "c", "inside-link"]


def test_only_safetensors_folders_are_adapters(adapters):
    (adapters / "pickled").mkdir()
    (adapters / "pickled" / "adapter_config.json").write_text("{}")
    (adapters / "pickled" / "adapter_model.bin").write_bytes(b"pickle")
    (adapters / "notes.txt").write_text("not an adapter")
    registry = AdapterRegistry(FakeBank(), adapters, 2)
    with pytest.raises(UnknownAdapter, match="only safetensors"):
        registry.folder("pickled")
    assert registry.names() == ["a", "b", "c"]


def test_a_new_folder_appears_without_a_restart(adapters):
    registry = AdapterRegistry(FakeBank(), adapters, 2)
    assert registry.names() == ["a", "b", "c"]
    make_adapter(adapters / "d")
    assert registry.names() == ["a", "b", "c", "d"]
    assert registry.prepare({"d"}) == {}


def test_least_recently_used_adapter_not_in_the_batch_is_evicted(adapters):
    bank = FakeBank()
    registry = AdapterRegistry(bank, adapters, 2)
    registry.prepare({"a"})
    registry.prepare({"b"})
    registry.prepare({"a"})  # a is now the most recently used
    assert registry.loaded == ["b", "a"]
    registry.prepare({"c"})
    assert registry.loaded == ["a", "c"] and bank.loaded == {"a", "c"}
    registry.prepare({"b", "c"})  # the batch needs c: a goes although c is older
    assert sorted(registry.loaded) == ["b", "c"] and bank.log[-2:] == [("unload", "a"), ("load", "b")]
    with pytest.raises(ValueError, match="at most 2"):
        registry.prepare({"a", "b", "c"})


def test_changed_files_are_reloaded(adapters):
    bank = FakeBank()
    registry = AdapterRegistry(bank, adapters, 2)
    registry.prepare({"a"})
    registry.prepare({"a"})
    assert bank.log == [("load", "a")]
    weights = adapters / "a" / "adapter_model.safetensors"
    save_file({"x.lora_A.weight": torch.ones(1, 2)}, str(weights))
    os.utime(weights, ns=(time.time_ns() + 10**9,) * 2)
    registry.prepare({"a"})
    assert bank.log == [("load", "a"), ("unload", "a"), ("load", "a")]


def test_a_failed_load_is_reported_per_adapter(adapters):
    make_adapter(adapters / "bad", config='{"base_model_name_or_path": "broken"}')
    registry = AdapterRegistry(FakeBank(), adapters, 3)
    failures = registry.prepare({"a", "bad", "gone"})
    assert set(failures) == {"bad", "gone"}
    assert isinstance(failures["bad"], AdapterLoadError) and "does not fit" in str(failures["bad"])
    assert isinstance(failures["gone"], UnknownAdapter)
    assert registry.loaded == ["a"]


class FakeRow:
    """A row that ends with its first token."""

    def __init__(self, request):
        self.request, self.finish_reason = request, "length"

    def result(self):
        return GenerationResult([5], "hi", "length", 1)


class FakeBatch:
    """A RunningBatch whose rows end as they join; `joined` records who joined together."""

    def __init__(self, joined: list):
        self.rows, self.joined = [], joined

    def join(self, requests):
        self.joined.append([r.adapter for r in requests])
        return [(FakeRow(r), "hi") for r in requests]

    def leave(self, rows):
        pass

    def step(self):
        return []


def test_batches_hold_no_more_adapters_than_can_be_loaded(adapters, monkeypatch):
    batches = []
    monkeypatch.setattr(batcher_module, "RunningBatch", lambda *args: FakeBatch(batches))
    monkeypatch.setattr(batcher_module, "check_request", lambda request, model: None)
    batcher = Batcher(AdapterRegistry(FakeBank(), adapters, 2), tokenizer=None, max_batch_size=8, window_s=0.2)

    async def run():
        jobs = [batcher.submit(GenerationRequest([1], adapter=a), stream=(a == "a"))
                for a in ["a", None, "b", "c", "a", "c", "gone"]]
        return [[await job.events.get() for _ in range(2 if job.stream else 1)] for job in jobs]

    batcher.start()
    try:
        events = asyncio.run(run())
    finally:
        batcher.stop()
    assert [b for b in batches if b] == [["a", None, "b", "a"], ["c", "c"]]
    assert events[0][0] == ("text", "hi") and events[0][1][0] == "done"
    assert events[1][0][0] == "done"
    assert events[-1][0][0] == "error" and isinstance(events[-1][0][1], UnknownAdapter)


def test_a_bug_fails_its_requests_and_the_worker_goes_on(adapters, monkeypatch):
    calls = []

    def buggy_check(request, model):
        calls.append(request)
        if len(calls) == 1:
            raise RuntimeError("a bug")

    monkeypatch.setattr(batcher_module, "check_request", buggy_check)
    monkeypatch.setattr(batcher_module, "RunningBatch", lambda *args: FakeBatch([]))
    batcher = Batcher(AdapterRegistry(FakeBank(), adapters, 2), tokenizer=None, window_s=0)

    async def ask():
        return await batcher.submit(GenerationRequest([1], adapter="a")).events.get()

    batcher.start()
    try:
        first, second = asyncio.run(ask()), asyncio.run(ask())
    finally:
        batcher.stop()
    assert first[0] == "error" and str(first[1]) == "a bug" and second[0] == "done"


def test_adapters_of_running_rows_are_never_evicted(adapters):
    bank = FakeBank()
    registry = AdapterRegistry(bank, adapters, 2)
    registry.prepare({"a"})
    registry.prepare({"b"})
    registry.prepare({"c"}, busy={"a"})  # a is older, but rows run with it: b goes
    assert registry.loaded == ["a", "c"] and bank.log[-2:] == [("unload", "b"), ("load", "c")]
    with pytest.raises(ValueError, match="at most 2"):
        registry.prepare({"b"}, busy={"a", "c"})


def test_unreadable_names_are_not_found(adapters):
    make_adapter(adapters / "looped")
    (adapters / "looped" / "adapter_config.json").unlink()
    (adapters / "looped" / "adapter_config.json").symlink_to(adapters / "looped" / "adapter_config.json")
    registry = AdapterRegistry(FakeBank(), adapters, 2)
    for name in ["looped", "n" * 300]:  # a symlink loop; a name too long for the file system
        with pytest.raises(UnknownAdapter, match="not found"):
            registry.folder(name)
    assert registry.names() == ["a", "b", "c"]
