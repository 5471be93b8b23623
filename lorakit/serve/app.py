"""The HTTP API: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, vLLM's
/v1/load_lora_adapter and /v1/unload_lora_adapter, plus /metrics and /health.

The request's `model` picks what answers: the base model's name (`Service.base_name`) or the
name of an adapter. Every error is a 4xx/5xx with OpenAI's {"error": {...}} body.
"""
from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from lorakit.serve.batcher import Batcher, InvalidRequest, Job, QueueFull, ShuttingDown
from lorakit.serve.generate import GenerationRequest
from lorakit.serve.guards import ApiKey, BodyLimit, TrustedHosts
from lorakit.serve.images import chat_inputs, image_support
from lorakit.serve.metrics import CONTENT_TYPE, UNKNOWN_MODEL, Metrics
from lorakit.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    LoadAdapterRequest,
    Reply,
    UnloadAdapterRequest,
)
from lorakit.serve.registry import AdapterExists, AdapterLoadError, PathNotAllowed, UnknownAdapter, check_name


@dataclass
class Service:
    """What the routes need: the batcher (with its registry), the tokenizer, names and limits."""
    batcher: Batcher
    tokenizer: object
    base_name: str
    context_length: int
    vocab_size: int
    max_tokens_limit: int = 1024
    max_body_bytes: int = 1 << 20
    body_timeout_s: float = 30.0
    allowed_hosts: frozenset[str] = frozenset()  # Host names accepted besides localhost's (see TrustedHosts)
    api_key: str | None = None  # the Bearer token every route but /health needs (None: no authentication)
    adapter_api: bool = False  # whether /v1/load_lora_adapter and /v1/unload_lora_adapter work
    processor: object | None = None  # a vision-language base's processor: chats go through it (images.py)
    allow_remote_images: bool = False  # whether image_url parts may be http(s) URLs the server fetches
    metrics: Metrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.batcher)

    def adapter_for(self, model: str) -> str | None:
        """The adapter a request's `model` names (None: the base model), or a 404."""
        if model == self.base_name:
            return None
        try:
            self.batcher.registry.folder(model)
        except UnknownAdapter as err:
            raise model_not_found(err) from None
        return model


def create_app(service: Service) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.batcher.start()
        yield
        service.batcher.stop()

    app = FastAPI(title="lorakit serve", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=service.max_body_bytes, timeout_s=service.body_timeout_s)
    app.add_middleware(ApiKey, key=service.api_key)  # before the body is read
    app.add_middleware(TrustedHosts, allowed=service.allowed_hosts)  # added last: runs first
    started = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        if content_type != "application/json" and not content_type.endswith("+json"):
            # JSON is read only when declared so (a browser page cannot post it cross-site unasked)
            error = APIError(400, "send the request body as JSON, with the header Content-Type: application/json")
        else:
            error = validation_error(err)
        if request.url.path in GENERATION_ROUTES:
            service.metrics.request(UNKNOWN_MODEL, error.status)
        return await _api_error(request, error)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException):
        return await _api_error(request, APIError(err.status_code, f"{request.method} {request.url.path}: "
                                                  f"{err.detail}"))

    @app.exception_handler(Exception)
    async def _crash(request: Request, err: Exception):  # uvicorn logs the traceback; the client gets no details
        return await _api_error(request, APIError(500, f"internal server error ({type(err).__name__}); "
                                                  "the server's log has the details", type="server_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "loaded_adapters": service.batcher.registry.loaded}

    @app.get("/v1/models")
    def models():  # a plain def: FastAPI runs it in a thread, so the folder scan does not block the loop
        adapters = [n for n in service.batcher.registry.names() if n != service.base_name]
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": started, "owned_by": "lorakit",
             "parent": None if name == service.base_name else service.base_name}
            for name in [service.base_name, *adapters]]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await answer(service, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await answer(service, body, request)

    @app.get("/metrics")
    def metrics():
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    add_adapter_routes(app, service)
    return app


GENERATION_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions"})


def add_adapter_routes(app: FastAPI, service: Service) -> None:
    """vLLM's routes to load and unload adapters by name; with the API off, both answer 404."""
    if not service.adapter_api:
        @app.post("/v1/load_lora_adapter")
        @app.post("/v1/unload_lora_adapter")
        async def adapter_api_off(request: Request):
            raise APIError(404, f"POST {request.url.path}: loading and unloading adapters over HTTP is off on "
                                "this server (start it with --enable_adapter_api)", code="adapter_api_disabled")
        return

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapterRequest):
        try:
            check_name(body.lora_name)
        except ValueError as err:
            raise APIError(400, str(err), param="lora_name") from None
        if body.lora_name == service.base_name:
            raise APIError(400, f"{body.lora_name!r} is the base model's name", param="lora_name",
                           code="adapter_exists")
        try:  # the files are read in a thread: neither the event loop nor the model's worker waits
            await asyncio.to_thread(service.batcher.registry.register, body.lora_name, body.lora_path)
        except Exception as err:
            raise load_error(service, err) from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapterRequest):
        try:
            service.batcher.registry.unregister(body.lora_name)
        except UnknownAdapter as err:
            raise APIError(404, str(err), param="lora_name", code="adapter_not_found") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def load_error(service: Service, err: Exception) -> APIError:
    """Why POST /v1/load_lora_adapter failed, as vLLM answers it: 404 when there is no adapter at
    the path, 400 otherwise."""
    message = service.batcher.registry.relative(str(err))
    if isinstance(err, UnknownAdapter):
        return APIError(404, message, param="lora_path", code="adapter_not_found")
    if isinstance(err, PathNotAllowed):
        return APIError(400, message, param="lora_path", code="adapter_path_not_allowed")
    if isinstance(err, AdapterExists):
        return APIError(400, message, param="lora_name", code="adapter_exists")
    return APIError(400, f"the adapter could not be loaded: {message}", param="lora_path", code="adapter_load_failed")


async def answer(service: Service, body: CompletionRequest | ChatCompletionRequest, http: Request):
    """generate(), counted in the metrics by model and status."""
    model = UNKNOWN_MODEL
    try:
        body.check_supported()
        adapter = service.adapter_for(body.model)
        model = body.model
        response = await generate(service, body, adapter, http)
    except APIError as err:
        service.metrics.request(model, err.status)
        raise
    service.metrics.request(model, 200)
    return response


async def generate(service: Service, body: CompletionRequest | ChatCompletionRequest, adapter: str | None,
                   http: Request):
    """Check the request, queue it, and answer with the whole result or a stream of chunks."""
    prompt_ids, media = await prompt_inputs(service, body)
    request = GenerationRequest(
        prompt_ids=prompt_ids, adapter=adapter, media=media,
        max_new_tokens=check_lengths(service, prompt_ids, body.max_new_tokens, body.PROMPT_FIELD),
        temperature=1.0 if body.temperature is None else body.temperature,  # OpenAI's defaults
        top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, stop=body.stop)
    reply = Reply(chat=isinstance(body, ChatCompletionRequest), model=body.model)
    try:
        job = service.batcher.submit(request, stream=bool(body.stream))
    except QueueFull as err:  # 429 + Retry-After: OpenAI's clients back off and retry on their own
        raise APIError(429, str(err), code="queue_full", type="server_error", headers={"Retry-After": "1"}) from None
    try:
        if not body.stream:
            result = await next_result(job, http)
            service.metrics.finished(body.model, job, result)
            return reply.whole(result.text, result.finish_reason, result.prompt_tokens, len(result.token_ids))
        first = await next_event(job, http)  # wait for it, so that a failure still gets its HTTP status
        if first[0] == "error":
            raise as_api_error(first[1])
    except BaseException:
        job.cancelled = True
        raise
    return StreamingResponse(stream_events(service, job, reply, first, body.include_usage),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def prompt_inputs(service: Service,
                        body: CompletionRequest | ChatCompletionRequest) -> tuple[list[int], dict | None]:
    """The prompt's token ids, and the prefill's extra inputs (pixel_values, ...) for a chat with images.
    On a vision-language base, chats are rendered with its processor (as training renders them)."""
    chat = isinstance(body, ChatCompletionRequest)
    if chat and body.image_urls:
        why = image_support(service.batcher.registry.bank.model, service.processor)
        if why is not None:
            raise APIError(400, why, param="messages", code="images_not_supported")
    if chat and service.processor is not None:
        return await asyncio.to_thread(chat_inputs, service.processor, [m.for_template() for m in body.messages],
                                       service.allow_remote_images)
    prompt_ids = body.prompt_ids(service.tokenizer)
    if service.processor is not None and service.processor.image_token_id in prompt_ids:
        raise APIError(400, f"the {body.PROMPT_FIELD} holds the image token ({service.processor.image_token!r}); "
                            "send images as image_url parts of /v1/chat/completions messages",
                       param=body.PROMPT_FIELD)
    return prompt_ids, None


def check_lengths(service: Service, prompt_ids: list[int], max_tokens: int | None, prompt_field: str) -> int:
    """The number of tokens to generate, or a 400 when the request does not fit the limits."""
    if not prompt_ids:
        raise APIError(400, f"{prompt_field} is empty: give at least one token of text", param=prompt_field)
    if min(prompt_ids) < 0 or max(prompt_ids) >= service.vocab_size:
        raise APIError(400, f"token ids must be in [0, {service.vocab_size})", param=prompt_field)
    room = service.context_length - len(prompt_ids)
    if max_tokens is not None and max_tokens > service.max_tokens_limit:
        raise APIError(400, f"max_tokens={max_tokens} is over this server's limit of {service.max_tokens_limit}",
                       param="max_tokens", code="max_tokens_exceeded")
    wanted = max_tokens or min(service.max_tokens_limit, room)
    if wanted > room or room < 1:
        raise APIError(400, f"this model's maximum context length is {service.context_length} tokens; the "
                            f"request has {len(prompt_ids)} in the {prompt_field} and asks for {max(wanted, 1)} "
                            f"more: shorten the {prompt_field} or lower max_tokens",
                       param=prompt_field, code="context_length_exceeded")
    return wanted


async def next_result(job: Job, http: Request):
    """The job's GenerationResult, skipping text events; its error as an APIError."""
    while True:
        kind, value = await next_event(job, http)
        if kind == "done":
            return value
        if kind == "error":
            raise as_api_error(value)


DISCONNECT_POLL_S = 0.2  # how often a request waiting for its answer checks that its client is still there


async def next_event(job: Job, http: Request) -> tuple:
    """The job's next event. If the client disconnects first, the job is cancelled (its row leaves the
    running batch at the next step) and the answer is a 499 that nobody reads (counted in /metrics).
    A stream's disconnect is Starlette's to notice: it cancels stream_events."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
        except TimeoutError:
            if await http.is_disconnected():
                job.cancelled = True
                raise APIError(499, "the client closed the connection before the answer was ready",
                               code="client_closed_request") from None


async def stream_events(service: Service, job: Job, reply: Reply, event: tuple, include_usage: bool):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
    try:
        if reply.chat:
            yield sse(reply.role_chunk())
        while True:
            kind, value = event
            if kind == "text":
                yield sse(reply.chunk(value))
            elif kind == "done":
                service.metrics.finished(reply.model, job, value)
                yield sse(reply.chunk(None, value.finish_reason))
                if include_usage:
                    yield sse(reply.usage_chunk(value.prompt_tokens, len(value.token_ids)))
                break
            else:
                yield sse(as_api_error(value).body())
                break
            event = await job.events.get()
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True


def sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def model_not_found(err: UnknownAdapter) -> APIError:
    return APIError(404, f"{err}; GET /v1/models lists the models this server has", param="model",
                    code="model_not_found")


def as_api_error(err: Exception) -> APIError:
    """What a failure in the worker thread looks like to the client (a bug's details stay in the log)."""
    if isinstance(err, UnknownAdapter):
        return model_not_found(err)
    if isinstance(err, AdapterLoadError):
        return APIError(400, str(err), param="model", code="adapter_load_failed")
    if isinstance(err, InvalidRequest):
        return APIError(400, str(err))
    if isinstance(err, ShuttingDown):
        return APIError(503, str(err), type="server_error", code="shutting_down")
    return APIError(500, f"generation failed ({type(err).__name__}); the server's log has the details",
                    type="server_error")


def validation_error(err: RequestValidationError) -> APIError:
    """A pydantic/JSON error as OpenAI's 400, naming the field and what it accepts."""
    first = err.errors()[0]
    if first["type"] == "json_invalid":
        reason = first.get("ctx", {}).get("error", first["msg"])
        return APIError(400, f"the request body is not valid JSON ({reason})")
    loc = [str(part) for part in first["loc"] if part != "body"]
    message = first["msg"].removeprefix("Value error, ")
    if not loc:
        return APIError(400, f"the request body must be a JSON object ({message})")
    return APIError(400, f"{'.'.join(loc)}: {message}", param=loc[0])
