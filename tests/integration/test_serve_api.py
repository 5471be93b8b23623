"""`lorakit serve` for real traffic: API keys, adapters loaded and unloaded over HTTP (vLLM's routes),
--lora_modules, /metrics, and a 4-bit base; the official openai client against live servers on loopback."""
import json
import shutil

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from helpers import GOOD_COMPLETION as GOOD
from helpers import PROMPT, SERVED_TARGETS, add_misfit_adapter, running_server, save_adapter, serve_folders

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(root, base, adapters): alpha as a folder of the adapters directory; beta in adapters/versions/beta-v1
    (servable only by registering it); gamma outside the adapters directory; a symlink out of it."""
    root = tmp_path_factory.mktemp("api")
    base, adapters = serve_folders(root, {"alpha": 1})
    save_adapter(base, adapters / "versions" / "beta-v1", 2, r=4, lora_alpha=8, target_modules=SERVED_TARGETS)
    save_adapter(base, root / "gamma", 3, r=4, lora_alpha=8, target_modules=SERVED_TARGETS)
    (adapters / "versions" / "escape").symlink_to(root / "gamma", target_is_directory=True)
    add_misfit_adapter(adapters)
    shutil.move(adapters / "misfit", adapters / "versions" / "misfit")
    return root, base, adapters


@pytest.fixture(scope="module")
def server(setup):
    """With an API key and the adapter API on."""
    _, base, adapters = setup
    with running_server(base, adapters, api_key=KEY, enable_adapter_api=True, max_tokens_limit=32) as running:
        yield running


@pytest.fixture(scope="module")
def plain_server(setup):
    """No key, the adapter API off (the default), gamma from outside through --lora_modules (both forms)."""
    root, base, adapters = setup
    with running_server(base, adapters, lora_modules=[f"gamma={root / 'gamma'}",
                                                      json.dumps({"name": "gamma2", "path": str(root / "gamma")})],
                        allow_adapter_paths_outside=True) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def greedy_alone(base: str, folder, max_tokens: int = 6, quantize: bool = False) -> str:
    """The greedy text of PROMPT through lorakit's PeftModel (over an NF4 base with `quantize`) and HF generate."""
    from lorakit import PeftModel
    from lorakit.io.pretrained import load_model, load_tokenizer

    tokenizer = load_tokenizer(base)
    model = load_model(base, "causal_lm", [], torch.float32, quantize=quantize)
    if folder is not None:
        model = PeftModel.from_pretrained(model, str(folder)).eval()
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True, clean_up_tokenization_spaces=False)


def complete(client, model: str, max_tokens: int = 6) -> str:
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0).choices[0].text


def post(server, path: str, body: dict, headers=AUTH) -> httpx.Response:
    return httpx.post(server[0] + path, json=body, headers=headers, timeout=60)


# --- API keys -------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["wrong", KEY + "x", KEY[:-1]])
def test_a_wrong_key_is_openais_authentication_error(server, key):
    bad = openai.OpenAI(base_url=server[0] + "/v1", api_key=key, max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.completions.create(model="alpha", prompt=PROMPT, max_tokens=2)
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


@pytest.mark.parametrize("headers", [{}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"},
                                     {"Authorization": "Bearer"}])
def test_a_missing_key_is_a_401_on_every_route_but_health(server, headers):
    for method, path in [("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/metrics"),
                         ("POST", "/v1/load_lora_adapter"), ("GET", "/v1/nothing")]:
        reply = httpx.request(method, server[0] + path, json=GOOD, headers=headers, timeout=60)
        assert reply.status_code == 401, (path, reply.text)
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_api_key"
    assert httpx.get(server[0] + "/health", headers=headers).json()["status"] == "ok"


def test_the_right_key_is_served(client):
    assert complete(client, "alpha", 2)
    assert {m.id for m in client.models.list().data} >= {"alpha", "tiny-llama"}


def test_the_key_comes_from_the_environment(setup, monkeypatch):
    from lorakit.serve.server import ServeArgs

    _, base, adapters = setup
    monkeypatch.setenv("LORAKIT_API_KEY", "from-env")
    assert ServeArgs(model=base, adapters=str(adapters)).api_key == "from-env"
    assert ServeArgs(model=base, adapters=str(adapters), api_key="flag").api_key == "flag"
    monkeypatch.setenv("LORAKIT_API_KEY", "")
    assert ServeArgs(model=base, adapters=str(adapters)).api_key is None
    with pytest.raises(ValueError, match="must not be empty"):
        ServeArgs(model=base, adapters=str(adapters), api_key=" ")


# --- adapters over the API ------------------------------------------------------------------------
def test_load_serve_and_unload_an_adapter(server, client, setup):
    _, base, adapters = setup
    reply = post(server, "/v1/load_lora_adapter", {"lora_name": "beta", "lora_path": "versions/beta-v1"})
    assert reply.status_code == 200 and reply.text == "Success: LoRA adapter 'beta' added successfully."
    assert "beta" not in server[1].batcher.registry.bank.names  # read, not yet in the bank: no batch waited
    models = {m.id: m for m in client.models.list().data}
    assert models["beta"].parent == "tiny-llama"
    assert complete(client, "beta") == greedy_alone(base, adapters / "versions" / "beta-v1")
    assert "beta" in server[1].batcher.registry.bank.names

    again = post(server, "/v1/load_lora_adapter", {"lora_name": "beta", "lora_path": "versions/beta-v1"})
    assert again.status_code == 400 and again.json()["error"]["code"] == "adapter_exists"
    reply = post(server, "/v1/unload_lora_adapter", {"lora_name": "beta"})
    assert reply.status_code == 200 and reply.text == "Success: LoRA adapter 'beta' removed successfully."
    with pytest.raises(openai.NotFoundError):
        complete(client, "beta")
    complete(client, "alpha", 1)
    assert "beta" not in server[1].batcher.registry.bank.names  # unloaded before the next batch
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "beta"}).status_code == 404


def test_a_name_may_hold_a_slash_as_vllm_names_do(server, client, setup):
    _, base, adapters = setup
    body = {"lora_name": "org/beta", "lora_path": str(adapters / "versions" / "beta-v1")}
    assert post(server, "/v1/load_lora_adapter", body).status_code == 200
    try:
        assert complete(client, "org/beta") == greedy_alone(base, adapters / "versions" / "beta-v1")
    finally:
        assert post(server, "/v1/unload_lora_adapter", {"lora_name": "org/beta"}).status_code == 200


@pytest.mark.parametrize("body, status, code", [
    ({"lora_name": "x", "lora_path": "../gamma"}, 400, "adapter_path_not_allowed"),
    ({"lora_name": "x", "lora_path": "/etc"}, 400, "adapter_path_not_allowed"),
    ({"lora_name": "x", "lora_path": "versions/escape"}, 400, "adapter_path_not_allowed"),
    ({"lora_name": "x", "lora_path": "versions/missing"}, 404, "adapter_not_found"),
    ({"lora_name": "x", "lora_path": "versions/misfit"}, 400, "adapter_load_failed"),
    ({"lora_name": "alpha", "lora_path": "versions/beta-v1"}, 400, "adapter_exists"),
    ({"lora_name": "tiny-llama", "lora_path": "versions/beta-v1"}, 400, "adapter_exists"),
    ({"lora_name": " x", "lora_path": "versions/beta-v1"}, 400, None),
    ({"lora_name": "x"}, 400, None),
])
def test_bad_loads_are_refused_and_the_server_keeps_serving(server, client, setup, body, status, code):
    reply = post(server, "/v1/load_lora_adapter", body)
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["code"] == code
    assert str(setup[2]) not in reply.text  # no server paths but the client's own
    assert "x" not in [m.id for m in client.models.list().data]
    assert complete(client, "alpha", 2)


def test_outside_paths_name_the_flag_that_allows_them(server):
    reply = post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "../gamma"})
    assert "--allow_adapter_paths_outside" in reply.json()["error"]["message"]


def test_the_adapter_api_is_off_by_default(plain_server, setup):
    for path in ["/v1/load_lora_adapter", "/v1/unload_lora_adapter"]:
        reply = post(plain_server, path, {"lora_name": "beta", "lora_path": "versions/beta-v1"}, headers={})
        assert reply.status_code == 404
        assert reply.json()["error"]["code"] == "adapter_api_disabled"
        assert "--enable_adapter_api" in reply.json()["error"]["message"]


def test_lora_modules_serve_folders_from_anywhere_at_start_up(plain_server, setup):
    root, base, _ = setup
    client = openai.OpenAI(base_url=plain_server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)
    expected = greedy_alone(base, root / "gamma")
    assert complete(client, "gamma") == complete(client, "gamma2") == expected
    assert plain_server[1].batcher.registry.allow_outside


def test_lora_modules_alone_serve_without_an_adapters_folder(setup):
    """vLLM's start-up: --lora_modules without --adapters serves the base and the named adapters; with no folder
    to keep loads inside, loading by path over the API is refused unless paths outside are allowed."""
    from lorakit.serve.server import parse_serve_args

    root, base, _ = setup
    assert parse_serve_args(["--model", base, "--lora-modules", f"gamma={root / 'gamma'}"]).adapters is None
    with running_server(base, None, lora_modules=[f"gamma={root / 'gamma'}"], enable_adapter_api=True) as running:
        client = openai.OpenAI(base_url=running[0] + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny-llama", "gamma"]
        assert complete(client, "gamma") == greedy_alone(base, root / "gamma")
        with pytest.raises(openai.NotFoundError, match="no adapters folder"):
            complete(client, "alpha")
        reply = post(running, "/v1/load_lora_adapter", {"lora_name": "g", "lora_path": str(root / "gamma")}, {})
        assert reply.status_code == 400 and "--allow_adapter_paths_outside" in reply.json()["error"]["message"]


def test_a_bad_lora_module_stops_the_start(setup):
    from lorakit.serve.server import ServeArgs, build_service

    root, base, adapters = setup
    for spec, message in [("nothing", "name=path"), ("{bad", "not valid JSON"),
                          (f"m={root / 'none'}", "no adapter found"), (f"tiny-llama={root / 'gamma'}", "base model")]:
        with pytest.raises(ValueError, match=message):
            build_service(ServeArgs(model=base, adapters=str(adapters), lora_modules=[spec]))


# --- metrics --------------------------------------------------------------------------------------
def scrape(server) -> dict[tuple, float]:
    """(sample name, sorted labels) -> value, parsed with prometheus_client's own parser."""
    text = httpx.get(server[0] + "/metrics", headers=AUTH).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_requests_tokens_and_latency(server, client):
    before = scrape(server)
    complete(client, "alpha", 5)
    list(client.completions.create(model="alpha", prompt=PROMPT, max_tokens=3, temperature=0, stream=True))
    with pytest.raises(openai.NotFoundError):
        complete(client, "nobody")
    after = scrape(server)

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0)

    assert grew("lorakit_requests_total", model="alpha", status="200") == 2
    assert grew("lorakit_requests_total", model="", status="404") == 1
    assert grew("lorakit_generation_tokens_total", model="alpha") == 8
    assert grew("lorakit_prompt_tokens_total", model="alpha") == 2 * len(server[1].tokenizer(PROMPT)["input_ids"])
    assert grew("lorakit_time_to_first_token_seconds_count") == 2
    assert grew("lorakit_time_per_output_token_seconds_count") == 2
    assert after[("lorakit_queue_depth", ())] == 0 and after[("lorakit_running_batch_size", ())] == 0
    assert grew("lorakit_adapter_cache_hits_total") == 2
    assert ("lorakit_adapter_cache_loads_total", ()) in after and ("lorakit_adapter_cache_evictions_total", ()) in after


def test_each_server_counts_its_own_requests(server, plain_server):
    client = openai.OpenAI(base_url=plain_server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)
    before = scrape(server).get(("lorakit_requests_total", (("model", "tiny-llama"), ("status", "200"))), 0)
    complete(client, "tiny-llama", 2)
    assert scrape(server).get(("lorakit_requests_total", (("model", "tiny-llama"), ("status", "200"))), 0) == before


# --- a 4-bit base ---------------------------------------------------------------------------------
def test_a_4bit_base_answers_as_peft_model_over_the_same_nf4_base(setup, tmp_path):
    from lorakit.io.checkpoint4bit import save_nf4
    from lorakit.io.pretrained import load_model, load_tokenizer

    _, base, adapters = setup
    expected = {name: greedy_alone(base, None if name == "tiny-llama" else adapters / name, quantize=True)
                for name in ["alpha", "tiny-llama"]}
    assert expected["alpha"] != greedy_alone(base, adapters / "alpha")  # 4 bits do change the answer here
    saved = tmp_path / "tiny-llama"  # the same NF4 model saved in bitsandbytes' 4-bit form
    save_nf4(load_model(base, "causal_lm", [], torch.float32, quantize=True), str(saved))
    load_tokenizer(base).save_pretrained(str(saved))
    for model_dir, options in [(base, {"quant_bits": 4}), (str(saved), {})]:
        with running_server(model_dir, adapters, **options) as (url, _):
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
            assert {name: complete(client, name) for name in expected} == expected, model_dir


# --- a full queue ---------------------------------------------------------------------------------
def test_a_full_queue_is_a_429_that_the_client_may_retry(server, client):
    batcher = server[1].batcher
    bound, batcher.max_queue = batcher.max_queue, 0
    try:
        with pytest.raises(openai.RateLimitError) as err:
            complete(client, "alpha", 2)
    finally:
        batcher.max_queue = bound
    assert err.value.code == "queue_full" and err.value.response.headers["retry-after"] == "1"
    assert complete(client, "alpha", 2)
