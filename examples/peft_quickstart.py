"""PEFT's LoRA quickstart with one change: the import line says lorakit instead of peft.

The hub is offline here, so the "pretrained" model is a tiny Llama saved to a local folder
first; everything after that is the quickstart as PEFT documents it.

    python examples/peft_quickstart.py [output_dir]
"""
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lorakit import LoraConfig, PeftModel, TaskType, get_peft_model

work = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()
torch.manual_seed(0)
LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)).save_pretrained(f"{work}/base")

model = AutoModelForCausalLM.from_pretrained(f"{work}/base")
peft_config = LoraConfig(task_type=TaskType.CAUSAL_LM, inference_mode=False, r=8, lora_alpha=32, lora_dropout=0.1)
model = get_peft_model(model, peft_config)
model.print_trainable_parameters()

batch = torch.randint(0, 128, (4, 32))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
model.train()
for step in range(10):
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    print(f"step {step} loss {loss.item():.4f}")

model.eval()
model.save_pretrained(f"{work}/adapter")
with torch.no_grad():
    trained = model(input_ids=batch).logits
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(f"{work}/base"), f"{work}/adapter")
    print(f"reloaded outputs match: {torch.allclose(model(input_ids=batch).logits, trained, atol=1e-5)}")
    merged = model.merge_and_unload()
    print(f"merged outputs match: {torch.allclose(merged(input_ids=batch).logits, trained, atol=1e-5)}")
