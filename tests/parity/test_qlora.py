"""QLoRA against PEFT and bitsandbytes: bitsandbytes' Linear4bit, LoRA / DoRA over the NF4 base against
PEFT on the dequantised base, and bitsandbytes 4-bit checkpoints loaded and saved without bitsandbytes.
NF4Linear and LoRA over it against the dequantised weight alone are in tests/unit/test_nf4_linear.py."""
import warnings

import pytest
import torch
from torch import nn

import nf4_reference
from helpers import LM_IDS, build_model, quantized_llama
from lorakit import LoraConfig, get_peft_model
from lorakit.quant.linear4bit import NF4Linear


def dense_twin(model: nn.Module) -> nn.Module:
    """The same model with each NF4Linear replaced by an nn.Linear holding its dequantised weight."""
    twin = build_model("llama")
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if k in twin.state_dict()}, strict=False)
    for name, module in model.named_modules():
        if isinstance(module, NF4Linear):
            twin.get_submodule(name).weight.data.copy_(module.dequantize())
    return twin


def test_bitsandbytes_linear4bit_agrees():
    import bitsandbytes as bnb

    linear = nn.Linear(128, 64)
    ref = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    ref.load_state_dict(linear.state_dict())
    ref = ref.to("cpu")  # quantises on .to(), as bitsandbytes does
    x = torch.randn(5, 128)
    formula = nf4_reference.dequantize(ref.weight.data, ref.weight.quant_state)
    expected = x @ formula.T + linear.bias
    with torch.no_grad():
        torch.testing.assert_close(NF4Linear.from_linear(linear)(x), expected, rtol=1e-5, atol=1e-5)
        theirs = ref(x)
    nf4_reference.check_bitsandbytes(expected, theirs, "Linear4bit's forward", tol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_over_nf4_matches_peft_on_the_dequantised_base(use_dora, tmp_path):
    from peft import PeftModel

    model, replaced = quantized_llama()
    assert "model.layers.0.self_attn.q_proj" in replaced and "lm_head" not in replaced
    twin = dense_twin(model)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, use_dora=use_dora)
    ours = get_peft_model(model, config).eval()
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    ours.save_pretrained(str(tmp_path))
    theirs = PeftModel.from_pretrained(twin, str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=LM_IDS).logits, theirs(input_ids=LM_IDS).logits, rtol=1e-4, atol=1e-5)


def _bnb_4bit(folder) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=config, device_map="cpu").eval()


def formula_twin(folder_4bit, dense_folder) -> nn.Module:
    """The dense model with each 4-bit weight saved in `folder_4bit` replaced by what its packed codes
    and scales define (the NF4 formula, not bitsandbytes' CPU dequantisation)."""
    from bitsandbytes.functional import QuantState
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    state = load_file(str(folder_4bit / "model.safetensors"))
    twin = AutoModelForCausalLM.from_pretrained(str(dense_folder)).eval()
    for key in [k for k in state if k.endswith(".weight.quant_state.bitsandbytes__nf4")]:
        weight = key.removesuffix(".quant_state.bitsandbytes__nf4")
        stats = {k.removeprefix(weight + "."): v for k, v in state.items() if k.startswith(weight + ".")}
        quant_state = QuantState.from_dict(stats, device="cpu")
        twin.get_submodule(weight.removesuffix(".weight")).weight.data.copy_(
            nf4_reference.dequantize(state[weight], quant_state))
    return twin


def check_bitsandbytes_logits(bnb_model: nn.Module, expected: torch.Tensor) -> None:
    """Warn where transformers' 4-bit model gives other logits than the formula's weights (or fails)."""
    try:
        with torch.no_grad():
            theirs = bnb_model(input_ids=LM_IDS).logits
    except RuntimeError as error:  # bitsandbytes 0.50.2 on AVX-512 BF16: in_features < blocksize
        warnings.warn(nf4_reference.BitsandbytesDequantisationWrong(f"bitsandbytes' 4-bit forward failed: {error}"),
                      stacklevel=2)
        return
    nf4_reference.check_bitsandbytes(expected, theirs, "a 4-bit model's logits", tol=1e-5)


def test_loads_a_bitsandbytes_4bit_checkpoint_without_bitsandbytes_and_saves_one_back(tmp_path):
    from transformers import AutoModelForCausalLM

    from lorakit.io.checkpoint4bit import load_nf4, save_nf4

    build_model("llama").save_pretrained(str(tmp_path / "dense"))
    reference = _bnb_4bit(tmp_path / "dense")
    reference.save_pretrained(str(tmp_path / "bnb"))
    ours, names = load_nf4(AutoModelForCausalLM, str(tmp_path / "bnb"), torch.float32, set())
    assert "model.layers.1.mlp.down_proj" in names
    formula = formula_twin(tmp_path / "bnb", tmp_path / "dense")
    for name in names:
        assert torch.equal(ours.get_submodule(name).dequantize(), formula.get_submodule(name).weight), name
    with torch.no_grad():
        expected = formula(input_ids=LM_IDS).logits
        torch.testing.assert_close(ours(input_ids=LM_IDS).logits, expected, rtol=1e-5, atol=1e-5)
    check_bitsandbytes_logits(reference, expected)
    save_nf4(ours, str(tmp_path / "ours"))
    again = _bnb_4bit(tmp_path / "ours")  # transformers + bitsandbytes load what lorakit saved ...
    with torch.no_grad():  # ... and it holds the same weights
        torch.testing.assert_close(formula_twin(tmp_path / "ours", tmp_path / "dense")(input_ids=LM_IDS).logits,
                                   expected, rtol=0, atol=0)
    check_bitsandbytes_logits(again, expected)


def test_quant_state_key_missing_is_named(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from lorakit.io.checkpoint4bit import load_nf4

    build_model("llama").save_pretrained(str(tmp_path / "dense"))
    _bnb_4bit(tmp_path / "dense").save_pretrained(str(tmp_path / "bnb"))
    state = load_file(str(tmp_path / "bnb" / "model.safetensors"))
    del state["model.layers.0.self_attn.q_proj.weight.nested_absmax"]
    save_file(state, str(tmp_path / "bnb" / "model.safetensors"))
    with pytest.raises((KeyError, ValueError), match="model.layers.0.self_attn.q_proj.weight.nested_absmax"):
        load_nf4(AutoModelForCausalLM, str(tmp_path / "bnb"), torch.float32, set())


def test_a_misshapen_checkpoint_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from lorakit.io.checkpoint4bit import load_nf4

    build_model("llama").save_pretrained(str(tmp_path / "dense"))
    state = load_file(str(tmp_path / "dense" / "model.safetensors"))
    state["model.layers.0.mlp.down_proj.weight"] = state["model.layers.0.mlp.down_proj.weight"][:, :-1].contiguous()
    save_file(state, str(tmp_path / "dense" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj.weight has shape \(\d+, \d+\) where"):
        load_nf4(AutoModelForCausalLM, str(tmp_path / "dense"), torch.float32, set())


def test_4bit_loading_never_imports_bitsandbytes(tmp_path):
    import subprocess
    import sys

    build_model("llama").save_pretrained(str(tmp_path / "dense"))
    _bnb_4bit(tmp_path / "dense").save_pretrained(str(tmp_path / "bnb"))
    script = ("import sys; sys.modules['bitsandbytes'] = None  # any import of it now fails\n"
              "import torch; from transformers import AutoModelForCausalLM\n"
              "from lorakit.io.checkpoint4bit import load_nf4\n"
              f"model, names = load_nf4(AutoModelForCausalLM, {str(tmp_path / 'bnb')!r}, torch.float32, set())\n"
              "print(len(names), model(torch.tensor([[1, 2, 3]])).logits.isfinite().all().item())\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["14", "True"]
