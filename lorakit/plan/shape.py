"""A model's dimensions from its config.json alone: a local folder, a config.json file, a hub id in the
local Hugging Face cache, or one of the configs shipped in lorakit/plan/known/ (no network, no weights)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

KNOWN = Path(__file__).parent / "known"
GATED = {"llama", "mistral", "qwen2", "qwen3", "olmo2", "gemma", "gemma2", "phi3"}  # down(act(gate) * up) MLPs


@dataclass(frozen=True)
class Linear:
    """One Linear of a decoder block: its module name and its in / out features."""
    name: str
    d_in: int
    d_out: int
    bias: bool = False


@dataclass(frozen=True)
class Shape:
    """What the memory of training depends on: a decoder's dimensions (and a vision tower's, for a VLM)."""
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    dtype: str
    max_positions: int
    qkv_bias: bool = False
    final_softcap: float | None = None
    vision_params: int = 0  # a VLM's vision tower and connector: frozen weights only

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def gated(self) -> bool:
        return self.model_type in GATED

    def block_linears(self) -> list[Linear]:
        """The Linear layers of one decoder block (GPT-2's Conv1Ds as Linears)."""
        h, i = self.hidden, self.intermediate
        if self.model_type == "gpt2":
            return [Linear("c_attn", h, 3 * h, True), Linear("c_proj", h, h, True),
                    Linear("c_fc", h, i, True), Linear("c_proj", i, h, True)]
        attn = [Linear("q_proj", h, self.q_dim, self.qkv_bias), Linear("k_proj", h, self.kv_dim, self.qkv_bias),
                Linear("v_proj", h, self.kv_dim, self.qkv_bias), Linear("o_proj", self.q_dim, h)]
        mlp = [Linear("gate_proj", h, i), Linear("up_proj", h, i), Linear("down_proj", i, h)] if self.gated else \
            [Linear("up_proj", h, i), Linear("down_proj", i, h)]
        return attn + mlp

    def other_params(self) -> dict[str, int]:
        """Parameters outside the blocks' Linears: embeddings, norms, head (0 when tied), vision tower."""
        h, gpt2 = self.hidden, self.model_type == "gpt2"
        norm = 2 * h if gpt2 else h  # LayerNorm has a bias, RMSNorm not
        norms = self.layers * (4 if self.model_type == "gemma2" else 2) * norm + norm
        qk_norms = self.layers * 2 * self.head_dim if self.model_type == "qwen3" else 0
        positions = self.max_positions * h if gpt2 else 0
        return {"embed": self.vocab * h + positions, "norms": norms + qk_norms,
                "head": 0 if self.tied else self.vocab * h, "vision": self.vision_params}


def _vision_params(vision: dict, text_hidden: int, scale_factor: int) -> int:
    """A ViT-style vision tower's parameters (patch embedding, positions, blocks) and its connector. Qwen2-VL's
    (a spatial_merge_size) names its width embed_dim, its depth depth, its MLP mlp_ratio; it has no position
    table (rotary), its patches span temporal_patch_size frames, and its merger is an MLP over merge² patches."""
    h = vision.get("embed_dim") or vision["hidden_size"]
    i = vision.get("intermediate_size") or vision.get("mlp_ratio", 4) * h
    n = vision.get("num_hidden_layers") or vision["depth"]
    patch, channels = vision.get("patch_size", 14), vision.get("num_channels") or vision.get("in_channels", 3)
    blocks = n * (4 * (h * h + h) + 2 * h * i + i + h + 4 * h)
    if "spatial_merge_size" in vision:
        merged = h * vision["spatial_merge_size"] ** 2
        embeddings = channels * vision.get("temporal_patch_size", 1) * patch * patch * h
        connector = merged * merged + merged * text_hidden
    else:
        embeddings = channels * patch * patch * h + h + (vision.get("image_size", 384) // patch) ** 2 * h
        connector = h * scale_factor ** 2 * text_hidden
    return blocks + embeddings + 2 * h + connector


def shape_from_config(config: dict) -> Shape:
    """The Shape of a transformers config.json (a VLM's text model, with its vision tower's size)."""
    text = config.get("text_config") or config
    vision = config.get("vision_config")
    model_type = text.get("model_type", config.get("model_type", ""))
    hidden = text.get("hidden_size", text.get("n_embd"))
    heads = text.get("num_attention_heads", text.get("n_head"))
    missing = [k for k, v in (("hidden_size", hidden), ("num_attention_heads", heads),
                              ("num_hidden_layers", text.get("num_hidden_layers", text.get("n_layer"))),
                              ("vocab_size", text.get("vocab_size"))) if v is None]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}: not a decoder config lorakit plan can read")
    return Shape(
        model_type=model_type, hidden=hidden,
        intermediate=text.get("intermediate_size") or text.get("n_inner") or 4 * hidden,
        layers=text.get("num_hidden_layers", text.get("n_layer")), heads=heads,
        kv_heads=text.get("num_key_value_heads") or heads,
        head_dim=text.get("head_dim") or hidden // heads, vocab=text["vocab_size"],
        tied=bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", model_type == "gpt2"))),
        dtype=str(text.get("torch_dtype") or text.get("dtype") or config.get("torch_dtype") or "float32"),
        max_positions=text.get("max_position_embeddings", text.get("n_positions", 2048)),
        qkv_bias=model_type == "qwen2" or bool(text.get("attention_bias", False)),
        final_softcap=text.get("final_logit_softcapping"),
        vision_params=_vision_params(vision, hidden, config.get("scale_factor", 1)) if vision else 0)


def known_ids() -> list[str]:
    """The hub ids whose config.json ships with lorakit."""
    return sorted(p.stem.replace("--", "/") for p in KNOWN.glob("*.json"))


def _cached_config(model_id: str) -> Path | None:
    """config.json of a hub id in the local Hugging Face cache (any snapshot), without the network."""
    cache = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
    snapshots = cache.expanduser() / f"models--{model_id.replace('/', '--')}" / "snapshots"
    found = sorted(snapshots.glob("*/config.json"), key=lambda p: p.stat().st_mtime) if snapshots.is_dir() else []
    return found[-1] if found else None


def config_path(model: str) -> Path:
    """Where `model`'s config.json is: a folder, a file, the local hub cache or lorakit's known configs."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {model} has no config.json")
        return path / "config.json"
    if path.is_file():
        return path
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise FileNotFoundError(f"no such model folder or config.json: {model}")
    cached = _cached_config(model)
    if cached:
        return cached
    shipped = KNOWN / f"{model.replace('/', '--')}.json"
    if shipped.is_file():
        return shipped
    raise FileNotFoundError(
        f"no config.json for {model!r}: it is not in the local Hugging Face cache nor among the configs lorakit "
        f"ships ({', '.join(known_ids())}). lorakit plan needs only the config: pass --model with a model folder "
        f"or a path to its config.json (e.g. download just config.json from the model's hub page)")


def read_shape(model: str) -> Shape:
    """The Shape of `model` (folder, config.json, cached hub id or known id)."""
    path = config_path(model)
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None
    return shape_from_config(config)
