"""CPU bf16 autocast, which lorakit turns on by default where the CPU has a bf16 matrix unit: every
path (the fused LoRA branch, DoRA, QLoRA's dequantisation, the memory savers, the mixed-adapter bank)
gives the fp32 numbers within bf16's precision. Autocast runs on any CPU, only slower without such a unit."""
import json

import pytest
import torch

import lorakit
from helpers import build_model, lean_train_step, model_inputs, quantized_llama, randomize, save_adapter
from lorakit import memory, precision
from lorakit.serve import AdapterBank

BF16_TOL = dict(rtol=3e-2, atol=3e-2)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def train_step(model: torch.nn.Module, arch: str, bf16: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, adapter grads) of one step, dropout off so both precisions see the same function."""
    model.zero_grad(set_to_none=True)
    inputs = model_inputs(arch)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def bf16_error(model: torch.nn.Module, arch: str) -> float:
    """The relative error of the whole adapter gradient under bf16 autocast against fp32; the loss checked too.
    Single small tensors of a random tiny model are mostly rounding, so the whole gradient is compared."""
    loss32, grads32 = train_step(model, arch, bf16=False)
    loss16, grads16 = train_step(model, arch, bf16=True)
    assert grads16 and all(g.dtype == torch.float32 for g in grads16.values())  # adapters stay fp32
    torch.testing.assert_close(loss16, loss32, **BF16_TOL)
    names = sorted(grads32)
    return relative_error(*(torch.cat([g[n].flatten() for n in names]) for g in (grads16, grads32)))


@pytest.mark.parametrize("unit,capabilities", [
    ("amx_bf16", {"amx_bf16": True, "avx512_bf16": True}),
    ("avx512_bf16", {"amx_bf16": False, "avx512_bf16": True}),
    ("none", {"avx2": True}),
])
def test_the_cpu_matrix_unit_picks_the_default(monkeypatch, unit, capabilities):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    precision.cpu_matrix_unit.cache_clear()
    try:
        assert precision.cpu_matrix_unit() == unit
        assert precision.fast_bf16("cpu") is (unit != "none")
        assert ("bf16 autocast" in precision.describe("cpu")) is (unit != "none")
    finally:
        precision.cpu_matrix_unit.cache_clear()


def test_plan_names_the_cpu_matrix_unit(capsys):
    from lorakit.cli import main

    unit = precision.cpu_matrix_unit()
    assert main(["plan", "--help"]) == 0
    assert f"This machine: cpu ({unit} matrix unit)" in capsys.readouterr().out
    assert main(["plan", "--model", "google/gemma-2-2b"]) == 0
    assert f"this machine: cpu ({unit} matrix unit)" in capsys.readouterr().out
    assert main(["plan", "--model", "google/gemma-2-2b", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cpu_matrix_unit"] == unit


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_and_dora_training_step_matches_fp32(arch, use_dora):
    """lorakit's bf16 error is bf16's own, of PEFT's size on the same weights (wrong math would be ~100%).
    PEFT's DoRA layers return fp32 under autocast (its fp32 magnitude / norm promotes their sum), lorakit's
    the autocast dtype like every other layer: about twice PEFT's error there, and half the bytes."""
    import peft

    config = dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=use_dora, init_lora_weights=False)
    ours = lorakit.get_peft_model(build_model(arch), lorakit.LoraConfig(**config))
    theirs = peft.get_peft_model(build_model(arch), peft.LoraConfig(**config))
    theirs.load_state_dict({n: p for n, p in ours.state_dict().items() if "lora_" in n}, strict=False)
    ours_error, theirs_error = bf16_error(ours, arch), bf16_error(theirs, arch)
    bound = (2.0 if use_dora else 1.25) * theirs_error + 0.01
    assert ours_error < bound and ours_error < 0.15, (ours_error, theirs_error)


def test_qlora_training_step_matches_fp32():
    base, _ = quantized_llama()
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    assert bf16_error(model, "llama") < 0.15


@pytest.mark.parametrize("saver", list(memory.SAVERS))
def test_each_memory_saver_keeps_the_numbers_under_autocast(saver):
    loss_lean, grads_lean = lean_train_step("llama", None, autocast=True)
    loss_plain, grads_plain = lean_train_step("llama", saver, autocast=True)
    torch.testing.assert_close(loss_lean, loss_plain, rtol=1e-2, atol=1e-2)
    for name, grad in grads_plain.items():
        assert relative_error(grads_lean[name], grad) < 0.02, name


def test_mixed_adapter_bank_matches_fp32_under_autocast(tmp_path):
    folders = {"plain": save_adapter("llama", tmp_path / "plain", 1, r=4, target_modules="all-linear"),
               "dora": save_adapter("llama", tmp_path / "dora", 2, r=2, use_dora=True, target_modules=["v_proj"])}
    bank = AdapterBank(build_model("llama"))
    for name, folder in folders.items():
        bank.load(name, folder)
    rows = ["plain", None, "dora"]
    input_ids = torch.randint(0, 96, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), bank.rows(rows):
        want = bank.model(input_ids=input_ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = bank.model(input_ids=input_ids).logits
    assert got.dtype == torch.bfloat16
    for i in range(len(rows)):
        assert relative_error(got[i], want[i]) < 0.02, rows[i]


def test_merged_adapter_under_autocast_matches_fp32():
    model = lorakit.get_peft_model(build_model("llama"), lorakit.LoraConfig(r=4, target_modules="all-linear"))
    randomize(model)
    ids = model_inputs("llama")["input_ids"]
    with torch.no_grad():
        want = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = merged(input_ids=ids).logits
    assert relative_error(got, want) < 0.02
