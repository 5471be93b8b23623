"""The OpenAI wire format: request bodies (validated), response bodies and stream chunks, errors."""
from __future__ import annotations

import json
import time
import uuid
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lorakit.data.encode import render_chat
from lorakit.serve.generate import SEEDS

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_STOP_CHARS = 1000  # per stop sequence (OpenAI sets none; this bounds the work per generated token)


class APIError(Exception):
    """An error answered as OpenAI does: HTTP status + {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers  # extra response headers (Retry-After, ...)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def unicode_text(text):
    """Text as tokenizers take it: JSON can escape lone surrogates (\\ud800), which are no Unicode text."""
    if isinstance(text, str) and not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text must be valid Unicode, without lone surrogates (\\ud800 to \\udfff)") from None
    return text


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class RequestBase(BaseModel):
    """Fields shared by completions and chat completions; unknown fields are ignored, as OpenAI does."""
    model_config = ConfigDict(strict=True, extra="allow")
    # Fields this server does not implement: accepted only with these neutral values.
    NEUTRAL: ClassVar[dict[str, tuple]] = {
        "n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None, False),
        "top_logprobs": (None, 0), "suffix": (None, ""), "logit_bias": (None, {}),
        "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "tools": (None, []),
        "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
        "response_format": (None, {"type": "text"})}

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: list[str] = []
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, stop):
        stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
            raise ValueError(f"stop must be a non-empty string or a list of at most {MAX_STOP} of them")
        if any(len(s) > MAX_STOP_CHARS for s in stop):
            raise ValueError(f"a stop sequence may have at most {MAX_STOP_CHARS} characters")
        return stop

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, seed):
        if seed is not None and not SEEDS[0] <= seed <= SEEDS[1]:
            raise ValueError(f"seed must be an integer from {SEEDS[0]} to {SEEDS[1]} (64 bits)")
        return seed

    def check_supported(self) -> None:
        """Refuse, by name, the OpenAI fields this server does not implement."""
        for name, value in (self.model_extra or {}).items():
            if name in self.NEUTRAL and not any(_same(value, ok) for ok in self.NEUTRAL[name]):
                accepted = " or ".join(json.dumps(ok) for ok in self.NEUTRAL[name])
                raise APIError(400, f"{name}={json.dumps(value)} is not supported by this server "
                                    f"(accepted: {accepted})", param=name, code="unsupported_parameter")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(RequestBase):
    PROMPT_FIELD: ClassVar[str] = "prompt"
    prompt: str | list[int]

    @property
    def max_new_tokens(self) -> int:
        return 16 if self.max_tokens is None else self.max_tokens  # OpenAI's default, also for null

    def prompt_ids(self, tokenizer) -> list[int]:
        """Token ids as given, or the text tokenized as the model's tokenizer does (special tokens added)."""
        return self.prompt if isinstance(self.prompt, list) else tokenizer(self.prompt)["input_ids"]

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            return prompt[0]
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                       and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
            return prompt
        raise ValueError("prompt must be a string, a list of one string, or a list of token ids; "
                         "send several prompts as several requests")

    _prompt_unicode = field_validator("prompt")(unicode_text)


def _content_part(part) -> dict:
    """A content part as {"type": "text", "text"} or {"type": "image_url", "url"}; ValueError otherwise."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return {"type": "text", "text": unicode_text(part["text"])}
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if isinstance(url, str) and url:
            return {"type": "image_url", "url": url}
        raise ValueError("an image_url part must be {'type': 'image_url', 'image_url': {'url': ...}}")
    raise ValueError("content must be a string or a list of {'type': 'text', 'text': ...} and "
                     "{'type': 'image_url', 'image_url': {'url': ...}} parts; audio and files are not supported")


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict]  # text, or text and image_url parts ({"type": "image_url", "url"}) with an image

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, content):
        if not isinstance(content, list):
            return content
        parts = [_content_part(p) for p in content]
        if all(p["type"] == "text" for p in parts):
            return "\n".join(p["text"] for p in parts)
        return parts

    @field_validator("content")
    @classmethod
    def _content_unicode(cls, content):
        return unicode_text(content) if isinstance(content, str) else content

    @property
    def image_urls(self) -> list[str]:
        return [p["url"] for p in self.content if p["type"] == "image_url"] if isinstance(self.content, list) else []

    def for_template(self) -> dict:
        """The message as chat templates take it ("developer" is OpenAI's new name for "system")."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class ChatCompletionRequest(RequestBase):
    PROMPT_FIELD: ClassVar[str] = "messages"
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def image_urls(self) -> list[str]:
        """The URLs of the messages' image_url parts, in order."""
        return [url for m in self.messages for url in m.image_urls]

    def prompt_ids(self, tokenizer) -> list[int]:
        """The conversation rendered with the tokenizer's chat template (or lorakit's fallback), tokenized."""
        try:
            text = render_chat(tokenizer, [m.for_template() for m in self.messages], add_generation_prompt=True)
        except Exception as err:  # templates raise what they like (jinja2 errors, ValueError)
            raise APIError(400, f"messages cannot be rendered with the model's chat template: {err}",
                           param="messages") from None
        return tokenizer(text, add_special_tokens=False)["input_ids"]


def _same(value, ok) -> bool:
    """Equal, without counting true/false as 1/0."""
    return value == ok and isinstance(value, bool) == isinstance(ok, bool)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Reply:
    """The response bodies of one request, whole or as stream chunks, for completions or chat."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _body(self, choices: list, chunk: bool, **extra) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def whole(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
        content = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        choice = {"index": 0, **content, "finish_reason": finish_reason, "logprobs": None}
        return self._body([choice], chunk=False, usage=usage(prompt_tokens, completion_tokens))

    def chunk(self, text: str | None, finish_reason: str | None = None) -> dict:
        """A piece of text, or (text None) the end of the choice; chat's first chunk also names the role."""
        if self.chat:
            delta = {} if text is None else {"content": text}
            content = {"delta": delta}
        else:
            content = {"text": text or ""}
        return self._body([{"index": 0, **content, "finish_reason": finish_reason, "logprobs": None}], chunk=True)

    def role_chunk(self) -> dict:
        return self._body([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                            "logprobs": None}], chunk=True)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return self._body([], chunk=True, usage=usage(prompt_tokens, completion_tokens))


class LoadAdapterRequest(BaseModel):
    """vLLM's POST /v1/load_lora_adapter body."""
    model_config = ConfigDict(strict=True, extra="ignore")
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapterRequest(BaseModel):
    """vLLM's POST /v1/unload_lora_adapter body (its lora_int_id is not used here)."""
    model_config = ConfigDict(strict=True, extra="ignore")
    lora_name: str = Field(min_length=1)
