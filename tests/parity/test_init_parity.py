"""PiSSA and OLoRA against PEFT: the same seed gives the same A, B and residual base weights; the model
starts as the base; a trained adapter saved with path_initial_model_for_weight_conversion gives PEFT's files
and, on the original base, the trained model. PEFT is a test dependency only."""
from __future__ import annotations

import os
import re

import peft
import pytest
import torch

import lorakit
from helpers import (
    adapter_config,
    adapter_weights,
    assert_same_weights,
    build_model,
    model_inputs,
    model_output,
    quantized_llama,
)
from lorakit.lora.init import olora, pissa

ATOL = 1e-5
INITS = ["pissa", "pissa_niter_4", "olora"]
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}
# PEFT 0.21's olora_init ignores fan_in_fan_out: on GPT-2's Conv1D its factors have the wrong shapes and the
# forward fails. lorakit decomposes W (out x in) there as for pissa; checked against the base, not PEFT.
PEFT_CASES = [(arch, init) for arch in TARGETS for init in INITS if (arch, init) != ("gpt2", "olora")]


def _lib(name: str):
    return lorakit if name == "lorakit" else peft


def make(lib: str, arch: str, init: str, seed: int = 0, **config):
    """get_peft_model of lorakit or PEFT with this init on a fresh tiny model, torch's generator seeded first
    (the Linear modules of A and B and svd_lowrank draw from it)."""
    mod = _lib(lib)
    model = build_model(arch)
    torch.manual_seed(seed)
    config = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS[arch], "init_lora_weights": init, **config}
    return mod.get_peft_model(model, mod.LoraConfig(**config))


def named_tensors(model) -> dict[str, torch.Tensor]:
    """Every parameter, keyed alike for both libraries (PEFT's base_layer hop removed)."""
    return {n.replace(".base_layer.", "."): p.detach() for n, p in model.named_parameters()}


def simulate_training(model, scale: float = 0.05) -> None:
    """The same change in both libraries: noise from a fixed generator added to every trainable tensor,
    in the order of their (normalised) names."""
    g = torch.Generator().manual_seed(7)
    trainable = {n.replace(".base_layer.", "."): p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name in sorted(trainable):
            trainable[name].add_(scale * torch.randn(trainable[name].shape, generator=g))


def logits(model, arch: str) -> torch.Tensor:
    with torch.no_grad():
        return model_output(model.eval(), model_inputs(arch))


# --- the init itself ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, init", PEFT_CASES)
def test_init_equals_peft(arch, init):
    ours, theirs = named_tensors(make("lorakit", arch, init)), named_tensors(make("peft", arch, init))
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=ATOL, rtol=0, msg=key)
    base = {f"base_model.model.{n}": p for n, p in build_model(arch).named_parameters()}
    rewritten = [k for k in base if not torch.equal(base[k], ours[k])]
    assert rewritten and all(k.endswith(".weight") and any(f".{t}." in k for t in TARGETS[arch]) for k in rewritten)


@pytest.mark.parametrize("arch", list(TARGETS))
@pytest.mark.parametrize("init", INITS)
def test_model_starts_as_the_base(arch, init):
    model = make("lorakit", arch, init)
    assert all(p.norm() > 0.1 for n, p in model.named_parameters() if "lora_B" in n)  # not B = 0
    torch.testing.assert_close(logits(model, arch), logits(build_model(arch), arch), atol=ATOL, rtol=0)


def test_olora_factors_are_orthonormal_and_pissa_the_top_singular_part():
    weight = build_model("llama").model.layers[0].self_attn.q_proj.weight.detach()
    A, B, _ = olora(weight, 4, 2.0)
    torch.testing.assert_close(B.T @ B, torch.eye(4), atol=1e-5, rtol=0)
    A, B, residual = pissa(weight, 4, 2.0)
    singular = torch.linalg.svdvals(weight)
    torch.testing.assert_close(torch.linalg.svdvals(2.0 * B @ A)[:4], singular[:4], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.svdvals(residual)[:4], singular[4:8], atol=1e-5, rtol=0)


# --- saving as plain LoRA for the original base -------------------------------------------------------
CONVERSIONS = {
    **{f"{init}-{arch}": (arch, init, {}) for arch, init in PEFT_CASES},
    "pissa-patterns": ("llama", "pissa", dict(rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 4})),
    "olora-rslora": ("llama", "olora", dict(use_rslora=True, lora_alpha=6)),
}


def trained_and_converted(lib: str, arch: str, init: str, root, **config):
    """PEFT's recipe: save the initial adapter (init_lora_weights=True in its config), train, save converted."""
    model = make(lib, arch, init, **config)
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(str(root / "initial"))
    model.peft_config["default"].init_lora_weights = init
    simulate_training(model)
    model.save_pretrained(str(root / "converted"), path_initial_model_for_weight_conversion=str(root / "initial"))
    return model


@pytest.mark.parametrize("case", list(CONVERSIONS))
def test_converted_adapter_equals_peft_and_the_trained_model(case, tmp_path):
    arch, init, config = CONVERSIONS[case]
    models = {lib: trained_and_converted(lib, arch, init, tmp_path / lib, **config) for lib in ("lorakit", "peft")}
    ours, theirs = (str(tmp_path / lib / "converted") for lib in ("lorakit", "peft"))
    assert_same_weights(adapter_weights(ours), adapter_weights(theirs), atol=1e-6)
    ours_json, theirs_json = adapter_config(ours), adapter_config(theirs)
    for cfg in (ours_json, theirs_json):  # a set in PEFT, so in no particular order
        cfg["target_modules"] = sorted(cfg["target_modules"])
    diffs = {k: (ours_json[k], theirs_json[k]) for k in set(ours_json) & set(theirs_json)
             if k != "peft_version" and ours_json[k] != theirs_json[k]}
    assert not diffs
    assert ours_json["r"] == 8 and ours_json["init_lora_weights"] is True

    trained = logits(models["lorakit"], arch)
    torch.testing.assert_close(trained, logits(models["peft"], arch), atol=ATOL, rtol=0)
    assert (trained - logits(build_model(arch), arch)).abs().max() > 20 * ATOL  # training really moved it
    for lib in ("peft", "lorakit"):
        loaded = _lib(lib).PeftModel.from_pretrained(build_model(arch), ours)
        torch.testing.assert_close(logits(loaded, arch), trained, atol=ATOL, rtol=0, msg=lib)


def test_olora_on_gpt2_converts_to_the_trained_model(tmp_path):
    """OLoRA on Conv1D, which PEFT cannot run: the converted adapter still loads in PEFT and computes as trained."""
    model = trained_and_converted("lorakit", "gpt2", "olora", tmp_path)
    loaded = peft.PeftModel.from_pretrained(build_model("gpt2"), str(tmp_path / "converted"))
    torch.testing.assert_close(logits(loaded, "gpt2"), logits(model, "gpt2"), atol=ATOL, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_unconverted_trained_adapter_loads_like_peft(init, tmp_path):
    """Saved as it is, the adapter says init_lora_weights=init: loading it rewrites the original base again
    (deterministically for pissa and olora), in lorakit as in PEFT, and gives the trained model."""
    source = make("peft", "llama", init)
    simulate_training(source)
    source.save_pretrained(str(tmp_path))
    for lib in ("lorakit", "peft"):
        loaded = _lib(lib).PeftModel.from_pretrained(build_model("llama"), str(tmp_path))
        torch.testing.assert_close(logits(loaded, "llama"), logits(source, "llama"), atol=ATOL, rtol=0, msg=lib)


def test_loading_a_randomized_pissa_adapter_warns(tmp_path):
    make("lorakit", "llama", "pissa_niter_2").save_pretrained(str(tmp_path))
    with pytest.warns(UserWarning, match=r"pissa_niter_2.*randomized SVD.*path_initial_model_for_weight_conversion"):
        lorakit.PeftModel.from_pretrained(build_model("llama"), str(tmp_path))


# --- bad input ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, targets, kind", [("llama", ["embed_tokens"], "Embedding"),
                                                 ("conv", ["conv1"], "Conv2d")])
def test_weight_inits_refuse_other_layer_types(arch, targets, kind):
    with pytest.raises(ValueError, match=rf"init_lora_weights='pissa' applies to Linear and Conv1D layers, not {kind}"):
        lorakit.get_peft_model(build_model(arch), lorakit.LoraConfig(init_lora_weights="pissa", target_modules=targets))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_weight_inits_refuse_a_4bit_base(init):
    model, _ = quantized_llama()
    with pytest.raises(ValueError, match=rf"init_lora_weights='{init}' needs the full-precision weight.*4-bit"):
        lorakit.get_peft_model(model, lorakit.LoraConfig(init_lora_weights=init, target_modules=["q_proj"]))


def test_rank_above_the_weights_rank_is_refused():
    with pytest.raises(ValueError, match=r"r=40 is larger than this 16x32 weight's rank can be \(at most 16\)"):
        lorakit.get_peft_model(build_model("llama"), lorakit.LoraConfig(r=40, init_lora_weights="olora",
                                                                        target_modules=["k_proj"]))


@pytest.mark.parametrize("init", ["pissa_niter", "pissa_niter_x", "pissa_fast"])
def test_misspelled_pissa_is_refused(init):
    with pytest.raises(ValueError, match=rf"got '{init}': PiSSA's fast SVD is spelled 'pissa_niter_'"):
        lorakit.LoraConfig(init_lora_weights=init)


@pytest.mark.parametrize("config, message", [
    (dict(use_dora=True), r"cannot convert a DoRA adapter"),
    (dict(use_rslora=True, rank_pattern={"q_proj": 2}), r"cannot convert an rsLoRA adapter with rank_pattern"),
])
def test_unconvertible_adapters_are_refused(config, message, tmp_path):
    model = make("lorakit", "llama", "pissa", **config)
    model.save_pretrained(str(tmp_path / "initial"))
    with pytest.raises(ValueError, match=message):
        model.save_pretrained(str(tmp_path / "out"), path_initial_model_for_weight_conversion=str(tmp_path / "initial"))


def test_initial_adapter_of_another_shape_is_named(tmp_path):
    make("lorakit", "llama", "pissa", r=2).save_pretrained(str(tmp_path / "initial"))
    model = make("lorakit", "llama", "pissa")
    initial = str(tmp_path / "initial")
    with pytest.raises(ValueError, match=rf"initial adapter {re.escape(repr(initial))}: .*lora_A.weight has shape "
                                         r"\(2, 32\), the trained adapter has \(4, 32\)"):
        model.save_pretrained(str(tmp_path / "out"), path_initial_model_for_weight_conversion=initial)
    assert not os.path.exists(tmp_path / "out" / "adapter_model.safetensors")
