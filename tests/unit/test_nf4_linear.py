"""NF4Linear (a frozen 4-bit Linear) and LoRA / DoRA over it, against the dequantised weight: forward,
gradients, what is saved for backward, casting, a training step, and merging into 4-bit weights. The
checks against PEFT and bitsandbytes are in tests/parity/test_qlora.py."""
import warnings

import pytest
import torch
from torch import nn

from helpers import LM_IDS, quantized_llama
from lorakit import LoraConfig, get_peft_model
from lorakit.modules import is_within
from lorakit.quant.linear4bit import NF4Linear, linears_to_quantize
from lorakit.quant.nf4 import dequantize_nf4


def test_nf4_linear_computes_with_the_dequantised_weight():
    linear = nn.Linear(64, 48)
    q = NF4Linear.from_linear(linear)
    x = torch.randn(3, 64)
    torch.testing.assert_close(q(x), x @ dequantize_nf4(q.quantized).T + linear.bias, rtol=0, atol=0)
    assert all(b.dtype in (torch.uint8, torch.float32) for b in q.buffers())


@pytest.mark.parametrize("shape", [(48, 64), (7, 9), (3, 300)])
def test_the_whole_weight_gpu_formula_equals_the_chunked_one(shape):
    from lorakit.quant.linear4bit import dequantize_whole
    from lorakit.quant.nf4 import NF4_CODE, block_absmax, quantize_nf4

    q = quantize_nf4(torch.randn(shape))
    whole = dequantize_whole(q.data, block_absmax(q), NF4_CODE, q.blocksize, q.numel, torch.float32)
    assert torch.equal(whole.view(shape), dequantize_nf4(q))


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
def test_a_qlora_training_step_updates_only_adapters(use_dora):
    model, _ = quantized_llama()
    packed = model.model.layers[0].mlp.up_proj.weight_packed.clone()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", use_dora=use_dora,
                                                  lora_dropout=0.1))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = peft_model(input_ids=LM_IDS, labels=LM_IDS).loss
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
        expected = peft_model(input_ids=LM_IDS).logits
        merged = peft_model.merge_and_unload(quantized_merge="dequantize")
        assert isinstance(merged.model.layers[0].self_attn.q_proj, nn.Linear)
        torch.testing.assert_close(merged(input_ids=LM_IDS).logits, expected, rtol=1e-4, atol=1e-5)


def test_merge_requantized_warns_and_stays_4bit():
    model, _ = quantized_llama()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    with torch.no_grad():
        expected = peft_model(input_ids=LM_IDS).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=LM_IDS).logits
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            merged = peft_model.merge_and_unload(quantized_merge="requantize")
        assert any("rounds away part of the LoRA update" in str(w.message) for w in caught)
        assert isinstance(merged.model.layers[0].self_attn.q_proj, NF4Linear)
        got = merged(input_ids=LM_IDS).logits
    assert not torch.equal(got, expected)  # rounding lost part of the update, but far from all of it:
    assert (got - expected).abs().mean() < 0.5 * (base - expected).abs().mean()




def test_a_module_kept_whole_keeps_every_layer_inside_it_dense():
    import transformers as tf

    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, vocab_size=99)
    bert = tf.BertForSequenceClassification(tf.BertConfig(**small))
    roberta = tf.RobertaForSequenceClassification(tf.RobertaConfig(**small))  # its head holds two Linears
    skip = {"classifier", "pooler"}
    assert "bert.pooler.dense" not in linears_to_quantize(bert, skip)
    assert "bert.encoder.layer.0.attention.self.query" in linears_to_quantize(bert, skip)
    assert not [n for n in linears_to_quantize(roberta, skip) if n.startswith("classifier")]
    assert is_within("bert.pooler.dense", {"bert.pooler"}) and is_within("bert.pooler.dense", {"dense"})
    assert not is_within("bert.pooler.dense", {"ert.pooler"})  # whole name parts only, as PEFT matches
