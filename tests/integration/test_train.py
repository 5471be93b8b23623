"""`lorakit train`: the swift-style command, config files, checkpoints and resume, errors, DDP."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
import yaml

from helpers import (
    SENTIMENT,
    adapter_weights,
    alpaca_rows,
    assert_same_weights,
    fail_at,
    quick_args,
    save_tiny_bert_classifier,
    write_jsonl,
)
from lorakit.cli import main
from lorakit.train import distributed, loop
from lorakit.train.args import TrainArgs, parse_train_args


def test_swift_style_command_writes_an_adapter_peft_loads(tiny_lm_dir, alpaca_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "output_lora"
    assert main(["train", "--model", tiny_lm_dir, "--train_type", "lora", "--lora_rank", "8",
                 "--lora_alpha", "16", "--lora_dropout", "0.05", "--dataset", alpaca_file,
                 "--output_dir", str(out), "--max_steps", "4", "--learning_rate", "1e-2",
                 "--report_to", "none"]) == 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "run_config.yaml", "metrics.jsonl",
                 "final_metrics.json", "loss_curve.png", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["peft_type"] == "LORA"
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, str(out)).eval()
    after = tuned(ids).logits
    assert not torch.allclose(before, after)  # the adapter learned something and PEFT applies it
    import lorakit

    ours = lorakit.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), str(out))
    torch.testing.assert_close(ours(ids).logits, after)


def test_hyphenated_flags_and_yaml_config_parse_the_same(tmp_path):
    underscored = parse_train_args(["--lora_rank", "64", "--lora_alpha", "128", "--num_train_epochs", "2",
                                    "--target_modules", "q_proj", "v_proj", "--use_rslora"])
    hyphenated = parse_train_args(["--lora-rank", "64", "--lora-alpha", "128", "--num-train-epochs", "2",
                                   "--target-modules", "q_proj", "v_proj", "--use-rslora", "true"])
    assert underscored == hyphenated
    config = tmp_path / "run.yaml"
    config.write_text("lora_rank: 64\nlora-alpha: 128\nnum_train_epochs: 2\ntarget_modules: [q_proj, v_proj]\n"
                      "use_rslora: true\n")
    assert parse_train_args(["--config", str(config)]) == underscored
    overridden = parse_train_args(["--config", str(config), "--lora_rank", "16"])
    assert overridden.lora_rank == 16 and overridden.lora_alpha == 128


def test_run_config_round_trips_as_a_yaml_config(tiny_lm_dir, alpaca_file, tmp_path):
    out = tmp_path / "run"
    assert main(["train", *quick_args(tiny_lm_dir, alpaca_file, out, max_steps=1)]) == 0
    again = parse_train_args(["--config", str(out / "run_config.yaml")])
    assert again.lora_rank == 4 and again.task_type == "causal_lm" and again.learning_rate == 1e-2


@pytest.mark.parametrize("text, message", [
    ("lora_rnk: 4\n", r"unknown keys \['lora_rnk'\]"),
    ("- a\n- b\n", "expected a mapping"),
    ("a: [\n", "not valid YAML"),
])
def test_bad_yaml_configs(tmp_path, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(ValueError, match=message):
        parse_train_args(["--config", str(config)])


def test_bad_flag_values_are_named():
    with pytest.raises(ValueError, match="--lora_rank must be >= 1, got 0"):
        TrainArgs(lora_rank=0)
    with pytest.raises(ValueError, match=r"--adam_beta2 must be in \[0, 1\), got 1.5"):
        parse_train_args(["--adam_beta2", "1.5"])
    with pytest.raises(ValueError, match=r"--train_type.*invalid choice: 'qlorax' \(choose from"):
        parse_train_args(["--train_type", "qlorax"])


def test_the_run_logs_its_peak_memory_beside_the_plan(tiny_lm_dir, alpaca_file, tmp_path, capsys):
    out = tmp_path / "m"
    loop.train(parse_train_args(quick_args(tiny_lm_dir, alpaca_file, out, max_steps=2)))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    memory = [r for r in records if r.get("event") == "memory"]
    assert len(memory) == 1 and memory[0]["step"] == 2 and "plan_error" not in memory[0], memory
    assert memory[0]["predicted_peak_bytes"] > 0 and memory[0]["measured_peak_bytes"] > 0
    assert memory[0]["device"] == "cpu" and memory[0]["measure"].startswith("VmHWM (process RSS, an upper bound")
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("memory: planned ") and ", measured " in last and "VmHWM" in last


def test_a_model_the_planner_does_not_know_logs_why_and_trains(tmp_path, capsys):
    folder = save_tiny_bert_classifier(tmp_path / "bert")
    data = write_jsonl(tmp_path / "cls.jsonl", [{"text": t, "label": label} for t, label in SENTIMENT])
    loop.train(parse_train_args(quick_args(folder, data, tmp_path / "o", max_steps=1)))
    memory = [r for r in map(json.loads, (tmp_path / "o" / "metrics.jsonl").read_text().splitlines())
              if r.get("event") == "memory"][0]
    assert memory["predicted_peak_bytes"] is None and memory["measured_peak_bytes"] > 0
    assert "not sequence classification" in memory["plan_error"]
    assert "memory: not planned (lorakit plan predicts causal-LM training" in capsys.readouterr().out


def test_trains_the_response_loss_down(tiny_lm_dir, alpaca_file, tmp_path):
    result = loop.train(parse_train_args(quick_args(tiny_lm_dir, alpaca_file, tmp_path / "r", max_steps=20,
                                                    val_split_ratio=0.25, learning_rate=3e-2)))
    assert result["eval_loss"] < 0.8 * result["before_eval_loss"]
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == list(range(1, 21))


@pytest.mark.parametrize("train_type", ["dora", "full"])
def test_dora_and_full_fine_tuning(tiny_lm_dir, alpaca_file, tmp_path, train_type):
    out = tmp_path / train_type
    assert main(["train", *quick_args(tiny_lm_dir, alpaca_file, out, train_type=train_type, max_steps=2)]) == 0
    if train_type == "dora":
        assert any("lora_magnitude_vector" in k for k in adapter_weights(out))
    else:
        from transformers import AutoModelForCausalLM

        tuned = AutoModelForCausalLM.from_pretrained(str(out))
        base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
        assert not torch.equal(tuned.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


def test_qlora_run_writes_an_adapter_peft_loads_on_the_unquantised_base(tiny_lm_dir, alpaca_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "qlora"
    result = loop.train(parse_train_args(quick_args(tiny_lm_dir, alpaca_file, out, train_type="qlora", max_steps=20,
                                                    learning_rate=3e-2, val_split_ratio=0.25)))
    assert result["eval_loss"] < 0.8 * result["before_eval_loss"]
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, str(out)).eval()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_lm_dir
    assert not torch.allclose(tuned(ids).logits, before)
    swift_style = tmp_path / "lora-4bit"
    loop.train(parse_train_args(quick_args(tiny_lm_dir, alpaca_file, swift_style, train_type="lora", quant_bits=4,
                                           max_steps=20, learning_rate=3e-2, val_split_ratio=0.25)))
    assert_same_weights(adapter_weights(swift_style), adapter_weights(out), atol=0)


def test_loraplus_gives_b_a_larger_learning_rate(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    from lorakit.train.model import prepare_model

    args = TrainArgs(learning_rate=1e-4, loraplus_lr_ratio=16)
    model = prepare_model(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), args, "causal_lm")
    groups = loop.build_optimizer(model, args).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert [g["lr"] for g in groups] == [1e-4, 1.6e-3]
    assert all("lora_B" in names[id(p)] for p in groups[1]["params"])
    assert not any("lora_B" in names[id(p)] for p in groups[0]["params"])


def test_classification_on_minilm_reports_accuracy(tmp_path):
    data = write_jsonl(tmp_path / "cls.jsonl", [{"text": t, "label": label} for t, label in SENTIMENT * 2])
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "what a lovely, wonderful story", "label": "pos"},
                                               {"text": "boring and awful", "label": "neg"}])
    out = tmp_path / "cls-run"
    result = loop.train(parse_train_args(quick_args("all-MiniLM-L6-v2", data, out, max_steps=12,
                                                    learning_rate=2e-3, val_dataset=val)))
    assert result["eval_accuracy"] == 1.0 and result["eval_loss"] < result["before_eval_loss"]
    assert result["eval_top_class_share"] == 0.5  # one row of each class, each predicted right
    assert json.loads((out / "labels.json").read_text()) == ["neg", "pos"]
    assert any(k.startswith("base_model.model.classifier.") for k in adapter_weights(out))  # new head saved


class _AlwaysSecondClass(torch.nn.Module):
    """A step module whose classifier says class 1 for every row: a collapsed model."""

    def forward(self, batch):
        logits = torch.tensor([[0.0, 5.0, 1.0]]).repeat(len(batch["labels"]), 1)
        return torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"), logits


def test_a_classifier_that_gives_every_row_one_class_is_called_collapsed():
    from lorakit.data.encode import Encoded

    ctx = distributed.Dist()
    rows = [Encoded([5, 6, 7], label) for label in (0, 1, 1, 2, 1)]
    metrics = loop.evaluate(_AlwaysSecondClass(), rows, TrainArgs(per_device_eval_batch_size=2), 0, ctx, False, 3)
    assert metrics["eval_accuracy"] == 0.6 and metrics["eval_top_class_share"] == 1.0
    warning = loop.one_class_warning(metrics, rows, 2e-3, 40)
    assert "every eval row was predicted as one class after 40 steps" in warning
    assert "--learning_rate 1.0e-03" in warning
    same_class = [Encoded([5, 6], 1)] * 3  # rows that all hold one class: one answer is right, not a collapse
    assert loop.one_class_warning(loop.evaluate(_AlwaysSecondClass(), same_class, TrainArgs(), 0, ctx, False, 3),
                                  same_class, 2e-3, 40) is None


def test_a_classifier_checkpoint_gets_a_head_for_the_new_labels(tmp_path):
    folder = save_tiny_bert_classifier(tmp_path / "bert")  # its head has 3 labels; the data has 2
    data = write_jsonl(tmp_path / "cls.jsonl", [{"text": t, "label": label} for t, label in SENTIMENT])
    loop.train(parse_train_args(quick_args(folder, data, tmp_path / "o", max_steps=1)))
    assert adapter_weights(tmp_path / "o")["base_model.model.classifier.weight"].shape == (2, 32)


def test_a_classifier_run_trains_the_pooler_in_full_and_peft_loads_it(tmp_path):
    import peft
    from transformers import AutoModelForSequenceClassification

    import lorakit

    folder = save_tiny_bert_classifier(tmp_path / "bert")
    data = write_jsonl(tmp_path / "cls.jsonl", [{"text": t, "label": label} for t, label in SENTIMENT])
    loop.train(parse_train_args(quick_args(folder, data, tmp_path / "o", max_steps=2)))
    assert yaml.safe_load((tmp_path / "o" / "run_config.yaml").read_text())["modules_to_save"] == ["pooler"]
    weights = adapter_weights(tmp_path / "o")
    assert not any("pooler" in k and "lora_" in k for k in weights)  # the pooler is whole, not adapted
    saved_config = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert not [t for t in saved_config["target_modules"] if "pooler" in t or "classifier" in t]  # not targets

    def base():
        return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, ignore_mismatched_sizes=True)

    assert not torch.equal(weights["base_model.model.bert.pooler.dense.weight"], base().bert.pooler.dense.weight)
    ids = torch.tensor([[2, 40, 41, 42, 3]])
    theirs = peft.PeftModel.from_pretrained(base(), str(tmp_path / "o")).eval()(input_ids=ids).logits
    ours = lorakit.PeftModel.from_pretrained(base(), str(tmp_path / "o")).eval()(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs)
    assert main(["merge", "--adapter", str(tmp_path / "o"), "--output_dir", str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged")).eval()
    assert merged.config.id2label == {0: "neg", 1: "pos"}  # the run's labels, not the base's three
    torch.testing.assert_close(merged(input_ids=ids).logits, theirs)
    loop.train(parse_train_args(quick_args(folder, data, tmp_path / "head", max_steps=1, modules_to_save="classifier")))
    assert any("pooler" in k and "lora_A" in k for k in adapter_weights(tmp_path / "head"))  # the head alone, as asked
    loop.train(parse_train_args(quick_args(folder, data, tmp_path / "q", max_steps=1, train_type="qlora")))
    weights = adapter_weights(tmp_path / "q")  # the 4-bit base keeps the pooler it trains whole out of NF4
    assert weights["base_model.model.bert.pooler.dense.weight"].dtype == torch.float32
    assert not [k for k in weights if "absmax" in k or "quant" in k]


@pytest.mark.parametrize("train_type", ["lora", "qlora"])
def test_lora_bias_all_trains_the_base_biases_and_peft_loads_them(tmp_path, train_type):
    import peft
    from transformers import AutoModelForSequenceClassification

    import lorakit

    folder = save_tiny_bert_classifier(tmp_path / "bert")
    data = write_jsonl(tmp_path / "cls.jsonl", [{"text": t, "label": label} for t, label in SENTIMENT])
    out = tmp_path / "o"
    assert main(["train", *quick_args(folder, data, out, max_steps=2, train_type=train_type, lora_bias="all")]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["bias"] == "all"
    weights = adapter_weights(out)

    def base():
        return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, ignore_mismatched_sizes=True)

    query_bias = "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias"
    embedding_norm_bias = "base_model.model.bert.embeddings.LayerNorm.bias"  # a layer without an adapter
    assert weights[query_bias].dtype == torch.float32
    assert not torch.equal(weights[query_bias], base().bert.encoder.layer[0].attention.self.query.bias)
    assert not torch.equal(weights[embedding_norm_bias], base().bert.embeddings.LayerNorm.bias)
    ids = torch.tensor([[2, 40, 41, 42, 3]])
    theirs = peft.PeftModel.from_pretrained(base(), str(out)).eval()(input_ids=ids).logits
    ours = lorakit.PeftModel.from_pretrained(base(), str(out)).eval()(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs)


def test_refuses_an_output_dir_holding_a_previous_run(tiny_lm_dir, alpaca_file, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["train", *quick_args(tiny_lm_dir, alpaca_file, out, max_steps=1)]) == 2
    assert "already holds files from a previous run" in capsys.readouterr().err
    assert main(["train", *quick_args(tiny_lm_dir, alpaca_file, out, max_steps=1), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("flags, message", [
    (["--model", "/nonexistent/model"], "model folder not found: /nonexistent/model"),
    (["--dataset", "missing.jsonl"], "dataset file not found: missing.jsonl"),
    (["--model", "someone/some-model"], r"model 'someone/some-model' is not a local path .* unreachable"),
    (["--dataset", "someone/some-dataset"], r"dataset 'someone/some-dataset' is not a local path"),
    (["--task_type", "seq_cls"], "--task_type seq_cls needs classification data, but the dataset is in the alpaca"),
])
def test_bad_input_gets_a_clear_error(tiny_lm_dir, alpaca_file, tmp_path, capsys, flags, message):
    start = time.time()
    code = main(["train", *quick_args(tiny_lm_dir, alpaca_file, tmp_path / "o"), *flags])
    assert code == 2 and time.time() - start < 30  # offline hub ids fail at once, no hang
    assert pytest.importorskip("re").search(message, capsys.readouterr().err)


def test_model_folder_without_config(alpaca_file, tmp_path, capsys):
    (tmp_path / "empty-model").mkdir()
    assert main(["train", *quick_args(str(tmp_path / "empty-model"), alpaca_file, tmp_path / "o")]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_model_folder_without_tokenizer(tiny_lm_dir, alpaca_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_lm_dir).save_pretrained(str(tmp_path / "no-tok"))
    assert main(["train", *quick_args(str(tmp_path / "no-tok"), alpaca_file, tmp_path / "o")]) == 2
    assert f"model folder {tmp_path / 'no-tok'} has no tokenizer" in capsys.readouterr().err


def test_all_masked_dataset_is_refused(tiny_lm_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "long.jsonl", [{"instruction": "word " * 100, "output": "x"}] * 3)
    assert main(["train", *quick_args(tiny_lm_dir, data, tmp_path / "o", max_length=16)]) == 2
    assert "no training examples left" in capsys.readouterr().err


# --- checkpoints, resume, interruption ---------------------------------------------------------

def _reference(tiny_lm_dir, alpaca_file, tmp_path, **overrides):
    out = tmp_path / "reference"
    loop.train(parse_train_args(quick_args(tiny_lm_dir, alpaca_file, out, lora_dropout=0.1, **overrides)))
    return adapter_weights(out)


def test_ctrl_c_saves_a_checkpoint_and_resume_matches(tiny_lm_dir, alpaca_file, tmp_path, monkeypatch):
    expected = _reference(tiny_lm_dir, alpaca_file, tmp_path, save_steps=100)
    out = tmp_path / "interrupted"
    args = quick_args(tiny_lm_dir, alpaca_file, out, lora_dropout=0.1, save_steps=100)
    fail_at(monkeypatch, 4, KeyboardInterrupt())  # during step 4, after 3 complete steps
    with pytest.raises(KeyboardInterrupt):
        loop.train(parse_train_args(args))
    assert (out / "checkpoint-3").is_dir() and not (out / "adapter_model.safetensors").exists()
    monkeypatch.undo()
    loop.train(parse_train_args(args + ["--resume"]))
    assert_same_weights(adapter_weights(out), expected)


def test_nan_loss_stops_and_names_the_last_good_checkpoint(tiny_lm_dir, alpaca_file, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    fail_at(monkeypatch, 5, "nan")
    with pytest.raises(loop.TrainingDiverged, match=r"loss became nan at step 5.*checkpoint-4"):
        loop.train(parse_train_args(quick_args(tiny_lm_dir, alpaca_file, out)))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_keeps_only_the_newest_checkpoints(tiny_lm_dir, alpaca_file, tmp_path):
    out = tmp_path / "rotate"
    loop.train(parse_train_args(quick_args(tiny_lm_dir, alpaca_file, out, max_steps=9, save_total_limit=2)))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]
    assert not list(out.glob(".checkpoint-*"))


KILLER = """
import os, signal, sys
from lorakit.train import checkpoints, loop
from lorakit.train.args import parse_train_args

where, at = os.environ["KILL_WHERE"], int(os.environ["KILL_AT"])
if where == "step":  # SIGKILL in the middle of a training step
    real, calls = loop.batch_loss_sum, [0]
    def batch_loss_sum(model, batch, *options):
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(model, batch, *options)
    loop.batch_loss_sum = batch_loss_sum
else:  # SIGKILL while a checkpoint folder is being written
    real_replace = os.replace
    def replace(src, dst):
        if str(dst).endswith(f"checkpoint-{at}"):
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)
    checkpoints.os.replace = replace
loop.train(parse_train_args(sys.argv[1:]))
"""


@pytest.mark.parametrize("where, at, resumes_from", [("step", 5, "checkpoint-4"), ("save", 4, "checkpoint-2")])
def test_sigkill_then_resume_ends_with_the_same_adapter(tiny_lm_dir, alpaca_file, tmp_path, where, at,
                                                        resumes_from):
    expected = _reference(tiny_lm_dir, alpaca_file, tmp_path)
    out = tmp_path / "killed"
    args = quick_args(tiny_lm_dir, alpaca_file, out, lora_dropout=0.1)
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "KILL_WHERE": where, "KILL_AT": str(at)}
    killed = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (out / "adapter_model.safetensors").exists()
    resumed = subprocess.run([sys.executable, "-m", "lorakit", "train", *args, "--resume"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {out / resumes_from} at step {int(resumes_from.split('-')[1])}" in resumed.stdout
    assert_same_weights(adapter_weights(out), expected)
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "event" not in r]
    assert steps == sorted(set(steps))  # no duplicated records from the killed run


def test_resume_refuses_other_settings(tiny_lm_dir, alpaca_file, tmp_path, capsys):
    out = tmp_path / "changed"
    assert main(["train", *quick_args(tiny_lm_dir, alpaca_file, out, max_steps=3)]) == 0
    code = main(["train", *quick_args(tiny_lm_dir, alpaca_file, out, max_steps=3, lora_rank=8), "--resume"])
    assert code == 2 and "--lora_rank: 4 in the checkpoint, 8 now" in capsys.readouterr().err
    code = main(["train", *quick_args(tiny_lm_dir, alpaca_file, out, max_steps=3, learning_rate=0.5), "--resume"])
    assert code == 2 and "--learning_rate: 0.01 in the checkpoint, 0.5 now" in capsys.readouterr().err


# --- many processes --------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tiny_lm_dir, tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(30))  # 30 rows: the last global batch is partial
    # fp32 on every CPU: under bf16 the two ways of summing a batch round differently
    common = dict(lora_dropout=0, max_steps=-1, num_train_epochs=1, save_steps=100, val_split_ratio=0.2, bf16="false")
    cpu = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # gloo on the CPU, also on a GPU machine
    single = subprocess.run([sys.executable, "-m", "lorakit", "train",
                             *quick_args(tiny_lm_dir, data, tmp_path / "one", per_device_train_batch_size=4,
                                         **common)], capture_output=True, text=True, timeout=300, env=cpu)
    assert single.returncode == 0, single.stderr[-2000:]
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "lorakit", "train",
                             *quick_args(tiny_lm_dir, data, tmp_path / "two", per_device_train_batch_size=2,
                                         **common)], capture_output=True, text=True, timeout=300, env=cpu)
    assert double.returncode == 0, double.stderr[-3000:]
    assert_same_weights(adapter_weights(tmp_path / "two"), adapter_weights(tmp_path / "one"), atol=1e-5)
    one, two = (json.loads((tmp_path / d / "final_metrics.json").read_text()) for d in ("one", "two"))
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines))  # one writer: no record written twice
    assert double.stdout.count("done:") == 1


@pytest.mark.slow
def test_no_arguments_runs_the_offline_minilm_default(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "lorakit", "train"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    import re

    before, after = map(float, re.search(r"eval accuracy: ([\d.]+) before -> ([\d.]+) after", done.stdout).groups())
    assert before < 0.4 and after > 0.85, done.stdout
    [out] = (tmp_path / "outputs").iterdir()
    assert out.name.startswith("all-MiniLM-L6-v2-") and f"saved in {out.resolve()}" in done.stdout.replace(
        f"saved in outputs/{out.name}", f"saved in {out.resolve()}")
    assert (out / "adapter_model.safetensors").is_file() and (out / "labels.json").is_file()


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_default_precision_follows_the_cpu_matrix_unit(tiny_lm_dir, alpaca_file, tmp_path, monkeypatch, capsys,
                                                       fast_bf16):
    """No --bf16: bf16 autocast over a bf16 base on a CPU with a bf16 matrix unit, fp32 elsewhere; --bf16 false wins."""
    from lorakit import precision

    monkeypatch.setattr(precision, "fast_bf16", lambda device: fast_bf16)
    loop.train(parse_train_args(quick_args(tiny_lm_dir, alpaca_file, tmp_path / "auto", max_steps=2)))
    assert ("precision: bf16 autocast" in capsys.readouterr().out) is fast_bf16
    loop.train(parse_train_args(quick_args(tiny_lm_dir, alpaca_file, tmp_path / "off", max_steps=2, bf16="false")))
    assert "precision: fp32" in capsys.readouterr().out
