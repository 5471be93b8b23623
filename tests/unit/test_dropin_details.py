"""Drop-in details beyond the math: the model card, file permissions, and new adapters following the
model's train / eval mode. (transformers' Trainer saving and resuming adapters: tests/parity/test_trainer.py.)"""
import json
import os

import pytest
import torch

from helpers import build_model, model_inputs, model_output
from lorakit import LoraConfig, get_peft_model


# --- new adapters follow the model's mode ---------------------------------------------------------
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_added_adapter_follows_the_model_mode(mode):
    config = LoraConfig(r=4, lora_dropout=0.5, init_lora_weights=False, target_modules=["q_proj", "v_proj"],
                        modules_to_save=["lm_head"])
    model = get_peft_model(build_model("llama"), config)
    model.train(mode == "train")
    model.add_adapter("other", config)
    model.set_adapter("other")
    assert {m.training for m in model.modules()} == {mode == "train"}
    if mode == "eval":
        inputs = model_inputs("llama")
        assert torch.equal(model_output(model, inputs), model_output(model, inputs))


# --- model card -----------------------------------------------------------------------------------
def _front_matter(text: str) -> dict:
    import yaml

    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_save_writes_a_model_card_like_peft(tmp_path):
    base = build_model("llama")
    base.config._name_or_path = "org/tiny-llama"
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(tmp_path)
    card = _front_matter((tmp_path / "README.md").read_text())
    assert card["base_model"] == "org/tiny-llama" and card["library_name"] == "peft"
    assert card["pipeline_tag"] == "text-generation"
    assert {"base_model:adapter:org/tiny-llama", "lora", "lorakit", "transformers"} <= set(card["tags"])

    ours = tmp_path / "mine"
    ours.mkdir()
    (ours / "README.md").write_text("my own notes\n")
    get_peft_model(build_model("llama"), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(ours)
    assert (ours / "README.md").read_text() == "my own notes\n"


def test_model_card_without_a_base_name(tmp_path):
    get_peft_model(build_model("gpt2"), LoraConfig(r=4, target_modules=["c_attn"])).save_pretrained(tmp_path)
    card = _front_matter((tmp_path / "README.md").read_text())
    assert "base_model" not in card and not any(t.startswith("base_model:") for t in card["tags"])


# --- file permissions -----------------------------------------------------------------------------
def test_saved_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        model = get_peft_model(build_model("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
        model.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"]))
        model.save_pretrained(tmp_path)
    finally:
        os.umask(old)
    files = [os.path.join(d, f) for d, _, names in os.walk(tmp_path) for f in names]
    assert len(files) == 5  # a config and weights per adapter, and the model card
    assert {f: oct(os.stat(f).st_mode & 0o777) for f in files} == {f: oct(0o640) for f in files}
    assert json.loads((tmp_path / "other" / "adapter_config.json").read_text())["r"] == 2


@pytest.mark.parametrize("how", ["merge_and_unload", "unload"])
def test_unloaded_model_keeps_the_mode_it_was_set_to(how):
    """Set to eval after the adapters went in: the base layers handed back are in eval mode too."""
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    model = get_peft_model(build_model("llama").train(), config).eval()
    plain = getattr(model, how)()
    assert {m.training for m in plain.modules()} == {False}
