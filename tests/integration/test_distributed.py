"""`lorakit train` beyond one process: DDP and FSDP2 under torchrun (gloo on the CPU) against one process.

Every multi-process run takes the same global batch as the one-process reference (4 examples a step), in fp32
(--bf16 false: under bf16 the two ways of summing a batch round differently) with dropout 0, so the adapters
agree to float rounding. 26 training rows leave a last global batch of 2: one rank gets no examples there and
still joins the collectives.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from helpers import adapter_weights, alpaca_rows, assert_same_weights, quick_args, write_jsonl
from lorakit.train import distributed, fsdp
from lorakit.train.args import parse_train_args
from lorakit.train.resume import check_same_trajectory

CPU = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}  # gloo on the CPU, also on a GPU machine
COMMON = dict(lora_dropout=0, max_steps=-1, num_train_epochs=1, save_steps=3, val_split_ratio=0.2, bf16="false")


def train(model: str, data: str, out, processes: int = 1, *extra: str, **flags) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    done = subprocess.run([sys.executable, *(launcher if processes > 1 else []), "-m", "lorakit", "train",
                           *quick_args(model, data, out, **{**COMMON, **flags}), *extra],
                          capture_output=True, text=True, timeout=600, env=CPU)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return done


@pytest.fixture(scope="module")
def setup(tiny_lm_dir, tmp_path_factory):
    """(model, data, folder, the one-process reference run's folder)."""
    root = tmp_path_factory.mktemp("distributed")
    data = write_jsonl(root / "rows.jsonl", alpaca_rows(32))  # 26 train / 6 eval
    train(tiny_lm_dir, data, root / "one", per_device_train_batch_size=4)
    return tiny_lm_dir, data, root, root / "one"


def eval_loss(folder) -> float:
    return json.loads((folder / "final_metrics.json").read_text())["eval_loss"]


@pytest.mark.slow
def test_ddp_with_accumulation_matches_one_process(setup):
    """DDP, 2 ranks x 1 example x 2 micro-batches (no_sync on the first) = 1 rank x 4 examples."""
    model, data, root, one = setup
    done = train(model, data, root / "ddp", 2, per_device_train_batch_size=1, gradient_accumulation_steps=2)
    assert "data parallel (DDP)" in done.stdout and done.stdout.count("done:") == 1
    assert_same_weights(adapter_weights(root / "ddp"), adapter_weights(one), atol=1e-5)
    assert eval_loss(root / "ddp") == pytest.approx(eval_loss(one), rel=1e-5)


@pytest.mark.slow
def test_fsdp_lora_matches_one_process_and_shards_the_parameters(setup):
    model, data, root, one = setup
    done = train(model, data, root / "fsdp", 2, "--fsdp", per_device_train_batch_size=2)
    assert_same_weights(adapter_weights(root / "fsdp"), adapter_weights(one), atol=1e-5)
    assert eval_loss(root / "fsdp") == pytest.approx(eval_loss(one), rel=1e-5)
    shares, whole = re.search(r"FSDP2: parameter bytes per rank \[([\d ]+)\] of (\d+)", done.stdout).groups()
    shares = [int(s) for s in shares.split()]
    print(f"FSDP2, 2 ranks: parameter bytes per rank {shares} of {whole}")
    assert len(shares) == 2 and all(abs(s - int(whole) / 2) <= 0.05 * int(whole) for s in shares)
    checkpoint = root / "fsdp" / "checkpoint-3"
    assert (checkpoint / ".metadata").is_file() and (checkpoint / "__1_0.distcp").is_file()
    assert adapter_weights(checkpoint).keys() == adapter_weights(one).keys()  # the PEFT adapter, gathered
    assert not list(root.joinpath("fsdp").glob(".checkpoint-*"))  # temporary folders renamed


@pytest.mark.slow
def test_fsdp_checkpoint_saved_on_two_ranks_resumes_on_one(setup):
    model, data, root, _ = setup
    if not (root / "fsdp" / "checkpoint-3").is_dir():
        train(model, data, root / "fsdp", 2, "--fsdp", per_device_train_batch_size=2)
    done = train(model, data, root / "resumed", 1, "--fsdp", "full_shard auto_wrap", per_device_train_batch_size=4,
                 resume=str(root / "fsdp" / "checkpoint-3"))
    assert "resumed from" in done.stdout and "at step 3 of 7" in done.stdout
    assert_same_weights(adapter_weights(root / "resumed"), adapter_weights(root / "fsdp"), atol=1e-5)


@pytest.mark.slow
def test_fsdp_full_fine_tuning_with_gradient_checkpointing_trains(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    model, data, root, _ = setup
    out = tmp_path / "full"
    train(model, data, out, 2, "--fsdp", per_device_train_batch_size=2, train_type="full", learning_rate=1e-3,
          gradient_checkpointing="true")
    metrics = json.loads((out / "final_metrics.json").read_text())
    assert metrics["eval_loss"] < metrics["before_eval_loss"]
    base, tuned = AutoModelForCausalLM.from_pretrained(model), AutoModelForCausalLM.from_pretrained(out)
    assert base.state_dict().keys() == tuned.state_dict().keys()
    assert not torch.equal(base.model.layers[0].mlp.up_proj.weight, tuned.model.layers[0].mlp.up_proj.weight)


# --- bad setups, each refused with what would work -------------------------------------------------


def test_more_processes_than_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match=r"more processes per node than the 1 visible GPU"):
        distributed.setup()


def test_fsdp_refuses_a_model_without_known_blocks():
    with pytest.raises(ValueError, match=r"names no block class.*without --fsdp"):
        fsdp.transformer_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)))


def test_fsdp_finds_the_decoder_blocks(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    assert fsdp.transformer_blocks(model) == list(model.model.layers)


@pytest.mark.parametrize("flags, value", [([], None), (["--fsdp"], "full_shard"),
                                          (["--fsdp", "full_shard"], "full_shard"),
                                          (["--fsdp", "full_shard auto_wrap"], "full_shard"),
                                          (["--fsdp", "false"], None)])
def test_fsdp_spellings(flags, value):
    assert parse_train_args(flags).fsdp == value


def test_fsdp_options_lorakit_lacks_are_refused():
    with pytest.raises(ValueError, match="hybrid_shard and offload are not implemented"):
        parse_train_args(["--fsdp", "hybrid_shard"])


def trajectory(per_device: int, processes: int, accumulation: int = 1) -> dict:
    return {"per_device_train_batch_size": per_device, "processes": processes,
            "gradient_accumulation_steps": accumulation, "global_batch_size": per_device * processes * accumulation}


def test_resume_on_another_process_count_keeps_the_global_batch(tmp_path):
    check_same_trajectory(trajectory(2, 2), trajectory(4, 1), tmp_path)  # 2 x 2 -> 4 x 1: the same steps
    check_same_trajectory(trajectory(1, 2, 2), trajectory(2, 2), tmp_path)
    with pytest.raises(ValueError, match=r"global batch: 4 in the checkpoint .* 6 now .*cannot be split over 3 "
                                         r"processes; use a process count that divides 4"):
        check_same_trajectory(trajectory(2, 2), trajectory(2, 3), tmp_path)
    with pytest.raises(ValueError, match=r"with 1 processes, give --per_device_train_batch_size x "
                                         r"--gradient_accumulation_steps = 4"):
        check_same_trajectory(trajectory(2, 2), trajectory(2, 1), tmp_path)
