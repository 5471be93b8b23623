"""lorakit.io.files: whole files or none, with the mode the user's umask gives; lorakit.io.weights: a
checkpoint's tensors read back."""
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from lorakit.io import files


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_safetensors_and_text_get_the_umask_mode(tmp_path, umask_027):
    files.save_safetensors({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    files.write_text(tmp_path / "a.json", "{}")
    assert mode(tmp_path / "a.safetensors") == mode(tmp_path / "a.json") == 0o640
    assert torch.equal(load_file(tmp_path / "a.safetensors")["w"], torch.ones(2))


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "config.json"
    files.write_text(target, "old")

    def failing(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.atomic_write(target, failing)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["config.json"]


def test_a_saved_4bit_model_gets_the_umask_mode(tmp_path, umask_027):
    from helpers import build_model
    from lorakit.io.checkpoint4bit import save_nf4
    from lorakit.quant.linear4bit import quantize_linears

    model = build_model("llama")
    quantize_linears(model, skip={"lm_head"})
    save_nf4(model, str(tmp_path / "nf4"))
    assert {mode(p) for p in (tmp_path / "nf4").iterdir()} == {0o640}


def test_a_training_checkpoint_gets_the_umask_mode(tmp_path, umask_027):
    from lorakit.train.checkpoints import save_checkpoint

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    folder = save_checkpoint(tmp_path, 2, model, optimizer, scheduler, [], {"run_id": "r"})
    assert {p.name: mode(p) for p in folder.iterdir()}["trainable.safetensors"] == 0o640
    assert {mode(p) for p in folder.iterdir()} == {0o640}


def test_a_checkpoint_reads_each_tensor_as_saved_without_mapping_the_file(tmp_path):
    from safetensors.torch import save_file

    from lorakit.io.weights import Checkpoint

    saved = {"w": torch.randn(3, 4), "half": torch.randn(5).bfloat16(), "mask": torch.tensor([True, False]),
             "none": torch.empty(0, 3), "scalar": torch.tensor(3.5), "codes": torch.arange(7, dtype=torch.uint8)}
    save_file(saved, tmp_path / "model.safetensors", metadata={"format": "pt"})
    checkpoint = Checkpoint(tmp_path)
    assert [key for key, _ in checkpoint.items()] == sorted(saved)
    for key, tensor in saved.items():
        read = checkpoint.tensor(key)
        assert read.dtype == tensor.dtype and torch.equal(read, tensor) and checkpoint.shape(key) == tensor.shape
    checkpoint.tensor("codes").add_(1)  # its own memory, writable: not a view of the file
    assert torch.equal(checkpoint.tensor("codes"), saved["codes"])
    (tmp_path / "model.safetensors").write_bytes(b"\x05")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        Checkpoint(tmp_path)
