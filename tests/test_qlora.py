"""QLoRA: LoRA and DoRA over NF4 base weights — forward, gradients, memory, PEFT adapters, merging."""
import warnings

import nf4_reference
import pytest
import torch
from conftest import build_model
from torch import nn

from lorakit import LoraConfig, get_peft_model
from lorakit.quant.nf4 import dequantize_nf4
from lorakit.quant.linear4bit import NF4Linear, quantize_linears

IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def quantized_llama(seed: int = 0) -> tuple[nn.Module, list[str]]:
    model = build_model("llama", seed)
    return model, quantize_linears(model, skip={"lm_head"})


def dense_twin(model: nn.Module) -> nn.Module:
    """The same model with each NF4Linear replaced by an nn.Linear holding its dequantised weight."""
    twin = build_model("llama")
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if k in twin.state_dict()}, strict=False)
    for name, module in model.named_modules():
        if isinstance(module, NF4Linear):
            twin.get_submodule(name).weight.data.copy_(module.dequantize())
    return twin


def test_nf4_linear_computes_with_the_dequantised_weight():
    linear = nn.Linear(64, 48)
    q = NF4Linear.from_linear(linear)
    x = torch.randn(3, 64)
    torch.testing.assert_close(q(x), x @ dequantize_nf4(q.quantized).T + linear.bias, rtol=0, atol=0)
    assert all(b.dtype in (torch.uint8, torch.float32) for b in q.buffers())


@pytest.mark.parametrize("shape", [(48, 64), (7, 9), (3, 300)])
def test_the_whole_weight_gpu_formula_equals_the_chunked_one(shape):
    from lorakit.quant.nf4 import NF4_CODE, block_absmax, quantize_nf4
    from lorakit.quant.linear4bit import dequantize_whole

    q = quantize_nf4(torch.randn(shape))
    whole = dequantize_whole(q.data, block_absmax(q), NF4_CODE, q.blocksize, q.numel, torch.float32)
    assert torch.equal(whole.view(shape), dequantize_nf4(q))


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


def test_gradients_reach_the_input_not_the_4bit_weight_and_nothing_full_size_is_saved():
    q = NF4Linear.from_linear(nn.Linear(256, 128))
    x = torch.randn(4, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = q(x)
    out.square().sum().backward()
    reference = x.detach().clone().requires_grad_()
    (reference @ q.dequantize().T + q.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, reference.grad)
    assert max(saved, default=0) < 256 * 128  # the dequantised weight is recomputed, not kept
    assert not any(b.requires_grad for b in q.buffers())


def test_half_precision_cast_keeps_the_quantisation_state_exact():
    model, _ = quantized_llama()
    layer = model.model.layers[0].self_attn.q_proj
    before = layer.dequantize(torch.float32)
    model.to(torch.bfloat16)
    assert layer.weight_nested_absmax.dtype == torch.float32 and layer.bias is None
    torch.testing.assert_close(layer.dequantize(torch.float32), before, rtol=0, atol=0)


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
        torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True])
def test_a_qlora_training_step_updates_only_adapters(use_dora):
    model, _ = quantized_llama()
    packed = model.model.layers[0].mlp.up_proj.weight_packed.clone()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", use_dora=use_dora,
                                                  lora_dropout=0.1))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = peft_model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight_packed, packed)


def test_merging_into_4bit_needs_to_be_asked_for():
    model, _ = quantized_llama()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    with pytest.raises(ValueError, match="quantized_merge='dequantize'"):
        peft_model.merge_adapter()
    with pytest.raises(ValueError, match="say how to merge into them"):
        peft_model.merge_and_unload()


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_dequantized_equals_the_unmerged_model(use_dora):
    model, _ = quantized_llama()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False,
                                                  use_dora=use_dora)).eval()
    with torch.no_grad():
        expected = peft_model(input_ids=IDS).logits
        merged = peft_model.merge_and_unload(quantized_merge="dequantize")
        assert isinstance(merged.model.layers[0].self_attn.q_proj, nn.Linear)
        torch.testing.assert_close(merged(input_ids=IDS).logits, expected, rtol=1e-4, atol=1e-5)


def test_merge_requantized_warns_and_stays_4bit():
    model, _ = quantized_llama()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    with torch.no_grad():
        expected = peft_model(input_ids=IDS).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=IDS).logits
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            merged = peft_model.merge_and_unload(quantized_merge="requantize")
        assert any("rounds away part of the LoRA update" in str(w.message) for w in caught)
        assert isinstance(merged.model.layers[0].self_attn.q_proj, NF4Linear)
        got = merged(input_ids=IDS).logits
    assert not torch.equal(got, expected)  # rounding lost part of the update, but far from all of it:
    assert (got - expected).abs().mean() < 0.5 * (base - expected).abs().mean()


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
            theirs = bnb_model(input_ids=IDS).logits
    except RuntimeError as error:  # bitsandbytes 0.50.2 on AVX-512 BF16: in_features < blocksize
        warnings.warn(nf4_reference.BitsandbytesDequantisationWrong(f"bitsandbytes' 4-bit forward failed: {error}"))
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
        expected = formula(input_ids=IDS).logits
        torch.testing.assert_close(ours(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)
    check_bitsandbytes_logits(reference, expected)
    save_nf4(ours, str(tmp_path / "ours"))
    again = _bnb_4bit(tmp_path / "ours")  # transformers + bitsandbytes load what lorakit saved ...
    with torch.no_grad():  # ... and it holds the same weights
        torch.testing.assert_close(formula_twin(tmp_path / "ours", tmp_path / "dense")(input_ids=IDS).logits,
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
