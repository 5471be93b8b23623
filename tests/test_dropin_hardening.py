"""Drop-in details beyond the math: transformers' Trainer saving and resuming adapters, the model
card, file permissions, and new adapters following the model's train / eval mode."""
import json
import os

import peft
import pytest
import torch

import lorakit
from conftest import build_model, model_inputs, model_output
from lorakit import LoraConfig, PeftModel, get_peft_model

ROWS = [{"input_ids": [1, 5 + i, 6 + i, 7 + i], "labels": [1, 5 + i, 6 + i, 7 + i]} for i in range(8)]


def _trainer(model, output_dir, max_steps: int):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, learning_rate=1e-2,
                             per_device_train_batch_size=2, report_to=[], use_cpu=True, save_steps=2,
                             seed=7, data_seed=7)
    return Trainer(model=model, train_dataset=ROWS, args=args)


def _lora_model(model_dir):
    from transformers import AutoModelForCausalLM

    return lorakit.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                  LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


def _adapter_tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def test_trainer_saves_adapters_peft_loads_and_resumes(tiny_lm_dir, tmp_path):
    """Trainer writes the adapter alone (in every checkpoint and in save_model), PEFT reads it back,
    and training resumed from a checkpoint ends with the uninterrupted run's adapter."""
    from transformers import AutoModelForCausalLM

    model = _lora_model(tiny_lm_dir)
    trainer = _trainer(model, tmp_path / "full", max_steps=4)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "final", tmp_path / "full" / "checkpoint-2", tmp_path / "full" / "checkpoint-4"):
        files = set(os.listdir(folder))
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files, files
        assert "model.safetensors" not in files
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), str(tmp_path / "final"))
    inputs = {"input_ids": torch.tensor([[1, 5, 6, 7, 8]])}
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs).logits, model.eval()(**inputs).logits, atol=1e-5, rtol=0)

    resumed = _lora_model(tiny_lm_dir)
    _trainer(resumed, tmp_path / "full", max_steps=4).train(
        resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    got, expected = (_adapter_tensors(d) for d in (tmp_path / "full" / "checkpoint-4", tmp_path / "final"))
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0)


def test_model_pickles_and_copies_with_peft_loaded():
    """With peft imported, the model also counts as a peft.PeftModel (for Trainer), and still
    pickles and deep-copies as the lorakit model it is."""
    import copy
    import pickle

    model = get_peft_model(build_model("llama"), LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj"]))
    assert isinstance(model, peft.PeftModel) and isinstance(model, PeftModel)
    assert pickle.dumps(model)
    other = copy.deepcopy(model)
    assert type(other) is PeftModel
    inputs = model_inputs("llama")
    assert torch.equal(model_output(other, inputs), model_output(model, inputs))


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
