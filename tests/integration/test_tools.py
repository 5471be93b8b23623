"""`lorakit merge / resize / extract / inspect` end to end on the tiny model folders, checked against
transformers (merged folders load as plain models) and PEFT (adapters load and give the same updates)."""
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import LM_IDS, adapter_config, adapter_model, adapter_weights, build_model, randomize
from lorakit.cli import main

ADAPTERS = {  # name -> (base fixture, LoraConfig fields)
    "llama-patterns": ("tiny_lm_dir", dict(target_modules=["q_proj", "v_proj", "down_proj"],
                                           rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3})),
    "llama-dora": ("tiny_lm_dir", dict(target_modules=["q_proj", "v_proj"], use_dora=True)),
    "llama-saved-head": ("tiny_lm_dir", dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "gpt2-rslora": ("tiny_gpt2_dir", dict(target_modules=["c_attn", "c_proj"], use_rslora=True)),
    "gpt2-tied-embedding": ("tiny_gpt2_dir", dict(target_modules=["c_attn", "wte"])),
    "gpt2-bias": ("tiny_gpt2_dir", dict(target_modules=["c_attn"], bias="lora_only")),
}


def make_adapter(base: str, folder: Path, seed: int = 0, **config) -> str:
    """A trained-looking adapter on the base folder: B nonzero, modules_to_save copies and biases moved."""
    model = adapter_model(base, seed, **config)
    if config.get("modules_to_save"):
        randomize(model, seed=seed, scale=0.05)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if config.get("bias", "none") != "none" and name.endswith("c_attn.bias"):
                p.add_(0.2)
    model.save_pretrained(str(folder))
    return str(folder)


def peft_logits(base: str, adapter: str) -> torch.Tensor:
    """The reference: PEFT's unmerged model (base folder + adapter folder)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        return model(input_ids=LM_IDS).logits


def plain_logits(folder) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(str(folder)).eval()(input_ids=LM_IDS).logits


def peft_deltas(base: str, adapter: str) -> dict[str, torch.Tensor]:
    """PEFT's get_delta_weight of every LoRA layer, out x in (as the base weight is stored)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    return {n.removeprefix("base_model.model."): m.get_delta_weight("default").detach()
            for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@pytest.fixture
def base_dirs(request):
    return lambda name: request.getfixturevalue(name)


# --- merge ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ADAPTERS)
def test_merged_folder_loads_as_a_plain_model_with_the_adapters_logits(name, base_dirs, tmp_path):
    fixture, config = ADAPTERS[name]
    base = base_dirs(fixture)
    adapter = make_adapter(base, tmp_path / "adapter", **config)
    assert main(["merge", "--adapter", adapter, "--output_dir", str(tmp_path / "merged")]) == 0
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors"} <= files
    assert not any(n.startswith("adapter") for n in files)
    torch.testing.assert_close(plain_logits(tmp_path / "merged"), peft_logits(base, adapter), atol=1e-5, rtol=1e-5)


def test_merge_writes_shards_and_an_index(tiny_lm_dir, tmp_path):
    adapter = make_adapter(tiny_lm_dir, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", adapter, "--output_dir", str(out), "--max_shard_size", "20KB",
                 "--torch_dtype", "bfloat16"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s) for s in shards)
    tensors = {k: t for s in shards for k, t in load_file(str(out / s)).items()}
    assert set(tensors) == set(index["weight_map"]) and all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in tensors.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert plain_logits(out).isfinite().all()


def test_qlora_merge_uses_the_nf4_base_and_prints_its_cost(tiny_lm_dir, tmp_path, capsys):
    from lorakit.model.peft_model import PeftModel
    from lorakit.quant.linear4bit import quantize_linears

    adapter = make_adapter(tiny_lm_dir, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    assert main(["merge", "--adapter", adapter, "--output_dir", str(tmp_path / "merged"), "--quant_bits", "4"]) == 0
    gap = re.search(r"differ by max (\S+), mean (\S+)", capsys.readouterr().out)
    assert gap and float(gap[1]) < 1e-4 and float(gap[2]) < 1e-5
    from transformers import AutoModelForCausalLM

    four_bit = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    quantize_linears(four_bit, skip={"lm_head"})
    with torch.no_grad():
        want = PeftModel.from_pretrained(four_bit, adapter).eval()(input_ids=LM_IDS).logits
    torch.testing.assert_close(plain_logits(tmp_path / "merged"), want, atol=1e-4, rtol=1e-4)
    assert (plain_logits(tmp_path / "merged") - peft_logits(tiny_lm_dir, adapter)).abs().max() > 1e-3


def test_several_adapters_combine_by_add_weighted_adapter(tiny_lm_dir, tmp_path):
    one = make_adapter(tiny_lm_dir, tmp_path / "one", seed=1, target_modules=["q_proj", "v_proj"])
    two = make_adapter(tiny_lm_dir, tmp_path / "two", seed=2, target_modules=["q_proj", "v_proj"])
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", one, two, "--weights", "0.7", "0.3", "--combination_type", "cat",
                 "--output_dir", str(out)]) == 0
    base = load_file(str(Path(tiny_lm_dir) / "model.safetensors"))
    merged = load_file(str(out / "model.safetensors"))
    deltas = [peft_deltas(tiny_lm_dir, a) for a in (one, two)]
    for path, delta in deltas[0].items():  # cat: the weighted sum of the updates, exactly
        want = base[f"{path}.weight"] + 0.7 * delta + 0.3 * deltas[1][path]
        torch.testing.assert_close(merged[f"{path}.weight"], want, atol=1e-5, rtol=1e-5)
    assert main(["merge", "--adapter", one, two, "--combination_type", "ties", "--density", "0.5",
                 "--output_dir", str(tmp_path / "ties")]) == 0
    assert plain_logits(tmp_path / "ties").isfinite().all()


def test_a_failed_merge_leaves_no_folder(tiny_lm_dir, tmp_path, monkeypatch):
    from lorakit.tools import merge

    adapter = make_adapter(tiny_lm_dir, tmp_path / "adapter", target_modules=["q_proj"])
    real, calls = merge.Merger.convert, []

    def failing(self, name, tensor):
        calls.append(name)
        if len(calls) == 8:
            raise OSError("disk full")
        return real(self, name, tensor)

    monkeypatch.setattr(merge.Merger, "convert", failing)
    with pytest.raises(OSError, match="disk full"):
        main(["merge", "--adapter", adapter, "--output_dir", str(tmp_path / "out" / "merged"),
              "--max_shard_size", "10KB"])
    assert list((tmp_path / "out").iterdir()) == []


# --- bad input --------------------------------------------------------------------------------------
@pytest.fixture
def wide_llama(tmp_path) -> str:
    """A Llama of other dimensions (hidden size 64) than the tiny one."""
    folder = tmp_path / "wide"
    build_model("llama", hidden_size=64, intermediate_size=96).save_pretrained(str(folder))
    return str(folder)


def test_bad_input_is_refused_with_a_clear_error_and_nothing_written(tiny_lm_dir, tiny_gpt2_dir, wide_llama,
                                                                     tmp_path, capsys):
    llama = make_adapter(tiny_lm_dir, tmp_path / "llama", target_modules=["q_proj"])
    gpt2 = make_adapter(tiny_gpt2_dir, tmp_path / "gpt2", target_modules=["c_attn"])
    dora = make_adapter(tiny_lm_dir, tmp_path / "dora", target_modules=["q_proj"], use_dora=True)
    out = str(tmp_path / "out")
    capsys.readouterr()
    cases = [
        (["merge", "--adapter", llama, "--model", wide_llama], r"q_proj: lora_A.weight has shape \(8, 32\), but the "
         r"base model's Linear there \(weight \(64, 64\)\) needs shape \(8, 64\)"),
        (["merge", "--adapter", gpt2, "--model", tiny_lm_dir], r"adapts transformer\.h\.0\.attn\.c_attn, which the "
         r"base model .* does not have"),
        (["merge", "--adapter", llama, llama, "--combination_type", "average"],
         r"--combination_type 'average' is not one of"),
        (["merge", "--adapter", llama, "--max_shard_size", "big"], r"--max_shard_size 'big'"),
        (["merge", "--adapter", llama, dora], r"has DoRA magnitudes, which add_weighted_adapter does not combine"),
        (["merge", "--adapter", str(tmp_path / "nowhere")], r"adapter folder not found"),
        (["resize", "--adapter", llama, "--rank", "9"], r"--rank 9 is more than .* the largest --rank this adapter "
         r"allows is 8"),
        (["resize", "--adapter", llama, "--energy", "1.5"], r"--energy must be in \(0, 1\]"),
        (["extract", "--model", tiny_lm_dir, "--tuned", wide_llama, "--rank", "2"], r"has shape \(\d+, 32\) in .* but "
         r"\(96, 64\) in"),
        (["extract", "--model", tiny_lm_dir, "--tuned", tiny_gpt2_dir, "--rank", "2"], r"hold different tensors"),
        (["extract", "--model", tiny_lm_dir, "--tuned", tiny_lm_dir, "--rank", "2"], r"no targeted layer differs"),
    ]
    for argv, message in cases:
        assert main([*argv, "--output_dir", out]) == 2, argv
        err = capsys.readouterr().err
        assert f"lorakit {argv[0]}: error: " in err and re.search(message, err), (argv, err)
        assert not Path(out).exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folders left


@pytest.mark.parametrize("verb", ["merge", "resize", "extract"])
def test_an_existing_output_dir_is_untouched(verb, tiny_lm_dir, tmp_path, capsys):
    adapter = make_adapter(tiny_lm_dir, tmp_path / "adapter", target_modules=["q_proj"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    argv = {"merge": ["--adapter", adapter], "resize": ["--adapter", adapter, "--rank", "2"],
            "extract": ["--model", tiny_lm_dir, "--tuned", tiny_lm_dir, "--rank", "2"]}[verb]
    assert main([verb, *argv, "--output_dir", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"


# --- resize -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama-patterns", "llama-dora", "gpt2-rslora"])
def test_resize_at_the_same_rank_keeps_the_update(name, base_dirs, tmp_path, capsys):
    fixture, config = ADAPTERS[name]
    base = base_dirs(fixture)
    adapter = make_adapter(base, tmp_path / "adapter", **{**config, "rank_pattern": {}})
    out = tmp_path / "resized"
    assert main(["resize", "--adapter", adapter, "--rank", "8", "--output_dir", str(out)]) == 0
    assert "1.000000" in capsys.readouterr().out
    saved = adapter_config(out)
    assert (saved["r"], saved["lora_alpha"], saved["use_rslora"], saved["rank_pattern"]) == (8, 8, False, {})
    torch.testing.assert_close(peft_logits(base, str(out)), peft_logits(base, adapter), atol=1e-5, rtol=1e-5)


def best_rank(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """The best rank-k approximation of delta and the share of its squared norm it keeps (float64)."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k], (S[:k].square().sum() / S.square().sum()).item()


@pytest.mark.parametrize("flags", [["--rank", "3"], ["--energy", "0.8"], ["--energy", "0.8", "--plain"]])
def test_resize_truncates_each_update_to_its_best_approximation(flags, tiny_lm_dir, tmp_path, capsys):
    adapter = make_adapter(tiny_lm_dir, tmp_path / "adapter", target_modules=["q_proj", "v_proj", "down_proj"],
                           use_rslora=True, lora_alpha=16)
    out = tmp_path / "resized"
    assert main(["resize", "--adapter", adapter, *flags, "--output_dir", str(out)]) == 0
    rows = re.finditer(r"(\S+)\s+8 -> (\d+)\s+([\d.]+)", capsys.readouterr().out)
    printed = {m[1]: (int(m[2]), float(m[3])) for m in rows}
    before, after = peft_deltas(tiny_lm_dir, adapter), peft_deltas(tiny_lm_dir, str(out))
    assert printed.keys() == before.keys()
    for path, (k, kept) in printed.items():
        want, share = best_rank(before[path], k)
        torch.testing.assert_close(after[path].double(), want, atol=1e-5, rtol=1e-5)
        assert kept == pytest.approx(share, abs=1e-6)
        assert share >= 0.8 or "--rank" in flags
    saved, weights = adapter_config(out), adapter_weights(out)
    assert saved["lora_alpha"] == saved["r"] and not saved["use_rslora"] and saved["alpha_pattern"] == {}
    if "--plain" in flags:
        assert saved["rank_pattern"] == {} and {w.shape[0] for k, w in weights.items() if "lora_A" in k} == {saved["r"]}
    else:
        assert saved["rank_pattern"] == {p: k for p, (k, _) in printed.items() if k != saved["r"]}


def test_resize_plain_gives_llama_cpp_the_scale_it_computes(tiny_lm_dir, tmp_path):
    """llama.cpp's convert_lora_to_gguf.py reads lora_alpha alone (not use_rslora, rank_pattern or alpha_pattern)
    and the tensors base_model.model.<name>.lora_A/B.weight; llama.cpp scales each by lora_alpha / (that tensor's
    rank). An rsLoRA adapter with patterns, resized --plain, must give the same update that way."""
    adapter = make_adapter(tiny_lm_dir, tmp_path / "adapter", target_modules=["q_proj", "v_proj"], use_rslora=True,
                           lora_alpha=16, rank_pattern={"v_proj": 4}, alpha_pattern={"q_proj": 5})
    out = tmp_path / "plain"
    assert main(["resize", "--adapter", adapter, "--energy", "0.9", "--plain", "--output_dir", str(out)]) == 0
    config, weights = adapter_config(out), adapter_weights(out)
    assert isinstance(config["lora_alpha"], (int, float)) and config["base_model_name_or_path"] == tiny_lm_dir
    base_keys = set(load_file(str(Path(tiny_lm_dir) / "model.safetensors")))
    before = peft_deltas(tiny_lm_dir, adapter)
    for key, A in weights.items():
        if ".lora_A.weight" not in key:
            continue
        assert key.startswith("base_model.model.")
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")  # the converter's mapping
        assert name in base_keys
        B = weights[key.replace("lora_A", "lora_B")]
        update = config["lora_alpha"] / B.shape[1] * (B @ A)  # llama.cpp: alpha / rank of this tensor
        rank = int(torch.linalg.matrix_rank(update.double(), atol=1e-6))  # the rank kept, zero-padded to r
        want, share = best_rank(before[name.removesuffix(".weight")], rank)
        torch.testing.assert_close(update.double(), want, atol=1e-5, rtol=1e-5)
        assert share >= 0.9


# --- extract ----------------------------------------------------------------------------------------
def tuned_copy(base: str, folder: Path, changes: dict[str, torch.Tensor]) -> str:
    """The base folder with tensors changed: key -> the change added."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(base, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    for key, change in changes.items():
        tensors[key] = tensors[key] + change
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return str(folder)


def low_rank(rows: int, cols: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g)


@pytest.mark.parametrize("fixture, changes", [
    ("tiny_lm_dir", {"model.layers.0.self_attn.q_proj.weight": (32, 32),
                     "model.layers.1.mlp.down_proj.weight": (32, 48)}),
    ("tiny_gpt2_dir", {"transformer.h.0.attn.c_attn.weight": (32, 96), "transformer.h.1.mlp.c_fc.weight": (32, 128)}),
])
def test_extract_recovers_a_low_rank_change_exactly(fixture, changes, base_dirs, tmp_path, capsys):
    base = base_dirs(fixture)
    known = {k: low_rank(*shape, rank=2, seed=i) for i, (k, shape) in enumerate(changes.items())}
    tuned = tuned_copy(base, tmp_path / "tuned", known)
    out = tmp_path / "extracted"
    assert main(["extract", "--model", base, "--tuned", tuned, "--rank", "2", "--output_dir", str(out)]) == 0
    printed = re.findall(r"(\S+)\s+2\s+(\S+e[-+]\d+)", capsys.readouterr().out)
    assert {p for p, _ in printed} == {k.removesuffix(".weight") for k in known}
    assert all(float(e) < 1e-5 for _, e in printed)
    config = adapter_config(out)
    assert config["r"] == config["lora_alpha"] == 2 and config["peft_type"] == "LORA"
    deltas = peft_deltas(base, str(out))
    for key, change in known.items():
        torch.testing.assert_close(deltas[key.removesuffix(".weight")], change, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(peft_logits(base, str(out)), plain_logits(tuned), atol=1e-5, rtol=1e-5)


def test_extract_reports_other_changes_and_keeps_the_named_ones(tiny_lm_dir, tmp_path, capsys):
    known = {"model.layers.0.self_attn.v_proj.weight": low_rank(16, 32, 1, seed=3),
             "model.norm.weight": torch.full((32,), 0.5)}
    tuned = tuned_copy(tiny_lm_dir, tmp_path / "tuned", known)
    assert main(["extract", "--model", tiny_lm_dir, "--tuned", tuned, "--rank", "1",
                 "--output_dir", str(tmp_path / "lossy")]) == 0
    assert "changed but not captured (add their modules to --modules_to_save" in capsys.readouterr().out
    assert main(["extract", "--model", tiny_lm_dir, "--tuned", tuned, "--rank", "1", "--modules_to_save", "norm",
                 "--output_dir", str(tmp_path / "whole")]) == 0
    assert "kept whole (modules_to_save): model.norm.weight" in capsys.readouterr().out
    assert adapter_config(tmp_path / "whole")["modules_to_save"] == ["model.norm"]
    torch.testing.assert_close(peft_logits(tiny_lm_dir, str(tmp_path / "whole")), plain_logits(tuned),
                               atol=1e-5, rtol=1e-5)


def test_extract_then_merge_round_trips_a_classifier_fine_tuned_on_a_headless_encoder(tmp_path, capsys):
    """The base an encoder alone (BertModel), the tuned model a classifier (`bert.` keys and a new head):
    the head must be kept whole, PEFT then rebuilds the tuned classifier from the base, and merging the
    adapter into the encoder writes that classifier back."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    tuned_model = build_model("bert", nonzero_biases=True)
    tuned_model.bert.save_pretrained(str(tmp_path / "encoder"))
    with torch.no_grad():
        tuned_model.bert.encoder.layer[0].attention.self.query.weight += low_rank(32, 32, rank=2, seed=5)
    tuned_model.save_pretrained(str(tmp_path / "tuned"))
    args = ["extract", "--model", str(tmp_path / "encoder"), "--tuned", str(tmp_path / "tuned"), "--rank", "2"]
    assert main([*args, "--output_dir", str(tmp_path / "no_head")]) == 2
    assert "a head added in fine-tuning; keep it whole with --modules_to_save classifier" in capsys.readouterr().err
    assert not (tmp_path / "no_head").exists()
    assert main([*args, "--modules_to_save", "classifier", "--output_dir", str(tmp_path / "out")]) == 0
    assert adapter_config(tmp_path / "out")["task_type"] == "SEQ_CLS"
    labels = tuned_model.config.num_labels
    rebuilt = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(
        str(tmp_path / "encoder"), num_labels=labels), str(tmp_path / "out")).eval()
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(input_ids=ids).logits, tuned_model.eval()(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)
    assert main(["merge", "--adapter", str(tmp_path / "out"), "--model", str(tmp_path / "encoder"),
                 "--output_dir", str(tmp_path / "merged")]) == 0
    merged, info = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged"),
                                                                      output_loading_info=True)
    assert not any(info.values()) and merged.config.id2label == {i: f"LABEL_{i}" for i in range(labels)}
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(input_ids=ids).logits, tuned_model(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)


# --- inspect ----------------------------------------------------------------------------------------
def test_inspect_json_describes_each_module(tiny_lm_dir, tmp_path, capsys):
    adapter = make_adapter(tiny_lm_dir, tmp_path / "adapter", target_modules=["q_proj", "v_proj"], use_dora=True,
                           use_rslora=True, lora_alpha=16, rank_pattern={"v_proj": 4})
    plot = tmp_path / "spectra.png"
    assert main(["inspect", adapter, "--model", tiny_lm_dir, "--json", "--plot", str(plot)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "DoRA + rsLoRA" and report["target_modules"] == ["q_proj", "v_proj"]
    weights = load_file(str(Path(tiny_lm_dir) / "model.safetensors"))
    lora = adapter_weights(adapter)
    for path, m in report["modules"].items():
        rank = 4 if path.endswith("v_proj") else 8
        assert (m["rank"], m["alpha"], m["scaling"]) == (rank, 16, pytest.approx(16 / rank**0.5))
        A, B = (lora[f"base_model.model.{path}.lora_{x}.weight"] for x in "AB")
        update = m["scaling"] * B.double() @ A.double()
        assert m["singular_values"] == pytest.approx(torch.linalg.svdvals(update)[:rank].tolist(), rel=1e-6, abs=1e-9)
        p = torch.tensor(m["singular_values"]) / sum(m["singular_values"])
        assert m["effective_rank"] == pytest.approx(torch.exp(-(p * p.log()).sum()).item(), rel=1e-5)
        assert m["in_base"] and m["relative_update"] == pytest.approx(
            update.norm().item() / weights[f"{path}.weight"].norm().item(), rel=1e-5)
    assert report["parameters"] == sum(t.numel() for t in lora.values())
    assert report["bytes"] == sum(t.numel() * t.element_size() for t in lora.values())
    assert not report["no_op"] and report["warnings"] == []
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("case", ["untrained", "other-base"])
def test_inspect_warns_loudly_of_a_no_op(case, tiny_lm_dir, tiny_gpt2_dir, tmp_path, capsys):
    if case == "untrained":
        untrained = adapter_model(tiny_lm_dir, init_lora_weights=True, target_modules=["q_proj"])
        untrained.save_pretrained(str(tmp_path / "a"))
        model, want = tiny_lm_dir, "every LoRA update is zero"
    else:
        make_adapter(tiny_gpt2_dir, tmp_path / "a", target_modules=["c_attn"])
        model, want = tiny_lm_dir, "matches no module of"
    assert main(["inspect", str(tmp_path / "a"), "--model", model]) == 1
    captured = capsys.readouterr()
    assert "WARNING: no-op: " in captured.err and want in captured.err
    assert "effective rank: exp(entropy" in captured.out
