"""Examples -> token ids and labels, and batches of them.

Conversations are rendered with the tokenizer's chat template; a tokenizer without one gets
lorakit's fallback template:

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n<|assistant|>\\n{content}{eos}\\n

By default only the assistant turns carry a loss (label -100 elsewhere).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lorakit.data.formats import Conversation, Example, Labelled, PlainText
from lorakit.memory.loss import IGNORE_INDEX

GENERATION_PROMPT = "<|assistant|>\n"


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int] | int  # per-token labels (causal LM) or one class id (classification)


@dataclass
class EncodeReport:
    """What encoding did to a dataset: counted, never silent."""
    kept: int = 0
    truncated: int = 0
    dropped_all_masked: list[str] = field(default_factory=list)  # sources of the dropped rows


def fallback_template(messages: list[dict], add_generation_prompt: bool, eos: str) -> str:
    text = "".join(f"<|{m['role']}|>\n{m['content']}" + (eos if m["role"] == "assistant" else "") + "\n"
                   for m in messages)
    return text + (GENERATION_PROMPT if add_generation_prompt else "")


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The conversation as text, with the tokenizer's template or the fallback one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    text = fallback_template(messages, add_generation_prompt, tokenizer.eos_token or "")
    return (tokenizer.bos_token or "") + text


def conversation_pieces(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """(text, is_response) pieces whose concatenation is the rendered conversation."""
    pieces, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        full = render_chat(tokenizer, messages[:i + 1], add_generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError("the tokenizer's chat template does not render a conversation as a "
                             "prefix of its continuation, so prompt tokens cannot be masked; "
                             "use --train_on_prompt or a tokenizer with a plain template")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return pieces


def encode_conversation(tokenizer, conversation: Conversation, train_on_prompt: bool) -> Encoded:
    input_ids, labels = [], []
    for text, is_response in conversation_pieces(tokenizer, conversation.messages):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if (is_response or train_on_prompt) else [IGNORE_INDEX] * len(ids)
    return Encoded(input_ids, labels)


def encode_text(tokenizer, example: PlainText) -> Encoded:
    ids = tokenizer(example.text)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]
    return Encoded(ids, list(ids))


def encode_examples(tokenizer, examples: list[tuple[Example, str]], max_length: int,
                    label_ids: dict[str, int] | None = None,
                    train_on_prompt: bool = False) -> tuple[list[Encoded], EncodeReport]:
    """Encode (example, source) pairs, truncating to max_length and dropping rows left with no loss."""
    encoded, report = [], EncodeReport()
    for example, source in examples:
        if isinstance(example, Labelled):
            ids = tokenizer(example.text)["input_ids"]
            if len(ids) > max_length:
                report.truncated += 1
                ids = tokenizer(example.text, truncation=True, max_length=max_length)["input_ids"]
            encoded.append(Encoded(ids, label_ids[example.label]))
            continue
        item = (encode_conversation(tokenizer, example, train_on_prompt)
                if isinstance(example, Conversation) else encode_text(tokenizer, example))
        if len(item.input_ids) > max_length:
            report.truncated += 1
            item = Encoded(item.input_ids[:max_length], item.labels[:max_length])
        if all(label == IGNORE_INDEX for label in item.labels[1:]):
            report.dropped_all_masked.append(source)
            continue
        encoded.append(item)
    report.kept = len(encoded)
    return encoded, report


def loss_units(item: Encoded) -> int:
    """How many terms an example adds to the loss: predicted tokens, or 1 for a class label."""
    if isinstance(item.labels, int):
        return 1
    return sum(label != IGNORE_INDEX for label in item.labels[1:])


def collate(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels."""
    width = max(len(item.input_ids) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        input_ids[row, :len(item.input_ids)] = torch.tensor(item.input_ids)
        attention_mask[row, :len(item.input_ids)] = 1
    if isinstance(items[0].labels, int):
        labels = torch.tensor([item.labels for item in items])
    else:
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        for row, item in enumerate(items):
            labels[row, :len(item.labels)] = torch.tensor(item.labels)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
