"""Mixed-batch LoRA inference: AdapterBank (every row its own adapter) vs the base model alone.

    python benchmarks/serve_mixed.py                # 134M Llama, fp32, r=16 all-linear adapters
    python benchmarks/serve_mixed.py --small        # a quick run on a 4-layer model
    python benchmarks/serve_mixed.py --dtype both   # fp32 and bf16 side by side, interleaved

(a) prefill, batch 8 x 128 tokens, 8 different adapters; (b) one decode step against a KV cache
of 128 tokens, batch 32, 32 different adapters, also through PEFT's mixed-batch forward
(`adapter_names=`) for comparison. --dtype sets the dtype of the model, the bank and the KV cache
(bf16 is what `lorakit infer`/`serve --torch_dtype auto` load on a GPU or on a CPU with a bf16
matrix unit). All in one process: each round times every variant once, alternating which goes
first, and the table reports the median of per-round ratios to the base model of the same dtype
(and, with --dtype both, of each bf16 variant to its fp32 twin).
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


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(config: dict, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**config)).to(dtype).eval()


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


def peft_model(config: dict, paths: list[str], dtype: torch.dtype = torch.float32):
    import peft

    model = peft.PeftModel.from_pretrained(build(config, dtype), paths[0], adapter_name="a0")
    for i, path in enumerate(paths[1:], 1):
        model.load_adapter(path, adapter_name=f"a{i}")
    return model.eval()


def decode_inputs(config: dict, batch: int, context: int, dtype: torch.dtype = torch.float32) -> dict:
    """One new token per row after `context` cached tokens (random keys and values: timing only)."""
    heads, dim = config["num_key_value_heads"], config["hidden_size"] // config["num_attention_heads"]
    g = torch.Generator().manual_seed(2)
    cache = DynamicCache([(torch.randn(batch, heads, context, dim, generator=g).to(dtype),
                           torch.randn(batch, heads, context, dim, generator=g).to(dtype))
                          for _ in range(config["num_hidden_layers"])])
    return dict(input_ids=torch.randint(0, config["vocab_size"], (batch, 1), generator=g),
                attention_mask=torch.ones(batch, context + 1, dtype=torch.long),
                position_ids=torch.full((batch, 1), context), past_key_values=cache, use_cache=True)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(variants: dict, rounds: int) -> dict[str, list[float]]:
    """name -> seconds of each round; every round times each variant once, alternating the order."""
    for fn in variants.values():  # warm-up
        fn()
    times = {name: [] for name in variants}
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for name in order:
            times[name].append(timed(variants[name]))
    return times


def ratio(times: dict[str, list[float]], name: str, reference: str) -> float:
    """Median of the per-round ratios of `name` to `reference`."""
    return statistics.median(x / y for x, y in zip(times[name], times[reference]))


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a 4-layer, 256-wide model for a quick run")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 5 prefill, 10 decode)")
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT comparison")
    parser.add_argument("--dtype", choices=[*DTYPES, "both"], default="fp32",
                        help="dtype of the model, the bank and the KV cache; both: fp32 and bf16 interleaved")
    args = parser.parse_args()
    config = SMALL if args.small else FULL
    dtypes = list(DTYPES) if args.dtype == "both" else [args.dtype]
    flags = {k: v for k, v in torch.cpu.get_capabilities().items() if k in ("avx512_bf16", "amx_bf16")}
    print(f"Llama {sum(p.numel() for p in build(config).parameters()) / 1e6:.0f}M params, {'/'.join(dtypes)}, "
          f"{torch.get_num_threads()} threads, CPU {flags}; adapters r={RANK} all-linear; "
          f"load average {os.getloadavg()[0]:.2f}")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        paths = write_adapters(build(config), folder, 32)
        bases, banks, pefts = {}, {}, {}
        for d in dtypes:
            bases[d], banks[d] = build(config, DTYPES[d]), AdapterBank(build(config, DTYPES[d]))
            for i, path in enumerate(paths):
                banks[d].load(f"a{i}", path)
            if not args.no_peft:
                pefts[d] = peft_model(config, paths, DTYPES[d])

        ids = torch.randint(0, config["vocab_size"], (8, 128), generator=torch.Generator().manual_seed(1))

        def prefill(model, bank, adapters):
            with bank.rows(adapters):
                model(input_ids=ids, logits_to_keep=1)

        variants = {}
        for d in dtypes:
            variants[f"base {d}"] = lambda d=d: prefill(bases[d], banks[d], [None] * 8)
            variants[f"bank {d}"] = lambda d=d: prefill(banks[d].model, banks[d], banks[d].names[:8])
        times = compare(variants, args.rounds or 5)
        rows += summary(times, dtypes, "prefill 8x128", 8 * 128, {"base": ("base model", ""),
                                                                   "bank": ("bank, 8 adapters", "<= 1.10")})

        inputs = {d: decode_inputs(config, 32, 128, DTYPES[d]) for d in dtypes}

        def decode(model, d, **extra):
            model(**inputs[d], **extra, logits_to_keep=1)
            inputs[d]["past_key_values"].crop(-1)  # back to the 128 cached tokens

        def bank_decode(d):
            with banks[d].rows(banks[d].names):
                decode(banks[d].model, d)

        variants = {}
        for d in dtypes:
            variants[f"base {d}"] = lambda d=d: decode(bases[d], d)
            variants[f"bank {d}"] = lambda d=d: bank_decode(d)
            if pefts:
                variants[f"peft {d}"] = lambda d=d: decode(pefts[d], d, adapter_names=[f"a{i}" for i in range(32)])
        times = compare(variants, args.rounds or 10)
        rows += summary(times, dtypes, "decode bs32, ctx 128", 32, {"base": ("base model", ""),
                                                                    "bank": ("bank, 32 adapters", "<= 1.5"),
                                                                    "peft": ("PEFT adapter_names=, 32", "")})
    both = len(dtypes) > 1
    print(f"\n| {'case':<21} | dtype | {'variant':<24} | {'ms':>8} | {'tokens/s':>8} | {'ratio to base':>13} | "
          f"{'target':>7} |" + (" bf16 / fp32 |" if both else ""))
    print(f"|{'-' * 23}|-------|{'-' * 26}|{'-' * 10}|{'-' * 10}|{'-' * 15}|{'-' * 9}|"
          + ("-------------|" if both else ""))
    for case, d, variant, seconds, tokens_s, to_base, target, to_fp32 in rows:
        print(f"| {case:<21} | {d:<5} | {variant:<24} | {seconds * 1e3:>8.1f} | {tokens_s:>8.0f} | {to_base:>13.3f} | "
              f"{target:>7} |" + (f" {to_fp32 or '':>11{'.3f' if to_fp32 else ''}} |" if both else ""))


def summary(times: dict[str, list[float]], dtypes: list[str], case: str, tokens: int,
            labels: dict[str, tuple[str, str]]) -> list[tuple]:
    """Table rows: (case, dtype, variant, median s, tokens/s, ratio to base, target, ratio to fp32 or None)."""
    rows = []
    for d in dtypes:
        for kind, (label, target) in labels.items():
            name = f"{kind} {d}"
            if name not in times:
                continue
            seconds = statistics.median(times[name])
            to_fp32 = ratio(times, name, f"{kind} fp32") if d != "fp32" and f"{kind} fp32" in times else None
            rows.append((case, d, label, seconds, tokens / seconds, ratio(times, name, f"base {d}"), target, to_fp32))
    return rows


if __name__ == "__main__":
    main()
