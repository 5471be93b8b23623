"""The running batch of continuous batching: rows that join and leave it between decode steps get
exactly the tokens, and the logits within fp32 rounding, of the same request run alone."""
import pytest
import torch
import transformers as tf

from helpers import save_adapter
from lorakit.serve import AdapterBank, GenerationRequest, RunningBatch, generate_batch, scheduler

PROMPTS = ["The quick brown fox", "Add", "What is the capital of France? Paris is", "def add(a, b):", "0 1 2"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def bank_and_tokenizer(request, tmp_path_factory):
    model_dir = request.getfixturevalue("tiny_lm_dir" if request.param == "llama" else "tiny_gpt2_dir")
    targets = ["q_proj", "v_proj"] if request.param == "llama" else ["c_attn"]
    bank = AdapterBank(tf.AutoModelForCausalLM.from_pretrained(model_dir).eval())
    bank.load("qv", save_adapter(model_dir, tmp_path_factory.mktemp("qv"), 0, r=4, lora_alpha=8,
                                 target_modules=targets))
    bank.load("all", save_adapter(model_dir, tmp_path_factory.mktemp("all"), 1, r=8, lora_alpha=16,
                                  target_modules="all-linear", use_dora=True))
    return bank, tf.AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture
def logits_log(monkeypatch):
    """Every row's logits at every token it sampled: id(request) -> [logits, ...]."""
    seen = {}
    real = scheduler.next_tokens

    def recording(logits, rows):
        for row, row_logits in zip(rows, logits):
            seen.setdefault(id(row.request), []).append(row_logits.clone())
        return real(logits, rows)

    monkeypatch.setattr(scheduler, "next_tokens", recording)
    return seen


def request(tokenizer, i: int, adapter, max_new_tokens: int) -> GenerationRequest:
    return GenerationRequest(tokenizer(PROMPTS[i])["input_ids"], adapter=adapter, max_new_tokens=max_new_tokens)


def check_geometry(batch: RunningBatch) -> None:
    """The cache holds each row's tokens right-aligned, and less than a quarter of columns no row attends to."""
    if not batch.rows:
        assert batch.cache is None and batch.mask is None
        return
    lengths = [len(r.request.prompt_ids) + len(r.token_ids) - 1 for r in batch.rows]  # the newest token is not in yet
    width = batch.mask.shape[1]
    assert batch.mask.sum(-1).tolist() == lengths and max(lengths) <= width < max(lengths) * 4 / 3 + 1
    assert (batch.mask.cumsum(-1) > 0).eq(batch.mask.bool()).all()  # padding only on the left
    assert all(layer.keys.shape[:3] == (len(lengths), layer.keys.shape[1], width) for layer in batch.cache.layers)


@pytest.mark.parametrize("room", [3, scheduler.ROOM])  # 3: the cache's spare columns run out every few steps
def test_rows_that_join_and_leave_equal_each_alone(bank_and_tokenizer, logits_log, monkeypatch, room):
    monkeypatch.setattr(scheduler, "ROOM", room)
    bank, tokenizer = bank_and_tokenizer
    reqs = [request(tokenizer, 0, "qv", 14), request(tokenizer, 1, None, 3), request(tokenizer, 2, "all", 9),
            request(tokenizer, 3, "qv", 1), request(tokenizer, 4, "all", 6), request(tokenizer, 1, "all", 8)]
    batch = RunningBatch(bank, tokenizer, max_rows=3)  # room for 3 rows: a fourth makes the cache grow
    rows = [row for row, _ in batch.join(reqs[:2])]  # a long and a short row
    for _ in range(2):
        batch.step()
        check_geometry(batch)
    assert len(batch.rows) == 1  # the short one left after its 3 tokens
    rows += [row for row, _ in batch.join(reqs[2:4])]  # a longer prompt than the cache; one done at once
    check_geometry(batch)
    assert len(batch.rows) == 2 and rows[3].finish_reason == "length"
    batch.step()
    rows += [row for row, _ in batch.join(reqs[4:])]
    check_geometry(batch)
    batch.step()
    batch.leave([rows[4]])  # its client went away
    check_geometry(batch)
    while batch.rows:
        batch.step()
        check_geometry(batch)
    mixed = dict(logits_log)
    logits_log.clear()
    for req, row in zip(reqs, rows):
        alone = generate_batch(bank, tokenizer, [req])[0]
        if row is rows[4]:  # cancelled: what it had so far
            assert row.finish_reason is None and row.token_ids == alone.token_ids[:len(row.token_ids)]
        else:
            assert row.result() == alone, req
        got, want = mixed[id(req)], logits_log[id(req)]
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert rows[0].token_ids != rows[5].token_ids


def test_newcomers_longer_than_the_cache_join_in_place(bank_and_tokenizer):
    """Rows join into spare rows of the cache; newcomers longer than it move the running rows right."""
    bank, tokenizer = bank_and_tokenizer
    reqs = [request(tokenizer, 1, "qv", 8), request(tokenizer, 4, None, 6), request(tokenizer, 2, "all", 5),
            request(tokenizer, 3, "qv", 4)]
    batch = RunningBatch(bank, tokenizer, max_rows=4)
    rows = [row for r in reqs[:2] for row, _ in batch.join([r])]  # the second join makes room for 4 rows
    batch.step()
    rows += [row for r in reqs[2:] for row, _ in batch.join([r])]  # longer prompts than the cache, in place
    check_geometry(batch)
    while batch.rows:
        batch.step()
        check_geometry(batch)
    assert [row.result() for row in rows] == [generate_batch(bank, tokenizer, [r])[0] for r in reqs]


def test_seeded_sampling_does_not_depend_on_who_joins(bank_and_tokenizer):
    bank, tokenizer = bank_and_tokenizer
    sampled = GenerationRequest(tokenizer(PROMPTS[0])["input_ids"], "qv", 10, temperature=1.0, top_p=0.9, seed=3)
    batch = RunningBatch(bank, tokenizer)
    (row, _), = batch.join([sampled])
    for i in range(4):
        batch.join([request(tokenizer, i % 5, "all", 4)])
        batch.step()
    while batch.rows:
        batch.step()
    assert row.result() == generate_batch(bank, tokenizer, [sampled])[0]


def test_an_unknown_adapter_fails_the_newcomers_and_leaves_the_running_rows(bank_and_tokenizer):
    bank, tokenizer = bank_and_tokenizer
    batch = RunningBatch(bank, tokenizer)
    (row, _), = batch.join([request(tokenizer, 0, "qv", 5)])
    with pytest.raises(KeyError, match="'missing'"):
        batch.join([request(tokenizer, 1, "missing", 5)])
    while batch.rows:
        batch.step()
    assert row.result() == generate_batch(bank, tokenizer, [request(tokenizer, 0, "qv", 5)])[0]
