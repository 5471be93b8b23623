"""add_weighted_adapter against PEFT's: each combination type makes the same new adapter (factors, config,
logits) from the same random sources, the result loads in PEFT, and bad arguments are refused."""
from __future__ import annotations

import peft
import pytest
import torch

import lorakit
from helpers import TARGETS, build_model, make_peft_model, model_inputs, model_output, randomize
from lorakit.model.combine import COMBINATIONS

SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # PEFT needs one rank for these
ATOL = 1e-5


def with_adapters(lib: str, arch: str, sources: dict[str, dict]):
    """A tiny model of `lib` (lorakit or peft) carrying `sources` (adapter name -> LoraConfig fields over
    r=4, lora_alpha=8 and the architecture's TARGETS), each filled with random values from its own seed."""
    mod = peft if lib == "peft" else lorakit
    (first, config), *rest = sources.items()
    model = make_peft_model(arch, lib=lib, adapter_name=first, **config)
    for name, config in rest:
        model.add_adapter(name, mod.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS.get(arch),
                                                  **config}))
    for seed, name in enumerate(sources):
        randomize(model, name, seed=seed)
    return model


def combined_in_both(arch: str, sources: dict[str, dict], *args, via: str = "PeftModel", **kwargs) -> dict:
    """lib -> the model after add_weighted_adapter(*args, **kwargs), the new adapter "mix" set active.
    Each call starts from the same global generator state, so DARE draws the same masks in both
    libraries (PEFT draws them tensor by tensor, A's then B's, layer by layer; lorakit follows that order)."""
    models = {}
    for lib in ("peft", "lorakit"):
        model = with_adapters(lib, arch, sources)
        torch.manual_seed(1234)
        (model if via == "PeftModel" else model.base_model).add_weighted_adapter(*args, "mix", **kwargs)
        model.set_adapter("mix")
        models[lib] = model
    return models


def adapter_tensors(model, name: str = "mix") -> dict[str, torch.Tensor]:
    """An adapter's tensors by their saved key (PEFT keeps DoRA's magnitude as `<name>.weight` in the model)."""
    return {k.removesuffix(".weight") if "magnitude" in k else k: p.detach()
            for k, p in model.named_parameters() if f".{name}." in f"{k}."}


def assert_same_adapter(arch: str, models: dict, tol: float = 0.0) -> None:
    """The new adapter's tensors (exactly, by default), its rank / alpha / targets and the model's logits."""
    want, got = adapter_tensors(models["peft"]), adapter_tensors(models["lorakit"])
    assert got.keys() == want.keys() and got
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=tol, atol=tol, msg=key)
    p, k = models["peft"].peft_config["mix"], models["lorakit"].peft_config["mix"]
    assert (k.r, k.lora_alpha, k.use_dora) == (p.r, p.lora_alpha, p.use_dora)
    assert (sorted(k.target_modules) if isinstance(k.target_modules, list) else k.target_modules) == \
        (sorted(p.target_modules) if isinstance(p.target_modules, set) else p.target_modules)
    inputs = model_inputs(arch)
    with torch.no_grad():
        torch.testing.assert_close(model_output(models["lorakit"], inputs), model_output(models["peft"], inputs),
                                   rtol=0, atol=ATOL)


def three_sources(combination: str) -> dict[str, dict]:
    """Three adapters, of ranks 4, 2, 3 where the combination allows different ranks."""
    ranks = [4, 4, 4] if combination in SAME_RANK else [4, 2, 3]
    return {name: dict(r=r, lora_alpha=2 * r + i) for i, (name, r) in enumerate(zip(["default", "b", "c"], ranks))}


# --- every combination type, on Linear (Llama) and Conv1D (GPT-2) layers --------------------------
@pytest.mark.parametrize("combination", COMBINATIONS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_combination_matches_peft(arch, combination):
    models = combined_in_both(arch, three_sources(combination), ["default", "b", "c"], [0.7, -1.3, 0.4],
                              combination_type=combination, density=0.5)
    assert_same_adapter(arch, models)


# --- the options, and layers of every kind ---------------------------------------------------------
TWO = {"default": {}, "b": dict(r=2, lora_alpha=3)}
TWO_SAME = {"default": {}, "b": dict(lora_alpha=5)}
CASES = {  # name -> (arch, sources, add_weighted_adapter's keyword arguments)
    "svd-rank-clamp": ("llama", TWO, dict(combination_type="svd", svd_rank=2, svd_clamp=0.9)),
    "svd-reduced": ("gpt2", TWO, dict(combination_type="svd", svd_rank=6, svd_full_matrices=False)),
    "ties-frequency": ("llama", TWO_SAME, dict(combination_type="ties", density=0.3, majority_sign_method="frequency")),
    "dare-ties-svd-frequency": ("gpt2", TWO, dict(combination_type="dare_ties_svd", density=0.7,
                                                  majority_sign_method="frequency", svd_clamp=0.99)),
    "density-1": ("llama", TWO_SAME, dict(combination_type="dare_linear", density=1.0)),
    "one-adapter-is-linear": ("llama", {"default": dict(r=2)}, dict(combination_type="ties_svd", density=0.5)),
    "different-targets": ("llama", {"default": {}, "b": dict(r=2, target_modules=["k_proj", "q_proj"])},
                          dict(combination_type="cat")),
    "regex-targets": ("llama", {"default": dict(target_modules=r".*\.q_proj"), "b": dict(target_modules=r".*\.v_proj")},
                      dict(combination_type="svd")),
    "rank-pattern-cat": ("llama", {"default": dict(rank_pattern={"v_proj": 2}), "b": dict(r=3)},
                         dict(combination_type="cat")),
    "embedding-svd": ("llama", {"default": dict(target_modules=["embed_tokens", "q_proj"]), "b": dict(r=2)},
                      dict(combination_type="svd")),
    "embedding-dare-ties": ("llama", {"default": dict(target_modules=["embed_tokens"]),
                                      "b": dict(target_modules=["embed_tokens"])},
                            dict(combination_type="dare_ties", density=0.6)),
    "conv2d-svd": ("conv", {"default": dict(r=3, target_modules=["conv1", "conv2", "conv3"]),
                            "b": dict(r=2, target_modules=["conv1", "conv3"])}, dict(combination_type="svd")),
    "conv2d-ties": ("conv", {"default": dict(r=2, target_modules=["conv1", "conv2"]),
                             "b": dict(r=2, target_modules=["conv1", "conv2"])},
                    dict(combination_type="ties", density=0.5)),
    "dora": ("llama", {"default": dict(use_dora=True), "b": dict(r=2, use_dora=True)}, dict(combination_type="svd")),
    "modules-to-save": ("vit", {"default": dict(modules_to_save=["classifier"]), "b": {}},
                        dict(combination_type="cat")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_options_and_layer_kinds_match_peft(case):
    arch, sources, kwargs = CASES[case]
    names = list(sources)
    weights = [0.8, -0.6][:len(names)]
    # through LoraModel (model.base_model) here, through PeftModel above
    models = combined_in_both(arch, sources, names, weights, via="LoraModel", **kwargs)
    # a kernel-3 Conv2d delta is an einsum here, a conv2d in PEFT: the same up to fp32 rounding
    assert_same_adapter(arch, models, tol=1e-5 if arch == "conv" else 0.0)


# --- the result, saved, loads in PEFT ---------------------------------------------------------------
@pytest.mark.parametrize("arch, combination", [("llama", "svd"), ("gpt2", "cat"), ("llama", "dare_ties")])
def test_combined_adapter_loads_in_peft(arch, combination, tmp_path):
    sources = {"default": dict(use_dora=True), "b": dict(use_dora=True)} if combination == "svd" else TWO_SAME
    model = with_adapters("lorakit", arch, sources)
    model.add_weighted_adapter(["default", "b"], [1.0, 0.5], "mix", combination, density=0.5)
    model.set_adapter("mix")
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    loaded = peft.PeftModel.from_pretrained(build_model(arch), tmp_path / "mix", adapter_name="mix")
    inputs = model_inputs(arch)
    with torch.no_grad():
        torch.testing.assert_close(model_output(loaded, inputs), model_output(model, inputs), rtol=0, atol=ATOL)


def test_rslora_sources_combine_at_scaling_one():
    """PEFT copies use_rslora into the new adapter, so its scaling is sqrt(r) where the combination assumes
    1: lorakit makes the same factors and switches rsLoRA off. One adapter at weight 1 then computes as itself."""
    sources = {"default": dict(use_rslora=True, lora_alpha=6)}
    models = combined_in_both("llama", sources, ["default"], [1.0], combination_type="linear")
    want, got = adapter_tensors(models["peft"]), adapter_tensors(models["lorakit"])
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    assert models["peft"].peft_config["mix"].use_rslora and not models["lorakit"].peft_config["mix"].use_rslora
    model, inputs = models["lorakit"], model_inputs("llama")
    with torch.no_grad():
        mixed = model_output(model, inputs)
        model.set_adapter("default")
        torch.testing.assert_close(mixed, model_output(model, inputs), rtol=0, atol=ATOL)



def test_svd_beyond_a_layers_size_keeps_all_of_it():
    """Where PEFT fails: an svd_rank above a layer's size keeps the whole delta (zero-padded), and a layer
    that none of the sources adapts (here b excludes conv1) gets zero factors."""
    model = with_adapters("lorakit", "conv", {"default": dict(r=3, target_modules=["conv3"]),
                                              "b": dict(r=2, target_modules=["conv1", "conv3"],
                                                        exclude_modules=["conv1"])})
    model.add_weighted_adapter(["default", "b"], [0.8, -0.6], "mix", "svd", svd_rank=7)  # conv3's delta: 6 x 72
    conv1, conv3 = model.base_model.model.conv1, model.base_model.model.conv3
    want = 0.8 * conv3.delta_weight("default") - 0.6 * conv3.delta_weight("b")
    torch.testing.assert_close(conv3.delta_weight("mix"), want, rtol=0, atol=1e-5)
    assert conv3.lora_B["mix"].weight[:, 6:].abs().sum() == 0
    assert conv1.lora_A["mix"].weight.abs().sum() == 0 and conv1.lora_B["mix"].weight.abs().sum() == 0


# --- bad input --------------------------------------------------------------------------------------
ERRORS = {  # name -> (add_weighted_adapter's arguments over adapters=[default, b], weights=[1, 1], "mix"; message)
    "unknown-type": (dict(combination_type="blend"), r"'blend' is not one of \['svd', 'linear'"),
    "unknown-adapter": (dict(adapters=["default", "nope"]), r"no adapter named 'nope'"),
    "weights-length": (dict(weights=[1]), r"one weight per adapter: got 2 adapters and 1 weights"),
    "no-adapters": (dict(adapters=[], weights=[]), r"one weight per adapter"),
    "existing-name": (dict(adapter_name="b"), r"adapter 'b' already exists"),
    "ranks-differ": (dict(adapters=["default", "small"], combination_type="linear"),
                     r"needs adapters of one rank.*'small': 2"),
    "no-density": (dict(combination_type="ties"), r"'ties' needs density in \(0, 1\].*None"),
    "density-zero": (dict(combination_type="dare_linear_svd", density=0.0), r"needs density in \(0, 1\]"),
    "density-above-one": (dict(combination_type="magnitude_prune", density=1.5), r"needs density in \(0, 1\]"),
    "sign-method": (dict(combination_type="ties", density=0.5, majority_sign_method="mean"),
                    r"majority_sign_method must be one of \['total', 'frequency'\]"),
    "svd-rank": (dict(svd_rank=0), r"svd_rank must be a positive rank"),
    "svd-clamp": (dict(svd_clamp=1.5), r"svd_clamp is a quantile in \[0, 1\]"),
    "targets-regex-and-list": (dict(adapters=["default", "regex"]), r"mix a regex string and a list"),
    "ranks-differ-in-a-layer": (dict(adapters=["default", "pattern"], combination_type="linear"),
                                r"v_proj: the adapters' ranks differ here \(\[4, 2\]"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_is_refused(case):
    kwargs, message = ERRORS[case]
    model = with_adapters("lorakit", "llama", {"default": {}, "b": {}, "small": dict(r=2),
                                               "regex": dict(target_modules=r".*\.q_proj"),
                                               "pattern": dict(rank_pattern={"v_proj": 2})})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        model.add_weighted_adapter(**{"adapters": ["default", "b"], "weights": [1, 1], "adapter_name": "mix",
                                      **kwargs})
    assert sorted(model.peft_config) == ["b", "default", "pattern", "regex", "small"]  # nothing added or lost
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_copies_of_one_module_to_save_are_refused():
    model = with_adapters("lorakit", "vit", {"default": dict(modules_to_save=["classifier"]),
                                             "b": dict(modules_to_save=["classifier"])})
    with pytest.raises(ValueError, match=r"\['b', 'default'\] each train their own copy of 'classifier'"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "mix")
