"""Bad input: each a clear error naming what is wrong and what would be accepted; nothing half-done."""
import json
import os
import pickle
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import adapter_model, build_model, model_inputs, model_output
from lorakit import LoraConfig, PeftModel, get_peft_model


def _saved_adapter(tmp_path, arch="llama", **config):
    """(the model, its folder): a nonzero all-linear r=4 adapter saved in tmp_path/adapter."""
    model = adapter_model(arch, r=4, target_modules="all-linear", **config)
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter"


def test_misspelled_target_module_lists_candidates_and_suggests():
    with pytest.raises(ValueError, match=r"\['q_prj'\] match no module.*'q_proj'.*did you mean \['q_proj'"):
        get_peft_model(build_model("llama"), LoraConfig(target_modules=["q_prj", "v_proj"]))


def test_regex_matching_nothing_lists_candidates():
    with pytest.raises(ValueError, match=r"matched no module.*Modules LoRA can target here: \[.*'v_proj'"):
        get_peft_model(build_model("llama"), LoraConfig(target_modules=r".*\.nothing"))


def test_untargetable_module_type_is_named():
    with pytest.raises(ValueError, match=r"'model.layers.0.input_layernorm' is a LlamaRMSNorm; LoRA can target"):
        get_peft_model(build_model("llama"), LoraConfig(target_modules=["input_layernorm"]))


@pytest.mark.parametrize("fields, message", [
    ({"r": 0}, r"r must be a positive integer .* got 0"),
    ({"r": -3}, r"r must be a positive integer"),
    ({"r": 2.5}, r"r must be a positive integer .* got 2.5"),
    ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\] must be a positive integer"),
    ({"bias": "some"}, r"bias must be one of \('none', 'all', 'lora_only'\)"),
    ({"init_lora_weights": "corda"}, r"init_lora_weights must be True, False, 'gaussian', 'pissa'"),
    ({"lora_dropout": 1.5}, r"lora_dropout must be in \[0, 1\)"),
    ({"task_type": "CHAT"}, r"task_type must be one of"),
])
def test_invalid_config_values(fields, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**fields)


def test_adapter_with_other_dimensions_names_module_and_shapes(tmp_path):
    _, adapter = _saved_adapter(tmp_path)
    wider = build_model("llama", hidden_size=48)
    expected = r"model.layers.0.*lora_B.weight has shape \(32, 4\) in the file but \(48, 4\) in the model"
    with pytest.raises(ValueError, match=expected):
        PeftModel.from_pretrained(wider, adapter)


def test_adapter_for_another_architecture(tmp_path):
    _, adapter = _saved_adapter(tmp_path, arch="gpt2")
    with pytest.raises(ValueError, match=r"does not fit this model.*match no module"):
        PeftModel.from_pretrained(build_model("llama"), adapter)


@pytest.mark.parametrize("damage", ["random", "truncated"])
def test_corrupt_safetensors(tmp_path, damage):
    _, adapter = _saved_adapter(tmp_path)
    path = adapter / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(os.urandom(len(data)) if damage == "random" else data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: corrupt or truncated safetensors file"):
        PeftModel.from_pretrained(build_model("llama"), adapter)


def test_missing_config_and_missing_folder(tmp_path):
    _, adapter = _saved_adapter(tmp_path)
    os.remove(adapter / "adapter_config.json")
    with pytest.raises(FileNotFoundError, match=r"no adapter_config.json in .*adapter_model.safetensors"):
        PeftModel.from_pretrained(build_model("llama"), adapter)
    with pytest.raises(FileNotFoundError, match=r"adapter folder .*nowhere.* does not exist"):
        PeftModel.from_pretrained(build_model("llama"), tmp_path / "nowhere")


def test_invalid_json_config(tmp_path):
    _, adapter = _saved_adapter(tmp_path)
    (adapter / "adapter_config.json").write_text("{ not json")
    with pytest.raises(ValueError, match=r"adapter_config.json: not valid JSON"):
        PeftModel.from_pretrained(build_model("llama"), adapter)


def test_unknown_config_field_warns_and_still_loads(tmp_path):
    trained, adapter = _saved_adapter(tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "future_option": 3}))
    with pytest.warns(UserWarning, match=r"ignoring unknown LoraConfig field 'future_option'"):
        loaded = PeftModel.from_pretrained(build_model("llama"), adapter)
    inputs = model_inputs("llama")
    assert torch.allclose(model_output(loaded, inputs), model_output(trained.eval(), inputs), atol=1e-6)


def test_unsupported_peft_feature_is_refused_by_name(tmp_path):
    _, adapter = _saved_adapter(tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_qalora": True}))
    with pytest.raises(ValueError, match=r"use_qalora=True is a PEFT feature lorakit does not support"):
        PeftModel.from_pretrained(build_model("llama"), adapter)


def test_unknown_adapter_names():
    model = get_peft_model(build_model("llama"), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"no adapter named 'other'; this model has \['default'\]"):
        model.set_adapter("other")
    with pytest.raises(ValueError, match=r"no adapter named 'other'"):
        model.delete_adapter("other")
    with pytest.raises(ValueError, match=r"adapter 'default' already exists"):
        model.add_adapter("default", LoraConfig(target_modules=["q_proj"]))


class _Payload:
    """Unpickling it creates the file at `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_bin_adapter_is_never_unpickled(tmp_path):
    trained, adapter = _saved_adapter(tmp_path)
    tensors = load_file(adapter / "adapter_model.safetensors")
    os.remove(adapter / "adapter_model.safetensors")
    torch.save(tensors, adapter / "adapter_model.bin")
    loaded = PeftModel.from_pretrained(build_model("llama"), adapter)
    inputs = model_inputs("llama")
    assert torch.allclose(model_output(loaded, inputs), model_output(trained.eval(), inputs), atol=1e-6)

    marker = tmp_path / "unpickled"
    with open(adapter / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": _Payload(marker)}, f)
    with pytest.raises(ValueError, match=r"cannot be read as a weights-only torch file.*never unpickles"):
        PeftModel.from_pretrained(build_model("llama"), adapter)
    assert not marker.exists()  # the payload never ran


def test_failed_load_adapter_leaves_model_unchanged(tmp_path):
    model, adapter = _saved_adapter(tmp_path)
    save_file({"nonsense": torch.zeros(2)}, adapter / "adapter_model.safetensors")
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match=r"does not fit this model"):
        model.load_adapter(adapter, adapter_name="broken")
    assert set(model.state_dict()) == keys and list(model.peft_config) == ["default"]


def test_save_onto_a_file_is_refused(tmp_path):
    model = get_peft_model(build_model("llama"), LoraConfig(target_modules=["q_proj"]))
    target = tmp_path / "file"
    target.write_text("keep me")
    with pytest.raises(ValueError, match=r"is a file; give a folder"):
        model.save_pretrained(target)
    assert target.read_text() == "keep me"


def test_safe_merge_refuses_nan_and_keeps_weights():
    model = get_peft_model(build_model("llama"), LoraConfig(target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    before = layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"NaN/Inf .*refusing \(safe_merge\)"):
        model.merge_and_unload(safe_merge=True)
    assert torch.equal(layer.weight, before)


@pytest.mark.parametrize("bad, accepted", [
    (torch.ones(4, 32, dtype=torch.int64), "floating-point"),
    (torch.full((4, 32), float("nan")), "finite"),
    (torch.full((4, 32), float("-inf")), "finite"),
])
def test_non_float_or_non_finite_tensors_are_refused(tmp_path, bad, accepted):
    _, adapter = _saved_adapter(tmp_path)
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in sorted(tensors) if k.endswith("q_proj.lora_A.weight"))
    save_file({**tensors, key: bad}, path)
    message = rf"{re.escape(str(path))}: tensor {re.escape(key)} .*{accepted}"
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(build_model("llama"), adapter)


@pytest.mark.parametrize("field, value, message", [
    ("lora_alpha", "16", r"lora_alpha must be a number, got '16'"),
    ("lora_dropout", "0.1", r"lora_dropout must be a number, got '0.1'"),
    ("use_rslora", "yes", r"use_rslora must be true or false, got 'yes'"),
    ("target_modules", ["q_proj", 3], r"target_modules must be .*, got \['q_proj', 3\]"),
    ("alpha_pattern", {"q_proj": "8"}, r"alpha_pattern\['q_proj'\] must be a number"),
    ("layers_to_transform", ["0"], r"layers_to_transform must be .*, got \['0'\]"),
])
def test_config_field_of_the_wrong_type_names_file_and_field(tmp_path, field, value, message):
    _, adapter = _saved_adapter(tmp_path)
    config_path = adapter / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), field: value}))
    with pytest.raises(ValueError, match=rf"{re.escape(str(config_path))}: {message}"):
        PeftModel.from_pretrained(build_model("llama"), adapter)
    with pytest.raises(ValueError, match=message):
        LoraConfig(**{field: value})


def test_negative_lora_alpha_warns():
    with pytest.warns(UserWarning, match=r"lora_alpha=-8 is negative"):
        LoraConfig(lora_alpha=-8)
    with pytest.warns(UserWarning, match=r"alpha_pattern\['q_proj'\]=-1 is negative"):
        LoraConfig(alpha_pattern={"q_proj": -1})


@pytest.mark.parametrize("init", ["orthogonal", "eva"])
def test_load_only_inits_are_refused_for_new_adapters(init):
    with pytest.raises(ValueError, match=rf"init_lora_weights='{init}'.*loads adapters trained this way"):
        get_peft_model(build_model("llama"), LoraConfig(init_lora_weights=init, target_modules=["q_proj"]))
    model = get_peft_model(build_model("llama"), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=rf"init_lora_weights='{init}'"):
        model.add_adapter("other", LoraConfig(init_lora_weights=init, target_modules=["q_proj"]))


@pytest.mark.parametrize("text, problem", [("system: [unclosed", "not valid YAML"),
                                           ("- a list", "expected a mapping")])
def test_a_broken_run_config_is_named(tmp_path, text, problem):
    from lorakit.cli.infer import trained_system
    from lorakit.tools.merge import trained_4bit

    (tmp_path / "run_config.yaml").write_text(text)
    for read in (trained_system, trained_4bit):
        with pytest.raises(ValueError, match=problem) as err:
            read(tmp_path)
        assert "run_config.yaml" in str(err.value)
    (tmp_path / "run_config.yaml").write_text("system: Be brief.\ntrain_type: qlora\n")
    assert trained_system(tmp_path) == "Be brief." and trained_4bit(tmp_path)
