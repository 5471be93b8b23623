"""`lorakit infer`: generate from a base model + adapter, or predict labels with a classifier adapter."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from lorakit.data.encode import render_chat
from lorakit.data.loading import Row, read_rows, read_text
from lorakit.data.multimodal import IMAGE_TAG, check_image, load_image, to_multimodal


@dataclass
class InferArgs:
    adapter: Optional[str] = field(default=None, metadata={"help": (
        "Output folder of `lorakit train` (a PEFT adapter, or a fully fine-tuned model).")})
    model: Optional[str] = field(default=None, metadata={"help": (
        "Base model folder or hub id; default: the adapter's base_model_name_or_path.")})
    prompt: list[str] = field(default_factory=list, metadata={"help": "Prompt text (repeatable)."})
    image: list[str] = field(default_factory=list, metadata={"help": (
        "An image file for a vision-language model (repeatable); every prompt gets these images. <image> tags "
        "in a prompt place them, in order (as many tags as images); a prompt without tags gets the images "
        "before its text.")})
    prompts_file: Optional[str] = field(default=None, metadata={"help": (
        "A .txt file (one prompt per line) or a dataset file (.jsonl/.json/.csv/.parquet) with a "
        "prompt, instruction or text column; stdin when neither this nor --prompt is given.")})
    output_file: Optional[str] = field(default=None, metadata={"help": "Also write results as JSONL here."})
    raw: bool = field(default=False, metadata={"help": "Feed prompts as they are, without the chat template."})
    system: Optional[str] = field(default=None, metadata={"help": (
        "System prompt; default: the --system the adapter was trained with (its run_config.yaml).")})
    max_new_tokens: int = 128
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 42
    batch_size: int = 8
    torch_dtype: str = field(default="auto", metadata={"help": (
        "dtype to run the model in: auto (bfloat16 on a GPU or on a CPU with a bf16 matrix unit, AMX or "
        "AVX-512-BF16; else float32), float32, bfloat16 or float16."),
        "choices": ["auto", "float32", "bfloat16", "float16"]})

    def __post_init__(self) -> None:
        if not self.adapter and not self.model:
            raise ValueError("give --adapter (a lorakit train output folder) and/or --model")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("--batch_size and --max_new_tokens must be >= 1")


def parse_infer_args(argv: list[str]) -> InferArgs:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(InferArgs, prog="lorakit infer",
                              description="Generate with a base model + LoRA adapter, or classify.")
    return parser.parse_args_into_dataclasses(argv)[0]


def read_prompts(args: InferArgs) -> list[dict]:
    """[{"text": prompt, "label"?: gold label}] from --prompt, --prompts_file or stdin."""
    if args.prompt:
        return [{"text": p} for p in args.prompt]
    if args.prompts_file and args.prompts_file.endswith(".txt"):
        lines = read_text(Path(args.prompts_file)).splitlines()
        return [{"text": line} for line in lines if line.strip()]
    if args.prompts_file:
        items = []
        for row in read_rows(args.prompts_file):
            text = next((row.data[k] for k in ("prompt", "instruction", "text", "sentence") if k in row.data), None)
            if not isinstance(text, str):
                raise ValueError(f"{row.source}: no prompt, instruction or text field")
            if row.data.get("input"):
                text = f"{text}\n\n{row.data['input']}"
            items.append({"text": text, **({"label": str(row.data["label"])} if "label" in row.data else {})})
        return items
    if sys.stdin.isatty():
        raise ValueError("no prompts: give --prompt, --prompts_file, or pipe prompts on stdin")
    return [{"text": line} for line in sys.stdin.read().splitlines() if line.strip()]


def read_json(path: Path):
    """A JSON file of the adapter folder, or an error naming it."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None


def trained_system(adapter: Optional[str]) -> Optional[str]:
    """The --system an adapter was trained with (from its run_config.yaml), if any."""
    from lorakit.model.adapter_files import read_run_config

    return read_run_config(adapter).get("system") if adapter else None


def load_for_inference(args: InferArgs):
    """(model, tokenizer, labels) from the adapter folder (and its base model); a vision-language model's
    tokenizer is its processor (the adapter folder's, where training saved it)."""
    from lorakit.io.pretrained import (
        is_vision_language,
        load_config,
        load_model,
        load_processor,
        load_tokenizer,
        resolve_model_path,
    )
    from lorakit.model.peft_model import PeftModel
    from lorakit.precision import inference_dtype

    adapter = Path(args.adapter) if args.adapter else None
    if adapter is not None and not adapter.is_dir():
        raise FileNotFoundError(f"--adapter folder not found: {adapter}")
    labels_file = adapter / "labels.json" if adapter else None
    labels = read_json(labels_file) if labels_file and labels_file.is_file() else []
    task = "seq_cls" if labels else "causal_lm"
    is_peft = adapter is not None and (adapter / "adapter_config.json").is_file()
    if is_peft:
        base = args.model or read_json(adapter / "adapter_config.json").get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{adapter}/adapter_config.json names no base model; pass --model")
    else:
        base = args.model if adapter is None else str(adapter)
    base_path = resolve_model_path(base)
    vision = is_vision_language(load_config(base_path))
    if args.image and (task != "causal_lm" or not vision):
        raise ValueError(f"--image needs a vision-language model (a config with a vision_config); {base} is "
                         f"{'a classifier' if task != 'causal_lm' else 'text-only'}")
    saved = "processor_config.json" if vision else "tokenizer_config.json"
    folder = str(adapter) if adapter and (adapter / saved).is_file() else base_path
    tokenizer = load_processor(folder) if vision and task == "causal_lm" else load_tokenizer(folder)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(base_path, task, labels, inference_dtype(args.torch_dtype, device))
    if is_peft:
        model = PeftModel.from_pretrained(model, str(adapter))
    return model.to(device).eval(), tokenizer, labels


def check_room(model, tokenizer, texts: list[str], args: InferArgs, lengths: list[int] | None = None,
               first: int = 0) -> None:
    """Refuse, before generating, a prompt that leaves no room for --max_new_tokens in the model's positions
    (`lengths`: the prompts' token counts when known, with their image tokens; `first`: the first's index)."""
    from lorakit.io.pretrained import position_limit

    limit = position_limit(model.config)
    if limit is None:
        return
    if lengths is None:
        lengths = [len(tokenizer(text, add_special_tokens=args.raw)["input_ids"]) for text in texts]
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    if lengths[longest] + args.max_new_tokens > limit[0]:
        raise ValueError(f"prompt {first + longest + 1} has {lengths[longest]} tokens; with --max_new_tokens "
                         f"{args.max_new_tokens} that passes the model's {limit[0]} positions ({limit[1]}): "
                         "shorten it or lower --max_new_tokens")


@torch.no_grad()
def classify(model, tokenizer, labels: list[str], items: list[dict], batch_size: int) -> list[dict]:
    from lorakit.io.pretrained import position_limit

    results, limit = [], position_limit(model.config)
    device = next(model.parameters()).device
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        batch = tokenizer([it["text"] for it in chunk], padding=True, truncation=True,
                          max_length=limit[0] if limit else None, return_tensors="pt").to(device)
        probs = model(**batch).logits.float().softmax(-1)
        for item, row in zip(chunk, probs):
            best = int(row.argmax())
            results.append({**item, "predicted": labels[best], "score": round(float(row[best]), 4)})
    return results


def check_images(args: InferArgs) -> list[str]:
    """The --image files, each checked (missing, not an image) before any model is loaded."""
    return [check_image(path, Row({}, "--image")) for path in args.image]


def image_messages(text: str, number: int, head: list[dict], images: list[str]) -> list[dict]:
    """The chat of one prompt as content parts, its images placed by its <image> tags (or before its text)."""
    tags = text.count(IMAGE_TAG)
    if tags and tags != len(images):
        raise ValueError(f"prompt {number} has {tags} {IMAGE_TAG} tags but {len(images)} --image files were "
                         f"given; put one {IMAGE_TAG} tag where each image goes (or none: the images go first)")
    if images and not tags:
        text = IMAGE_TAG * len(images) + text
    messages = [*head, {"role": "user", "content": text}]
    return to_multimodal(Row({"images": images}, f"prompt {number}"), messages).messages


@torch.no_grad()
def generate(model, tokenizer, items: list[dict], args: InferArgs, images: list[str]) -> list[dict]:
    """Generated completions; with a vision-language model's processor (as `tokenizer`), prompts are rendered
    with its chat template as content parts, and the --image files (`images`, as check_images gave them) go
    through it too."""
    processor = tokenizer if hasattr(tokenizer, "image_token_id") else None
    if processor is not None:
        processor.tokenizer.padding_side = "left"
        tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    torch.manual_seed(args.seed)
    system = args.system if args.system is not None else trained_system(args.adapter)
    head = [{"role": "system", "content": system}] if system else []
    if processor is not None:
        if args.raw and images:
            raise ValueError("--raw feeds prompts without the chat template, which is what places the images; "
                             "leave out --raw with --image")
        parts_head = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in head]
        texts = [it["text"] if args.raw else
                 render_chat(processor, image_messages(it["text"], i + 1, parts_head, images),
                             add_generation_prompt=True) for i, it in enumerate(items)]
        pictures = [load_image(path) for path in images]
    else:
        texts = [it["text"] if args.raw else
                 render_chat(tokenizer, [*head, {"role": "user", "content": it["text"]}], add_generation_prompt=True)
                 for it in items]
    check_room(model, tokenizer, texts, args)
    results = []
    for start in range(0, len(items), args.batch_size):
        chunk = items[start:start + args.batch_size]
        if processor is not None:  # each prompt's images expand to the model's image tokens here
            batch = processor(text=texts[start:start + args.batch_size], images=pictures * len(chunk) or None,
                              padding=True, add_special_tokens=args.raw, return_tensors="pt").to(device)
            batch = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in batch.items()}
            check_room(model, tokenizer, [], args, batch["attention_mask"].sum(-1).tolist(), start)
        else:
            batch = tokenizer(texts[start:start + args.batch_size], padding=True, add_special_tokens=args.raw,
                              return_tensors="pt").to(device)
        sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.do_sample \
            else {"do_sample": False}
        out = model.generate(**batch, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             **sampling)
        for item, ids in zip(chunk, out[:, batch["input_ids"].shape[1]:]):
            results.append({**item, "completion": tokenizer.decode(ids, skip_special_tokens=True)})
    return results


def run_infer(args: InferArgs) -> list[dict]:
    items = read_prompts(args)
    images = check_images(args)
    if args.output_file:  # before any loading, not after generating
        try:
            open(args.output_file, "a").close()
        except OSError as err:
            raise ValueError(f"--output_file {args.output_file} cannot be written: {err.strerror}") from None
    model, tokenizer, labels = load_for_inference(args)
    results = (classify(model, tokenizer, labels, items, args.batch_size) if labels
               else generate(model, tokenizer, items, args, images))
    for result in results:
        if labels:
            print(f"{result['predicted']}\t{result['score']:.3f}\t{result['text']}")
        else:
            print(f"### {result['text']}\n{result['completion']}\n")
    gold = [r for r in results if "label" in r and "predicted" in r]
    if gold:
        accuracy = sum(r["label"] == r["predicted"] for r in gold) / len(gold)
        print(f"accuracy on {len(gold)} labelled rows: {accuracy:.4f}", file=sys.stderr)
    if args.output_file:
        with open(args.output_file, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    return results
