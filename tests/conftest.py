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


def model_output(model, inputs) -> torch.Tensor:
    return model(**inputs).logits


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param
