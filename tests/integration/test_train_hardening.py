"""`lorakit train` on bad input: resume with other settings or another run, over-long examples, output
folders, missing extras, and the ms-swift flags users type."""
import json
import re
import sys

import pytest

from helpers import adapter_weights, alpaca_rows, assert_same_weights, fail_at, quick_args, write_jsonl
from lorakit.cli import main
from lorakit.train import loop
from lorakit.train.args import parse_train_args

# --- resume ---------------------------------------------------------------------------------------


def test_resume_names_every_setting_that_changes_the_run(tiny_lm_dir, alpaca_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *quick_args(tiny_lm_dir, alpaca_file, out, max_steps=4, lora_dropout=0.1)]) == 0
    changed = quick_args(tiny_lm_dir, alpaca_file, out, max_steps=4, lora_dropout=0.2, weight_decay=0.1)
    capsys.readouterr()
    assert main(["train", *changed, "--use_rslora", "--resume"]) == 2
    err = capsys.readouterr().err
    for expected in ("--lora_dropout: 0.1 in the checkpoint, 0.2 now", "--weight_decay: 0.0 in the checkpoint, 0.1 now",
                     "--use_rslora: False in the checkpoint, True now"):
        assert expected in err
    assert err.count("\n") == 1  # one line, no traceback
    rows = alpaca_rows()
    rows[3]["output"] = "changed"
    write_jsonl(tmp_path / "alpaca.jsonl", rows)  # same path, other content
    assert main(["train", *quick_args(tiny_lm_dir, alpaca_file, out, max_steps=4, lora_dropout=0.1), "--resume"]) == 2
    assert "the data (token ids" in capsys.readouterr().err


def test_resume_accepts_other_bookkeeping(tiny_lm_dir, alpaca_file, tmp_path, capsys):
    out = tmp_path / "run"
    loop.train(parse_train_args(quick_args(tiny_lm_dir, alpaca_file, out, max_steps=4)))
    flags = quick_args(tiny_lm_dir, alpaca_file, out, max_steps=4, logging_steps=3, save_steps=1, save_total_limit=1)
    loop.train(parse_train_args(flags + ["--resume", "--gradient_checkpointing"]))
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in capsys.readouterr().out


def test_resume_never_takes_another_runs_checkpoint(tiny_lm_dir, alpaca_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "reused"
    loop.train(parse_train_args(quick_args(tiny_lm_dir, alpaca_file, out, max_steps=6)))  # run A: 2, 4
    again = quick_args(tiny_lm_dir, alpaca_file, out, max_steps=6, save_total_limit=1)
    fail_at(monkeypatch, 2, RuntimeError("crash"))  # run B dies in step 2, no checkpoint
    with pytest.raises(RuntimeError):
        loop.train(parse_train_args(again + ["--overwrite"]))
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"saved no checkpoint; checkpoint-2, checkpoint-4 belong to an earlier run"):
        loop.train(parse_train_args(again + ["--resume"]))
    with pytest.raises(ValueError, match=r"checkpoint-4 belongs to run \w+, but .* last used by run \w+"):
        loop.train(parse_train_args(again + ["--resume", str(out / "checkpoint-4")]))
    fail_at(monkeypatch, 2, KeyboardInterrupt())  # run C: Ctrl-C in step 2 saves checkpoint-1
    with pytest.raises(KeyboardInterrupt):
        loop.train(parse_train_args(again + ["--overwrite", "--save_steps", "100"]))
    monkeypatch.undo()
    capsys.readouterr()
    loop.train(parse_train_args(again + ["--resume", "--save_steps", "5"]))
    assert f"resumed from {out / 'checkpoint-1'} at step 1" in capsys.readouterr().out
    # C's rotation (limit 1) removed its checkpoint-1 and none of A's
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "event" not in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # C's log alone, not appended to A's


def test_a_new_run_in_a_reused_folder_logs_alone(tiny_lm_dir, alpaca_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "reused"
    for steps, more in ((4, []), (2, ["--overwrite"])):
        loop.train(parse_train_args(quick_args(tiny_lm_dir, alpaca_file, out, max_steps=steps,
                                               report_to="tensorboard") + more))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "event" not in r] == [1, 2]


def test_resume_into_a_new_folder(tiny_lm_dir, alpaca_file, tmp_path):
    expected = tmp_path / "straight"
    loop.train(parse_train_args(quick_args(tiny_lm_dir, alpaca_file, expected, max_steps=4)))
    moved = tmp_path / "moved"
    loop.train(parse_train_args(quick_args(tiny_lm_dir, alpaca_file, moved, max_steps=4)
                                + ["--resume", str(expected / "checkpoint-2")]))
    assert_same_weights(adapter_weights(moved), adapter_weights(expected))


# --- examples longer than the model's positions -------------------------------------------------------

def test_max_length_is_clamped_to_the_models_positions(tiny_gpt2_dir, tmp_path, capsys):
    rows = [{"instruction": f"Add {i} and {i}.", "output": "word " * 300} for i in range(4)]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    out = tmp_path / "o"
    flags = quick_args(tiny_gpt2_dir, data, out, max_steps=2, save_steps=100)
    flags.remove("--val_split_ratio")
    flags.remove("0")
    assert main(["train", *flags]) == 0  # default --max_length 2048
    stdout = capsys.readouterr().out
    assert stdout.count("--max_length 2048 is more than the model's 256 positions (n_positions); using 256") == 1
    assert stdout.index("using 256") < stdout.index("data:")
    assert "max_length: 256" in (out / "run_config.yaml").read_text()


# --- output folder, checked before anything loads ------------------------------------------------------

@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("loaded the tokenizer before checking output_dir")

    monkeypatch.setattr(loop, "load_tokenizer", refuse)


def test_output_dir_that_is_a_file(tiny_lm_dir, alpaca_file, tmp_path, capsys, no_loading):
    (tmp_path / "a-file").write_text("x")
    assert main(["train", *quick_args(tiny_lm_dir, alpaca_file, tmp_path / "a-file")]) == 2
    assert f"--output_dir {tmp_path / 'a-file'} is a file" in capsys.readouterr().err


def test_output_dir_that_cannot_be_written(tiny_lm_dir, alpaca_file, tmp_path, capsys, no_loading):
    (tmp_path / "a-file").write_text("x")
    assert main(["train", *quick_args(tiny_lm_dir, alpaca_file, tmp_path / "a-file" / "out")]) == 2
    assert f"--output_dir {tmp_path / 'a-file' / 'out'} cannot be written" in capsys.readouterr().err


# --- missing optional packages -------------------------------------------------------------------------

def test_training_without_tensorboard_logs_jsonl_and_says_so(tiny_lm_dir, alpaca_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "o"
    assert main(["train", *quick_args(tiny_lm_dir, alpaca_file, out, max_steps=2, report_to="tensorboard")]) == 0
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("TensorBoard") == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if "train_loss" in r]) == 2 and not (out / "tensorboard").exists()


@pytest.mark.parametrize("verb, module", [("train", "yaml"), ("train", "matplotlib"), ("train", "datasets"),
                                          ("train", "tqdm"), ("infer", "transformers")])
def test_a_missing_train_extra_names_the_install_command(verb, module, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)
    assert main([verb, "--help"]) == 2
    err = capsys.readouterr().err
    assert module in err and 'pip install "lorakit[train]"' in err and err.count("\n") == 1


# --- ms-swift's flags ------------------------------------------------------------------------------------

SWIFT_QUICK_START = (
    "--model Qwen/Qwen2.5-7B-Instruct --tuner_type lora --dataset {zh}#500 {en}#500 {me}#500 "
    "--torch_dtype bfloat16 --num_train_epochs 1 --per_device_train_batch_size 1 --per_device_eval_batch_size 1 "
    "--learning_rate 1e-4 --lora_rank 8 --lora_alpha 32 --target_modules all-linear "
    "--gradient_accumulation_steps 16 --eval_steps 50 --save_steps 50 --save_total_limit 2 --logging_steps 5 "
    "--max_length 2048 --output_dir output --system SYSTEM --warmup_ratio 0.05 --dataloader_num_workers 4 "
    "--model_author swift --model_name swift-robot")


def swift_quick_start(tmp_path) -> list[str]:
    files = {name: write_jsonl(tmp_path / f"{name}.jsonl", alpaca_rows(24)) for name in ("zh", "en", "me")}
    argv = SWIFT_QUICK_START.format(**files).split()
    argv[argv.index("SYSTEM")] = "You are a helpful assistant."
    return argv


def test_ms_swift_quick_start_parses(tmp_path, capsys):
    args = parse_train_args(swift_quick_start(tmp_path))
    assert args.train_type == "lora" and args.system == "You are a helpful assistant."
    assert args.dataset == [f"{tmp_path / name}.jsonl#500" for name in ("zh", "en", "me")]
    assert (args.gradient_accumulation_steps, args.torch_dtype, args.target_modules) == (16, "bfloat16", ["all-linear"])
    err = capsys.readouterr().err
    for flag in ("--dataloader_num_workers", "--model_author", "--model_name"):
        assert f"note: {flag} is ignored" in err


def test_ms_swift_quick_start_trains_with_a_local_model(tiny_lm_dir, tmp_path, capsys):
    argv = swift_quick_start(tmp_path)
    argv[argv.index("Qwen/Qwen2.5-7B-Instruct")] = tiny_lm_dir
    argv[argv.index("output")] = str(tmp_path / "output")
    assert main(["train", *argv, "--max_steps", "2", "--report_to", "none"]) == 0
    assert "1494 train / 6 eval examples" in capsys.readouterr().out  # per dataset: 2 of 24 held out, 498 sampled


@pytest.mark.parametrize("alias, value, field, expected", [
    ("--tuner_type", "dora", "train_type", "dora"),
    ("--lora_target_modules", "q_proj v_proj", "target_modules", ["q_proj", "v_proj"]),
    ("--lora-target-modules", "q_proj", "target_modules", ["q_proj"]),
    ("--split_dataset_ratio", "0.2", "val_split_ratio", 0.2),
    ("--lorap_lr_ratio", "16", "loraplus_lr_ratio", 16.0),
    ("--use_dora", "true", "use_dora", True),
    ("--system", "Be brief.", "system", "Be brief."),
])
def test_ms_swift_spellings(alias, value, field, expected, tmp_path):
    args = parse_train_args([alias, *(value.split(" ") if field == "target_modules" else [value])])
    assert getattr(args, field) == expected
    config = tmp_path / "run.yaml"
    config.write_text(f"{alias.lstrip('-')}: {json.dumps(expected)}\n")
    assert getattr(parse_train_args(["--config", str(config)]), field) == expected


def test_use_dora_trains_dora(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    from lorakit.train.model import lora_config, prepare_model

    assert lora_config(parse_train_args(["--use_dora"]), "causal_lm").use_dora
    model = prepare_model(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), parse_train_args(["--use_dora"]),
                          "causal_lm")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in trainable)  # the DoRA magnitudes are among what trains
    assert parse_train_args(["--train_type", "qlora", "--use_dora"]).quantize
    with pytest.raises(ValueError, match="--use_dora needs --train_type lora"):
        parse_train_args(["--train_type", "full", "--use_dora"])


@pytest.mark.parametrize("argv, message", [
    (["--deepspeed", "zero2"], r"^lorakit train: error: --deepspeed: lorakit has no DeepSpeed"),
    (["--packing", "true"], r"^lorakit train: error: --packing: sequence packing is not implemented"),
    (["--lora_rnak", "8"], r"^lorakit train: error: unknown flag --lora_rnak \(did you mean --lora_rank\?\)"),
    (["--lr", "1e-4"], r"^lorakit train: error: unknown flag --lr"),  # no silent abbreviation
    (["--train_type", "adalora"], r"^lorakit train: error: argument --train_type.*invalid choice: 'adalora'"),
])
def test_flags_that_make_no_sense_are_refused_in_one_line(argv, message, capsys):
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1 and "usage:" not in err


def test_a_non_utf8_config_file_is_named(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_bytes(b"lora_rank: 4\nsystem: caf\xe9\n")
    with pytest.raises(ValueError, match=r"run.yaml:2: not UTF-8"):
        parse_train_args(["--config", str(config)])


def test_a_bf16_base_without_autocast_trains_a_module_to_save(tiny_lm_dir, alpaca_file, tmp_path):
    """--torch_dtype bfloat16 --bf16 false: the frozen base computes in bf16, the trained embedding copy in fp32."""
    flags = quick_args(tiny_lm_dir, alpaca_file, tmp_path / "out", max_steps=2, bf16="false", torch_dtype="bfloat16")
    assert main(["train", *flags, "--modules_to_save", "embed_tokens"]) == 0
    saved = adapter_weights(tmp_path / "out")
    assert any("embed_tokens" in key for key in saved)
