"""`lorakit serve` against hostile or broken input: out-of-range seeds, huge stop strings and model
names, foreign Host headers, bodies that never arrive, null max_tokens, adapters that cannot load."""
import asyncio
import json
import logging
import shutil
import socket
import time

import httpx
import pytest
import torch
from safetensors.torch import save_file

from helpers import GOOD_COMPLETION as GOOD
from helpers import PROMPT, add_misfit_adapter, running_server, serve_folders
from lorakit.serve.generate import GenerationRequest, Row

BROKEN = {  # adapter folder -> what is wrong with it
    "broken-config": "not valid JSON",
    "int-weights": "not floating point",
    "truncated": "cannot be read",
    "off-target": "target_modules",
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    base, adapters = serve_folders(root, {"alpha": 1})
    for name in [*BROKEN, "nan"]:
        shutil.copytree(adapters / "alpha", adapters / name)
    (adapters / "broken-config" / "adapter_config.json").write_text("{not json")
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 32, dtype=torch.int32),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(32, 4, dtype=torch.int32)},
              str(adapters / "int-weights" / "adapter_model.safetensors"))
    (adapters / "truncated" / "adapter_model.safetensors").write_bytes(b"\xff" * 8 + b"{")
    config = json.loads((adapters / "off-target" / "adapter_config.json").read_text())
    (adapters / "off-target" / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["nothing"]}))
    (adapters / "no-weights").mkdir()
    shutil.copy(adapters / "alpha" / "adapter_config.json", adapters / "no-weights")
    return root, base, adapters


@pytest.fixture(scope="module")
def server(setup):
    _, base, adapters = setup
    with running_server(base, adapters, max_tokens_limit=64, body_timeout_s=1) as running:
        yield running


def post(server, body, **kwargs):
    return httpx.post(server[0] + "/v1/completions", json=body, timeout=60, **kwargs)


@pytest.mark.parametrize("seed", [2**64, -2**63 - 1, 10**30])
def test_seed_outside_64_bits_is_a_400_naming_the_range(server, seed):
    reply = post(server, {**GOOD, "temperature": 1, "seed": seed})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "seed"
    assert str(2**64 - 1) in reply.json()["error"]["message"]
    for edge in [2**64 - 1, -2**63]:
        assert post(server, {**GOOD, "temperature": 1, "seed": edge}).status_code == 200


def test_a_bad_row_fails_alone_and_the_rest_of_its_batch_is_answered(server):
    from lorakit.serve.batcher import Batcher

    service = server[1]
    batcher = Batcher(service.batcher.registry, service.tokenizer, max_batch_size=4, window_s=0.5)
    prompt = service.tokenizer(PROMPT)["input_ids"]

    async def run():
        jobs = [batcher.submit(GenerationRequest(prompt, max_new_tokens=3, temperature=1.0, seed=seed))
                for seed in [1, 2**64, None]]
        return [await job.events.get() for job in jobs]

    batcher.start()
    try:
        events = asyncio.run(run())
    finally:
        batcher.stop()
    assert [kind for kind, _ in events] == ["done", "error", "done"]
    assert "seed" in str(events[1][1]) and isinstance(events[1][1], ValueError)


def test_stop_strings_are_bounded(server):
    reply = post(server, {**GOOD, "stop": "x" * 1001})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "stop"
    assert "1000 characters" in reply.json()["error"]["message"]
    assert post(server, {**GOOD, "stop": "x" * 1000}).status_code == 200


def test_a_long_stop_string_costs_little_per_token(server):
    tokenizer = server[1].tokenizer
    (a,) = tokenizer("a", add_special_tokens=False)["input_ids"]
    row = Row(0, GenerationRequest([1], max_new_tokens=100, stop=["ab" * 15_000]), tokenizer, set())
    start = time.perf_counter()
    released = "".join(row.push(a) for _ in range(30))
    assert time.perf_counter() - start < 0.3
    assert released == "a" * 29  # the last "a" could still begin the stop string


def test_long_model_name_is_404_without_server_paths(server, setup):
    reply = post(server, {**GOOD, "model": "m" * 300})
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found"
    assert "/v1/models" in reply.json()["error"]["message"]
    assert str(setup[0]) not in reply.text


@pytest.mark.parametrize("name", [*BROKEN, "misfit"])
def test_an_adapter_that_cannot_load_fails_its_request_without_server_paths(server, setup, name):
    if name == "misfit":  # right tensors, wrong shapes (the bank's own check)
        add_misfit_adapter(setup[2])
    reply = post(server, {**GOOD, "model": name})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["code"] == "adapter_load_failed" and repr(name) in error["message"]
    assert BROKEN.get(name, "do not fit") in error["message"]
    assert str(setup[0]) not in reply.text
    assert post(server, GOOD).status_code == 200


def test_a_value_error_from_reading_weights_fails_only_that_request(server, setup, monkeypatch):
    from lorakit.serve import bank

    real = bank.read_adapter_file

    def refuse_nan(folder):
        if str(folder).endswith("nan"):
            raise ValueError(f"{folder}/adapter_model.safetensors: tensor 'x.lora_A.weight' holds NaN")
        return real(folder)

    monkeypatch.setattr(bank, "read_adapter_file", refuse_nan)
    reply = post(server, {**GOOD, "model": "nan"})
    assert reply.status_code == 400 and "holds NaN" in reply.json()["error"]["message"]
    assert "'nan'" in reply.json()["error"]["message"] and str(setup[0]) not in reply.text
    assert post(server, GOOD).status_code == 200


def test_models_lists_only_loadable_adapters_and_logs_the_others(server, caplog):
    server[1].batcher.registry._skipped.clear()  # each folder is logged once: forget earlier listings
    with caplog.at_level(logging.WARNING, logger="lorakit.serve"):
        ids = [m["id"] for m in httpx.get(server[0] + "/v1/models").json()["data"]]
    assert "alpha" in ids and "nan" in ids
    assert not {"broken-config", "int-weights", "truncated", "no-weights"} & set(ids)
    logged = caplog.text
    for name in ["broken-config", "int-weights", "truncated", "no-weights"]:
        assert repr(name) in logged
    assert "not floating point" in logged and "not valid JSON" in logged


def test_target_modules_that_match_nothing_are_refused_as_by_peft_model(setup):
    from transformers import AutoModelForCausalLM

    from lorakit import PeftModel
    from lorakit.serve import AdapterBank

    _, base, adapters = setup
    with pytest.raises(ValueError, match="target_modules"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapters / "off-target"))
    with pytest.raises(ValueError, match="target_modules=\\['nothing'\\]"):
        AdapterBank(AutoModelForCausalLM.from_pretrained(base)).load("off-target", adapters / "off-target")


@pytest.mark.parametrize("host, status", [("evil.example", 400), ("evil.example:8000", 400), ("localhost", 200),
                                          ("LOCALHOST:1234", 200), ("127.0.0.1", 200), ("[::1]:80", 200),
                                          ("10.1.2.3", 400)])
def test_host_header_must_name_this_server(server, host, status):
    reply = httpx.get(server[0] + "/health", headers={"Host": host})
    assert reply.status_code == status, reply.text
    if status == 400:
        assert "--allowed_hosts" in reply.json()["error"]["message"]


@pytest.mark.parametrize("allowed, host, ok", [
    ({"api.example"}, "API.example.:443", True), ({"api.example"}, "other.example", False),
    ({"*"}, "anything.example", True), ({"0.0.0.0"}, "192.168.1.9:8000", True), ({"0.0.0.0"}, "evil.example", False),
    ({"::"}, "[fe80::1]", True), (set(), "localhost", True)])
def test_allowed_hosts(allowed, host, ok):
    from lorakit.serve.guards import TrustedHosts

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "headers": [(b"host", host.encode())]}
    asyncio.run(TrustedHosts(app, frozenset(allowed))(scope, None, send))
    assert (sent[0]["status"] == 200) == ok


def test_a_body_that_never_arrives_times_out(server):
    port = int(server[0].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{")
        start, reply = time.monotonic(), b""
        while chunk := sock.recv(65536):  # until the server closes the connection
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408") and b"--body_timeout_s" in reply
    assert time.monotonic() - start < 4


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {**GOOD, "prompt": "a\ud800"}, "prompt"),
    ("/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": "\udfff"}]}, "messages")])
def test_lone_surrogates_in_text_are_a_400(server, path, body, param):
    reply = httpx.post(server[0] + path, content=json.dumps(body).encode(),
                       headers={"Content-Type": "application/json"}, timeout=60)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param
    assert "lone surrogates" in reply.json()["error"]["message"]


def test_null_max_tokens_means_the_documented_default(server):
    ask = {"model": "alpha", "prompt": PROMPT, "temperature": 0}
    default, null = post(server, ask).json(), post(server, {**ask, "max_tokens": None}).json()
    assert null["choices"][0]["text"] == default["choices"][0]["text"]
    # cut by the length, not by an EOS, so the 16 is the default's doing
    assert null["usage"]["completion_tokens"] == default["usage"]["completion_tokens"] == 16
    assert null["choices"][0]["finish_reason"] == default["choices"][0]["finish_reason"] == "length"
