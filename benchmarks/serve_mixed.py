"""Mixed-batch LoRA inference: AdapterBank (every row its own adapter) vs the base model alone.

    python benchmarks/serve_mixed.py            # 134M Llama, fp32, r=16 all-linear adapters
    python benchmarks/serve_mixed.py --small    # a quick run on a 4-layer model

(a) prefill, batch 8 x 128 tokens, 8 different adapters; (b) one decode step against a KV cache
of 128 tokens, batch 32, 32 different adapters, also through PEFT's mixed-batch forward
(`adapter_names=`) for comparison. All in one process: each round times every variant once,
alternating which goes first, and the table reports the median of per-round ratios to the base.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time

import torch
from safetensors.torch import save_file
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from lorakit import LoraConfig
from lorakit.serve import AdapterBank

FULL = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
            intermediate_size=2048, vocab_size=32000)
SMALL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
             intermediate_size=688, vocab_size=8000)
RANK = 16


def build(config: dict) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


def write_adapters(model, folder: str, count: int) -> list[str]:
    """`count` random r=16 all-linear adapters in PEFT's format (no injection needed to make them)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    targets = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
    paths = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for name, m in linears:
            key = f"base_model.model.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, m.in_features, generator=g) / math.sqrt(m.in_features)
            tensors[f"{key}.lora_B.weight"] = torch.randn(m.out_features, RANK, generator=g) * 0.01
        path = os.path.join(folder, f"a{i}")
        os.makedirs(path)
        save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
        LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets).save_pretrained(path)
        paths.append(path)
    return paths


def peft_model(config: dict, paths: list[str]):
    import peft

    model = peft.PeftModel.from_pretrained(build(config), paths[0], adapter_name="a0")
    for i, path in enumerate(paths[1:], 1):
        model.load_adapter(path, adapter_name=f"a{i}")
    return model.eval()


def decode_inputs(config: dict, batch: int, context: int) -> dict:
    """One new token per row after `context` cached tokens (random keys and values: timing only)."""
    heads, dim = config["num_key_value_heads"], config["hidden_size"] // config["num_attention_heads"]
    g = torch.Generator().manual_seed(2)
    cache = DynamicCache([(torch.randn(batch, heads, context, dim, generator=g),
                           torch.randn(batch, heads, context, dim, generator=g))
                          for _ in range(config["num_hidden_layers"])])
    return dict(input_ids=torch.randint(0, config["vocab_size"], (batch, 1), generator=g),
                attention_mask=torch.ones(batch, context + 1, dtype=torch.long),
                position_ids=torch.full((batch, 1), context), past_key_values=cache, use_cache=True)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(variants: dict, rounds: int) -> dict[str, tuple[float, float]]:
    """name -> (median seconds, median per-round ratio to the first variant)."""
    for fn in variants.values():  # warm-up
        fn()
    times = {name: [] for name in variants}
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for name in order:
            times[name].append(timed(variants[name]))
    base = list(variants)[0]
    return {name: (statistics.median(t), statistics.median(x / b for x, b in zip(t, times[base])))
            for name, t in times.items()}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a 4-layer, 256-wide model for a quick run")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 5 prefill, 10 decode)")
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT comparison")
    args = parser.parse_args()
    config = SMALL if args.small else FULL
    base, bank = build(config), AdapterBank(build(config))
    print(f"Llama {sum(p.numel() for p in base.parameters()) / 1e6:.0f}M params, fp32, "
          f"{torch.get_num_threads()} threads; adapters r={RANK} all-linear")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        paths = write_adapters(base, folder, 32)
        for i, path in enumerate(paths):
            bank.load(f"a{i}", path)
        names = bank.names
        peft = None if args.no_peft else peft_model(config, paths)

        ids = torch.randint(0, config["vocab_size"], (8, 128), generator=torch.Generator().manual_seed(1))

        def prefill(model, adapters):
            with bank.rows(adapters):
                model(input_ids=ids, logits_to_keep=1)

        result = compare({"base": lambda: prefill(base, [None] * 8),
                          "bank": lambda: prefill(bank.model, names[:8])}, args.rounds or 5)
        rows += [("prefill 8x128", "base model", *result["base"], ""),
                  ("prefill 8x128", "bank, 8 adapters", *result["bank"], "<= 1.10")]

        inputs = decode_inputs(config, 32, 128)

        def decode(model, **extra):
            model(**inputs, **extra, logits_to_keep=1)
            inputs["past_key_values"].crop(-1)  # back to the 128 cached tokens

        def bank_decode():
            with bank.rows(names):
                decode(bank.model)

        variants = {"base": lambda: decode(base), "bank": bank_decode}
        if peft is not None:
            variants["peft"] = lambda: decode(peft, adapter_names=[f"a{i}" for i in range(32)])
        result = compare(variants, args.rounds or 10)
        rows += [("decode bs32, ctx 128", "base model", *result["base"], ""),
                 ("decode bs32, ctx 128", "bank, 32 adapters", *result["bank"], "<= 1.5")]
        if peft is not None:
            rows.append(("decode bs32, ctx 128", "PEFT adapter_names=, 32", *result["peft"], ""))
    print(f"\n| {'case':<21} | {'variant':<24} | {'ms':>8} | {'ratio to base':>13} | {'target':>7} |")
    print(f"|{'-' * 23}|{'-' * 26}|{'-' * 10}|{'-' * 15}|{'-' * 9}|")
    for case, variant, seconds, ratio, target in rows:
        print(f"| {case:<21} | {variant:<24} | {seconds * 1e3:>8.1f} | {ratio:>13.3f} | {target:>7} |")


if __name__ == "__main__":
    main()
