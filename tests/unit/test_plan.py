"""`lorakit plan`: stored bytes equal exact counts on real tiny models, the predicted peak is within 10% of the
measured one (live tensor bytes on CPU), and the CLI's answers and errors."""
import json

import pytest
import torch

from helpers import VLM_SPECIALS, build_model, build_vlm
from live_bytes import Cell, measure_step
from lorakit.cli import main
from lorakit.cli.plan import parse_memory
from lorakit.plan.estimate import Recipe, estimate, nf4_bytes, optimizer_state, trainable_tensors, weights
from lorakit.plan.shape import read_shape, shape_from_config
from lorakit.quant.nf4 import quantize_nf4

LLAMA = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def tiny_shape():
    return shape_from_config({"model_type": "llama", **LLAMA, "tie_word_embeddings": False})


def test_frozen_weights_equal_the_model_parameters():
    model = build_model("llama")
    assert weights(tiny_shape(), Recipe(bf16=False))["frozen"] == sum(p.numel() * 4 for p in model.parameters())


@pytest.mark.parametrize("train_type, targets", [("lora", ("all-linear",)), ("dora", ("q_proj", "v_proj"))])
def test_adapter_bytes_and_adam_state_equal_a_real_adapter(train_type, targets):
    import lorakit

    config = lorakit.LoraConfig(r=4, target_modules=list(targets) if targets != ("all-linear",) else "all-linear",
                                use_dora=train_type == "dora")
    model = lorakit.get_peft_model(build_model("llama"), config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    recipe = Recipe(train_type=train_type, targets=targets, rank=4, bf16=False)
    assert weights(tiny_shape(), recipe)["trainable"] == sum(p.numel() * 4 for p in trainable)
    optimizer = torch.optim.AdamW(trainable)
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for k, t in s.items() if k != "step")
    assert optimizer_state(trainable_tensors(tiny_shape(), recipe), "adamw_torch") == state


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "qwen2_5_vl"])
def test_vision_tower_and_connector_are_counted_within_ten_percent(arch):
    model = build_vlm(arch, {token: 50 + k for k, token in enumerate(VLM_SPECIALS["llava"] + VLM_SPECIALS[arch])}, 96)
    parts = [getattr(model.model, name) for name in ("visual", "vision_tower", "multi_modal_projector")
             if hasattr(model.model, name)]
    real = sum(p.numel() for part in parts for p in part.parameters())
    planned = shape_from_config(json.loads(model.config.to_json_string())).vision_params
    assert abs(planned - real) <= 0.1 * real


def test_nf4_bytes_equal_lorakit_quant():
    q = quantize_nf4(torch.randn(96, 200))
    stored = sum(t.numel() * t.element_size() for t in (q.data, q.absmax, q.nested_absmax, q.nested_code))
    assert nf4_bytes(96 * 200) == stored


@pytest.mark.parametrize("cell", [
    Cell(seq=128, hidden=128, intermediate=256, vocab=1000),
    Cell(seq=96, batch=2, train_type="qlora", hidden=128, intermediate=256, vocab=1000),
    Cell(seq=128, train_type="full", optim="sgd", hidden=128, intermediate=256, vocab=1000),
], ids=["lora", "qlora-batch2", "full-sgd"])
def test_predicted_peak_is_within_ten_percent_of_the_measured(cell):
    shape = shape_from_config(cell.config_json())
    recipe = Recipe(train_type=cell.train_type, quantize=cell.train_type == "qlora", targets=cell.targets,
                    rank=cell.rank, dropout=cell.dropout, bf16=cell.bf16, batch=cell.batch, seq=cell.seq,
                    optim=cell.optim)
    predicted, measured = estimate(shape, recipe).peak_bytes, measure_step(cell)
    assert abs(predicted / measured - 1) < 0.10, (predicted, measured)


def test_cli_says_whether_it_fits_and_what_would(capsys):
    flags = ["plan", "--model", "Qwen/Qwen3-8B", "--lora_rank", "64", "--max_length", "4096",
             "--per_device_train_batch_size", "1"]
    assert main([*flags, "--gpu_memory", "24GiB"]) == 1
    out = capsys.readouterr().out
    assert "does not fit in 24.00 GiB" in out and "--gradient_checkpointing true" in out
    assert main([*flags, "--gpu_memory", "141GB"]) == 0
    assert "fits in 141.00 GiB" in capsys.readouterr().out


def test_json_has_the_peak(capsys):
    assert main(["plan", "--model", "google/gemma-2-2b", "--max_length", "1024", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["peak_bytes"] == max(report["timeline_bytes"].values()) and report["fits"] is None


def test_a_config_json_path_works(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **LLAMA}))
    assert main(["plan", "--model", str(tmp_path), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["model_type"] == "llama" and "warning" not in captured.err


def test_a_family_without_measured_terms_is_planned_with_a_warning(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon_like", **LLAMA}))
    assert main(["plan", "--model", str(tmp_path), "--json"]) == 0
    assert "no measured terms for falcon_like models" in capsys.readouterr().err


def test_known_ids_work_offline_and_unknown_ones_say_what_to_pass(capsys):
    assert read_shape("meta-llama/Llama-3.1-8B").layers == 32
    assert main(["plan", "--model", "nobody/no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "no config.json for 'nobody/no-such-model'" in err and "config.json" in err


@pytest.mark.parametrize("text, value", [("24GiB", 24 << 30), ("24GB", 24 << 30), ("80G", 80 << 30),
                                         ("512MiB", 512 << 20), ("1000", 1000)])
def test_gpu_memory_sizes(text, value):
    assert parse_memory(text) == value


@pytest.mark.parametrize("text", ["24 gigs", "3XB", "GB", "0"])
def test_bad_gpu_memory_is_a_clear_error(text, capsys):
    assert main(["plan", "--model", "Qwen/Qwen3-8B", "--gpu_memory", text]) == 2
    assert "expected a size such as 24GiB" in capsys.readouterr().err


def test_plan_knows_every_optimiser_train_accepts():
    import typing

    from lorakit.plan.estimate import OPTIMIZERS
    from lorakit.train.args import TrainArgs

    assert set(OPTIMIZERS) == set(typing.get_args(typing.get_type_hints(TrainArgs)["optim"]))
