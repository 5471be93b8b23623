"""Images in chat requests (OpenAI's `image_url` content parts) on a vision-language base model.

A part's URL is decoded and checked here: a `data:image/...;base64,` URL, or an http(s) URL only when
the server was started with --allow_remote_images (refused with a 400 otherwise). The conversation goes
through the model's processor (its chat template, its image tokens and pixels), as `lorakit train`
encodes it. At the prefill, each request's images are encoded by the vision tower and projector with
that request's adapter (`AdapterBank.every_row`: the encoder's batch is the request's images, not the
batch's rows); the features go into the language model's prefill as `mm_encoder_outputs`, so image
rows and text rows prefill and decode together through the bank.

Served: LLaVA-family bases (llava, llava_next), whose image tokens take ordinary positions, and Qwen2-VL
(qwen2_vl, qwen2_5_vl), whose M-RoPE positions (three per image token, from the image's grid) the
scheduler builds with mrope.py. Another vision-language base's image requests are refused with a 400.
"""
from __future__ import annotations

import base64
import binascii
import io
import re

import torch

from lorakit.serve.protocol import APIError

MAX_IMAGES = 8  # per request
MAX_IMAGE_BYTES = 20 << 20  # an encoded image (data: URL payload or download)
MAX_IMAGE_PIXELS = 4096 * 4096  # width x height, checked before the pixels are decoded
REMOTE_TIMEOUT_S = 10.0
SERVED_FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
_DATA_URL = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,", re.IGNORECASE)


def image_support(model, processor) -> str | None:
    """None when image requests can be served on this base model; else why not (for a 400)."""
    model_type = getattr(model.config, "model_type", None)
    if processor is None:
        return f"the base model ({model_type}) is text-only; image content parts need a vision-language model"
    if model_type not in SERVED_FAMILIES:
        return (f"images are served for LLaVA- and Qwen2-VL-family bases ({', '.join(SERVED_FAMILIES)}); "
                f"{model_type!r} is not one of them (lorakit infer --image runs it)")
    return None


def _error(message: str, code: str = "invalid_image") -> APIError:
    return APIError(400, message, param="messages", code=code)


def decode_image(url: str, allow_remote: bool = False):
    """The image a content part's URL holds, as an RGB PIL image; an APIError (400) saying what is wrong."""
    from PIL import Image

    shown = url if len(url) <= 80 else url[:77] + "..."
    if url.startswith("data:"):
        match = _DATA_URL.match(url)
        if match is None:
            raise _error(f"image_url {shown!r}: a data: URL must be base64 (data:image/png;base64,...)")
        payload = url[match.end():]
        if len(payload) * 3 // 4 > MAX_IMAGE_BYTES:
            raise _error(f"an image is over {MAX_IMAGE_BYTES >> 20} MiB", code="image_too_large")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as err:
            raise _error(f"image_url {shown!r}: bad base64 ({err})") from None
    elif re.match(r"^https?://", url, re.IGNORECASE):
        if not allow_remote:
            raise _error(f"image_url {shown!r} is a remote URL; this server fetches no images (start it with "
                         "--allow_remote_images to allow that): send the image inline as a "
                         "data:image/...;base64 URL", code="image_url_not_allowed")
        data = _download(url, shown)
    else:
        raise _error(f"image_url {shown!r}: give a data:image/...;base64 URL (or an http(s) URL where the server "
                     "allows remote images)", code="image_url_not_allowed")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise _error(f"an image is {width}x{height} pixels; this server takes at most {MAX_IMAGE_PIXELS} "
                         "pixels per image", code="image_too_large")
        return image.convert("RGB")
    except APIError:
        raise
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        raise _error(f"image_url {shown!r} is not an image this server can read ({type(err).__name__}: {err})") \
            from None


def _download(url: str, shown: str) -> bytes:
    """An http(s) image, at most MAX_IMAGE_BYTES, within REMOTE_TIMEOUT_S (only with --allow_remote_images)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=REMOTE_TIMEOUT_S) as response:  # noqa: S310 (http(s) checked)
            data = response.read(MAX_IMAGE_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise _error(f"image_url {shown!r} could not be fetched ({err})", code="image_fetch_failed") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise _error(f"an image is over {MAX_IMAGE_BYTES >> 20} MiB", code="image_too_large")
    return data


def chat_inputs(processor, messages: list[dict], allow_remote: bool = False) -> tuple[list[int], dict | None]:
    """(prompt token ids, the prefill's media: pixel_values, ... or None) of a chat, rendered with the
    processor's chat template as content parts (as `lorakit train` renders a vision-language model's rows).
    `messages`: ChatMessage.for_template() dicts, whose content is a string or text / image_url parts."""
    from lorakit.data.encode import render_chat

    parts, urls = [], []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        rendered = []
        for part in content:
            if part["type"] == "image_url":
                urls.append(part["url"])
                rendered.append({"type": "image"})
            else:
                rendered.append({"type": "text", "text": part["text"]})
        parts.append({"role": message["role"], "content": rendered})
    if len(urls) > MAX_IMAGES:
        raise _error(f"the request has {len(urls)} images; this server takes at most {MAX_IMAGES}",
                     code="too_many_images")
    images = [decode_image(url, allow_remote) for url in urls]
    try:
        text = render_chat(processor, parts, add_generation_prompt=True)
    except Exception as err:  # templates raise what they like (jinja2 errors, ValueError)
        raise APIError(400, f"messages cannot be rendered with the model's chat template: {err}",
                       param="messages") from None
    if text.count(processor.image_token) != len(images):
        raise _error(f"the rendered conversation has {text.count(processor.image_token)} image tokens "
                     f"({processor.image_token!r}) for {len(images)} images; the image token may appear in text "
                     "only where an image_url part put it")
    out = processor(text=[text], images=images or None, add_special_tokens=False, return_tensors="pt")
    media = {key: value for key, value in out.items()
             if key not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    return out["input_ids"][0].tolist(), media or None


@torch.no_grad()
def prefill_inputs(bank, requests: list) -> dict:
    """Extra model inputs for the prefill of `requests` (in batch-row order): {} when none has images, else
    `mm_encoder_outputs` holding every image's features in row order, each request's computed with its
    own adapter (the vision tower's and projector's LoRA included)."""
    if not any(getattr(r, "media", None) for r in requests):
        return {}
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    model = bank.model
    device = next(model.parameters()).device
    features = []
    for request in requests:
        if not request.media:
            continue
        media = {k: v.to(device, model.dtype) if v.is_floating_point() else v.to(device)
                 for k, v in request.media.items()}
        with bank.every_row(request.adapter):
            features += list(model.model.get_image_features(**media, return_dict=True).pooler_output)
    return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=features)}}
