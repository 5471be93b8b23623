"""Exact live-tensor bytes on CPU, and one real training step measured with them (for `lorakit plan`'s checks).

`LiveBytes` records every allocation and free of torch's CPU allocator (the profiler's memory events),
so the running sum is exactly the bytes of live tensor storage: no allocator slack, no RSS noise.
`measure_step` runs lorakit's own step (the trainer's model preparation and loss, AdamW or another
optimiser, clipping, zero_grad) on a random-weight Llama and returns the peak of that sum.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile, record_function


class LiveBytes:
    """Within the block: every CPU allocation and free, in order; `peak(section)` is the most bytes live."""

    def __enter__(self) -> LiveBytes:
        gc.collect()  # a previous model's reference cycles must not be freed (as negative bytes) in here
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._prof.__exit__(*exc)
        events = self._prof.profiler.kineto_results.events()
        memory = sorted(((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"), key=lambda x: x[0])
        self.sections = {e.name(): (e.start_ns(), e.end_ns()) for e in events if e.name().startswith("section:")}
        total, self.timeline = 0, []
        for t, n in memory:
            total += n
            self.timeline.append((t, total))

    @contextmanager
    def section(self, name: str):
        """Mark a part of the block so that `peak(name)` can look at it alone."""
        with record_function(f"section:{name}"):
            yield

    def left_behind(self, name: str) -> int:
        """Bytes live at the end of the section less those live at its start: what it left for later (a
        forward pass: what it keeps for backward)."""
        start, end = self.sections[f"section:{name}"]
        return next((total for t, total in reversed(self.timeline) if t <= end), 0) - \
            next((total for t, total in reversed(self.timeline) if t < start), 0)

    def peak(self, name: str | None = None) -> int:
        """The most bytes live at any moment of the section (of the whole block without a name)."""
        start, end = self.sections[f"section:{name}"] if name else (-1, float("inf"))
        before = [total for t, total in self.timeline if t < start]
        inside = [total for t, total in self.timeline if start <= t <= end]
        return max(inside + before[-1:], default=0)


@dataclass(frozen=True)
class Cell:
    """One measured training recipe on a random Llama-style model."""
    hidden: int = 64
    intermediate: int = 160
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 512
    train_type: str = "lora"
    rank: int = 8
    targets: tuple[str, ...] = ("all-linear",)
    batch: int = 1
    seq: int = 64
    checkpointing: bool = False
    optim: str = "adamw_torch"
    memory_savers: bool = True
    bf16: bool = False
    accumulation: int = 1
    dropout: float = 0.05

    def config_json(self) -> dict:
        """The model's config.json fields."""
        return {"model_type": "llama", "hidden_size": self.hidden, "intermediate_size": self.intermediate,
                "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
                "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab, "tie_word_embeddings": False,
                "max_position_embeddings": 4096, "torch_dtype": "float32", "hidden_act": "silu"}


def build_optimizer(params: list, name: str) -> torch.optim.Optimizer:
    """The optimiser as it runs on a GPU: torch's AdamW takes its foreach path there by default."""
    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=1e-4, foreach=True)
    if name == "adamw_torch_fused":
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-4)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=1e-2, foreach=False)
    raise ValueError(f"no CPU stand-in for optimiser {name}")


def _model(cell: Cell):
    """The adapted (or unfrozen) model exactly as `lorakit train` prepares it."""
    import transformers as tf

    from lorakit.quant.linear4bit import quantize_linears
    from lorakit.train.args import TrainArgs
    from lorakit.train.model import prepare_model

    args = TrainArgs(model="x", train_type=cell.train_type, lora_rank=cell.rank, target_modules=list(cell.targets),
                     gradient_checkpointing=cell.checkpointing, memory_savers=cell.memory_savers,
                     lora_dropout=cell.dropout, per_device_train_batch_size=cell.batch, max_length=cell.seq)
    config = {k: v for k, v in cell.config_json().items() if k not in ("model_type", "torch_dtype")}
    dtype = torch.bfloat16 if cell.bf16 and cell.train_type != "full" else torch.float32
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**config)).to(dtype)
    if args.quantize:
        quantize_linears(model, skip={"lm_head"})
    model.requires_grad_(False)
    return prepare_model(model, args, "causal_lm").train(), args


def _batch(cell: Cell, seed: int) -> dict[str, torch.Tensor]:
    """Random tokens, every one labelled; with a batch of several, the last row is padded by an eighth."""
    ids = torch.randint(0, cell.vocab, (cell.batch, cell.seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if cell.batch > 1:
        mask[-1, -max(1, cell.seq // 8):] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def measure_step(cell: Cell, steps: int = 2) -> int:
    """The peak live bytes over `steps` optimiser steps (the first creates the optimiser's state)."""
    from lorakit.train.loss import batch_loss_sum

    with LiveBytes() as live:
        model, args = _model(cell)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, cell.optim)
        with live.section("steps"):
            for step in range(steps):
                for micro in range(cell.accumulation):
                    batch = _batch(cell, step * cell.accumulation + micro)
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cell.bf16):
                        loss = batch_loss_sum(model, batch, args.memory_savers)[0]
                    loss.backward()
                    del loss, batch
                torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return live.peak("steps")
