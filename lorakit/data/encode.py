"""Examples -> token ids and labels, and batches of them.

Conversations are rendered with the tokenizer's chat template; a tokenizer without one gets
lorakit's fallback template:

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n<|assistant|>\\n{content}{eos}\\n

By default only the assistant turns carry a loss (label -100 elsewhere). A vision-language model's
conversations are rendered with its processor's chat template, and the processor turns each image into
pixel values and the model's image tokens (never a loss on those).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from lorakit.data.formats import Conversation, Example, Labelled, PlainText
from lorakit.data.multimodal import Multimodal, as_multimodal, load_image
from lorakit.memory.loss import IGNORE_INDEX

GENERATION_PROMPT = "<|assistant|>\n"


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int] | int  # per-token labels (causal LM) or one class id (classification)
    media: dict[str, torch.Tensor] = field(default_factory=dict)  # pixel_values (image_grid_thw), all images
    mm_token_type_ids: list[int] | None = None  # 1 at image tokens, for models that take it (Qwen2-VL)


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


def encode_multimodal(processor, example: Multimodal, train_on_prompt: bool) -> Encoded:
    """Render with the processor's chat template; each piece's images become pixels and image tokens."""
    if not getattr(processor, "chat_template", None):
        raise ValueError("the model's processor has no chat template, so where each image goes in the text "
                         "is unknown; save a processor with a chat template in the model folder")
    images = iter(example.images)
    ids, labels, token_types, media = [], [], [], {}
    for text, is_response in conversation_pieces(processor, example.messages):
        pictures = [load_image(next(images)) for _ in range(text.count(processor.image_token))]
        out = processor(text=[text], images=pictures or None, add_special_tokens=False, return_tensors="pt")
        piece = out["input_ids"][0].tolist()
        ids += piece
        learn = is_response or train_on_prompt
        labels += [t if learn and t != processor.image_token_id else IGNORE_INDEX for t in piece]
        token_types += out["mm_token_type_ids"][0].tolist() if "mm_token_type_ids" in out else []
        for key, value in out.items():
            if key not in ("input_ids", "attention_mask", "mm_token_type_ids"):
                media.setdefault(key, []).append(value)
    return Encoded(ids, labels, {key: torch.cat(values) for key, values in media.items()}, token_types or None)


def truncate(item: Encoded, max_length: int) -> Encoded:
    """The first max_length tokens (their labels and image markers too)."""
    types = item.mm_token_type_ids
    return dataclasses.replace(item, input_ids=item.input_ids[:max_length], labels=item.labels[:max_length],
                               mm_token_type_ids=types[:max_length] if types else None)


def check_room(item: Encoded, max_length: int, image_token_id: int, source: str) -> None:
    """Refuse a row with images that --max_length would cut inside an image or before any answer token."""
    cuts_image = image_token_id in item.input_ids[max_length:]
    if item.media and (cuts_image or all(label == IGNORE_INDEX for label in item.labels[1:max_length])):
        image_tokens = item.input_ids.count(image_token_id)
        raise ValueError(f"{source}: the row needs {len(item.input_ids)} tokens ({image_tokens} of them for its "
                         f"images), and --max_length {max_length} leaves no room for the answer; raise "
                         "--max_length or use fewer or smaller images")


def encode_text(tokenizer, example: PlainText) -> Encoded:
    ids = tokenizer(example.text)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]
    return Encoded(ids, list(ids))


def encode_examples(tokenizer, examples: list[tuple[Example, str]], max_length: int,
                    label_ids: dict[str, int] | None = None, train_on_prompt: bool = False,
                    processor=None) -> tuple[list[Encoded], EncodeReport]:
    """Encode (example, source) pairs, truncating to max_length and dropping rows left with no loss.
    With a vision-language model's `processor`, conversations go through it (images, its chat template)."""
    encoded, report = [], EncodeReport()
    for example, source in examples:
        if isinstance(example, Labelled):
            ids = tokenizer(example.text)["input_ids"]
            if len(ids) > max_length:
                report.truncated += 1
                ids = tokenizer(example.text, truncation=True, max_length=max_length)["input_ids"]
            encoded.append(Encoded(ids, label_ids[example.label]))
            continue
        item = encode_row(tokenizer, processor, example, source, train_on_prompt)
        if len(item.input_ids) > max_length:
            if processor is not None:
                check_room(item, max_length, processor.image_token_id, source)
            report.truncated += 1
            item = truncate(item, max_length)
        if all(label == IGNORE_INDEX for label in item.labels[1:]):
            report.dropped_all_masked.append(source)
            continue
        encoded.append(item)
    report.kept = len(encoded)
    return encoded, report


def encode_row(tokenizer, processor, example: Conversation | Multimodal | PlainText, source: str,
               train_on_prompt: bool) -> Encoded:
    """One SFT row as token ids and labels (with a processor, conversations with their images)."""
    if isinstance(example, Multimodal) and processor is None:
        raise ValueError(f"{source}: the row has images, but the model is text-only; train a vision-language "
                         "model (e.g. LLaVA, Qwen2-VL) on image rows, or drop the images")
    if processor is not None and isinstance(example, (Conversation, Multimodal)):
        example = as_multimodal(example.messages) if isinstance(example, Conversation) else example
        return encode_multimodal(processor, example, train_on_prompt)
    if isinstance(example, Conversation):
        return encode_conversation(tokenizer, example, train_on_prompt)
    return encode_text(tokenizer, example)


def loss_units(item: Encoded) -> int:
    """How many terms an example adds to the loss: predicted tokens, or 1 for a class label."""
    if isinstance(item.labels, int):
        return 1
    return sum(label != IGNORE_INDEX for label in item.labels[1:])


def collate(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels; the rows' images concatenated (pixel_values, ...)
    and their image markers padded, where the rows have them."""
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
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    for key in dict.fromkeys(key for item in items for key in item.media):
        batch[key] = torch.cat([item.media[key] for item in items if key in item.media])
    if any(item.mm_token_type_ids for item in items):
        batch["mm_token_type_ids"] = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            batch["mm_token_type_ids"][row, :len(item.input_ids)] = torch.tensor(
                item.mm_token_type_ids or [0] * len(item.input_ids))
    return batch
