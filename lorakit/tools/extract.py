"""A LoRA adapter from a fully fine-tuned model and its base: per layer, the truncated SVD of W_tuned - W_base.

Both checkpoints are read one tensor at a time. The adapter is PEFT's format with the scale folded in
(lora_alpha == r), so every reader gives the same update. Other tensors that changed (norms, biases,
embeddings) are reported, and kept in full for the modules named in modules_to_save.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.io import files
from lorakit.io.weights import Checkpoint, model_key
from lorakit.lora.layers import is_conv1d
from lorakit.model.adapter_files import PREFIX, WEIGHTS_NAME
from lorakit.model.targeting import all_linear_names, is_all_linear, name_matches, resolve_targets
from lorakit.tools.svd import relative_error, truncated_factors


@dataclass
class ExtractReport:
    """Per extracted module its rank and relative reconstruction error; what else changed, kept or not."""

    layers: dict[str, tuple[int, float]] = field(default_factory=dict)
    unchanged: list[str] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)
    not_captured: list[str] = field(default_factory=list)


def extract_adapter(base: str, tuned: str, output_dir: str | os.PathLike, rank: int,
                    target_modules: list[str] | None = None, modules_to_save: list[str] | None = None) -> ExtractReport:
    """Write the rank-`rank` adapter that best turns `base` into `tuned` (Frobenius norm, per layer)."""
    from tqdm.auto import tqdm

    from lorakit.io.pretrained import resolve_model_path
    from lorakit.tools.fit import skeleton

    if rank < 1:
        raise ValueError(f"--rank must be >= 1, got {rank}")
    files.require_new_dir(output_dir)
    base_dir, tuned_dir = resolve_model_path(base), resolve_model_path(tuned)
    base_ckpt, tuned_ckpt = Checkpoint(base_dir), Checkpoint(tuned_dir)
    model = skeleton(tuned_dir)  # the tuned model's class: a classifier fine-tuned from a headless encoder
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=target_modules or "all-linear",
                        modules_to_save=modules_to_save, task_type=task_type(model), base_model_name_or_path=base)
    targets = set(extraction_targets(model, config))
    names, prefix = set(model.state_dict()), getattr(model, "base_model_prefix", "")
    check_saved_exist(model, modules_to_save or [])
    base_keys = matching_keys(base_ckpt, tuned_ckpt, prefix, base_dir, tuned_dir, modules_to_save or [])
    state, report, saved = {}, ExtractReport(), set()
    for key, after in tqdm(tuned_ckpt.items(), total=len(tuned_ckpt.file_of), desc="extract", unit="tensor"):
        before = base_ckpt.tensor(base_keys[key]) if key in base_keys else torch.zeros_like(after)
        if before.shape != after.shape:
            raise ValueError(f"{key} has shape {tuple(before.shape)} in {base_dir} but {tuple(after.shape)} in "
                             f"{tuned_dir}: the tuned model is not a fine-tune of this base")
        name = model_key(key, names, prefix) or key
        path, _, attr = name.rpartition(".")
        if path in targets and attr == "weight":
            extract_layer(model.get_submodule(path), path, after.float() - before.float(), rank, state, report)
        elif owner := next((p for p in _owners(path) if name_matches(p, modules_to_save or [])), None):
            state[f"{PREFIX}{name}"] = after.clone()
            report.saved.append(name)
            saved.add(owner)
        elif not torch.equal(before, after):
            report.not_captured.append(name)
    if not report.layers:
        raise ValueError(f"no targeted layer differs between {base_dir} and {tuned_dir}: nothing to extract")
    ranks = {p: k for p, (k, _) in report.layers.items()}
    config.target_modules = target_list(model, list(ranks))
    config.rank_pattern = {p: k for p, k in ranks.items() if k != rank}
    config.modules_to_save = sorted(saved) or None  # full paths: PEFT matches these by a plain endswith
    config.fan_in_fan_out = any(is_conv1d(model.get_submodule(p)) for p in ranks)  # as PEFT records GPT-2's
    with files.staged_dir(output_dir) as tmp:
        files.save_safetensors(state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        config.save_pretrained(tmp)
    return report


def extraction_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the Linear / Conv1D / Embedding layers to extract: all linear layers but the head, or those named."""
    if is_all_linear(config.target_modules):
        saved = config.modules_to_save or []
        return [n for n in all_linear_names(model, config) if not any(name_matches(p, saved) for p in _owners(n))]
    targets = resolve_targets(model, config)
    conv2d = [n for n in targets if isinstance(model.get_submodule(n), nn.Conv2d)]
    if conv2d:
        raise ValueError(f"extract handles Linear, Conv1D and Embedding layers; {conv2d[0]} is a Conv2d")
    return targets


def extract_layer(module: nn.Module, path: str, delta: torch.Tensor, rank: int, state: dict,
                  report: ExtractReport) -> None:
    """The rank-k factors of one layer's change, under PEFT's keys (B @ A = delta as LoRA orients it)."""
    if not delta.any():
        report.unchanged.append(path)
        return
    embedding = isinstance(module, nn.Embedding)
    oriented = delta.T if embedding or is_conv1d(module) else delta  # B @ A is out x in
    U, S, Vh = torch.linalg.svd(oriented, full_matrices=False)
    k = min(rank, S.numel())
    B, A = truncated_factors(U, S, Vh, k)
    names = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
    state[f"{PREFIX}{path}.{names[0]}"] = A.contiguous()
    state[f"{PREFIX}{path}.{names[1]}"] = B.contiguous()
    report.layers[path] = (k, relative_error(S, k))


def target_list(model: nn.Module, paths: list[str]) -> list[str]:
    """target_modules for the extracted paths: their last names where those pick out exactly these modules
    (as PEFT matches them), else the full paths."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    picked = {n for n, _ in model.named_modules() if n and name_matches(n, leaves)}
    return leaves if picked == set(paths) else sorted(paths)


def matching_keys(base: Checkpoint, tuned: Checkpoint, prefix: str, base_dir: str, tuned_dir: str,
                  modules_to_save: list[str]) -> dict[str, str]:
    """tuned key -> base key, also across a task head's prefix (a classifier's `bert.x` is an encoder's `x`).
    Tensors new in the tuned model (its head) must be kept whole (modules_to_save); a base tensor the tuned
    model lacks means another architecture."""
    candidates = {k: [k, k.removeprefix(f"{prefix}."), f"{prefix}.{k}"] for k in tuned.file_of}
    found = {k: next((c for c in cs if c in base.file_of), None) for k, cs in candidates.items()}
    new = sorted(k for k, b in found.items() if b is None)
    missing = sorted(set(base.file_of) - set(found.values()))
    if missing:
        raise ValueError(f"{tuned_dir} and {base_dir} hold different tensors ({len(missing)} of the base are not "
                         f"in the tuned model, e.g. {missing[:3]}; {len(new)} only in the tuned model, e.g. "
                         f"{new[:3]}): extract needs a fully fine-tuned copy of the same architecture")
    unsaved = [k for k in new if not any(name_matches(o, modules_to_save) for o in _owners(k.rpartition(".")[0]))]
    if unsaved:
        heads = sorted({k.rpartition(".")[0].split(".")[0] for k in unsaved})
        raise ValueError(f"{len(unsaved)} tensors of {tuned_dir} are new, not in {base_dir} (e.g. {unsaved[:3]}): "
                         f"a head added in fine-tuning; keep it whole with --modules_to_save {' '.join(heads)}")
    return {k: b for k, b in found.items() if b is not None}


def check_saved_exist(model: nn.Module, modules_to_save: list[str]) -> None:
    unknown = [m for m in modules_to_save if not any(name_matches(n, [m]) for n, _ in model.named_modules() if n)]
    if unknown:
        raise ValueError(f"--modules_to_save {unknown} match no module of {type(model).__name__} (names match a "
                         "module path or its dotted suffix, e.g. norm or model.embed_tokens)")


def task_type(model: nn.Module) -> str | None:
    """PEFT's task_type for the model's class (CAUSAL_LM, SEQ_CLS, ...), None for others."""
    suffixes = {"ForCausalLM": "CAUSAL_LM", "LMHeadModel": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
                "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS"}
    return next((t for s, t in suffixes.items() if type(model).__name__.endswith(s)), None)


def _owners(path: str) -> list[str]:
    """A module path and every path above it (a tensor belongs to all of them)."""
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
