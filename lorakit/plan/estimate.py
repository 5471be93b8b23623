"""The memory of one training step, predicted from a model's Shape and a recipe: what is stored, what autograd
keeps for backward, and the peak over the step's timeline.

Every activation term below is a tensor the code keeps, named where it comes from (transformers' decoder
blocks, lorakit's LoRA function and memory savers); N = batch x sequence tokens, `a` the bytes of the compute
dtype (2 under bf16 autocast) and `rb` those of the residual stream (the frozen weights' dtype). The predicted
peak is what torch.cuda.max_memory_allocated would report: tensors only; the runtime's own use of the device
(CUDA context, allocator slack) is added separately in `Plan.device_bytes`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from lorakit.families import FAMILIES
from lorakit.plan.shape import Linear, Shape

SDPA = {"llama", "mistral", "qwen2", "qwen3", "olmo2", "phi3", "gpt2"}  # the others run eager attention
PLANNED_FAMILIES = SDPA | {"gemma2"}  # the model types whose blocks the terms below describe
FUSED_CHUNK = 1 << 24  # lorakit.memory.loss._CHUNK_ELEMENTS: logits per chunk of the fused head
CUDA_CONTEXT = 600 * (1 << 20)  # CUDA context + cuBLAS/cuDNN handles and workspaces: outside max_memory_allocated
ALLOCATOR_SLACK = 0.05  # the caching allocator's reserved-but-unused share at the peak
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd",
              "adafactor")


@dataclass(frozen=True)
class Recipe:
    """The training settings the memory depends on (built from `lorakit train`'s flags by the CLI)."""
    train_type: str = "lora"  # lora, dora, qlora, full
    quantize: bool = False  # the frozen base in NF4 (qlora, or --quant_bits 4)
    targets: tuple[str, ...] = ("all-linear",)
    rank: int = 8
    dropout: float = 0.05
    bf16: bool = True
    torch_dtype: str = "auto"
    batch: int = 1
    seq: int = 2048
    accumulation: int = 1
    checkpointing: bool = False
    optim: str = "adamw_torch"
    memory_savers: bool = True

    def __post_init__(self) -> None:
        if self.optim not in OPTIMIZERS:
            raise ValueError(f"lorakit plan knows the optimisers {', '.join(OPTIMIZERS)}, not {self.optim!r}")

    @classmethod
    def from_train_args(cls, args) -> Recipe:
        """The recipe of a `lorakit train` configuration (TrainArgs, read by field name; bf16 unset = on, as on
        a GPU)."""
        quantize = args.train_type == "qlora" or getattr(args, "quant_bits", None) == 4
        targets = tuple(args.target_modules)
        return cls(train_type="dora" if getattr(args, "use_dora", False) and args.train_type != "full"
                   else args.train_type, quantize=quantize, targets=targets, rank=args.lora_rank,
                   dropout=args.lora_dropout, bf16=True if args.bf16 is None else args.bf16,
                   torch_dtype=args.torch_dtype, batch=args.per_device_train_batch_size, seq=args.max_length,
                   accumulation=args.gradient_accumulation_steps, checkpointing=args.gradient_checkpointing,
                   optim=getattr(args, "optim", "adamw_torch"), memory_savers=args.memory_savers)

    @property
    def lora(self) -> bool:
        return self.train_type != "full"

    @property
    def dora(self) -> bool:
        return self.train_type == "dora"


@dataclass
class Plan:
    """The breakdown (bytes), the peak and where in the step it falls."""
    parts: dict[str, int]
    timeline: dict[str, int]
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return max(self.timeline.values())

    @property
    def peak_at(self) -> str:
        return max(self.timeline, key=self.timeline.get)

    @property
    def overhead_bytes(self) -> int:
        return CUDA_CONTEXT + int(ALLOCATOR_SLACK * self.peak_bytes)

    @property
    def device_bytes(self) -> int:
        """The peak plus the runtime's overhead: what must fit in the GPU's memory."""
        return self.peak_bytes + self.overhead_bytes


def dtype_bytes(name: str) -> int:
    return 4 if name in ("float32", "fp32") else 2


def nf4_bytes(numel: int) -> int:
    """One NF4 weight with double quantisation: 4-bit codes, uint8 block scales (64), fp32 nested scales
    (256 blocks) and the 256-entry fp32 map (a copy per layer once on the GPU), as lorakit.quant stores it."""
    blocks = -(-numel // 64)
    return (numel + 1) // 2 + blocks + 4 * -(-blocks // 256) + 4 * 256


def adapted(shape: Shape, recipe: Recipe) -> list[Linear]:
    """The block Linears that get adapters: all-linear, the family's defaults, or the names given."""
    linears = shape.block_linears()
    if not recipe.lora or "all-linear" in recipe.targets:
        return linears
    names = set(recipe.targets) or set(FAMILIES.get(shape.model_type, FAMILIES["llama"]).default_targets)
    chosen = [lin for lin in linears if lin.name in names]
    if not chosen:
        raise ValueError(f"--target_modules {sorted(names)} match no Linear of a {shape.model_type} block "
                         f"({', '.join(dict.fromkeys(lin.name for lin in linears))})")
    return chosen


def base_bytes(shape: Shape, recipe: Recipe) -> int:
    """Bytes per frozen weight: fp32 for full fine-tuning, else --torch_dtype (auto: bf16 under --bf16)."""
    if not recipe.lora:
        return 4
    if recipe.torch_dtype != "auto":
        return dtype_bytes(recipe.torch_dtype)
    return 2 if recipe.bf16 else 4


# --- what is stored ---------------------------------------------------------------------------------------------
def weights(shape: Shape, recipe: Recipe) -> dict[str, int]:
    """Frozen weights by kind (4-bit Linears with their scales; the rest in the base dtype) and trainable ones."""
    wb, blocks = base_bytes(shape, recipe), shape.block_linears()
    other = sum(shape.other_params().values())
    biases = shape.layers * sum(lin.d_out for lin in blocks if lin.bias)
    linear = shape.layers * sum(lin.d_in * lin.d_out for lin in blocks)
    if not recipe.lora:
        return {"frozen": 0, "frozen_4bit": 0, "trainable": 4 * (linear + biases + other)}
    if recipe.quantize:
        four_bit = shape.layers * sum(nf4_bytes(lin.d_in * lin.d_out) for lin in blocks)
        frozen, frozen_4bit = wb * (other + biases), four_bit
    else:
        frozen, frozen_4bit = wb * (other + biases + linear), 0
    per_block = sum(recipe.rank * (lin.d_in + lin.d_out) + (lin.d_out if recipe.dora else 0)
                    for lin in adapted(shape, recipe))
    return {"frozen": frozen, "frozen_4bit": frozen_4bit, "trainable": 4 * shape.layers * per_block}


def trainable_tensors(shape: Shape, recipe: Recipe) -> list[tuple[int, ...]]:
    """The shape of every trainable tensor (for per-tensor optimiser rules)."""
    if recipe.lora:
        out = []
        for lin in adapted(shape, recipe):
            out += [(recipe.rank, lin.d_in), (lin.d_out, recipe.rank)] + ([(lin.d_out,)] if recipe.dora else [])
        return out * shape.layers
    blocks = [(lin.d_out, lin.d_in) for lin in shape.block_linears()] * shape.layers
    embed = [(shape.vocab, shape.hidden)] + ([] if shape.tied else [(shape.vocab, shape.hidden)])
    return blocks + embed + [(shape.other_params()["norms"],)]


def optimizer_state(tensors: list[tuple[int, ...]], optim: str) -> int:
    """Bytes of optimiser state: AdamW 8 per value; 8-bit AdamW 2 + two fp32 scales per 256 (fp32 below 4096
    values); SGD without momentum none; Adafactor a row and a column per matrix (the values of a vector)."""
    total = 0
    for dims in tensors:
        n = math.prod(dims)
        if optim in ("adamw_8bit", "paged_adamw_8bit"):
            total += 2 * n + 8 * -(-n // 256) if n >= 4096 else 8 * n
        elif optim == "sgd":
            total += 0
        elif optim == "adafactor":
            total += 4 * (dims[0] + dims[1] if len(dims) == 2 else n)
        else:
            total += 8 * n
    return total


def optimizer_temporaries(tensors: list[tuple[int, ...]], optim: str) -> int:
    """Transient bytes of one optimiser step: torch's foreach AdamW (its GPU default) makes sqrt(v) for all
    parameters at once; Adafactor rebuilds one full-size variance at a time (a vector's twice); fused and 8-bit
    kernels none."""
    if optim == "adamw_torch":
        return 4 * sum(math.prod(d) for d in tensors)
    if optim == "adafactor":
        return max(math.prod(d) * (4 if len(d) == 2 else 8) for d in tensors)
    return 0


# --- what autograd keeps ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dims:
    """The sizes the activation terms use."""
    n: int  # tokens in a micro-batch
    a: int  # bytes of the compute dtype
    rb: int  # bytes of the residual stream
    lb: int  # bytes of the low-rank product (the compute dtype, fp32 adapters outside autocast)


def dims(shape: Shape, recipe: Recipe) -> Dims:
    rb = base_bytes(shape, recipe)
    return Dims(recipe.batch * recipe.seq, 2 if recipe.bf16 else rb, rb, 2 if recipe.bf16 else 4)


def _norm(d: Dims, width: int, rows: int, recipe_saver: bool) -> int:
    """An RMSNorm keeps its input in fp32 (a copy when the input is half) and 1/rms per row; in a block with
    the norm_outputs saver, the recipe also holds the half-precision input itself."""
    return rows * width * 4 + rows * 4 + (rows * width * d.rb if d.rb != 4 and recipe_saver else 0)


def _lora_terms(lin: Linear, recipe: Recipe, d: Dims) -> int:
    """lorakit.lora.delta.LoraMatmul keeps x A^T (N x r) and the dropped positions (int32, Poisson(-ln(1-p) n))."""
    flipped = 4 * math.ceil(-math.log1p(-recipe.dropout) * d.n * lin.d_in) if recipe.dropout > 0 else 0
    return d.n * recipe.rank * d.lb + flipped


def _dora_outputs(shape: Shape, names: set[str], d: Dims, repeat_kv: bool) -> int:
    """DoRA's rescaling keeps the layer's output: extra unless the next op keeps that same tensor."""
    shared = {"gate_proj", "up_proj"} | ({"v_proj"} if not repeat_kv else set())
    if shape.model_type == "qwen3":
        shared |= {"q_proj", "k_proj"}
    sizes = {lin.name: lin.d_out for lin in shape.block_linears()}
    return sum(d.n * sizes[name] * d.a for name in names - shared)


def block_kept(shape: Shape, recipe: Recipe, d: Dims, norm_saver: bool) -> int:
    """Bytes autograd keeps for one decoder block's backward (no checkpointing)."""
    n, a, h = d.n, d.a, shape.hidden
    names = {lin.name for lin in adapted(shape, recipe)} if recipe.lora else set()
    repeat_kv = recipe.batch > 1 and shape.kv_heads < shape.heads  # a padding mask turns SDPA's GQA off
    norms = 4 if shape.model_type == "gemma2" else 2  # each keeps its input: the block's, the residual, ...
    kept = norms * (_norm(d, h, n, norm_saver) + (0 if recipe.lora else n * h * d.rb))  # a trained weight's input
    for consumers in ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}):
        kept += _norm_output(consumers, names, recipe, d, n * h, norm_saver)
    kv = shape.q_dim if repeat_kv else shape.kv_dim
    kept += n * (shape.q_dim + 2 * kv) * a  # q and k after rotary, v: SDPA's inputs
    kept += n * shape.q_dim * a  # attention output, o_proj's input
    kept += _attention_core(shape, recipe, d)
    if shape.model_type == "qwen3":  # q_norm / k_norm keep q_proj's and k_proj's outputs
        kept += n * (shape.q_dim + shape.kv_dim) * (a + (4 if a != 4 else 0)) + 4 * n * (shape.heads + shape.kv_heads)
    kept += _mlp_kept(shape, recipe, d, names)
    kept += sum(_lora_terms(lin, recipe, d) for lin in adapted(shape, recipe)) if recipe.lora else 0
    if recipe.dora:
        kept += _dora_outputs(shape, names, d, repeat_kv)
    if not recipe.lora and recipe.bf16:  # autocast's bf16 copies of the fp32 weights, kept by each Linear
        kept += 2 * sum(lin.d_in * lin.d_out for lin in shape.block_linears())
    return kept


def _norm_output(consumers: set[str], names: set[str], recipe: Recipe, d: Dims, numel: int, norm_saver: bool) -> int:
    """A norm's output is kept by the adapters that read it (once: they share it) unless the norm_outputs saver
    stores a recipe instead; full fine-tuning's Linears keep it too (a bf16 copy each under autocast)."""
    if not recipe.lora:
        return len(consumers) * numel * 2 if recipe.bf16 else numel * 4
    return numel * d.rb if consumers & names and not norm_saver else 0


def _attention_core(shape: Shape, recipe: Recipe, d: Dims) -> int:
    """SDPA (flash / memory-efficient) keeps its log-sum-exp; eager attention keeps [heads x T x T] scores."""
    rows = recipe.batch * shape.heads * recipe.seq
    if shape.model_type in SDPA:  # with a padding mask, SDPA keeps it expanded to every head (bool)
        return rows * 4 + (rows * recipe.seq if recipe.batch > 1 else 0)
    scores = rows * recipe.seq
    # gemma2: scores / cap, tanh (keeps its output), * cap, softmax in fp32 (keeps it), cast, @ v (keeps the cast)
    return scores * (d.a + 4 + d.a)


def checkpointed_block(shape: Shape, recipe: Recipe, d: Dims) -> int:
    """Under checkpointing a block keeps its input alone: the savers' recipes save their inputs through
    checkpointing's hooks, so those are recomputed with the block too."""
    return d.n * shape.hidden * d.rb


def gated_saver(shape: Shape, recipe: Recipe) -> bool:
    """lorakit's gated-MLP saver runs: LoRA with the savers on, in a family whose gated MLP it knows."""
    return recipe.lora and recipe.memory_savers and FAMILIES.get(shape.model_type) is not None and \
        FAMILIES[shape.model_type].gated_mlp is not None


def _mlp_kept(shape: Shape, recipe: Recipe, d: Dims, names: set[str]) -> int:
    """Gated MLP: the saver keeps gate(x) and up(x); plain autograd keeps gate(x), act(gate(x)), up(x) and the
    product (when down_proj's adapter or weight needs it)."""
    ni = d.n * shape.intermediate * d.a
    if not shape.gated:
        return ni * 2 if ("down_proj" in names or not recipe.lora) else ni
    if gated_saver(shape, recipe):
        return 2 * ni
    return 3 * ni + (ni if "down_proj" in names or not recipe.lora else 0)


def backward_transient(shape: Shape, recipe: Recipe, d: Dims) -> int:
    """The most one block's backward holds beyond what was kept: the MLP's [N x intermediate] gradients
    (the saver's recomputed product, its incoming gradient and the three it makes; plain autograd's two input
    gradients of down_proj and their sum), plus a dequantised weight under QLoRA."""
    ni = d.n * shape.intermediate * d.a
    transient = 5 * ni if gated_saver(shape, recipe) else 3 * ni
    if recipe.quantize:
        transient += shape.hidden * shape.intermediate * d.a
    return transient


# --- the loss ---------------------------------------------------------------------------------------------------
def fused_head(shape: Shape, recipe: Recipe) -> bool:
    """`lorakit train` fuses head and loss for plain-head families with the savers on (lorakit.train.loss)."""
    family = FAMILIES.get(shape.model_type)
    return recipe.memory_savers and family is not None and family.plain_head


def loss_terms(shape: Shape, recipe: Recipe, d: Dims) -> dict[str, int]:
    """The loss's kept bytes and its forward / backward transients."""
    n, v, h = d.n, shape.vocab, shape.hidden
    m = n - recipe.batch  # every token but each row's last carries a label (the worst case)
    if fused_head(shape, recipe):
        rows = min(m, max(1, -(-m // max(1, -(-m // max(1, FUSED_CHUNK // v))))))
        chunk = rows * v * (4 if d.a == 4 else d.a + 8)  # logits (and their fp32 copy and gradient under bf16)
        head_copy = v * h * d.a if (not recipe.lora and d.a != 4) else 0
        head_copy += v * h * 4 if not recipe.lora else 0  # a trained head's chunk gradient, before it is summed
        kept = m * h * d.rb  # the hidden states' gradient, made in forward
        return {"kept": kept, "forward": n * h * d.rb + m * h * d.rb + chunk + rows * h * 4 + head_copy,
                "backward": 2 * n * h * d.rb}
    logits = n * v * d.a
    softcap = 2 * logits if shape.final_softcap else 0  # the tanh output kept, a temporary beside it
    copy = n * v * 4 if d.a != 4 or recipe.batch > 1 else 0  # .float() / reshape of the shifted logits
    return {"kept": n * v * 4 + softcap // 2, "forward": logits + softcap // 2 + copy,
            "backward": 2 * n * v * 4}  # nll_loss's gradient and log_softmax's, beside the kept log-probs


# --- the timeline -----------------------------------------------------------------------------------------------
def other_kept(shape: Shape, recipe: Recipe, d: Dims) -> int:
    """Kept outside the blocks: rotary cos / sin, and the final norm's fp32 input (in an fp32 model; under bf16
    it is not live at the end of the forward pass: measured, see docs/plan.md)."""
    cos_sin = 2 * recipe.batch * recipe.seq * shape.head_dim * d.rb if shape.model_type != "gpt2" else 0
    final_norm = _norm(d, shape.hidden, d.n, False) + (0 if recipe.lora else d.n * shape.hidden * d.rb)
    return cos_sin + (final_norm if d.rb == 4 else 0)


def estimate(shape: Shape, recipe: Recipe) -> Plan:
    """The breakdown and the peak of one training step of `recipe` on a model of `shape`."""
    d, w = dims(shape, recipe), weights(shape, recipe)
    tensors = trainable_tensors(shape, recipe)
    grads = w["trainable"]
    states = optimizer_state(tensors, recipe.optim)
    paged = recipe.optim.startswith("paged_")
    norm_saver = recipe.lora and recipe.memory_savers and not recipe.checkpointing
    per_block = block_kept(shape, recipe, d, norm_saver)
    if recipe.checkpointing:  # block inputs; backward recomputes one block at a time
        blocks = shape.layers * checkpointed_block(shape, recipe, d)
        recompute = block_kept(shape, recipe, d, False) - d.n * shape.hidden * 4
    else:
        blocks, recompute = shape.layers * per_block, 0
    loss = loss_terms(shape, recipe, d)
    other = other_kept(shape, recipe, d)
    kept = blocks + other + loss["kept"]
    static = w["frozen"] + w["frozen_4bit"] + w["trainable"] + (0 if paged else states)
    earlier = grads if recipe.accumulation > 1 else 0  # gradients of earlier micro-batches
    head_grad = 4 * shape.vocab * shape.hidden if not recipe.lora and fused_head(shape, recipe) else 0
    transient = backward_transient(shape, recipe, d)
    first_block = per_block if not recipe.checkpointing else recompute
    timeline = {
        "forward (loss)": static + max(earlier, head_grad) + kept - loss["kept"] + loss["forward"],
        "backward start": static + max(earlier, head_grad) + kept + max(loss["backward"], recompute + transient),
        # the first block's backward: (nearly) every gradient made, that block's activations still held
        "backward end": static + grads + other + first_block + transient,
        "optimizer step": static + grads + optimizer_temporaries(tensors, recipe.optim),
    }
    parts = {"frozen weights": w["frozen"], "frozen weights (4-bit)": w["frozen_4bit"],
             "trainable weights": w["trainable"], "gradients": grads, "optimizer states": states,
             "activations (blocks)": blocks, "activations (other)": other,
             "loss buffers": loss["kept"], "activation recompute": recompute}
    notes = ["paged optimiser states can move to host memory under pressure; not counted in the peak"] if paged else []
    return Plan(parts, timeline, notes)
