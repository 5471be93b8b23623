"""Base model + adapter(s) -> one plain model folder that transformers loads, written shard by shard.

The base's tensors are streamed from its safetensors files; each targeted weight becomes lorakit's
own merged weight (LoraLayer.merged_weight: s·B·A, GPT-2's transposed Conv1D, DoRA's rescaling,
rsLoRA and rank / alpha patterns), computed in float32; modules_to_save copies and trained biases
replace the base's tensors. Memory: about one output shard plus one tensor, never the whole model.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorakit.families import SEQ_CLS_HEADS
from lorakit.io.checkpoint4bit import nf4_layer_names
from lorakit.io.files import require_new_dir, staged_dir, write_text
from lorakit.io.weights import Checkpoint, model_key
from lorakit.model.adapter_files import read_run_config
from lorakit.quant.nf4 import dequantize_nf4, quantize_nf4
from lorakit.tools.adapter import Adapter, adapter_from, read_adapter
from lorakit.tools.fit import NAME, check_fits, extra_param_name, find_module, lora_layer, skeleton, tie_groups
from lorakit.tools.shards import ShardWriter, copy_side_files, parse_size

# Files of an adapter folder that replace the base's: a tokenizer saved with the adapter wins.
TOKENIZER_FILE = re.compile(r"tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|merges\.txt|"
                            r"chat_template\..*|.*\.model")


@dataclass
class MergeReport:
    """What a merge wrote, and for a 4-bit base what merging cost (logits vs the 4-bit base + adapter)."""

    output_dir: Path
    shards: list[str]
    merged_modules: int
    replaced_tensors: int
    untied: list[str]
    quantized_gap: dict[str, float] | None = None


def merge_to_folder(adapter_dirs: list[str], output_dir: str, base: str | None = None,
                    weights: list[float] | None = None, combination_type: str = "linear",
                    density: float | None = None, dtype: torch.dtype | None = None,
                    max_shard_size: str = "5GB", quant_bits: int | None = None) -> MergeReport:
    """Merge the adapter(s) into the base model and write the result as a model folder at `output_dir`."""
    require_new_dir(output_dir)
    max_bytes = parse_size(max_shard_size)
    from lorakit.model.combine import COMBINATIONS

    if len(adapter_dirs) > 1 and combination_type not in COMBINATIONS:
        raise ValueError(f"--combination_type {combination_type!r} is not one of {', '.join(COMBINATIONS)}")
    if weights is not None and len(weights) != len(adapter_dirs):
        raise ValueError(f"--weights gives {len(weights)} numbers for {len(adapter_dirs)} adapters; give one each")
    if quant_bits not in (None, 4):
        raise ValueError(f"--quant_bits accepts 4 (the adapter was trained on an NF4 base), got {quant_bits}")
    adapters = [read_adapter(d) for d in adapter_dirs]
    base = base_folder(base or adapters[0].config.base_model_name_or_path, adapter_dirs[0])
    labels = classifier_labels(adapters[0])
    checkpoint, model = Checkpoint(base), skeleton(base, labels)
    adapter = adapters[0] if len(adapters) == 1 else combine(base, adapters, weights, combination_type, density)
    check_fits(model, adapter, base)
    quantized = quant_bits == 4 or any(trained_4bit(a.folder) for a in adapters)
    if quantized:
        dtype = dtype or stored_dtype(Path(base))
    with staged_dir(output_dir) as tmp:
        merger = Merger(model, adapter, dtype, quantized, by_model_names=labels is not None)
        writer = ShardWriter(tmp, max_bytes)
        for key, tensor in merger.tensors(checkpoint):
            writer.add(key, tensor)
        shards = writer.close()
        write_config(Path(base), tmp, dtype, untie=bool(merger.untied), classifier=model if labels else None)
        copy_side_files(Path(base), tmp, skip=("config.json", "README.md"))
        copy_tokenizer(adapter.folder, tmp)
        causal = adapter.config.task_type in (None, "CAUSAL_LM")
        gap = quantized_gap(base, adapter, tmp, dtype) if quantized and causal else None
    return MergeReport(Path(output_dir), shards, merger.merged, merger.replaced, sorted(merger.untied), gap)


class Merger:
    """The merged model's tensors, one at a time, from the base checkpoint's."""

    def __init__(self, model: nn.Module, adapter: Adapter, dtype: torch.dtype | None, quantized: bool,
                 by_model_names: bool = False):
        self.model, self.adapter, self.dtype, self.by_model_names = model, adapter, dtype, by_model_names
        self.names = set(model.state_dict())
        self.targets = {f"{path}.weight": lora for path, lora in adapter.modules.items()}
        self.replacements = {}
        for key, tensor in adapter.extras.items():
            name = extra_param_name(key)
            if name is not None and name not in self.names:
                raise ValueError(f"adapter {adapter.folder}: tensor {key} replaces {name}, which the base model "
                                 f"({type(model).__name__}) does not have: the adapter was made for another base model")
            if name is not None:
                self.replacements[name] = tensor
        saved = set(adapter.config.modules_to_save or [])
        self.nf4 = {f"{n}.weight" for n in nf4_layer_names(model, {*SEQ_CLS_HEADS, *saved})} if quantized else set()
        self.untied: dict[str, list[str]] = {}  # a checkpoint tensor's name -> tied names written beside it
        self.merged = self.replaced = 0

    def tensors(self, checkpoint: Checkpoint):
        """(key, tensor) of the merged model, in the checkpoint's order, with a progress bar; then the tensors
        the base lacks (a classifier's new head). Keys are the checkpoint's, or with by_model_names the model's
        (a classifier built over a headless encoder's checkpoint: its keys gain the encoder's prefix)."""
        from tqdm.auto import tqdm

        prefix = getattr(self.model, "base_model_prefix", "")
        names = {key: model_key(key, self.names, prefix) for key in checkpoint.file_of}
        present = set(names.values())
        self._untie(present)
        for key, tensor in tqdm(checkpoint.items(), total=len(names), desc="merge", unit="tensor"):
            name = names[key]
            if name is None:  # not a parameter or buffer of the model: kept as it is
                yield key, tensor
                continue
            yield name if self.by_model_names else key, self.convert(name, tensor)
            for tied in self.untied.get(name, []):
                yield tied, self.convert(tied, tensor).clone()
        for name in sorted(set(self.replacements) - present):
            yield name, self.convert(name, self.replacements[name])

    def _untie(self, present: set[str]) -> None:
        """Tied weights (embeddings and head) one of which the adapter changes are written apart."""
        changed = set(self.targets) | set(self.replacements)
        for group in tie_groups(self.model):
            stored = [n for n in group if n in present]
            if changed & set(group) and stored:
                self.untied[stored[0]] = [n for n in group if n not in present]

    def convert(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The merged model's tensor `name` from the base's."""
        out_dtype = self.dtype if self.dtype is not None and tensor.is_floating_point() else tensor.dtype
        if name in self.replacements:
            tensor = self.replacements[name]
            self.replaced += 1
        if name in self.nf4:  # the 4-bit base the adapter was trained on
            tensor = dequantize_nf4(quantize_nf4(tensor.to(out_dtype)))
        lora = self.targets.get(name)
        if lora is not None:
            module = find_module(self.model, lora.path, "(merging)")
            layer = lora_layer(module, lora, self.adapter.config, tensor.to(torch.promote_types(tensor.dtype,
                                                                                                torch.float32)))
            with torch.no_grad():
                tensor = layer.merged_weight(NAME)
            self.merged += 1
        return tensor.to(out_dtype)


def base_folder(base: str | None, adapter_dir: str) -> str:
    """A local folder for the base model (a folder, or a hub id found in the local cache)."""
    from lorakit.io.pretrained import resolve_model_path

    if not base:
        raise ValueError(f"{adapter_dir}/adapter_config.json names no base model (base_model_name_or_path); "
                         "pass --model")
    path = resolve_model_path(base)
    if Path(path).is_dir():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(path, local_files_only=True)
    except LocalEntryNotFoundError:
        raise FileNotFoundError(f"base model {base!r} is not a local folder nor in the hub cache; merging reads its "
                                "safetensors files: download it first (huggingface-cli download) or pass --model "
                                "with a folder") from None


def classifier_labels(adapter: Adapter) -> list[str] | None:
    """A sequence classifier adapter's labels (labels.json, which `lorakit train` writes, else one per row of its
    head: LABEL_0, ...); None for other adapters."""
    if adapter.config.task_type != "SEQ_CLS":
        return None
    if (adapter.folder / "labels.json").is_file():
        return json.loads((adapter.folder / "labels.json").read_text(encoding="utf-8"))
    heads = {extra_param_name(k): t for k, t in adapter.extras.items()}
    rows = next((heads[f"{h}{part}.weight"].shape[0] for h in SEQ_CLS_HEADS for part in ("", ".out_proj")
                 if f"{h}{part}.weight" in heads), None)
    if rows is None:
        raise ValueError(f"adapter {adapter.folder} is a sequence classifier (task_type SEQ_CLS) but holds no "
                         f"head ({' or '.join(SEQ_CLS_HEADS)}) and no labels.json: its labels are unknown")
    return [f"LABEL_{i}" for i in range(rows)]


def trained_4bit(adapter_dir: Path) -> bool:
    """Whether `lorakit train` trained this adapter on a 4-bit base (its run_config.yaml says so)."""
    args = read_run_config(adapter_dir)
    return args.get("train_type") == "qlora" or args.get("quant_bits") == 4


def stored_dtype(base: Path) -> torch.dtype:
    """The dtype config.json says the weights are stored in (float32 when it does not say)."""
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name) if isinstance(getattr(torch, name, None), torch.dtype) else torch.float32


def write_config(base: Path, out: Path, dtype: torch.dtype | None, untie: bool,
                 classifier: nn.Module | None = None) -> None:
    """config.json of the merged model: the base's, with its new dtype, its head untied if it had to be, and
    for a `classifier` its class and labels."""
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    if classifier is not None:
        config.update(architectures=[type(classifier).__name__], id2label=classifier.config.id2label,
                      label2id=classifier.config.label2id)
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
        if "torch_dtype" in config:
            config["torch_dtype"] = config["dtype"]
    if untie:
        for part in (config, config.get("text_config")):
            if isinstance(part, dict):
                part["tie_word_embeddings"] = False
    write_text(out / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_tokenizer(adapter_dir: Path, out: Path) -> None:
    """A tokenizer saved with the adapter (with its chat template, added tokens) replaces the base's."""
    if not (adapter_dir / "tokenizer_config.json").is_file():
        return
    for path in adapter_dir.iterdir():
        if path.is_file() and TOKENIZER_FILE.fullmatch(path.name):
            (out / path.name).write_bytes(path.read_bytes())


def combine(base: str, adapters: list[Adapter], weights: list[float] | None, combination_type: str,
            density: float | None) -> Adapter:
    """One adapter from several, by PeftModel.add_weighted_adapter on the base's (empty) skeleton."""
    from lorakit.model import adapter_files
    from lorakit.model.peft_model import PeftModel

    for a in adapters:
        if a.config.use_dora or a.extras:
            what = "DoRA magnitudes" if a.config.use_dora else "trained biases or modules_to_save"
            raise ValueError(f"adapter {a.folder} has {what}, which add_weighted_adapter does not combine (it "
                             "combines LoRA factors; PEFT drops the rest): merge it on its own")
    names = [f"adapter{i}" for i in range(len(adapters))]
    peft_model = PeftModel.from_pretrained(skeleton(base), str(adapters[0].folder), names[0], memory_savers=False)
    for name, adapter in zip(names[1:], adapters[1:]):
        peft_model.load_adapter(str(adapter.folder), name)
    kwargs = {} if density is None else {"density": density}
    peft_model.add_weighted_adapter(names, weights or [1.0] * len(names), "combined",
                                    combination_type=combination_type, **kwargs)
    state = adapter_files.adapter_state_dict(peft_model.base_model, "combined")
    return adapter_from(adapters[0].folder, peft_model.peft_config["combined"], state)


@torch.no_grad()
def quantized_gap(base: str, adapter: Adapter, merged_dir: Path, dtype: torch.dtype) -> dict[str, float]:
    """Max and mean |logits| difference between the merged model and the 4-bit base + adapter, and the mean
    |logit| for scale, on a few random token sequences."""
    from transformers import AutoModelForCausalLM

    from lorakit.io.pretrained import load_model, position_limit
    from lorakit.model import adapter_files
    from lorakit.model.peft_model import PeftModel

    saved = tuple(adapter.config.modules_to_save or [])
    four_bit = PeftModel(load_model(base, "causal_lm", [], dtype, quantize=True, keep_dense=saved),
                         adapter.config, memory_savers=False)
    adapter_files.load_adapter_weights(four_bit.base_model, "default", adapter.state_dict(), str(adapter.folder))
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=dtype).eval()
    limit = position_limit(merged.config)
    length = min(32, limit[0]) if limit else 32
    ids = torch.randint(0, merged.config.get_text_config().vocab_size, (4, length),
                        generator=torch.Generator().manual_seed(0))
    want = four_bit.eval()(input_ids=ids).logits.float()
    got = merged(input_ids=ids).logits.float()
    diff = (got - want).abs()
    return {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
            "mean_abs_logit": want.abs().mean().item()}
