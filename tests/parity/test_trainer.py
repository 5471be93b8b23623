"""A lorakit model in transformers' Trainer, as a PEFT model is: it trains only the adapter, Trainer
saves the adapter alone (checkpoints and save_model) in files PEFT reads, and resumes from them. With
peft imported the model also counts as a peft.PeftModel (what Trainer checks), and still pickles and
deep-copies as the lorakit model it is."""
import os

import peft
import torch

import lorakit
from helpers import adapter_weights, build_model, model_inputs, model_output
from lorakit import LoraConfig, PeftModel, get_peft_model

ROWS = [{"input_ids": [1, 5 + i, 6 + i, 7 + i], "labels": [1, 5 + i, 6 + i, 7 + i]} for i in range(8)]


def _trainer(model, output_dir, max_steps: int, **arguments):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(**{**dict(output_dir=str(output_dir), max_steps=max_steps, learning_rate=1e-2,
                                       per_device_train_batch_size=2, report_to=[], use_cpu=True, save_steps=2,
                                       seed=7, data_seed=7), **arguments})
    return Trainer(model=model, train_dataset=ROWS, args=args)


def _lora_model(model_dir):
    from transformers import AutoModelForCausalLM

    return lorakit.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                  LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


def test_wrapped_model_trains_with_transformers_trainer(tiny_lm_dir, tmp_path):
    model = _lora_model(tiny_lm_dir)
    frozen = model.base_model.model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    trainer = _trainer(model, tmp_path / "hf", max_steps=2, save_strategy="no")
    assert trainer.train().global_step == 2
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_B["default"].weight.abs().sum() > 0
    assert torch.equal(layer.weight, frozen)
    assert not os.path.exists(tmp_path / "hf" / "checkpoint-2")  # save_strategy="no" reached Trainer


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
    got, expected = (adapter_weights(d) for d in (tmp_path / "full" / "checkpoint-4", tmp_path / "final"))
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


