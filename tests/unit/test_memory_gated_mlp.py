"""lorakit.memory.gated_mlp: the gated MLP that recomputes its product gives autograd's gradients."""
import gc
import weakref

import pytest
import torch

import lorakit
from helpers import BLOCK_INPUT, build_model, kept_for_backward, lean_train_step
from lorakit.memory.gated_mlp import GatedProduct


def test_gated_product_gradients_equal_autograd():
    g = torch.Generator().manual_seed(0)
    gate, up = torch.randn(3, 7, generator=g, dtype=torch.float64), torch.randn(3, 7, generator=g, dtype=torch.float64)
    grads = []
    for fn in (lambda a, b: GatedProduct.apply(a, b, torch.nn.functional.silu),
               lambda a, b: torch.nn.functional.silu(a) * b):
        a, b = gate.clone().requires_grad_(), up.clone().requires_grad_()
        out = fn(a, b)
        out.backward(torch.cos(out.detach()))
        grads.append((out.detach(), a.grad, b.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_lean_mlp_keeps_gradients_and_saves_less(arch, checkpointing):
    """Same loss and adapter gradients as the model's own MLP forward, with dropout on (same seed);
    fewer bytes saved for backward; also under transformers' gradient checkpointing."""
    results = []
    for without in (None, "gated_mlp"):
        saved = {}  # storage -> bytes: a tensor saved twice (by an op and by a recipe) is kept once
        counting = torch.autograd.graph.saved_tensors_hooks(
            lambda t, saved=saved: saved.update({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()})
            or t, lambda t: t)
        loss, grads = lean_train_step(arch, without, checkpointing, outer_hooks=counting)
        results.append((loss, grads, sum(saved.values())))
    (loss_lean, grads_lean, saved_lean), (loss_plain, grads_plain, saved_plain) = results
    torch.testing.assert_close(loss_lean, loss_plain, rtol=1e-6, atol=1e-6)
    assert grads_lean.keys() == grads_plain.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_lean[name], grads_plain[name], rtol=1e-5, atol=1e-6)
    if not checkpointing:
        assert saved_lean < saved_plain


def test_merge_and_unload_gives_back_the_class_forward():
    model = build_model("llama")
    peft_model = lorakit.get_peft_model(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    assert "forward" in model.model.layers[0].mlp.__dict__
    plain = peft_model.merge_and_unload()
    assert all("forward" not in m.__dict__ for m in plain.modules())


def test_product_is_freed_after_forward():
    """Only gate(x) and up(x) outlive the forward pass, not act(gate) * up."""
    model = build_model("llama").train()
    peft_model = lorakit.get_peft_model(model, lorakit.LoraConfig(r=2, target_modules=["down_proj"]))
    products = []
    for layer in model.model.layers:
        layer.mlp.down_proj.register_forward_pre_hook(lambda module, args: products.append(weakref.ref(args[0])))
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    loss = peft_model(input_ids=ids, labels=ids).loss
    gc.collect()
    assert len(products) == 2 and all(ref() is None for ref in products)
    loss.backward()



def test_under_checkpointing_only_block_inputs_are_kept():
    """The saver's recipe saves gate(x) and up(x) through checkpointing's hooks (nested inside it), so
    between blocks nothing of the MLP stays: the same bytes as without the saver, growing per layer by
    the block's input (and checkpoint's copy of the CPU RNG state) only."""
    on = {layers: kept_for_backward("gated_mlp", True, layers) for layers in (2, 4)}
    off = {layers: kept_for_backward("gated_mlp", False, layers) for layers in (2, 4)}
    assert on[2] <= off[2] and on[4] <= off[4], (on, off)
    assert (on[4] - on[2]) / 2 <= BLOCK_INPUT + torch.get_rng_state().numel(), (on, off)


def test_inside_a_checkpoint_of_the_whole_model_nothing_of_the_mlp_is_kept():
    on, off = (kept_for_backward("gated_mlp", saver, 2, checkpoint="model") for saver in (True, False))
    assert on <= off, (on, off)


def test_qwen2_5_vl_vision_mlp_keeps_outputs_and_gradients():
    """Qwen2.5-VL's vision MLP (gated, with biases) gets the lean forward: an image batch's loss and every
    adapter gradient (vision tower and language model, dropout on, same seed) equal its own forward's."""
    from helpers import build_vlm, vlm_image_processor
    from lorakit import memory

    special = {"<|image_pad|>": 90, "<|video_pad|>": 91, "<|vision_start|>": 92, "<|vision_end|>": 93}
    pixels = vlm_image_processor("qwen2_5_vl")(images=[torch.rand(3, 16, 16)], do_rescale=False, return_tensors="pt")
    ids = torch.tensor([[5, 92, *[90] * (int(pixels["image_grid_thw"].prod()) // 4), 93, 11, 12, 13]])
    batch = {"input_ids": ids, "labels": ids, "mm_token_type_ids": (ids == 90).long(), **pixels}
    results = []
    for saver in (True, False):
        model = build_vlm("qwen2_5_vl", special, vocab_size=96).train()
        peft_model = lorakit.get_peft_model(model, lorakit.LoraConfig(
            r=4, lora_dropout=0.3, init_lora_weights=False, target_modules=["gate_proj", "up_proj", "down_proj"]))
        lean = peft_model.memory_savers["gated_mlp"]
        assert {"model.visual.blocks.0.mlp", "model.visual.blocks.1.mlp"} <= set(lean)
        if not saver:
            memory.disable(model, ["gated_mlp"])
        torch.manual_seed(5)
        loss = peft_model(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}))
    (loss_lean, grads_lean), (loss_plain, grads_plain) = results
    torch.testing.assert_close(loss_lean, loss_plain, rtol=1e-6, atol=1e-6)
    assert grads_lean.keys() == grads_plain.keys() and any(".visual." in n for n in grads_plain)
    for name in grads_plain:
        torch.testing.assert_close(grads_lean[name], grads_plain[name], rtol=1e-5, atol=1e-6)
