"""Dataset formats, prompt masking, truncation, label sets, and the errors bad data gets."""
import json

import pytest
from conftest import write_jsonl

from lorakit.data import check_labels, label_set, load_examples, split_holdout
from lorakit.data.encode import IGNORE_INDEX, collate, encode_examples, fallback_template, render_chat
from lorakit.data.formats import Conversation, Labelled, PlainText


@pytest.fixture(scope="module")
def tokenizer(tiny_lm_dir):
    from lorakit.train.model import load_tokenizer

    return load_tokenizer(tiny_lm_dir)


def test_alpaca_becomes_a_conversation_with_history(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "2 3", "output": "5",
                                               "system": "Be brief.", "history": [["hi", "hello"]]}])
    [(example, source)], fmt = load_examples([path])
    assert fmt == "alpaca" and source.endswith("a.jsonl:1")
    assert example.messages == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                {"role": "user", "content": "Add\n\n2 3"}, {"role": "assistant", "content": "5"}]


@pytest.mark.parametrize("row, fmt, kind", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "messages", Conversation),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "messages", Conversation),
    ({"text": "just text"}, "text", PlainText),
    ({"text": "great film", "label": 1}, "classification", Labelled),
    ({"sentence": "awful", "label": "neg"}, "classification", Labelled),
])
def test_format_detection(tmp_path, row, fmt, kind):
    pairs, detected = load_examples([write_jsonl(tmp_path / "d.jsonl", [row])])
    assert detected == fmt and isinstance(pairs[0][0], kind)


@pytest.mark.parametrize("suffix", ["csv", "parquet", "json"])
def test_csv_parquet_and_json_array_files(tmp_path, suffix):
    import pandas as pd

    rows = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}]
    path = tmp_path / f"d.{suffix}"
    if suffix == "csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif suffix == "parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        path.write_text(json.dumps(rows))
    pairs, fmt = load_examples([str(path)])
    assert fmt == "classification" and [(e.text, e.label) for e, _ in pairs] == [("good", "pos"), ("bad", "neg")]


def test_only_response_tokens_carry_loss(tokenizer):
    conversation = Conversation([{"role": "user", "content": "Add 2 and 3."},
                                 {"role": "assistant", "content": "The sum is 5."}])
    [item], _ = encode_examples(tokenizer, [(conversation, "x:1")], max_length=512)
    trained = [t for t, label in zip(item.input_ids, item.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "The sum is 5.</s>\n"
    assert tokenizer.decode(item.input_ids) == render_chat(tokenizer, conversation.messages, False)
    [full], _ = encode_examples(tokenizer, [(conversation, "x:1")], max_length=512, train_on_prompt=True)
    assert full.labels == full.input_ids


def test_fallback_template_is_the_documented_one():
    text = fallback_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                             add_generation_prompt=False, eos="</s>")
    assert text == "<|user|>\nhi\n<|assistant|>\nyo</s>\n"


def test_chat_template_renders_and_masks_every_assistant_turn(tiny_lm_dir):
    from lorakit.train.model import load_tokenizer

    tokenizer = load_tokenizer(tiny_lm_dir)
    tokenizer.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}[assistant] {% endif %}")
    conversation = Conversation([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                 {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}])
    [item], _ = encode_examples(tokenizer, [(conversation, "x:1")], max_length=512)
    assert tokenizer.decode(item.input_ids) == "[user] a\n[assistant] b\n[user] c\n[assistant] d\n"
    spans, current = [], []
    for token, label in zip(item.input_ids, item.labels):
        if label == IGNORE_INDEX and current:
            spans.append(tokenizer.decode(current))
            current = []
        elif label != IGNORE_INDEX:
            current.append(token)
    spans.append(tokenizer.decode(current))
    assert spans == ["b\n", "d\n"]


def test_truncation_is_counted_and_fully_masked_rows_dropped(tokenizer):
    long_prompt = Conversation([{"role": "user", "content": "word " * 200},
                                {"role": "assistant", "content": "ok"}])
    long_answer = Conversation([{"role": "user", "content": "q"},
                                {"role": "assistant", "content": "word " * 200}])
    items, report = encode_examples(tokenizer, [(long_prompt, "f:1"), (long_answer, "f:2")], max_length=64)
    assert report.truncated == 2 and report.dropped_all_masked == ["f:1"] and report.kept == 1
    assert len(items[0].input_ids) == 64


def test_collate_pads_right_and_masks_padding():
    from lorakit.data.encode import Encoded

    batch = collate([Encoded([5, 6, 7], [-100, 6, 7]), Encoded([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_holdout_split_is_seeded_and_disjoint():
    pairs = list(range(100))
    train, held = split_holdout(pairs, 0.2, seed=3)
    assert len(held) == 20 and sorted(train + held) == pairs
    assert split_holdout(pairs, 0.2, seed=3) == (train, held) != split_holdout(pairs, 0.2, seed=4)


def test_label_set_numeric_order_and_unknown_label(tmp_path):
    pairs, _ = load_examples([write_jsonl(tmp_path / "d.jsonl",
                                          [{"text": "a", "label": 10}, {"text": "b", "label": 9}])])
    assert label_set(pairs, []) == ["9", "10"]
    with pytest.raises(ValueError, match=r"d.jsonl:1: label '10' is not in the label set \['9'\]"):
        check_labels(pairs, ["9"])


@pytest.mark.parametrize("content, message", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n', r"bad.jsonl:2: malformed JSON line"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', r"bad.jsonl:2: missing field 'output'.*alpaca"),
    ('{"instruction": "a", "output": 3}\n', r"bad.jsonl:1: field 'output' should be str, got int"),
    ('{"question": "a", "answer": "b"}\n', r"bad.jsonl:1: cannot tell the dataset format.*\['answer', 'question'\]"),
    ('[1, 2]\n', r"bad.jsonl:1: expected a JSON object, got list"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}\n', r"bad.jsonl:1: .*starts with an assistant"),
    ('{"messages": [{"role": "user", "content": "x"}]}\n', r"bad.jsonl:1: .*no assistant message"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_examples([str(path)])


def test_missing_and_empty_dataset_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset file not found: .*nope.jsonl"):
        load_examples([str(tmp_path / "nope.jsonl")])
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="has no rows"):
        load_examples([str(tmp_path / "empty.jsonl")])
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match=r"unsupported file type '.txt'; accepted: .jsonl, .json, .csv, .parquet"):
        load_examples([str(tmp_path / "d.txt")])


def test_builtin_dataset_ships_with_the_package():
    pairs, fmt = load_examples(["builtin:support_intents"])
    assert fmt == "classification" and len(pairs) >= 300
    assert len(label_set(pairs, [])) == 8
    with pytest.raises(FileNotFoundError, match="built-in datasets: \\['builtin:support_intents'\\]"):
        load_examples(["builtin:nope"])
