"""Many LoRA adapters over one frozen base model, a different one per batch row.

The idea of Punica / S-LoRA (BGMV): each adapted Linear keeps every loaded adapter in two
stacked tensors, A: slots x d_in x r and B: slots x r x d_out (scaling folded into B, ranks
zero-padded to the largest). A forward gathers each row's A and B by its slot and adds
x A[slot] B[slot] with two batched matmuls, so a batch that mixes adapters is one pass, with
no loop over adapters. Slot 0 stays all zeros: it serves rows without an adapter, and an
adapter that does not target a module holds zeros there too.
"""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.config import CONFIG_NAME, LoraConfig
from lorakit.families import family
from lorakit.lora.dora import weight_norm
from lorakit.lora.layers import WrapsBase, dense_weight, is_conv1d
from lorakit.model.adapter_files import LEGACY_WEIGHTS_NAME, PREFIX, WEIGHTS_NAME, read_adapter_file
from lorakit.model.targeting import is_all_linear, layer_index_ok, name_matches, pattern_value
from lorakit.modules import replace_module
from lorakit.quant.linear4bit import NF4Linear

_KEY = re.compile(r"(?P<path>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)")


class _Rows:
    """Which slot each batch row uses, shared by a bank and its layers (None: the base model alone);
    `every`: one slot for every row of any batch (a vision tower's batch is images or patches, not requests)."""

    slots: torch.Tensor | None = None
    every: bool = False


@dataclass
class _ModuleAdapter:
    """One adapter's weights for one module, as read from its file."""

    A: torch.Tensor  # r x d_in
    B: torch.Tensor  # d_out x r
    scaling: float
    magnitude: torch.Tensor | None  # DoRA's m (d_out), or None


def servable(module: nn.Module) -> bool:
    """Whether a bank layer can wrap `module`: a Linear, a GPT-2 Conv1D or a 4-bit NF4Linear."""
    return isinstance(module, (nn.Linear, NF4Linear)) or is_conv1d(module)


def in_out(module: nn.Module) -> tuple[int, int]:
    """(inputs, outputs) of a servable module."""
    if isinstance(module, NF4Linear):
        return module.in_features, module.out_features
    return tuple(module.weight.shape if is_conv1d(module) else module.weight.shape[::-1])


class BankLinear(WrapsBase):
    """A Linear, GPT-2 Conv1D or NF4Linear that adds to each batch row its own adapter's output:
    out = (W x + s B A x) * dora_scale[a] + bias, a = that row's slot. Keys stay the base's."""

    def __init__(self, base: nn.Module, rows: _Rows, n_slots: int):
        super().__init__(base)
        self.rows = rows
        self.fan_in_fan_out = is_conv1d(base)
        self.d_in, self.d_out = in_out(base)
        like = base.weight_packed.new_empty(0, dtype=base.weight_dtype) if isinstance(base, NF4Linear) else base.weight
        self.stacked_A = like.new_zeros(n_slots, self.d_in, 0)  # A transposed, per slot
        self.stacked_B = like.new_zeros(n_slots, 0, self.d_out)  # (s B) transposed, per slot
        self.dora_scale: torch.Tensor | None = None  # slots x d_out: m / ||W + sBA||, 1 for plain LoRA

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        slots = self.rows.slots
        if slots is None:
            return out
        n = x.shape[0]
        if self.rows.every:
            slots = slots.expand(n)
        elif n != slots.shape[0]:
            raise ValueError(f"AdapterBank.rows() named adapters for {slots.shape[0]} rows, "
                             f"but the model got a batch of {n} rows")
        A = self.stacked_A.index_select(0, slots).to(out.dtype)  # each row's adapter: one gather, no loop
        B = self.stacked_B.index_select(0, slots).to(out.dtype)
        xA = torch.bmm(x.reshape(n, -1, self.d_in).to(out.dtype), A)
        rows = out.view(n, -1, self.d_out)  # updated in place: out = W x (+ bias) + x A B
        if self.dora_scale is None:
            return rows.baddbmm_(xA, B).view(out.shape)
        bias = self.base_layer.bias
        if bias is not None:
            rows.sub_(bias)
        rows.baddbmm_(xA, B).mul_(self.dora_scale.index_select(0, slots).to(out.dtype)[:, None])
        return (rows if bias is None else rows.add_(bias)).view(out.shape)

    def weight_out_in(self) -> torch.Tensor:
        """The base weight as out x in, dequantised if it is stored in 4 bits (for DoRA's norm)."""
        weight = dense_weight(self.base_layer)
        return weight.T if self.fan_in_fan_out else weight

    def resize(self, n_slots: int, rank: int) -> None:
        """Grow the stacks to n_slots slots and rank r (zero-padded), keeping what they hold."""
        old_slots, _, old_rank = self.stacked_A.shape
        if (n_slots, rank) == (old_slots, old_rank):
            return
        A = self.stacked_A.new_zeros(n_slots, self.d_in, rank)
        B = self.stacked_B.new_zeros(n_slots, rank, self.d_out)
        A[:old_slots, :, :old_rank] = self.stacked_A
        B[:old_slots, :old_rank] = self.stacked_B
        self.stacked_A, self.stacked_B = A, B
        if self.dora_scale is not None:
            self.dora_scale = torch.cat([self.dora_scale, self.dora_scale.new_ones(n_slots - old_slots, self.d_out)])

    def set_slot(self, slot: int, adapter: _ModuleAdapter) -> None:
        r = adapter.A.shape[0]
        self.resize(self.stacked_A.shape[0], max(r, self.stacked_A.shape[2]))
        self.clear_slot(slot)
        sB = adapter.B.float() * adapter.scaling
        self.stacked_A[slot, :, :r] = adapter.A.T.to(self.stacked_A.dtype)
        self.stacked_B[slot, :r] = sB.T.to(self.stacked_B.dtype)
        if adapter.magnitude is not None:
            if self.dora_scale is None:
                self.dora_scale = self.stacked_A.new_ones(self.stacked_A.shape[0], self.d_out)
            weight = self.weight_out_in().float()
            norm = weight_norm(weight, sB.to(weight.device) @ adapter.A.float().to(weight.device))
            self.dora_scale[slot] = (adapter.magnitude.float().to(norm.device) / norm).to(self.dora_scale.dtype)

    def clear_slot(self, slot: int) -> None:
        self.stacked_A[slot] = 0
        self.stacked_B[slot] = 0
        if self.dora_scale is not None:
            self.dora_scale[slot] = 1

    def extra_repr(self) -> str:
        return f"base={self.base_layer!r}, slots={self.stacked_A.shape[0]}, max_rank={self.stacked_A.shape[2]}"


class AdapterBank:
    """Serves many LoRA adapters over one frozen base model, several in one batch.

    Move the model to its device and dtype before making the bank. One batch at a time:
    `rows()` sets state that every adapted layer reads, so it is not thread-safe."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._rows = _Rows()
        self._slots: dict[str, int] = {}
        self._layers: dict[str, BankLinear] = {}
        self._n_slots = 2  # slot 0 (no adapter) + room for one; doubles when full

    @property
    def names(self) -> list[str]:
        return list(self._slots)

    def read(self, folder: str | os.PathLike) -> dict[str, _ModuleAdapter]:
        """The adapter in `folder`, read and checked against the model without changing the bank
        (safe beside a running batch: a server reads here and loads those tensors between batches)."""
        return read_adapter(folder, self.model)

    def load(self, name: str, folder: str | os.PathLike, modules: dict[str, _ModuleAdapter] | None = None) -> None:
        """Add the PEFT-format adapter in `folder` (or its tensors as read() gave them) under `name`;
        nothing changes if it does not fit."""
        if name in self._slots:
            raise ValueError(f"an adapter named {name!r} is already loaded; unload it first or pick another name")
        if modules is None:
            modules = read_adapter(folder, self.model)
        used = set(self._slots.values())
        slot = next((s for s in range(1, self._n_slots) if s not in used), None)
        if slot is None:
            slot, self._n_slots = self._n_slots, 2 * self._n_slots
            for layer in self._layers.values():
                layer.resize(self._n_slots, layer.stacked_A.shape[2])
        for path, adapter in modules.items():
            self._layer(path).set_slot(slot, adapter)
        self._slots[name] = slot

    def unload(self, name: str) -> None:
        """Drop an adapter; its slot is zeroed and reused by the next load."""
        if name not in self._slots:
            raise KeyError(f"no adapter named {name!r} is loaded; loaded: {self.names}")
        slot = self._slots.pop(name)
        for layer in self._layers.values():
            layer.clear_slot(slot)

    def rows(self, adapters: list[str | None]):
        """Within this block, each forward of self.model uses adapters[i] for batch row i (None: base)."""
        return self._use(adapters, every=False)

    def every_row(self, adapter: str | None):
        """Within this block, every row of every forward uses `adapter` (None: the base), whatever the batch
        size: for a vision-language model's image encoder, whose batch holds one request's images."""
        return self._use([adapter], every=True)

    @contextlib.contextmanager
    def _use(self, adapters: list[str | None], every: bool):
        """The slots of `adapters` set on the layers for this block (`every`: one adapter for all rows)."""
        unknown = [a for a in adapters if a is not None and a not in self._slots]
        if unknown:
            raise KeyError(f"no adapter named {unknown[0]!r} is loaded; loaded: {self.names}")
        slots = None
        if any(a is not None for a in adapters):
            device = next(iter(self._layers.values())).stacked_A.device
            slots = torch.tensor([0 if a is None else self._slots[a] for a in adapters], device=device)
        previous = self._rows.slots, self._rows.every
        self._rows.slots, self._rows.every = slots, every and slots is not None
        try:
            yield
        finally:
            self._rows.slots, self._rows.every = previous

    def _layer(self, path: str) -> BankLinear:
        """The bank layer at `path`, swapping one in (with empty stacks) on first use."""
        if path not in self._layers:
            layer = BankLinear(self.model.get_submodule(path), self._rows, self._n_slots)
            replace_module(self.model, path, layer)
            self._layers[path] = layer
        return self._layers[path]


def read_adapter(folder: str | os.PathLike, model: nn.Module) -> dict[str, _ModuleAdapter]:
    """Module path -> that module's adapter weights, checked against `model`; ValueError naming
    the problem if the adapter cannot be served by a bank over this model."""
    folder = os.fspath(folder)
    config = LoraConfig.from_pretrained(folder)
    has = {name: os.path.isfile(os.path.join(folder, name)) for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME)}
    if not has[WEIGHTS_NAME] and has[LEGACY_WEIGHTS_NAME]:
        raise ValueError(f"{folder}: the bank loads {WEIGHTS_NAME} only, this folder has {LEGACY_WEIGHTS_NAME}; "
                         "convert it (load with PeftModel and save_pretrained)")
    if config.modules_to_save:
        raise ValueError(f"{folder}: modules_to_save={config.modules_to_save} swaps whole modules, which cannot "
                         "differ per batch row; the bank serves adapters whose only weights are LoRA layers")
    if config.bias != "none":
        raise ValueError(f"{folder}: bias={config.bias!r} trains base biases, which cannot differ per batch row; "
                         "the bank serves adapters with bias='none'")
    tensors = read_adapter_file(folder)
    embedding = next((k for k in tensors if ".lora_embedding_" in k), None)
    if embedding is not None:
        raise ValueError(f"{folder}: {embedding!r} is LoRA on an Embedding layer; the bank serves LoRA and DoRA "
                         "on nn.Linear and GPT-2 Conv1D layers only")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key[len(PREFIX):]) if key.startswith(PREFIX) else None
        if match is None:
            raise ValueError(f"{folder}: {key!r} is not a lora_A / lora_B / lora_magnitude_vector weight; base "
                             "weights and biases cannot differ per batch row, so the bank cannot serve this adapter")
        parts.setdefault(match["path"], {})[match["kind"].split(".")[0]] = tensor
    if not parts:
        raise ValueError(f"{folder}: {WEIGHTS_NAME} holds no LoRA weights")
    modules = {path: _module_adapter(folder, config, model, path, found) for path, found in parts.items()}
    _check_targets(folder, config, model, sorted(parts))
    return modules


def _check_targets(folder: str, config: LoraConfig, model: nn.Module, paths: list[str]) -> None:
    """Refuse, as PeftModel does, target_modules that match no module of the model, and weights for
    modules that adapter_config.json does not target."""
    targets = config.target_modules
    if targets is None:
        targets = list(family(model).default_targets)
    if is_all_linear(targets):
        return  # every Linear and Conv1D: _module_adapter checks the layer types
    if not any(name_matches(name, targets) for name, _ in model.named_modules() if name):
        raise ValueError(f"{folder}: target_modules={targets!r} in {CONFIG_NAME} match no module of "
                         f"{type(model).__name__}; PeftModel refuses this adapter too")
    excluded = config.exclude_modules
    stray = [p for p in paths if not name_matches(p, targets) or not layer_index_ok(p, config)
             or (excluded and name_matches(p, excluded))]
    if stray:
        raise ValueError(f"{folder}: {WEIGHTS_NAME} has weights for {stray[0]}, which target_modules={targets!r} "
                         f"in {CONFIG_NAME} does not target ({len(stray)} such modules); PeftModel refuses "
                         "this adapter too")


def _module_adapter(folder: str, config: LoraConfig, model: nn.Module, path: str,
                    found: dict[str, torch.Tensor]) -> _ModuleAdapter:
    where = f"{folder}: {path}"
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"{where}: {type(model).__name__} has no such module; "
                         "was the adapter trained for another model?") from None
    module = module.base_layer if isinstance(module, BankLinear) else module
    if not servable(module):
        raise ValueError(f"{where} is a {type(module).__name__}; the bank serves LoRA on nn.Linear, "
                         "GPT-2 Conv1D and NF4Linear layers only")
    if "lora_A" not in found or "lora_B" not in found:
        raise ValueError(f"{where}: the file has {sorted(found)} but needs both lora_A and lora_B")
    A, B, magnitude = found["lora_A"], found["lora_B"], found.get("lora_magnitude_vector")
    d_in, d_out = in_out(module)
    r = A.shape[0]
    if A.shape != (r, d_in) or B.shape != (d_out, r) or (magnitude is not None and magnitude.shape != (d_out,)):
        raise ValueError(f"{where}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit a layer of "
                         f"{d_in} inputs and {d_out} outputs (expected ({r}, {d_in}) / ({d_out}, {r})); "
                         "the adapter was made for a model of other dimensions")
    expected_r = pattern_value(path, config.rank_pattern, config.r)
    if r != expected_r:
        raise ValueError(f"{where}: adapter_config.json gives rank {expected_r} but lora_A has {r} rows")
    if (magnitude is not None) != config.use_dora:
        raise ValueError(f"{where}: use_dora={config.use_dora} in adapter_config.json but the file "
                         f"{'has' if magnitude is not None else 'lacks'} lora_magnitude_vector")
    alpha = pattern_value(path, config.alpha_pattern, config.lora_alpha)
    return _ModuleAdapter(A, B, config.scaling_for(r, alpha), magnitude)
