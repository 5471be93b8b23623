"""The bank over a 4-bit (NF4) base: each row of a mixed batch equals PeftModel over the same NF4 base."""
import torch

from helpers import LM_IDS, quantized_llama, save_adapter
from lorakit import PeftModel
from lorakit.quant.linear4bit import NF4Linear
from lorakit.serve import AdapterBank


def test_mixed_batch_over_nf4_equals_peft_model_on_it(tmp_path):
    folders = {"attn": save_adapter("llama", tmp_path / "attn", 1, r=4, lora_alpha=8,
                                    target_modules=["q_proj", "v_proj"]),
               "dora": save_adapter("llama", tmp_path / "dora", 2, r=2, lora_alpha=4, use_dora=True,
                                    target_modules=["gate_proj", "down_proj"])}
    bank = AdapterBank(quantized_llama()[0])
    for name, folder in folders.items():
        bank.load(name, folder)
    assert isinstance(bank.model.model.layers[0].self_attn.q_proj.base_layer, NF4Linear)
    assert isinstance(bank.model.model.layers[1].mlp.down_proj.base_layer, NF4Linear)
    rows = ["attn", None, "dora", "attn"]
    ids = LM_IDS[[0, 1, 0, 1]]
    with torch.no_grad(), bank.rows(rows):
        mixed = bank.model(input_ids=ids).logits
    for i, name in enumerate(rows):
        model = quantized_llama()[0]
        if name is not None:
            model = PeftModel.from_pretrained(model, folders[name])
        with torch.no_grad():
            expected = model(input_ids=ids[i:i + 1]).logits
        torch.testing.assert_close(mixed[i:i + 1], expected, atol=1e-5, rtol=0, msg=f"row {i} ({name})")
