"""Conversations with images (ms-swift's multimodal rows), checked where they are read; their images
opened (encode.encode_multimodal turns them into tokens and pixels with the model's processor).

    {"messages": [{"role": "user", "content": "<image>What is in the picture?"},
                  {"role": "assistant", "content": "A red square."}],
     "images": ["imgs/1.png"]}

Each `<image>` tag takes the next entry of "images": a path (relative to the data file) or a
`data:image/...;base64,` URL. Content may also be OpenAI-style parts: {"type": "text", "text"},
{"type": "image", "image": source} or {"type": "image_url", "image_url": {"url": source}}; an image
part without a source takes the next entry of "images".
"""
from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from pathlib import Path

from lorakit.data.loading import Row

IMAGE_TAG = "<image>"
URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
ImageSource = str | bytes  # a file path or data: URL, or the encoded image itself


@dataclass
class Multimodal:
    messages: list[dict]  # content as parts: {"type": "text", "text"} / {"type": "image"}
    images: list[ImageSource]  # one per image part, in order


def has_images(row: Row, messages: list[dict]) -> bool:
    """Whether a messages row is multimodal: it has an "images" column or content given as parts."""
    return row.data.get("images") is not None or any(isinstance(m["content"], list) for m in messages)


def refuse_videos(row: Row) -> None:
    """ms-swift's "videos" field is refused (naming the row): lorakit trains on images and text."""
    if row.data.get("videos"):
        raise ValueError(f"{row.source}: the row has 'videos'; lorakit trains on images and text only: drop the "
                         "videos, or give frames of them as images (with one <image> tag each)")


def to_multimodal(row: Row, messages: list[dict]) -> Multimodal:
    """The row's conversation as content parts and its images, each image checked (naming the row)."""
    listed = row.data.get("images") or []
    if isinstance(listed, (str, dict)):
        listed = [listed]
    if not isinstance(listed, list):
        raise ValueError(f"{row.source}: field 'images' should be a list of image paths, got {type(listed).__name__}")
    parts, sources, taken = [], [], 0
    for i, message in enumerate(messages):
        content = []
        for part in _content_parts(message["content"], row, i):
            if part["type"] == "image":
                source = part.get("source")
                if source is None:
                    if taken >= len(listed):
                        raise ValueError(f"{row.source}: more <image> tags (or image parts without a source) than "
                                         f"the {len(listed)} entries of 'images'; give one image per tag")
                    source, taken = listed[taken], taken + 1
                sources.append(check_image(source, row))
                part = {"type": "image"}
            content.append(part)
        parts.append({"role": message["role"], "content": content})
    if taken < len(listed):
        raise ValueError(f"{row.source}: {len(listed)} images but only {taken} <image> tags (or image parts without a "
                         "source); put an <image> tag where each image goes")
    return Multimodal(parts, sources)


def as_multimodal(messages: list[dict]) -> Multimodal:
    """A text-only conversation in content parts, for a processor's chat template."""
    return Multimodal([{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages], [])


def _content_parts(content: str | list, row: Row, index: int) -> list[dict]:
    """Text and image parts (an image part's "source" when it names one) of one message's content."""
    if isinstance(content, str):
        pieces = content.split(IMAGE_TAG)
        parts = [{"type": "text", "text": pieces[0]}]
        for text in pieces[1:]:
            parts += [{"type": "image"}, {"type": "text", "text": text}]
        return [p for p in parts if p["type"] == "image" or p["text"]]
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image":
            source = next((part[k] for k in ("image", "url", "path") if part.get(k) is not None), None)
            parts.append({"type": "image", "source": source})
        elif kind == "image_url":
            url = part.get("image_url")
            parts.append({"type": "image", "source": url.get("url") if isinstance(url, dict) else url})
        else:
            raise ValueError(f"{row.source}: messages[{index}].content[{j}] should be {{'type': 'text', 'text'}}, "
                             f"{{'type': 'image', 'image'}} or {{'type': 'image_url', 'image_url': {{'url'}}}}, "
                             f"got {part!r}")
    return parts


def check_image(source, row: Row) -> ImageSource:
    """The image's source, resolved (relative paths from the data file's folder) and opened once to check it."""
    if isinstance(source, dict):  # a `datasets` Image column: {"bytes", "path"}
        source = source.get("bytes") or source.get("path")
    if isinstance(source, str) and not source.startswith("data:"):
        if URL_SCHEME.match(source):
            raise ValueError(f"{row.source}: image {source!r} is a URL; lorakit reads no network: download it "
                             "and give its path (or a data:image/...;base64 URL)")
        path = Path(source).expanduser()
        source = str(path if path.is_absolute() or row.folder is None else row.folder / path)
        if not Path(source).is_file():
            raise ValueError(f"{row.source}: image file not found: {source}")
    elif not isinstance(source, (str, bytes)):
        raise ValueError(f"{row.source}: an image should be a path or a data: URL, got {type(source).__name__}")
    try:
        with _open(source) as image:
            image.verify()
    except (OSError, ValueError, SyntaxError) as err:
        shown = source if isinstance(source, str) and not source.startswith("data:") else "the image data"
        raise ValueError(f"{row.source}: {shown} is not an image PIL can read ({err})") from None
    return source


def _open(source: ImageSource):
    """The image file, data: URL or bytes, opened with PIL (not yet decoded)."""
    from PIL import Image

    if isinstance(source, bytes):
        return Image.open(io.BytesIO(source))
    if source.startswith("data:"):
        header, _, payload = source.partition(",")
        if not header.endswith(";base64"):
            raise ValueError("a data: URL must be base64 (data:image/png;base64,...)")
        try:
            return Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
        except binascii.Error as err:
            raise ValueError(f"bad base64 in the data: URL: {err}") from None
    return Image.open(source)


def load_image(source: ImageSource):
    """The image as an RGB PIL image."""
    with _open(source) as image:
        return image.convert("RGB")
