"""`lorakit infer`: generation with a trained adapter (checked against PEFT), batching, classification."""
import json
import subprocess
import sys

import pytest
import torch
from conftest import write_jsonl

from lorakit.cli import main
from lorakit.data.encode import render_chat
from lorakit.infer import InferArgs, load_for_inference, run_infer
from lorakit.train import loop
from lorakit.train.args import parse_train_args


@pytest.fixture(scope="module")
def sft_adapter(tiny_lm_dir, tmp_path_factory):
    from conftest import alpaca_rows

    folder = tmp_path_factory.mktemp("sft")
    data = write_jsonl(folder / "a.jsonl", alpaca_rows())
    out = folder / "adapter"
    loop.train(parse_train_args(["--model", tiny_lm_dir, "--dataset", data, "--output_dir", str(out),
                                 "--max_steps", "15", "--learning_rate", "3e-2", "--report_to", "none"]))
    return str(out)


def test_greedy_generation_matches_peft(sft_adapter, tiny_lm_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    [ours] = run_infer(InferArgs(adapter=sft_adapter, prompt=["Add 5 and 8."], max_new_tokens=12))
    tokenizer = AutoTokenizer.from_pretrained(sft_adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), sft_adapter).eval()
    text = render_chat(tokenizer, [{"role": "user", "content": "Add 5 and 8."}], add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert ours["completion"] == tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert ours["completion"].strip()


def test_batched_prompts_equal_one_at_a_time(sft_adapter, tmp_path):
    prompts = ["Add 1 and 4.", "Add 12 and 15. Answer in words.", "Hi"]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    batched = run_infer(InferArgs(adapter=sft_adapter, prompts_file=str(path), batch_size=3, max_new_tokens=8))
    alone = [run_infer(InferArgs(adapter=sft_adapter, prompt=[p], max_new_tokens=8))[0] for p in prompts]
    assert [r["completion"] for r in batched] == [r["completion"] for r in alone]


def test_sampling_is_seeded(sft_adapter):
    args = dict(adapter=sft_adapter, prompt=["Add 2 and 2."], max_new_tokens=10, do_sample=True, temperature=1.5)
    first = run_infer(InferArgs(**args, seed=1))
    assert run_infer(InferArgs(**args, seed=1)) == first


def test_prompts_from_stdin(sft_adapter):
    done = subprocess.run([sys.executable, "-m", "lorakit", "infer", "--adapter", sft_adapter,
                           "--max_new_tokens", "4"], input="Add 3 and 3.\nAdd 4 and 4.\n",
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("### Add") == 2


def test_classifier_adapter_predicts_labels(tmp_path):
    from test_train import SENTIMENT, quick_args

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
    from conftest import alpaca_rows

    data = write_jsonl(tmp_path / "a.jsonl", alpaca_rows())
    out = tmp_path / "full"
    loop.train(parse_train_args(["--model", tiny_lm_dir, "--dataset", data, "--output_dir", str(out),
                                 "--max_steps", "2", "--train_type", "full", "--report_to", "none"]))
    model, _, labels = load_for_inference(InferArgs(adapter=str(out)))
    assert labels == [] and not any("lora" in n for n, _ in model.named_parameters())
    assert isinstance(model(torch.tensor([[1, 5, 6]])).logits, torch.Tensor)
