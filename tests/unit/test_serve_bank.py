"""AdapterBank: a batch that mixes adapters equals each adapter run alone through PeftModel."""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import build_model, save_adapter
from lorakit import PeftModel
from lorakit.serve import AdapterBank

ATTN = {"llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
MLP = {"llama": ["gate_proj", "up_proj", "down_proj"], "qwen2": ["gate_proj", "up_proj", "down_proj"],
       "gpt2": ["c_fc", "mlp.c_proj"]}


def adapters_for(arch: str, tmp_path) -> dict[str, str]:
    """Different ranks, target sets, scalings (plain, rsLoRA, rank_pattern) and DoRA."""
    return {
        "attn": save_adapter(arch, tmp_path / "attn", 1, r=4, lora_alpha=8, target_modules=ATTN[arch]),
        "all": save_adapter(arch, tmp_path / "all", 2, r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear",
                            rank_pattern={ATTN[arch][0]: 2}),
        "dora": save_adapter(arch, tmp_path / "dora", 3, r=2, lora_alpha=4, use_dora=True, target_modules=MLP[arch]),
    }


def reference_logits(arch: str, folder: str | None, input_ids: torch.Tensor) -> torch.Tensor:
    model = build_model(arch)
    if folder is not None:
        model = PeftModel.from_pretrained(model, folder)
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_mixed_batch_equals_each_adapter_alone(arch, tmp_path):
    folders = adapters_for(arch, tmp_path)
    bank = AdapterBank(build_model(arch))
    keys = set(bank.model.state_dict())
    for name, folder in folders.items():
        bank.load(name, folder)
    assert bank.names == ["attn", "all", "dora"] and set(bank.model.state_dict()) == keys
    row_adapters = ["attn", None, "all", "dora", "attn", "dora"]
    input_ids = torch.randint(0, 96, (len(row_adapters), 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), bank.rows(row_adapters):
        mixed = bank.model(input_ids=input_ids).logits
    for i, name in enumerate(row_adapters):
        expected = reference_logits(arch, folders.get(name), input_ids[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], expected, atol=1e-5, rtol=0, msg=f"row {i} ({name})")
        if name is not None:  # the adapters do change the output
            assert (expected - reference_logits(arch, None, input_ids[i:i + 1])).abs().max() > 1e-2
    with torch.no_grad(), bank.rows([None] * 2):  # a batch of base rows is the plain base model, exactly
        assert torch.equal(bank.model(input_ids=input_ids[:2]).logits, reference_logits(arch, None, input_ids[:2]))


def test_bank_grows_and_reuses_slots(tmp_path):
    folders = {f"a{i}": save_adapter("llama", tmp_path / f"a{i}", i, r=2 + i, target_modules=ATTN["llama"])
               for i in range(5)}
    bank = AdapterBank(build_model("llama"))
    for name, folder in folders.items():  # 5 adapters: the stacks double twice
        bank.load(name, folder)
    bank.unload("a1")
    bank.load("again", folders["a1"])
    assert bank.names == ["a0", "a2", "a3", "a4", "again"]
    input_ids = torch.randint(0, 96, (5, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), bank.rows(bank.names):
        mixed = bank.model(input_ids=input_ids).logits
    for i, name in enumerate(["a0", "a2", "a3", "a4", "a1"]):
        torch.testing.assert_close(mixed[i:i + 1], reference_logits("llama", folders[name], input_ids[i:i + 1]),
                                   atol=1e-5, rtol=0)
    with pytest.raises(KeyError, match="'a1'"):
        with bank.rows(["a1"]):
            pass
    with pytest.raises(KeyError, match="'nope'"):
        bank.unload("nope")


def test_rows_must_match_the_batch(tmp_path):
    bank = AdapterBank(build_model("llama"))
    bank.load("a", save_adapter("llama", tmp_path / "a", 0, target_modules=ATTN["llama"]))
    with pytest.raises(ValueError, match="2 rows.*batch of 3 rows"), torch.no_grad(), bank.rows(["a", None]):
        bank.model(input_ids=torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="already loaded"):
        bank.load("a", tmp_path / "a")


def _rewrite(folder: str, edit) -> None:
    path = os.path.join(folder, "adapter_model.safetensors")
    save_file({k: v.contiguous() for k, v in edit(load_file(path)).items()}, path)


@pytest.mark.parametrize("case, match", [
    ("other_arch", "GPT2LMHeadModel has no such module"),
    ("shape", "other dimensions"),
    ("bin", "adapter_model.safetensors only"),
    ("embedding", "Embedding layer"),
    ("modules_to_save", "modules_to_save"),
    ("rank", "gives rank 8 but lora_A has 4 rows"),
])
def test_load_refuses_what_it_cannot_serve(case, match, tmp_path):
    arch = "gpt2"
    if case == "other_arch":
        folder = save_adapter("llama", tmp_path / "x", 0, target_modules=ATTN["llama"])
    elif case == "embedding":
        folder = save_adapter(arch, tmp_path / "x", 0, target_modules=["wte"])
    elif case == "modules_to_save":
        folder = save_adapter(arch, tmp_path / "x", 0, target_modules=ATTN[arch], modules_to_save=["ln_f"])
    else:
        folder = save_adapter(arch, tmp_path / "x", 0, target_modules=ATTN[arch])
    if case == "shape":
        _rewrite(folder, lambda t: {k: torch.cat([v, v[:1]]) if "lora_B" in k else v for k, v in t.items()})
    elif case == "rank":
        _rewrite(folder, lambda t: {k: v[:4] if "lora_A" in k else v[:, :4] for k, v in t.items()})
    elif case == "bin":
        path = os.path.join(folder, "adapter_model.safetensors")
        torch.save(load_file(path), os.path.join(folder, "adapter_model.bin"))
        os.remove(path)
    bank = AdapterBank(build_model(arch))
    bank.load("ok", save_adapter(arch, tmp_path / "ok", 1, target_modules=MLP[arch]))
    before = {k: v.clone() for k, v in bank.model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        bank.load("bad", folder)
    assert bank.names == ["ok"]
    assert all(torch.equal(before[k], v) for k, v in bank.model.state_dict().items())
