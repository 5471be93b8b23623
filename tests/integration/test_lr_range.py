"""`--learning_rate auto`: the range test picks a rate, leaves no trace on the run that follows, and a resumed
run keeps the rate it picked."""
import json

import pytest
import yaml
from safetensors.torch import load_file

from helpers import assert_same_weights, quick_args
from lorakit.train import loop, lr_range
from lorakit.train.args import parse_train_args


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
