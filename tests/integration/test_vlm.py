"""`lorakit train` on vision-language models: the parts the freeze flags open get adapters (an explicit
module list PEFT reloads with the same logits), their learning rates, QLoRA, and the errors."""
import json

import pytest
import torch

from helpers import (
    build_vlm,
    quick_args,
    randomize,
    save_tiny_vlm,
    vlm_dataset,
    vlm_image_processor,
    write_images,
    write_jsonl,
)
from lorakit.cli import main
from lorakit.data import load_examples
from lorakit.data.encode import collate, encode_examples
from lorakit.families import VLM_PARTS
from lorakit.io.pretrained import load_model, load_processor
from lorakit.model.targeting import vlm_part
from lorakit.train.args import parse_train_args
from lorakit.train.model import prepare_model
from lorakit.train.optim import param_groups

LLAVA_PARTS = {"llm": "model.language_model.", "vit": "model.vision_tower.", "aligner": "model.multi_modal_projector."}


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> str:
    return save_tiny_vlm(tmp_path_factory.mktemp("tiny-llava"), "llava")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> str:
    return save_tiny_vlm(tmp_path_factory.mktemp("tiny-qwen2-vl"), "qwen2_vl")


@pytest.fixture(scope="module")
def vlm_file(tmp_path_factory) -> str:
    return vlm_dataset(tmp_path_factory.mktemp("vlm-data"))


def image_batch(model_dir: str, data_file: str) -> dict[str, torch.Tensor]:
    """The first three rows of `data_file` as lorakit encodes them (pixel_values included), no labels."""
    processor = load_processor(model_dir)
    items, _ = encode_examples(processor.tokenizer, load_examples([data_file])[0][:3], 512, processor=processor)
    batch = collate(items, processor.tokenizer.pad_token_id)
    batch.pop("labels")
    return batch


def adapted_parts(folder, arch: str = "llava") -> set[str]:
    """The parts whose modules the saved adapter's config names."""
    targets = json.loads((folder / "adapter_config.json").read_text())["target_modules"]
    return {vlm_part(t, VLM_PARTS[arch]) for t in targets}


def assert_peft_reloads(model_dir: str, data_file: str, adapter) -> None:
    """PEFT and lorakit reload the adapter over the base with the same logits on an image batch, which
    differ from the base's."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    import lorakit

    batch = image_batch(model_dir, data_file)
    with torch.no_grad():
        base = AutoModelForImageTextToText.from_pretrained(model_dir)(**batch).logits
        theirs = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(model_dir), str(adapter))
        ours = lorakit.PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(model_dir), str(adapter))
        want = theirs.eval()(**batch).logits
        torch.testing.assert_close(ours.eval()(**batch).logits, want)
    assert not torch.allclose(base, want)


@pytest.mark.parametrize("flags, parts", [
    ({}, {"llm"}),
    ({"freeze_vit": "false", "freeze_aligner": "false"}, {"llm", "vit", "aligner"}),
    pytest.param({"freeze_llm": "true", "freeze_vit": "false"}, {"vit"}, marks=pytest.mark.slow),
])
def test_llava_trains_the_open_parts_and_peft_reloads_it(llava_dir, vlm_file, tmp_path, flags, parts):
    out = tmp_path / "out"
    assert main(["train", *quick_args(llava_dir, vlm_file, out, max_steps=3, **flags)]) == 0
    assert adapted_parts(out) == parts
    assert (out / "processor_config.json").is_file() and (out / "chat_template.jinja").is_file()
    assert_peft_reloads(llava_dir, vlm_file, out)


def test_trainable_counts_per_part_in_the_run_log(llava_dir, vlm_file, tmp_path, capsys):
    flags = {"freeze_aligner": "false", "lora_rank": 2}
    assert main(["train", *quick_args(llava_dir, vlm_file, tmp_path / "out", max_steps=1, **flags)]) == 0
    # rank 2 on the two projector Linears (32->32->32): 2 * 2 * (32 + 32)
    assert "trainable by part: vit 0, aligner 256, llm " in capsys.readouterr().out


def test_vit_and_aligner_learning_rates_are_their_own_groups(llava_dir):
    args = parse_train_args(["--freeze_vit", "false", "--freeze_aligner", "false", "--learning_rate", "1e-4",
                             "--vit_lr", "1e-5", "--aligner_lr", "1e-3", "--loraplus_lr_ratio", "4"])
    model = prepare_model(load_model(llava_dir, "causal_lm", [], torch.float32), args, "causal_lm")
    groups = param_groups(model, args)
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 4e-4, 1e-5, 4e-5, 1e-3, 4e-3])
    names = {id(p): n for n, p in model.named_parameters()}
    parts = [{vlm_part(names[id(p)], VLM_PARTS["llava"]) for p in g["params"]} for g in groups]
    assert parts == [{"llm"}, {"llm"}, {"vit"}, {"vit"}, {"aligner"}, {"aligner"}]


def test_qlora_keeps_the_vision_tower_and_projector_dense(llava_dir, vlm_file, tmp_path):
    from lorakit.quant.linear4bit import NF4Linear

    model = load_model(llava_dir, "causal_lm", [], torch.float32, quantize=True)
    kinds = {part: {type(m) for n, m in model.named_modules()
                    if n.startswith(prefix) and isinstance(m, (torch.nn.Linear, NF4Linear))}
             for part, prefix in LLAVA_PARTS.items()}
    assert kinds == {"llm": {NF4Linear}, "vit": {torch.nn.Linear}, "aligner": {torch.nn.Linear}}
    assert main(["train", *quick_args(llava_dir, vlm_file, tmp_path / "out", max_steps=2, train_type="qlora",
                                      freeze_aligner="false")]) == 0


def test_qwen2_vl_parts_and_peft_reload(tmp_path):
    """Qwen2-VL's merger is the aligner inside its vision tower; the adapter reloads in PEFT with the same
    logits on an image batch (pixels from its image processor, M-RoPE from mm_token_type_ids)."""
    from peft import PeftModel
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    ids = {"<|image_pad|>": 90, "<|video_pad|>": 91, "<|vision_start|>": 92, "<|vision_end|>": 93}
    build_vlm("qwen2_vl", ids, vocab_size=96).save_pretrained(str(tmp_path / "base"))
    base = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "base"))
    args = parse_train_args(["--freeze_vit", "false", "--freeze_aligner", "false", "--freeze_llm", "true"])
    model = prepare_model(base, args, "causal_lm")
    targets = model.peft_config["default"].target_modules
    assert {vlm_part(t, VLM_PARTS["qwen2_vl"]) for t in targets} == {"vit", "aligner"}
    assert {t for t in targets if vlm_part(t, VLM_PARTS["qwen2_vl"]) == "aligner"} == {
        "model.visual.merger.mlp.0", "model.visual.merger.mlp.2"}
    randomize(model, scale=0.1)
    model.save_pretrained(str(tmp_path / "adapter"))
    pixels = vlm_image_processor("qwen2_vl")(images=[Image.new("RGB", (28, 28), (200, 30, 30))], return_tensors="pt")
    image_tokens = int(pixels["image_grid_thw"].prod()) // 4
    input_ids = torch.tensor([[5, 92, *[90] * image_tokens, 93, 11, 12, 13]])
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "mm_token_type_ids": (input_ids == 90).long(), **pixels}
    theirs = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(str(tmp_path / "base")),
                                       str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch).logits, theirs.eval()(**batch).logits)


@pytest.mark.parametrize("flags, parts", [
    ({}, {"llm"}),
    ({"freeze_vit": "false", "freeze_aligner": "false"}, {"llm", "vit", "aligner"}),
    ({"freeze_llm": "true", "freeze_aligner": "false"}, {"aligner"}),
])
def test_qwen2_vl_trains_through_the_cli(qwen_dir, vlm_file, tmp_path, flags, parts):
    """A Qwen2-VL folder as the hub ships it trains through the CLI (its processor without torchvision:
    images only), and PEFT reloads the adapter with the same logits."""
    out = tmp_path / "out"
    assert main(["train", *quick_args(qwen_dir, vlm_file, out, max_steps=2, **flags)]) == 0
    assert adapted_parts(out, "qwen2_vl") == parts
    saved = load_processor(str(out))  # the adapter folder's processor, as `lorakit infer` loads it
    assert type(saved).__name__ == "Qwen2VLProcessor" and saved.chat_template == load_processor(qwen_dir).chat_template
    assert_peft_reloads(qwen_dir, vlm_file, out)


def test_a_text_only_model_refuses_image_rows(tiny_lm_dir, vlm_file, tmp_path, capsys):
    assert main(["train", *quick_args(tiny_lm_dir, vlm_file, tmp_path / "out")]) == 2
    assert "vlm.jsonl:1: the row has images, but the model is text-only" in capsys.readouterr().err


def test_freeze_flags_on_a_text_only_model(tiny_lm_dir, alpaca_file, tmp_path, capsys):
    assert main(["train", *quick_args(tiny_lm_dir, alpaca_file, tmp_path / "out", freeze_vit="false")]) == 2
    assert "choose parts of a vision-language model; 'llama' is text-only" in capsys.readouterr().err


def test_everything_frozen_is_refused():
    with pytest.raises(ValueError, match="are all true: nothing would train"):
        parse_train_args(["--freeze_llm", "true"])


def test_rows_whose_images_leave_no_room(llava_dir, tmp_path, capsys):
    write_images(tmp_path / "imgs")
    rows = [{"messages": [{"role": "user", "content": "<image><image>Two squares?"},
                          {"role": "assistant", "content": "Yes."}], "images": ["imgs/red.png", "imgs/blue.png"]}]
    data = write_jsonl(tmp_path / "two.jsonl", rows)
    assert main(["train", *quick_args(llava_dir, data, tmp_path / "out", max_length=24)]) == 2
    assert "two.jsonl:1: the row needs" in capsys.readouterr().err
