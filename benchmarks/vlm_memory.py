"""Peak memory of one training step of a LLaVA-style model with LoRA on all three parts (vision tower,
projector, language model): lorakit (memory savers on, and off) vs PEFT, on the same model and batch.

Each variant runs in a fresh process (this script re-runs itself with --variant), which builds the same
random LLaVA from a config (CLIP vision tower 64x64 images in 8x8 patches -> 64 image tokens, MLP projector,
Llama; 4 layers of width 384 each), attaches LoRA r=16 to every Linear of the three parts (the same module
list for both libraries), and runs forward + backward + AdamW step on the same batch (fp32). Memory is the
process's VmHWM (peak resident set) from /proc/self/status, and its growth over the VmRSS just before the
step (the model and the libraries already loaded). One step per process: VmHWM is a high-water mark.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vlm_memory.py
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

VARIANTS = ("peft", "lorakit", "lorakit-no-savers")


def status(field: str) -> float:
    """A /proc/self/status field in MiB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def build(seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    width = dict(hidden_size=384, intermediate_size=1024, num_attention_heads=6, num_hidden_layers=4)
    config = tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(image_size=64, patch_size=8, **width),
        text_config=tf.LlamaConfig(vocab_size=1000, num_key_value_heads=2, pad_token_id=0, **width),
        image_token_id=999, vision_feature_layer=-2, vision_feature_select_strategy="default")
    return tf.LlavaForConditionalGeneration(config)


def batch(size: int, text: int):
    """`size` rows of 64 image tokens and `text` text tokens, labels on the text."""
    g = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.full((size, 64), 999), torch.randint(3, 990, (size, text), generator=g)], dim=1)
    labels = ids.clone()
    labels[:, :64] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "pixel_values": torch.randn(size, 3, 64, 64, generator=g)}


def run_variant(variant: str, size: int, text: int) -> dict:
    model = build()
    targets = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    if variant == "peft":
        import peft

        wrapped = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    else:
        import lorakit

        wrapped = lorakit.get_peft_model(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=targets),
                                         memory_savers=variant == "lorakit")
    savers = {} if variant == "peft" else {k: len(v) for k, v in getattr(wrapped, "memory_savers", {}).items()}
    vision_blocks = [] if variant == "peft" else [p for p in wrapped.memory_savers.get("norm_outputs", [])
                                                  if p.startswith("model.vision_tower.encoder.layers.")]
    wrapped.train()
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-4)
    inputs = batch(size, text)
    before = status("VmRSS")
    started = time.perf_counter()
    loss = wrapped(**inputs).loss
    loss.backward()
    optimizer.step()
    step_s = time.perf_counter() - started
    return {"variant": variant, "loss": round(float(loss), 6), "vmhwm_mib": round(status("VmHWM"), 1),
            "rss_before_step_mib": round(before, 1), "step_growth_mib": round(status("VmHWM") - before, 1),
            "step_s": round(step_s, 2), "savers": savers, "vision_blocks_with_norm_saver": len(vision_blocks)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=VARIANTS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--text", type=int, default=64)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.batch, args.text)))
        return 0
    rows = []
    for variant in VARIANTS:
        done = subprocess.run([sys.executable, __file__, "--variant", variant, "--batch", str(args.batch),
                               "--text", str(args.text)], capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nbatch {args.batch} x ({64} image + {args.text} text tokens), LoRA r=16 on every Linear of the three "
          f"parts, fp32, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}\n")
    print("| variant | peak VmHWM (MiB) | growth over pre-step RSS (MiB) | step (s) | loss |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['vmhwm_mib']:.0f} | {r['step_growth_mib']:.0f} | {r['step_s']:.2f} | "
              f"{r['loss']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
