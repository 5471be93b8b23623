"""lorakit.io.images_only: Qwen2-VL's processor without torchvision (transformers builds its video processor
only with it): the image tokens, pixels, grids and token types of its own class, and a saved folder that keeps
the video settings."""
import json

import pytest
import torch
from PIL import Image

from helpers import save_tiny_vlm, vlm_image_processor
from lorakit.io.pretrained import load_processor


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> str:
    return save_tiny_vlm(tmp_path_factory.mktemp("tiny-qwen2-vl"), "qwen2_vl")


def test_images_tokens_and_token_types_as_the_processor_defines_them(qwen_dir):
    processor = load_processor(qwen_dir)
    assert type(processor).__name__ == "Qwen2VLProcessor" and not hasattr(processor, "video_processor")
    image = Image.new("RGB", (48, 16), (30, 200, 200))
    text = "<|vision_start|><|image_pad|><|vision_end|>What is it?"
    out = processor(text=[text], images=[image], add_special_tokens=False, return_tensors="pt")
    pixels = vlm_image_processor("qwen2_vl")(images=[image], return_tensors="pt")
    torch.testing.assert_close(out["pixel_values"], pixels["pixel_values"])
    assert out["image_grid_thw"].tolist() == pixels["image_grid_thw"].tolist() == [[1, 4, 12]]  # 4x4-px patches
    expanded = text.replace("<|image_pad|>", "<|image_pad|>" * 12)  # 4 x 12 patches merged 2 x 2
    assert out["input_ids"][0].tolist() == processor.tokenizer(expanded, add_special_tokens=False)["input_ids"]
    assert out["mm_token_type_ids"][0].tolist() == (out["input_ids"][0] == processor.image_token_id).long().tolist()


def test_the_saved_folder_keeps_the_video_settings(qwen_dir, tmp_path):
    """Saved with the image processor's settings as the video processor's (as transformers reads a folder
    with none); a folder's own video settings are written back unchanged."""
    load_processor(qwen_dir).save_pretrained(str(tmp_path / "a"))
    saved = json.loads((tmp_path / "a" / "processor_config.json").read_text())
    assert saved["processor_class"] == "Qwen2VLProcessor" and saved["video_processor"] == saved["image_processor"]
    saved["video_processor"] = {"video_processor_type": "Qwen2VLVideoProcessor", "fps": 2.0, "merge_size": 2}
    (tmp_path / "a" / "processor_config.json").write_text(json.dumps(saved))
    load_processor(str(tmp_path / "a")).save_pretrained(str(tmp_path / "b"))
    again = json.loads((tmp_path / "b" / "processor_config.json").read_text())
    assert again["video_processor"] == saved["video_processor"] and again["image_processor"] == saved["image_processor"]


def test_with_torchvision_installed_its_error_stands(qwen_dir, monkeypatch):
    """Where torchvision is installed, a processor that still cannot be built is transformers' error."""
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_torchvision_available", lambda: True)
    with pytest.raises(ImportError, match="Torchvision"):
        load_processor(qwen_dir)
