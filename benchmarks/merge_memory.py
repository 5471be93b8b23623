"""Peak memory of `lorakit merge` against the base model's size on disk, and PEFT's merge_and_unload beside it.

    python benchmarks/merge_memory.py                         # ~220M-param Llama, fp32, 200MB and 1GB shards
    python benchmarks/merge_memory.py --hidden 256 --layers 2 --shards 20MB   # smoke test

A Llama made from a config with random weights is saved in shards of each --shards size, with an all-linear
r=16 LoRA adapter whose A and B are both random (so every targeted weight really changes). Every cell runs in
a fresh child process that reports its own /proc/self/status VmHWM (peak resident set: anonymous memory plus
mapped file pages) and its peak RssAnon, sampled every millisecond (mapped safetensors pages are page cache
the kernel can drop; anonymous memory is not):
- lorakit: lorakit.cli.main(["merge", "--model", BASE, "--adapter", ADAPTER, "--max_shard_size", SHARD, ...]);
- peft: AutoModelForCausalLM.from_pretrained + PeftModel.from_pretrained + merge_and_unload + save_pretrained;
- idle: the same imports and nothing else, the interpreter baseline subtracted below;
- tiny: the same merge of a 1-layer, hidden-64 Llama: imports and every fixed cost of the code path.
Writes benchmarks/results/merge_memory.json (see --out).
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qlora_memory import AnonPeak, status_mb  # noqa: E402

MB = 1e6


def child(kind: str, base: str, adapter: str, out: str, shard: str) -> None:
    """Run one cell in this (fresh) process and print its memory as one JSON line."""
    import torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401  (both tools import it; outside the timing)

    if kind.endswith("lorakit"):
        import lorakit.tools.merge  # noqa: F401
        from lorakit.cli import main
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    start = time.perf_counter()
    with AnonPeak() as anon:
        if kind == "lorakit":
            main(["merge", "--model", base, "--adapter", adapter, "--output_dir", out, "--max_shard_size", shard])
        elif kind == "peft":
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out, max_shard_size=shard)
    print(json.dumps({"hwm_mb": status_mb("VmHWM") * 1.048576, "anon_peak_mb": anon.peak * 1.048576,
                      "wall_s": time.perf_counter() - start}))


def in_child(kind: str, base: str, adapter: str, out: str, shard: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", kind, base, adapter, out, shard],
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"child {kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_model(folder: Path, args, shards: list[str], **size) -> tuple[str, list[str], int]:
    """Save the random Llama once per shard size, and the adapter; return (adapter, base folders, params)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**size, vocab_size=32000))
    params = sum(p.numel() for p in model.parameters())
    bases = []
    for shard in shards:
        bases.append(str(folder / f"base-{shard}"))
        model.save_pretrained(bases[-1], max_shard_size=shard)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(str(folder / "adapter"))
    return str(folder / "adapter"), bases, params


def max_difference(a: str, b: str) -> float:
    """Largest |a - b| over every tensor of two model folders (lorakit's and PEFT's merged outputs)."""
    from safetensors import safe_open

    def tensors(folder):
        for f in sorted(Path(folder).glob("*.safetensors")):
            with safe_open(str(f), "pt") as s:
                for k in s.keys():
                    yield k, s.get_tensor(k)

    theirs = dict(tensors(b))
    return max((t.float() - theirs.pop(k).float()).abs().max().item() for k, t in tensors(a))


def files_mb(folder: str) -> tuple[float, float]:
    sizes = [f.stat().st_size / MB for f in Path(folder).glob("*.safetensors")]
    return sum(sizes), max(sizes)


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        return child(*sys.argv[2:7])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--shards", nargs="+", default=["200MB", "1GB"], help="base shard sizes (also the output's)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "merge_memory.json"))
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="merge_memory_") as tmp:
        adapter, bases, params = make_model(Path(tmp), args, args.shards, hidden_size=args.hidden,
                                            num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                            num_key_value_heads=args.heads, intermediate_size=args.intermediate)
        tiny_adapter, (tiny,), _ = make_model(Path(tmp) / "tiny", args, ["1GB"], hidden_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=4, intermediate_size=128)
        idle = {k: in_child(f"idle-{k}", "", "", "", "")["hwm_mb"] for k in ("lorakit", "peft")}
        tiny_cells = {k: in_child(k, tiny, tiny_adapter, str(Path(tmp) / f"tiny-{k}"), "1GB") for k in idle}
        tiny = {k: c["hwm_mb"] for k, c in tiny_cells.items()}
        rows = []
        for shard, base in zip(args.shards, bases):
            size, largest = files_mb(base)
            row = {"shard": shard, "model_mb": size, "largest_shard_mb": largest}
            for kind in ("lorakit", "peft"):
                out = str(Path(tmp) / f"{kind}-{shard}")
                row[kind] = in_child(kind, base, adapter, out, shard)
                print(f"{shard} {kind}: {row[kind]}", flush=True)
            row["max_abs_diff"] = max_difference(str(Path(tmp) / f"lorakit-{shard}"), str(Path(tmp) / f"peft-{shard}"))
            rows.append(row)
            for kind in ("lorakit", "peft"):
                shutil.rmtree(Path(tmp) / f"{kind}-{shard}")

    head = ["base shards", "model on disk (MB)", "largest shard (MB)", "tool", "peak RSS VmHWM (MB)",
            "peak / model", "(peak - idle) / shard", "(peak - tiny) / shard", "peak anon (MB)", "wall (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        for kind in ("lorakit", "peft"):
            c = r[kind]
            lines.append(f"| {r['shard']} | {r['model_mb']:.0f} | {r['largest_shard_mb']:.0f} | {kind} | "
                         f"{c['hwm_mb']:.0f} | {c['hwm_mb'] / r['model_mb']:.2f} | "
                         f"{(c['hwm_mb'] - idle[kind]) / r['largest_shard_mb']:.2f} | "
                         f"{(c['hwm_mb'] - tiny[kind]) / r['largest_shard_mb']:.2f} | {c['anon_peak_mb']:.0f} | "
                         f"{c['wall_s']:.1f} |")
        lines.append(f"| {r['shard']} | | | lorakit / peft | "
                     f"{r['lorakit']['hwm_mb'] / r['peft']['hwm_mb']:.2f} | | | | "
                     f"{r['lorakit']['anon_peak_mb'] / r['peft']['anon_peak_mb']:.2f} | "
                     f"{r['lorakit']['wall_s'] / r['peft']['wall_s']:.2f} |")
    print(f"\nLlama {params / 1e6:.0f}M params (hidden {args.hidden}, {args.layers} layers, intermediate "
          f"{args.intermediate}), fp32; all-linear LoRA r={args.rank}; idle interpreter VmHWM: lorakit imports "
          f"{idle['lorakit']:.0f} MB, peft imports {idle['peft']:.0f} MB; the same merge of a 1-layer hidden-64 "
          f"Llama (imports + fixed costs): lorakit {tiny['lorakit']:.0f} MB in {tiny_cells['lorakit']['wall_s']:.1f}s, "
          f"peft {tiny['peft']:.0f} MB in {tiny_cells['peft']['wall_s']:.1f}s; "
          "MB = 10^6 bytes\n")
    print("\n".join(lines))
    print("max |lorakit merged - peft merged| over all tensors: "
          + ", ".join(f"{r['shard']}: {r['max_abs_diff']:.2e}" for r in rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "params": params, "idle_hwm_mb": idle, "tiny": tiny_cells,
                               "rows": rows, "machine": platform.platform()}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
