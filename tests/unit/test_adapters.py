"""Model-level adapter management on real tiny transformers models: init, what trains, merging and
unloading, disabling, several adapters, the base model's keys, saving / loading, parameter counts and
dtype conversion. References are computed by hand on a fresh copy of the base model."""
from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from helpers import ARCHS, TARGETS, build_model, make_peft_model, model_inputs, model_output, randomize
from lorakit import LoraConfig, PeftModel
from lorakit.lora.layers import LoraLayer, ModulesToSave, WrapsBase

ATOL = 1e-5
# Cases beyond plain Linear (helpers.TARGETS): nn.Embedding and nn.Conv2d targets (and a mix).
SPECIAL = {
    "llama-embedding": ("llama", ["embed_tokens", "q_proj"]),
    "gpt2-embedding": ("gpt2", ["wpe", "c_fc"]),
    "vit-conv2d": ("vit", ["projection", "fc1"]),
}
CASES = {**{a: (a, TARGETS[a]) for a in ARCHS}, **SPECIAL}


# --- helpers --------------------------------------------------------------------------------------
def run(model, arch: str, dtype=None) -> torch.Tensor:
    inputs = model_inputs(arch)
    if dtype is not None and "pixel_values" in inputs:
        inputs = {"pixel_values": inputs["pixel_values"].to(dtype)}
    with torch.no_grad():
        return model_output(model, inputs)


def base_output(arch: str, dtype=None) -> torch.Tensor:
    model = build_model(arch)
    return run(model if dtype is None else model.to(dtype), arch, dtype)


def lora_paths(peft_model) -> dict[str, LoraLayer]:
    return dict(peft_model.base_model.lora_layers())


def hand_delta(layer: LoraLayer, adapter_name: str, config: LoraConfig) -> torch.Tensor:
    """scaling * B A in the layout of the base weight, from the raw state dict tensors."""
    sd = layer.state_dict()
    s = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    base = layer.base_layer
    if isinstance(base, nn.Embedding):
        A, B = sd[f"lora_embedding_A.{adapter_name}"], sd[f"lora_embedding_B.{adapter_name}"]
        return s * (B @ A).T
    A, B = sd[f"lora_A.{adapter_name}.weight"], sd[f"lora_B.{adapter_name}.weight"]
    if isinstance(base, nn.Conv2d):
        r = A.shape[0]
        return s * (B.reshape(-1, r) @ A.reshape(r, -1)).reshape(B.shape[0], *A.shape[1:])
    if isinstance(base, Conv1D):
        return s * (B @ A).T
    assert isinstance(base, nn.Linear)
    return s * B @ A


def hand_reference_model(arch: str, peft_model, adapters: list[str], dtype=None) -> nn.Module:
    """A fresh base model whose weights carry the named adapters' deltas, added by hand."""
    ref = build_model(arch)
    if dtype is not None:
        ref = ref.to(dtype)
    added = 0
    with torch.no_grad():
        for path, layer in lora_paths(peft_model).items():
            for name in adapters:
                if name in layer.r:
                    weight = ref.get_submodule(path).weight
                    weight.add_(hand_delta(layer, name, peft_model.peft_config[name]).to(weight.dtype))
                    added += 1
    assert added > 0
    return ref


def assert_differs(a: torch.Tensor, b: torch.Tensor) -> None:
    """Far apart compared with the tolerance used for equality (so a no-op adapter cannot pass)."""
    assert (a - b).abs().max() > 10 * ATOL


def plain_modules_only(model: nn.Module) -> bool:
    return not any(isinstance(m, (LoraLayer, ModulesToSave, WrapsBase)) for m in model.modules())


# --- init -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", [True, "gaussian"])
@pytest.mark.parametrize("case", list(CASES))
def test_init_output_equals_base(case, init):
    arch, targets = CASES[case]
    expected = base_output(arch)
    model = make_peft_model(arch, targets, init_lora_weights=init)
    assert lora_paths(model), "nothing was adapted"
    assert torch.equal(run(model, arch), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_dora_init_output_equals_base(arch):
    model = make_peft_model(arch, use_dora=True)
    torch.testing.assert_close(run(model, arch), base_output(arch), atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_init_false_changes_output(case):
    arch, targets = CASES[case]
    got = run(make_peft_model(arch, targets, init_lora_weights=False), arch)
    assert_differs(got, base_output(arch))


@pytest.mark.parametrize("case", list(CASES))
def test_output_matches_hand_reference(case):
    arch, targets = CASES[case]
    model = make_peft_model(arch, targets, init_lora_weights=False, use_rslora=(arch == "bert"))
    randomize(model, "default")
    expected = run(hand_reference_model(arch, model, ["default"]), arch)
    torch.testing.assert_close(run(model, arch), expected, atol=ATOL, rtol=0)


# --- what trains ----------------------------------------------------------------------------------
def _is_bias(name: str) -> bool:
    return name.endswith(".bias")


# name -> (arch, config kwargs, which inner-model parameter names must train)
TRAIN_CASES = {
    "llama-lora": ("llama", dict(), lambda n: ".lora_" in n),
    "qwen2-dora": ("qwen2", dict(use_dora=True), lambda n: ".lora_" in n),
    "gpt2-bias-all": ("gpt2", dict(bias="all"), lambda n: ".lora_" in n or _is_bias(n)),
    "bert-seqcls-lora-only": ("bert", dict(task_type="SEQ_CLS", bias="lora_only"),
                              lambda n: ".lora_" in n or "classifier.modules_to_save.default." in n
                              or re.search(r"\.(query|value)\.bias$", n) is not None),
    "vit-save-bias-all": ("vit", dict(modules_to_save=["classifier"], bias="all"),
                          lambda n: ".lora_" in n or "classifier.modules_to_save.default." in n
                          or (_is_bias(n) and n != "classifier.bias")),
    "llama-embedding": ("llama", dict(target_modules=["embed_tokens", "q_proj"]), lambda n: ".lora_" in n),
    "vit-conv2d": ("vit", dict(target_modules=["projection", "fc1"]), lambda n: ".lora_" in n),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_only_adapter_parameters_get_gradients_and_move(case):
    arch, cfg, should_train = TRAIN_CASES[case]
    model = make_peft_model(arch, **{"init_lora_weights": False, **cfg})
    inner = model.get_base_model()
    expected = {n for n, _ in inner.named_parameters() if should_train(n)}
    assert expected and any(".lora_" in n for n in expected)
    assert {n for n, p in inner.named_parameters() if p.requires_grad} == expected

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model_output(model, model_inputs(arch)).pow(2).mean().backward()
    got_grad = {n for n, p in inner.named_parameters() if p.grad is not None}
    assert got_grad == expected
    opt.step()

    prefix = "base_model.model."
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        inner_name = name[len(prefix):]
        if inner_name in expected:
            if p.grad.abs().sum() > 0:
                assert changed, f"{name} had a gradient but did not move"
        else:
            assert not changed, f"frozen {name} changed"
    moved = [n for n in expected if not torch.equal(inner.get_parameter(n), before[prefix + n])]
    assert len(moved) >= 0.8 * len(expected)


# --- merge ----------------------------------------------------------------------------------------
MERGE_CASES = {**{f"{c}-lora": (c, False) for c in CASES}, **{f"{a}-dora": (a, True) for a in ARCHS}}


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merge_equals_unmerged_and_unmerge_restores(case):
    name, use_dora = MERGE_CASES[case]
    arch, targets = CASES[name]
    model = make_peft_model(arch, targets, init_lora_weights=False, use_dora=use_dora)
    randomize(model, "default", scale=0.2)
    inner = model.get_base_model()
    original = {k: v.clone() for k, v in inner.state_dict().items() if "lora_" not in k}
    unmerged = run(model, arch)
    assert_differs(unmerged, base_output(arch))

    model.merge_adapter()
    layers = lora_paths(model)
    assert all(layer.merged_adapters == ["default"] for layer in layers.values())
    assert any(not torch.equal(inner.state_dict()[f"{p}.weight"], original[f"{p}.weight"]) for p in layers)
    torch.testing.assert_close(run(model, arch), unmerged, atol=ATOL, rtol=0)

    model.unmerge_adapter()
    assert all(layer.merged_adapters == [] for layer in layers.values())
    for k, v in inner.state_dict().items():
        if "lora_" not in k:
            torch.testing.assert_close(v, original[k], atol=1e-6, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    torch.testing.assert_close(run(model, arch), unmerged, atol=ATOL, rtol=0)


def test_merged_weight_is_base_plus_hand_delta():
    model = make_peft_model("gpt2", ["c_attn", "c_fc"], init_lora_weights=False)
    randomize(model, "default")
    inner = model.get_base_model()
    expected = {p: layer.weight.detach() + hand_delta(layer, "default", model.peft_config["default"])
                for p, layer in lora_paths(model).items()}
    model.merge_adapter()
    for p, w in expected.items():
        torch.testing.assert_close(inner.get_submodule(p).weight, w, atol=1e-6, rtol=0)


def test_several_adapters_merge_stack_and_unmerge_in_reverse():
    arch = "llama"
    model = make_peft_model(arch, init_lora_weights=False)
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, use_rslora=True,
                                           target_modules=["q_proj", "k_proj"]))
    model.add_adapter("third", LoraConfig(r=3, lora_alpha=6, init_lora_weights=False, use_dora=True,
                                          target_modules=["q_proj", "v_proj"]))
    for i, name in enumerate(("default", "second", "third")):
        randomize(model, name, seed=i, scale=0.2)
    inner = model.get_base_model()
    original = {k: v.clone() for k, v in inner.state_dict().items() if "lora_" not in k}

    # two plain adapters merged one after the other: weights are W + d1 + d2, output as hand reference
    model.set_adapter(["default", "second"])
    unmerged = run(model, arch)
    expected = run(hand_reference_model(arch, model, ["default", "second"]), arch)
    torch.testing.assert_close(unmerged, expected, atol=ATOL, rtol=0)
    model.merge_adapter(["default"])
    model.merge_adapter(["second"])
    q = inner.get_submodule("model.layers.0.self_attn.q_proj")
    assert q.merged_adapters == ["default", "second"]
    torch.testing.assert_close(
        q.weight, original["model.layers.0.self_attn.q_proj.weight"]
        + hand_delta(q, "default", model.peft_config["default"])
        + hand_delta(q, "second", model.peft_config["second"]), atol=1e-6, rtol=0)
    torch.testing.assert_close(run(model, arch), expected, atol=ATOL, rtol=0)

    # a DoRA adapter merged on top rescales the already merged weight: only unmerging last-first undoes it
    model.merge_adapter(["third"])
    assert q.merged_adapters == ["default", "second", "third"]
    model.unmerge_adapter()
    assert q.merged_adapters == []
    for k, v in inner.state_dict().items():
        if "lora_" not in k:
            torch.testing.assert_close(v, original[k], atol=1e-6, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    torch.testing.assert_close(run(model, arch), unmerged, atol=ATOL, rtol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_safe_merge_refuses_non_finite_and_leaves_weight(bad):
    model = make_peft_model("qwen2", init_lora_weights=False)
    layers = lora_paths(model)
    path, layer = next(iter(layers.items()))  # the first layer merged
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = bad
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    with pytest.raises(ValueError, match="NaN/Inf"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.weight, before[f"{path}.weight"])
    assert layer.merged_adapters == []
    for k, v in model.get_base_model().state_dict().items():  # the refused layer came first: nothing merged
        if "lora_" not in k:
            assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="NaN/Inf"):
        model.merge_and_unload(safe_merge=True)
    assert torch.equal(layer.weight, before[f"{path}.weight"])
    # without safe_merge the non-finite value does go in (the check is what refused it)
    model.merge_adapter(safe_merge=False)
    assert not torch.isfinite(layer.weight).all()


MERGE_UNLOAD_CASES = {
    **{a: (a, {}) for a in ARCHS},
    "bert-seqcls": ("bert", dict(task_type="SEQ_CLS")),
    "vit-modules-to-save": ("vit", dict(modules_to_save=["classifier"])),
    "llama-dora": ("llama", dict(use_dora=True)),
    "gpt2-bias-all": ("gpt2", dict(bias="all")),
    "llama-embedding": ("llama", dict(target_modules=["embed_tokens", "q_proj"])),
    "vit-conv2d": ("vit", dict(target_modules=["projection", "fc1"])),
}


def shift_biases(model, amount):
    """Move every bias off its zero init so that bias handling shows in the outputs."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.add_(amount)


@pytest.mark.parametrize("case", list(MERGE_UNLOAD_CASES))
def test_merge_and_unload_gives_plain_model_with_same_output(case):
    arch, cfg = MERGE_UNLOAD_CASES[case]
    model = make_peft_model(arch, **{"init_lora_weights": False, **cfg})
    randomize(model, "default", scale=0.2)
    if cfg.get("bias") == "all":
        shift_biases(model, 0.1)
    expected = run(model, arch)
    assert_differs(expected, base_output(arch))
    merged = model.merge_and_unload()
    reference = build_model(arch)
    assert type(merged) is type(reference)
    assert plain_modules_only(merged)
    assert sorted(merged.state_dict()) == sorted(reference.state_dict())
    assert [type(m) for m in merged.modules()] == [type(m) for m in reference.modules()]
    torch.testing.assert_close(run(merged, arch), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_unload_returns_base_model(case):
    arch, targets = CASES[case]
    model = make_peft_model(arch, targets, init_lora_weights=False)
    randomize(model, "default")
    plain = model.unload()
    assert plain_modules_only(plain)
    reference = build_model(arch)
    ref_sd, sd = reference.state_dict(), plain.state_dict()
    assert sorted(sd) == sorted(ref_sd)
    assert all(torch.equal(sd[k], ref_sd[k]) for k in ref_sd)
    assert torch.equal(run(plain, arch), run(reference, arch))


# --- disabling ------------------------------------------------------------------------------------
DISABLE_CASES = {**{a: (a, {}) for a in ARCHS}, "bert-seqcls": ("bert", dict(task_type="SEQ_CLS")),
                 "vit-conv2d": ("vit", dict(target_modules=["projection", "q_proj"])),
                 "llama-embedding": ("llama", dict(target_modules=["embed_tokens"]))}


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("case", list(DISABLE_CASES))
def test_disable_adapter_gives_base_output_and_restores(case, merged):
    arch, cfg = DISABLE_CASES[case]
    model = make_peft_model(arch, **{"init_lora_weights": False, **cfg})
    randomize(model, "default", scale=0.2)
    base = base_output(arch)
    adapted = run(model, arch)
    assert_differs(adapted, base)
    if merged:
        model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(run(model, arch), base, atol=ATOL if merged else 0, rtol=0)
    torch.testing.assert_close(run(model, arch), adapted, atol=ATOL, rtol=0)
    # and also when the block is left by an exception
    with pytest.raises(RuntimeError):
        with model.disable_adapter():
            raise RuntimeError("boom")
    torch.testing.assert_close(run(model, arch), adapted, atol=ATOL, rtol=0)


# --- several adapters -----------------------------------------------------------------------------
def _trainable(model) -> set[str]:
    return {n for n, p in model.get_base_model().named_parameters() if p.requires_grad}


def _adapter_params(model, name: str) -> set[str]:
    return {n for n, _ in model.get_base_model().named_parameters() if name in n.split(".")}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "vit"])
def test_many_adapters_activation_outputs_and_trainables(arch):
    other_targets = {"llama": ["k_proj", "q_proj"], "gpt2": ["c_attn", "c_fc"], "vit": ["projection", "q_proj"]}
    model = make_peft_model(arch, init_lora_weights=False)
    randomize(model, "default", seed=1)
    only_default = run(model, arch)

    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, use_rslora=True,
                                          target_modules=other_targets[arch]))
    randomize(model, "other", seed=2)
    # added, but inactive: same output, does not train
    assert model.active_adapter == "default"
    assert torch.equal(run(model, arch), only_default)
    assert _adapter_params(model, "other") and _trainable(model) == _adapter_params(model, "default")

    model.set_adapter("other")
    assert model.active_adapter == "other"
    assert _trainable(model) == _adapter_params(model, "other")
    torch.testing.assert_close(run(model, arch), run(hand_reference_model(arch, model, ["other"]), arch),
                               atol=ATOL, rtol=0)

    model.set_adapter(["default", "other"])
    assert model.active_adapter == ["default", "other"]
    assert _trainable(model) == _adapter_params(model, "default") | _adapter_params(model, "other")
    both = run(model, arch)
    torch.testing.assert_close(both, run(hand_reference_model(arch, model, ["default", "other"]), arch),
                               atol=ATOL, rtol=0)
    assert_differs(both, only_default)

    model.set_adapter("default")
    assert torch.equal(run(model, arch), only_default)
    with pytest.raises(ValueError, match="nope"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("other", LoraConfig(target_modules=["q_proj"]))


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_delete_adapter_removes_every_trace(arch):
    cfg = dict(task_type="SEQ_CLS") if arch == "bert" else {}
    model = make_peft_model(arch, init_lora_weights=False, **cfg)
    randomize(model, "default", seed=1)
    only_default = run(model, arch)
    model.add_adapter("extra", LoraConfig(r=3, lora_alpha=3, init_lora_weights=False, use_dora=True,
                                          target_modules=TARGETS[arch], **cfg))
    model.set_adapter(["default", "extra"])
    assert [k for k in model.state_dict() if "extra" in k.split(".")]
    model.delete_adapter("extra")

    assert [k for k in model.state_dict() if "extra" in k] == []
    assert [n for n, _ in model.named_modules() if "extra" in n] == []
    assert "extra" not in model.peft_config
    assert model.active_adapter == "default"
    for layer in lora_paths(model).values():
        assert "extra" not in layer.r and "extra" not in layer.scaling and layer.active_adapters == ["default"]
    assert _trainable(model) == _adapter_params(model, "default")
    assert torch.equal(run(model, arch), only_default)
    with pytest.raises(ValueError):
        model.set_adapter("extra")


@pytest.mark.parametrize("arch", ARCHS)
def test_delete_all_adapters_then_unload_gives_original_state(arch):
    cfg = dict(task_type="SEQ_CLS") if arch == "bert" else \
        dict(modules_to_save=["classifier"]) if arch == "vit" else {}
    model = make_peft_model(arch, init_lora_weights=False, **cfg)
    model.add_adapter("b", LoraConfig(r=2, init_lora_weights=False, target_modules=TARGETS[arch], **cfg))
    randomize(model, "default", seed=1)
    randomize(model, "b", seed=2)
    with pytest.warns(UserWarning, match="Setting active adapter to b"):
        model.delete_adapter("default")
    model.delete_adapter("b")
    assert model.peft_config == {}
    plain = model.unload()
    assert plain_modules_only(plain)
    reference = build_model(arch)
    ref_sd, sd = reference.state_dict(), plain.state_dict()
    assert sorted(sd) == sorted(ref_sd)
    for k in ref_sd:
        assert torch.equal(sd[k], ref_sd[k]), k
    assert torch.equal(run(plain, arch), run(reference, arch))


def test_deleting_the_active_adapter_activates_a_remaining_one():
    """As PEFT: when the only active adapter is deleted, the first remaining adapter (by name) takes over."""
    arch = "llama"
    model = make_peft_model(arch, init_lora_weights=False)
    for name in ("zeta", "beta"):
        model.add_adapter(name, LoraConfig(r=2, init_lora_weights=False, target_modules=["k_proj", "q_proj"]))
        randomize(model, name, seed=len(name))
    model.set_adapter("zeta")
    zeta = run(model, arch)
    model.delete_adapter("beta")  # not active: nothing changes
    assert model.active_adapter == "zeta" and torch.equal(run(model, arch), zeta)
    model.add_adapter("beta", LoraConfig(r=2, init_lora_weights=False, target_modules=["v_proj"]))
    randomize(model, "beta", seed=3)
    with pytest.warns(UserWarning, match="Setting active adapter to beta"):
        model.delete_adapter("zeta")
    assert model.active_adapter == "beta"
    assert _trainable(model) == _adapter_params(model, "beta")
    for layer in lora_paths(model).values():
        assert layer.active_adapters == ["beta"]
    torch.testing.assert_close(run(model, arch), run(hand_reference_model(arch, model, ["beta"]), arch),
                               atol=ATOL, rtol=0)
    # with two active, deleting one leaves the other
    model.set_adapter(["default", "beta"])
    model.delete_adapter("beta")
    assert model.active_adapter == "default"


def test_set_adapter_while_merged_unmerges_first():
    """As PEFT: switching adapters on a merged model takes the merged adapter out of the weights first;
    otherwise its delta would stay in the weights beside the newly active adapter."""
    arch = "llama"
    model = make_peft_model(arch, init_lora_weights=False)
    model.add_adapter("other", LoraConfig(r=2, init_lora_weights=False, target_modules=["q_proj", "k_proj"]))
    randomize(model, "default", seed=1)
    randomize(model, "other", seed=2)
    original = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
    only_default = run(model, arch)
    model.merge_adapter()
    with pytest.warns(UserWarning, match="Unmerging"):
        model.set_adapter("other")
    assert all(layer.merged_adapters == [] for layer in lora_paths(model).values())
    for k, v in model.get_base_model().state_dict().items():
        if "lora_" not in k:
            torch.testing.assert_close(v, original[k], atol=1e-6, rtol=0)
    torch.testing.assert_close(run(model, arch), run(hand_reference_model(arch, model, ["other"]), arch),
                               atol=ATOL, rtol=0)
    model.set_adapter("default")
    torch.testing.assert_close(run(model, arch), only_default, atol=ATOL, rtol=0)


@pytest.mark.parametrize("first,second", [("none", "all"), ("all", "none"), ("none", "lora_only")])
def test_added_inactive_adapter_bias_setting_trains_nothing(first, second):
    """Trainable = the active adapters only: an added (inactive) adapter's `bias` does not unfreeze biases,
    and does not refreeze the biases the active adapter trains (PEFT's rule)."""
    model = make_peft_model("bert", bias=first)
    first_biases = {n for n, _ in model.get_base_model().named_parameters()
                    if n.endswith(".bias") and ".lora_" not in n} if first == "all" else set()
    assert _trainable(model) == _adapter_params(model, "default") | first_biases
    model.add_adapter("b", LoraConfig(r=2, target_modules=["query", "value", "key"], bias=second))
    assert _trainable(model) == _adapter_params(model, "default") | first_biases
    model.set_adapter("b")
    assert _trainable(model) == _adapter_params(model, "b") | first_biases


# --- the base model's own keys stay valid ---------------------------------------------------------
KEY_CASES = {**CASES, "bert-seqcls": ("bert", None), "vit-save": ("vit", None)}


@pytest.mark.parametrize("case", list(KEY_CASES))
def test_base_state_dict_loads_into_adapted_model(case):
    arch, targets = KEY_CASES[case]
    extra = dict(task_type="SEQ_CLS") if case == "bert-seqcls" else \
        dict(modules_to_save=["classifier"]) if case == "vit-save" else {}
    model = make_peft_model(arch, targets, init_lora_weights=False, **extra)
    inner = model.get_base_model()
    ref_sd = build_model(arch).state_dict()
    sd = inner.state_dict()
    for k, v in ref_sd.items():  # every original key is still there, with the same tensor
        assert k in sd, k
        assert torch.equal(sd[k], v), k
    extra_keys = set(sd) - set(ref_sd)
    assert extra_keys and all(re.search(r"(^|\.)(lora_\w+|modules_to_save)\.", k) for k in extra_keys)

    # loading new base weights strictly (minus the adapter's keys) reaches the wrapped base modules
    new_sd = {k: v + 1.0 if v.is_floating_point() else v for k, v in ref_sd.items()}
    result = inner.load_state_dict(new_sd, strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == extra_keys
    sd = inner.state_dict()
    assert all(torch.equal(sd[k], new_sd[k]) for k in new_sd)
    for path, layer in lora_paths(model).items():
        assert torch.equal(layer.base_layer.weight, new_sd[f"{path}.weight"])
        assert layer.base_layer.weight is layer.weight


# --- save / load ----------------------------------------------------------------------------------
ROUNDTRIP_CASES = {
    **{a: (a, dict(target_modules=TARGETS[a])) for a in ARCHS},
    "llama-dora-rslora": ("llama", dict(target_modules=["q_proj", "v_proj"], use_dora=True, use_rslora=True)),
    "bert-seqcls": ("bert", dict(target_modules=["query", "value"], task_type="SEQ_CLS")),
    "gpt2-bias-all": ("gpt2", dict(target_modules=["c_attn"], bias="all")),
    "llama-embedding": ("llama", dict(target_modules=["embed_tokens", "q_proj"])),
    "vit-conv2d": ("vit", dict(target_modules=["projection", "q_proj"], modules_to_save=["classifier"])),
}


@pytest.mark.parametrize("case", list(ROUNDTRIP_CASES))
def test_save_and_load_roundtrip(case, tmp_path):
    arch, cfg = ROUNDTRIP_CASES[case]
    model = make_peft_model(arch, **{"init_lora_weights": False, **cfg})
    randomize(model, "default")
    if cfg.get("bias") == "all":
        shift_biases(model, 0.25)
    expected = run(model, arch)
    assert_differs(expected, base_output(arch))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build_model(arch), tmp_path)
    assert torch.equal(run(loaded, arch), expected)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference by default
    trainable = PeftModel.from_pretrained(build_model(arch), tmp_path, is_trainable=True)
    assert _trainable(trainable) == _trainable(model)
    assert torch.equal(run(trainable, arch), expected)


def test_two_adapters_roundtrip_with_subfolder(tmp_path):
    arch = "llama"
    model = make_peft_model(arch, init_lora_weights=False)
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, use_rslora=True,
                                          target_modules=["k_proj", "down_proj"]))
    randomize(model, "default", seed=1)
    randomize(model, "other", seed=2)
    expected = {}
    for active in ("default", "other", ("default", "other")):
        model.set_adapter(list(active) if isinstance(active, tuple) else active)
        expected[active] = run(model, arch)
    assert_differs(expected["default"], expected["other"])
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()

    loaded = PeftModel.from_pretrained(build_model(arch), tmp_path)
    loaded.load_adapter(tmp_path, adapter_name="other", subfolder="other")
    assert loaded.active_adapter == "default"  # load_adapter adds it inactive
    assert torch.equal(run(loaded, arch), expected["default"])
    for active in ("other", ("default", "other")):
        loaded.set_adapter(list(active) if isinstance(active, tuple) else active)
        assert torch.equal(run(loaded, arch), expected[active])


# --- parameter counts -----------------------------------------------------------------------------
def test_print_trainable_parameters_format(capsys):
    model = make_peft_model("llama", r=16, lora_alpha=16)
    # per decoder layer: q_proj 32 -> 32 and v_proj 32 -> 16 (2 kv heads of 8): r * (in + out) each
    trainable = 2 * (16 * (32 + 32) + 16 * (32 + 16))
    total = sum(p.numel() for p in build_model("llama").parameters()) + trainable
    assert (trainable, total) == (3584, 25248)
    assert model.get_nb_trainable_parameters() == (trainable, total)
    model.print_trainable_parameters()
    out = capsys.readouterr().out
    assert out == "trainable params: 3,584 || all params: 25,248 || trainable%: 14.1952\n"


@pytest.mark.parametrize("arch", ARCHS)
def test_trainable_parameter_counts(arch, capsys):
    base_total = sum(p.numel() for p in build_model(arch).parameters())  # tied weights count once
    model = make_peft_model(arch, r=2)
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert lora > 0
    assert model.get_nb_trainable_parameters() == (lora, base_total + lora)
    model.add_adapter("b", LoraConfig(r=3, target_modules=TARGETS[arch]))
    lora_b = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n and ".b." in n)
    assert lora_b == lora * 3 // 2
    assert model.get_nb_trainable_parameters() == (lora, base_total + lora + lora_b)
    model.set_adapter(["default", "b"])
    assert model.get_nb_trainable_parameters() == (lora + lora_b, base_total + lora + lora_b)
    model.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    m = re.fullmatch(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: (\d+\.\d{4})", line)
    assert m, line
    assert m.group(1) == f"{lora + lora_b:,}" and m.group(2) == f"{base_total + lora + lora_b:,}"
    assert float(m.group(3)) == pytest.approx(100 * (lora + lora_b) / (base_total + lora + lora_b), abs=5e-5)


# --- dtype conversion after injection -------------------------------------------------------------
DTYPE_CASES = {
    "llama": ("llama", ["embed_tokens", "q_proj", "v_proj", "down_proj"]),
    "gpt2": ("gpt2", ["c_attn", "c_fc", "wpe"]),
    "vit": ("vit", ["projection", "q_proj", "fc2"]),
    "bert": ("bert", ["query", "value", "word_embeddings"]),
}


@pytest.mark.parametrize("convert", ["to", "double"])
@pytest.mark.parametrize("case", list(DTYPE_CASES))
def test_dtype_conversion_keeps_base_and_wrapper_in_sync(case, convert):
    arch, targets = DTYPE_CASES[case]
    model = make_peft_model(arch, targets, init_lora_weights=False)
    randomize(model, "default")
    model = model.to(torch.float64) if convert == "to" else model.double()
    for name, p in model.named_parameters():
        assert p.dtype == torch.float64, name
    for path, layer in lora_paths(model).items():
        assert layer.weight is layer.base_layer.weight, path
        assert layer.base_layer.weight.dtype == torch.float64, path
        if getattr(layer.base_layer, "bias", None) is not None:
            assert layer.bias is layer.base_layer.bias and layer.bias.dtype == torch.float64
    got = run(model, arch, torch.float64)
    assert got.dtype == torch.float64
    expected = run(hand_reference_model(arch, model, ["default"], torch.float64), arch, torch.float64)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    # merging in float64 then still reaches the weights the base modules compute with
    model.merge_adapter()
    torch.testing.assert_close(run(model, arch, torch.float64), expected, atol=1e-10, rtol=1e-10)
    model.unmerge_adapter()
    # an adapter added after the conversion lives in float64 too
    model.add_adapter("late", LoraConfig(r=2, init_lora_weights=False, target_modules=targets))
    late = {n: p for n, p in model.named_parameters() if "late" in n.split(".")}
    assert late and all(p.dtype == torch.float64 for p in late.values())
    model.set_adapter(["default", "late"])
    expected = run(hand_reference_model(arch, model, ["default", "late"], torch.float64), arch, torch.float64)
    torch.testing.assert_close(run(model, arch, torch.float64), expected, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(run(model.unload(), arch, torch.float64), base_output(arch, torch.float64),
                               atol=1e-10, rtol=1e-10)
