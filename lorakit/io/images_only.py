"""A vision-language processor without its video processor, for when torchvision is not installed.

transformers builds some processors' video processor (Qwen2-VL's, Qwen2.5-VL's) only with torchvision, so
without it AutoProcessor fails although images need only the PIL image processor. Here the model's own
processor class is loaded without that one part: its image processor, tokenizer and chat template work as
AutoProcessor's would (the same image tokens, pixels, grids and token types). Saving it writes the video
settings back into processor_config.json (the folder's own, else the image processor's, as transformers
reads an older folder), so transformers with torchvision loads the saved folder whole.
"""
from __future__ import annotations


def has_video_processor(processor_class: type) -> bool:
    """Whether a transformers processor class takes a video processor."""
    return "video_processor" in processor_class.get_attributes()


def images_only(processor_class: type) -> type:
    """`processor_class` without its video processor, under the same name (saved as that class)."""

    class ImagesOnly(processor_class):
        video_config: dict | None = None  # the video processor's settings, written back on save

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None):
            # transformers takes a processor's parts from its __init__'s parameters (here no video processor)
            # and pairs them with the positional arguments, so the empty video slot is left out
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template)

        def to_dict(self) -> dict:
            return {**super().to_dict(), "video_processor": self.video_config or self.image_processor.to_dict()}

    ImagesOnly.__name__ = ImagesOnly.__qualname__ = processor_class.__name__
    return ImagesOnly


def processor_class_of(model_path: str, saved: dict) -> type | None:
    """The processor class a folder's processor_config.json names (`saved`), else its model type's (None:
    transformers knows none)."""
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING, processor_class_from_name

    if saved.get("processor_class"):
        return processor_class_from_name(saved["processor_class"])
    config_class = type(AutoConfig.from_pretrained(model_path, local_files_only=True))
    return PROCESSOR_MAPPING[config_class] if config_class in PROCESSOR_MAPPING else None


def load_images_only(model_path: str):
    """The folder's processor without its video processor; None when its class takes no video processor."""
    from transformers import ProcessorMixin

    saved, _ = ProcessorMixin.get_processor_dict(model_path, local_files_only=True)
    processor_class = processor_class_of(model_path, saved)
    if processor_class is None or not has_video_processor(processor_class):
        return None
    processor = images_only(processor_class).from_pretrained(model_path, local_files_only=True)
    processor.video_config = saved.get("video_processor")
    return processor
