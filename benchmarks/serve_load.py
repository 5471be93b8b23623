"""Load test of `lorakit serve` on loopback: many concurrent clients over many adapters.

    python benchmarks/serve_load.py                  # 4-layer Llama (d=256), 64 clients x 4 requests, 8 adapters
    python benchmarks/serve_load.py --small          # a quick run (the slow test runs this)
    python benchmarks/serve_load.py --memory_check   # server RSS after 2,000 requests vs after 200

Starts `lorakit serve` in a subprocess on 127.0.0.1 with a random Llama and random r=8 adapters,
then (1) `--clients` asyncio clients (the official async openai client) each send
`--requests` completions, cycling over `--adapters` adapters, half of them streamed; every
answer must arrive and equal the same request generated alone (greedy, generate_batch with
one request), else the run fails. (2) Static against continuous batching (two servers, one with
`--scheduling static`): the same clients send streamed requests whose prompt and answer lengths
are drawn from lognormal distributions (seeded), with 1, 8 and 32 adapters in the mix; prints
completion tokens/s and the p50 / p99 time to first token (client side: from sending the request
to the first text chunk), and checks that both servers answered alike. Bounded: a fixed number of
requests, then it stops.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Add the two numbers and give the sum.",
          "What is the capital of France? Paris is the capital of France.", "Sort these words: pear, apple.",
          "Translate to French: good morning. Bonjour.", "Write a short poem about the sea and the sky.",
          "def add(a, b): return a + b", "0 1 2 3 4 5 6 7 8 9 10 plus minus equals"]
RANK = 8
MAX_ANSWER = 512  # the longest answer the lognormal draw asks for (the servers' --max_tokens_limit)


def save_model(folder: Path, hidden: int, layers: int) -> None:
    """A random Llama with a small byte-level BPE tokenizer, saved as a transformers folder."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.save_pretrained(str(folder))
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                            num_hidden_layers=layers, num_attention_heads=hidden // 64 or 1,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    tf.LlamaForCausalLM(config).save_pretrained(str(folder))


def save_adapters(model_dir: Path, folder: Path, count: int) -> None:
    """`count` random all-linear LoRA adapters a0, a1, ... in PEFT's format."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from lorakit import LoraConfig

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for name, m in linears:
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(RANK, m.in_features, generator=g) \
                / math.sqrt(m.in_features)
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(m.out_features, RANK, generator=g) * 0.1
        path = folder / f"a{i}"
        path.mkdir(parents=True)
        save_file(tensors, str(path / "adapter_model.safetensors"))
        LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
                   ).save_pretrained(str(path))


@contextlib.contextmanager
def running_server(model_dir: Path, adapters_dir: Path, max_loaded: int, batch: int, window_ms: float, dtype: str,
                   scheduling: str = "continuous"):
    """`lorakit serve` in a subprocess on a free loopback port; yields (its /v1 URL, the process), stops it after."""
    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "lorakit", "serve", "--model", str(model_dir), "--adapters", str(adapters_dir),
               "--port", str(port), "--max_loaded_adapters", str(max_loaded), "--max_batch_size", str(batch),
               "--batch_window_ms", str(window_ms), "--torch_dtype", dtype, "--log_level", "warning",
               "--scheduling", scheduling, "--max_tokens_limit", str(MAX_ANSWER)]
    server = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"lorakit serve exited with code {server.returncode}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("lorakit serve did not start within 120 s")
            time.sleep(0.2)
        yield url + "/v1", server
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


async def ask(client, job: dict) -> tuple[str, int, float | None]:
    """(text, completion tokens, seconds to the first text chunk or None) of one completion, streamed or not."""
    args = dict(model=job["model"], prompt=job["prompt"], max_tokens=job["max_tokens"], temperature=0)
    if not job["stream"]:
        reply = await client.completions.create(**args)
        return reply.choices[0].text, reply.usage.completion_tokens, None
    text, tokens, first, start = [], 0, None, time.perf_counter()
    async for chunk in await client.completions.create(**args, stream=True, stream_options={"include_usage": True}):
        text += [c.text for c in chunk.choices]
        if first is None and any(c.text for c in chunk.choices):
            first = time.perf_counter() - start
        tokens = chunk.usage.completion_tokens if chunk.usage else tokens
    return "".join(text), tokens, first


async def run_clients(url: str, per_client: list[list[dict]]) -> tuple[list, float]:
    """Every client sends its jobs one after another, all clients at once; (outcomes, seconds)."""
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    outcomes = {}

    async def one_client(jobs):
        for job in jobs:
            try:
                outcomes[job["id"]] = await ask(client, job)
            except Exception as err:
                outcomes[job["id"]] = err

    start = time.perf_counter()
    await asyncio.gather(*(one_client(jobs) for jobs in per_client))
    seconds = time.perf_counter() - start
    await client.close()
    return [outcomes[i] for i in range(sum(map(len, per_client)))], seconds


def make_jobs(clients: int, requests: int, adapters: int, max_tokens: int, stream_every: int) -> list[list[dict]]:
    jobs, n = [], 0
    for c in range(clients):
        jobs.append([])
        for k in range(requests):
            jobs[-1].append(dict(id=n, model=f"a{n % adapters}", prompt=f"{CORPUS[n % len(CORPUS)]} ({c}-{k})",
                                 max_tokens=max_tokens, stream=stream_every > 0 and n % stream_every == 0))
            n += 1
    return jobs


def alone(model_dir: Path, adapters_dir: Path, jobs: list[dict], dtype: str) -> list[str]:
    """Each job generated by itself (batch of one) on a separate copy of the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.precision import inference_dtype
    from lorakit.serve import AdapterBank, GenerationRequest, generate_batch

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=inference_dtype(dtype, "cpu"))
    bank = AdapterBank(model.eval())
    for name in sorted({j["model"] for j in jobs}):
        bank.load(name, adapters_dir / name)
    return [generate_batch(bank, tokenizer, [GenerationRequest(tokenizer(j["prompt"])["input_ids"], j["model"],
                                                               j["max_tokens"])])[0].text for j in jobs]


def lognormal_jobs(clients: int, requests: int, adapters: int, seed: int, prompt_median: float,
                   answer_median: float, sigma: float) -> list[list[dict]]:
    """Streamed requests whose prompt (in words) and answer lengths are lognormal: most short, a long tail."""
    g = torch.Generator().manual_seed(seed)
    words = " ".join(CORPUS).split()

    def draw(median: float, high: int) -> int:
        return int(min(max(round(median * math.exp(sigma * torch.randn(1, generator=g).item())), 1), high))

    jobs, n = [], 0
    for _ in range(clients):
        jobs.append([])
        for _ in range(requests):
            length = draw(prompt_median, 400)
            prompt = " ".join(words[(n + i) % len(words)] for i in range(length))
            jobs[-1].append(dict(id=n, model=f"a{n % adapters}", prompt=prompt,
                                 max_tokens=draw(answer_median, MAX_ANSWER), stream=True))
            n += 1
    return jobs


def percentile(values: list[float], q: float) -> float:
    return float(torch.tensor(values).quantile(q)) if values else float("nan")


def compare_scheduling(model_dir: Path, adapters_dir: Path, args, mixes: list[int]) -> dict:
    """Tokens/s and p50 / p99 time to first token of static and continuous batching, same load."""
    results = {}
    for scheduling in ("static", "continuous"):
        with running_server(model_dir, adapters_dir, max(mixes), args.max_batch_size, args.batch_window_ms,
                            args.torch_dtype, scheduling) as (url, _):
            for mix in mixes:
                warm_up = [[dict(id=i, model=f"a{i}", prompt="warm up", max_tokens=1, stream=False)]
                           for i in range(mix)]  # loads the adapters, so that loading is not timed
                asyncio.run(run_clients(url, warm_up))
                jobs = lognormal_jobs(args.clients, args.compare_requests, mix, args.seed, args.prompt_median,
                                      args.answer_median, args.sigma)
                results[scheduling, mix] = asyncio.run(run_clients(url, jobs))
    figures = {}
    print(f"static vs continuous batching: {args.clients} concurrent clients x {args.compare_requests} streamed "
          f"requests, "
          f"lognormal lengths (prompt median {args.prompt_median} words, answer median {args.answer_median} "
          f"tokens, sigma {args.sigma}, seed {args.seed}), --max_batch_size {args.max_batch_size}")
    print("  | adapters | scheduling | failures | tokens/s | TTFT p50 s | TTFT p99 s |\n  |---|---|---|---|---|---|")
    for (scheduling, mix), (outcomes, seconds) in results.items():
        done = [o for o in outcomes if not isinstance(o, Exception)]
        ttft = [o[2] for o in done if o[2] is not None]
        f = dict(failures=len(outcomes) - len(done), tokens_per_s=sum(o[1] for o in done) / seconds,
                 ttft_p50=percentile(ttft, 0.5), ttft_p99=percentile(ttft, 0.99))
        figures[f"{scheduling}{mix}"] = f
        print(f"  | {mix} | {scheduling} | {f['failures']} | {f['tokens_per_s']:.0f} | {f['ttft_p50']:.2f} "
              f"| {f['ttft_p99']:.2f} |")
    for mix in mixes:
        static, continuous = figures[f"static{mix}"], figures[f"continuous{mix}"]
        differ = sum(not isinstance(a, Exception) and not isinstance(b, Exception) and a[0] != b[0]
                     for a, b in zip(results["static", mix][0], results["continuous", mix][0]))
        continuous["answers_differ"] = differ
        speedup, ttft = continuous["tokens_per_s"] / static["tokens_per_s"], continuous["ttft_p99"] / static["ttft_p99"]
        print(f"  {mix} adapters: continuous / static throughput {speedup:.2f}x, TTFT p99 {ttft:.2f}x static's; "
              f"answers that differ: {differ}")
    return figures


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def memory_check(model_dir: Path, adapters_dir: Path, args) -> dict:
    """Server RSS after 200 requests and after 2,000 (same mix, half streamed): no growth per request."""
    rss = {}
    with running_server(model_dir, adapters_dir, 8, args.max_batch_size, args.batch_window_ms,
                        args.torch_dtype) as (url, server):
        sent = 0
        for total in (200, 2000):
            while sent < total:
                per_client = make_jobs(50, 4, 8, 16, stream_every=2)  # 200 requests
                outcomes, _ = asyncio.run(run_clients(url, per_client))
                failed = [o for o in outcomes if isinstance(o, Exception)]
                if failed:
                    raise SystemExit(f"memory check: {len(failed)} requests failed, the first with {failed[0]!r}")
                sent += len(outcomes)
            rss[total] = rss_bytes(server.pid)
    ratio = rss[2000] / rss[200]
    print(f"memory check: server RSS {rss[200] / 2**20:.1f} MiB after 200 requests, {rss[2000] / 2**20:.1f} MiB "
          f"after 2,000 ({ratio:.3f}x)")
    if ratio > 1.05:
        raise SystemExit("memory check failed: RSS grew by more than 5% from 200 to 2,000 requests")
    return dict(rss_200=rss[200], rss_2000=rss[2000], ratio=ratio)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny model, 16 clients x 2 requests, mixes 1 and 8")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--adapters", type=int, default=8, help="adapters the load test cycles over")
    parser.add_argument("--max_tokens", type=int, default=32, help="max_tokens of the load test's requests")
    parser.add_argument("--mixes", default="1,8,32", help="adapter counts for the static / continuous comparison")
    parser.add_argument("--compare_requests", type=int, default=8, help="requests per client in the comparison")
    parser.add_argument("--prompt_median", type=float, default=12, help="median prompt length, in words")
    parser.add_argument("--answer_median", type=float, default=24, help="median max_tokens")
    parser.add_argument("--sigma", type=float, default=1.0, help="sigma of the lognormal lengths")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_batch_size", type=int, default=32)
    parser.add_argument("--batch_window_ms", type=float, default=20)
    parser.add_argument("--torch_dtype", default="float32", help="the server's --torch_dtype (auto: bf16 on a CPU "
                        "with a bf16 matrix unit); the answers alone are generated in the same dtype")
    parser.add_argument("--memory_check", action="store_true", help="only the RSS check, on the small model")
    args = parser.parse_args(argv)
    hidden, layers = (64, 2) if args.small or args.memory_check else (256, 4)
    if args.small:
        args.clients, args.requests, args.max_tokens, args.mixes, args.answer_median = 16, 2, 12, "1,8", 8
        args.compare_requests = 2
    mixes = [int(m) for m in args.mixes.split(",")]
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, adapters_dir = Path(tmp) / "model", Path(tmp) / "adapters"
        save_model(model_dir, hidden, layers)
        save_adapters(model_dir, adapters_dir, max(args.adapters, *mixes))
        if args.memory_check:
            return {"memory": memory_check(model_dir, adapters_dir, args)}
        with running_server(model_dir, adapters_dir, args.adapters, args.max_batch_size, args.batch_window_ms,
                            args.torch_dtype) as (url, _):
            per_client = make_jobs(args.clients, args.requests, args.adapters, args.max_tokens, stream_every=2)
            outcomes, seconds = asyncio.run(run_clients(url, per_client))
        jobs = [job for jobs in per_client for job in jobs]
        failures = [(j, o) for j, o in zip(jobs, outcomes) if isinstance(o, Exception)]
        expected = alone(model_dir, adapters_dir, jobs, args.torch_dtype)
        mismatches = [(j, o[0], e) for j, o, e in zip(jobs, outcomes, expected)
                      if not isinstance(o, Exception) and o[0] != e]
        tokens = sum(o[1] for o in outcomes if not isinstance(o, Exception))
        print(f"load test: {len(jobs)} requests from {args.clients} concurrent clients over {args.adapters} adapters "
              f"(half streamed), max_tokens {args.max_tokens}, model d={hidden} x {layers} layers, "
              f"{torch.get_num_threads()} torch threads")
        print(f"  failures {len(failures)}, answers different from the request alone {len(mismatches)}")
        print(f"  {seconds:.1f} s: {len(jobs) / seconds:.1f} requests/s, {tokens / seconds:.0f} completion tokens/s")
        for job, err in failures[:3]:
            print(f"  failed: {job}: {err!r}")
        for job, got, want in mismatches[:3]:
            print(f"  mismatch: {job}: served {got!r}, alone {want!r}")
        figures["load"] = dict(requests=len(jobs), failures=len(failures), mismatches=len(mismatches),
                               requests_per_s=len(jobs) / seconds, tokens_per_s=tokens / seconds)
        figures.update(compare_scheduling(model_dir, adapters_dir, args, mixes))
    if failures or mismatches or any(f.get("failures") or f.get("answers_differ") for f in figures.values()):
        raise SystemExit("load test failed")
    return figures


if __name__ == "__main__":
    main()
