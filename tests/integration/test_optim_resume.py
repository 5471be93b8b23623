"""Every `--optim` that runs on a CPU: a run killed after a checkpoint and resumed ends with the same
weights as a run that was never stopped, bit for bit (its optimiser state saved and loaded exactly)."""
import pytest
import torch
from safetensors.torch import load_file

from helpers import assert_same_weights, fail_at, quick_args
from lorakit.train import loop
from lorakit.train.args import parse_train_args

CPU_OPTIMS = ["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd",
              "adafactor"]


@pytest.mark.parametrize("optim", CPU_OPTIMS)
def test_a_killed_run_resumes_to_the_same_weights(optim, tiny_lm_dir, alpaca_file, tmp_path, monkeypatch, capsys):
    def flags(out):  # full fine-tuning: the embeddings (400 x 32) are big enough for 8-bit state
        return quick_args(tiny_lm_dir, alpaca_file, out, train_type="full", learning_rate=1e-3, optim=optim)

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    loop.train(parse_train_args(flags(straight)))
    fail_at(monkeypatch, 5, RuntimeError("killed"))  # in step 5, after checkpoint-4
    with pytest.raises(RuntimeError, match="killed"):
        loop.train(parse_train_args(flags(killed)))
    monkeypatch.undo()
    capsys.readouterr()
    loop.train(parse_train_args(flags(killed) + ["--resume"]))
    assert f"resumed from {killed / 'checkpoint-4'} at step 4" in capsys.readouterr().out
    assert_same_weights(load_file(killed / "model.safetensors"), load_file(straight / "model.safetensors"), atol=0)
    state = torch.load(killed / "checkpoint-4" / "optimizer.pt", weights_only=True)["state"]
    assert any("exp_avg_codes" in s for s in state.values()) == optim.endswith("8bit")
