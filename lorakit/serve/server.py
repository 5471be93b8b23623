"""`lorakit serve`: its flags, loading the base model and tokenizer, and running uvicorn."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

API_KEY_ENV = "LORAKIT_API_KEY"


@dataclass
class ServeArgs:
    model: str = field(metadata={"help": "Base model: a transformers causal LM folder (or a cached hub id)."})
    adapters: Optional[str] = field(default=None, metadata={"help": (
        "Folder of PEFT adapter folders; each subfolder's name is a model name clients can ask for. "
        "Folders added later are served without a restart. Without it, only the base model and the "
        "--lora_modules adapters (and, with --enable_adapter_api, adapters loaded by name) are served.")})
    host: str = field(default="127.0.0.1", metadata={"help": (
        "Address to listen on; set --api_key before listening beyond this machine.")})
    port: int = 8000
    allowed_hosts: list[str] = field(default_factory=list, metadata={"help": (
        "Host header names accepted besides localhost and --host (a guard against DNS rebinding), "
        "e.g. the name a proxy forwards; '*' accepts any.")})
    served_model_name: Optional[str] = field(default=None, metadata={"help": (
        "The name clients use for the base model without an adapter; default: the last part of --model.")})
    max_loaded_adapters: int = field(default=8, metadata={"help": (
        "Adapters kept loaded at once; the least recently used one is unloaded to make room.")})
    max_batch_size: int = field(default=16, metadata={"help": "Most requests generated together (running rows)."})
    batch_window_ms: float = field(default=10.0, metadata={"help": (
        "How long the first request to an idle server waits for others to join it.")})
    max_queued_requests: int = field(default=1024, metadata={"help": (
        "Requests that may wait to join the running batch; more get a 429 with Retry-After.")})
    scheduling: str = field(default="continuous", metadata={"help": (
        "continuous: requests join the running batch at the next decode step and leave it when they end; "
        "static: a batch runs to its end before the next one starts (for comparison)."),
        "choices": ["continuous", "static"]})
    max_tokens_limit: int = field(default=1024, metadata={"help": "Largest max_tokens a request may ask for."})
    max_body_bytes: int = field(default=1 << 20, metadata={"help": "Largest request body accepted (413 above)."})
    body_timeout_s: float = field(default=30.0, metadata={"help": (
        "Seconds a client has to send its whole request body (408 after).")})
    api_key: Optional[str] = field(default=None, repr=False, metadata={"help": (
        "Clients must send `Authorization: Bearer <key>` on every route but /health (401 otherwise); "
        f"default: the environment variable {API_KEY_ENV}, else no authentication.")})
    enable_adapter_api: bool = field(default=False, metadata={"help": (
        "Serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's routes); off: both answer 404.")})
    allow_adapter_paths_outside: bool = field(default=False, metadata={"help": (
        "Let /v1/load_lora_adapter load folders outside --adapters (any folder this process can read).")})
    lora_modules: list[str] = field(default_factory=list, metadata={"help": (
        "Adapters served by name from start-up, as vLLM spells them: name=path or "
        '\'{"name": ..., "path": ...}\' (several may follow). Paths may lie outside --adapters.')})
    quant_bits: Optional[int] = field(default=None, metadata={"help": (
        "4: hold the base model's Linear layers in NF4 (QLoRA's 4-bit format). A model folder saved in "
        "bitsandbytes' 4-bit form is read as such without this flag.")})
    torch_dtype: str = field(default="auto", metadata={"help": (
        "dtype of the base model and the adapter bank: auto (bfloat16 on a GPU or on a CPU with a bf16 matrix "
        "unit, AMX or AVX-512-BF16; else float32), float32, bfloat16 or float16."),
        "choices": ["auto", "float32", "bfloat16", "float16"]})
    allow_remote_images: bool = field(default=False, metadata={"help": (
        "Let chat requests on a vision-language base give images as http(s) URLs, which the server then "
        "fetches; off: only inline data:image/...;base64 URLs (a remote URL gets a 400).")})
    log_level: str = field(default="info", metadata={"help": "uvicorn's log level."})

    def __post_init__(self) -> None:
        for name in ("max_loaded_adapters", "max_batch_size", "max_queued_requests", "max_tokens_limit",
                     "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_window_ms < 0:
            raise ValueError(f"--batch_window_ms must be >= 0, got {self.batch_window_ms}")
        if self.body_timeout_s <= 0:
            raise ValueError(f"--body_timeout_s must be > 0, got {self.body_timeout_s}")
        if self.adapters is not None and not Path(self.adapters).is_dir():
            raise FileNotFoundError(f"--adapters folder not found: {self.adapters}")
        if self.scheduling not in ("continuous", "static"):
            raise ValueError(f"--scheduling must be continuous or static, got {self.scheduling!r}")
        if self.quant_bits not in (None, 4):
            raise ValueError(f"--quant_bits must be 4 (NF4) or left out, got {self.quant_bits}")
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api_key must not be empty")
        for spec in self.lora_modules:
            lora_module(spec)  # each one checked where it enters


def lora_module(spec: str) -> tuple[str, str]:
    """(name, path) of a --lora_modules value: name=path, or vLLM's JSON {"name": ..., "path": ...}."""
    if spec.lstrip().startswith("{"):
        try:
            value = json.loads(spec)
        except json.JSONDecodeError as err:
            raise ValueError(f"--lora_modules {spec!r} is not valid JSON ({err})") from None
        name, path = value.get("name"), value.get("path")
    else:
        name, _, path = spec.partition("=")
    if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
        raise ValueError(f"--lora_modules {spec!r}: give name=path or {{\"name\": ..., \"path\": ...}}")
    return name, path


def parse_serve_args(argv: list[str]) -> ServeArgs:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(ServeArgs, prog="lorakit serve",
                              description="OpenAI-compatible HTTP server: one base model, many LoRA adapters.")
    return parser.parse_args_into_dataclasses(argv)[0]


def build_service(args: ServeArgs):
    """The Service behind the app: base model on the best device, tokenizer, adapter bank and batcher."""
    from lorakit.io.pretrained import (
        load_model,
        load_tokenizer,
        position_limit,
        resolve_model_path,
        vlm_processor,
    )
    from lorakit.precision import inference_dtype
    from lorakit.serve.app import Service
    from lorakit.serve.bank import AdapterBank
    from lorakit.serve.batcher import Batcher
    from lorakit.serve.registry import AdapterRegistry

    path = resolve_model_path(args.model)
    processor = vlm_processor(path)  # chats with images
    tokenizer = processor.tokenizer if processor is not None else load_tokenizer(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = inference_dtype(args.torch_dtype, device)
    quantize = args.quant_bits == 4 or saved_in_4bit(path)
    model = load_model(path, "causal_lm", [], dtype, quantize=quantize).to(device).eval()
    registry = AdapterRegistry(AdapterBank(model), args.adapters, args.max_loaded_adapters,
                               allow_outside=args.allow_adapter_paths_outside)
    base_name = args.served_model_name or Path(args.model.rstrip("/")).name
    register_lora_modules(registry, args.lora_modules, base_name)
    limit = position_limit(model.config)  # a vision-language model's: its language model's
    return Service(
        batcher=Batcher(registry, tokenizer, args.max_batch_size, args.batch_window_ms / 1000,
                        args.max_queued_requests, static=args.scheduling == "static"),
        tokenizer=tokenizer, base_name=base_name, context_length=limit[0] if limit else tokenizer.model_max_length,
        vocab_size=model.get_input_embeddings().num_embeddings,
        max_tokens_limit=args.max_tokens_limit, max_body_bytes=args.max_body_bytes,
        body_timeout_s=args.body_timeout_s, allowed_hosts=frozenset([args.host, *args.allowed_hosts]),
        api_key=args.api_key, adapter_api=args.enable_adapter_api, processor=processor,
        allow_remote_images=args.allow_remote_images)


def saved_in_4bit(path: str) -> bool:
    """Whether a model folder was saved in bitsandbytes' 4-bit form (config.json says load_in_4bit)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    quantization = json.loads(config.read_text(encoding="utf-8")).get("quantization_config") or {}
    return bool(quantization.get("load_in_4bit"))


def register_lora_modules(registry, specs: list[str], base_name: str) -> None:
    """The --lora_modules adapters, read and checked now: a bad one stops the start with ValueError."""
    for spec in specs:
        name, path = lora_module(spec)
        if name == base_name:
            raise ValueError(f"--lora_modules {spec!r}: {name!r} is the base model's name")
        try:
            registry.register(name, path, trusted=True)
        except (LookupError, ValueError, OSError) as err:
            raise ValueError(f"--lora_modules {spec!r}: {err}") from None


def run_server(args: ServeArgs) -> None:
    import uvicorn

    from lorakit.serve.app import create_app

    service = build_service(args)
    source = f"adapters from {args.adapters}" if args.adapters else f"{len(args.lora_modules)} adapter(s) by name"
    print(f"lorakit serve: base model {service.base_name!r}, {source}, "
          f"http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level=args.log_level)


@contextlib.contextmanager
def serve_in_thread(app, log_level: str = "warning"):
    """Run `app` with uvicorn in a thread on a free loopback port; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server failed to start; see its log above")
            thread.join(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()
