"""`lorakit infer`: generation with a trained adapter (checked against PEFT), batching, classification."""
import json
import re
import subprocess
import sys

import pytest
import torch

from helpers import SENTIMENT, alpaca_rows, quick_args, save_tiny_bert_classifier, write_jsonl
from lorakit.cli import main
from lorakit.cli.infer import InferArgs, load_for_inference, run_infer
from lorakit.data.encode import render_chat
from lorakit.train import loop
from lorakit.train.args import parse_train_args


@pytest.fixture(scope="module")
def sft_adapter(tiny_lm_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sft")
    data = write_jsonl(folder / "a.jsonl", alpaca_rows())
    out = folder / "adapter"
    loop.train(parse_train_args(["--model", tiny_lm_dir, "--dataset", data, "--output_dir", str(out),
                                 "--max_steps", "15", "--learning_rate", "3e-2", "--report_to", "none"]))
    return str(out)


def test_greedy_generation_matches_peft(sft_adapter, tiny_lm_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    [ours] = run_infer(InferArgs(adapter=sft_adapter, prompt=["Add 5 and 8."], max_new_tokens=12,
                                 torch_dtype="float32"))
    tokenizer = AutoTokenizer.from_pretrained(sft_adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), sft_adapter).eval()
    text = render_chat(tokenizer, [{"role": "user", "content": "Add 5 and 8."}], add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert ours["completion"] == tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert ours["completion"].strip()
    with model.disable_adapter():  # the adapter steers the answer, so an infer that dropped it would differ
        plain = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert not torch.equal(plain, out)


@pytest.mark.parametrize("fast_bf16,dtype", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_is_bf16_where_the_device_has_fast_bf16(sft_adapter, monkeypatch, fast_bf16, dtype):
    from lorakit import precision

    monkeypatch.setattr(precision, "fast_bf16", lambda device: fast_bf16)
    model, _, _ = load_for_inference(InferArgs(adapter=sft_adapter, prompt=["x"]))
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {dtype}
    [result] = run_infer(InferArgs(adapter=sft_adapter, prompt=["Add 5 and 8."], max_new_tokens=6))
    assert result["completion"].strip()


def test_batched_prompts_equal_one_at_a_time(sft_adapter, tmp_path):
    prompts = ["Add 1 and 4.", "Add 12 and 15. Answer in words.", "Hi"]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    batched = run_infer(InferArgs(adapter=sft_adapter, prompts_file=str(path), batch_size=3, max_new_tokens=8))
    alone = [run_infer(InferArgs(adapter=sft_adapter, prompt=[p], max_new_tokens=8))[0] for p in prompts]
    assert [r["completion"] for r in batched] == [r["completion"] for r in alone]


def test_sampling_is_seeded(sft_adapter):
    """--do_sample with a --seed gives the same text again, and other seeds other texts (greedy decoding,
    which ignores the seed, would give one text for all three)."""
    args = dict(adapter=sft_adapter, prompt=["Add 2 and 2."], max_new_tokens=10, do_sample=True, temperature=1.5)
    sampled = {seed: run_infer(InferArgs(**args, seed=seed)) for seed in (1, 2, 3)}
    assert run_infer(InferArgs(**args, seed=1)) == sampled[1]
    assert len({result["completion"] for [result] in sampled.values()}) > 1


def test_prompts_from_stdin(sft_adapter):
    done = subprocess.run([sys.executable, "-m", "lorakit", "infer", "--adapter", sft_adapter,
                           "--max_new_tokens", "4"], input="Add 3 and 3.\nAdd 4 and 4.\n",
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("### Add") == 2


def test_classifier_adapter_predicts_labels(tmp_path):
    data = write_jsonl(tmp_path / "cls.jsonl", [{"text": t, "label": label} for t, label in SENTIMENT * 2])
    out = tmp_path / "cls"
    loop.train(parse_train_args(quick_args("all-MiniLM-L6-v2", data, out, max_steps=12, learning_rate=2e-3)))
    rows = write_jsonl(tmp_path / "new.jsonl", [{"text": "a lovely, wonderful film", "label": "pos"},
                                                {"text": "tedious and awful", "label": "neg"}])
    results = run_infer(InferArgs(adapter=str(out), prompts_file=rows, output_file=str(tmp_path / "p.jsonl")))
    assert [r["predicted"] for r in results] == ["pos", "neg"]
    saved = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert saved == results and all(0.5 < r["score"] <= 1 for r in saved)


def test_infer_errors(tmp_path, capsys):
    assert main(["infer", "--adapter", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "--adapter folder not found" in capsys.readouterr().err
    assert main(["infer", "--prompt", "x"]) == 2
    assert "give --adapter" in capsys.readouterr().err


def test_full_fine_tuned_output_loads_as_a_model(tiny_lm_dir, tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", alpaca_rows())
    out = tmp_path / "full"
    loop.train(parse_train_args(["--model", tiny_lm_dir, "--dataset", data, "--output_dir", str(out),
                                 "--max_steps", "2", "--train_type", "full", "--report_to", "none"]))
    model, _, labels = load_for_inference(InferArgs(adapter=str(out)))
    assert labels == [] and not any("lora" in n for n, _ in model.named_parameters())
    assert isinstance(model(torch.tensor([[1, 5, 6]])).logits, torch.Tensor)


@pytest.mark.parametrize("name", ["adapter_config.json", "labels.json"])
def test_invalid_json_in_the_adapter_folder_names_the_file(sft_adapter, tmp_path, capsys, name):
    import shutil

    folder = tmp_path / "adapter"
    shutil.copytree(sft_adapter, folder)
    (folder / name).write_text("{not json")
    assert main(["infer", "--adapter", str(folder), "--prompt", "x"]) == 2
    assert f"{folder / name}: not valid JSON" in capsys.readouterr().err


def test_the_training_system_prompt_is_used(sft_adapter, tmp_path, monkeypatch):
    import shutil

    from lorakit.cli import infer

    folder = tmp_path / "adapter"
    shutil.copytree(sft_adapter, folder)
    (folder / "run_config.yaml").write_text((folder / "run_config.yaml").read_text()
                                            .replace("system: null", "system: Be brief."))
    seen = []
    monkeypatch.setattr(infer, "render_chat", lambda tok, messages, **kw: seen.append(messages) or "x")
    run_infer(InferArgs(adapter=str(folder), prompt=["Hi"], max_new_tokens=1))
    run_infer(InferArgs(adapter=str(folder), prompt=["Hi"], max_new_tokens=1, system="Other."))
    assert [m[0] for m in seen] == [{"role": "system", "content": "Be brief."}, {"role": "system", "content": "Other."}]


def test_prompts_longer_than_the_model_takes(tiny_gpt2_dir, tmp_path, capsys):
    out = tmp_path / "adapter"  # the model has 256 positions (n_positions)
    data = write_jsonl(tmp_path / "a.jsonl", alpaca_rows())
    loop.train(parse_train_args(["--model", tiny_gpt2_dir, "--dataset", data, "--output_dir", str(out),
                                 "--max_steps", "1", "--report_to", "none"]))
    assert main(["infer", "--adapter", str(out), "--prompt", "hi", "word " * 300, "--max_new_tokens", "4"]) == 2
    assert re.search(r"prompt 2 has \d+ tokens; with --max_new_tokens 4 that passes the model's 256 positions "
                     r"\(n_positions\)", capsys.readouterr().err)
    assert main(["infer", "--adapter", str(out), "--prompt", "hi", "--max_new_tokens", "300"]) == 2
    assert "prompt 1 has" in capsys.readouterr().err


def test_long_rows_are_truncated_to_the_classifier_positions(tmp_path):
    import transformers as tf

    folder = save_tiny_bert_classifier(tmp_path / "bert", max_position_embeddings=32)
    tf.AutoTokenizer.from_pretrained(folder, model_max_length=10 ** 6).save_pretrained(folder)  # no limit of its own
    data = write_jsonl(tmp_path / "cls.jsonl", [{"text": t, "label": label} for t, label in SENTIMENT])
    loop.train(parse_train_args(["--model", folder, "--dataset", data, "--output_dir", str(tmp_path / "o"),
                                 "--max_steps", "1", "--report_to", "none", "--val_split_ratio", "0"]))
    [result] = run_infer(InferArgs(adapter=str(tmp_path / "o"), prompt=["a lovely film " * 40]))
    assert result["predicted"] in ("neg", "pos")


def test_an_unwritable_output_file_fails_before_loading(tmp_path, monkeypatch, capsys):
    from lorakit.cli import infer

    monkeypatch.setattr(infer, "load_for_inference", lambda args: pytest.fail("loaded before checking"))
    target = tmp_path / "missing-folder" / "out.jsonl"
    assert main(["infer", "--adapter", str(tmp_path), "--prompt", "x", "--output_file", str(target)]) == 2
    assert f"--output_file {target} cannot be written: No such file or directory" in capsys.readouterr().err
