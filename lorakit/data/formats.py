"""Dataset row formats -> one of four example kinds: a conversation (with images: Multimodal), plain
text, or text + label.

    alpaca          {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}
    messages        {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
                    (ShareGPT's {"conversations": [{"from": "human"|"gpt", "value"}]} too);
                    with "images" (and <image> tags) or content parts: Multimodal (multimodal.py)
    text            {"text"}                       causal-LM loss on every token
    classification  {"text" (or "sentence"), "label"}
"""
from __future__ import annotations

from dataclasses import dataclass

from lorakit.data.loading import Row
from lorakit.data.multimodal import Multimodal, has_images, refuse_videos, to_multimodal

FORMATS = ("alpaca", "messages", "text", "classification")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


@dataclass
class Conversation:
    messages: list[dict]  # [{"role", "content"}], at least one assistant turn


@dataclass
class PlainText:
    text: str


@dataclass
class Labelled:
    text: str
    label: str


Example = Conversation | Multimodal | PlainText | Labelled


def detect_format(row: Row) -> str:
    """The format a row's columns say it is in."""
    keys = set(row.data)
    if keys & {"messages", "conversations"}:
        return "messages"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if keys & {"text", "sentence"} and "label" in keys:
        return "classification"
    if "text" in keys:
        return "text"
    raise ValueError(f"{row.source}: cannot tell the dataset format from the columns {sorted(keys)}; "
                     "expected alpaca (instruction, input, output), messages (messages), "
                     "text (text) or classification (text, label); or set --dataset_format")


def to_example(row: Row, fmt: str) -> Example:
    """Convert one row of format `fmt`, naming the row and field when something is missing."""
    return {"alpaca": _alpaca, "messages": _messages, "text": _text,
            "classification": _labelled}[fmt](row)


def _field(row: Row, name: str, fmt: str, *, types=(str,), optional: bool = False, default=None):
    value = row.data.get(name)
    if value is None:
        if optional:
            return default
        if name in row.data:
            raise ValueError(f"{row.source}: field {name!r} is empty, needed by the {fmt} format")
        raise ValueError(f"{row.source}: missing field {name!r}, needed by the {fmt} format "
                         f"(row has {sorted(row.data)})")
    if not isinstance(value, types):
        raise ValueError(f"{row.source}: field {name!r} should be "
                         f"{' or '.join(t.__name__ for t in types)}, got {type(value).__name__}")
    return value


def _alpaca(row: Row) -> Conversation:
    instruction = _field(row, "instruction", "alpaca")
    extra = _field(row, "input", "alpaca", optional=True, default="")
    output = _field(row, "output", "alpaca")
    system = _field(row, "system", "alpaca", optional=True)
    history = _field(row, "history", "alpaca", types=(list,), optional=True, default=[])
    messages = [{"role": "system", "content": system}] if system else []
    for turn in history:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise ValueError(f"{row.source}: each history entry must be [user, assistant] strings, "
                             f"got {turn!r}")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return Conversation(messages)


def _messages(row: Row) -> Conversation | Multimodal:
    key = "messages" if "messages" in row.data else "conversations"
    raw = _field(row, key, "messages", types=(list,))
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise ValueError(f"{row.source}: {key}[{i}] should be an object with role and content")
        role = message.get("role", SHAREGPT_ROLES.get(message.get("from")))
        content = message.get("content", message.get("value"))
        if role not in ("system", "user", "assistant") or not isinstance(content, (str, list)):
            raise ValueError(f"{row.source}: {key}[{i}] needs a role (system, user or assistant) "
                             f"and a content (a string, or a list of content parts), got {message!r}")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{row.source}: the conversation has no assistant message to learn from")
    if messages[0]["role"] == "assistant":
        raise ValueError(f"{row.source}: the conversation starts with an assistant message; "
                         "it should start with a system or user message")
    refuse_videos(row)
    return to_multimodal(row, messages) if has_images(row, messages) else Conversation(messages)


def _text(row: Row) -> PlainText:
    return PlainText(_field(row, "text", "text"))


def _labelled(row: Row) -> Labelled:
    name = "sentence" if "sentence" in row.data and "text" not in row.data else "text"
    text = _field(row, name, "classification")
    label = _field(row, "label", "classification", types=(str, int, bool))
    return Labelled(text, str(label))
