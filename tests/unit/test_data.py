"""Dataset formats, prompt masking, truncation, label sets, and the errors bad data gets."""
import json

import pytest

from helpers import write_jsonl
from lorakit.data import check_labels, label_set, load_examples, split_holdout
from lorakit.data.encode import collate, encode_examples, fallback_template, render_chat
from lorakit.data.formats import Conversation, Labelled, PlainText
from lorakit.memory.loss import IGNORE_INDEX


@pytest.fixture(scope="module")
def tokenizer(tiny_lm_dir):
    from lorakit.io.pretrained import load_tokenizer

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
    from lorakit.io.pretrained import load_tokenizer

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


def test_non_utf8_files_name_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1.jsonl:2: not UTF-8 \(byte 0xe9 at column 14\).*must be UTF-8"):
        load_examples([str(path)])
    csv = tmp_path / "latin1.csv"
    csv.write_bytes(b"text,label\ncaf\xe9,pos\n")
    with pytest.raises(ValueError, match=r"latin1.csv:2: not UTF-8"):
        load_examples([str(csv)])
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes('\ufeff{"text": "café"}\n'.encode())
    assert load_examples([str(bom)])[0][0][0].text == "café"


def test_an_empty_csv_cell_is_called_empty(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,input,output\nAdd 1 and 2,,3\nAdd 2 and 2,,\n")
    with pytest.raises(ValueError, match=r"d.csv:3: field 'output' is empty, needed by the alpaca format") as err:
        load_examples([str(path)])
    assert "missing" not in str(err.value)
    (tmp_path / "c.csv").write_text('text,label\n,pos\n"a\nb",3\n')
    with pytest.raises(ValueError, match=r"c.csv:2: field 'text' is empty"):
        load_examples([str(tmp_path / "c.csv")])
    (tmp_path / "n.csv").write_text('instruction,output\n"two\nlines",\n')
    with pytest.raises(ValueError, match=r"n.csv:3: field 'output' is empty"):  # the line where the row ends
        load_examples([str(tmp_path / "n.csv")])
    (tmp_path / "n.csv").write_text('instruction,output\nAdd 1 and 2,3\nSay NA,NA\n')
    pairs, _ = load_examples([str(tmp_path / "n.csv")])
    assert [e.messages[-1]["content"] for e, _ in pairs] == ["3", "NA"]  # text as written, not 3.0 / NaN


def test_dataset_sample_suffix_follows_ms_swift(tmp_path):
    import numpy as np

    rows = [{"text": f"row {i}"} for i in range(24)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    other = write_jsonl(tmp_path / "e.jsonl", rows)
    pairs, _ = load_examples([f"{path}#5", f"{other}#50"], seed=3)
    rng = np.random.RandomState(3)  # ms-swift: one RandomState(seed) for the datasets, in order
    first = rng.permutation(24)[:5].tolist()
    second = list(range(24)) * 2 + rng.permutation(24)[:2].tolist()  # whole copies, then a random rest
    assert [e.text for e, _ in pairs] == [f"row {i}" for i in first + second]
    assert pairs[0][1] == f"{path}:{first[0] + 1}"
    assert load_examples([f"{path}#5"], seed=3) != load_examples([f"{path}#5"], seed=4)
    with pytest.raises(ValueError, match=r"#0: the number of rows to sample must be >= 1"):
        load_examples([f"{path}#0"])


def test_held_out_rows_are_drawn_before_sampling(tmp_path):
    from lorakit.data import load_split

    rows = [{"text": f"row {i}"} for i in range(10)]
    small, big = (write_jsonl(tmp_path / f"{name}.jsonl", rows) for name in ("small", "big"))
    train, held, _ = load_split([f"{small}#4", f"{big}#40"], "auto", 0.2, seed=0)
    assert len(held) == 1 + 2 and len(train) == 3 + 38  # ratio of min(rows, N), as ms-swift
    held_sources = {source for _, source in held}
    assert not held_sources & {source for _, source in train}  # no held-out row is trained on
    with pytest.raises(ValueError, match=r"small.jsonl#1: --val_split_ratio 0.2 leaves no training rows out of 1"):
        load_split([f"{small}#1"], "auto", 0.2, seed=0)


def test_system_prompt_is_added_to_conversations_without_one(tmp_path):
    from lorakit.data import add_system

    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"},
                                              {"instruction": "c", "output": "d", "system": "Own."}])
    pairs, _ = load_examples([path])
    first, second = [e.messages[0] for e, _ in add_system(pairs, "Be brief.")]
    assert first == {"role": "system", "content": "Be brief."} and second["content"] == "Own."
    text, _ = load_examples([write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])])
    with pytest.raises(ValueError, match="--system sets the system prompt of conversations"):
        add_system(text, "Be brief.")
