"""The learning rate: lorakit's default rule, and `--learning_rate auto` (the range test picks a rate, leaves no
trace on the run that follows, and a resumed run keeps the rate it picked)."""
import json

import pytest
import yaml
from safetensors.torch import load_file

from helpers import assert_same_weights, quick_args
from lorakit.train import loop, lr_range
from lorakit.train.args import parse_train_args
from lorakit.train.prepare import default_learning_rate


def test_an_auto_run_is_the_run_with_the_picked_rate(tiny_lm_dir, alpaca_file, tmp_path, capsys):
    auto, explicit = tmp_path / "auto", tmp_path / "explicit"
    loop.train(parse_train_args(quick_args(tiny_lm_dir, alpaca_file, auto, learning_rate="auto")))
    printed = capsys.readouterr().out
    picked = yaml.safe_load((auto / "run_config.yaml").read_text())["learning_rate"]
    test = json.loads((auto / "lr_range_test.json").read_text())
    assert test["learning_rate"] == picked and (auto / "lr_range_test.png").stat().st_size > 0
    rates = [p["lr"] for p in test["points"]]
    assert len(rates) >= 3 and rates == sorted(rates) and rates[0] <= picked <= rates[-1] / lr_range.DIVISOR
    assert f"learning rate: {picked:.2e}" in printed and "lr (log scale)" in printed

    loop.train(parse_train_args(quick_args(tiny_lm_dir, alpaca_file, explicit, learning_rate=repr(picked))))
    assert "range test" not in capsys.readouterr().out
    assert_same_weights(load_file(auto / "adapter_model.safetensors"),
                        load_file(explicit / "adapter_model.safetensors"), atol=0)


def test_resume_keeps_the_picked_rate(tiny_lm_dir, alpaca_file, tmp_path, capsys):
    out = tmp_path / "run"
    flags = quick_args(tiny_lm_dir, alpaca_file, out, learning_rate="auto")
    loop.train(parse_train_args(flags))
    straight = load_file(out / "adapter_model.safetensors")
    capsys.readouterr()
    loop.train(parse_train_args(flags + ["--resume", str(out / "checkpoint-4")]))
    printed = capsys.readouterr().out
    assert "range test" not in printed and f"resumed from {out / 'checkpoint-4'} at step 4" in printed
    assert_same_weights(load_file(out / "adapter_model.safetensors"), straight, atol=0)


def test_the_pick_is_the_minimum_over_the_divisor():
    rates = [10 ** (k / 4 - 6) for k in range(21)]  # 1e-6 .. 1e-1
    losses = [2.0 - 0.1 * k if k <= 16 else 0.4 + k for k in range(21)]  # lowest at rates[16] = 1e-2
    assert lr_range.pick(rates, losses) == pytest.approx(1e-2 / lr_range.DIVISOR)
    assert lr_range.pick(rates, list(range(21))) == rates[0]  # rising from the start: the lowest rate tried


@pytest.mark.parametrize("value", ["fast", "0", "-1e-3", "inf"])
def test_a_learning_rate_that_is_neither_a_positive_number_nor_auto_is_refused(value):
    with pytest.raises(ValueError, match="--learning_rate takes a positive number or auto"):
        parse_train_args([f"--learning_rate={value}"])


def test_the_default_classification_rate_falls_as_one_over_root_steps_after_a_hundred():
    for train_type, peak in (("lora", 2e-3), ("dora", 2e-3), ("qlora", 2e-3), ("full", 1e-4)):
        assert default_learning_rate(train_type, "seq_cls", 30) == default_learning_rate(train_type, "seq_cls", 100)
        assert default_learning_rate(train_type, "seq_cls", 100) == pytest.approx(peak)
        assert default_learning_rate(train_type, "seq_cls", 400) == pytest.approx(peak / 2)
    assert default_learning_rate("lora", "causal_lm", 5000) == 2e-4
    assert default_learning_rate("full", "causal_lm", 5) == 1e-5


def test_the_default_adapter_rate_falls_as_one_over_root_rank_above_eight():
    for task, steps in (("seq_cls", 50), ("seq_cls", 1000), ("causal_lm", 50)):
        at_8 = default_learning_rate("lora", task, steps)
        assert default_learning_rate("lora", task, steps, 4) == at_8 == default_learning_rate("dora", task, steps, 8)
        assert default_learning_rate("qlora", task, steps, rank=32) == pytest.approx(at_8 / 2)
        assert default_learning_rate("lora", task, steps, rank=64) == pytest.approx(at_8 * (8 / 64) ** 0.5)
    assert default_learning_rate("full", "seq_cls", 50, rank=64) == default_learning_rate("full", "seq_cls", 50)


def test_the_default_alpha_is_twice_the_rank_and_the_log_names_the_default_rate(tiny_lm_dir, alpaca_file, tmp_path,
                                                                                  capsys):
    assert parse_train_args(["--lora_rank", "64"]).lora_alpha == 128
    assert parse_train_args(["--lora_rank", "64", "--lora_alpha", "16"]).lora_alpha == 16
    flags = [f for f in quick_args(tiny_lm_dir, alpaca_file, tmp_path / "run") if f not in ("--learning_rate", "0.01")]
    loop.train(parse_train_args(flags))
    config = yaml.safe_load((tmp_path / "run" / "run_config.yaml").read_text())
    assert config["learning_rate"] == 2e-4 and config["adam_beta2"] == 0.95  # the resolved defaults, recorded
    assert "learning rate: 2.00e-04, lorakit's default for lora causal_lm over 6 steps" in capsys.readouterr().out
    loop.train(parse_train_args([*flags, "--lora_rank", "32", "--output_dir", str(tmp_path / "rank32")]))
    assert yaml.safe_load((tmp_path / "rank32" / "run_config.yaml").read_text())["learning_rate"] == 1e-4
    assert "lorakit's default for lora causal_lm at rank 32 over 6 steps" in capsys.readouterr().out
