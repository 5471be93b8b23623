"""lorakit.memory behind its one door: on by default and listed, off on request, gone after unload,
and given to adapters added later."""
import io

import pytest
import torch

import lorakit
from helpers import build_model, model_inputs
from lorakit import memory
from lorakit.train.args import parse_train_args
from lorakit.train.loss import batch_loss_sum
from lorakit.train.model import prepare_model


def untouched(model: torch.nn.Module) -> bool:
    """No module has its own forward or a forward hook, and the loss is the class's own."""
    return (all("forward" not in m.__dict__ and not m._forward_hooks for m in model.modules())
            and "_loss_function" not in model.__dict__)


def q_proj_in_layer(layer: int) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[layer])


def test_on_by_default_and_listed():
    model = build_model("llama")
    peft_model = lorakit.get_peft_model(model, lorakit.LoraConfig(r=2, target_modules="all-linear"))
    assert peft_model.memory_savers == {"loss": [""], "gated_mlp": ["model.layers.0.mlp", "model.layers.1.mlp"],
                                        "norm_outputs": ["model", "model.layers.0", "model.layers.1"]}
    assert not untouched(model)


@pytest.mark.parametrize("undo", ["merge_and_unload", "unload", "disable"])
def test_every_way_back_removes_all_of_them(undo):
    model = build_model("llama")
    peft_model = lorakit.get_peft_model(model, lorakit.LoraConfig(r=2, target_modules="all-linear"))
    plain = memory.disable(model) if undo == "disable" else getattr(peft_model, undo)()
    assert untouched(plain) and memory.installed(plain) == {}


def test_off_leaves_the_model_code_untouched_with_the_same_outputs(tmp_path):
    inputs = model_inputs("llama")
    model = build_model("llama")
    peft_model = lorakit.get_peft_model(model, lorakit.LoraConfig(r=2, target_modules="all-linear"),
                                        memory_savers=False)
    assert peft_model.memory_savers == {} and untouched(model)
    peft_model.add_adapter("other", q_proj_in_layer(1))
    assert untouched(model)
    peft_model.save_pretrained(tmp_path)
    loaded = lorakit.PeftModel.from_pretrained(build_model("llama"), tmp_path, memory_savers=False)
    assert loaded.memory_savers == {} and untouched(loaded.get_base_model())
    with torch.no_grad():
        lean = lorakit.PeftModel.from_pretrained(build_model("llama"), tmp_path)(**inputs).logits
        torch.testing.assert_close(loaded(**inputs).logits, lean, rtol=0, atol=0)


def test_adapters_added_later_get_the_same_treatment(tmp_path):
    first = lorakit.get_peft_model(build_model("llama"), q_proj_in_layer(1))
    first.save_pretrained(tmp_path)
    peft_model = lorakit.get_peft_model(build_model("llama"), q_proj_in_layer(0))
    assert peft_model.memory_savers["norm_outputs"] == ["model", "model.layers.0"]
    peft_model.add_adapter("later", q_proj_in_layer(1))
    assert peft_model.memory_savers["norm_outputs"] == ["model", "model.layers.0", "model.layers.1"]

    loading = lorakit.get_peft_model(build_model("llama"), q_proj_in_layer(0))
    loading.load_adapter(tmp_path, adapter_name="loaded")
    assert loading.memory_savers["norm_outputs"] == ["model", "model.layers.0", "model.layers.1"]
    assert len(loading.get_base_model().model.layers[1].input_layernorm._forward_hooks) == 1


def test_a_model_with_savers_pickles():
    peft_model = lorakit.get_peft_model(build_model("llama"), lorakit.LoraConfig(r=2, target_modules="all-linear"))
    assert set(peft_model.memory_savers) == set(memory.SAVERS)  # all of them are there to pickle
    buffer = io.BytesIO()
    torch.save(peft_model, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    assert again.memory_savers == peft_model.memory_savers
    inputs = model_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, peft_model(**inputs).logits, rtol=0, atol=0)


def test_unknown_saver_is_named():
    with pytest.raises(ValueError, match=r"unknown memory savers \['lean'\]; there are \['loss'"):
        memory.enable(build_model("llama"), ["lean"])


@pytest.mark.parametrize("flag", ["true", "false"])
def test_lorakit_train_switch(flag):
    args = parse_train_args(["--model", "x", "--dataset", "y", "--memory_savers", flag, "--target_modules", "q_proj"])
    model = prepare_model(build_model("llama"), args, "causal_lm")
    assert bool(model.memory_savers) == (flag == "true")
    ids = model_inputs("llama")["input_ids"]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    loss, logits = batch_loss_sum(model, batch, args.memory_savers)
    assert (logits is None) == (flag == "true")  # the fused head never builds the logits
