"""Cross-checks against Hugging Face PEFT itself: adapter files both ways, file format, training
numerics and merging. PEFT is a test dependency only; lorakit never imports it."""
from __future__ import annotations

import os
import warnings
from functools import partial

import peft
import pytest
import torch
from torch import nn

import lorakit
from helpers import ARCHS, adapter_config, adapter_weights, build_model, make_peft_model, model_inputs, model_output
from lorakit.train.loss import batch_loss_sum

ATOL = 1e-5
# Every base model here has its biases moved off zero, so code that mishandles a layer's bias shows.
biased_model = partial(build_model, nonzero_biases=True)


# --- the configurations checked ---------------------------------------------------------------
# name -> (architecture, LoraConfig kwargs (the same for lorakit and PEFT), adapter name)
CASES: dict[str, tuple[str, dict, str]] = {
    **{f"arch-{a}": (a, dict(r=4, lora_alpha=8, init_lora_weights=False,
                             # PEFT has no default target_modules for ViT; the others use the default
                             target_modules=["q_proj", "v_proj"] if a == "vit" else None), "default")
       for a in ARCHS},
    "embedding": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]), "default"),
    # GPT-2 ties lm_head to wte: PEFT then saves both (shared) base weights, which safetensors needs unaliased
    "tied-embeddings": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["wte", "lm_head", "c_attn"]), "default"),
    "conv2d": ("conv", dict(r=3, lora_alpha=6, target_modules=["conv1", "conv2", "conv3"]), "default"),
    "rslora": ("llama", dict(r=4, lora_alpha=16, use_rslora=True, init_lora_weights=False,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), "default"),
    "dora-linear": ("llama", dict(r=4, lora_alpha=8, use_dora=True,
                                  target_modules=["q_proj", "v_proj", "down_proj"]), "default"),
    "dora-biased-linear": ("qwen2", dict(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False,
                                         target_modules=["q_proj", "k_proj", "v_proj"]), "default"),
    "dora-conv1d": ("gpt2", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn", "c_proj"]), "default"),
    "patterns": ("llama", dict(r=4, lora_alpha=8, init_lora_weights=False,
                               target_modules=["q_proj", "v_proj", "o_proj"],
                               rank_pattern={"q_proj": 2, "layers.1.self_attn.v_proj": 6},
                               alpha_pattern={"o_proj": 3, "layers.0.self_attn.q_proj": 5}), "default"),
    "seq-cls": ("bert", dict(r=4, lora_alpha=8, task_type="SEQ_CLS"), "default"),
    "modules-to-save": ("vit", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                    modules_to_save=["classifier"]), "default"),
    "bias-all": ("bert", dict(r=4, lora_alpha=8, bias="all", target_modules=["query", "value"]), "default"),
    "bias-lora-only": ("bert", dict(r=4, lora_alpha=8, bias="lora_only", target_modules=["query", "value"]),
                       "default"),
    "adapter-name": ("llama", dict(r=4, lora_alpha=8, init_lora_weights=False), "other"),
    "all-linear-llama": ("llama", dict(r=2, lora_alpha=4, target_modules="all-linear"), "default"),
    "all-linear-gpt2": ("gpt2", dict(r=2, lora_alpha=4, target_modules="all-linear"), "default"),
    "all-linear-bert-cls": ("bert", dict(r=2, lora_alpha=4, target_modules="all-linear", task_type="SEQ_CLS"),
                            "default"),
    "layers-to-transform": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          layers_to_transform=[1], layers_pattern="layers"), "default"),
    "layers-to-transform-int": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                             layers_to_transform=0), "default"),
    "regex-targets": ("llama", dict(r=4, lora_alpha=8, target_modules=r".*\.layers\.1\..*(q_proj|up_proj)"),
                      "default"),
    "exclude-modules": ("qwen2", dict(r=4, lora_alpha=8, target_modules="all-linear",
                                      exclude_modules=["down_proj", "o_proj"]), "default"),
    "bias-all-conv": ("conv", dict(r=3, lora_alpha=6, bias="all", target_modules=["conv1", "conv3"]), "default"),
    "bias-all-seq-cls": ("bert", dict(r=4, lora_alpha=8, bias="all", task_type="SEQ_CLS"), "default"),
    "gaussian-init-dropout": ("qwen2", dict(r=4, lora_alpha=8, init_lora_weights="gaussian", lora_dropout=0.1),
                              "default"),
}
# A case that names no target_modules leaves them to each library's default (not helpers.TARGETS).
CASES = {name: (arch, {"target_modules": None, **cfg}, adapter) for name, (arch, cfg, adapter) in CASES.items()}


def load(lib: str, arch: str, directory: str, adapter_name: str):
    """PeftModel.from_pretrained of lorakit or PEFT on a fresh base model."""
    mod = lorakit if lib == "lorakit" else peft
    subfolder = None if adapter_name == "default" else adapter_name
    return mod.PeftModel.from_pretrained(biased_model(arch), directory, adapter_name=adapter_name, subfolder=subfolder)


def train(model, inputs, steps: int = 2, lr: float = 1e-2) -> list[float]:
    """A few AdamW steps on a scalar of the output: every trainable tensor moves off its init."""
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "nothing to train"
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = (model_output(model, inputs) - 0.5).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _normalised_trainables(model) -> dict[str, nn.Parameter]:
    """Trainable parameters keyed alike for both libraries (PEFT's base_layer hop and the
    `.weight` of its DoRA magnitude module removed)."""
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = name.replace(".base_layer.", ".")
        if "lora_magnitude_vector" in name and name.endswith(".weight"):
            name = name[: -len(".weight")]
        out[name] = p
    return out


def adapter_dir(root, adapter_name: str) -> str:
    return str(root) if adapter_name == "default" else os.path.join(str(root), adapter_name)


# --- 1 & 2: adapters saved by one library load in the other and compute the same ----------------
@pytest.mark.parametrize("direction", ["lorakit->peft", "peft->lorakit"])
@pytest.mark.parametrize("case", list(CASES))
def test_adapter_roundtrip_between_libraries(case, direction, tmp_path):
    arch, cfg, adapter_name = CASES[case]
    writer, reader = direction.split("->")
    inputs = model_inputs(arch)
    with torch.no_grad():
        base_out = model_output(biased_model(arch), inputs)

    source = make_peft_model(arch, adapter_name=adapter_name, lib=writer, nonzero_biases=True, **cfg)
    train(source, inputs)
    source.eval()
    with torch.no_grad():
        expected = model_output(source, inputs)
    # the adapter really changes the model, far beyond the tolerance, so a loader that drops it fails
    assert (expected - base_out).abs().max() > 20 * ATOL

    source.save_pretrained(tmp_path)
    saved = adapter_dir(tmp_path, adapter_name)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(saved))  # PEFT adds a README
    if adapter_name != "default":
        assert not os.path.exists(tmp_path / "adapter_config.json")

    loaded = load(reader, arch, str(tmp_path), adapter_name)
    assert loaded.active_adapter == adapter_name
    with torch.no_grad():
        got = model_output(loaded, inputs)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("direction", ["lorakit->peft", "peft->lorakit"])
def test_targeted_embedding_base_weights_travel_like_peft(direction, tmp_path):
    """PEFT saves (and loads) the base weight of a targeted embed_tokens (save_embedding_layers="auto"),
    e.g. after the vocabulary was edited; the reader must put it back into the base model."""
    writer, reader = direction.split("->")
    arch, cfg, _ = CASES["embedding"]
    inputs = model_inputs(arch)
    source = make_peft_model(arch, adapter_name="default", lib=writer, nonzero_biases=True, **cfg)
    train(source, inputs)
    with torch.no_grad():
        source.get_input_embeddings().base_layer.weight.add_(0.5)  # the base embedding itself was changed
        expected = model_output(source.eval(), inputs)
    source.save_pretrained(tmp_path)
    assert "base_model.model.model.embed_tokens.base_layer.weight" in adapter_weights(str(tmp_path))
    loaded = load(reader, arch, str(tmp_path), "default")
    with torch.no_grad():
        torch.testing.assert_close(model_output(loaded, inputs), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("direction", ["lorakit->peft", "peft->lorakit"])
def test_two_adapters_saved_together(direction, tmp_path):
    """'default' at the top of the folder and a second adapter in its subfolder, each loading and
    computing the same in the other library (with only that adapter active)."""
    writer, reader = direction.split("->")
    w, r = (lorakit if lib == "lorakit" else peft for lib in (writer, reader))
    inputs = model_inputs("llama")
    first = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
    second = dict(r=2, lora_alpha=8, init_lora_weights=False, use_rslora=True, target_modules=["k_proj", "o_proj"])
    source = w.get_peft_model(biased_model("llama"), w.LoraConfig(**first))
    source.add_adapter("other", w.LoraConfig(**second))
    expected = {}
    with torch.no_grad():
        for name in ("default", "other"):
            source.set_adapter(name)
            expected[name] = model_output(source.eval(), inputs)
    assert (expected["default"] - expected["other"]).abs().max() > 20 * ATOL
    source.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "adapter_config.json")
    assert os.path.isfile(tmp_path / "other" / "adapter_config.json")

    loaded = r.PeftModel.from_pretrained(biased_model("llama"), str(tmp_path))
    loaded.load_adapter(str(tmp_path), adapter_name="other", subfolder="other")
    with torch.no_grad():
        for name in ("default", "other"):
            loaded.set_adapter(name)
            torch.testing.assert_close(model_output(loaded.eval(), inputs), expected[name], atol=ATOL, rtol=0)


# --- 3: the files themselves ----------------------------------------------------------------------
def _peft_and_lorakit_files(case, tmp_path):
    arch, cfg, adapter_name = CASES[case]
    dirs, models = {}, {}
    for lib in ("lorakit", "peft"):
        models[lib] = make_peft_model(arch, adapter_name=adapter_name, lib=lib, nonzero_biases=True, **cfg)
        models[lib].save_pretrained(tmp_path / lib)
        dirs[lib] = adapter_dir(tmp_path / lib, adapter_name)
    return dirs, models


@pytest.mark.parametrize("case", list(CASES))
def test_saved_files_and_trainables_match_peft(case, tmp_path):
    dirs, models = _peft_and_lorakit_files(case, tmp_path)

    # the same parameters train (adapters, DoRA magnitudes, biases per `bias`, modules_to_save copies)
    trainable = {lib: {k: tuple(p.shape) for k, p in _normalised_trainables(m).items()} for lib, m in models.items()}
    assert trainable["lorakit"] == trainable["peft"]

    # same tensor names, shapes and dtypes
    ours, theirs = adapter_weights(dirs["lorakit"]), adapter_weights(dirs["peft"])
    assert sorted(ours) == sorted(theirs)
    assert {k: (tuple(v.shape), v.dtype) for k, v in ours.items()} == \
           {k: (tuple(v.shape), v.dtype) for k, v in theirs.items()}

    # adapter_config.json: PEFT reads lorakit's, and the shared fields agree
    peft_cfg = peft.LoraConfig.from_pretrained(dirs["lorakit"])
    assert isinstance(peft_cfg, peft.LoraConfig)
    ours_json, theirs_json = adapter_config(dirs["lorakit"]), adapter_config(dirs["peft"])
    set_fields = {"target_modules", "exclude_modules", "modules_to_save"}
    diffs = {}
    for key in sorted(set(ours_json) & set(theirs_json)):
        if key == "peft_version":
            continue
        a, b = ours_json[key], theirs_json[key]
        if key in set_fields and isinstance(a, list) and isinstance(b, list):
            a, b = sorted(a), sorted(b)
        if a != b:
            diffs[key] = (a, b)
    assert not diffs, f"adapter_config.json fields lorakit vs PEFT: {diffs}"
    # and PEFT's parsed view of lorakit's file equals its parsed view of its own
    peft_own = peft.LoraConfig.from_pretrained(dirs["peft"])
    for key in ("r", "lora_alpha", "use_rslora", "use_dora", "bias", "rank_pattern", "alpha_pattern",
                "fan_in_fan_out", "task_type", "layers_to_transform", "layers_pattern"):
        assert getattr(peft_cfg, key) == getattr(peft_own, key), key
    assert set(peft_cfg.target_modules) == set(peft_own.target_modules)


def test_lorakit_reads_every_field_peft_writes(tmp_path):
    """No field of PEFT's adapter_config.json is unknown to lorakit (it would warn and drop it)."""
    peft.get_peft_model(biased_model("llama"), peft.LoraConfig(r=2)).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = lorakit.LoraConfig.from_pretrained(tmp_path)
    assert config.r == 2 and set(config.target_modules) == {"q_proj", "v_proj"}


# --- 4: training numerics -------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["drop-in", "trainer"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_training_losses_match_peft(use_dora, path):
    """20 AdamW steps from identical weights, dropout 0, 40% of tokens masked as prompt: the same losses
    through the model's own loss (lorakit's lean cross-entropy) and through the trainer's fused head."""
    cfg = dict(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, use_dora=use_dora,
               target_modules="all-linear")
    torch.manual_seed(123)
    theirs = peft.get_peft_model(biased_model("llama"), peft.LoraConfig(**cfg))
    ours = lorakit.get_peft_model(biased_model("llama"), lorakit.LoraConfig(**cfg))
    p_theirs, p_ours = _normalised_trainables(theirs), _normalised_trainables(ours)
    assert sorted(p_theirs) == sorted(p_ours)
    assert {k: p.shape for k, p in p_theirs.items()} == {k: p.shape for k, p in p_ours.items()}
    with torch.no_grad():
        for k, p in p_ours.items():
            p.copy_(p_theirs[k])
    theirs.train()
    ours.train()

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 96, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    units = (labels[:, 1:] != -100).sum()

    def our_loss():
        if path == "trainer":
            return batch_loss_sum(ours, batch)[0] / units
        return ours(**batch).loss

    opts = [torch.optim.AdamW(p.values(), lr=1e-2) for p in (p_theirs, p_ours)]
    losses = {"peft": [], "lorakit": []}
    for _ in range(20):
        for name, loss_fn, opt in (("peft", lambda: theirs(**batch).loss, opts[0]), ("lorakit", our_loss, opts[1])):
            loss = loss_fn()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    assert losses["lorakit"] == pytest.approx(losses["peft"], rel=1e-4)
    assert abs(losses["peft"][-1] - losses["peft"][0]) > 1e-2  # training did move the loss
    for k in p_ours:
        torch.testing.assert_close(p_ours[k], p_theirs[k], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dora_initial_magnitude_matches_peft(arch):
    """DoRA's magnitude starts as the row norms of W (B = 0), for Linear and transposed Conv1D."""
    cfg = dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"] if arch == "llama"
               else ["c_attn", "c_proj"])
    ours = _normalised_trainables(lorakit.get_peft_model(biased_model(arch), lorakit.LoraConfig(**cfg)))
    theirs = _normalised_trainables(peft.get_peft_model(biased_model(arch), peft.LoraConfig(**cfg)))
    mags = sorted(k for k in ours if "lora_magnitude_vector" in k)
    assert mags and mags == sorted(k for k in theirs if "lora_magnitude_vector" in k)
    for k in mags:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=0)


# --- 5: merge_and_unload --------------------------------------------------------------------------
MERGE_CASES = ["arch-llama", "arch-gpt2", "arch-bert", "embedding", "conv2d", "rslora", "dora-linear",
               "dora-biased-linear", "dora-conv1d", "patterns", "seq-cls", "bias-all"]


@pytest.mark.parametrize("case", MERGE_CASES)
def test_merge_and_unload_matches_peft(case, tmp_path):
    arch, cfg, adapter_name = CASES[case]
    inputs = model_inputs(arch)
    source = make_peft_model(arch, adapter_name=adapter_name, lib="peft", nonzero_biases=True, **cfg)
    train(source, inputs)
    source.eval()
    source.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(biased_model(arch), str(tmp_path)).merge_and_unload()
    ours = lorakit.PeftModel.from_pretrained(biased_model(arch), str(tmp_path)).merge_and_unload()
    assert type(ours) is type(theirs)

    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert sorted(sd_ours) == sorted(sd_theirs)
    assert not [k for k in sd_ours if "lora_" in k or "base_layer" in k or "modules_to_save" in k]
    for k in sd_ours:
        torch.testing.assert_close(sd_ours[k], sd_theirs[k], atol=ATOL, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    assert not any(isinstance(m, lorakit.LoraLayer) for m in ours.modules())
    with torch.no_grad():
        out_ours, out_theirs = model_output(ours, inputs), model_output(theirs, inputs)
        out_base = model_output(biased_model(arch), inputs)
    torch.testing.assert_close(out_ours, out_theirs, atol=ATOL, rtol=0)
    assert (out_ours - out_base).abs().max() > 20 * ATOL


# --- 6: adapters PEFT writes in less common ways ---------------------------------------------------
def test_load_adapter_in_eval_mode_is_deterministic_like_peft(tmp_path):
    """An adapter loaded (or added) into a model in eval mode runs without dropout, as in PEFT."""
    cfg = dict(r=4, lora_alpha=8, lora_dropout=0.5, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
    peft.get_peft_model(biased_model("llama", seed=3), peft.LoraConfig(**cfg)).save_pretrained(tmp_path)
    inputs, got = model_inputs("llama"), {}
    for lib in (peft, lorakit):
        model = lib.get_peft_model(biased_model("llama"), lib.LoraConfig(**cfg)).eval()
        model.load_adapter(str(tmp_path), adapter_name="other")
        model.set_adapter("other")
        with torch.no_grad():
            got[lib.__name__] = model_output(model, inputs)
            torch.testing.assert_close(model_output(model, inputs), got[lib.__name__], atol=0, rtol=0)
    torch.testing.assert_close(got["lorakit"], got["peft"], atol=ATOL, rtol=0)


def _resized_llama(seed: int) -> nn.Module:
    """The usual "add tokens" recipe: the vocabulary grown from 96 to 100 (new rows drawn at random)."""
    model = biased_model("llama")
    torch.manual_seed(seed)
    model.resize_token_embeddings(100)
    return model


def test_saved_embedding_layers_with_modules_to_save_load_like_peft(tmp_path):
    """embed_tokens / lm_head in modules_to_save, saved with save_embedding_layers=True (what PEFT does
    after resize_token_embeddings): the file holds each module's copy three ways and its original."""
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"])
    source = peft.get_peft_model(_resized_llama(seed=1), peft.LoraConfig(**cfg))
    inputs = {"input_ids": torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))}
    train(source, inputs)
    source.save_pretrained(tmp_path, save_embedding_layers=True)
    assert "base_model.model.lm_head.original_module.weight" in adapter_weights(str(tmp_path))
    results = {}
    for lib in (peft, lorakit):
        loaded = lib.PeftModel.from_pretrained(_resized_llama(seed=2), str(tmp_path))
        with torch.no_grad():
            adapted = model_output(loaded, inputs)
            with loaded.disable_adapter():
                results[lib.__name__] = (adapted, model_output(loaded, inputs))
    with torch.no_grad():
        torch.testing.assert_close(results["peft"][0], model_output(source.eval(), inputs), atol=ATOL, rtol=0)
    for ours, theirs in zip(results["lorakit"], results["peft"]):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def _eva_adapter(directory):
    from peft import EvaConfig, initialize_lora_eva_weights

    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="eva", eva_config=EvaConfig(rho=2.0),
                          target_modules=["q_proj", "v_proj", "up_proj"])
    model = peft.get_peft_model(biased_model("llama"), cfg, low_cpu_mem_usage=True)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 96, (4, 16), generator=g),
                "attention_mask": torch.ones(4, 16, dtype=torch.long)} for _ in range(4)]
    initialize_lora_eva_weights(model, batches, show_progress_bar=False)
    return model


@pytest.mark.parametrize("init", ["orthogonal", "eva"])
def test_plain_at_inference_inits_load_like_peft(init, tmp_path):
    """Orthogonal and EVA inits leave the base weights alone: the trained adapter is plain LoRA."""
    if init == "eva":
        source = _eva_adapter(tmp_path)
    else:
        source = peft.get_peft_model(biased_model("llama"), peft.LoraConfig(
            r=4, lora_alpha=8, init_lora_weights="orthogonal", target_modules=["q_proj", "v_proj"]))
    inputs = model_inputs("llama")
    train(source, inputs)
    source.save_pretrained(tmp_path)
    assert adapter_config(str(tmp_path))["init_lora_weights"] == init
    with torch.no_grad():
        expected = model_output(source.eval(), inputs)
        got = model_output(lorakit.PeftModel.from_pretrained(biased_model("llama"), str(tmp_path)), inputs)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
