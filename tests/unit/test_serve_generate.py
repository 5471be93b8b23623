"""generate_batch: each row of a mixed batch generates what it would alone, and what HF generate gives."""
import pytest
import torch
import transformers as tf

from helpers import save_adapter
from lorakit import PeftModel
from lorakit.serve import AdapterBank, GenerationRequest, generate_batch
from lorakit.serve.generate import check_request

PROMPTS = ["The quick brown fox", "Add the two", "What is the capital of France?", "def"]


def make_setup(model_dir: str, attention: list[str], tmp_path_factory):
    """(model folder, tokenizer, {adapter: folder}): a tiny LM with a real BPE tokenizer, two adapters."""
    folders = {
        "qv": save_adapter(model_dir, tmp_path_factory.mktemp("qv"), 0, r=4, lora_alpha=8, target_modules=attention),
        "all": save_adapter(model_dir, tmp_path_factory.mktemp("all"), 1, r=8, lora_alpha=16,
                            target_modules="all-linear", use_dora=True),
    }
    return model_dir, tf.AutoTokenizer.from_pretrained(model_dir), folders


@pytest.fixture(scope="module")
def setup(tiny_lm_dir, tmp_path_factory):
    return make_setup(tiny_lm_dir, ["q_proj", "v_proj"], tmp_path_factory)


@pytest.fixture(scope="module")
def gpt2_setup(tiny_gpt2_dir, tmp_path_factory):
    return make_setup(tiny_gpt2_dir, ["c_attn"], tmp_path_factory)


def make_bank(setup) -> AdapterBank:
    model_dir, _, folders = setup
    bank = AdapterBank(tf.AutoModelForCausalLM.from_pretrained(model_dir).eval())
    for name, folder in folders.items():
        bank.load(name, folder)
    return bank


def requests(tokenizer, **overrides) -> list[GenerationRequest]:
    """Different prompt lengths, adapters and lengths in one batch."""
    adapters, lengths = ["qv", None, "all", "qv"], [10, 6, 12, 3]
    return [GenerationRequest(tokenizer(p)["input_ids"], adapter=a, max_new_tokens=n, **overrides)
            for p, a, n in zip(PROMPTS, adapters, lengths)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_rows_equal_alone_and_hf_generate(arch, request):
    setup = request.getfixturevalue("setup" if arch == "llama" else "gpt2_setup")
    model_dir, tokenizer, folders = setup
    bank = make_bank(setup)
    batch = requests(tokenizer)
    streamed = ["", "", "", ""]
    results = generate_batch(bank, tokenizer, batch, on_text=lambda i, d: streamed.__setitem__(i, streamed[i] + d))
    for i, (request, result) in enumerate(zip(batch, results)):
        alone = generate_batch(bank, tokenizer, [request])[0]
        assert result == alone, f"row {i}"
        assert streamed[i] == result.text
        assert result.prompt_tokens == len(request.prompt_ids)
        assert result.finish_reason == ("length" if len(result.token_ids) == request.max_new_tokens else "stop")
        model = tf.AutoModelForCausalLM.from_pretrained(model_dir)
        if request.adapter is not None:
            model = PeftModel.from_pretrained(model, folders[request.adapter])
        hf = model.generate(torch.tensor([request.prompt_ids]), max_new_tokens=request.max_new_tokens,
                            do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert result.token_ids == hf[0, len(request.prompt_ids):].tolist(), f"row {i} ({request.adapter})"
    assert results[0].token_ids != results[1].token_ids  # adapters steer the tiny model


def test_seeded_sampling_is_per_row(setup):
    _, tokenizer, _ = setup
    bank = make_bank(setup)
    batch = requests(tokenizer, temperature=1.0, top_p=0.9, seed=7)
    batch[1].temperature = 0.0
    results = generate_batch(bank, tokenizer, batch)
    for request, result in zip(batch, results):
        assert result == generate_batch(bank, tokenizer, [request])[0]
    reseeded = GenerationRequest(batch[2].prompt_ids, "all", 12, temperature=1.0, seed=8)
    assert generate_batch(bank, tokenizer, [reseeded])[0].token_ids != results[2].token_ids


def test_stop_strings_and_eos(setup):
    _, tokenizer, _ = setup
    bank = make_bank(setup)
    request = GenerationRequest(tokenizer(PROMPTS[0])["input_ids"], adapter="qv", max_new_tokens=12)
    full = generate_batch(bank, tokenizer, [request])[0]
    assert full.finish_reason == "length"
    stop = full.text[len(full.text) // 2:][:2]
    cut = full.text.index(stop)
    deltas = []
    request.stop = ["never matches", stop]
    stopped = generate_batch(bank, tokenizer, [request], on_text=lambda i, d: deltas.append(d))[0]
    assert (stopped.text, stopped.finish_reason) == (full.text[:cut], "stop")
    assert "".join(deltas) == stopped.text
    assert stopped.token_ids == full.token_ids[:len(stopped.token_ids)]
    assert tokenizer.decode(stopped.token_ids).find(stop) >= 0  # ids run up to the token completing the stop
    eos = full.token_ids[3]
    bank.model.generation_config.eos_token_id = eos
    ended = generate_batch(bank, tokenizer, [GenerationRequest(request.prompt_ids, "qv", 12)])[0]
    assert ended.finish_reason == "stop" and ended.token_ids == full.token_ids[:full.token_ids.index(eos) + 1]


def test_a_tiny_temperature_samples_as_greedy(setup):
    _, tokenizer, _ = setup
    bank = make_bank(setup)
    greedy = generate_batch(bank, tokenizer, requests(tokenizer))
    tiny = generate_batch(bank, tokenizer, requests(tokenizer, temperature=1e-300, seed=0))  # 0 in float32
    assert [r.token_ids for r in tiny] == [r.token_ids for r in greedy]


@pytest.mark.parametrize("change, match", [
    ({"prompt_ids": []}, "prompt_ids is empty"),
    ({"prompt_ids": [10**6]}, "token ids in"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"max_new_tokens": 10**6}, "positions"),
    ({"seed": 2**64}, "seed must be an integer from"),
])
def test_bad_requests_are_refused(setup, change, match):
    _, tokenizer, _ = setup
    bank = make_bank(setup)
    good = GenerationRequest([5, 6], max_new_tokens=2)
    bad = GenerationRequest(**{**good.__dict__, **change})
    with pytest.raises(ValueError, match=f"request 1: .*{match}"):
        generate_batch(bank, tokenizer, [good, bad])
    with pytest.raises(KeyError, match="'missing'"):
        generate_batch(bank, tokenizer, [GenerationRequest([5], adapter="missing")])


def test_gpt2_position_limit_is_checked_before_generating(tiny_gpt2_dir):
    """GPT-2 names its limit n_positions: an over-long request is refused, not an IndexError mid-batch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    limit = model.config.n_positions
    with pytest.raises(ValueError, match=f"exceed the model's {limit} positions \\(n_positions\\)"):
        check_request(GenerationRequest([5, 6], max_new_tokens=limit), model)
