"""`lorakit infer --image` with a vision-language adapter: greedy text equal to PEFT's generate on the same
processor inputs, <image> tags placing the images (or the images first), and the errors."""
import pytest
import torch

from helpers import quick_args, save_tiny_causal_lm, save_tiny_vlm, vlm_dataset
from lorakit.cli import main
from lorakit.cli.infer import InferArgs, run_infer


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> str:
    return save_tiny_vlm(tmp_path_factory.mktemp("tiny-llava"), "llava")


@pytest.fixture(scope="module")
def trained(llava_dir, tmp_path_factory):
    """(adapter folder, images folder): LoRA on all three parts, trained through the CLI."""
    folder = tmp_path_factory.mktemp("vlm-infer")
    data = vlm_dataset(folder)
    out = folder / "adapter"
    assert main(["train", *quick_args(llava_dir, data, out, max_steps=8, freeze_vit="false",
                                      freeze_aligner="false")]) == 0
    return str(out), folder / "imgs"


def peft_generate(base: str, adapter: str, images: list, content: list[dict], max_new_tokens: int,
                  processor=None) -> str:
    """PEFT's PeftModel over the base, greedy generate on the processor's inputs (the adapter folder's, with
    AutoProcessor, unless given) for a user turn of `content` parts rendered with its chat template."""
    from peft import PeftModel
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = processor or AutoProcessor.from_pretrained(adapter)
    text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), adapter).eval()
    pictures = [Image.open(path).convert("RGB") for path in images]
    inputs = processor(text=[text], images=pictures or None, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_image_generation_matches_peft(llava_dir, trained):
    adapter, imgs = trained
    [ours] = run_infer(InferArgs(adapter=adapter, image=[str(imgs / "red.png")], prompt=["What colour is the square?"],
                                 max_new_tokens=8, torch_dtype="float32"))
    content = [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]  # no tag: image first
    assert ours["completion"] == peft_generate(llava_dir, adapter, [imgs / "red.png"], content, 8)
    assert ours["completion"].strip()


def test_tags_place_the_images_and_batches_equal_one_at_a_time(llava_dir, trained):
    adapter, imgs = trained
    images = [str(imgs / "blue.png"), str(imgs / "green.png")]
    prompts = ["Compare <image> with <image>", "First <image>, then <image>. Colours?"]
    args = dict(adapter=adapter, image=images, max_new_tokens=6, torch_dtype="float32")
    batched = run_infer(InferArgs(prompt=prompts, batch_size=2, **args))
    alone = [run_infer(InferArgs(prompt=[p], **args))[0] for p in prompts]
    assert [r["completion"] for r in batched] == [r["completion"] for r in alone]
    content = [{"type": "text", "text": "Compare "}, {"type": "image"}, {"type": "text", "text": " with "},
               {"type": "image"}]
    assert alone[0]["completion"] == peft_generate(llava_dir, adapter, images, content, 6)


def test_text_prompts_on_a_vlm_adapter(trained):
    adapter, _ = trained
    [result] = run_infer(InferArgs(adapter=adapter, prompt=["Hello"], max_new_tokens=4, torch_dtype="float32"))
    assert isinstance(result["completion"], str)


def test_image_errors(trained, tmp_path, capsys):
    adapter, imgs = trained
    red = str(imgs / "red.png")
    assert main(["infer", "--adapter", adapter, "--image", str(tmp_path / "nope.png"), "--prompt", "x"]) == 2
    assert f"--image: image file not found: {tmp_path / 'nope.png'}" in capsys.readouterr().err
    (tmp_path / "fake.png").write_text("not a picture")
    assert main(["infer", "--adapter", adapter, "--image", str(tmp_path / "fake.png"), "--prompt", "x"]) == 2
    assert "fake.png is not an image PIL can read" in capsys.readouterr().err
    assert main(["infer", "--adapter", adapter, "--image", red, "--prompt", "<image> and <image>?"]) == 2
    assert "prompt 1 has 2 <image> tags but 1 --image files were given" in capsys.readouterr().err


def test_an_image_on_a_text_only_model(tmp_path, capsys):
    from helpers import write_images

    base = save_tiny_causal_lm(tmp_path / "lm")
    write_images(tmp_path / "imgs")
    assert main(["infer", "--model", base, "--image", str(tmp_path / "imgs/red.png"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "--image needs a vision-language model" in err and "is text-only" in err


def test_qwen2_vl_adapter_batched_equals_generate_alone(tmp_path):
    """A Qwen2-VL adapter (its folder's processor loaded without torchvision) on a batch of two left-padded
    prompts with a wide image: each completion equals PEFT's generate on that prompt alone."""
    from PIL import Image

    from lorakit.io.pretrained import load_processor

    base = save_tiny_vlm(tmp_path / "qwen2-vl", "qwen2_vl")
    data = vlm_dataset(tmp_path / "data")
    wide = tmp_path / "data" / "imgs" / "wide.png"
    Image.new("RGB", (48, 16), (30, 200, 200)).save(wide)
    adapter = str(tmp_path / "adapter")
    assert main(["train", *quick_args(base, data, adapter, max_steps=3, freeze_vit="false")]) == 0
    prompts = ["What colour is the square?", "Look: <image> Which colour, and which shape is it?"]
    results = run_infer(InferArgs(adapter=adapter, image=[str(wide)], prompt=prompts, batch_size=2, max_new_tokens=6,
                                  torch_dtype="float32"))
    contents = [[{"type": "image"}, {"type": "text", "text": prompts[0]}],
                [{"type": "text", "text": "Look: "}, {"type": "image"},
                 {"type": "text", "text": " Which colour, and which shape is it?"}]]
    processor = load_processor(base)
    assert [r["completion"] for r in results] == [peft_generate(base, adapter, [wide], c, 6, processor)
                                                  for c in contents]
    assert all(r["completion"].strip() for r in results)
