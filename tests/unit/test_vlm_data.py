"""Multimodal rows: ms-swift's <image> tags and OpenAI-style parts read and checked, encoded with a
vision-language processor (loss on the answers only, never on image tokens), and the errors."""
import base64

import pytest

from helpers import save_tiny_vlm, vlm_rows, write_images, write_jsonl
from lorakit.data import load_examples
from lorakit.data.encode import collate, encode_examples
from lorakit.data.formats import Conversation
from lorakit.data.multimodal import Multimodal
from lorakit.io.pretrained import load_processor
from lorakit.memory.loss import IGNORE_INDEX


@pytest.fixture(scope="module")
def llava_processor(tmp_path_factory):
    return load_processor(save_tiny_vlm(tmp_path_factory.mktemp("tiny-llava"), "llava"))


@pytest.fixture
def folder(tmp_path):
    write_images(tmp_path / "imgs")
    return tmp_path


def read(folder, rows):
    return load_examples([write_jsonl(folder / "data.jsonl", rows)])[0]


def test_swift_rows_become_parts_with_images_resolved_from_the_data_file(folder):
    (example, source), *_ = read(folder, vlm_rows(3))[2:]
    assert isinstance(example, Multimodal) and source.endswith("data.jsonl:3")
    assert example.images == [str(folder / "imgs/blue.png"), str(folder / "imgs/yellow.png")]
    assert example.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]
    assert example.messages[2]["content"] == [{"type": "text", "text": "And this one? "}, {"type": "image"}]


def test_openai_parts_and_data_urls(folder):
    png = base64.b64encode((folder / "imgs/red.png").read_bytes()).decode()
    row = {"messages": [
        {"role": "user", "content": [{"type": "image", "image": "imgs/blue.png"},
                                     {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                                     {"type": "text", "text": "Colours?"}]},
        {"role": "assistant", "content": "Blue, then red."}]}
    (example, _), = read(folder, [row])
    assert example.images == [str(folder / "imgs/blue.png"), f"data:image/png;base64,{png}"]
    assert [p["type"] for p in example.messages[0]["content"]] == ["image", "image", "text"]


def test_rows_without_images_stay_conversations(folder):
    (example, _), = read(folder, [{"messages": [{"role": "user", "content": "Hi"},
                                                {"role": "assistant", "content": "Hello"}]}])
    assert isinstance(example, Conversation)


def one_image_row(content="<image>What is it?", images=("imgs/red.png",)) -> dict:
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "Red."}],
            "images": list(images)}


@pytest.mark.parametrize("row, message", [
    (one_image_row(images=["imgs/missing.png"]), r"data.jsonl:1: image file not found: .*missing.png"),
    (one_image_row(images=["notes.txt"]), r"data.jsonl:1: .*notes.txt is not an image"),
    (one_image_row("<image><image>Two?"), r"data.jsonl:1: more <image> tags .* than the 1 entries"),
    (one_image_row("No tag"), r"data.jsonl:1: 1 images but only 0 <image> tags"),
    (one_image_row(images=["https://example.com/a.png"]), r"data.jsonl:1: image 'https://example.com/a.png' is a URL"),
    (one_image_row(images=["data:image/png;base64,@@@"]), r"data.jsonl:1: the image data is not an image"),
    (one_image_row([{"type": "video", "video": "a.mp4"}]), r"data.jsonl:1: messages\[0\].content\[0\] should be"),
    ({**one_image_row("<video>What happens?", images=()), "videos": ["a.mp4"]},
     r"data.jsonl:1: the row has 'videos'; lorakit trains on images and text only"),
])
def test_bad_rows_name_the_row_and_the_problem(folder, row, message):
    (folder / "notes.txt").write_text("not a picture")
    with pytest.raises(ValueError, match=message):
        read(folder, [row])


def test_labels_only_on_answers_and_never_on_image_tokens(folder, llava_processor):
    pairs = read(folder, vlm_rows(3))
    items, report = encode_examples(llava_processor.tokenizer, pairs, 512, processor=llava_processor)
    assert report.kept == 3 and report.truncated == 0
    image_id = llava_processor.image_token_id
    two_images = items[2]
    assert two_images.input_ids.count(image_id) == 2 * 16  # 16 patches per 16x16 image (CLS dropped)
    assert two_images.media["pixel_values"].shape == (2, 3, 16, 16)
    assert all(label == IGNORE_INDEX for t, label in zip(two_images.input_ids, two_images.labels) if t == image_id)
    answers = llava_processor.tokenizer.decode([t for t in two_images.labels if t != IGNORE_INDEX])
    assert answers == "It is blue.</s>\nThat one is yellow.</s>\n"
    batch = collate(items, llava_processor.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["labels"].shape == batch["input_ids"].shape


def test_a_text_only_model_refuses_image_rows(folder, tiny_lm_dir):
    from lorakit.io.pretrained import load_tokenizer

    with pytest.raises(ValueError, match=r"data.jsonl:1: the row has images, but the model is text-only"):
        encode_examples(load_tokenizer(tiny_lm_dir), read(folder, [one_image_row()]), 512)


def test_images_that_leave_no_room_for_the_answer(folder, llava_processor):
    pairs = read(folder, [one_image_row()])
    with pytest.raises(ValueError, match=r"data.jsonl:1: the row needs \d+ tokens \(16 of them for its images\), "
                                         r"and --max_length 12 leaves no room"):
        encode_examples(llava_processor.tokenizer, pairs, 12, processor=llava_processor)
    full = len(encode_examples(llava_processor.tokenizer, pairs, 512, processor=llava_processor)[0][0].input_ids)
    items, report = encode_examples(llava_processor.tokenizer, pairs, full - 2, processor=llava_processor)
    assert report.truncated == 1 and len(items[0].input_ids) == full - 2  # the answer is cut, the image is whole
