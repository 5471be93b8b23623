"""lorakit.memory.norm_outputs: blocks whose adapters keep a recipe for the norm output give autograd's results."""
import gc
import weakref

import pytest
import torch

import lorakit
from helpers import build_model, kept_for_backward, lean_train_step, model_inputs
from lorakit.memory import norm_outputs as lean_norm


@pytest.mark.parametrize("arch,checkpointing,autocast", [
    ("llama", False, False), ("qwen2", False, False), ("gpt2", False, False), ("bert", False, False),
    ("llama", True, False), ("llama", False, True)])
def test_same_loss_and_gradients_as_the_plain_blocks(arch, checkpointing, autocast):
    loss_lean, grads_lean = lean_train_step(arch, None, checkpointing, autocast)
    loss_plain, grads_plain = lean_train_step(arch, "norm_outputs", checkpointing, autocast)
    assert torch.equal(loss_lean, loss_plain)
    assert grads_lean.keys() == grads_plain.keys()
    for name in grads_plain:
        assert torch.equal(grads_lean[name], grads_plain[name]), name


def test_norm_outputs_are_freed_after_forward():
    model = build_model("llama").train()
    peft_model = lorakit.get_peft_model(model, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    outputs = []
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.register_forward_hook(lambda module, args, out: outputs.append(weakref.ref(out)))
    loss = peft_model(**model_inputs("llama"), labels=model_inputs("llama")["input_ids"]).loss
    gc.collect()
    assert len(outputs) == 4 and all(ref() is None for ref in outputs)
    loss.backward()


def test_enclosing_saved_tensor_hooks_still_apply():
    """Tensors the recipes do not take go through the user's own hooks (here: boxed and unboxed)."""
    boxed = []
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: boxed.append(1) or ("box", t), lambda box: box[1])
    loss_hooked, grads_hooked = lean_train_step("llama", outer_hooks=hooks)
    loss, grads = lean_train_step("llama")
    assert boxed and torch.equal(loss_hooked, loss)
    for name in grads:
        assert torch.equal(grads_hooked[name], grads[name]), name


def test_norm_input_changed_in_place_is_an_error():
    model = build_model("llama").train()
    peft_model = lorakit.get_peft_model(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    inputs = []
    model.model.layers[1].input_layernorm.register_forward_hook(lambda module, args, out: inputs.append(args[0]))
    loss = peft_model(**model_inputs("llama"), labels=model_inputs("llama")["input_ids"]).loss
    with torch.no_grad():
        inputs[0].add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        loss.backward()


def test_merge_and_unload_removes_the_patch_and_the_hooks():
    model = build_model("llama")
    peft_model = lorakit.get_peft_model(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    assert "forward" in model.model.layers[0].__dict__
    assert len(model.model.layers[0].input_layernorm._forward_hooks) == 1
    assert lean_norm.install(model) == 0  # already patched: no second set of hooks
    plain = peft_model.merge_and_unload()
    assert all("forward" not in m.__dict__ and not m._forward_hooks for m in plain.modules())


def test_inside_a_checkpoint_nothing_of_the_norms_is_kept():
    """A recipe saves the norm's input through the enclosing hooks: inside a checkpoint (here torch's around
    the whole model, so the patched blocks run within it) that input is recomputed, not kept."""
    on, off = (kept_for_backward("norm_outputs", saver, 2, checkpoint="model") for saver in (True, False))
    assert on <= off, (on, off)


def test_under_transformers_checkpointing_the_blocks_are_left_alone():
    on, off = (kept_for_backward("norm_outputs", saver, 2) for saver in (True, False))
    assert on == off, (on, off)
