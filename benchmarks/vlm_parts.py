"""Which parts of a vision-language model to train: LoRA on the language model only, + the projector,
+ the vision encoder, or all three, on a task whose answer depends on the image.

Task: a 32x32 image with one shape (square / circle / triangle) in one colour (red / green / blue), drawn
with PIL at a random size and place (colours jittered); the question "What shape and colour?"; the answer
e.g. "a red circle". 9 classes; a train split and a held-out split drawn with other seeds. Accuracy is the
exact match of the greedy answer (up to 5 new tokens, EOS ends it) on the held-out split.

Model: a small LLaVA (CLIP vision tower 32x32 images in 8x8 patches -> 16 image tokens, MLP projector,
Llama), built from a config with random weights (no download), with a word-level tokenizer over the task's
words and a LLaVA-style chat template, saved as a model folder that `lorakit train` reads. Every row trains
through lorakit's trainer (`lorakit.train.loop.train`) with the same steps, batch, learning rate, rank and
seed; only the --freeze_* flags differ. fp32 (--bf16 false) on the CPU.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vlm_parts.py            # the table in docs/vlm.md
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vlm_parts.py --steps 20  # smoke test

Writes benchmarks/results/vlm_parts.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ("square", "circle", "triangle")
COLOURS = {"red": (215, 35, 35), "green": (35, 180, 50), "blue": (40, 60, 215)}
QUESTION = "What shape and colour?"
IMAGE_SIZE, PATCH = 32, 8
ROWS = {  # name -> --freeze_* flags (the language model always trains)
    "language model only": {},
    "+ projector": {"freeze_aligner": "false"},
    "+ vision encoder": {"freeze_vit": "false"},
    "all three (LM + projector + vision)": {"freeze_aligner": "false", "freeze_vit": "false"},
}
TEMPLATE = ("{% for m in messages %}{{ m['role'] | upper }}: {% if m['content'] is string %}{{ m['content'] }}"
            "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<image> {% else %}{{ p['text'] }}"
            "{% endif %}{% endfor %}{% endif %}{% if m['role'] == 'assistant' %} </s>{% endif %} {% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT: {% endif %}")


def draw(shape: str, colour: str, rng: random.Random):
    """One image: the shape in the colour (jittered), random size and place, on a light background."""
    from PIL import Image, ImageDraw

    grey = rng.randint(225, 255)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (grey, grey, grey))
    size = rng.randint(14, 24)
    x0, y0 = rng.randint(1, IMAGE_SIZE - size - 1), rng.randint(1, IMAGE_SIZE - size - 1)
    fill = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in COLOURS[colour])
    box = [x0, y0, x0 + size, y0 + size]
    pen = ImageDraw.Draw(image)
    if shape == "square":
        pen.rectangle(box, fill=fill)
    elif shape == "circle":
        pen.ellipse(box, fill=fill)
    else:
        pen.polygon([(x0 + size / 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=fill)
    return image


def make_split(folder: Path, per_class: int, seed: int) -> list[dict]:
    """per_class images of each of the 9 (shape, colour) classes in folder, as ms-swift rows."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(per_class):
        for shape in SHAPES:
            for colour in COLOURS:
                path = folder / f"{shape}-{colour}-{i}.png"
                draw(shape, colour, rng).save(path)
                rows.append({"messages": [{"role": "user", "content": f"<image>{QUESTION}"},
                                          {"role": "assistant", "content": f"a {colour} {shape}"}],
                             "images": [str(path)], "answer": f"a {colour} {shape}"})
    rng.shuffle(rows)
    return rows


def save_model(folder: Path, seed: int = 0) -> str:
    """A small random LLaVA with a word-level tokenizer and a LLaVA-style processor, saved in folder."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "USER:", "ASSISTANT:", "SYSTEM:", "What", "shape", "and",
             "colour?", "a", *SHAPES, *COLOURS]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                           pad_token="<pad>", unk_token="<unk>",
                                           additional_special_tokens=["<image>"])
    image_processor = tf.LlavaImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                                crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = tf.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                                  num_additional_image_tokens=1, vision_feature_select_strategy="default",
                                  chat_template=TEMPLATE)
    processor.save_pretrained(str(folder))
    torch.manual_seed(seed)
    width = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_hidden_layers=3)
    config = tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, **width),
        text_config=tf.LlamaConfig(vocab_size=len(words), num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                   eos_token_id=2, max_position_embeddings=128, **width),
        image_token_id=words.index("<image>"), vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu")
    tf.LlavaForConditionalGeneration(config).save_pretrained(str(folder))
    return str(folder)


@torch.no_grad()
def accuracy(model, processor, rows: list[dict], batch: int = 30) -> float:
    """Exact match of the greedy answer (up to 5 new tokens; EOS ends it) on rows."""
    from PIL import Image

    processor.tokenizer.padding_side = "left"
    model.eval()
    right = 0
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                          {"type": "text", "text": QUESTION}]}],
                                           tokenize=False, add_generation_prompt=True)
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        images = [Image.open(r["images"][0]).convert("RGB") for r in chunk]
        inputs = processor(text=[prompt] * len(chunk), images=images, padding=True, add_special_tokens=False,
                           return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
        answers = processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        right += sum(a.strip() == r["answer"] for a, r in zip(answers, chunk))
    return right / len(rows)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    bf16 = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx512_bf16", "amx_bf16"))
    return (f"{os.cpu_count()}-core {cpu} CPU ({bf16}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s) (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--train_per_class", type=int, default=40)
    parser.add_argument("--test_per_class", type=int, default=10)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), help="which rows to run (names as in the table)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/vlm_parts.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import lorakit
    from lorakit.train import loop
    from lorakit.train.args import parse_train_args

    work = Path(tempfile.mkdtemp(prefix="vlm-parts-"))
    base = save_model(work / "llava")
    train_rows = make_split(work / "train", args.train_per_class, seed=1)
    test_rows = make_split(work / "test", args.test_per_class, seed=2)
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps({k: r[k] for k in ("messages", "images")}) + "\n" for r in train_rows))
    processor = AutoProcessor.from_pretrained(base)
    untrained = AutoModelForImageTextToText.from_pretrained(base)
    before = accuracy(untrained, processor, test_rows)
    print(f"{machine()}\nmodel: random LLaVA, {sum(p.numel() for p in untrained.parameters()):,} parameters; "
          f" {len(train_rows)} train / {len(test_rows)} held-out images; accuracy before training "
          f"{before:.3f} (chance 1/9 = 0.111)", flush=True)
    results = []
    for name in args.rows:
        out = work / f"out-{len(results)}"
        flags = {"model": base, "dataset": str(data), "output_dir": str(out), "max_steps": args.steps,
                 "per_device_train_batch_size": args.batch, "learning_rate": args.lr, "lora_rank": args.rank,
                 "lora_alpha": 2 * args.rank, "bf16": "false", "val_split_ratio": 0, "report_to": "none",
                 "save_steps": 10 ** 6, "logging_steps": 50, "seed": 7, "warmup_ratio": 0.05, **ROWS[name]}
        started = time.perf_counter()
        final = loop.train(parse_train_args([p for k, v in flags.items() for p in (f"--{k}", str(v))]))
        wall = time.perf_counter() - started
        model = lorakit.PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), str(out))
        after = accuracy(model, processor, test_rows)
        train_acc = accuracy(model, processor, train_rows[:90])
        row = {"row": name, "trainable_params": final["trainable_params"], "total_params": final["total_params"],
               "s_per_step": final["train_runtime_s"] / final["global_step"], "train_wall_s": round(wall, 1),
               "accuracy_before": before, "accuracy_after": after, "train_accuracy_after_90": train_acc}
        results.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{args.steps} steps x batch {args.batch}, lr {args.lr}, LoRA r={args.rank} alpha={2 * args.rank} "
          "all-linear in the open parts, fp32\n")
    print("| trained parts | trainable params | s/step | held-out accuracy before | after | train accuracy after |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['row']} | {r['trainable_params']:,} | {r['s_per_step']:.3f} | {r['accuracy_before']:.3f} | "
              f"{r['accuracy_after']:.3f} | {r['train_accuracy_after_90']:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine(), "args": vars(args), "rows": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
